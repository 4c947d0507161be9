"""FHIR server figures: demo-data load, paged search of 1,000 Conditions, per-patient Condition search (sandbox vs SEKMET).

Every figure is taken on our sandbox and on sekmet-fhir (an independent FHIR R4 server, started as the
``sekmet_server`` test fixture starts it) in the same run, and the sandbox's figure is also shown as a ratio of
SEKMET's ("x sekmet" < 1 means the sandbox is faster). Both servers run on loopback, open (no authorization),
each with a fresh store, and both are driven through the same ``FhirClient`` over HTTP, so the ratios compare the
servers, not the clients. The one exception is the sandbox's own start-up seeding (``create_sandbox_app`` with
``seed=True``), which loads the demo bundles in-process: it is shown next to the same bundles POSTed over HTTP.

Bounded: a few thousand resources per server, a fixed number of repeats, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from benchmarks._common import percentile
from fhir_massage.fhir import FhirClient, new_urn, request_entry, resources, transaction_bundle
from fhir_massage.sandbox.demo import demo_bundles
from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
from fhir_massage.sandbox.store import Store
from tests.fixtures.sandbox import start_sandbox
from tests.fixtures.sekmet import running_sekmet

Report = Callable[..., None]

TODAY = date(2026, 1, 15)  # fixed, so every run loads the same demo data
SEED_REPEATS = 3
BIG_SEARCH_CONDITIONS = 1_000
BIG_SEARCH_PAGE = 100
BIG_SEARCH_REPEATS = 3
PATIENTS = 100
CONDITIONS_PER_PATIENT = 10
PATIENT_SEARCH_ROUNDS = 2  # every patient searched this many times -> 200 samples per server

SNOMED = "http://snomed.info/sct"
# A few real problem-list codes, so the data looks like a chart rather than 1,000 copies of one row.
CODES = [
    ("38341003", "Hypertensive disorder, systemic arterial"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195967001", "Asthma"),
    ("279039007", "Low back pain"),
    ("81680005", "Neck pain"),
    ("203082005", "Fibromyalgia"),
    ("64859006", "Osteoporosis"),
    ("84114007", "Heart failure"),
    ("128053003", "Deep venous thrombosis"),
    ("25064002", "Headache"),
]


def _patient(mark: str, n: int) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:fhir-massage:bench", "value": f"{mark}-{n}"}],
            "name": [{"family": f"Bench{n}", "given": ["Load"]}], "gender": "female", "birthDate": "1960-05-01"}


def _condition(subject: str, i: int) -> dict:
    code, display = CODES[i % len(CODES)]
    return {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "problem-list-item"}]}],
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        "subject": {"reference": subject},
        "onsetDateTime": f"20{10 + i % 15:02d}-0{1 + i % 9}-1{i % 10}",
    }


# -- servers -----------------------------------------------------------------------------------------------------


@contextmanager
def _servers() -> Iterator[dict[str, str]]:
    """{"sandbox": fhir base, "sekmet": fhir base}, both fresh and empty."""
    sandbox = start_sandbox(open=True, seed=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sekmet-") as root, running_sekmet(Path(root)) as sekmet:
            yield {"sandbox": sandbox.fhir_base, "sekmet": sekmet}
    finally:
        sandbox.stop()


def _client(base: str) -> FhirClient:
    # No retries: a benchmark must see a failure, not hide it behind a retry's extra time.
    return FhirClient(base, timeout=(5, 120), max_retries=0, page_cap=1_000)


def _ratio(sandbox: float, sekmet: float) -> str:
    return f"{sandbox / sekmet:.2f}x sekmet" if sekmet > 0 else "sekmet took no measurable time"


# -- 1. demo data ------------------------------------------------------------------------------------------------


def _seed_once(data_dir: Path | None) -> float:
    started = time.perf_counter()
    app = create_sandbox_app(SandboxConfig(open=True, seed=True, today=TODAY, data_dir=data_dir))
    elapsed = time.perf_counter() - started
    store: Store = app.extensions["fhir_massage.sandbox"]["store"]
    count = store.query("SELECT COUNT(*) FROM resources WHERE deleted = 0")[0][0]
    store.close()
    if count == 0:
        raise RuntimeError("create_sandbox_app(seed=True) loaded no resources")
    return elapsed


def _load_demo_over_http(base: str) -> tuple[float, int]:
    bundles = demo_bundles(TODAY)
    n = sum(len(b.get("entry", [])) for b in bundles)
    with _client(base) as fhir:
        started = time.perf_counter()
        for bundle in bundles:
            fhir.transaction(bundle)
        return time.perf_counter() - started, n


def bench_demo_load(report: Report, bases: dict[str, str]) -> None:
    memory = statistics.median(_seed_once(None) for _ in range(SEED_REPEATS))
    report("demo data: create_sandbox_app(seed) in-memory (median)", memory * 1000, "ms", f"of {SEED_REPEATS}")
    disk_runs = []
    for _ in range(SEED_REPEATS):
        with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
            disk_runs.append(_seed_once(Path(tmp)))
    disk = statistics.median(disk_runs)
    report("demo data: create_sandbox_app(seed) with data dir (median)", disk * 1000, "ms", f"of {SEED_REPEATS}")

    sandbox_http, n = _load_demo_over_http(bases["sandbox"])
    sekmet_http, _ = _load_demo_over_http(bases["sekmet"])
    bundles = len(demo_bundles(TODAY))
    report(f"demo data over HTTP ({bundles} transactions, {n} resources): sekmet", sekmet_http * 1000, "ms")
    report("demo data over HTTP: sandbox", sandbox_http * 1000, "ms", _ratio(sandbox_http, sekmet_http))
    report("demo data: in-memory seed vs sekmet over HTTP", memory * 1000, "ms", _ratio(memory, sekmet_http))


# -- 2. 1,000 Conditions across pages ----------------------------------------------------------------------------


def _load_big_chart(fhir: FhirClient, mark: str) -> tuple[str, float]:
    """One patient with BIG_SEARCH_CONDITIONS Conditions, loaded in transactions of 100. Returns (patient id, s)."""
    started = time.perf_counter()
    answer = fhir.transaction(transaction_bundle([request_entry("POST", "Patient", _patient(mark, 0))]))
    location = answer["entry"][0]["response"]["location"]
    pid = location.split("Patient/", 1)[1].split("/", 1)[0]
    for start in range(0, BIG_SEARCH_CONDITIONS, 100):
        fhir.transaction(transaction_bundle(
            request_entry("POST", "Condition", _condition(f"Patient/{pid}", i))
            for i in range(start, min(start + 100, BIG_SEARCH_CONDITIONS))))
    return pid, time.perf_counter() - started


def _big_search(base: str) -> tuple[float, int, float]:
    """(median seconds, round trips, load seconds) for search_all of one patient's 1,000 Conditions."""
    with _client(base) as fhir:
        pid, load_s = _load_big_chart(fhir, uuid.uuid4().hex)
        times, trips = [], set()
        for _ in range(BIG_SEARCH_REPEATS):
            fhir.reset_request_count()
            started = time.perf_counter()
            found = fhir.search_all("Condition", {"patient": pid, "_count": BIG_SEARCH_PAGE})
            times.append(time.perf_counter() - started)
            trips.add(fhir.request_count)
            if len(found) != BIG_SEARCH_CONDITIONS:
                raise RuntimeError(f"{base}: search_all found {len(found)} Conditions, expected "
                                   f"{BIG_SEARCH_CONDITIONS}")
        return statistics.median(times), max(trips), load_s


