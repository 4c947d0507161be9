"""Grant enforcement in the sandbox's FHIR core (access.py contract), with hand-made Grants.

Patient grants are held to the R4 Patient compartment (searchparams.PATIENT_COMPARTMENT); user grants to the
compartments of the patients the user may access (Grant.patients, from FhirService.accessible_patients: active
CareTeams naming the user, and generalPractitioner)."""

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


def test_a_grant_with_no_patient_limit_sees_everyone(svc: FhirService) -> None:
    """Grant.patients None (OPEN, --open mode): no compartment limit."""
    assert match_ids(svc.search(grant(None), BASE, "Condition", [])) == ["c-p1", "c-p2"]


# --- user grants: the user's patients ----------------------------------------------------------------------------


def user_grant(*patients: str, **perms: frozenset[str]) -> Grant:
    return Grant(permissions=perms or {"*": ALL}, user="Practitioner/dr", patients=frozenset(patients))


def team(svc: FhirService, tid: str, patient: str, *members: str, status: str = "active") -> None:
    svc.update(OPEN, BASE, "CareTeam", tid, {
        "resourceType": "CareTeam", "id": tid, "status": status, "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": m}} for m in members]})


def test_accessible_patients_come_from_active_care_teams_and_general_practitioner(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "PractitionerRole", "dr-role", {
        "resourceType": "PractitionerRole", "id": "dr-role", "practitioner": {"reference": "Practitioner/dr"}})
    for pid in ("p3", "p4", "p5", "p6"):
        svc.update(OPEN, BASE, "Patient", pid, {"resourceType": "Patient", "id": pid})
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == frozenset()
    team(svc, "t1", "p1", "Practitioner/dr", "Organization/org")
    team(svc, "t3", "p3", f"{BASE}/PractitionerRole/dr-role")  # the role, by absolute URL on this server
    team(svc, "t4", "p4", "Practitioner/dr", status="inactive")  # an ended team gives no access
    team(svc, "t5", "p5", "http://elsewhere.example/fhir/Practitioner/dr")  # another server's dr
    svc.update(OPEN, BASE, "Patient", "p6", {
        "resourceType": "Patient", "id": "p6", "generalPractitioner": [{"reference": "Practitioner/dr"}]})
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == {"p1", "p6"}
    assert svc.accessible_patients(BASE, ["Practitioner/dr", "PractitionerRole/dr-role"]) == {"p1", "p3", "p6"}
    assert svc.accessible_patients(BASE, ["Patient/p2"]) == {"p2"}  # a patient user: their own record
    assert svc.accessible_patients(BASE, ["Practitioner/nobody", "not a reference"]) == frozenset()


def test_accessible_patients_follow_writes(svc: FhirService) -> None:
    """Cached per user until the next write: a CareTeam change shows on the next request, deletion too."""
    team(svc, "t2", "p2", "Practitioner/dr")
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == {"p2"}
    team(svc, "t2", "p2", "Practitioner/dr", status="inactive")
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == frozenset()
    team(svc, "t1", "p1", "Practitioner/dr")
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == {"p1"}
    svc.delete(OPEN, BASE, "CareTeam", "t1")
    assert svc.accessible_patients(BASE, ["Practitioner/dr"]) == frozenset()


@pytest.mark.parametrize("rtype,rid,expected", [
    ("Condition", "c-p1", 200),
    ("Condition", "c-p2", 403),  # a patient outside the user's list: refused, no data
    ("Patient", "p2", 403),
    ("Task", "t-p2", 403),
    ("Practitioner", "dr", 200),  # outside the compartment: type permission only
    ("Organization", "org", 200),
])
def test_user_grant_reads(svc: FhirService, rtype: str, rid: str, expected: int) -> None:
    assert status_of(svc.read, user_grant("p1"), BASE, rtype, rid) == expected
    assert status_of(svc.vread, user_grant("p1"), BASE, rtype, rid, "1") == expected
    assert status_of(svc.history, user_grant("p1"), BASE, rtype, rid) == expected


