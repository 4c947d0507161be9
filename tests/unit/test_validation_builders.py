"""What the app's builders write conforms to the fhir-massage profiles (the package is the contract with EHRs)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from fhir_massage.builders import messages, order, plan, session
from fhir_massage.orders_model import OrderDraft
from fhir_massage.validation import errors, validate_resource

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


def _draft(techniques: tuple[str, ...]) -> OrderDraft:
    return OrderDraft(
        draft_id="draft-1", patient_ref="Patient/p1", requester_ref="PractitionerRole/dr1", techniques=techniques,
        sites=("53120007:left", "77568009"), frequency=2, duration_weeks=6, session_minutes=45, authored=NOW,
        reason_refs=("Condition/lymphedema",), pressure="light", notes="clear proximal nodes first",
        patient_instruction="hydrate",
    )


def _no_issues(resource: dict) -> None:
    issues = [i for i in validate_resource(resource) if i.severity in ("error", "warning")]
    assert issues == []


@pytest.mark.parametrize(
    "techniques", [("lymphatic-drainage",), ("swedish", "deep-tissue", "stretching")], ids=["mld", "three-orders"]
)
def test_order_transaction_conforms(techniques: tuple[str, ...]) -> None:
    bundle = order.order_transaction(_draft(techniques), [], NOW)
    _no_issues(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("ServiceRequest") == len(techniques) == kinds.count("Task")


def _task() -> dict:
    bundle = order.order_transaction(_draft(("lymphatic-drainage",)), [], NOW)
    task = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Task")
    return dict(task, id="t1", meta=dict(task["meta"], versionId="1"))


@pytest.mark.parametrize("status", ["completed", "not-done"])
def test_session_transaction_conforms(status: str) -> None:
    common = dict(order_ref="ServiceRequest/sr1", task_ref="Task/t1", patient_ref="Patient/p1",
                  performer_ref="PractitionerRole/lmt", start=NOW, technique="lymphatic-drainage")
    if status == "completed":
        note = session.SessionNote(draft_id="s1", end=NOW + timedelta(minutes=45), sites=("53120007:left",),
                                   pain_before=6, pain_after=3, subjective="heavy arm", **common)
    else:
        note = session.SessionNote(draft_id="s2", status="not-done", status_reason="fever 38.4 C", **common)
    bundle = session.session_transaction(note, _task(), NOW)
    _no_issues(bundle)
    procedures = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Procedure"]
    assert [p["status"] for p in procedures] == [status]


@pytest.mark.parametrize("category", sorted(messages.CATEGORIES))
def test_message_conforms(category: str) -> None:
    msg = messages.communication(order_ref="ServiceRequest/sr1", patient_ref="Patient/p1",
                                 sender_ref="PractitionerRole/lmt", recipient_ref="PractitionerRole/dr1",
                                 text="Session 1 done; pain 6 -> 3.", category=category, now=NOW, draft_id="m1")
    _no_issues(msg)


def test_care_plan_conforms() -> None:
    cp = plan.care_plan(draft_id="pl1", patient_ref="Patient/p1", order_refs=["ServiceRequest/sr1"],
                        author_ref="PractitionerRole/dr1", start=date(2026, 12, 1), now=NOW,
                        addresses=["Condition/lymphedema"])
    _no_issues(cp)


def test_a_builder_output_broken_by_hand_is_caught() -> None:
    bundle = order.order_transaction(_draft(("swedish",)), [], NOW)
    sr = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    sr["code"]["coding"] = [c for c in sr["code"]["coding"] if "cpt" in c["system"]]
    assert any("slice 'technique'" in i.message for i in errors(validate_resource(bundle)))


CHART = {"resourceType": "Bundle", "type": "collection", "entry": [
    {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}},
    {"resource": {"resourceType": "Condition", "id": "dvt", "subject": {"reference": "Patient/p1"},
                  "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                 "code": "active"}]},
                  "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I82.402"}]},
                  "onsetDateTime": "2026-11-01"}},
    {"resource": {"resourceType": "MedicationRequest", "id": "apixaban", "status": "active", "intent": "order",
                  "subject": {"reference": "Patient/p1"},
                  "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                            "code": "1364430"}]}}},
]}


def test_screening_findings_written_with_the_order_conform() -> None:
    from fhir_massage.builders.detected_issue import detected_issue
    from fhir_massage.screening import screen_bundle

    screening = screen_bundle(CHART, techniques=["deep-tissue"], today=date(2026, 11, 28))
    assert screening.findings, "the chart must produce findings for this test to mean anything"
    issues = [detected_issue(f, patient_ref="Patient/p1", now=NOW, status="preliminary") for f in screening.findings]
    bundle = order.order_transaction(_draft(("deep-tissue",)), issues, NOW)
    written = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DetectedIssue"]
    assert len(written) == len(screening.findings)
    assert errors(validate_resource(bundle)) == []
