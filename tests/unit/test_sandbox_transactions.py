"""Transaction and batch Bundles in the sandbox core (R4 §3.1.0.11)."""

from __future__ import annotations

import pytest

from fhir_massage.sandbox.access import OPEN
from fhir_massage.sandbox.outcome import FhirProblem
from fhir_massage.sandbox.service import FhirService
from fhir_massage.sandbox.store import Store
from fhir_massage.sandbox.transactions import BundleProcessor

BASE = "http://127.0.0.1:9/fhir"
P_URN = "urn:uuid:0e6b3b7e-0000-4000-8000-000000000001"
SR_URN = "urn:uuid:0e6b3b7e-0000-4000-8000-000000000002"


@pytest.fixture
def svc() -> FhirService:
    return FhirService(Store(None))


def run(svc: FhirService, btype: str, entries: list[dict], prefer: str = "representation") -> dict:
    return BundleProcessor(svc).process(OPEN, BASE, {"resourceType": "Bundle", "type": btype, "entry": entries},
                                        prefer_return=prefer).body


def patient_entry(mrn: str = "A1", if_none_exist: bool = True) -> dict:
    req = {"method": "POST", "url": "Patient"}
    if if_none_exist:
        req["ifNoneExist"] = f"identifier=urn:mrn|{mrn}"
    return {"fullUrl": P_URN, "request": req,
            "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}}


def order_entry() -> dict:
    return {"fullUrl": SR_URN, "request": {"method": "POST", "url": "ServiceRequest"},
            "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                         "code": {"text": "massage"}, "subject": {"reference": P_URN}}}


def task_entry() -> dict:
    return {"request": {"method": "POST", "url": "Task"},
            "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                         "focus": {"reference": SR_URN}, "for": {"reference": P_URN},
                         "note": [{"text": f"see {SR_URN}"}]}}


def test_urns_resolve_everywhere_and_response_is_complete(svc: FhirService) -> None:
    out = run(svc, "transaction", [task_entry(), order_entry(), patient_entry()])
    assert out["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["201 Created"] * 3
    task, sr, pat = (e["resource"] for e in out["entry"])
    assert sr["subject"]["reference"] == f"Patient/{pat['id']}"
    assert task["focus"]["reference"] == f"ServiceRequest/{sr['id']}"
    assert task["note"][0]["text"] == f"see {SR_URN}"  # only whole values that are a fullUrl are rewritten
    for e in out["entry"]:
        r = e["response"]
        assert r["location"].endswith("/_history/1") and r["etag"] == 'W/"1"' and r["lastModified"]


def test_if_none_exist_returns_the_existing_resource(svc: FhirService) -> None:
    first = run(svc, "transaction", [patient_entry(), order_entry()])
    pid = first["entry"][0]["resource"]["id"]
    second = run(svc, "transaction", [patient_entry(), order_entry()])
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert second["entry"][0]["resource"]["id"] == pid
    assert second["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert svc.search(OPEN, BASE, "Patient", []).body["total"] == 1


def test_if_none_exist_with_two_matches_is_412_and_nothing_is_written(svc: FhirService) -> None:
    run(svc, "transaction", [patient_entry(if_none_exist=False)])
    run(svc, "transaction", [patient_entry(if_none_exist=False)])
    with pytest.raises(FhirProblem) as err:
        run(svc, "transaction", [order_entry(), patient_entry()])
    assert err.value.status == 412 and "Entry 1" in err.value.message
    assert svc.search(OPEN, BASE, "ServiceRequest", []).body["total"] == 0


def test_failing_entry_rolls_back_everything(svc: FhirService) -> None:
    bad = {"request": {"method": "POST", "url": "Observation"},
           "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                        "effectiveDateTime": "2021-02-30"}}
    with pytest.raises(FhirProblem) as err:
        run(svc, "transaction", [patient_entry(), order_entry(), bad])
    assert err.value.status == 400
    assert err.value.issues[0]["expression"][0] == "Bundle.entry[2]"
    assert svc.search(OPEN, BASE, "Patient", []).body["total"] == 0


def test_if_match_in_transaction(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "Patient", "p", {"resourceType": "Patient", "id": "p"})
    svc.update(OPEN, BASE, "Patient", "p", {"resourceType": "Patient", "id": "p", "gender": "male"})
    stale = {"request": {"method": "PUT", "url": "Patient/p", "ifMatch": 'W/"1"'},
             "resource": {"resourceType": "Patient", "id": "p", "gender": "female"}}
    with pytest.raises(FhirProblem) as err:
        run(svc, "transaction", [stale])
    assert err.value.status == 412
    fresh = {**stale, "request": {**stale["request"], "ifMatch": 'W/"2"'}}
    assert run(svc, "transaction", [fresh])["entry"][0]["response"]["etag"] == 'W/"3"'


def test_processing_order_delete_post_put_get(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "Patient", "gone", {"resourceType": "Patient", "id": "gone"})
    out = run(svc, "transaction", [
        {"request": {"method": "GET", "url": "Patient?_id=gone,kept"}},
        {"request": {"method": "PUT", "url": "Patient/kept"}, "resource": {"resourceType": "Patient", "id": "kept"}},
        {"request": {"method": "DELETE", "url": "Patient/gone"}},
    ])
    # GET ran last: it sees the PUT and not the deleted resource; entries keep the request's order.
    search = out["entry"][0]["resource"]
    assert [e["resource"]["id"] for e in search["entry"]] == ["kept"]
    assert out["entry"][1]["response"]["status"] == "201 Created"


def test_dangling_urn_is_refused(svc: FhirService) -> None:
    with pytest.raises(FhirProblem) as err:
        run(svc, "transaction", [order_entry()])
    assert err.value.status == 400 and P_URN in err.value.message


def test_batch_entries_fail_alone(svc: FhirService) -> None:
    out = run(svc, "batch", [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient", "gender": "x"}},
        {"request": {"method": "GET", "url": "Patient/nope"}},
    ])
    assert out["type"] == "batch-response"
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["201", "400", "404"]
    assert out["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == ["Patient.gender"]
    assert svc.search(OPEN, BASE, "Patient", []).body["total"] == 1


def test_prefer_minimal_leaves_resources_out(svc: FhirService) -> None:
    out = run(svc, "transaction", [patient_entry()], prefer="minimal")
    assert "resource" not in out["entry"][0] and out["entry"][0]["response"]["location"]


@pytest.mark.parametrize("bundle", [
    {"resourceType": "Patient"},
    {"resourceType": "Bundle", "type": "collection"},
    {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "FETCH", "url": "x"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "GET", "url": "Nope/1"}}]},
    {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "PUT", "url": "Patient"},
                                                                  "resource": {"resourceType": "Patient"}}]},
], ids=["not a bundle", "collection", "bad method", "unknown type", "put without id"])
def test_malformed_bundles_are_4xx(svc: FhirService, bundle: dict) -> None:
    with pytest.raises(FhirProblem) as err:
        BundleProcessor(svc).process(OPEN, BASE, bundle)
    assert 400 <= err.value.status < 500


