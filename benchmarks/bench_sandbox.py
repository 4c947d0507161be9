"""Sandbox FHIR server speed: load 100 patients x 10 Conditions, then search them over loopback HTTP."""

from __future__ import annotations

import logging
import statistics
import time
import uuid

import requests

from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
from fhir_massage.serving import serve_in_thread, wait_ready

SCT = "http://snomed.info/sct"


def _bundle(i: int) -> dict:
    p_urn = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": p_urn, "resource": {"resourceType": "Patient", "name": [{"family": f"Bench{i}"}]},
                "request": {"method": "POST", "url": "Patient"}}]
    for k in range(10):
        entries.append({"resource": {
            "resourceType": "Condition", "subject": {"reference": p_urn},
            "code": {"coding": [{"system": SCT, "code": str(100000 + k)}]},
            "onsetDateTime": f"20{10 + k}-01-01"}, "request": {"method": "POST", "url": "Condition"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _timed(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run(report) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # access log per request drowns the figures
    app = create_sandbox_app(SandboxConfig(open=True, seed=False))
    server = serve_in_thread(app)
    base = f"{server.url}/fhir"
    try:
        wait_ready(f"{server.url}/_sandbox/health")
        s = requests.Session()
        t = time.perf_counter()
        pids = []
        for i in range(100):
            r = s.post(base, json=_bundle(i), headers={"Content-Type": "application/fhir+json"}, timeout=60)
            r.raise_for_status()
            pids.append(r.json()["entry"][0]["resource"]["id"])
        load = time.perf_counter() - t
        report("load 100 transactions (1 Patient + 10 Conditions each)", load, "s")
        report("  per resource written", load / 1100 * 1000, "ms")

        def all_conditions():
            b = s.get(f"{base}/Condition", params={"_count": 1000}, timeout=60).json()
            assert len(b["entry"]) == 1000

        def patient_conditions():
            b = s.get(f"{base}/Condition", params={"patient": pids[50]}, timeout=60).json()
            assert b["total"] == 10

        def coded_dated():
            s.get(f"{base}/Condition", params={"code": f"{SCT}|100005", "onset-date": "ge2015"}, timeout=60).json()

        report("search 1,000 Conditions (_count=1000), median", _timed(all_conditions, 10), "ms")
        report("search one patient's Conditions (100 patients), median", _timed(patient_conditions), "ms")
        report("search code + onset-date over 1,000, median", _timed(coded_dated), "ms")
        report("read one Patient, median", _timed(lambda: s.get(f"{base}/Patient/{pids[0]}", timeout=10)), "ms")
    finally:
        server.stop()
