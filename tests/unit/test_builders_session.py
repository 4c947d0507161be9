"""Session builders: CPT units (8-minute rule), SessionNote checks, Procedure and pain Observations, and the session
transaction with its Task update (If-Match)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given
from hypothesis import strategies as st

from fhir_massage.builders.order import fulfillment_task, sessions_done
from fhir_massage.builders.session import (
    PAIN_NRS,
    SESSION_ID_SYSTEM,
    VISIT_ID_SYSTEM,
    SessionNote,
    VisitNote,
    VisitOrder,
    cpt_units,
    visit_cpt_minutes,
    visit_problems,
    visit_transaction,
    pain_observations,
    procedure,
    session_problems,
    session_recorded,
    session_transaction,
    visit_units,
)
from fhir_massage.codes import CPT, TECHNIQUE_SYSTEM, TECHNIQUES
from fhir_massage.errors import InvalidInput
from fhir_massage.orders_model import OrderDraft
from fhir_massage.validation import errors, validate_resource

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=2)
NOTE = SessionNote(
    draft_id="note-1",
    order_ref="ServiceRequest/sr1",
    task_ref="Task/t1",
    patient_ref="Patient/p1",
    performer_ref="PractitionerRole/lmt1",
    start=T0,
    end=T0 + timedelta(minutes=45),
    technique="lymphatic-drainage",
    sites=("53120007:left",),
    pressure="light",
    position="supine, arm elevated",
    response="Tolerated well; arm feels lighter.",
    adverse_events=("Mild dizziness on sitting up, resolved in 2 minutes",),
    pain_before=6,
    pain_after=3,
    subjective="Arm heavy and tight, worse in the evening. Pain 6/10.",
    objective="Pitting oedema of the left forearm; circumference 2 cm above the right.",
    assessment="Oedema softened after drainage.",
    plan="Continue twice weekly; teach self-drainage at session 4.",
    follow_up="Re-measure arm circumference at session 6.",
)
ORDER_DRAFT = OrderDraft(
    draft_id="order-1", patient_ref="Patient/p1", requester_ref="PractitionerRole/dr1",
    techniques=("lymphatic-drainage",), sites=("53120007:left",), frequency=2, duration_weeks=1,
    session_minutes=45, authored=T0 - timedelta(days=2), reason_text="Lymphedema")


def task(**changes: Any) -> dict[str, Any]:
    """The fulfilment Task as the EHR would return it (built by our builder, given an id and a version)."""
    t = fulfillment_task(ORDER_DRAFT, order_ref="ServiceRequest/sr1", now=T0, owner_ref="PractitionerRole/lmt1")
    t.update({"id": "t1", "meta": {**t["meta"], "versionId": "3"}})
    t.update(changes)
    return t


def note(**changes: Any) -> SessionNote:
    return dataclasses.replace(NOTE, **changes)


def valid(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    problems = errors(validate_resource(resource))
    assert not problems, "\n".join(map(str, problems))


# --- CPT units ----------------------------------------------------------------------------------------------------

UNIT_CASES = [
    ("0-min-nothing-billable", 0, 0), ("7-min-below-the-8-minute-threshold", 7, 0), ("8-min-first-unit", 8, 1),
    ("22-min-still-one-unit", 22, 1), ("23-min-second-unit", 23, 2), ("37-min-two-units", 37, 2),
    ("38-min-third-unit", 38, 3), ("52-min-three-units", 52, 3), ("53-min-fourth-unit", 53, 4),
    ("60-min-four-units", 60, 4), ("67-min-four-units", 67, 4), ("68-min-fifth-unit", 68, 5),
]


@pytest.mark.parametrize("minutes,units", [c[1:] for c in UNIT_CASES], ids=[c[0] for c in UNIT_CASES])
def test_cpt_units_8_minute_rule(minutes: int, units: int) -> None:
    assert cpt_units(minutes) == units


@given(st.integers(min_value=0, max_value=600))
def test_cpt_units_monotone_and_15_minute_steps(minutes: int) -> None:
    assert cpt_units(minutes + 1) >= cpt_units(minutes)
    if minutes >= 8:
        assert cpt_units(minutes + 15) == cpt_units(minutes) + 1
        # a unit needs at least 8 minutes beyond the full units before it
        assert 15 * (cpt_units(minutes) - 1) + 8 <= minutes < 15 * cpt_units(minutes) + 8


def test_visit_units_cms_allocation_example() -> None:
    # CMS: 33 min of 97140 + 7 min of 97124 = 40 min -> 3 units: 2 x 97140 and 1 x 97124 (the 7 minutes have the
    # larger remainder once 97140's two full units are given)
    mld = note(start=T0, end=T0 + timedelta(minutes=33))
    swedish = note(draft_id="note-2", technique="swedish", start=T0 + timedelta(minutes=33),
                   end=T0 + timedelta(minutes=40))
    assert visit_units([mld, swedish]) == {"97140": 2, "97124": 1}
    assert visit_units([note(status="not-done", status_reason="fever")]) == {}


@given(st.lists(st.tuples(st.sampled_from(TECHNIQUES), st.integers(min_value=1, max_value=90)), min_size=1,
                max_size=4))
def test_visit_units_add_up_to_the_pooled_minutes(parts: list[tuple[str, int]]) -> None:
    notes = [note(draft_id=f"n{i}", technique=t, end=T0 + timedelta(minutes=m)) for i, (t, m) in enumerate(parts)]
    assert sum(visit_units(notes).values()) == cpt_units(sum(m for _, m in parts))


# --- checks -------------------------------------------------------------------------------------------------------

PROBLEM_CASES = [
    ("complete-mld-note-is-fine", {}, None),
    ("not-done-for-fever-with-reason-is-fine", {"status": "not-done", "status_reason": "Temperature 38.4 C",
                                               "end": None, "pain_before": None, "pain_after": None}, None),
    ("not-done-needs-a-reason", {"status": "not-done", "end": None}, "status_reason"),
    ("cancelled-is-not-a-status", {"status": "cancelled"}, "status"),
    ("ends-before-it-starts", {"end": T0 - timedelta(minutes=5)}, "end"),
    ("five-hour-session-is-a-typo", {"end": T0 + timedelta(hours=5)}, "end"),
    ("no-end-time", {"end": None}, "end"),
    ("start-without-time-zone", {"start": datetime(2026, 12, 1, 9, 0)}, "start"),
    ("pain-11-is-off-the-scale", {"pain_before": 11}, "pain_before"),
    ("pain-minus-1-is-off-the-scale", {"pain_after": -1}, "pain_after"),
    ("pain-true-is-not-a-number", {"pain_after": True}, "pain_after"),
    ("no-technique", {"technique": ""}, "technique"),
    ("reiki-is-not-a-technique", {"technique": "reiki"}, "technique"),
    ("no-sites-treated", {"sites": ()}, "sites"),
    ("knee-side-missing", {"sites": ("72696002",)}, "sites"),
    ("therapist-is-a-patient", {"performer_ref": "Patient/p1"}, "performer_ref"),
    ("order-is-not-a-servicerequest", {"order_ref": "CarePlan/x"}, "order_ref"),
]


@pytest.mark.parametrize("changes,field", [c[1:] for c in PROBLEM_CASES], ids=[c[0] for c in PROBLEM_CASES])
def test_session_problems(changes: dict[str, Any], field: str | None) -> None:
    problems = session_problems(note(**changes))
    if field is None:
        assert problems == {}
    else:
        assert field in problems, problems


# --- Procedure, Observations ---------------------------------------------------------------------------------------


def test_procedure_shape() -> None:
    proc = procedure(NOTE, NOW)
    valid(proc)
    # per technique (the conditional-create key) + the visit's shared identifier (changed with visit notes)
    assert proc["identifier"] == [{"system": SESSION_ID_SYSTEM, "value": "note-1:lymphatic-drainage"},
                                  {"system": VISIT_ID_SYSTEM, "value": "note-1"}]
    assert proc["basedOn"] == [{"reference": "ServiceRequest/sr1"}] and proc["status"] == "completed"
    assert [c["system"] for c in proc["code"]["coding"]] == [CPT, TECHNIQUE_SYSTEM]
    assert proc["performedPeriod"] == {"start": "2026-12-01T09:00:00Z", "end": "2026-12-01T09:45:00Z"}
    assert proc["performer"][0]["actor"] == {"reference": "PractitionerRole/lmt1"}
    assert proc["bodySite"][0]["text"] == "Left upper limb"
    assert proc["complication"] == [{"text": NOTE.adverse_events[0]}]
    assert proc["followUp"] == [{"text": NOTE.follow_up}] and proc["outcome"] == {"text": NOTE.response}
    texts = [n["text"] for n in proc["note"]]
    assert [t[:2] for t in texts[:4]] == ["S:", "O:", "A:", "P:"]
    assert "Light pressure; position: supine, arm elevated" in texts[4]


def test_not_done_procedure_says_why_and_when() -> None:
    proc = procedure(note(status="not-done", status_reason="Temperature 38.4 C", end=None), NOW)
    valid(proc)
    assert proc["statusReason"] == {"text": "Temperature 38.4 C"}
    assert proc["performedPeriod"] == {"start": "2026-12-01T09:00:00Z"}
    assert pain_observations(note(status="not-done", status_reason="x", end=None), "urn:uuid:p", now=NOW) == []


def test_pain_observations_before_and_after() -> None:
    before, after = pain_observations(NOTE, "urn:uuid:proc", now=NOW)
    for obs in (before, after):
        valid(obs)
        assert obs["code"]["coding"] == [PAIN_NRS] and obs["partOf"] == [{"reference": "urn:uuid:proc"}]
        assert obs["basedOn"] == [{"reference": "ServiceRequest/sr1"}] and obs["status"] == "final"
    assert (before["valueInteger"], before["effectiveDateTime"]) == (6, "2026-12-01T09:00:00Z")
    assert (after["valueInteger"], after["effectiveDateTime"]) == (3, "2026-12-01T09:45:00Z")
    assert before["note"] == [{"text": "Before the session"}] and after["note"] == [{"text": "After the session"}]
    assert len(pain_observations(note(pain_after=None), "urn:uuid:proc", now=NOW)) == 1


# --- the transaction ---------------------------------------------------------------------------------------------


def _task_entry(bundle: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in bundle["entry"] if e["request"]["method"] == "PUT"), None)


def test_session_transaction_updates_the_task_with_if_match() -> None:
    bundle = session_transaction(NOTE, task(), NOW, body_structures=True)
    problems = errors(validate_resource(bundle))
    assert not problems, "\n".join(map(str, problems))
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["BodyStructure", "Procedure", "Observation", "Observation", "Task", "Provenance"]
    assert bundle["entry"][-1]["request"]["method"] == "PUT"  # Provenance: update-as-create on a derived id
    for e in bundle["entry"]:
        if e["request"]["method"] == "POST":
            assert e["request"]["ifNoneExist"]
    put = _task_entry(bundle)
    assert put is not None and put["request"] == {"method": "PUT", "url": "Task/t1", "ifMatch": 'W/"3"'}
    updated = put["resource"]
    assert updated["status"] == "in-progress" and sessions_done(updated) == 1
    assert updated["businessStatus"]["text"] == "1 of 2 sessions done"
    assert session_recorded(updated, "note-1") and not session_recorded(task(), "note-1")
    assert updated["output"][0]["valueReference"]["reference"] == bundle["entry"][1]["fullUrl"]


def test_last_authorized_session_completes_the_task() -> None:
    once = _task_entry(session_transaction(NOTE, task(), NOW))["resource"]  # type: ignore[index]
    once["meta"]["versionId"] = "4"
    second = session_transaction(note(draft_id="note-2"), once, NOW)
    updated = _task_entry(second)["resource"]  # type: ignore[index]
    assert updated["status"] == "completed" and sessions_done(updated) == 2
    with pytest.raises(InvalidInput, match="All 2 authorized sessions"):
        session_transaction(note(draft_id="note-3"), {**updated, "status": "in-progress"}, NOW)
    with pytest.raises(InvalidInput, match="task is completed"):
        session_transaction(note(draft_id="note-3"), updated, NOW)


def test_not_done_session_is_listed_but_not_counted() -> None:
    bundle = session_transaction(note(status="not-done", status_reason="Fever", end=None), task(), NOW)
    updated = _task_entry(bundle)["resource"]  # type: ignore[index]
    assert sessions_done(updated) == 0 and updated["status"] == "ready" and len(updated["output"]) == 1
    assert [e["resource"]["resourceType"] for e in bundle["entry"]].count("Observation") == 0


def test_retry_with_a_task_that_already_has_the_session_leaves_it_alone() -> None:
    updated = _task_entry(session_transaction(NOTE, task(), NOW))["resource"]  # type: ignore[index]
    again = session_transaction(NOTE, {**updated, "meta": {"versionId": "4"}}, NOW)
    assert [e["request"]["url"] for e in again["entry"]] == ["Procedure", "Observation", "Observation",
                                                            again["entry"][-1]["request"]["url"]]
    assert again["entry"][-1]["request"]["url"].startswith("Provenance/")
    first = session_transaction(NOTE, task(), NOW)
    assert [e.get("fullUrl") for e in again["entry"][:3]] == [e.get("fullUrl") for e in first["entry"][:3]]


def test_task_version_and_identity_are_checked() -> None:
    with pytest.raises(InvalidInput, match="no version"):
        session_transaction(NOTE, task(meta={}), NOW)
    fallback = session_transaction(note(task_version="7"), task(meta={}), NOW)
    assert _task_entry(fallback)["request"]["ifMatch"] == 'W/"7"'  # type: ignore[index]
    with pytest.raises(InvalidInput, match="Task/other"):
        session_transaction(NOTE, task(id="other"), NOW)
    with pytest.raises(InvalidInput):
        session_transaction(note(pain_before=12), task(), NOW)


# --- one note per visit against the whole plan -------------------------------------------------------------------

PLAN_DRAFT = OrderDraft(
    draft_id="order-2", patient_ref="Patient/p1", requester_ref="PractitionerRole/dr1",
    techniques=("swedish", "myofascial-release"), sites=("37822005",), frequency=1, duration_weeks=2,
    session_minutes=45, authored=T0 - timedelta(days=2), reason_text="Chronic low back pain")
ORDERS = (VisitOrder("swedish", "ServiceRequest/sw", "Task/tsw"),
          VisitOrder("myofascial-release", "ServiceRequest/mfr", "Task/tmfr"))
VISIT = VisitNote(draft_id="visit-1", orders=ORDERS, patient_ref="Patient/p1", performer_ref="PractitionerRole/lmt1",
                  start=T0, end=T0 + timedelta(minutes=45), techniques=("swedish", "myofascial-release"),
                  sites=("37822005",), pressure="moderate", pain_before=6, pain_after=3,
                  subjective="Low back stiff.", response="Tolerated well.")


def plan_task(technique: str, task_id: str, order_ref: str, **changes: Any) -> dict[str, Any]:
    t = fulfillment_task(PLAN_DRAFT, order_ref=order_ref, now=T0, owner_ref="PractitionerRole/lmt1",
                         technique=technique)
    t.update({"id": task_id, "meta": {**t["meta"], "versionId": "1"}})
    t.update(changes)
    return t


def plan_tasks(**changes: Any) -> dict[str, dict[str, Any]]:
    return {o.task_ref: plan_task(o.technique, o.task_ref.split("/")[1], o.order_ref, **changes) for o in ORDERS}


def visit(**changes: Any) -> VisitNote:
    return dataclasses.replace(VISIT, **changes)


def _by_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_one_visit_two_techniques_is_one_transaction() -> None:
    bundle = visit_transaction(VISIT, plan_tasks(), NOW)
    problems = errors(validate_resource(bundle))
    assert not problems, "\n".join(map(str, problems))
    procs = _by_type(bundle, "Procedure")
    assert [p["resource"]["basedOn"] for p in procs] == [[{"reference": "ServiceRequest/sw"}],
                                                          [{"reference": "ServiceRequest/mfr"}]]
    for p in procs:
        valid(p["resource"])
        assert p["resource"]["performedPeriod"] == {"start": "2026-12-01T09:00:00Z", "end": "2026-12-01T09:45:00Z"}
        assert p["resource"]["identifier"][1] == {"system": VISIT_ID_SYSTEM, "value": "visit-1"}
        assert unquote(p["request"]["ifNoneExist"]) == f"identifier={SESSION_ID_SYSTEM}|" + \
            p["resource"]["identifier"][0]["value"]
    assert len({p["resource"]["identifier"][0]["value"] for p in procs}) == 2
    # pain once for the visit, part of both Procedures and based on both orders
    obs = _by_type(bundle, "Observation")
    assert [o["resource"]["valueInteger"] for o in obs] == [6, 3]
    for o in obs:
        valid(o["resource"])
        assert o["resource"]["partOf"] == [{"reference": p["fullUrl"]} for p in procs]
        assert o["resource"]["basedOn"] == [{"reference": "ServiceRequest/sw"}, {"reference": "ServiceRequest/mfr"}]
    puts = [e for e in bundle["entry"] if e["request"]["method"] == "PUT" and e["request"]["url"].startswith("Task/")]
    assert [(e["request"]["url"], e["request"]["ifMatch"]) for e in puts] == [("Task/tsw", 'W/"1"'),
                                                                           ("Task/tmfr", 'W/"1"')]
    for e, p in zip(puts, procs):
        assert sessions_done(e["resource"]) == 1 and e["resource"]["businessStatus"]["text"] == "1 of 2 sessions done"
        assert e["resource"]["output"][0]["valueReference"]["reference"] == p["fullUrl"]
        assert session_recorded(e["resource"], "visit-1")
    (prov,) = _by_type(bundle, "Provenance")
    assert len(prov["resource"]["target"]) == 2 + 2 + 2  # Procedures, Observations, Tasks


def test_only_the_techniques_used_are_written_and_counted() -> None:
    bundle = visit_transaction(visit(techniques=("swedish",)), plan_tasks(), NOW)
    assert [p["resource"]["basedOn"][0]["reference"] for p in _by_type(bundle, "Procedure")] == ["ServiceRequest/sw"]
    assert [e["request"]["url"] for e in _by_type(bundle, "Task")] == ["Task/tsw"]
    assert all(o["resource"]["basedOn"] == [{"reference": "ServiceRequest/sw"}]
               for o in _by_type(bundle, "Observation"))


VISIT_PROBLEMS = [
    ("two-ordered-techniques-fine", {}, None),
    ("no-technique-ticked", {"techniques": ()}, "techniques"),
    ("technique-not-ordered-is-refused", {"techniques": ("swedish", "trigger-point")}, "techniques"),
    ("unknown-technique", {"techniques": ("reiki",)}, "techniques"),
    ("minutes-for-an-unticked-technique", {"techniques": ("swedish",),
                                           "technique_minutes": (("myofascial-release", 10),)}, "minutes"),
    ("minutes-add-up-to-more-than-the-visit", {"technique_minutes": (("swedish", 30),
                                                                     ("myofascial-release", 20))}, "minutes"),
    ("not-done-ignores-ticks-but-needs-a-reason", {"status": "not-done", "end": None, "techniques": ()},
     "status_reason"),
    ("no-orders", {"orders": ()}, "orders"),
]


@pytest.mark.parametrize("changes,field", [c[1:] for c in VISIT_PROBLEMS], ids=[c[0] for c in VISIT_PROBLEMS])
def test_visit_problems(changes: dict[str, Any], field: str | None) -> None:
    problems = visit_problems(visit(**changes))
    if field is None:
        assert problems == {}
    else:
        assert field in problems, problems
    if field == "techniques" and "trigger-point" in changes.get("techniques", ()):
        assert "was not ordered in this plan" in problems["techniques"]


def test_visit_units_follow_the_total_minutes_across_codes() -> None:
    # 45 min in all = 3 units (8-minute rule on the total); 30 min of 97140 and the rest (15) of 97124
    split = visit(technique_minutes=(("myofascial-release", 30),))
    assert visit_cpt_minutes(split) == {"97140": 30, "97124": 15}
    assert visit_units(split) == {"97140": 2, "97124": 1}
    # without minutes per technique two codes cannot be split: no guess
    assert visit_cpt_minutes(VISIT) is None and visit_units(VISIT) == {}
    # one code (two techniques billed alike) takes all the minutes
    same_code = visit(orders=(VisitOrder("myofascial-release", "ServiceRequest/mfr", "Task/tmfr"),
                              VisitOrder("trigger-point", "ServiceRequest/tp", "Task/ttp")),
                      techniques=("myofascial-release", "trigger-point"))
    assert visit_units(same_code) == {"97140": 3}
    # the 33 + 7 CMS example through a visit
    cms = visit(end=T0 + timedelta(minutes=40), technique_minutes=(("myofascial-release", 33), ("swedish", 7)))
    assert visit_units(cms) == {"97140": 2, "97124": 1}


def test_not_done_visit_covers_every_open_order_and_counts_nothing() -> None:
    tasks = plan_tasks()
    bundle = visit_transaction(visit(status="not-done", status_reason="Fever", end=None, techniques=(),
                                     pain_before=None, pain_after=None), tasks, NOW)
    procs = _by_type(bundle, "Procedure")
    assert [p["resource"]["status"] for p in procs] == ["not-done", "not-done"]
    assert _by_type(bundle, "Observation") == []
    for e in _by_type(bundle, "Task"):
        assert sessions_done(e["resource"]) == 0 and e["resource"]["output"][0]["type"]["coding"][0]["code"] == \
            "session-not-done"
    # an order whose Task is finished is skipped by a not-done visit
    tasks["Task/tmfr"] = dict(tasks["Task/tmfr"], status="completed")
    bundle = visit_transaction(visit(status="not-done", status_reason="Fever", end=None), tasks, NOW)
    assert [e["request"]["url"] for e in _by_type(bundle, "Task")] == ["Task/tsw"]


def test_visit_retry_leaves_tasks_that_already_list_it_alone() -> None:
    tasks = plan_tasks()
    first = visit_transaction(VISIT, tasks, NOW)
    # the swedish Task took the visit (re-read after a 412), the myofascial one did not (someone else's change)
    sw = next(e["resource"] for e in _by_type(first, "Task") if e["request"]["url"] == "Task/tsw")
    again = visit_transaction(VISIT, {"Task/tsw": {**sw, "meta": {"versionId": "2"}},
                                      "Task/tmfr": {**tasks["Task/tmfr"], "meta": {"versionId": "5"}}}, NOW)
    assert [(e["request"]["url"], e["request"]["ifMatch"]) for e in _by_type(again, "Task")] == \
        [("Task/tmfr", 'W/"5"')]
    assert [e.get("fullUrl") for e in _by_type(again, "Procedure")] == [e.get("fullUrl")
                                                                        for e in _by_type(first, "Procedure")]
    assert sessions_done(sw) == 1 and session_recorded(sw, "visit-1") and not session_recorded(sw, "visit-10")


def test_visit_tasks_must_match_the_orders() -> None:
    with pytest.raises(InvalidInput, match="Task as read"):
        visit_transaction(VISIT, {"Task/tsw": plan_tasks()["Task/tsw"]}, NOW)
    with pytest.raises(InvalidInput, match="task is completed"):
        visit_transaction(VISIT, plan_tasks(status="completed"), NOW)
