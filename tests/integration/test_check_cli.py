"""`fhir-massage check` against real servers on loopback: our sandbox (open, secured, capability-only discovery)
and SEKMET (an independent FHIR server whose SMART side is backend-services only)."""

from __future__ import annotations

import json

import pytest
import requests

from fhir_massage.cli import main
from fhir_massage.readiness import PROBE_TAG_CODE
from fhir_massage.smart import default_scopes
from tests.fixtures.smart_sandbox import get_token

pytestmark = pytest.mark.integration


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["check", *args, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def statuses(body: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in body["checks"]}


def test_open_sandbox_has_fhir_but_no_smart(sandbox_open_url: str, capsys) -> None:
    code, body = run_json(capsys, "--fhir-base", sandbox_open_url)
    s = statuses(body)
    assert code == 1
    assert s["smart.discovery"] == "fail"
    assert s["fhir.version"] == "ok"
    assert s["fhir.transaction"] == "ok" and s["fhir.batch"] == "ok"
    assert s["fhir.resource.ServiceRequest"] == "ok" and s["fhir.resource.Condition"] == "ok"
    assert body["summary"]["fail"] == sum(1 for v in s.values() if v == "fail")


def test_secured_sandbox_with_a_token_reads_and_writes_a_marked_probe(smart_sandbox, capsys) -> None:
    # The app's own scopes (v2) plus delete on Communication so the probe can clean up after itself.
    scopes = default_scopes("v2", standalone=False) + " patient/Communication.cruds"
    token = get_token(smart_sandbox, "test-public", scopes=scopes)
    patient = token["patient"]
    code, body = run_json(capsys, "--fhir-base", smart_sandbox.fhir_base, "--token", token["access_token"],
                          "--patient", patient, "--write-probe")
    s = statuses(body)
    assert code == 0, [c for c in body["checks"] if c["status"] == "fail"]
    for check in ("smart.discovery", "smart.launch-ehr", "smart.pkce", "smart.client-auth", "smart.openid",
                  "live.patient-read", "live.search.Condition", "live.write", "live.conditional-create",
                  "live.cleanup"):
        assert s[check] == "ok", (check, body["checks"])
    assert body["roundTrips"]["screen"] >= 1
    # nothing of the probe is left behind
    found = requests.get(f"{smart_sandbox.fhir_base}/Communication", params={"patient": patient},
                         headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=10).json()
    tags = [t.get("code") for e in found.get("entry", []) for t in e["resource"].get("meta", {}).get("tag", [])]
    assert PROBE_TAG_CODE not in tags


def test_token_without_the_scope_is_reported_per_type(smart_sandbox, capsys) -> None:
    token = get_token(smart_sandbox, "test-public",
                      scopes="launch openid fhirUser patient/Patient.rs patient/Condition.rs")
    code, body = run_json(capsys, "--fhir-base", smart_sandbox.fhir_base, "--token", token["access_token"],
                          "--patient", token["patient"])
    s = statuses(body)
    assert s["live.search.Condition"] == "ok"
    assert s["live.search.Observation"] == "fail"  # essential for screening, refused (403)
    assert s["live.search.Task"] == "warn"
    assert code == 1


def test_client_id_prints_registration_facts(smart_sandbox, capsys) -> None:
    code = main(["check", "--fhir-base", smart_sandbox.fhir_base, "--client-id", "massage-app",
                 "--app-url", "https://massage.example.org"])
    out = capsys.readouterr().out
    assert code == 0
    assert "https://massage.example.org/launch" in out
    assert "https://massage.example.org/callback" in out
    assert "patient/ServiceRequest.crus" in out  # the sandbox speaks v2
    assert "--token" in out


def test_capability_only_discovery_is_a_warning(make_smart_sandbox, capsys) -> None:
    sb = make_smart_sandbox(auth={"discovery": "capability-only"}, seed=False)
    assert requests.get(f"{sb.fhir_base}/.well-known/smart-configuration", timeout=10).status_code == 404
    code, body = run_json(capsys, "--fhir-base", sb.fhir_base)
    s = statuses(body)
    assert s["smart.discovery"] == "warn"
    assert code == 0


def test_sekmet_has_no_ehr_launch(sekmet_server: str, capsys) -> None:
    code, body = run_json(capsys, "--fhir-base", sekmet_server, "--client-id", "massage-app")
    s = statuses(body)
    assert code == 1
    assert s["smart.discovery"] == "ok"  # it publishes .well-known, for backend services only
    assert s["smart.launch-ehr"] == "fail"
    assert s["fhir.version"] == "ok"
    assert s["fhir.resource.DetectedIssue"] == "warn"  # not among SEKMET's types
    assert any(d["id"] == "launch-ehr" for d in body["degradations"])
    assert body["registration"]["scopeDialect"] == "v2"


def test_unreachable_server_exit_2(capsys) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["check", "--fhir-base", f"http://127.0.0.1:{port}/fhir"]) == 2
    assert "Nothing answered" in capsys.readouterr().err
