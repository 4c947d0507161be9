"""Several app instances behind one public URL share their launch state through PostgreSQL: a launch started on
one instance finishes on another, and the patient page then opens on either (docs/deployment.md).

Two app instances run on their own loopback ports, each with its own ``create_app`` and its own store connection,
with the same PUBLIC_URL, SECRET_KEY and STORE_URL, as two gunicorn workers or two hosts behind a load balancer
would. The browser's requests are sent to one instance or the other by hand. The control case runs the same
steps with one in-memory SQLite store per instance, and the hand-over must then fail.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from fhir_massage.sandbox.demo import DEMO_PATIENTS, DEMO_USERS
from tests.fixtures.app import register_with_sandbox, start_app_server
from tests.fixtures.postgres import create_database
from tests.fixtures.smart_sandbox import create_launch

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _on(instance_url: str, url: str) -> str:
    """The same path and query, sent to another instance (what a load balancer does)."""
    target, parts = urlsplit(instance_url), urlsplit(url)
    return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))


def _pair(sandbox, store_a: str, store_b: str):
    secret = secrets.token_hex(16)
    a = register_with_sandbox(sandbox, {}, SECRET_KEY=secret, STORE_URL=store_a)
    registration = {"iss": sandbox.fhir_base, "client_id": a.client_id, "name": "Sandbox EHR",
                    "frame_ancestors": [sandbox.url]}
    b = start_app_server(lambda _url: [registration], PUBLIC_URL=a.url, SECRET_KEY=secret, STORE_URL=store_b)
    return a, b


def _stop(*instances) -> None:
    for instance in instances:
        instance.stop()
        instance.store.close()  # AppServer.stop leaves the store open: close its PostgreSQL connection here


def _start_on_a_finish_on_b(sandbox, a, b, patient: dict, user: str, browser: requests.Session) -> requests.Response:
    launch = create_launch(sandbox, a.client_id, user, patient["id"], need_patient_banner=True)
    r = browser.get(launch["launch_url"], allow_redirects=False, timeout=30)  # instance A: /launch
    assert r.status_code == 302, r.text[:300]
    r = browser.get(r.headers["Location"], allow_redirects=False, timeout=30)  # the EHR's authorize endpoint
    assert r.status_code == 302, r.text[:300]
    callback = r.headers["Location"]
    assert callback.startswith(a.url + "/callback?")
    return browser.get(_on(b.url, callback), allow_redirects=False, timeout=30)  # instance B: /callback


def test_a_launch_started_on_one_instance_finishes_on_another(smart_sandbox, postgres_dsn) -> None:
    dsn = create_database(postgres_dsn)
    a, b = _pair(smart_sandbox, dsn, dsn)
    try:
        assert a.store is not b.store  # two connections, one database
        assert type(a.store).__name__ == type(b.store).__name__ == "PostgresStore"
        patient = next(p for p in DEMO_PATIENTS if p.get("source") == "hand-made")
        user = next(u for u in DEMO_USERS if u["role"] == "physician")["id"]
        browser = requests.Session()
        r = _start_on_a_finish_on_b(smart_sandbox, a, b, patient, user, browser)
        assert r.status_code == 303, r.text[:500]
        landing = r.headers["Location"]
        assert re.match(r"^(https?://[^/]+)?/p/[^/]+/$", landing), landing
        # ... and the session opens on instance A again, with the launch's patient in the banner
        page = browser.get(_on(a.url, a.url + urlsplit(landing).path), timeout=30)
        assert page.status_code == 200, page.text[:500]
        family = patient["name"].split()[-1]
        assert family in page.text
        others = [p["name"].split()[-1] for p in DEMO_PATIENTS if p["id"] != patient["id"]]
        assert not [o for o in others if f">{o}" in page.text or f" {o}<" in page.text]
    finally:
        _stop(a, b)


def test_control_without_a_shared_store_the_hand_over_fails(smart_sandbox) -> None:
    a, b = _pair(smart_sandbox, "sqlite:///:memory:", "sqlite:///:memory:")
    try:
        patient = DEMO_PATIENTS[0]
        user = DEMO_USERS[0]["id"]
        r = _start_on_a_finish_on_b(smart_sandbox, a, b, patient, user, requests.Session())
        assert r.status_code in (400, 403), r.status_code  # B never saw the state A stored
        assert "not valid" in r.text or "expired" in r.text
    finally:
        _stop(a, b)
