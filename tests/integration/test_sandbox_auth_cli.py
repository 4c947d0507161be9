"""`fhir-massage sandbox` with the SMART server's options: --clients FILE, --client ID=REDIRECT[,LAUNCH],
--discovery, and the loud warning of --open."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.fixtures.smart_sandbox import _key_pair, _public_jwks

pytestmark = pytest.mark.integration


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "fhir_massage.cli", "sandbox", "--no-seed", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    return proc, line


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    proc.wait(timeout=10)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return err


def test_clients_file_and_quick_client_and_capability_only(tmp_path: Path):
    key = _key_pair("RS384")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "app.jwks.json").write_text(json.dumps(_public_jwks(key, "RS384")))
    (tmp_path / "clients.toml").write_text(
        '[[client]]\nclient_id = "file-app"\nredirect_uris = ["http://127.0.0.1:9/cb"]\n'
        'launch_url = "http://127.0.0.1:9/launch"\nauth_method = "private_key_jwt"\njwks_file = "keys/app.jwks.json"\n'
        'scope_dialect = "v2"\nname = "App from a file"\n'
    )
    proc, base = _start("--clients", str(tmp_path / "clients.toml"),
                        "--client", "quick-app=http://127.0.0.1:9/cb,http://127.0.0.1:9/launch",
                        "--discovery", "capability-only")
    try:
        assert base.endswith("/fhir"), proc.stderr.read()
        root = base[: -len("/fhir")]
        assert requests.get(f"{base}/.well-known/smart-configuration", timeout=10).status_code == 404
        page = requests.get(f"{root}/ehr", timeout=10).text
        assert "App from a file" in page and "quick-app" in page
        assert requests.get(f"{base}/Patient", timeout=10).status_code == 401
    finally:
        err = _stop(proc)
    assert f"{root}/ehr" in err


def test_bad_clients_file_stops_the_start_with_a_plain_message(tmp_path: Path):
    (tmp_path / "clients.toml").write_text('[[client]]\nclient_id = "x"\nredirect_uris = ["not a url"]\n')
    proc = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "sandbox", "--no-seed", "--port", "0",
                           "--clients", str(tmp_path / "clients.toml")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "redirect_uris" in proc.stderr and "Traceback" not in proc.stderr


def test_open_mode_warns_loudly():
    proc, base = _start("--open")
    try:
        assert requests.get(f"{base}/Patient", timeout=10).status_code == 200
    finally:
        err = _stop(proc)
    assert "NO AUTHORIZATION" in err
