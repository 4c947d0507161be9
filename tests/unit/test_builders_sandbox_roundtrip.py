"""The builders' transactions through the sandbox EHR's own transaction processor (in memory, no HTTP): the strict
server accepts what we write, a retried order writes nothing twice, a retried session note fails its If-Match and
``session_recorded`` then tells the caller the first attempt landed, and the plan view reads it all back."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from fhir_massage.builders.order import order_transaction, sessions_done
from fhir_massage.builders.session import SessionNote, session_recorded, session_transaction
from fhir_massage.coordination import plan_rows
from fhir_massage.orders_model import OrderDraft
from fhir_massage.sandbox.access import OPEN
from fhir_massage.sandbox.outcome import FhirProblem
from fhir_massage.sandbox.service import FhirService
from fhir_massage.sandbox.store import Store
from fhir_massage.sandbox.transactions import BundleProcessor

BASE = "http://127.0.0.1:9/fhir"
AUTHORED = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def svc() -> FhirService:
    return FhirService(Store(None))


def run(svc: FhirService, bundle: dict[str, Any]) -> list[dict[str, Any]]:
    out = BundleProcessor(svc).process(OPEN, BASE, bundle, prefer_return="representation").body
    return out["entry"]


def test_order_session_and_plan_view_through_the_sandbox(svc: FhirService) -> None:
    # the sandbox checks that references point at something: the clinicians must exist first
    patient, _, _ = run(svc, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
        *({"request": {"method": "PUT", "url": f"PractitionerRole/{rid}"},
           "resource": {"resourceType": "PractitionerRole", "id": rid, "active": True}} for rid in ("dr1", "lmt1"))]})
    patient_ref = f"Patient/{patient['resource']['id']}"
    draft = OrderDraft(draft_id="d1", patient_ref=patient_ref, requester_ref="PractitionerRole/dr1",
                       techniques=("lymphatic-drainage", "swedish"), sites=("53120007:left",), frequency=2,
                       duration_weeks=6, session_minutes=45, authored=AUTHORED, reason_text="Lymphedema, left arm")
    bundle = order_transaction(draft, [], AUTHORED + timedelta(minutes=5))
    first = run(svc, bundle)
    assert [e["response"]["status"] for e in first] == ["201 Created"] * 5
    retry = run(svc, bundle)  # the answer was lost: sending again must not write a second order
    assert [e["response"]["status"][:3] for e in retry] == ["200"] * 5
    assert [e["resource"]["id"] for e in retry[:4]] == [e["resource"]["id"] for e in first[:4]]

    task = next(e["resource"] for e in first if e["resource"]["resourceType"] == "Task")
    note = SessionNote(draft_id="n1", order_ref=task["focus"]["reference"], task_ref=f"Task/{task['id']}",
                       patient_ref=patient_ref, performer_ref="PractitionerRole/lmt1",
                       start=AUTHORED + timedelta(days=2), end=AUTHORED + timedelta(days=2, minutes=45),
                       technique="lymphatic-drainage", sites=("53120007:left",), pain_before=6, pain_after=3)
    session_bundle = session_transaction(note, task, AUTHORED + timedelta(days=2, hours=1))
    written: dict[str, list[dict[str, Any]]] = {}
    for e in run(svc, session_bundle):
        written.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    (updated,), (procedure,) = written["Task"], written["Procedure"]
    assert updated["status"] == "in-progress" and sessions_done(updated) == 1
    assert updated["output"][0]["valueReference"]["reference"] == f"Procedure/{procedure['id']}"

    with pytest.raises(FhirProblem) as lost_answer:  # a blind retry hits the If-Match on the Task
        run(svc, session_bundle)
    assert lost_answer.value.status == 412
    assert session_recorded(updated, "n1")  # re-read Task: the first attempt landed, nothing to redo

    srs = [e["resource"] for e in first if e["resource"]["resourceType"] == "ServiceRequest"]
    tasks = [updated] + [e["resource"] for e in first if e["resource"]["resourceType"] == "Task"
                         and e["resource"]["id"] != updated["id"]]
    rows = {r.order_ref: r for r in plan_rows(srs, tasks, [procedure], written["Observation"],
                                              today=date(2026, 11, 9))}
    mld = rows[task["focus"]["reference"]]
    assert (mld.sessions_done, mld.sessions_planned, mld.warnings) == (1, 12, ())
    assert [(p.before, p.after) for p in mld.pain.points] == [(6, 3)]
    assert len(rows) == 2 and sum(r.sessions_done for r in rows.values()) == 1
