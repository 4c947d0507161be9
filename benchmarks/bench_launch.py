"""SMART launch: sequential HTTP round trips from the launch URL to the first rendered patient page, and its time.

Target (issue 3): with discovery cached, the EHR is asked three times in a row: the authorize redirect, the token
request, and ONE batch read for the landing page (Patient + the user's Practitioner/PractitionerRole). The browser
adds its hops to the app (/launch, /callback, the landing page). The time is measured with 100 ms of latency
injected by the sandbox (POST /_sandbox/faults; the sandbox applies it to paths under /fhir only, so the token
request and the authorize redirect are not slowed: the "modelled" figure counts 100 ms for every EHR round trip).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import requests

from benchmarks._common import record_outgoing, start_sandbox_and_app

RUNS = 5


def _launch(sandbox: Any, client_id: str, outgoing: list[str]) -> tuple[float, list[str], list[str]]:
    out = requests.post(f"{sandbox.url}/_sandbox/launches", json={
        "client_id": client_id, "user": "dr-ada-grey", "patient": "demo-tom-becker"}, timeout=10).json()
    outgoing.clear()
    browser = requests.Session()
    started = time.perf_counter()
    r = browser.get(out["launch_url"], timeout=30)
    elapsed = time.perf_counter() - started
    if r.status_code != 200 or 'data-testid="patient-name"' not in r.text:
        raise RuntimeError(f"launch did not reach the patient page ({r.status_code})")
    hops = [f"{h.request.method} {urlsplit(h.url).path}" for h in [*r.history, r]]
    return elapsed, hops, list(outgoing)


def run(report) -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per hop would bury the figures
    sandbox, app_server, app, client_id = start_sandbox_and_app(AREAS=())
    outgoing = record_outgoing(app)
    try:
        cold_t, cold_hops, cold_out = _launch(sandbox, client_id, outgoing)
        report("cold launch: app→EHR requests (discovery, JWKS included)", len(cold_out), "req",
               ", ".join(cold_out))
        _t, hops, out = _launch(sandbox, client_id, outgoing)
        ehr_trips = sum(1 for h in hops if "/auth/" in h) + len(out)
        report("warm launch: browser hops", len(hops), "req", " → ".join(hops))
        report("warm launch: app→EHR requests", len(out), "req", ", ".join(out))
        report("warm launch: sequential round trips in total", len(hops) + len(out), "req")
        report("warm launch: sequential EHR round trips (target 3)", ehr_trips, "req")
        times = sorted(_launch(sandbox, client_id, outgoing)[0] for _ in range(RUNS))
        report("warm launch time, no latency (median)", times[len(times) // 2] * 1000, "ms")
        requests.post(f"{sandbox.url}/_sandbox/faults", json={"latency_ms": 100}, timeout=10).raise_for_status()
        times = sorted(_launch(sandbox, client_id, outgoing)[0] for _ in range(RUNS))
        report("warm launch time, 100 ms sandbox latency on /fhir (median)", times[len(times) // 2] * 1000, "ms",
               "only the batch read is under /fhir")
        report("modelled: 100 ms per EHR round trip", ehr_trips * 100.0, "ms")
    finally:
        requests.delete(f"{sandbox.url}/_sandbox/faults", timeout=10)
        app_server.stop()
        sandbox.stop()
