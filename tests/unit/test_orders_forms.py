"""The order form as plain data: form fields -> OrderDraft + messages, findings -> required actions ->
mitigations, and the signed Bundle: every resource in it valid against R4 (fhir.resources R4B) and our profiles."""

from __future__ import annotations

from datetime import date, datetime, timezone
from urllib.parse import unquote

import pytest
from fhir.resources.R4B import get_fhir_model_class
from werkzeug.datastructures import MultiDict

from fhir_massage.builders.order import FINDING_ID_SYSTEM
from fhir_massage.chart import from_resources
from fhir_massage.sandbox.demo import hand_made_resources
from fhir_massage.screening import screen
from fhir_massage.validation import errors, validate_resource
from smart_app import forms

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
TODAY = date(2026, 11, 28)
DRAFT_ID = "5d7c1c0e-2f7b-4d7e-9a3c-0c1b2a3d4e5f"


def parse(**fields):
    base = {"technique": ["swedish"], "site": ["37822005"], "frequency": "2", "duration_weeks": "6",
            "session_minutes": "45", "reason_text": "Low back pain"}
    base.update(fields)
    form = MultiDict([(k, v) for k, vs in base.items() for v in (vs if isinstance(vs, list) else [vs])])
    return forms.parse_order_form(form, draft_id=DRAFT_ID, patient_ref="Patient/p1",
                                  requester_ref="Practitioner/dr1", authored=NOW,
                                  known_conditions=["Condition/c1"])


FORM_CASES = [
    # (case, fields, field with a message or None, words in the message)
    ("a-complete-order", {}, None, ""),
    ("no-technique", {"technique": []}, "techniques", "Choose at least one technique"),
    ("unknown-technique", {"technique": ["cupping"]}, "techniques", "Unknown technique"),
    ("no-site", {"site": []}, "sites", "at least one body site"),
    ("lateral-site-without-side", {"site": ["30021000"]}, "sites", "Say which side for the lower leg"),
    ("side-on-a-midline-site-is-dropped", {"site": ["37822005"], "side-37822005": "left"}, None, ""),
    ("unknown-side", {"site": ["30021000"], "side-30021000": "up"}, "sites", "'up' is not a side"),
    ("zero-frequency", {"frequency": "0"}, "frequency", "at least one session a week"),
    ("absurd-frequency", {"frequency": "21"}, "frequency", "more than one a day"),
    ("frequency-not-a-number", {"frequency": "two"}, "frequency", "whole number (got 'two')"),
    ("empty-duration", {"duration_weeks": ""}, "duration_weeks", "Give the number of weeks"),
    ("two-years", {"duration_weeks": "104"}, "duration_weeks", "more than a year"),
    ("session-longer-than-allowed", {"session_minutes": "180"}, "session_minutes", "10 to 120 minutes"),
    ("too-many-sessions", {"frequency": "7", "duration_weeks": "52"}, "duration_weeks", "too many"),
    ("no-reason", {"reason_text": ""}, "reason_text", "Give the reason"),
    ("reason-from-the-chart", {"reason_text": "", "reason_ref": ["Condition/c1"]}, None, ""),
    ("reason-not-in-the-chart", {"reason_ref": ["Condition/other"]}, "reason_refs", "patient's conditions"),
    ("unknown-pressure", {"pressure": "crushing"}, "pressure", "Pressure is one of"),
]


@pytest.mark.parametrize("case,fields,field,words", FORM_CASES, ids=[c[0] for c in FORM_CASES])
def test_form_messages(case, fields, field, words):
    parsed = parse(**fields)
    if field is None:
        assert parsed.problems == {}
    else:
        assert field in parsed.problems, parsed.problems
        assert words in parsed.problems[field]


def test_form_to_draft():
    parsed = parse(technique=["deep-tissue", "swedish", "deep-tissue"], site=["30021000", "37822005"],
                   **{"side-30021000": "left", "positioning": "side-lying\n\n prone with bolster "},
                   pressure="light", notes=" gentle ")
    d = parsed.draft
    assert d.techniques == ("deep-tissue", "swedish")
    assert d.sites == ("30021000:left", "37822005")
    assert d.positioning == ("side-lying", "prone with bolster")
    assert (d.frequency, d.duration_weeks, d.session_minutes, d.pressure, d.notes) == (2, 6, 45, "light", "gentle")
    assert d.schedule.text == "twice a week for 6 weeks (12 sessions), 45-minute sessions"


