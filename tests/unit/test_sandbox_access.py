"""Grant enforcement in the sandbox's FHIR core (access.py contract), with hand-made Grants.

Patient grants are held to the R4 Patient compartment (searchparams.PATIENT_COMPARTMENT)."""

from __future__ import annotations

import pytest

from fhir_massage.sandbox.access import INTERACTIONS, OPEN, Grant
from fhir_massage.sandbox.outcome import FhirProblem
from fhir_massage.sandbox.service import FhirService
from fhir_massage.sandbox.store import Store
from fhir_massage.sandbox.transactions import BundleProcessor

BASE = "http://127.0.0.1:9/fhir"
ALL = frozenset(INTERACTIONS)


def grant(patient: str | None = "p1", **perms: frozenset[str]) -> Grant:
    return Grant(permissions=perms or {"*": ALL}, patient=patient)


@pytest.fixture
def svc() -> FhirService:
    s = FhirService(Store(None))
    for pid in ("p1", "p2"):
        s.update(OPEN, BASE, "Patient", pid, {"resourceType": "Patient", "id": pid})
        s.update(OPEN, BASE, "Condition", f"c-{pid}", {
            "resourceType": "Condition", "id": f"c-{pid}", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{pid}"}})
        s.update(OPEN, BASE, "Task", f"t-{pid}", {
            "resourceType": "Task", "id": f"t-{pid}", "status": "requested", "intent": "order",
            "for": {"reference": f"Patient/{pid}"}})
    s.update(OPEN, BASE, "Practitioner", "dr", {"resourceType": "Practitioner", "id": "dr"})
    s.update(OPEN, BASE, "Organization", "org", {"resourceType": "Organization", "id": "org", "name": "Clinic"})
    return s


def match_ids(result) -> list[str]:
    return sorted(e["resource"]["id"] for e in result.body.get("entry", []) if e["search"]["mode"] == "match")


def status_of(fn, *args, **kw) -> int:
    try:
        return fn(*args, **kw).status
    except FhirProblem as exc:
        return exc.status


def test_missing_type_permission_is_403(svc: FhirService) -> None:
    g = grant(None, Patient=frozenset({"read"}))
    assert status_of(svc.read, g, BASE, "Patient", "p1") == 200
    assert status_of(svc.search, g, BASE, "Patient", []) == 403
    assert status_of(svc.read, g, BASE, "Condition", "c-p1") == 403
    assert status_of(svc.create, g, BASE, "Patient", {"resourceType": "Patient"}) == 403


def test_user_grant_without_patient_sees_everyone(svc: FhirService) -> None:
    assert match_ids(svc.search(grant(None), BASE, "Condition", [])) == ["c-p1", "c-p2"]


@pytest.mark.parametrize("rtype,rid,expected", [
    ("Condition", "c-p1", 200),
    ("Condition", "c-p2", 403),  # another patient's resource: refused, no data
    ("Patient", "p1", 200),
    ("Patient", "p2", 403),
    ("Task", "t-p2", 403),  # Task is held to the compartment through Task.for (sandbox choice, see searchparams)
    ("Practitioner", "dr", 200),  # outside the compartment: type permission only
    ("Organization", "org", 200),
])
def test_patient_grant_reads(svc: FhirService, rtype: str, rid: str, expected: int) -> None:
    assert status_of(svc.read, grant("p1"), BASE, rtype, rid) == expected


def test_patient_grant_searches_are_narrowed(svc: FhirService) -> None:
    g = grant("p1")
    assert match_ids(svc.search(g, BASE, "Condition", [])) == ["c-p1"]
    assert match_ids(svc.search(g, BASE, "Patient", [])) == ["p1"]
    assert match_ids(svc.search(g, BASE, "Task", [])) == ["t-p1"]
    assert match_ids(svc.search(g, BASE, "Condition", [("patient", "p1")])) == ["c-p1"]
    assert match_ids(svc.search(g, BASE, "Practitioner", [])) == ["dr"]


@pytest.mark.parametrize("pairs", [[("patient", "p2")], [("subject", "Patient/p2")],
                                   [("patient", f"{BASE}/Patient/p2")], [("patient", "p1,p2")]], ids=str)
def test_patient_grant_naming_another_patient_is_403(svc: FhirService, pairs) -> None:
    assert status_of(svc.search, grant("p1"), BASE, "Condition", pairs) == 403


def test_includes_drop_what_the_grant_cannot_read(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "Condition", "mixed", {
        "resourceType": "Condition", "id": "mixed", "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"}, "asserter": {"reference": "Patient/p2"}})
    body = svc.search(grant("p1"), BASE, "Patient", [("_id", "p1"), ("_revinclude", "Condition:patient")]).body
    assert sorted(e["resource"]["id"] for e in body["entry"]) == ["c-p1", "mixed", "p1"]
    g_no_patient_read = Grant(permissions={"Condition": ALL}, patient="p1")
    body = svc.search(g_no_patient_read, BASE, "Condition", [("_include", "Condition:patient")]).body
    assert all(e["resource"]["resourceType"] == "Condition" for e in body["entry"])


@pytest.mark.parametrize("subject,expected", [("Patient/p1", 201), ("Patient/p2", 403)])
def test_patient_grant_creates_only_in_its_compartment(svc: FhirService, subject: str, expected: int) -> None:
    body = {"resourceType": "Condition", "code": {"text": "x"}, "subject": {"reference": subject}}
    assert status_of(svc.create, grant("p1"), BASE, "Condition", body) == expected


def test_patient_grant_cannot_move_or_delete_anothers_resource(svc: FhirService) -> None:
    g = grant("p1")
    other = svc.read(OPEN, BASE, "Condition", "c-p2").resource
    # Re-pointing p2's Condition at p1 is still a write into p2's record.
    assert status_of(svc.update, g, BASE, "Condition", "c-p2", {**other, "subject": {"reference": "Patient/p1"}}) == 403
    assert status_of(svc.delete, g, BASE, "Condition", "c-p2") == 403
    assert svc.read(OPEN, BASE, "Condition", "c-p2").resource["subject"]["reference"] == "Patient/p2"
    assert status_of(svc.delete, g, BASE, "Condition", "c-p1") == 200


def test_history_and_vread_are_compartment_checked(svc: FhirService) -> None:
    assert status_of(svc.history, grant("p1"), BASE, "Condition", "c-p2") == 403
    assert status_of(svc.vread, grant("p1"), BASE, "Condition", "c-p2", "1") == 403
    assert status_of(svc.vread, grant("p1"), BASE, "Condition", "c-p1", "1") == 200


def test_transaction_checks_every_entry_and_rolls_back(svc: FhirService) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
         "resource": {"resourceType": "Condition", "code": {"text": "new"}, "subject": {"reference": "Patient/p1"}},
         "request": {"method": "POST", "url": "Condition"}},
        {"resource": {"resourceType": "Condition", "code": {"text": "bad"}, "subject": {"reference": "Patient/p2"}},
         "request": {"method": "POST", "url": "Condition"}},
    ]}
    with pytest.raises(FhirProblem) as err:
        BundleProcessor(svc).process(grant("p1"), BASE, bundle)
    assert err.value.status == 403 and "Entry 1" in err.value.message
    assert match_ids(svc.search(OPEN, BASE, "Condition", [("patient", "p1")])) == ["c-p1"]  # nothing written