def bench_big_search(report: Report, bases: dict[str, str]) -> None:
    sk_t, sk_trips, sk_load = _big_search(bases["sekmet"])
    sb_t, sb_trips, sb_load = _big_search(bases["sandbox"])
    report(f"load {BIG_SEARCH_CONDITIONS:,} Conditions (10 transactions): sekmet", sk_load * 1000, "ms")
    report(f"load {BIG_SEARCH_CONDITIONS:,} Conditions: sandbox", sb_load * 1000, "ms", _ratio(sb_load, sk_load))
    label = f"search_all {BIG_SEARCH_CONDITIONS:,} Conditions, _count={BIG_SEARCH_PAGE}"
    report(f"{label}: sekmet (median)", sk_t * 1000, "ms", f"{sk_trips} round trips")
    report(f"{label}: sandbox (median)", sb_t * 1000, "ms", f"{sb_trips} round trips; {_ratio(sb_t, sk_t)}")


# -- 3. a patient's Conditions with 100 patients loaded ----------------------------------------------------------


def _load_patients(fhir: FhirClient, mark: str) -> list[str]:
    ids = []
    for n in range(PATIENTS):
        urn = new_urn()
        entries = [request_entry("POST", "Patient", _patient(mark, n), full_url=urn)]
        entries += [request_entry("POST", "Condition", _condition(urn, n * CONDITIONS_PER_PATIENT + i))
                    for i in range(CONDITIONS_PER_PATIENT)]
        answer = fhir.transaction(transaction_bundle(entries))
        location = answer["entry"][0]["response"]["location"]
        ids.append(location.split("Patient/", 1)[1].split("/", 1)[0])
    return ids


def _patient_searches(base: str) -> tuple[list[float], int]:
    with _client(base) as fhir:
        ids = _load_patients(fhir, uuid.uuid4().hex)
        samples = []
        fhir.reset_request_count()
        for _ in range(PATIENT_SEARCH_ROUNDS):
            for pid in ids:
                started = time.perf_counter()
                page = fhir.search("Condition", {"patient": pid})
                samples.append(time.perf_counter() - started)
                got = len(resources(page, "Condition"))
                if got != CONDITIONS_PER_PATIENT:
                    raise RuntimeError(f"{base}: patient search found {got} Conditions, expected "
                                       f"{CONDITIONS_PER_PATIENT}")
        if fhir.request_count != len(samples):
            raise RuntimeError(f"{base}: {fhir.request_count} round trips for {len(samples)} searches")
        return samples, len(samples)


def bench_patient_search(report: Report, bases: dict[str, str]) -> None:
    sk, n = _patient_searches(bases["sekmet"])
    sb, _ = _patient_searches(bases["sandbox"])
    what = f"Condition?patient= ({PATIENTS} patients x {CONDITIONS_PER_PATIENT})"
    for p in (50, 95):
        a, b = percentile(sb, p), percentile(sk, p)
        report(f"{what} p{p}: sekmet", b * 1000, "ms", f"n={n}")
        report(f"{what} p{p}: sandbox", a * 1000, "ms", _ratio(a, b))


def run(report: Report) -> None:
    # werkzeug logs every request at INFO; thousands of lines would bury the figures (and cost time).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with _servers() as bases:
        bench_demo_load(report, bases)
        bench_big_search(report, bases)
        bench_patient_search(report, bases)
