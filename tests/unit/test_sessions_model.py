"""Pure parts of smart_app/sessions.py: reading orders and Tasks, the new-since-order re-screen, the note form,
message threads."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from fhir_massage.builders.detected_issue import RULE_IDENTIFIER_SYSTEM
from fhir_massage.builders.order import fulfillment_task, service_request
from fhir_massage.orders_model import OrderDraft
from fhir_massage.screening import Evidence, Finding, Screening, screen
from fhir_massage.chart import from_resources
from smart_app.sessions import (PlanSummary, default_fields, finding_message_text, group_orders, known_findings,
                                note_from_fields, order_summary, pair_orders_and_tasks, rescreen, site_choices,
                                site_key, thread, visit_minutes_and_units)

AUTHORED = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


def make_order(sites=("37822005", "30021000:left"), pressure="moderate", total_weeks=2, sr_id="o1", task_id="t1",
               findings=()):
    draft = OrderDraft(draft_id="d1", patient_ref="Patient/p1", requester_ref="Practitioner/dr", techniques=("swedish",),
                       sites=tuple(sites), frequency=1, duration_weeks=total_weeks, session_minutes=45,
                       authored=AUTHORED, pressure=pressure, notes="Be gentle.", reason_text="Low back pain",
                       positioning=("side-lying",))
    sr = dict(service_request(draft, findings_refs=list(findings), now=AUTHORED), id=sr_id)
    task = dict(fulfillment_task(draft, order_ref=f"ServiceRequest/{sr_id}", now=AUTHORED), id=task_id,
                meta={"versionId": "1"})
    return sr, task


@pytest.mark.parametrize("body_site,key", [
    ({"coding": [{"system": "http://snomed.info/sct", "code": "37822005"}], "text": "Lower back"}, "37822005"),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "30021000"}], "text": "Left lower leg"}, "30021000:left"),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "30021000"}], "text": "Right lower leg"}, "30021000:right"),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "30021000"}], "text": "Lower leg, both sides"},
     "30021000:bilateral"),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "30021000"}], "text": "Lower leg"}, None),  # side unknown
    ({"coding": [{"system": "http://example.org", "code": "30021000"}], "text": "Left lower leg"}, None),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "99999999"}]}, None),
    ({"text": "Back"}, None),
])
def test_site_key(body_site, key):
    assert site_key(body_site) == key


def test_order_summary_reads_what_the_order_builder_wrote():
    sr, task = make_order()
    o = order_summary(sr, task, {"Practitioner/dr": "Ada Grey"})
    assert (o.technique, o.sites, o.total, o.done, o.task_ref) == ("swedish", ("37822005", "30021000:left"), 2, 0,
                                                                   "Task/t1")
    assert o.pressure == "moderate" and o.requester_name == "Ada Grey"
    assert "Moderate pressure" in o.precautions and "side-lying" in o.precautions
    assert o.notes[0] == "Be gentle." and o.progress == "0 of 2 sessions done" and not o.all_done


def test_pairing_prefers_the_open_task_and_skips_other_orders():
    sr, task = make_order()
    closed = dict(task, id="t0", status="cancelled", lastModified="2026-11-25T00:00:00Z")
    other = {"resourceType": "ServiceRequest", "id": "x", "intent": "order",
             "code": {"coding": [{"system": "http://loinc.org", "code": "1-1"}]}}
    pairs = pair_orders_and_tasks([sr, closed, task, other])
    assert [(s["id"], t["id"]) for s, t in pairs] == [("o1", "t1")]
    assert pair_orders_and_tasks([sr])[0][1] is None


def finding(rule, cls="absolute", refs=("Condition/c1",), dates=None, applicable=True):
    ev = tuple(Evidence(ref=r, display=r, dates=dates or {}) for r in refs)
    return Finding(rule=rule, cls=cls, techniques=("swedish",), sites=(), evidence=tuple(refs), message=f"{rule} msg",
                   evidence_class="CONS", source="test", verified=True, details=ev, title=rule.upper())


def screening_of(*findings, applicable=()):
    return Screening(verdict="caution", findings=tuple(findings), needs_review=(), warnings=(), techniques=("swedish",),
                     sites=(), today=NOW.date(), patient="Patient/p1", kb_version="t", applicable=tuple(applicable))


def issue(di_id, rule, refs):
    return {"resourceType": "DetectedIssue", "id": di_id,
            "identifier": [{"system": "x", "value": "d1:0"}, {"system": RULE_IDENTIFIER_SYSTEM, "value": rule}],
            "evidence": [{"detail": [{"reference": r} for r in refs]}],
            "implicated": [{"reference": "ServiceRequest/o1"}] + [{"reference": r} for r in refs]}


def test_known_findings_only_from_the_orders_supporting_info():
    issues = [issue("di1", "anticoag", ["MedicationRequest/m1"]), issue("di2", "dvt", ["Condition/c1"])]
    assert known_findings(issues, ["DetectedIssue/di1"]) == {"anticoag": {"MedicationRequest/m1"}}


def test_rescreen_splits_new_and_known():
    sr, task = make_order(findings=["DetectedIssue/di1", "DetectedIssue/di2"])
    order = order_summary(sr, task)
    issues = [issue("di1", "anticoag", ["MedicationRequest/m1"]), issue("di2", "dvt", ["Condition/c1"])]
    known = finding("anticoag", "relative", ("MedicationRequest/m1",), {"authored": "2026-11-01"})
    dated_after = finding("fever", "absolute", ("Observation/t1",), {"effective": "2026-11-28"})
    not_signed = finding("pregnancy", "relative", ("Observation/p1",), {"effective": "2026-11-20"})  # same day
    new_evidence = finding("dvt", "absolute", ("Condition/c1", "Condition/c2"), {"onset": "2026-11-10"})
    result = rescreen(screening_of(known, dated_after, not_signed, new_evidence, applicable=("fever", "dvt")),
                      order, issues)
    new = {f.rule: why for f, why in result.new}
    assert set(new) == {"fever", "pregnancy", "dvt"}
    assert "Dated after the order (2026-11-20)" in new["fever"] and "effective 2026-11-28" in new["fever"]
    assert new["pregnancy"].startswith("Not among the findings")
    assert new["dvt"].startswith("The same concern on new evidence")
    assert [f.rule for f in result.known] == ["anticoag"]
    assert {f.rule for f in result.stop} == {"fever", "dvt"}
    assert [f.rule for f, _ in result.new][:2] in (["fever", "dvt"], ["dvt", "fever"])  # stops first
    assert not result.clear


def test_rescreen_with_nothing_new_is_clear():
    sr, task = make_order(findings=["DetectedIssue/di1"])
    known = finding("anticoag", "relative", ("MedicationRequest/m1",), {"authored": "2026-11-01"})
    result = rescreen(screening_of(known), order_summary(sr, task),
                      [issue("di1", "anticoag", ["MedicationRequest/m1"])])
    assert result.clear and result.new == () and result.stop == ()


def test_rescreen_with_the_real_engine_flags_a_fever_after_the_order():
    sr, task = make_order()
    order = order_summary(sr, task)
    chart = from_resources([
        {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01", "gender": "female"},
        {"resourceType": "Observation", "id": "temp", "status": "final", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
         "effectiveDateTime": "2026-11-28T08:00:00Z",
         "valueQuantity": {"value": 38.9, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}},
    ])
    s = screen(chart, techniques=[order.technique], sites=list(order.sites), today=date(2026, 11, 28))
    result = rescreen(s, order, [])
    assert result.stop and result.new
    assert any("Observation/temp" in f.evidence for f in result.stop)
    text = finding_message_text(result.stop, order, date(2026, 11, 28))
    assert "38.9" in text and "I have not given the session as ordered" in text


def test_rescreen_shows_a_product_allergy_as_information_never_new_or_stop():
    # the therapist must know of a latex allergy (gloves, oils) even when the order says nothing about it; it is
    # information, so the re-screen stays clear and nothing asks the physician
    sr, task = make_order()
    order = order_summary(sr, task)
    chart = from_resources([
        {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01", "gender": "female"},
        {"resourceType": "AllergyIntolerance", "id": "latex", "patient": {"reference": "Patient/p1"},
         "recordedDate": "2026-11-27",
         "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": "Latex"}},
    ])
    s = screen(chart, techniques=[order.technique], sites=list(order.sites), today=date(2026, 11, 28))
    result = rescreen(s, order, [])
    assert [f.rule for f in result.information] == ["allergy-massage-product"]
    assert result.new == () and result.stop == () and result.known == () and result.clear
    assert result.information[0].evidence == ("AllergyIntolerance/latex",)


BASE_FIELDS = {"status": "completed", "techniques": ["swedish"], "sites": ["37822005"], "date": "2026-11-28",
               "start": "09:00", "end": "09:38", "tz": "0", "pain_before": "6", "pain_after": "2"}


def note(fields, **kw):
    sr, task = make_order(**kw)
    return note_from_fields(fields, draft_id="3f1d8c7e-1111-4222-8333-444455556666", plan=order_summary(sr, task),
                            patient_ref="Patient/p1", performer_ref="Practitioner/lmt", now=NOW)


def test_note_from_a_complete_form():
    n, problems = note(BASE_FIELDS)
    assert problems == {}
    assert n.minutes == 38 and n.pain_before == 6 and n.pain_after == 2
    assert [(o.technique, o.order_ref, o.task_ref) for o in n.orders] == [("swedish", "ServiceRequest/o1", "Task/t1")]
    assert n.techniques == ("swedish",)
    assert n.start == datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)


def test_browser_time_zone_is_used():
    n, problems = note(dict(BASE_FIELDS, tz="-300"))  # UTC-05:00, sent by sessions.js as minutes east
    assert problems == {} and n.start.astimezone(timezone.utc) == datetime(2026, 11, 28, 14, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("change,field,words", [
    ({"start": ""}, "start", "When did the session start?"),
    ({"end": "9:99"}, "end", "HH:MM"),
    ({"end": "08:59"}, "end", "must end after it starts"),
    ({"pain_after": "11"}, "pain_after", "0 (no pain) to 10"),
    ({"pain_before": "-1"}, "pain_before", "0 (no pain) to 10"),
    ({"sites": []}, "sites", "Say which body sites"),
    ({"sites": ["30021000"]}, "sites", "Say which side"),
    ({"date": "28/11/2026"}, "date", "YYYY-MM-DD"),
    ({"tz": "abc"}, "tz", "time zone"),
    ({"techniques": ["reiki"]}, "techniques", "Unknown technique"),
    ({"techniques": ["swedish", "trigger-point"]}, "techniques", "was not ordered in this plan"),
    ({"techniques": []}, "techniques", "Tick the techniques you used"),
    ({"minutes_swedish": "ten"}, "minutes", "whole numbers"),
    ({"minutes_swedish": "50"}, "minutes", "more than the 38-minute visit"),
    ({"pressure": "crushing"}, "pressure", "Pressure is one of"),
    ({"status": "not-done"}, "status_reason", "Say why the session was not done."),
])
def test_form_problems_by_field(change, field, words):
    _, problems = note(dict(BASE_FIELDS, **change))
    assert field in problems and words in problems[field], problems


def test_not_done_needs_no_times_and_keeps_no_end():
    n, problems = note({"status": "not-done", "status_reason": "Fever", "date": "2026-11-28", "techniques": []})
    assert problems == {} and n.end is None and n.start.date() == date(2026, 11, 28)


def test_all_sessions_done_is_a_problem():
    sr, task = make_order(total_weeks=1)
    task["output"] = [{"type": {"coding": [{"system": "https://fhir-massage.dev/fhir/CodeSystem/massage-task-io",
                                            "code": "session"}]}, "valueReference": {"reference": "Procedure/1"}}]
    _, problems = note_from_fields(BASE_FIELDS, draft_id="d", plan=order_summary(sr, task), patient_ref="Patient/p1",
                                   performer_ref="Practitioner/lmt", now=NOW)
    assert "All 1 ordered sessions are documented" in problems["order"]


def test_site_choices_put_the_ordered_sites_first_and_offer_sides():
    choices = site_choices(["30021000:left"])
    assert choices[0] == ("30021000:left", "Left lower leg", True)
    keys = [k for k, _, _ in choices]
    assert "30021000:right" in keys and "30021000:bilateral" in keys and "30021000" not in keys
    assert "37822005" in keys and len(keys) == len(set(keys))


def msg(mid, sender, sent, text, reply_to=None, order="ServiceRequest/o1"):
    c = {"resourceType": "Communication", "id": mid, "basedOn": [{"reference": order}], "sender": {"reference": sender},
         "sent": sent, "payload": [{"contentString": text}],
         "category": [{"coding": [{"system": "x", "code": "progress"}]}]}
    if reply_to:
        c["inResponseTo"] = [{"reference": f"Communication/{reply_to}"}]
    return c


def test_thread_nests_replies_under_what_they_answer():
    comms = [msg("b", "Practitioner/dr", "2026-11-27T10:00:00Z", "Reply", reply_to="a"),
             msg("a", "Practitioner/lmt", "2026-11-27T09:00:00Z", "First"),
             msg("c", "Practitioner/lmt", "2026-11-27T11:00:00Z", "Second"),
             msg("d", "Practitioner/lmt", "2026-11-27T12:00:00Z", "Reply to a missing one", reply_to="zz"),
             msg("e", "Practitioner/lmt", "2026-11-27T12:00:00Z", "Other order", order="ServiceRequest/o2")]
    out = thread(comms, order_ref="ServiceRequest/o1", me="Practitioner/lmt", names={"Practitioner/dr": "Ada Grey"})
    assert [(m.text, m.depth) for m in out] == [("First", 0), ("Reply", 1), ("Second", 0),
                                                ("Reply to a missing one", 0)]
    assert out[1].sender_name == "Ada Grey" and out[0].mine and not out[1].mine


class FakeClient:
    def __init__(self, tasks):
        self.tasks = tasks
        self.searches = []

    def search_all(self, rtype, params):
        self.searches.append((rtype, params))
        return self.tasks


def test_tasks_missing_from_a_revinclude_are_searched_once():
    from smart_app.sessions import with_missing_tasks

    sr, task = make_order()
    client = FakeClient([task])
    pairs = with_missing_tasks(client, pair_orders_and_tasks([sr]), [sr])
    assert pairs[0][1]["id"] == "t1" and client.searches == [("Task", [("focus", "ServiceRequest/o1")])]
    client = FakeClient([])
    assert with_missing_tasks(client, pair_orders_and_tasks([sr, task]), [sr, task])[0][1]["id"] == "t1"
    assert client.searches == []  # nothing missing, no request


# --- one note per visit against the plan -------------------------------------------------------------------------


def make_plan(techniques=("swedish", "myofascial-release"), draft_id="plan-1", weeks=2):
    """The orders of one requisition as order_transaction writes them (one ServiceRequest + Task per technique)."""
    draft = OrderDraft(draft_id=draft_id, patient_ref="Patient/p1", requester_ref="Practitioner/dr",
                       techniques=tuple(techniques), sites=("37822005",), frequency=1, duration_weeks=weeks,
                       session_minutes=45, authored=AUTHORED, pressure="moderate", reason_text="Low back pain")
    out = []
    for t in techniques:
        sr = dict(service_request(draft, findings_refs=[], now=AUTHORED, technique=t), id=f"{draft_id}-{t}")
        task = dict(fulfillment_task(draft, order_ref=f"ServiceRequest/{sr['id']}", now=AUTHORED, technique=t),
                    id=f"task-{draft_id}-{t}", meta={"versionId": "1"})
        out += [sr, task]
    return out


def session_output(visit_id, technique, kind="session"):
    return {"type": {"coding": [{"system": "https://fhir-massage.dev/fhir/CodeSystem/massage-task-io", "code": kind}]},
            "valueReference": {"reference": f"Procedure/{visit_id}-{technique}",
                               "identifier": {"system": "https://fhir-massage.dev/fhir/identifier/session-draft",
                                              "value": f"{visit_id}:{technique}"}}}


def test_orders_of_one_requisition_are_one_plan():
    found = make_plan() + make_plan(("lymphatic-drainage",), draft_id="plan-2")
    plans = group_orders(pair_orders_and_tasks(found))
    assert sorted(len(p.orders) for p in plans) == [1, 2]
    plan = next(p for p in plans if len(p.orders) == 2)
    assert plan.techniques == ("swedish", "myofascial-release") and plan.key == "plan-1"
    assert plan.technique_label == "Swedish massage + Myofascial release" and plan.sites == ("37822005",)
    assert plan.refs == ("ServiceRequest/plan-1-swedish", "ServiceRequest/plan-1-myofascial-release")
    assert default_fields(plan, NOW)["techniques"] == ["swedish", "myofascial-release"]


def test_a_visit_counts_once_for_the_plan_and_per_technique_details_stay():
    found = make_plan()
    sw = next(r for r in found if r.get("id") == "task-plan-1-swedish")
    mfr = next(r for r in found if r.get("id") == "task-plan-1-myofascial-release")
    sw["output"] = [session_output("v1", "swedish"), session_output("v2", "swedish")]
    mfr["output"] = [session_output("v1", "myofascial-release"), session_output("v3", "swedish", "session-not-done")]
    (plan,) = group_orders(pair_orders_and_tasks(found))
    assert plan.done == 2 and plan.total == 2 and plan.progress == "2 of 2 sessions done"  # v1 (both) + v2
    assert [(o.technique, words) for o, words in plan.technique_rows()] == [("swedish", "2 of 2"),
                                                                             ("myofascial-release", "1 of 2")]
    # swedish is used up; myofascial release can still be given (and is the only one ticked for a new note)
    assert plan.open_techniques == ("myofascial-release",) and not plan.all_done
    assert default_fields(plan, NOW)["techniques"] == ["myofascial-release"]
    _, problems = note_from_fields(dict(BASE_FIELDS, techniques=["swedish", "myofascial-release"]), draft_id="d",
                                   plan=plan, patient_ref="Patient/p1", performer_ref="Practitioner/lmt", now=NOW)
    assert "Swedish massage: all 2 ordered sessions are documented" in problems["techniques"]


def test_visit_note_from_the_plan_form_and_its_units():
    (plan,) = group_orders(pair_orders_and_tasks(make_plan()))
    fields = dict(BASE_FIELDS, techniques=["swedish", "myofascial-release"], end="09:45")
    n, problems = note_from_fields(fields, draft_id="d", plan=plan, patient_ref="Patient/p1",
                                   performer_ref="Practitioner/lmt", now=NOW)
    assert problems == {} and n.techniques == ("swedish", "myofascial-release") and n.minutes == 45
    assert [o.task_ref for o in n.used_orders()] == ["Task/task-plan-1-swedish", "Task/task-plan-1-myofascial-release"]
    units = visit_minutes_and_units(n)
    assert (units.minutes, units.units, units.per_code) == (45, 3, None)  # two codes, no minutes to split them
    assert "97124 + 97140: give the minutes per technique" in units.text
    n, problems = note_from_fields(dict(fields, minutes_myofascial_release="30"), draft_id="d", plan=plan,
                                   patient_ref="Patient/p1", performer_ref="Practitioner/lmt", now=NOW)
    assert problems == {} and visit_minutes_and_units(n).text == "45 min · 3 CPT units: 97124 × 1, 97140 × 2"
    # not done: the whole visit, every order of the plan
    n, problems = note_from_fields({"status": "not-done", "status_reason": "Fever", "date": "2026-11-28"},
                                   draft_id="d", plan=plan, patient_ref="Patient/p1",
                                   performer_ref="Practitioner/lmt", now=NOW)
    assert problems == {} and len(n.used_orders()) == 2


def test_rescreen_and_thread_cover_the_whole_plan():
    (plan,) = group_orders(pair_orders_and_tasks(make_plan()))
    assert isinstance(plan, PlanSummary)
    comms = [msg("a", "Practitioner/lmt", "2026-11-27T09:00:00Z", "About swedish",
                 order="ServiceRequest/plan-1-swedish"),
             msg("b", "Practitioner/dr", "2026-11-27T10:00:00Z", "About MFR", reply_to="a",
                 order="ServiceRequest/plan-1-myofascial-release"),
             msg("c", "Practitioner/lmt", "2026-11-27T11:00:00Z", "Other plan", order="ServiceRequest/zz")]
    assert [m.text for m in thread(comms, order_ref=plan.refs, me="Practitioner/lmt")] == ["About swedish",
                                                                                          "About MFR"]
    text = finding_message_text([], plan, date(2026, 11, 28))
    assert "swedish massage + myofascial release session" in text
