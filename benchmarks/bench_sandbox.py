"""Sandbox FHIR server speed: load 100 patients x 10 Conditions, then search them over loopback HTTP; the app's hot paths.

The hot paths are the requests the app makes most (medians over loopback HTTP, demo data loaded): the chart fetch
(one batch of a Patient read and seven searches, fhir_massage/chart_fetch.py), an order transaction of ten entries
with conditional creates (ifNoneExist on identifier, as the ordering transaction writes), the physician's order
search with Tasks and Procedures reverse-included, and the demo seed itself (create_sandbox_app with seed=True).
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid

import requests

from datetime import date

from benchmarks._common import median_ms
from fhir_massage.chart_fetch import fetch_chart_resources
from fhir_massage.fhir import FhirClient, request_entry, transaction_bundle
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


DEMO_TODAY = date(2026, 1, 15)
DEMO_PATIENT = "demo-maria-santos"
BENCH_ID = "urn:fhir-massage:bench-order"


def _order_entries(pid: str, n: int) -> list[dict]:
    """Ten entries like an order transaction: a ServiceRequest, three Tasks and six Procedures, each created only
    if its identifier is new (ifNoneExist), the Tasks and Procedures pointing at the ServiceRequest."""
    sr_urn = f"urn:uuid:{uuid.uuid4()}"
    ident = {"system": BENCH_ID, "value": f"sr-{n}"}
    subject = {"reference": f"Patient/{pid}"}
    entries = [request_entry("POST", "ServiceRequest", {
        "resourceType": "ServiceRequest", "identifier": [ident], "status": "active", "intent": "order",
        "code": {"text": "Medical massage"}, "subject": subject}, full_url=sr_urn,
        if_none_exist=f"identifier={BENCH_ID}|sr-{n}")]
    for k in range(3):
        entries.append(request_entry("POST", "Task", {
            "resourceType": "Task", "identifier": [{"system": BENCH_ID, "value": f"task-{n}-{k}"}],
            "status": "requested", "intent": "order", "focus": {"reference": sr_urn}, "for": subject},
            if_none_exist=f"identifier={BENCH_ID}|task-{n}-{k}"))
    for k in range(6):
        entries.append(request_entry("POST", "Procedure", {
            "resourceType": "Procedure", "identifier": [{"system": BENCH_ID, "value": f"proc-{n}-{k}"}],
            "status": "completed", "basedOn": [{"reference": sr_urn}], "subject": subject,
            "code": {"text": "Medical massage session"}, "performedDateTime": f"2025-0{1 + k}-10"},
            if_none_exist=f"identifier={BENCH_ID}|proc-{n}-{k}"))
    return entries


def bench_hot_paths(report) -> None:
    seeds = []
    for _ in range(5):
        t = time.perf_counter()
        seeded = create_sandbox_app(SandboxConfig(open=True, seed=True, today=DEMO_TODAY))
        seeds.append(time.perf_counter() - t)
        seeded.extensions["fhir_massage.sandbox"]["store"].close()
    report("demo seed: create_sandbox_app(seed=True), median of 5", statistics.median(seeds) * 1000, "ms")

    app = create_sandbox_app(SandboxConfig(open=True, seed=True, today=DEMO_TODAY))
    server = serve_in_thread(app)
    try:
        wait_ready(f"{server.url}/_sandbox/health")
        with FhirClient(f"{server.url}/fhir", timeout=(5, 60), max_retries=0) as fhir:
            counter = iter(range(1_000_000))

            def chart():
                assert len(fetch_chart_resources(fhir, DEMO_PATIENT)) > 1

            def order():
                fhir.transaction(transaction_bundle(_order_entries(DEMO_PATIENT, next(counter))))

            report("chart fetch (1 batch: Patient + 7 searches), median", median_ms(chart, 20), "ms")
            report("order transaction (10 conditional creates), median", median_ms(order, 20), "ms")
            fhir.transaction(transaction_bundle(_order_entries(DEMO_PATIENT, 0)))  # replays: all 10 match

            def replay():
                fhir.transaction(transaction_bundle(_order_entries(DEMO_PATIENT, 0)))

            report("same transaction replayed (10 ifNoneExist matches), median", median_ms(replay, 20), "ms")
            params = [("patient", DEMO_PATIENT), ("_revinclude", "Task:focus"), ("_revinclude", "Procedure:based-on")]

            def orders():
                bundle = fhir.search("ServiceRequest", params)
                assert len(bundle["entry"]) == 20 * 10, len(bundle["entry"])  # 20 orders, 3 Tasks + 6 Procedures each

            report("ServiceRequest?patient&_revinclude=Task:focus,Procedure:based-on (20 orders), median",
                   median_ms(orders, 20), "ms")
    finally:
        server.stop()
        app.extensions["fhir_massage.sandbox"]["store"].close()


def run(report) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # access log per request drowns the figures
    bench_hot_paths(report)
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

        report("search 1,000 Conditions (_count=1000), median", median_ms(all_conditions, 10), "ms")
        report("search one patient's Conditions (100 patients), median", median_ms(patient_conditions, 20), "ms")
        report("search code + onset-date over 1,000, median", median_ms(coded_dated, 20), "ms")
        report("read one Patient, median", median_ms(lambda: s.get(f"{base}/Patient/{pids[0]}", timeout=10), 20), "ms")
    finally:
        server.stop()
