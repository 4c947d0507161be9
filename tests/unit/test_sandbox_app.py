"""The sandbox Flask app in-process (test client): admin endpoints, config defaults, and "never a 500" fuzzing."""

from __future__ import annotations

import json
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_massage.sandbox.faults import FaultConfig
from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app

FJ = "application/fhir+json"


@pytest.fixture(scope="module")
def client():
    app = create_sandbox_app(SandboxConfig(open=True, seed=False))
    return app.test_client()


def test_config_defaults() -> None:
    cfg = SandboxConfig()
    assert (cfg.host, cfg.port, cfg.data_dir, cfg.seed, cfg.open) == ("127.0.0.1", 0, None, True, False)
    assert cfg.faults == FaultConfig() and not cfg.faults.active
    assert cfg.today is None and cfg.public_base is None and cfg.auth == {}


@pytest.mark.parametrize("method,path", [("GET", "/_sandbox/health"), ("POST", "/_sandbox/reset"),
                                         ("POST", "/_sandbox/faults"), ("DELETE", "/_sandbox/faults")])
def test_admin_is_loopback_only(client, method: str, path: str) -> None:
    r = client.open(path, method=method, json={}, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert r.status_code == 403 and r.json["resourceType"] == "OperationOutcome"


def test_admin_from_loopback(client) -> None:
    r = client.get("/_sandbox/health", environ_base={"REMOTE_ADDR": "::1"})
    assert r.status_code == 200 and r.json["status"] == "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
element_names = st.sampled_from(["id", "meta", "name", "birthDate", "gender", "identifier", "subject", "code",
                                 "onsetDateTime", "status", "intent", "telecom", "extension", "text", "active"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=st.sampled_from(["Patient", "Condition", "ServiceRequest", "Nope", ""]),
       body=st.dictionaries(element_names, json_values, max_size=5))
def test_random_resources_never_500(client, rtype: str, body: dict) -> None:
    r = client.post("/fhir/Patient", data=json.dumps({"resourceType": rtype, **body}), content_type=FJ)
    assert r.status_code in (200, 201, 400, 404), r.data
    assert r.json["resourceType"] in ("OperationOutcome", "Patient")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["code", "patient", "onset-date", "name", "_count", "_sort", "_include", "_id",
                             "_lastUpdated", "code:not", "name:exact", "value-quantity", "x:y", "_summary"]),
       value=st.text(max_size=30), rtype=st.sampled_from(["Condition", "Patient", "Observation"]))
def test_random_searches_never_500(client, name: str, value: str, rtype: str) -> None:
    r = client.get(f"/fhir/{rtype}", query_string=[(name, value)])
    assert r.status_code in (200, 400, 406), r.data


def test_server_answers_are_valid_fhir(client) -> None:
    """What the server sends must itself pass the R4 structure check it applies to clients."""
    from fhir.resources.R4B import get_fhir_model_class

    pid = client.post("/fhir/Patient", json={"resourceType": "Patient"}, content_type=FJ).json["id"]
    client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "male"}, content_type=FJ)
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/nope"}},
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}]}
    answers = [
        client.get("/fhir/metadata"),
        client.get("/fhir/Patient?_count=1&_revinclude=Condition:patient&colour=red"),
        client.get(f"/fhir/Patient/{pid}/_history"),
        client.get("/fhir/Patient/nope"),
        client.post("/fhir", json=batch, content_type=FJ),
        client.post("/fhir", json={**batch, "type": "transaction", "entry": batch["entry"][1:]}, content_type=FJ),
        client.delete(f"/fhir/Patient/{pid}"),
    ]
    for r in answers:
        body = r.json
        get_fhir_model_class(body["resourceType"]).model_validate(body)
    assert [r.json.get("type") for r in answers[4:6]] == ["batch-response", "transaction-response"]


_any = st.none() | st.integers(-3, 3) | st.text(max_size=6) | st.sampled_from(
    ["Patient/1", "urn:uuid:a", "urn:uuid:b", [], {}])
_url = st.sampled_from(["Patient", "Patient/1", "Patient/1/_history/1", "Patient/1/_history", "Patient?_id=1", "Nope",
                        "", "/", "Patient/a b", "http://x/fhir/Patient/1", "http://localhost/fhir/Patient",
                        "Patient/1/x/y", "Condition?patient=urn:uuid:a", "Patient?bogus=1", "Patient?_count=x"])
_res = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Condition", "Bundle", "Nope", "Provenance"])},
    optional={"id": _any, "subject": st.fixed_dictionaries({"reference": _any}),
              "target": st.lists(st.fixed_dictionaries({"reference": _any}), max_size=2), "gender": _any})
_req = st.fixed_dictionaries(
    {"method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", None, 3]), "url": st.one_of(_url, _any)},
    optional={"ifNoneExist": st.one_of(_url, _any), "ifMatch": st.one_of(_any, st.just('W/"1"'))})
_entry = st.fixed_dictionaries({"request": _req}, optional={
    "resource": st.one_of(_res, _any), "fullUrl": st.one_of(st.sampled_from(["urn:uuid:a", "urn:uuid:b"]), _any)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(btype=st.sampled_from(["batch", "transaction"]), entries=st.lists(st.one_of(_entry, _any), max_size=4))
def test_random_bundles_never_500(client, btype: str, entries: list) -> None:
    body = {"resourceType": "Bundle", "type": btype, "entry": entries}
    r = client.post("/fhir", data=json.dumps(body), content_type=FJ)
    assert r.status_code < 500, (body, r.data)