def test_user_grant_searches_are_narrowed_to_the_users_patients(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "Patient", "p3", {"resourceType": "Patient", "id": "p3"})
    g = user_grant("p1", "p3")
    assert match_ids(svc.search(g, BASE, "Patient", [])) == ["p1", "p3"]
    assert match_ids(svc.search(g, BASE, "Condition", [])) == ["c-p1"]
    assert match_ids(svc.search(g, BASE, "Task", [])) == ["t-p1"]
    assert match_ids(svc.search(g, BASE, "Condition", [("patient", "p1,p3")])) == ["c-p1"]
    assert match_ids(svc.search(g, BASE, "Practitioner", [])) == ["dr"]
    assert svc.search(g, BASE, "Condition", [("_summary", "count")]).body["total"] == 1
    assert match_ids(svc.search(user_grant(), BASE, "Condition", [])) == []  # no patients: nothing
    assert match_ids(svc.search(user_grant(), BASE, "Organization", [])) == ["org"]


@pytest.mark.parametrize("pairs", [[("patient", "p2")], [("subject", "Patient/p2")], [("patient", "p1,p2")]], ids=str)
def test_user_grant_naming_a_patient_outside_the_list_is_403(svc: FhirService, pairs) -> None:
    with pytest.raises(FhirProblem) as err:
        svc.search(user_grant("p1"), BASE, "Condition", pairs)
    assert err.value.status == 403 and "Patient/p2" in err.value.message and "Practitioner/dr" in err.value.message


def test_user_grant_writes_only_into_the_users_patients(svc: FhirService) -> None:
    g = user_grant("p1")
    ok = {"resourceType": "Condition", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}
    assert status_of(svc.create, g, BASE, "Condition", ok) == 201
    assert status_of(svc.create, g, BASE, "Condition", {**ok, "subject": {"reference": "Patient/p2"}}) == 403
    other = svc.read(OPEN, BASE, "Condition", "c-p2").resource
    assert status_of(svc.update, g, BASE, "Condition", "c-p2", {**other, "subject": {"reference": "Patient/p1"}}) == 403
    mine = svc.read(OPEN, BASE, "Condition", "c-p1").resource
    assert status_of(svc.update, g, BASE, "Condition", "c-p1", {**mine, "subject": {"reference": "Patient/p2"}}) == 403
    assert status_of(svc.delete, g, BASE, "Condition", "c-p2") == 403
    assert status_of(svc.create, g, BASE, "Practitioner", {"resourceType": "Practitioner"}) == 201


def test_user_grant_includes_and_batches(svc: FhirService) -> None:
    svc.update(OPEN, BASE, "Condition", "mixed", {
        "resourceType": "Condition", "id": "mixed", "code": {"text": "x"},
        "subject": {"reference": "Patient/p2"}, "asserter": {"reference": "Patient/p1"}})
    body = svc.search(user_grant("p1"), BASE, "Condition", [("_include", "Condition:subject")]).body
    # "mixed" is in p1's compartment too (asserter), so it matches; its subject p2 is left out of the includes.
    assert sorted(e["resource"]["id"] for e in body["entry"]) == ["c-p1", "mixed", "p1"]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Condition/c-p1"}},
        {"request": {"method": "GET", "url": "Condition/c-p2"}},
    ]}
    out = BundleProcessor(svc).process(user_grant("p1"), BASE, bundle).body
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["200", "403"]


def test_a_patient_in_context_wins_over_the_users_list(svc: FhirService) -> None:
    """A mixed user/ + patient/ grant has one compartment: the launch patient's."""
    g = Grant(permissions={"*": ALL}, patient="p1", patients=frozenset({"p1", "p2"}))
    assert match_ids(svc.search(g, BASE, "Condition", [])) == ["c-p1"]
    assert status_of(svc.read, g, BASE, "Condition", "c-p2") == 403


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
