"""50 concurrent users launching the app through the sandbox EHR, against gunicorn workers sharing a PostgreSQL store.

Set-up (all on loopback): a throwaway PostgreSQL cluster (tests/fixtures/postgres.py), the secured sandbox EHR with
its demo patients, and the app run by gunicorn (``smart_app.wsgi:app``, several worker processes with threads) with
``STORE_URL`` on that cluster, exactly as docs/deployment.md describes minus the TLS proxy. Each simulated user, in
its own browser session (cookie jar), repeatedly: asks the EHR for a launch of a given demo patient (the EHR
side, not timed), opens the launch URL and follows every redirect (app /launch -> EHR authorize -> app /callback ->
patient page: timed as "launch"), then reloads the patient page ("patient page"), and opens every other area page
the landing page links to ("order", "plan", ... when those areas exist).

Checked on every page: HTTP 200, and the patient banner names the patient this user launched with. Printed:
errors, pages showing another session's patient, p50/p95 per page. Bounded: USERS x ROUNDS launches and a
wall-clock cap. The benchmark raises (and ``python -m benchmarks`` exits 1) when any error or wrong patient is seen.
"""

from __future__ import annotations

import html
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin

import requests

from benchmarks._common import percentile
from fhir_massage.sandbox.demo import DEMO_PATIENTS, DEMO_USERS
from fhir_massage.serving import wait_ready
from tests.fixtures.postgres import create_database, running_postgres
from tests.fixtures.smart_sandbox import create_launch, register_client, start_smart_sandbox

Report = Callable[..., None]

USERS = 50
ROUNDS = 3  # launches per user
WORKERS = 4  # gunicorn worker processes
THREADS = 8  # threads per worker
WALL_CLOCK_CAP_S = 240.0
ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(r'data-testid="patient-name"[^>]*>(.*?)</', re.S)
AREA_LINK = re.compile(r'href="(/p/[^/"]+/(?!role|style\.css)[a-z][a-z0-9-]*/?[^"]*)"')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.wrong_patient = 0
        self.pages = 0

    def page(self, name: str, seconds: float) -> None:
        with self.lock:
            self.times[name].append(seconds)
            self.pages += 1

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


def _check_page(tally: Tally, name: str, response: requests.Response, family: str, families: set[str]) -> bool:
    if response.status_code != 200:
        tally.error(f"{name}: HTTP {response.status_code}")
        return False
    found = BANNER.search(response.text)
    if not found:
        tally.error(f"{name}: no patient banner on the page")
        return False
    shown = html.unescape(found.group(1)).strip()
    if family not in shown:
        with tally.lock:
            tally.wrong_patient += 1
        other = [f for f in families if f in shown]
        tally.error(f"{name}: banner shows {'another patient' if other else 'an unexpected name'}")
        return False
    return True


def _user(n: int, sandbox, client_id: str, app_url: str, tally: Tally, deadline: float) -> None:
    patients = [p for p in DEMO_PATIENTS if p.get("source") == "hand-made"]
    families = {p["name"].split()[-1] for p in patients}
    user = DEMO_USERS[n % len(DEMO_USERS)]["id"]
    browser = requests.Session()  # one browser: its own cookie jar
    for round_ in range(ROUNDS):
        if time.monotonic() > deadline:
            return
        patient = patients[(n + round_) % len(patients)]
        family = patient["name"].split()[-1]
        try:
            launch = create_launch(sandbox, client_id, user, patient["id"], need_patient_banner=True)
            started = time.perf_counter()
            r = browser.get(launch["launch_url"], timeout=60)  # /launch -> authorize -> /callback -> patient page
            tally.page("launch (to patient page)", time.perf_counter() - started)
            if not _check_page(tally, "launch", r, family, families):
                continue
            landing = r.url
            started = time.perf_counter()
            r2 = browser.get(landing, timeout=60)
            tally.page("patient page (reload)", time.perf_counter() - started)
            _check_page(tally, "patient page", r2, family, families)
            for link in sorted(set(AREA_LINK.findall(r.text))):
                area = link.split("/")[3] or "area"
                started = time.perf_counter()
                r3 = browser.get(urljoin(app_url, html.unescape(link)), timeout=60)
                tally.page(f"{area} page", time.perf_counter() - started)
                _check_page(tally, f"{area} page", r3, family, families)
        except (requests.RequestException, AssertionError) as exc:
            tally.error(f"user {n}: {type(exc).__name__}")