def test_references_must_resolve(svc: FhirService) -> None:
    dangling = {"resourceType": "Condition", "code": {"text": "x"}, "subject": {"reference": "Patient/ghost"}}
    with pytest.raises(FhirProblem) as err:
        svc.create(OPEN, BASE, "Condition", dangling)
    assert err.value.status == 400 and err.value.issues[0]["expression"] == ["Condition.subject.reference"]
    with pytest.raises(FhirProblem):
        svc.create(OPEN, BASE, "Condition", {**dangling, "subject": {"reference": "urn:uuid:x"}})
    # Another server's resource and contained references are not ours to check.
    svc.create(OPEN, BASE, "Condition", {**dangling, "subject": {"reference": "https://other.example/fhir/Patient/1"}})
    svc.update(OPEN, BASE, "Patient", "real", {"resourceType": "Patient", "id": "real"})
    svc.create(OPEN, BASE, "Condition", {**dangling, "subject": {"reference": f"{BASE}/Patient/real"}})
    with pytest.raises(FhirProblem) as err:
        run(svc, "transaction", [order_entry(), patient_entry(), {
            "request": {"method": "POST", "url": "Task"},
            "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                         "owner": {"reference": "Practitioner/ghost"}}}])
    assert err.value.status == 400 and "Entry 2" in err.value.message
    # Clinical targets are checked for form only: CDS writes DetectedIssues about draft orders not stored yet.
    issue = {"resourceType": "DetectedIssue", "status": "final", "patient": {"reference": "Patient/real"},
             "implicated": [{"reference": "ServiceRequest/draft-1"}]}
    assert svc.create(OPEN, BASE, "DetectedIssue", issue).status == 201
    with pytest.raises(FhirProblem):
        svc.create(OPEN, BASE, "DetectedIssue", {**issue, "implicated": [{"reference": "not a reference"}]})
    assert svc.search(OPEN, BASE, "Patient", [("identifier", "urn:mrn|A1")]).body["total"] == 0
