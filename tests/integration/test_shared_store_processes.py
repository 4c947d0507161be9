"""Two app *processes* behind one PostgreSQL store (issue "integrator kit": several instances behind a load
balancer). tests/integration/test_shared_store.py shows it with two app objects in one pytest process; here each
instance is a real `fhir-massage app --registrations FILE --store postgresql://...` process with nothing in
common but the store, the registrations file and FHIR_MASSAGE_SECRET_KEY.

Both answer for the same public URL (instance A's): the launch starts on A, the EHR's redirect to the callback is
delivered to B (the host:port rewritten, which is what a load balancer does), B finishes the launch, and the
patient page then opens on A. The control runs the same steps with an in-memory store per process: the hand-over
must fail, so the first test cannot pass by accident. The same hand-over is then shown with the production entry
point: two gunicorn instances of smart_app.wsgi:app configured by FHIR_MASSAGE_* only, behind a public URL that is
neither of them.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from fhir_massage.serving import wait_ready
from tests.fixtures.postgres import create_database
from tests.fixtures.smart_sandbox import create_launch, register_client

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

START_DEADLINE_S = 60.0
PHYSICIAN = "dr-ada-grey"
DANA = ("demo-dana-whitfield", "Dana Whitfield")


@dataclass
class Instance:
    proc: subprocess.Popen
    url: str
    log: Path
    output: list[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def _pump(stream, lines: "queue.Queue[str | None]", seen: list[str]) -> None:
    # a reader thread: the process never blocks on a full pipe, and the test waits with a deadline
    for line in stream:
        seen.append(line)
        lines.put(line)
    lines.put(None)


def _start(name: str, args: list[str], env: dict[str, str], tmp: Path, *, url_line: str,
           url_on: str = "stdout") -> Instance:
    """Start a process, read its URL from ``url_line`` (a regex with one group) on stdout or stderr with a
    deadline, then poll /healthz. The other stream goes to ``tmp/<name>.log``."""
    log = tmp / f"{name}.log"
    with log.open("w") as other:
        proc = subprocess.Popen(args, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                stdout=subprocess.PIPE if url_on == "stdout" else other,
                                stderr=subprocess.PIPE if url_on == "stderr" else other)
    stream = proc.stdout if url_on == "stdout" else proc.stderr
    lines: "queue.Queue[str | None]" = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_pump, args=(stream, lines, seen), daemon=True).start()
    deadline = time.monotonic() + START_DEADLINE_S
    url = None
    while url is None:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"{name} did not print its URL:\n{''.join(seen)[-3000:]}\n{log.read_text()[-3000:]}")
        if m := re.search(url_line, line):
            url = m.group(1)
    wait_ready(f"{url}/healthz", deadline_s=START_DEADLINE_S)  # gunicorn workers import the app after the bind
    return Instance(proc, url, log, seen)


def start_instance(name: str, registrations: Path, store: str, secret: str, tmp: Path,
                   public_url: str | None = None) -> Instance:
    """`fhir-massage app` (its default public URL is its own address)."""
    args = [sys.executable, "-m", "fhir_massage.cli", "app", "--host", "127.0.0.1", "--port", "0",
            "--registrations", str(registrations), "--store", store]
    if public_url:
        args += ["--public-url", public_url]
    return _start(name, args, {"FHIR_MASSAGE_SECRET_KEY": secret}, tmp,
                  url_line=r"^fhir-massage app listening on (http://\S+)")


def start_gunicorn(name: str, registrations: Path, store: str, secret: str, tmp: Path, public_url: str) -> Instance:
    """gunicorn with smart_app.wsgi:app (two workers), configured by the environment as in production."""
    args = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", "--workers", "2", "--graceful-timeout", "5",
            "smart_app.wsgi:app"]
    env = {"FHIR_MASSAGE_REGISTRATIONS": str(registrations), "FHIR_MASSAGE_PUBLIC_URL": public_url,
           "FHIR_MASSAGE_STORE_URL": store, "FHIR_MASSAGE_SECRET_KEY": secret}
    return _start(name, args, env, tmp, url_line=r"Listening at: (http://[0-9.]+:\d+)", url_on="stderr")


def _on(instance_url: str, url: str) -> str:
    """The same path and query, sent to another instance (what a load balancer does)."""
    target, parts = urlsplit(instance_url), urlsplit(url)
    return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))


def _two_processes(sandbox, tmp_path: Path, store_a: str, store_b: str) -> tuple[str, Instance, Instance]:
    client_id = f"two-proc-{secrets.token_hex(4)}"
    registrations = tmp_path / "ehrs.toml"
    registrations.write_text(f'[[ehr]]\niss = "{sandbox.fhir_base}"\nclient_id = "{client_id}"\n'
                             f'name = "Sandbox EHR"\nauth = "public"\n')
    secret = secrets.token_urlsafe(32)
    a = start_instance("a", registrations, store_a, secret, tmp_path)
    try:
        b = start_instance("b", registrations, store_b, secret, tmp_path, public_url=a.url)
    except BaseException:
        a.stop()
        raise
    # one registration at the EHR: the public URL is A's (the load balancer's), B shares it
    register_client(sandbox, {"client_id": client_id, "auth_method": "none", "redirect_uris": [f"{a.url}/callback"],
                              "launch_url": f"{a.url}/launch", "name": "fhir-massage (two processes)"})
    return client_id, a, b


def _start_on_a_finish_on_b(sandbox, client_id: str, a: Instance, b: Instance,
                            browser: requests.Session) -> requests.Response:
    launch = create_launch(sandbox, client_id, PHYSICIAN, DANA[0])
    assert launch["launch_url"].startswith(f"{a.url}/launch?")
    r = browser.get(launch["launch_url"], allow_redirects=False, timeout=30)  # process A: /launch
    assert r.status_code == 302, r.text[:300]
    assert r.headers["Location"].startswith(f"{sandbox.url}/auth/authorize?")
    r = browser.get(r.headers["Location"], allow_redirects=False, timeout=30)  # the EHR's authorize endpoint
    assert r.status_code == 302, r.text[:300]
    callback = r.headers["Location"]
    assert callback.startswith(f"{a.url}/callback?"), callback
    return browser.get(_on(b.url, callback), allow_redirects=False, timeout=30)  # process B: /callback


def test_a_launch_started_in_one_process_finishes_in_another(smart_sandbox, postgres_dsn, tmp_path) -> None:
    dsn = create_database(postgres_dsn)
    client_id, a, b = _two_processes(smart_sandbox, tmp_path, dsn, dsn)
    try:
        assert a.proc.pid != b.proc.pid and a.url != b.url
        browser = requests.Session()
        r = _start_on_a_finish_on_b(smart_sandbox, client_id, a, b, browser)
        assert r.status_code == 303, (r.status_code, r.text[:800], b.log.read_text()[-2000:])
        landing = r.headers["Location"]
        assert re.match(r"^(https?://[^/]+)?/p/[^/]+/$", landing), landing
        # the session B created opens on A: the patient's page with the launch's patient and user
        page = browser.get(f"{a.url}{urlsplit(landing).path}", timeout=30)
        assert page.status_code == 200, page.text[:800]
        assert re.search(rf'data-testid="patient-name">{DANA[1]}<', page.text), page.text[:1500]
        assert "Ada Grey" in page.text
        # ... and on B as well: either instance serves every request of the session
        assert browser.get(f"{b.url}{urlsplit(landing).path}", timeout=30).status_code == 200
    finally:
        b.stop()
        a.stop()
    assert a.proc.returncode == 0 and b.proc.returncode == 0, (a.log.read_text()[-2000:], b.log.read_text()[-2000:])


def test_control_two_processes_without_a_shared_store_cannot_hand_over(smart_sandbox, tmp_path) -> None:
    client_id, a, b = _two_processes(smart_sandbox, tmp_path, "sqlite:///:memory:", "sqlite:///:memory:")
    try:
        r = _start_on_a_finish_on_b(smart_sandbox, client_id, a, b, requests.Session())
        assert r.status_code in (400, 403), r.status_code  # B never saw the state A stored
        assert "not valid" in r.text or "expired" in r.text
    finally:
        b.stop()
        a.stop()


def test_two_gunicorn_instances_behind_one_public_url(smart_sandbox, postgres_dsn, tmp_path) -> None:
    """The production entry point: two gunicorn masters (two workers each) with smart_app.wsgi:app, configured by
    FHIR_MASSAGE_* alone. The public URL is the load balancer's: a loopback port held by the test where nothing
    listens, so every request the test sends reaches an instance only because the test routed it there."""
    dsn = create_database(postgres_dsn)
    client_id = f"two-gunicorn-{secrets.token_hex(4)}"
    registrations = tmp_path / "ehrs.toml"
    registrations.write_text(f'[[ehr]]\niss = "{smart_sandbox.fhir_base}"\nclient_id = "{client_id}"\n'
                             f'name = "Sandbox EHR"\nauth = "public"\n')
    secret = secrets.token_urlsafe(32)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # bound, never listening: the "balancer"
        held.bind(("127.0.0.1", 0))
        balancer = f"http://127.0.0.1:{held.getsockname()[1]}"
        a = start_gunicorn("gunicorn-a", registrations, dsn, secret, tmp_path, balancer)
        try:
            b = start_gunicorn("gunicorn-b", registrations, dsn, secret, tmp_path, balancer)
        except BaseException:
            a.stop()
            raise
        try:
            register_client(smart_sandbox, {"client_id": client_id, "auth_method": "none",
                                            "redirect_uris": [f"{balancer}/callback"],
                                            "launch_url": f"{balancer}/launch", "name": "fhir-massage (gunicorn)"})
            browser = requests.Session()
            launch = create_launch(smart_sandbox, client_id, PHYSICIAN, DANA[0])
            assert launch["launch_url"].startswith(f"{balancer}/launch?")
            r = browser.get(_on(a.url, launch["launch_url"]), allow_redirects=False, timeout=30)  # A: /launch
            assert r.status_code == 302, r.text[:300]
            r = browser.get(r.headers["Location"], allow_redirects=False, timeout=30)  # the EHR's authorize
            assert r.status_code == 302, r.text[:300]
            callback = r.headers["Location"]
            assert callback.startswith(f"{balancer}/callback?"), callback
            r = browser.get(_on(b.url, callback), allow_redirects=False, timeout=30)  # B: /callback
            assert r.status_code == 303, (r.status_code, r.text[:800], "".join(b.output)[-2000:])
            landing = urlsplit(r.headers["Location"]).path
            assert re.match(r"^/p/[^/]+/$", landing), landing
            for instance in (a, b):  # the session opens on either instance
                page = browser.get(f"{instance.url}{landing}", timeout=30)
                assert page.status_code == 200, page.text[:800]
                assert re.search(rf'data-testid="patient-name">{DANA[1]}<', page.text), page.text[:1500]
        finally:
            b.stop()
            a.stop()
