"""`fhir-massage app` as others script it: --host/--port/--ehr ISS=CLIENT_ID (a stable interface)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
import requests

from fhir_massage.serving import wait_ready
from tests.fixtures.smart_sandbox import create_launch, register_client

pytestmark = pytest.mark.integration


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "fhir_massage.cli", "app", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 30
    url = None
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.match(r"fhir-massage app listening on (http://\S+)", line)
        if m:
            url = m.group(1)
    if url is None:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        raise AssertionError("the app command did not print its URL")
    wait_ready(f"{url}/healthz")
    return proc, url


def test_app_command_quick_start_against_the_sandbox(smart_sandbox):
    client_id = "cli-app-test"
    proc, url = _start("--host", "127.0.0.1", "--port", "0", "--ehr", f"{smart_sandbox.fhir_base}={client_id}")
    try:
        register_client(smart_sandbox, {"client_id": client_id, "auth_method": "none",
                                        "redirect_uris": [f"{url}/callback"], "launch_url": f"{url}/launch"})
        out = create_launch(smart_sandbox, client_id, "dr-ada-grey", "demo-maria-santos")
        r = requests.get(out["launch_url"], timeout=30)
        assert r.status_code == 200 and 'data-testid="patient-name">Maria Santos<' in r.text
        r = requests.get(f"{url}/launch?{urlencode({'iss': 'https://other.example/fhir'})}", timeout=10)
        assert r.status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_app_command_refuses_plain_http_on_a_public_address():
    r = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "app", "--host", "0.0.0.0", "--ehr",
                        "https://ehr.example.org/fhir=x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "plain http" in r.stderr and "Traceback" not in r.stderr
