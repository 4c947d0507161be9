"""The sandbox EHR's order entry (fhir_massage/sandbox/ehr_orders.py) calling the app's CDS service over loopback:
discovery, prefetch filled from the sandbox's data, an ES384 JWT whose JWKS the sandbox serves, cards rendered."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from fhir_massage.sandbox import ehr_orders
from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
from fhir_massage.serving import RunningServer, serve_in_thread, wait_ready
from tests.fixtures.app import AppServer, start_app_server

pytestmark = pytest.mark.integration


@dataclass
class CdsPair:
    sandbox_url: str
    sandbox: RunningServer
    sandbox_app: Any
    app: AppServer

    def stop(self) -> None:
        self.app.stop()
        self.sandbox.stop()
        self.sandbox_app.extensions["fhir_massage.sandbox"]["store"].close()


def start_cds_pair(*, configure: bool = True) -> CdsPair:
    """An open, seeded sandbox (create_sandbox_app installs the order entry), and the app registered to accept its
    CDS JWTs."""
    cfg = SandboxConfig(open=True, seed=True)
    sb_app = create_sandbox_app(cfg)
    running = serve_in_thread(sb_app)
    wait_ready(f"{running.url}/_sandbox/health", ok=lambda r: r.status_code == 200)
    sb = running.url
    app = start_app_server(lambda url: [{"iss": f"{sb}/fhir", "client_id": "sandbox-cds", "cds_iss": sb,
                                         "cds_jwks_url": f"{sb}/ehr/cds-jwks"}])
    if configure:
        r = requests.post(f"{sb}/ehr/orders/settings", json={"cds_base_url": app.url}, timeout=10)
        assert r.status_code == 200, r.text
    return CdsPair(sb, running, sb_app, app)


@pytest.fixture(scope="module")
def pair():
    p = start_cds_pair()
    yield p
    p.stop()


def order(pair: CdsPair, *, action="sign", patient="demo-dana-whitfield", techniques=("deep-tissue",),
          sites=("30021000:left",)) -> requests.Response:
    data = [("user", "dr-ada-grey"), ("patient", patient), ("action", action)]
    data += [("technique", t) for t in techniques] + [("site", s) for s in sites]
    return requests.post(f"{pair.sandbox_url}/ehr/orders", data=data, timeout=30)


def test_the_sandbox_serves_its_cds_client_jwks(pair):
    jwks = requests.get(f"{pair.sandbox_url}/ehr/cds-jwks", timeout=10).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-384" and key["alg"] == "ES384" and "d" not in key


def test_order_sign_on_the_dvt_leg_shows_the_critical_card(pair):
    r = order(pair)
    assert r.status_code == 200, r.text
    page = r.text
    assert 'data-indicator="critical"' in page
    assert "Absolute contraindication: Deep vein thrombosis, current or acute (left lower limb)" in page
    assert "<code>dvt-acute</code>" in page
    assert "Request physician clearance" in page
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # the card stored for feedback came from this sandbox's JWT issuer
    records = [v for v in _card_records(pair) if v["rule"] == "dvt-acute"]
    assert records and records[-1]["iss"] == pair.sandbox_url


def _card_records(pair: CdsPair) -> list[dict[str, Any]]:
    store = pair.app.store
    rows = store._exec("SELECT value FROM kv WHERE ns=?", ("cds-card",))
    import json

    return [json.loads(row[0]) for row in rows]


def test_order_select_with_swedish_on_the_back_has_no_critical_card(pair):
    r = order(pair, action="select", techniques=("swedish",), sites=("77568009",))
    assert r.status_code == 200, r.text
    assert 'data-indicator="critical"' not in r.text
    assert re.search(r"order-select: \d+ card\(s\)", r.text)


def test_a_clear_patient_gets_no_cards(pair):
    r = order(pair, patient="demo-tom-becker", techniques=("swedish",), sites=("37822005",))
    assert r.status_code == 200 and "No cards" in r.text


def test_form_errors_are_shown_not_sent(pair):
    r = order(pair, techniques=())
    assert r.status_code == 400 and "Choose at least one technique." in r.text


def test_settings_are_loopback_only_and_checked(pair):
    r = requests.post(f"{pair.sandbox_url}/ehr/orders/settings", json={"cds_base_url": "ftp://x"}, timeout=10)
    assert r.status_code == 400


def test_without_a_configured_service_the_page_says_so():
    p = start_cds_pair(configure=False)
    try:
        r = order(p)
        assert r.status_code == 502 and "No CDS service is configured" in r.text
    finally:
        p.stop()


def test_render_markdown_shows_html_as_text():
    out = str(ehr_orders.render_markdown("**a** <script>x</script> \\*b\\* `<i>` &lt;c&gt;\n\n- item"))
    assert out == ("<p><strong>a</strong> &lt;script&gt;x&lt;/script&gt; *b* <code>&lt;i&gt;</code> &lt;c&gt;</p>"
                   "<ul><li>item</li></ul>")