def test_fields_from_form_keeps_only_known_fields():
    form = MultiDict([("technique", "swedish"), ("technique", "stretching"), ("csrf_token", "x"),
                      ("override-dvt-acute", "site-avoided"), ("evil", "1"), ("side-30021000", "left")])
    kept = forms.fields_from_form(form)
    assert kept == {"technique": ["swedish", "stretching"], "override-dvt-acute": ["site-avoided"],
                    "side-30021000": ["left"]}


def dana_screening(techniques=("deep-tissue",), sites=("30021000:left",)):
    chart = from_resources(hand_made_resources("demo-dana-whitfield", TODAY))
    return screen(chart, techniques=list(techniques), sites=list(sites), today=TODAY)


def test_actions_absolute_needs_reason_and_note_relative_needs_ack():
    s = dana_screening()
    actions = {a.rule: a for a in forms.required_actions(s, {})}
    assert actions["dvt-acute"].kind == "override" and not actions["dvt-acute"].done
    assert actions["anticoagulant"].kind == "acknowledge" and not actions["anticoagulant"].done
    assert "dvt-acute-mld" not in actions  # MLD is not in this order: shown, but nothing to do
    problems = forms.action_problems(list(actions.values()))
    assert set(problems) == {"override-dvt-acute", "override-note-dvt-acute", "ack-anticoagulant",
                             "ack-dvt-acute-elsewhere"}
    # a reason alone is not enough: the override needs the physician's words too
    half = forms.required_actions(s, {"override-dvt-acute": ["clearance-obtained"]})
    assert "override-note-dvt-acute" in forms.action_problems(half)
    made_up = forms.required_actions(s, {"override-dvt-acute": ["because"], "override-note-dvt-acute": ["x"]})
    assert "override-dvt-acute" in forms.action_problems(made_up)


def test_clear_screen_needs_no_action():
    chart = from_resources(hand_made_resources("demo-tom-becker", TODAY))
    s = screen(chart, techniques=["swedish"], sites=["37822005"], today=TODAY)
    assert s.verdict == "clear"
    assert forms.required_actions(s, {}) == []


def test_mitigation_is_never_silent():
    done = forms.Action("dvt-acute", "override", "site-avoided", "Left leg excluded", True)
    m = forms.mitigation(done, author_ref="Practitioner/dr1", when="2026-11-28T10:00:00Z")
    assert m == {"action": {"text": "Overridden by the ordering physician: The therapist will avoid the affected "
                                    "site. Left leg excluded"},
                 "date": "2026-11-28T10:00:00Z", "author": {"reference": "Practitioner/dr1"}}
    ack = forms.mitigation(forms.Action("anticoagulant", "acknowledge", done=True), author_ref="Practitioner/dr1",
                           when="2026-11-28T10:00:00Z")
    assert ack["action"]["text"].startswith("Acknowledged by the ordering physician")
    assert forms.mitigation(forms.Action("x", "acknowledge"), author_ref="Practitioner/dr1", when="") is None


def test_screen_inputs_are_cautious_until_chosen():
    d = parse(technique=[], site=["30021000"]).draft
    assert forms.screen_inputs(d) == (None, ["30021000"])  # every technique, both sides


def _valid(resource):
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    problems = errors(validate_resource(resource))
    assert not problems, "\n".join(map(str, problems))


def test_signed_bundle_for_the_dvt_override_is_valid_and_idempotent():
    fields = {"override-dvt-acute": ["clearance-obtained"], "override-note-dvt-acute": ["Vascular surgery cleared"],
              "ack-anticoagulant": ["yes"], "ack-dvt-acute-elsewhere": ["yes"]}
    parsed = parse(technique=["deep-tissue"], site=["30021000"], **{"side-30021000": "left"},
                   **{k: v for k, v in fields.items()})
    s = dana_screening()
    actions = forms.required_actions(s, fields)
    assert forms.action_problems(actions) == {}
    bundle = forms.order_bundle(parsed.draft, s, actions, NOW)
    assert not errors(validate_resource(bundle))
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("ServiceRequest") == 1 and kinds.count("Task") == 1 and kinds[-1] == "Provenance"
    assert kinds.count("DetectedIssue") == len(s.findings)
    for e in bundle["entry"]:
        _valid(e["resource"])
        if e["request"]["method"] == "POST":
            assert e["request"]["ifNoneExist"].startswith("identifier=")
    issues = {e["resource"]["identifier"][1]["value"]: e for e in bundle["entry"]
              if e["resource"]["resourceType"] == "DetectedIssue"}
    dvt = issues["dvt-acute"]
    # the conditional-create key is per draft, never the bare rule id shared by every order of this patient
    assert unquote(dvt["request"]["ifNoneExist"]) == f"identifier={FINDING_ID_SYSTEM}|{DRAFT_ID}:dvt-acute"
    assert "Vascular surgery cleared" in dvt["resource"]["mitigation"][0]["action"]["text"]
    assert "mitigation" not in issues["dvt-acute-mld"]["resource"]  # not part of this order: nothing to mitigate
    assert forms.order_bundle(parsed.draft, s, actions, NOW) == bundle  # same draft, same Bundle


