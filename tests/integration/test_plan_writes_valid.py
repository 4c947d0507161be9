"""Every resource the plan area writes holds to its profile as it landed in the sandbox: the reply Communication,
and for each change (hold, resume, complete, revoke, modify) the updated ServiceRequest, its Task and the
Provenance of the change. Read back from the sandbox and validated with fhir_massage.validation (zero errors);
tests/integration/test_plan.py checks what the changes mean, this file checks that they are valid FHIR."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from html import unescape
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from fhir_massage.fhir import FhirClient
from fhir_massage.validation import errors, validate_resource
from tests.fixtures.smart_sandbox import create_launch, start_smart_sandbox
from tests.integration.test_plan_helpers import DR_REF, PHYSICIAN, document, message, sign_order, writer

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def sandbox():
    sb = start_smart_sandbox()
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def w(sandbox):
    return writer(sandbox)


def assert_valid(resource: dict[str, Any]) -> None:
    problems = errors(validate_resource(resource))
    assert problems == [], (f"{resource.get('resourceType')}/{resource.get('id')}", [str(p) for p in problems])


def launch(sandbox, app, patient: str) -> tuple[requests.Session, str]:
    """EHR launch of the physician with a browser-like session; returns (session, the plan page URL)."""
    browser = requests.Session()
    out = create_launch(sandbox, app.client_id, PHYSICIAN, patient)
    r = browser.get(out["launch_url"], timeout=30)
    assert r.status_code == 200, r.text[:500]
    lsid = re.match(r"^/p/([^/]+)/", urlsplit(r.url).path).group(1)
    return browser, f"{app.url}/p/{lsid}/plan/"


def forms(html: str) -> list[dict[str, Any]]:
    out = []
    for m in re.finditer(r'<form method="post" action="([^"]+)"[^>]*>(.*?)</form>', html, re.S):
        body = m.group(2)
        hidden = {unescape(n): unescape(v) for n, v in
                  re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body)}
        buttons = re.findall(r'<button type="submit" name="action" value="([^"]+)"', body)
        out.append({"action": unescape(m.group(1)), "hidden": hidden, "buttons": buttons, "body": body})
    return out


def submit(browser: requests.Session, app, form: dict[str, Any], **fields: Any) -> None:
    r = browser.post(app.url + form["action"], data={**form["hidden"], **fields}, timeout=30)
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]


def read(w: FhirClient, ref: str) -> dict[str, Any]:
    rtype, rid = ref.split("/")
    return w.read(rtype, rid)


def task_ref(w: FhirClient, order_ref: str) -> str:
    return f"Task/{w.search_all('Task', {'focus': order_ref})[0]['id']}"


def assert_change_valid(w: FhirClient, order_ref: str, provenances_before: int) -> int:
    """The order and its Task as they are now, and the Provenance the change added; returns the Provenance count."""
    order = read(w, order_ref)
    assert_valid(order)
    assert_valid(read(w, task_ref(w, order_ref)))
    provs = w.search_all("Provenance", {"target": order_ref})
    assert len(provs) == provenances_before + 1, "the change wrote no Provenance (or more than one)"
    updates = [p for p in provs if p["activity"]["coding"][0]["code"] == "UPDATE"]
    assert updates, provs
    for p in provs:
        assert_valid(p)
    return len(provs)


def test_the_reply_communication_is_valid(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-helen-brooks", authored=NOW - timedelta(days=7))
    original = message(w, plan, "New bruise on the left calf; I skipped the legs.", category="condition-change")
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-helen-brooks")
    form = next(f for f in forms(browser.get(url, timeout=30).text) if f["action"].endswith("/plan/reply"))
    submit(browser, app, form, text="Thanks. Hold the legs until I have seen her.", category="request")
    (reply,) = [c for c in w.search_all("Communication", {"based-on": plan.order_ref})
                if c.get("inResponseTo") == [{"reference": f"Communication/{original['id']}"}]]
    assert reply["sender"]["reference"] == DR_REF
    assert_valid(reply)


def test_hold_resume_complete_and_revoke_write_valid_orders_tasks_and_provenance(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-eleanor-price", authored=NOW - timedelta(days=10))
    other = sign_order(w, "demo-eleanor-price", techniques=("stretching",), authored=NOW - timedelta(days=9))
    document(w, plan, start=NOW - timedelta(days=8), pain=(5, 3))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-eleanor-price")
    counts = {ref: len(w.search_all("Provenance", {"target": ref})) for ref in (plan.order_ref, other.order_ref)}

    def act(seeded, action: str, want: str, **extra: str) -> None:
        form = next(f for f in forms(browser.get(url, timeout=30).text)
                    if f["hidden"].get("plan") == seeded.draft_id and f["buttons"])
        assert action in form["buttons"], (action, form["buttons"])
        submit(browser, app, form, action=action, **extra)
        assert read(w, seeded.order_ref)["status"] == want  # the change landed: what is validated is the new state
        counts[seeded.order_ref] = assert_change_valid(w, seeded.order_ref, counts[seeded.order_ref])

    act(plan, "hold", "on-hold", reason="Fracture follow-up pending")
    act(plan, "resume", "active")
    act(plan, "complete", "completed")
    act(other, "revoke", "revoked", reason="Not needed")


def test_modify_writes_a_valid_order_task_and_provenance(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-ray-okafor", authored=NOW - timedelta(days=3))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-ray-okafor")
    before = len(w.search_all("Provenance", {"target": plan.order_ref}))
    form = next(f for f in forms(browser.get(url, timeout=30).text) if f["hidden"].get("action") == "modify")
    site = re.search(r'name="site" value="([^"]+)" checked', form["body"]).group(1)
    submit(browser, app, form, site=site, add_site="", frequency="1", weeks="4", minutes="30",
           reason="Shorter course", **{f"technique-{plan.orders[0]['id']}": "swedish"})
    assert read(w, plan.order_ref)["occurrenceTiming"]["repeat"]["frequency"] == 1  # the change landed
    assert_change_valid(w, plan.order_ref, before)
