"""`fhir-massage demo` (what `make demo` runs) as a newcomer meets it: a real process on any free ports, the printed
URL opened, the EHR simulator's direct launch followed through the app's SMART launch to the patient page, the
order entry reaching the app's CDS service, Ctrl-C stopping it cleanly; a busy port is one plain line."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import requests

pytestmark = pytest.mark.integration

START_DEADLINE_S = 90.0
CLIENT_ID = "fhir-massage-demo"  # fhir_massage/commands/demo.py CLIENT_ID: the only client the demo registers
PHYSICIAN = "dr-ada-grey"
DANA = "demo-dana-whitfield"
DVT_CRITICAL = "Absolute contraindication: Deep vein thrombosis, current or acute (left lower limb)"


@dataclass
class Demo:
    proc: subprocess.Popen
    ehr_url: str  # the "Open this URL:" line: {sandbox}/ehr
    app_url: str  # the "App:" line without /launch
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def sandbox_url(self) -> str:
        return self.ehr_url.removesuffix("/ehr")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it; returns (exit code, everything on stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("the demo did not stop within 30 s of Ctrl-C") from None
        self._readers_done()
        return code, "".join(self.stderr)

    def _readers_done(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def _pump(stream, sink: list[str], lines: "queue.Queue[str | None]") -> None:
    # A reader thread per pipe: the process never blocks on a full pipe, and the test waits with a deadline
    # (queue.get(timeout=...)) instead of a readline() that could hang forever.
    for line in stream:
        sink.append(line)
        lines.put(line)
    lines.put(None)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fhir_massage.cli", "demo", *args]


def start_demo(*args: str) -> Demo:
    proc = subprocess.Popen(_command("--sandbox-port", "0", "--app-port", "0", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    demo = Demo(proc, "", "")
    out: "queue.Queue[str | None]" = queue.Queue()
    err: "queue.Queue[str | None]" = queue.Queue()
    demo._threads = [threading.Thread(target=_pump, args=(proc.stdout, demo.stdout, out), daemon=True),
                     threading.Thread(target=_pump, args=(proc.stderr, demo.stderr, err), daemon=True)]
    for t in demo._threads:
        t.start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not (demo.ehr_url and demo.app_url):
        left = deadline - time.monotonic()
        try:
            line = out.get(timeout=max(left, 0.01))
        except queue.Empty:
            line = None
        if line is None:  # the deadline passed, or stdout closed (the process ended)
            proc.kill()
            proc.wait(timeout=10)
            demo._readers_done()
            raise AssertionError(f"the demo did not print its URLs (exit {proc.returncode}):\n"
                                 f"{''.join(demo.stdout)}\n{''.join(demo.stderr)[-3000:]}")
        if m := re.match(r"\s*Open this URL:\s+(http://\S+)", line):
            demo.ehr_url = m.group(1)
        elif m := re.match(r"\s*App:\s+(http://\S+)/launch\b", line):
            demo.app_url = m.group(1)
    return demo


@pytest.fixture(params=["memory", "data-dir"])
def demo(request, tmp_path):
    args = ("--data-dir", str(tmp_path / "demo")) if request.param == "data-dir" else ()
    d = start_demo(*args)
    d.data_dir = tmp_path / "demo" if args else None
    yield d
    if d.proc.poll() is None:
        d.stop()


def _areas(page: str) -> dict[str, str]:
    """data-area -> 'available' | 'unavailable' from the landing page's area list."""
    return {m.group(2): m.group(1) for m in
            re.finditer(r'<li class="area area--(available|unavailable)" data-area="([a-z]+)"', page)}


def test_demo_runs_the_ehr_launch_to_the_patient_page_and_the_cds_order_entry(demo):
    # what the banner says is true: the EHR simulator is the printed URL and lists the demo app
    r = requests.get(demo.ehr_url, timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert "Dana Whitfield" in r.text and "Ada Grey" in r.text and CLIENT_ID in r.text
    if demo.data_dir is not None:
        assert f"Data:              {demo.data_dir}" in "".join(demo.stdout)
    else:
        assert "Data:              in memory" in "".join(demo.stdout)

    # the direct launch link (fhir_massage/sandbox/ehr.py): sandbox -> app /launch -> sandbox /auth/authorize ->
    # app /callback -> the patient page; a browser's cookie jar carries the app's session across the hops
    browser = requests.Session()
    query = urlencode({"client_id": CLIENT_ID, "user": PHYSICIAN, "patient": DANA, "embed": "0"})
    r = browser.get(f"{demo.sandbox_url}/ehr/launch?{query}", timeout=60)
    assert r.status_code == 200, r.text[:800]
    hops = [(f"{urlsplit(h.url).scheme}://{urlsplit(h.url).netloc}", urlsplit(h.url).path) for h in r.history]
    assert hops == [(demo.sandbox_url, "/ehr/launch"), (demo.app_url, "/launch"),
                    (demo.sandbox_url, "/auth/authorize"), (demo.app_url, "/callback")], hops
    assert r.url.startswith(f"{demo.app_url}/p/")
    landing_path = urlsplit(r.url).path  # /p/<launch session id>/
    assert re.search(r'data-testid="patient-name">Dana Whitfield<', r.text), r.text[:1500]
    assert "Ada Grey" in r.text and "role-badge--physician" in r.text
    # the physician's areas: ordering and the plan open, session notes are the therapist's
    assert _areas(r.text) == {"orders": "available", "plan": "available", "sessions": "unavailable"}, _areas(r.text)
    orders = re.search(r'<a class="area__link" href="([^"]+)">', r.text).group(1)
    r = browser.get(f"{demo.app_url}{orders}", timeout=60)
    assert r.status_code == 200 and "Dana Whitfield" in r.text

    # the EHR's order entry calls the app's CDS service (wired by the demo) and shows its card, with FHIR access
    r = requests.post(f"{demo.sandbox_url}/ehr/orders", timeout=60, data=[
        ("user", PHYSICIAN), ("patient", DANA), ("action", "sign"), ("technique", "deep-tissue"),
        ("site", "30021000:left")])
    assert r.status_code == 200, re.sub(r"<[^>]+>", " ", r.text)[:1500]
    assert DVT_CRITICAL in r.text and 'data-indicator="critical"' in r.text
    assert "the service was given FHIR access" in r.text

    if demo.data_dir is not None:  # the app's sessions and drafts are kept there too, not only the sandbox's data
        assert (demo.data_dir / "app.sqlite3").is_file()

    code, stderr = demo.stop()
    assert code == 0, stderr[-2000:]
    assert "Stopping" in stderr and "Traceback" not in stderr
    # the demo's request log held no authorization code, state, launch session or patient (queries are elided)
    assert "code=" not in stderr and "state=" not in stderr and "launch=" not in stderr, stderr[-3000:]
    assert "Whitfield" not in stderr and DANA not in stderr and landing_path not in stderr, stderr[-3000:]


def _busy_port() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("flag,what", [("--sandbox-port", "sandbox EHR"), ("--app-port", "app")])
def test_a_busy_port_is_one_plain_line_and_exit_2(flag, what):
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        other = "--app-port" if flag == "--sandbox-port" else "--sandbox-port"
        r = subprocess.run(_command(flag, str(port), other, "0"), capture_output=True, text=True, timeout=90)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fhir-massage demo: Cannot listen on 127.0.0.1:{port} for the {what}")
    assert flag in lines[0] and "Traceback" not in r.stderr
    assert "Open this URL" not in r.stdout
