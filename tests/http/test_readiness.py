"""Readiness report (fhir_massage/readiness.py): pure report building from observed documents, and the probes'
HTTP handling with ``responses`` (servers that are half-SMART, refuse a scope, or keep a test write)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import requests
import responses

from fhir_massage.cli import main
from fhir_massage.errors import InvalidInput
from fhir_massage.readiness import (FAIL, OK, PROBE_TAG_CODE, RESOURCE_NEEDS, WARN, Observations,
                                    ServerUnreachable, build_report, gather, report_json)

BASE = "https://ehr.example.org/fhir"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"

SMART_DOC = {
    "issuer": "https://ehr.example.org",
    "authorization_endpoint": "https://ehr.example.org/auth/authorize",
    "token_endpoint": "https://ehr.example.org/auth/token",
    "jwks_uri": "https://ehr.example.org/auth/jwks",
    "capabilities": ["launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric",
                     "client-confidential-asymmetric", "context-ehr-patient", "sso-openid-connect",
                     "permission-online", "permission-offline", "permission-v1", "permission-v2"],
    "code_challenge_methods_supported": ["S256"],
    "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
}


def _resource(rtype: str, search: tuple[str, ...] = ()) -> dict:
    return {
        "type": rtype,
        "interaction": [{"code": c} for c in ("read", "vread", "update", "create", "search-type", "delete")],
        "versioning": "versioned-update",
        "conditionalCreate": True,
        "searchParam": [{"name": n, "type": "token"} for n in ("_id", "patient", "category", "status", "based-on",
                                                                "focus", "target", *search)],
        # the includes the app sends (readiness.INCLUDES)
        "searchInclude": {"ServiceRequest": ["ServiceRequest:requester", "ServiceRequest:subject"],
                          "Communication": ["Communication:sender"]}.get(rtype, []),
        "searchRevInclude": ["Procedure:based-on", "Task:focus"] if rtype == "ServiceRequest" else [],
    }


CAPABILITY = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [{
        "mode": "server",
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
        "resource": [_resource(n.type) for n in RESOURCE_NEEDS],
    }],
}


def obs(**changes) -> Observations:
    o = Observations(BASE, smart_status=200, smart_doc=copy.deepcopy(SMART_DOC), metadata_status=200,
                     capability=copy.deepcopy(CAPABILITY))
    for key, value in changes.items():
        setattr(o, key, value)
    return o


def statuses(report) -> dict[str, str]:
    return {c.id: c.status for c in report.checks}


def degradation_ids(report) -> set[str]:
    return {d.id for d in report.degradations}


# ------------------------------------------------------------------------------------------------ pure: report


def test_a_fully_capable_server_has_no_failure_and_stable_ids() -> None:
    report = build_report(obs())
    s = statuses(report)
    assert FAIL not in s.values()
    assert report.exit_code == 0
    # ids are a public contract (docs/check-json.md): this list changes only together with that page
    assert list(s) == [
        "smart.discovery", "smart.launch-ehr", "smart.launch-standalone", "smart.context-ehr-patient", "smart.pkce",
        "smart.client-auth", "smart.scopes", "smart.openid", "smart.refresh", "fhir.version",
        *[f"fhir.resource.{n.type}" for n in RESOURCE_NEEDS],
        "fhir.transaction", "fhir.batch", "fhir.conditional-create", "fhir.if-match", "fhir.include", "live.token",
    ]
    assert s["live.token"] == WARN  # no token: said, not failed
    assert all(v == OK for k, v in s.items() if k != "live.token")
    assert report.degradations == []


def test_json_shape() -> None:
    report = build_report(obs())
    body = report_json(report)
    assert set(body) == {"fhirBase", "summary", "checks", "degradations", "registration", "roundTrips"}
    assert body["fhirBase"] == BASE
    assert body["summary"] == {"ok": len(report.checks) - 1, "warn": 1, "fail": 0}
    for check in body["checks"]:
        assert set(check) == {"id", "status", "title", "detail", "askVendor"}
        assert check["status"] in ("ok", "warn", "fail")
        assert (check["askVendor"] is None) == (check["status"] == "ok" or check["id"] == "live.token")
    json.dumps(body)  # serialisable as is


def _without_cap(name: str) -> Observations:
    o = obs()
    o.smart_doc["capabilities"].remove(name)
    return o


@pytest.mark.parametrize("missing, check, status, degradation", [
    ("launch-ehr", "smart.launch-ehr", FAIL, "launch-ehr"),  # the app's main entry: opened from a chart
    ("launch-standalone", "smart.launch-standalone", WARN, "launch-standalone"),
    ("sso-openid-connect", "smart.openid", WARN, "openid"),  # no fhirUser: cannot attribute orders
    ("context-ehr-patient", "smart.context-ehr-patient", WARN, None),
])
def test_missing_smart_capability(missing, check, status, degradation) -> None:
    report = build_report(_without_cap(missing))
    assert statuses(report)[check] == status
    c = next(c for c in report.checks if c.id == check)
    assert c.ask_vendor  # every non-ok line says what to ask
    if degradation:
        assert degradation in degradation_ids(report)


def test_no_refresh_capability_warns_and_degrades() -> None:
    o = obs()
    o.smart_doc["capabilities"] = [c for c in o.smart_doc["capabilities"] if not c.startswith("permission-o")]
    report = build_report(o)
    assert statuses(report)["smart.refresh"] == WARN
    assert "refresh" in degradation_ids(report)


@pytest.mark.parametrize("methods, status", [
    (["S256"], OK),
    (["S256", "plain"], WARN),  # SMART 2.x: servers SHALL NOT support plain
    ([], WARN),  # not advertised: the app sends S256 anyway
])
def test_pkce(methods, status) -> None:
    o = obs()
    o.smart_doc["code_challenge_methods_supported"] = methods
    assert statuses(build_report(o))["smart.pkce"] == status


@pytest.mark.parametrize("caps, methods, algs, status", [
    (["client-confidential-asymmetric"], ["private_key_jwt"], ["RS384"], OK),
    (["client-confidential-asymmetric"], ["private_key_jwt"], ["RS256"], WARN),  # app signs RS384/ES384 only
    (["client-confidential-symmetric"], ["client_secret_basic"], [], WARN),
    (["client-public"], [], [], WARN),
    ([], [], [], FAIL),
])
def test_client_auth(caps, methods, algs, status) -> None:
    o = obs()
    o.smart_doc["capabilities"] = [c for c in o.smart_doc["capabilities"] if not c.startswith("client-")] + caps
    o.smart_doc["token_endpoint_auth_methods_supported"] = methods
    o.smart_doc["token_endpoint_auth_signing_alg_values_supported"] = algs
    assert statuses(build_report(o))["smart.client-auth"] == status


@pytest.mark.parametrize("perms, status, dialect", [
    (["permission-v1", "permission-v2"], OK, "v2"),
    (["permission-v2"], OK, "v2"),
    (["permission-v1"], OK, "v1"),
    ([], WARN, "v1"),  # predates SMART 2.0: v1 is the safe guess
])
def test_scope_dialect(perms, status, dialect) -> None:
    o = obs(client_id="massage")
    o.smart_doc["capabilities"] = [c for c in o.smart_doc["capabilities"] if not c.startswith("permission-v")] + perms
    report = build_report(o)
    assert statuses(report)["smart.scopes"] == status
    assert report.registration["scopeDialect"] == dialect
    scopes = report.registration["scopes"]["ehrLaunch"].split()
    assert ("patient/Condition.rs" in scopes) == (dialect == "v2")
    assert ("patient/Condition.read" in scopes) == (dialect == "v1")
    assert report.registration["scopes"]["standalone"].split()[0] == "launch/patient"


def test_capability_statement_discovery_is_a_warning_and_capabilities_are_unknown() -> None:
    cap = copy.deepcopy(CAPABILITY)
    cap["rest"][0]["security"] = {"extension": [{"url": OAUTH_URIS, "extension": [
        {"url": "authorize", "valueUri": "https://ehr.example.org/auth/authorize"},
        {"url": "token", "valueUri": "https://ehr.example.org/auth/token"}]}]}
    report = build_report(obs(smart_status=404, smart_doc=None, capability=cap))
    s = statuses(report)
    assert s["smart.discovery"] == WARN
    assert s["smart.launch-ehr"] == WARN  # unknown, not failed: v1 servers did not declare capabilities
    assert report.exit_code == 0


def test_no_smart_at_all_fails_and_skips_capability_lines() -> None:
    report = build_report(obs(smart_status=404, smart_doc=None))
    s = statuses(report)
    assert s["smart.discovery"] == FAIL
    assert "smart.launch-ehr" not in s
    assert "no-smart" in degradation_ids(report)
    assert report.exit_code == 1


def test_well_known_without_token_endpoint_falls_back_to_fail() -> None:
    o = obs()
    del o.smart_doc["token_endpoint"]
    report = build_report(o)
    assert statuses(report)["smart.discovery"] == FAIL
    assert "token_endpoint" in next(c for c in report.checks if c.id == "smart.discovery").detail


@pytest.mark.parametrize("version, status", [("4.0.1", OK), ("4.0.0", WARN), ("3.0.2", FAIL), (None, FAIL)])
def test_fhir_version(version, status) -> None:
    o = obs()
    o.capability["fhirVersion"] = version
    assert statuses(build_report(o))["fhir.version"] == status


def test_no_transaction_says_what_the_app_does_instead() -> None:
    o = obs()
    o.capability["rest"][0]["interaction"] = [{"code": "batch"}]
    report = build_report(o)
    assert statuses(report)["fhir.transaction"] == WARN
    effect = next(d for d in report.degradations if d.id == "no-transaction").effect
    assert "saves the order first, then its findings, then links the order to them" in effect
    assert "signing again (or 'Try again' for a session note) writes only what is missing" in effect


def test_no_batch_degrades() -> None:
    o = obs()
    o.capability["rest"][0]["interaction"] = [{"code": "transaction"}]
    report = build_report(o)
    assert statuses(report)["fhir.batch"] == WARN
    assert "no-batch" in degradation_ids(report)


def _drop_type(o: Observations, rtype: str) -> None:
    o.capability["rest"][0]["resource"] = [r for r in o.capability["rest"][0]["resource"] if r["type"] != rtype]


@pytest.mark.parametrize("rtype, status", [
    ("Condition", FAIL),  # screening is blind without the problem list
    ("ServiceRequest", FAIL),  # no orders
    ("MedicationStatement", WARN),  # prescriptions still screened
    ("Task", WARN),
    ("DetectedIssue", WARN),
])
def test_missing_resource_type(rtype, status) -> None:
    o = obs()
    _drop_type(o, rtype)
    report = build_report(o)
    assert statuses(report)[f"fhir.resource.{rtype}"] == status
    assert f"no-{rtype}" in degradation_ids(report)


def test_missing_write_interaction_on_an_essential_type_fails() -> None:
    o = obs()
    sr = next(r for r in o.capability["rest"][0]["resource"] if r["type"] == "ServiceRequest")
    sr["interaction"] = [{"code": "read"}, {"code": "search-type"}]
    report = build_report(o)
    assert statuses(report)["fhir.resource.ServiceRequest"] == FAIL
    assert "create" in next(c for c in report.checks if c.id == "fhir.resource.ServiceRequest").detail


def test_missing_search_parameter_warns_with_the_declared_ones() -> None:
    o = obs()
    obs_type = next(r for r in o.capability["rest"][0]["resource"] if r["type"] == "Observation")
    obs_type["searchParam"] = [{"name": "patient", "type": "reference"}]
    report = build_report(o)
    check = next(c for c in report.checks if c.id == "fhir.resource.Observation")
    assert check.status == WARN and "category" in check.detail


def test_versioning_and_conditional_create() -> None:
    o = obs()
    for r in o.capability["rest"][0]["resource"]:
        if r["type"] in ("ServiceRequest", "Procedure", "Task"):
            r["versioning"] = "versioned"
            r["conditionalCreate"] = False
            r["conditionalUpdate"] = True
    report = build_report(o)
    s = statuses(report)
    assert s["fhir.if-match"] == WARN and s["fhir.conditional-create"] == WARN
    assert {"no-if-match", "no-conditional-create"} <= degradation_ids(report)
    assert "conditionalUpdate" in next(c for c in report.checks if c.id == "fhir.if-match").detail


def test_wildcard_include_counts() -> None:
    o = obs()
    for r in o.capability["rest"][0]["resource"]:
        r["searchInclude"] = ["*"]
        r["searchRevInclude"] = ["*"] if r["type"] == "ServiceRequest" else []
    assert statuses(build_report(o))["fhir.include"] == OK
    for r in o.capability["rest"][0]["resource"]:
        r["searchInclude"] = []
    report = build_report(o)
    check = next(c for c in report.checks if c.id == "fhir.include")
    assert check.status == WARN and "_include=Communication:sender" in check.detail
    assert "messages show their sender by reference" in check.detail


def test_metadata_not_a_capability_statement_fails() -> None:
    report = build_report(obs(metadata_status=500, capability={"resourceType": "OperationOutcome"}))
    assert statuses(report)["fhir.capabilities"] == FAIL


def test_client_id_without_token_says_to_use_token() -> None:
    report = build_report(obs(client_id="massage", app_url="https://massage.example.org/"))
    r = report.registration
    assert r["launchUrl"] == "https://massage.example.org/launch"
    assert r["redirectUri"] == "https://massage.example.org/callback"
    assert r["jwksUrl"] == "https://massage.example.org/.well-known/jwks.json"
    live = next(c for c in report.checks if c.id == "live.token")
    assert "--token" in live.detail and "browser" in live.detail


# ------------------------------------------------------------------------------------------------ gather: HTTP


def _serve_discovery(rsps: responses.RequestsMock, smart_status: int = 200) -> None:
    if smart_status == 200:
        rsps.get(f"{BASE}/.well-known/smart-configuration", json=SMART_DOC)
    else:
        rsps.get(f"{BASE}/.well-known/smart-configuration", status=smart_status)
    rsps.get(f"{BASE}/metadata", json=CAPABILITY)


def test_gather_rejects_a_bad_url() -> None:
    with pytest.raises(InvalidInput):
        gather("ehr.example.org/fhir")
    with pytest.raises(InvalidInput):
        gather(f"{BASE}?x=1")


@responses.activate
def test_gather_unreachable() -> None:
    responses.get(f"{BASE}/.well-known/smart-configuration", body=requests.ConnectionError("refused"))
    responses.get(f"{BASE}/metadata", body=requests.ConnectionError("refused"))
    with pytest.raises(ServerUnreachable):
        gather(BASE)


@responses.activate
def test_gather_reads_only_without_a_token() -> None:
    _serve_discovery(responses)
    o = gather(BASE)
    assert o.smart_status == 200 and o.capability["fhirVersion"] == "4.0.1"
    assert [c.request.method for c in responses.calls] == ["GET", "GET"]
    assert build_report(o).exit_code == 0


def _bundle(n: int) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": {"resourceType": "Condition", "id": str(i)}} for i in range(n)]}


@responses.activate
def test_live_probes_map_statuses() -> None:
    _serve_discovery(responses)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    for need in RESOURCE_NEEDS:
        if need.type == "MedicationStatement":
            responses.get(f"{BASE}/MedicationStatement", status=403, json={
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "forbidden", "diagnostics": "scope missing"}]})
        elif need.type == "Condition":
            responses.get(f"{BASE}/Condition", json=_bundle(3))
        elif need.type not in ("Patient", "Practitioner", "PractitionerRole"):
            responses.get(f"{BASE}/{need.type}", json={"resourceType": "Bundle", "type": "searchset", "entry": []})
    o = gather(BASE, token="t0k3n", patient="p1", chart_fetch=lambda client, pid: client.search("Condition", {
        "patient": pid}))
    report = build_report(o)
    s = statuses(report)
    assert s["live.patient-read"] == OK
    assert s["live.search.Condition"] == OK
    assert s["live.search.MedicationStatement"] == WARN  # 403 on a non-essential type
    assert s["live.round-trips"] == OK
    assert report.round_trips == {"screen": 1, "method": "chart_fetch"}
    assert "3 found" in next(c for c in report.checks if c.id == "live.search.Condition").detail
    # the token went only to the FHIR server, as a Bearer header; never to discovery in a query
    fhir_calls = [c for c in responses.calls if "/Patient/" in c.request.url]
    assert fhir_calls[0].request.headers["Authorization"] == "Bearer t0k3n"
    assert all("t0k3n" not in c.request.url for c in responses.calls)
    assert all(c.request.method == "GET" for c in responses.calls)  # no writes without --write-probe


def _empty_searches() -> None:
    responses.get(re.compile(re.escape(BASE) + r"/[A-Z][A-Za-z]+(\?.*)?$"), json=_bundle(0))


@responses.activate
def test_live_refused_token_fails() -> None:
    _serve_discovery(responses)
    responses.get(f"{BASE}/Patient/p1", status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    report = build_report(gather(BASE, token="expired", patient="p1"))
    assert statuses(report)["live.patient-read"] == FAIL
    assert report.exit_code == 1


@responses.activate
def test_write_probe_writes_a_marked_resource_and_deletes_it() -> None:
    _serve_discovery(responses)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    _empty_searches()
    created = {"resourceType": "Communication", "id": "c1", "meta": {"versionId": "1"}}
    responses.post(f"{BASE}/Communication", status=201, json=created,
                   headers={"Location": f"{BASE}/Communication/c1/_history/1"})
    responses.post(f"{BASE}/Communication", status=200, json=created)  # If-None-Exist found the first one
    responses.delete(f"{BASE}/Communication/c1", status=204)
    o = gather(BASE, token="t", patient="p1", write_probe=True, chart_fetch=lambda c, p: None)
    posts = [c for c in responses.calls if c.request.method == "POST"]
    assert len(posts) == 2
    body = json.loads(posts[0].request.body)
    assert body["status"] == "entered-in-error"
    assert body["meta"]["tag"][0]["code"] == PROBE_TAG_CODE
    assert posts[0].request.headers["If-None-Exist"].startswith("identifier=")
    s = statuses(build_report(o))
    assert s["live.write"] == OK and s["live.conditional-create"] == OK and s["live.cleanup"] == OK


@responses.activate
def test_write_probe_reports_a_duplicate_and_a_failed_delete() -> None:
    _serve_discovery(responses)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    _empty_searches()
    responses.post(f"{BASE}/Communication", status=201, json={"resourceType": "Communication", "id": "c1"})
    responses.post(f"{BASE}/Communication", status=201, json={"resourceType": "Communication", "id": "c2"})
    responses.delete(f"{BASE}/Communication/c1", status=403)
    responses.delete(f"{BASE}/Communication/c2", status=204)
    report = build_report(gather(BASE, token="t", patient="p1", write_probe=True, chart_fetch=lambda c, p: None))
    s = statuses(report)
    assert s["live.conditional-create"] == WARN
    assert s["live.cleanup"] == WARN
    cleanup = next(c for c in report.checks if c.id == "live.cleanup")
    assert "Communication/c1" in cleanup.detail and "Communication/c2" not in cleanup.detail


# ------------------------------------------------------------------------------------------------ CLI


@responses.activate
def test_cli_json_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    _serve_discovery(responses)
    assert main(["check", "--fhir-base", BASE, "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["summary"]["fail"] == 0 and body["fhirBase"] == BASE

    responses.replace(responses.GET, f"{BASE}/.well-known/smart-configuration", status=404)
    assert main(["check", "--fhir-base", BASE]) == 1  # no SMART at all
    out = capsys.readouterr().out
    assert "✗ SMART discovery" in out and "ask the vendor:" in out


def test_cli_unusable_input_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--fhir-base", "not a url"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fhir-massage check:") and "\n" not in err and "Traceback" not in err
    assert main(["check", "--fhir-base", BASE, "--write-probe"]) == 2  # needs a token and a patient


@responses.activate
def test_cli_unreachable_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    responses.get(f"{BASE}/.well-known/smart-configuration", body=requests.ConnectionError("refused"))
    responses.get(f"{BASE}/metadata", body=requests.ConnectionError("refused"))
    assert main(["check", "--fhir-base", BASE]) == 2
    assert "Nothing answered" in capsys.readouterr().err