def run(report: Report) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with running_postgres() as cluster, tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        dsn = create_database(cluster)
        sandbox = start_smart_sandbox(clients=[], seed=True)
        gunicorn = None
        try:
            port = _free_port()
            app_url = f"http://127.0.0.1:{port}"
            client_id = "fm-load-" + secrets.token_hex(3)
            register_client(sandbox, {"client_id": client_id, "auth_method": "none", "name": "fhir-massage (load)",
                                      "redirect_uris": [f"{app_url}/callback"], "launch_url": f"{app_url}/launch"})
            regs = Path(tmp) / "ehrs.toml"
            regs.write_text(f'[[ehr]]\niss = "{sandbox.fhir_base}"\nclient_id = "{client_id}"\n'
                            f'name = "Sandbox EHR"\nframe_ancestors = ["{sandbox.url}"]\n')
            env = {**os.environ, "FHIR_MASSAGE_REGISTRATIONS": str(regs), "FHIR_MASSAGE_PUBLIC_URL": app_url,
                   "FHIR_MASSAGE_STORE_URL": dsn, "FHIR_MASSAGE_SECRET_KEY": secrets.token_hex(32),
                   "PYTHONPATH": str(ROOT)}
            log = Path(tmp) / "gunicorn.log"
            with log.open("wb") as out:
                gunicorn = subprocess.Popen(
                    [str(Path(sys.executable).with_name("gunicorn")), "--workers", str(WORKERS), "--threads",
                     str(THREADS), "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "5",
                     "smart_app.wsgi:app"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_ready(f"{app_url}/healthz", deadline_s=60, ok=lambda r: r.status_code == 200)
            except TimeoutError:
                raise RuntimeError("gunicorn did not start:\n" + log.read_text(errors="replace")[-3000:]) from None

            tally = Tally()
            deadline = time.monotonic() + WALL_CLOCK_CAP_S
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=USERS) as pool:
                for f in [pool.submit(_user, n, sandbox, client_id, app_url, tally, deadline) for n in range(USERS)]:
                    f.result()
            elapsed = time.perf_counter() - started

            report(f"users x launches (gunicorn {WORKERS} workers x {THREADS} threads, PostgreSQL store)",
                   f"{USERS} x {ROUNDS}")
            report("pages loaded", tally.pages, "", f"in {elapsed:.1f} s ({tally.pages / elapsed:.1f}/s)")
            report("errors", len(tally.errors))
            report("pages showing another session's patient", tally.wrong_patient)
            for name in sorted(tally.times):
                samples = tally.times[name]
                report(f"{name} p50", percentile(samples, 50) * 1000, "ms", f"n={len(samples)}")
                report(f"{name} p95", percentile(samples, 95) * 1000, "ms")
            if tally.errors or tally.wrong_patient:
                kinds = defaultdict(int)
                for e in tally.errors:
                    kinds[e] += 1
                # the app's own log (no tokens or patient data by its rules) says why; show its last lines
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
                raise RuntimeError("load run had failures: " + "; ".join(f"{k} (x{v})" for k, v in kinds.items())
                                   + f"\napp log (last lines):\n{tail}")
        finally:
            if gunicorn is not None:
                gunicorn.terminate()
                try:
                    gunicorn.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    gunicorn.kill()
                    gunicorn.wait(timeout=10)
            sandbox.stop()