def test_batch_reports_forbidden_entries_alone(svc: FhirService) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Condition/c-p1"}},
        {"request": {"method": "GET", "url": "Condition/c-p2"}},
    ]}
    out = BundleProcessor(svc).process(grant("p1"), BASE, bundle).body
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["200", "403"]
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_provenance_of_an_order_follows_its_target(svc: FhirService) -> None:
    """R4 deviation (service.compartment_of): Provenance joins the compartment of the resources it targets."""
    g = grant("p1")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Provenance"},
         "resource": {"resourceType": "Provenance", "recorded": "2024-01-01T00:00:00Z",
                      "target": [{"reference": "urn:uuid:22222222-2222-2222-2222-222222222222"}],
                      "agent": [{"who": {"reference": "Practitioner/dr"}}]}},
        {"fullUrl": "urn:uuid:22222222-2222-2222-2222-222222222222", "request": {"method": "POST", "url": "ServiceRequest"},
         "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                      "code": {"text": "massage"}, "subject": {"reference": "Patient/p1"}}},
    ]}
    out = BundleProcessor(svc).process(g, BASE, bundle).body
    prov_id = out["entry"][0]["resource"]["id"]
    assert match_ids(svc.search(g, BASE, "Provenance", [])) == [prov_id]
    assert match_ids(svc.search(grant("p2"), BASE, "Provenance", [])) == []
    assert status_of(svc.read, grant("p2"), BASE, "Provenance", prov_id) == 403
    orphan = {"resourceType": "Provenance", "recorded": "2024-01-01T00:00:00Z",
              "target": [{"reference": "Condition/c-p2"}], "agent": [{"who": {"reference": "Practitioner/dr"}}]}
    assert status_of(svc.create, g, BASE, "Provenance", orphan) == 403