LATEX = {"resourceType": "AllergyIntolerance", "id": "latex", "patient": {"reference": "Patient/demo-tom-becker"},
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                        "code": "active"}]},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "300916003"}], "text": "Latex allergy"}}


def test_product_allergy_is_information_no_action_and_no_detected_issue():
    # issue 4: an allergy to a massage product is informational -> clear, nothing to acknowledge, and not written
    # as a DetectedIssue (those are one per finding; the AllergyIntolerance is the record)
    chart = from_resources(hand_made_resources("demo-tom-becker", TODAY) + [dict(LATEX)])
    s = screen(chart, techniques=["swedish"], sites=["37822005"], today=TODAY)
    assert s.verdict == "clear" and [i.rule for i in s.information] == ["allergy-massage-product"]
    assert forms.required_actions(s, {}) == []
    parsed = parse()
    issues = forms.finding_issues(parsed.draft, s, [], NOW)
    assert issues == []
    bundle = forms.order_bundle(parsed.draft, s, [], NOW)
    assert not errors(validate_resource(bundle))
    assert "DetectedIssue" not in [e["resource"]["resourceType"] for e in bundle["entry"]]


def test_product_allergy_beside_a_dvt_writes_only_the_findings():
    chart = from_resources(hand_made_resources("demo-dana-whitfield", TODAY)
                           + [dict(LATEX, patient={"reference": "Patient/demo-dana-whitfield"})])
    s = screen(chart, techniques=["deep-tissue"], sites=["30021000:left"], today=TODAY)
    assert s.verdict == "contraindicated" and [i.rule for i in s.information] == ["allergy-massage-product"]
    actions = forms.required_actions(s, {})
    assert "allergy-massage-product" not in {a.rule for a in actions}
    issues = forms.finding_issues(parse().draft, s, actions, NOW)
    rules = {i["identifier"][1]["value"] for i in issues}
    assert len(issues) == len(s.findings) and "allergy-massage-product" not in rules and "dvt-acute" in rules


def test_needs_review_entries_need_a_confirmation_that_lands_in_the_order_note():
    chart = from_resources(hand_made_resources("demo-helen-brooks", TODAY))
    s = screen(chart, techniques=["swedish"], sites=["37822005"], today=TODAY)
    clot = [n for n in s.needs_review if "hx of blood clot in leg" in n["reason"]]
    assert clot, s.needs_review
    field = f"ack-review-{forms.review_key(clot[0])}"
    assert forms.review_key(clot[0]) == forms.review_key(dict(clot[0]))  # stable across re-screens
    others = {a.rule: "yes" for a in forms.required_actions(s, {}) if a.kind != "review"}
    actions = forms.required_actions(s, {f"ack-{r}": [v] for r, v in others.items()})
    problems = forms.action_problems(actions)
    assert "could not screen this chart entry" in problems[field]
    review = next(a for a in actions if f"ack-{a.rule}" == field)
    assert review.kind == "review" and not review.done
    assert forms.mitigation(review, author_ref="Practitioner/dr1", when="") is None
    parsed = parse()
    bundle = forms.order_bundle(parsed.draft, s, actions, NOW)
    srs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert not any("Reviewed by the physician" in n["text"] for sr in srs for n in sr.get("note") or [])

    fields = {f"ack-{r}": ["yes"] for r in others} | {field: ["yes"]}
    actions = forms.required_actions(s, fields)
    assert field not in forms.action_problems(actions)
    bundle = forms.order_bundle(parsed.draft, s, actions, NOW)
    srs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert srs
    for sr in srs:
        texts = [n["text"] for n in sr["note"]]
        assert (f"Reviewed by the physician before signing: 'hx of blood clot in leg' ({clot[0]['evidence']}) — not "
                "screened automatically.") in texts
        note = next(n for n in sr["note"] if "hx of blood clot" in n["text"])
        assert note["authorReference"] == {"reference": "Practitioner/dr1"} and note["time"] == "2026-11-28T10:00:00Z"
        assert not errors(validate_resource(sr))
    # no DetectedIssue is written for a needs-review entry (it is not a finding)
    issue_ids = [i["value"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DetectedIssue"
                 for i in e["resource"]["identifier"] if i["system"] == FINDING_ID_SYSTEM]
    assert not any(":review-" in v for v in issue_ids)
