"""Plan view: round trips and time for a plan with 2 sessions vs 50 sessions / 100 pain scores (secured sandbox).

What is measured, per patient: ``smart_app.plan.load`` (the FHIR reads: one batch, plus a second one only for
searches the sandbox refuses with their _include, plus one request per further page) and ``build_cards`` (rows,
grouping, re-screen, threads, SVG), then the whole page through the real app (launch once, GET the plan page).
The round-trip count is the figure that must not grow with the number of sessions.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import requests

from benchmarks._common import median_ms
from fhir_massage.fhir import FhirClient, StaticToken
from tests.fixtures.app import register_with_sandbox
from tests.fixtures.smart_sandbox import create_launch, get_token, start_smart_sandbox
from tests.integration.test_plan_helpers import PHYSICIAN, document, message, sign_order, writer

RUNS = 15


def run(report) -> None:
    from smart_app import plan as plan_area

    for name in ("werkzeug", "smart_app", "fhir_massage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sb = start_smart_sandbox()
    app = None
    try:
        now = datetime.now(timezone.utc)
        w = writer(sb)
        small = sign_order(w, "demo-tom-becker", authored=now - timedelta(days=10))
        for i in range(2):
            document(w, small, start=now - timedelta(days=8 - 3 * i), pain=(6, 3))
        message(w, small, "Going well.")
        t = time.perf_counter()
        big = sign_order(w, "demo-helen-brooks", frequency=3, weeks=20, authored=now - timedelta(days=170))
        for i in range(50):
            document(w, big, start=now - timedelta(days=168 - 3 * i), pain=(8 - i % 5, 4 - i % 4))
        for i in range(5):
            message(w, big, f"Progress note {i}.")
        report("seed: 50 documented sessions (one transaction each)", time.perf_counter() - t, "s")

        tok = get_token(sb, "test-public", PHYSICIAN, "demo-tom-becker",
                        scopes="launch openid fhirUser user/*.rs")["access_token"]
        reader = FhirClient(sb.fhir_base, token_source=StaticToken(tok))
        app = register_with_sandbox(sb, {})
        for label, patient in (("2 sessions", "demo-tom-becker"), ("50 sessions / 100 pain scores",
                                                                   "demo-helen-brooks")):
            data = plan_area.load(reader, patient)
            report(f"{label}: round trips to the FHIR server", data.round_trips, "",
                   f"{len(data.procedures)} Procedures, {len(data.observations)} pain scores")
            report(f"{label}: read (plan.load), median", median_ms(lambda: plan_area.load(reader, patient), RUNS), "ms")
            report(f"{label}: compute (rows, re-screen, SVG), median", median_ms(
                lambda: plan_area.build_cards(data, today=now.date(), now=now, physician_refs=["Practitioner/x"],
                                              patient_ref=f"Patient/{patient}"), RUNS), "ms")
            browser = requests.Session()
            out = create_launch(sb, app.client_id, PHYSICIAN, patient)
            landing = browser.get(out["launch_url"], timeout=30)
            lsid = re.match(r"^/p/([^/]+)/", urlsplit(landing.url).path).group(1)
            url = f"{app.url}/p/{lsid}/plan/"
            assert browser.get(url, timeout=30).status_code == 200
            report(f"{label}: whole page through the app, median", median_ms(
                lambda: browser.get(url, timeout=30).raise_for_status(), RUNS), "ms")
    finally:
        if app is not None:
            app.stop()
        sb.stop()
