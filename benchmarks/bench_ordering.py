"""Ordering: the live re-screen endpoint (p50/p95 over 200 calls), and the round trips of opening the order page and
of signing.

The re-screen must feel live: it reads the chart from the app's store (fetched once per launch), so it should make
no EHR request at all; opening the page should cost ONE batch to the EHR (the chart) and signing ONE transaction.
Measured on the DVT demo patient (four findings, overrides) against the seeded sandbox on loopback.
"""

from __future__ import annotations

import re
import statistics
import time
from html import unescape

import requests

from benchmarks._common import record_outgoing, start_sandbox_and_app

CALLS = 200


def _hidden(html: str, name: str) -> str:
    return unescape(re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html).group(1))


def run(report) -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    sandbox, app_server, app, client_id = start_sandbox_and_app(AREAS=("orders",), ORDERS_VALIDATE=False)
    outgoing = record_outgoing(app)
    try:
        out = requests.post(f"{sandbox.url}/_sandbox/launches", json={
            "client_id": client_id, "user": "dr-ada-grey", "patient": "demo-dana-whitfield"}, timeout=10).json()
        browser = requests.Session()
        landing = browser.get(out["launch_url"], timeout=30).url

        outgoing.clear()
        started = time.perf_counter()
        page = browser.get(landing + "orders/", timeout=30)
        load_s = time.perf_counter() - started
        if "/orders/draft/" not in page.url:
            raise RuntimeError(f"the order page did not open ({page.status_code})")
        report("page load: browser hops (new draft → 303 → form)", 1 + len(page.history), "req")
        report("page load: app→EHR requests (chart, first time)", len(outgoing), "req", ", ".join(outgoing))
        report("page load: time", load_s * 1000, "ms")

        csrf = _hidden(page.text, "csrf_token")
        base = {"draft_id": _hidden(page.text, "draft_id"), "frequency": "2", "duration_weeks": "6",
                "session_minutes": "45", "reason_text": "Calf cramps"}
        variants = [
            {"technique": ["swedish"], "site": ["37822005"]},
            {"technique": ["deep-tissue"], "site": ["30021000"], "side-30021000": "left"},
            {"technique": ["deep-tissue", "swedish"], "site": ["30021000", "68367000"], "side-30021000": "right",
             "side-68367000": "bilateral"},
            {"technique": ["lymphatic-drainage"], "site": ["53120007"], "side-53120007": "left"},
        ]
        url = landing + "orders/screen"
        headers = {"X-CSRF-Token": csrf, "Accept": "application/json"}
        outgoing.clear()
        times = []
        for i in range(CALLS):
            t0 = time.perf_counter()
            r = browser.post(url, data={**base, **variants[i % len(variants)]}, headers=headers, timeout=30)
            times.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"re-screen answered {r.status_code}")
        times.sort()
        report(f"re-screen: p50 over {CALLS} calls", statistics.median(times), "ms")
        report(f"re-screen: p95 over {CALLS} calls", times[int(0.95 * len(times)) - 1], "ms")
        report("re-screen: app→EHR requests over all calls (target 0)", len(outgoing), "req")

        sign = {**base, "technique": ["deep-tissue"], "site": ["30021000"], "side-30021000": "left",
                "override-dvt-acute": "clearance-obtained", "override-note-dvt-acute": "cleared by vascular surgery",
                "ack-anticoagulant": "yes", "ack-dvt-acute-elsewhere": "yes", "csrf_token": csrf}
        outgoing.clear()
        t0 = time.perf_counter()
        r = browser.post(landing + "orders/sign", data=sign, timeout=60)
        sign_s = time.perf_counter() - t0
        if "/orders/done/" not in r.url:
            raise RuntimeError(f"signing did not reach the confirmation ({r.status_code})")
        report("sign: browser hops (POST → 303 → confirmation)", 1 + len(r.history), "req")
        report("sign: app→EHR requests (target 1 transaction)", len(outgoing), "req", ", ".join(outgoing))
        report("sign: time (incl. confirmation page)", sign_s * 1000, "ms")
    finally:
        app_server.stop()
        sandbox.stop()
