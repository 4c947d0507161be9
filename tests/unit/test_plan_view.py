"""Pure parts of the plan area: plans grouped by requisition, sites read back for the re-screen, findings new since
signing, open findings, the field-by-field version comparison, the Task following a new schedule, and the change
transaction (If-Match on every order and Task). One row per case, the reason in the id."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from fhir_massage.builders.detected_issue import RULE_IDENTIFIER_SYSTEM
from fhir_massage.builders.order import REQUISITION_ID_SYSTEM, fulfillment_task, service_request
from fhir_massage.chart import from_resources
from fhir_massage.coordination import plan_rows
from fhir_massage.errors import InvalidInput
from fhir_massage.orders_model import OrderDraft, Schedule
from fhir_massage.plan_view import (describe_order, group_plans, new_findings, open_issues, order_sites,
                                    recorded_issues, requisition_of, task_follow_schedule, version_diff)
from fhir_massage.screening import screen
from smart_app.plan import Change, apply_change, change_transaction

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
TODAY = NOW.date()


def draft(draft_id="d1", techniques=("swedish",), sites=("52612000",), frequency=2, weeks=6):
    return OrderDraft(draft_id=draft_id, patient_ref="Patient/p1", requester_ref="Practitioner/dr",
                      techniques=techniques, sites=sites, frequency=frequency, duration_weeks=weeks,
                      session_minutes=45, authored=NOW - timedelta(days=14), reason_text="Low back pain")


def orders_of(d: OrderDraft, start_id: int = 1, supporting=()) -> list[dict]:
    out = []
    for i, t in enumerate(d.techniques):
        sr = service_request(d, findings_refs=list(supporting), now=NOW, technique=t)
        sr.update(id=f"sr{start_id + i}", meta={**sr["meta"], "versionId": "1"})
        out.append(sr)
    return out


def task_for(d: OrderDraft, sr: dict, status="in-progress") -> dict:
    t = fulfillment_task(d, order_ref=f"ServiceRequest/{sr['id']}", now=NOW,
                         technique=next(c["code"] for c in sr["code"]["coding"] if "technique" in c["system"]))
    t.update(id=f"t-{sr['id']}", status=status, meta={"versionId": "3"})
    return t


# --- grouping ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requisitions, expected_groups", [
    pytest.param([("d1", 2)], [2], id="two techniques signed together are one plan"),
    pytest.param([("d1", 1), ("d2", 1)], [1, 1], id="two drafts are two plans"),
    pytest.param([("d1", 3), ("d2", 2)], [3, 2], id="sizes follow the drafts"),
])
def test_orders_of_one_requisition_are_one_plan(requisitions, expected_groups):
    techs = ("swedish", "myofascial-release", "stretching")
    srs, n = [], 1
    for did, k in requisitions:
        srs += orders_of(draft(did, techniques=techs[:k]), n)
        n += k
    rows = plan_rows(srs, today=TODAY)
    groups = group_plans(srs, rows)
    assert sorted(len(g.rows) for g in groups) == sorted(expected_groups)
    for g in groups:
        assert g.key in {d for d, _ in requisitions}
        assert len(set(g.techniques)) == len(g.rows)


def test_an_order_without_requisition_is_its_own_plan_and_foreign_systems_do_not_merge():
    a, b, c = orders_of(draft("x", techniques=("swedish", "stretching", "myofascial-release")))
    del a["requisition"]
    b["requisition"] = {"system": "urn:other", "value": "x"}
    groups = group_plans([a, b, c], plan_rows([a, b, c], today=TODAY))
    assert sorted(g.key for g in groups) == sorted(["ServiceRequest/sr1", "urn:other|x", "x"])
    assert requisition_of(c) == "x" and requisition_of({"requisition": {"system": REQUISITION_ID_SYSTEM}}) is None


def test_another_apps_procedures_of_one_visit_start_together_and_count_once():
    # (was: "the plan's count is its most documented technique"; now counted in visits, see the next test)
    d = draft(techniques=("swedish", "stretching"))
    srs = orders_of(d)
    procs, obs = [], []
    for i, sr in enumerate(srs):
        for day in (3, 6):
            pid = f"proc-{i}-{day}"
            start = NOW - timedelta(days=14 - day)
            procs.append({"resourceType": "Procedure", "id": pid, "status": "completed",
                          "basedOn": [{"reference": f"ServiceRequest/{sr['id']}"}],
                          "performedPeriod": {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat()}})
            for which, v in (("before", 6), ("after", 3)):
                obs.append({"resourceType": "Observation", "id": f"{pid}-{which}", "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
                            "partOf": [{"reference": f"Procedure/{pid}"}], "valueInteger": v,
                            "note": [{"text": f"{which.capitalize()} the session"}]})
    (g,) = group_plans(srs, plan_rows(srs, [], procs, obs, today=TODAY))
    assert (g.sessions_done, g.sessions_planned) == (2, 12)
    assert [(p.before, p.after) for p in g.pain.points] == [(6, 3), (6, 3)]  # two visits, not four
    assert g.technique_visits == (("swedish", 2), ("stretching", 2))


def _visit_procs(srs, visits):
    """Procedures as builders.session writes a visit: one per technique used, a shared session-visit identifier,
    the pain Observations once, partOf all of them."""
    from fhir_massage.builders.session import SESSION_ID_SYSTEM, VISIT_ID_SYSTEM
    by_tech = {next(c["code"] for c in sr["code"]["coding"] if c["system"].endswith("massage-technique")): sr
               for sr in srs}
    procs, obs = [], []
    for vid, (day, techniques, status, pain) in visits.items():
        start = NOW - timedelta(days=14 - day)
        ids = []
        for t in techniques:
            pid = f"{vid}-{t}"
            ids.append(pid)
            proc = {"resourceType": "Procedure", "id": pid, "status": status,
                    "identifier": [{"system": SESSION_ID_SYSTEM, "value": f"{vid}:{t}"},
                                   {"system": VISIT_ID_SYSTEM, "value": vid}],
                    "basedOn": [{"reference": f"ServiceRequest/{by_tech[t]['id']}"}],
                    "performedPeriod": {"start": start.isoformat()}}
            if status == "completed":
                proc["performedPeriod"]["end"] = (start + timedelta(minutes=45 + len(techniques))).isoformat()
            else:
                proc["statusReason"] = {"text": "Patient cancelled: flu"}
            procs.append(proc)
        for which, v in zip(("before", "after"), pain or ()):
            obs.append({"resourceType": "Observation", "id": f"{vid}-{which}", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
                        "partOf": [{"reference": f"Procedure/{pid}"} for pid in ids], "valueInteger": v,
                        "note": [{"text": f"{which.capitalize()} the session"}]})
    return procs, obs


def test_plan_counts_visits_not_techniques_and_keeps_each_techniques_count():
    d = draft(techniques=("swedish", "myofascial-release"), frequency=2, weeks=6)
    srs = orders_of(d)
    procs, obs = _visit_procs(srs, {
        "v1": (1, ("swedish", "myofascial-release"), "completed", (7, 4)),
        "v2": (4, ("swedish", "myofascial-release"), "completed", (6, 4)),
        "v3": (8, ("swedish",), "completed", (5, 3)),
        "v4": (11, ("myofascial-release",), "completed", (4, 2)),
        "v5": (13, ("swedish", "myofascial-release"), "not-done", None),
    })
    rows = plan_rows(srs, [], procs, obs, today=TODAY)
    (g,) = group_plans(srs, rows)
    # 4 visits; the old "most documented technique" count said 3, per technique 3 and 3
    assert (g.sessions_done, g.sessions_planned) == (4, 12)
    assert sorted(r.sessions_done for r in g.rows) == [3, 3]
    assert g.technique_visits == (("swedish", 3), ("myofascial-release", 3))
    # adherence per plan: 4 visits of 2/week x 2 weeks = 4 expected by now
    assert g.expected_sessions == pytest.approx(4.0) and g.adherence == pytest.approx(1.0)
    # one pain point per visit even though each score is partOf two Procedures
    assert [(p.before, p.after) for p in g.pain.points] == [(7, 4), (6, 4), (5, 3), (4, 2)]
    assert g.pain.change == -3 and g.pain.clinically_important
    # a not-done visit of two techniques is one not-done session
    assert [n.reason for n in g.not_done] == ["Patient cancelled: flu"]
    assert g.last_session == TODAY - timedelta(days=3)


def test_a_lagging_technique_is_not_a_missed_session():
    from fhir_massage.coordination import attention
    d = draft(techniques=("swedish", "myofascial-release"), frequency=2, weeks=6)
    srs = orders_of(d)
    procs, obs = _visit_procs(srs, {f"v{i}": (day, ("swedish",) if i % 2 else ("swedish", "myofascial-release"),
                                              "completed", None) for i, day in enumerate((1, 4, 8, 11))})
    rows = plan_rows(srs, [], procs, obs, today=TODAY)
    (g,) = group_plans(srs, rows)
    assert g.adherence == pytest.approx(1.0) and g.technique_visits == (("swedish", 4), ("myofascial-release", 2))
    assert not [r for a in attention(rows) for r in a.reasons if "adherence" in r.lower()]


# --- sites ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sites, expected", [
    pytest.param(("52612000",), ("52612000",), id="a site without sides"),
    pytest.param(("53120007:left",), ("53120007:left",), id="left from 'Left ...'"),
    pytest.param(("53120007:right",), ("53120007:right",), id="right from 'Right ...'"),
    pytest.param(("53120007:bilateral",), ("53120007:bilateral",), id="both sides from ', both sides'"),
    pytest.param(("53120007:left", "52612000"), ("53120007:left", "52612000"), id="several, in order"),
])
def test_order_sites_read_back_what_the_order_builder_wrote(sites, expected):
    (sr,) = orders_of(draft(sites=sites))
    assert order_sites(sr) == expected


def test_order_sites_forgive_odd_data():
    sr = {"bodySite": [{"text": "somewhere"}, {"coding": [{"system": "http://snomed.info/sct", "code": "53120007"}]},
                       "junk", {"coding": [{"system": "urn:x", "code": "1"}]}]}
    assert order_sites(sr) == ("53120007",)  # unknown side -> no side -> screening reads both sides


# --- findings new since signing -----------------------------------------------------------------------------------

PATIENT = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01", "gender": "male"}


def fever(oid="t1", value=38.9):
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]}, "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2026-11-20",
            "valueQuantity": {"value": value, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}


FRACTURE_ARM = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S52.501A"}]},
                "onsetDateTime": "2026-11-18"}


def recorded(rule, refs, *, implicated="ServiceRequest/sr1", mitigated=False, status="final", rid="di1"):
    out = {"resourceType": "DetectedIssue", "id": rid, "status": status, "severity": "high",
           "identifier": [{"system": RULE_IDENTIFIER_SYSTEM, "value": rule}],
           "implicated": [{"reference": implicated}] + [{"reference": r} for r in refs],
           "detail": f"{rule} recorded"}
    if mitigated:
        out["mitigation"] = [{"action": {"text": "Reviewed"}}]
    return out


@pytest.mark.parametrize("chart, issues, expected", [
    pytest.param([fever()], [], ["temperature-high"], id="fever after signing is new"),
    pytest.param([fever()], [recorded("temperature-high", ["Observation/t1"])], [],
                 id="the same fever recorded with the order is not new"),
    pytest.param([fever(), fever("t2", 39.4)], [recorded("temperature-high", ["Observation/t1"])],
                 ["temperature-high"], id="a second high reading is new evidence"),
    pytest.param([fever()], [recorded("temperature-high", ["Observation/t1"], implicated="ServiceRequest/other")],
                 ["temperature-high"], id="recorded with another order does not count"),
    pytest.param([fever()], [recorded("temperature-high", ["Observation/t1"], status="entered-in-error")],
                 ["temperature-high"], id="an entered-in-error record does not count"),
    pytest.param([FRACTURE_ARM], [], [], id="a finding at a site the plan does not treat does not apply"),
    pytest.param([], [], [], id="nothing in the chart"),
])
def test_new_findings_since_signing(chart, issues, expected):
    (sr,) = orders_of(draft())
    s = screen(from_resources([PATIENT, *chart]), techniques=["swedish"], sites=order_sites(sr), today=TODAY)
    found = new_findings(s, recorded_issues([sr], issues), patient_ref="Patient/p1", order_refs=["ServiceRequest/sr1"],
                         now=NOW)
    assert [f["_rule"] for f in found] == expected
    for f in found:  # the shape coordination.attention reads: implicates the plan's orders first
        assert f["implicated"][0] == {"reference": "ServiceRequest/sr1"} and f["status"] == "preliminary"


def test_recorded_via_supporting_info_and_open_issues():
    (sr,) = orders_of(draft(), supporting=["DetectedIssue/di9"])
    issues = [recorded("a", [], implicated="ServiceRequest/x", rid="di9"),
              recorded("b", [], rid="di2", mitigated=True),
              {**recorded("c", [], rid="di3"), "severity": "low"},
              recorded("d", [], implicated="ServiceRequest/elsewhere", rid="di4")]
    rec = recorded_issues([sr], issues)
    assert sorted(i["id"] for i in rec) == ["di2", "di3", "di9"]
    assert [i.ref for i in open_issues(rec)] == ["DetectedIssue/di9", "DetectedIssue/di3"]  # high first, no mitigated


# --- versions -----------------------------------------------------------------------------------------------------


def test_version_diff_marks_what_someone_else_changed():
    (seen,) = orders_of(draft())
    wanted = apply_change(Change("revoke", "Duplicate", None, {}, None, None), seen, author_ref="Practitioner/dr",
                          now=NOW)
    current = {**seen, "status": "on-hold", "note": seen.get("note", []) + [{"text": "On hold: by someone"}],
               "meta": {"versionId": "2"}}
    rows = {r.field: r for r in version_diff(seen, wanted, current)}
    assert rows["Status"].wanted == "revoked" and rows["Status"].current == "on-hold"
    assert rows["Status"].they_changed and rows["Status"].differs
    assert not rows["Schedule"].they_changed and not rows["Schedule"].differs
    assert "Revoked: Duplicate" in rows["Notes"].wanted and "On hold: by someone" in rows["Notes"].current


@pytest.mark.parametrize("resource", [None, {}, {"resourceType": "ServiceRequest", "code": "odd", "bodySite": [1]}])
def test_describe_order_is_forgiving(resource):
    assert isinstance(describe_order(resource), dict)


# --- the change transaction -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("action, statuses, changed, task_status", [
    pytest.param("hold", ["active", "active"], 2, "on-hold", id="hold puts every active order and its Task on hold"),
    pytest.param("hold", ["active", "on-hold"], 1, "on-hold", id="an order already on hold is left alone"),
    pytest.param("resume", ["on-hold", "on-hold"], 2, "in-progress", id="resume: Task back in progress"),
    pytest.param("revoke", ["active", "on-hold"], 2, "cancelled", id="revoke: Task cancelled"),
    pytest.param("complete", ["active", "completed"], 1, "completed", id="complete skips a finished order"),
])
def test_change_transaction_if_match_on_orders_and_tasks(action, statuses, changed, task_status):
    d = draft(techniques=("swedish", "stretching"))
    srs = orders_of(d)
    for sr, st in zip(srs, statuses):
        sr["status"] = st
    tasks = {f"ServiceRequest/{sr['id']}": task_for(d, sr, "on-hold" if sr["status"] == "on-hold" else "in-progress")
             for sr in srs}
    for t in tasks.values():  # a session was done: resume goes back to in-progress
        t["output"] = [{"type": {"coding": [{"system": "https://fhir-massage.dev/fhir/CodeSystem/massage-task-io",
                                             "code": "session"}]}, "valueReference": {"reference": "Procedure/p"}}]
    bundle = change_transaction(Change(action, "why", None, {}, None, None), srs, tasks,
                                {"sr1": "1", "sr2": "1"}, author_ref="Practitioner/dr", now=NOW)
    puts = [e for e in bundle["entry"] if e["request"]["method"] == "PUT" and "Provenance" not in e["request"]["url"]]
    orders = [e for e in puts if e["request"]["url"].startswith("ServiceRequest/")]
    task_puts = [e for e in puts if e["request"]["url"].startswith("Task/")]
    assert len(orders) == changed and len(task_puts) == changed
    assert all(e["request"]["ifMatch"] == 'W/"1"' for e in orders)
    assert all(e["request"]["ifMatch"] == 'W/"3"' for e in task_puts)
    assert {e["resource"]["status"] for e in task_puts} == {task_status}
    prov = bundle["entry"][-1]
    assert prov["resource"]["resourceType"] == "Provenance" and prov["resource"]["activity"]["coding"][0]["code"] == "UPDATE"
    assert len(prov["resource"]["target"]) == 2 * changed


def test_change_transaction_refuses_nothing_to_do_and_a_missing_version():
    srs = orders_of(draft())
    with pytest.raises(InvalidInput, match="No order of this plan is on hold"):
        change_transaction(Change("resume", "", None, {}, None, None), srs, {}, {"sr1": "1"},
                           author_ref="Practitioner/dr", now=NOW)
    with pytest.raises(InvalidInput, match="which version"):
        change_transaction(Change("hold", "", None, {}, None, None), srs, {}, {}, author_ref="Practitioner/dr",
                           now=NOW)
    same = Change("modify", "", None, {}, order_sites(srs[0]), Schedule(2, 6, 45))
    with pytest.raises(InvalidInput, match="Nothing was changed"):
        change_transaction(same, srs, {}, {"sr1": "1"}, author_ref="Practitioner/dr", now=NOW)


def test_modify_changes_the_schedule_and_the_task_follows_only_one_order_when_asked():
    d = draft(techniques=("swedish", "stretching"))
    srs = orders_of(d)
    tasks = {f"ServiceRequest/{sr['id']}": task_for(d, sr) for sr in srs}
    change = Change("modify", "shorter", "sr2", {}, order_sites(srs[0]), Schedule(1, 4, 30))
    bundle = change_transaction(change, srs, tasks, {"sr1": "1", "sr2": "1"}, author_ref="Practitioner/dr", now=NOW)
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert urls[:2] == ["ServiceRequest/sr2", "Task/t-sr2"]
    task = bundle["entry"][1]["resource"]
    assert task["restriction"]["repetitions"] == 4 and task["businessStatus"]["text"] == "0 of 4 sessions done"
    assert bundle["entry"][0]["resource"]["quantityQuantity"]["value"] == 4
    # the form fields round-trip (the conflict page re-posts them)
    assert ("order", "sr2") in change.fields() and ("frequency", "1") in change.fields()


@pytest.mark.parametrize("status, expected_none", [("completed", True), ("cancelled", True), ("in-progress", False)])
def test_task_follow_schedule_leaves_finished_tasks(status, expected_none):
    d = draft()
    (sr,) = orders_of(d)
    t = task_for(d, sr, status)
    assert (task_follow_schedule(t, Schedule(3, 2, 30), "swedish", now=NOW) is None) is expected_none
    # the same schedule again changes nothing
    same = task_follow_schedule(task_for(d, sr), Schedule(2, 6, 45), "swedish", now=NOW)
    assert same is None


def test_today_is_a_date():
    assert isinstance(TODAY, date)


@pytest.mark.parametrize("acting, refs, covering", [
    pytest.param("Practitioner/dr", None, False, id="the ordering physician: no covering note"),
    pytest.param("PractitionerRole/dr-role", ["PractitionerRole/dr-role", "Practitioner/dr"], False,
                 id="the ordering physician under one of their roles: no covering note"),
    pytest.param("Practitioner/cover", None, True, id="a covering physician: noted, requester unchanged"),
    pytest.param("PractitionerRole/dr-role", None, True,
                 id="a role not known to be the requester's counts as someone else (said, never hidden)"),
])
def test_a_change_by_someone_other_than_the_requester_is_recorded_plainly(acting, refs, covering):
    d = draft()
    srs = orders_of(d)
    for action, change in (("hold", Change("hold", "", None, {}, None, None)),
                           ("modify", Change("modify", "Shorter", None, {}, order_sites(srs[0]), Schedule(1, 4, 30)))):
        bundle = change_transaction(change, srs, {}, {"sr1": "1"}, author_ref=acting, now=NOW, physician_refs=refs)
        sr = bundle["entry"][0]["resource"]
        assert sr["requester"] == srs[0]["requester"] == {"reference": "Practitioner/dr"}
        notes = [n for n in sr.get("note") or [] if "other than the ordering one" in n["text"]]
        assert len(notes) == (1 if covering else 0), (action, sr.get("note"))
        if covering:
            assert notes[0]["authorReference"] == {"reference": acting} and notes[0]["time"]
            assert "Practitioner/dr" in notes[0]["text"] and sr["note"][-1] is notes[0]
        prov = bundle["entry"][-1]["resource"]
        assert prov["agent"][0]["who"] == {"reference": acting}  # the Provenance author is who acted


# --- open issues: only findings that apply to the plan's techniques and sites ------------------------------------

DVT_LEFT_LEG = {"resourceType": "Condition", "id": "dvt1", "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I82.402"}]},
                "onsetDateTime": "2026-11-10"}
RIGHT_SHOULDER, LEFT_LOWER_LEG = "16982005:right", "30021000:left"


def signed_issues(sites, *, acknowledged=(), techniques=("swedish",)):
    """What signing writes: EVERY finding in the chart as a DetectedIssue implicating the order, a mitigation only
    on those the physician acted on."""
    from fhir_massage.builders.detected_issue import detected_issue
    s = screen(from_resources([PATIENT, DVT_LEFT_LEG]), techniques=list(techniques), sites=list(sites), today=TODAY)
    out = []
    for f in s.findings:
        i = detected_issue(f, patient_ref="Patient/p1", now=NOW, order_ref="ServiceRequest/sr1")
        i["id"] = f"di-{f.rule}"
        if f.rule in acknowledged:
            i["mitigation"] = [{"action": {"text": "Acknowledged at signing"}}]
        out.append(i)
    return out


def _rules(items):
    return sorted(i.ref.removeprefix("DetectedIssue/di-") for i in items)


@pytest.mark.parametrize("signed_at, plan_sites, acknowledged, rescreen, want_open, want_elsewhere, want_addressed", [
    pytest.param([RIGHT_SHOULDER], [RIGHT_SHOULDER], (), True,
                 ["dvt-acute-elsewhere"], ["dvt-acute", "dvt-acute-mld"], [],
                 id="left-leg DVT on a right-shoulder Swedish order: only the whole-body DVT caution is open, "
                    "the left-leg rule and the MLD-only rule are elsewhere"),
    pytest.param([RIGHT_SHOULDER], [RIGHT_SHOULDER], (), False,
                 ["dvt-acute-elsewhere"], ["dvt-acute", "dvt-acute-mld"], [],
                 id="same without a re-screen (plan inactive): the recorded techniques and sites decide"),
    pytest.param([RIGHT_SHOULDER], [RIGHT_SHOULDER], ("dvt-acute-elsewhere",), True,
                 [], ["dvt-acute", "dvt-acute-mld"], ["dvt-acute-elsewhere"],
                 id="the DVT caution acknowledged at signing is addressed, nothing is open"),
    pytest.param([LEFT_LOWER_LEG], [LEFT_LOWER_LEG], (), True,
                 ["dvt-acute", "dvt-acute-elsewhere"], ["dvt-acute-mld"], [],
                 id="Swedish on the leg with the DVT: the local DVT rule is open"),
    pytest.param([LEFT_LOWER_LEG], [LEFT_LOWER_LEG], (), False,
                 ["dvt-acute", "dvt-acute-elsewhere"], ["dvt-acute-mld"], [],
                 id="the leg with the DVT without a re-screen: still open from the recorded sites"),
    pytest.param([LEFT_LOWER_LEG], [RIGHT_SHOULDER], (), True,
                 ["dvt-acute-elsewhere"], ["dvt-acute", "dvt-acute-mld"], [],
                 id="the plan was changed from the left leg to the shoulder: the leg DVT no longer affects it"),
])
def test_split_issues_open_only_what_applies(signed_at, plan_sites, acknowledged, rescreen, want_open,
                                             want_elsewhere, want_addressed):
    from fhir_massage.plan_view import split_issues
    issues = signed_issues(signed_at, acknowledged=acknowledged)
    s = (screen(from_resources([PATIENT, DVT_LEFT_LEG]), techniques=["swedish"], sites=plan_sites, today=TODAY)
         if rescreen else None)
    split = split_issues(issues, techniques=("swedish",), sites=tuple(plan_sites), screening=s)
    assert _rules(split.open) == want_open
    assert _rules(split.elsewhere) == want_elsewhere
    assert _rules(split.addressed) == want_addressed


@pytest.mark.parametrize("issue, applies", [
    pytest.param({"resourceType": "DetectedIssue", "id": "x", "status": "final", "severity": "high",
                  "detail": "Written by another app"}, True,
                 id="a finding without a rule id cannot be placed: it stays open, never hidden"),
    pytest.param({"resourceType": "DetectedIssue", "id": "x", "status": "final", "severity": "high",
                  "identifier": [{"system": RULE_IDENTIFIER_SYSTEM, "value": "no-such-rule"}]}, True,
                 id="an unknown rule stays open"),
    pytest.param({"resourceType": "DetectedIssue", "id": "x", "status": "final", "severity": "high",
                  "identifier": [{"system": RULE_IDENTIFIER_SYSTEM, "value": "dvt-acute-mld"}]}, False,
                 id="a rule about lymphatic drainage only never applies to a Swedish plan (KB techniques)"),
    pytest.param({"resourceType": "DetectedIssue", "id": "x", "status": "final", "severity": "high",
                  "identifier": [{"system": RULE_IDENTIFIER_SYSTEM, "value": "dvt-acute"}],
                  "detail": "DVT\n\nRule dvt-acute (absolute; techniques: swedish; sites: 61685007:bogus)."}, True,
                 id="recorded sites this KB cannot read cannot be ruled out"),
])
def test_issue_applies_is_cautious_with_what_it_cannot_read(issue, applies):
    from fhir_massage.plan_view import issue_applies
    assert issue_applies(issue, techniques=("swedish",), sites=(RIGHT_SHOULDER,)) is applies


# --- status with its reason; precautions --------------------------------------------------------------------------


@pytest.mark.parametrize("action, reason, want", [
    pytest.param("hold", "New DVT on ultrasound", ("on-hold", "New DVT on ultrasound", "Practitioner/dr"),
                 id="on hold: the reason the physician typed, by whom"),
    pytest.param("revoke", "Patient moved away", ("revoked", "Patient moved away", "Practitioner/dr"),
                 id="revoked: the revoke reason, not an older hold reason"),
    pytest.param("hold", None, ("on-hold", "", None), id="held without a reason: said so, nothing invented"),
])
def test_status_note_reads_what_order_status_update_wrote(action, reason, want):
    from fhir_massage.builders.plan import order_status_update
    from fhir_massage.plan_view import status_note
    (sr,) = orders_of(draft())
    sr = order_status_update(sr, "hold", reason_text="Waiting for labs", author_ref="Practitioner/dr", now=NOW)
    if action == "revoke":
        sr = order_status_update(sr, "revoke", reason_text=reason, author_ref="Practitioner/dr", now=NOW)
    elif reason is not None:
        sr["note"] = []
        sr["status"] = "active"
        sr = order_status_update(sr, "hold", reason_text=reason, author_ref="Practitioner/dr", now=NOW)
    else:
        sr["note"] = []
    n = status_note(sr)
    assert (n.status, n.reason, n.author_ref) == want
    if want[2]:
        assert n.time == NOW


def test_an_active_order_never_held_has_no_status_note():
    from fhir_massage.plan_view import status_note
    (sr,) = orders_of(draft())
    assert status_note(sr) is None


def test_precautions_read_back_what_the_order_builder_wrote():
    from dataclasses import replace as dc_replace
    from fhir_massage.plan_view import order_precautions
    d = dc_replace(draft(), pressure="light", pressure_note="on anticoagulants", positioning=("side-lying only",))
    (sr,) = orders_of(d)
    assert order_precautions(sr) == ("Light pressure: on anticoagulants", "side-lying only")
    foreign = {"resourceType": "ServiceRequest", "note": [{"text": "Precautions: Light pressure; no prone."}]}
    assert order_precautions(foreign) == ("Light pressure; no prone",)
    (plain,) = orders_of(draft())
    assert order_precautions(plain) == ()
