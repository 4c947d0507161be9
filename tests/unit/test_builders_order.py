"""Order builders: OrderDraft checks, the ServiceRequest / Task / Provenance shapes, and the one idempotent
transaction. Every built resource is parsed by fhir.resources.R4B and checked against our profiles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_massage.builders.order import (
    FINDING_ID_SYSTEM,
    ORDER_ID_SYSTEM,
    REQUISITION_ID_SYSTEM,
    TARGET_BODY_STRUCTURE,
    fulfillment_task,
    order_transaction,
    order_urns,
    provenance,
    service_request,
    sessions_done,
)
from fhir_massage.codes import CPT, TASK_CODE, TECHNIQUE_CPT, TECHNIQUE_SYSTEM, TECHNIQUES, UCUM
from fhir_massage.errors import InvalidInput
from fhir_massage.orders_model import OrderDraft, order_problems
from fhir_massage.validation import errors, validate_resource

NOW = datetime(2026, 11, 28, 10, 5, tzinfo=timezone.utc)
DRAFT = OrderDraft(
    draft_id="0b7d2f4e-1111-4a4a-9c9c-123456789abc",
    patient_ref="Patient/p1",
    requester_ref="PractitionerRole/dr1",
    techniques=("lymphatic-drainage",),
    sites=("53120007:left", "91470000:left"),
    frequency=2,
    duration_weeks=6,
    session_minutes=45,
    authored=datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc),
    reason_refs=("Condition/lymphedema-left-arm",),
    reason_text="Postmastectomy lymphedema, left arm",
    pressure="light",
    pressure_note="clear proximal nodes first",
    positioning=("supine, arm elevated",),
    notes="Scar at left axilla: no direct pressure.",
    patient_instruction="Report new redness or warmth of the arm at once.",
)
FINDING = {
    "resourceType": "DetectedIssue",
    "meta": {"profile": ["https://fhir-massage.dev/fhir/StructureDefinition/massage-contraindication"]},
    "identifier": [{"system": "https://fhir-massage.dev/fhir/identifier/finding", "value": "f-1"}],
    "status": "preliminary",
    "code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "COND"}]},
    "severity": "low",
    "patient": {"reference": "Patient/p1"},
    "identifiedDateTime": "2026-11-28T10:00:05Z",
    "implicated": [{"reference": "Condition/scar"}],
    "detail": "Recent surgical scar at the left axilla: avoid direct pressure on it.",
}


def r4b_valid(resource: dict[str, Any]) -> None:
    """Parses with the R4B model (R4 4.0.1's closest match in fhir.resources) and passes our profiles."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    problems = errors(validate_resource(resource))
    assert not problems, "\n".join(map(str, problems))


def draft(**changes: Any) -> OrderDraft:
    return dataclasses.replace(DRAFT, **changes)


# --- checks ------------------------------------------------------------------------------------------------------

PROBLEM_CASES = [
    ("lymphedema-mld-left-arm-is-fine", {}, None),
    ("no-technique-chosen", {"techniques": ()}, "techniques"),
    ("cupping-is-not-a-technique-we-order", {"techniques": ("cupping",)}, "techniques"),
    ("same-technique-twice", {"techniques": ("swedish", "swedish")}, "techniques"),
    ("zero-sessions-a-week", {"frequency": 0}, "frequency"),
    ("more-than-daily-8-a-week", {"frequency": 8}, "frequency"),
    ("no-plan-length", {"duration_weeks": 0}, "duration_weeks"),
    ("longer-than-a-year-60-weeks", {"duration_weeks": 60}, "duration_weeks"),
    ("7-a-week-for-a-year-is-364-sessions", {"frequency": 7, "duration_weeks": 52}, "duration_weeks"),
    ("5-minute-session-too-short", {"session_minutes": 5}, "session_minutes"),
    ("3-hour-session-too-long", {"session_minutes": 180}, "session_minutes"),
    ("knee-needs-a-side", {"sites": ("72696002",)}, "sites"),
    ("back-has-no-side", {"sites": ("77568009:left",)}, "sites"),
    ("unknown-site-code", {"sites": ("32849002",)}, "sites"),  # esophagus, mislabelled "back" elsewhere
    ("garbage-site", {"sites": ("left knee",)}, "sites"),
    ("no-site", {"sites": ()}, "sites"),
    ("no-reason-at-all", {"reason_refs": (), "reason_text": ""}, "reason_text"),
    ("reason-must-be-a-condition", {"reason_refs": ("Observation/x",)}, "reason_refs"),
    ("patient-cannot-be-the-requester", {"requester_ref": "Patient/p1"}, "requester_ref"),
    ("pressure-extreme-is-not-a-level", {"pressure": "extreme"}, "pressure"),
    ("authored-without-time-zone", {"authored": datetime(2026, 11, 28, 10, 0)}, "authored"),
]


@pytest.mark.parametrize("changes,field", [c[1:] for c in PROBLEM_CASES], ids=[c[0] for c in PROBLEM_CASES])
def test_order_problems(changes: dict[str, Any], field: str | None) -> None:
    problems = order_problems(draft(**changes))
    if field is None:
        assert problems == {}
    else:
        assert field in problems, problems
        assert problems[field].endswith(".") and "Traceback" not in problems[field]


def test_bilateral_and_text_only_reason_are_fine() -> None:
    assert order_problems(draft(sites=("61685007:bilateral",), reason_refs=(), reason_text="Fibromyalgia")) == {}


# --- ServiceRequest ------------------------------------------------------------------------------------------------

CPT_CASES = [
    ("swedish-is-massage-97124", "swedish", "97124"),
    ("mld-is-manual-therapy-97140", "lymphatic-drainage", "97140"),
    ("myofascial-release-is-manual-therapy-97140", "myofascial-release", "97140"),
    ("stretching-is-therapeutic-exercise-97110", "stretching", "97110"),
]


@pytest.mark.parametrize("technique,cpt", [c[1:] for c in CPT_CASES], ids=[c[0] for c in CPT_CASES])
def test_service_request_codes_cpt_first_then_technique(technique: str, cpt: str) -> None:
    sr = service_request(draft(techniques=(technique,)), findings_refs=[], now=NOW)
    assert sr["code"]["coding"][0] == {**sr["code"]["coding"][0], "system": CPT, "code": cpt}
    assert sr["code"]["coding"][1]["system"] == TECHNIQUE_SYSTEM and sr["code"]["coding"][1]["code"] == technique
    r4b_valid(sr)


def test_every_technique_has_one_cpt_with_evidence() -> None:
    assert set(TECHNIQUE_CPT) == set(TECHNIQUES)
    assert all(tag in ("V", "V2", "B") for _, tag in TECHNIQUE_CPT.values())


def test_cpt_mapping_agrees_with_the_packages_concept_map() -> None:
    # one mapping in Python (codes.TECHNIQUE_CPT); the FHIR package's ConceptMap must name the same default
    path = Path(__file__).resolve().parents[2] / "profiles" / "package" / "ConceptMap-massage-technique-to-cpt.json"
    cmap = json.loads(path.read_text(encoding="utf-8"))
    defaults = {el["code"]: el["target"][0]["code"] for g in cmap["group"] for el in g["element"]}
    assert defaults == {t: cpt for t, (cpt, _) in TECHNIQUE_CPT.items()}


def test_service_request_shape() -> None:
    sr = service_request(DRAFT, findings_refs=["DetectedIssue/f1"], now=NOW)
    r4b_valid(sr)
    assert (sr["status"], sr["intent"]) == ("active", "order")
    assert sr["identifier"] == [{"system": ORDER_ID_SYSTEM, "value": f"{DRAFT.draft_id}:lymphatic-drainage"}]
    assert sr["requisition"] == {"system": REQUISITION_ID_SYSTEM, "value": DRAFT.draft_id}
    repeat = sr["occurrenceTiming"]["repeat"]
    assert repeat == {"boundsDuration": {"value": 6, "unit": "wk", "system": UCUM, "code": "wk"}, "count": 12,
                      "frequency": 2, "period": 1, "periodUnit": "wk", "duration": 45, "durationUnit": "min"}
    # the schedule in words survives an EHR that keeps only text
    assert sr["occurrenceTiming"]["code"]["text"] == "twice a week for 6 weeks (12 sessions), 45-minute sessions"
    assert any(d["text"] == sr["occurrenceTiming"]["code"]["text"] for d in sr["orderDetail"])
    assert sr["quantityQuantity"] == {"value": 12, "unit": "session", "system": UCUM, "code": "{session}"}
    assert [b["text"] for b in sr["bodySite"]] == ["Left upper limb", "Left axilla"]
    assert sr["bodySite"][0]["coding"][0]["code"] == "53120007"
    assert sr["supportingInfo"] == [{"reference": "DetectedIssue/f1"}]
    assert sr["reasonReference"] == [{"reference": "Condition/lymphedema-left-arm"}]
    assert sr["reasonCode"] == [{"text": "Postmastectomy lymphedema, left arm"}]
    assert sr["requester"] == {"reference": "PractitionerRole/dr1"} and sr["subject"] == {"reference": "Patient/p1"}
    assert sr["authoredOn"] == "2026-11-28T10:00:00Z"
    notes = [n["text"] for n in sr["note"]]
    assert notes[0] == DRAFT.notes and "Light pressure: clear proximal nodes first" in notes[1]
    assert sr["patientInstruction"] == DRAFT.patient_instruction


def test_service_request_needs_a_technique_choice_when_draft_has_several() -> None:
    two = draft(techniques=("lymphatic-drainage", "swedish"))
    with pytest.raises(InvalidInput):
        service_request(two, findings_refs=[], now=NOW)
    assert service_request(two, findings_refs=[], now=NOW, technique="swedish")["code"]["coding"][0]["code"] == "97124"


def test_invalid_draft_is_refused_in_plain_words() -> None:
    with pytest.raises(InvalidInput, match="Say which side for the knee"):
        service_request(draft(sites=("72696002",)), findings_refs=[], now=NOW)


# --- Task, Provenance ------------------------------------------------------------------------------------------


def test_fulfillment_task_shape() -> None:
    task = fulfillment_task(DRAFT, order_ref="ServiceRequest/sr1", now=NOW, owner_ref="PractitionerRole/lmt1")
    r4b_valid(task)
    assert task["status"] == "ready" and task["intent"] == "order"
    assert task["code"]["coding"][0]["system"] == TASK_CODE and task["code"]["coding"][0]["code"] == "fulfill"
    assert task["focus"] == task["basedOn"][0] == {"reference": "ServiceRequest/sr1"}
    assert task["for"] == {"reference": "Patient/p1"} and task["owner"] == {"reference": "PractitionerRole/lmt1"}
    assert task["restriction"] == {"repetitions": 12}
    assert sessions_done(task) == 0 and task["businessStatus"]["text"] == "0 of 12 sessions done"
    unowned = fulfillment_task(DRAFT, order_ref="ServiceRequest/sr1", now=NOW)
    assert unowned["status"] == "requested" and "owner" not in unowned


def test_provenance_author_and_app_transmitter() -> None:
    prov = provenance(["urn:uuid:1", {"reference": "urn:uuid:2"}], author_ref="PractitionerRole/dr1", now=NOW,
                      app_version="0.1.0")
    get_fhir_model_class("Provenance").model_validate(prov)
    assert prov["recorded"] == "2026-11-28T10:05:00Z"
    assert [t["reference"] for t in prov["target"]] == ["urn:uuid:1", "urn:uuid:2"]
    kinds = {a["type"]["coding"][0]["code"]: a["who"] for a in prov["agent"]}
    assert kinds["author"] == {"reference": "PractitionerRole/dr1"}
    assert kinds["transmitter"]["type"] == "Device" and kinds["transmitter"]["display"] == "fhir-massage 0.1.0"
    with pytest.raises(InvalidInput):
        provenance([], author_ref="PractitionerRole/dr1", now=NOW)
    with pytest.raises(InvalidInput):
        provenance(["urn:uuid:1"], author_ref="PractitionerRole/dr1", now=NOW.replace(tzinfo=None))


# --- the transaction ---------------------------------------------------------------------------------------------


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        out = [value["reference"]] if isinstance(value.get("reference"), str) else []
        for v in value.values():
            out += _refs(v)
        return out
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def test_order_transaction_is_one_idempotent_bundle() -> None:
    two = draft(techniques=("lymphatic-drainage", "swedish"))
    bundle = order_transaction(two, [FINDING], NOW, owner_ref="PractitionerRole/lmt1", body_structures=True)
    assert bundle["type"] == "transaction"
    get_fhir_model_class("Bundle").model_validate(bundle)
    problems = errors(validate_resource(bundle))
    assert not problems, "\n".join(map(str, problems))
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("ServiceRequest") == 2 and kinds.count("Task") == 2  # one order per technique
    assert kinds.count("DetectedIssue") == 1 and kinds.count("Provenance") == 1
    assert kinds.count("BodyStructure") == 2  # left upper limb, left axilla
    # every create is conditional and the Provenance a PUT on a derived id: a retry of the same Bundle creates
    # nothing new (http.html#ccreate, #upsert)
    creates, (prov,) = bundle["entry"][:-1], bundle["entry"][-1:]
    for e in creates:
        assert e["request"]["method"] == "POST" and e["request"]["ifNoneExist"], e["request"]
        assert e["fullUrl"].startswith("urn:uuid:")
    assert prov["request"] == {"method": "PUT", "url": f"Provenance/{prov['resource']['id']}"}
    # same draft -> byte-identical Bundle; another draft -> other identifiers, urns and Provenance id
    again = order_transaction(two, [FINDING], NOW, owner_ref="PractitionerRole/lmt1", body_structures=True)
    assert json.dumps(again) == json.dumps(bundle)
    other = order_transaction(draft(draft_id="another"), [FINDING], NOW)
    assert not {e["fullUrl"] for e in other["entry"][:-1]} & {e["fullUrl"] for e in creates
                                                              if e["resource"]["resourceType"] != "BodyStructure"}
    assert other["entry"][-1]["request"]["url"] != prov["request"]["url"]
    # internal references resolve to entries of the Bundle
    full_urls = {e["fullUrl"] for e in creates}
    for e in bundle["entry"]:
        for r in _refs(e["resource"]):
            assert not r.startswith("urn:") or r in full_urls, r
    # the finding implicates both orders, is final, and both orders carry it
    issue = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DetectedIssue")
    srs = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    implicated = [r["reference"] for r in issue["resource"]["implicated"]]
    assert {s["fullUrl"] for s in srs} <= set(implicated) and "Condition/scar" in implicated
    assert issue["resource"]["status"] == "final"
    assert FINDING["status"] == "preliminary"  # the caller's dict is not changed
    assert all(s["resource"]["supportingInfo"] == [{"reference": issue["fullUrl"]}] for s in srs)
    # lateralized sites link their BodyStructure
    assert {x["url"] for x in srs[0]["resource"]["extension"]} == {TARGET_BODY_STRUCTURE}
    # the Provenance covers everything written
    assert {t["reference"] for t in prov["resource"]["target"]} == full_urls
    assert order_urns(two.draft_id, "swedish")["order"] in full_urls


PROVENANCE_MODE_CASES = [
    ("upsert-capable-server-like-the-sandbox", "put", "PUT", None),
    ("server-with-identifier-modifier", "conditional", "POST", "target%3Aidentifier=https%3A%2F%2F"),
    ("server-with-neither-plain-post", "post", "POST", None),
]


@pytest.mark.parametrize("mode,method,condition", [c[1:] for c in PROVENANCE_MODE_CASES],
                         ids=[c[0] for c in PROVENANCE_MODE_CASES])
def test_provenance_modes(mode: str, method: str, condition: str | None) -> None:
    bundle = order_transaction(DRAFT, [], NOW, provenance_mode=mode)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["ServiceRequest", "Task", "Provenance"]  # no BodyStructure unless asked for
    assert "extension" not in bundle["entry"][0]["resource"]
    request = bundle["entry"][-1]["request"]
    assert request["method"] == method
    assert (request.get("ifNoneExist") or "").startswith(condition or "") and bool(condition) == ("ifNoneExist" in request)
    with pytest.raises(InvalidInput):
        order_transaction(DRAFT, [], NOW, provenance_mode="maybe")


def test_findings_are_keyed_per_draft_not_per_rule() -> None:
    bare = {k: v for k, v in FINDING.items() if k != "identifier"}
    bundle = order_transaction(DRAFT, [bare, FINDING], NOW)
    entries = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DetectedIssue"]
    firsts = [e["resource"]["identifier"][0]["value"] for e in entries]
    assert firsts == [f"{DRAFT.draft_id}:0", f"{DRAFT.draft_id}:1"]
    assert entries[1]["resource"]["identifier"][1] == FINDING["identifier"][0]  # the caller's identifier is kept
    assert all(f"{DRAFT.draft_id}%3A" in e["request"]["ifNoneExist"] for e in entries)
    ours = {**FINDING, "identifier": [{"system": FINDING_ID_SYSTEM, "value": "x"}]}
    with pytest.raises(InvalidInput, match="share one identifier"):
        order_transaction(DRAFT, [ours, ours], NOW)
    with pytest.raises(InvalidInput):
        order_transaction(DRAFT, [{"resourceType": "Condition"}], NOW)


def test_with_the_screening_builders_detected_issue() -> None:
    from fhir_massage.builders.detected_issue import RULE_IDENTIFIER_SYSTEM, detected_issue
    from fhir_massage.screening import Finding

    finding = Finding(rule="dvt-acute", cls="absolute", techniques=("deep-tissue",), sites=(),
                      evidence=("Condition/dvt",), message="Acute DVT of the left leg.", evidence_class="CONS",
                      source="reference/contraindications.md", verified=True, details=(), title="Acute DVT")
    issue = detected_issue(finding, patient_ref="Patient/p1", now=NOW, status="preliminary")
    bundle = order_transaction(DRAFT, [issue], NOW)
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DetectedIssue"]
    # keyed on the draft, not on the rule id that every patient with a DVT shares
    assert "contraindication-rule" not in entry["request"]["ifNoneExist"]
    assert entry["resource"]["identifier"][1] == {"system": RULE_IDENTIFIER_SYSTEM, "value": "dvt-acute"}
    assert entry["resource"]["implicated"][0]["reference"] == bundle["entry"][0]["fullUrl"]
    problems = errors(validate_resource(bundle))
    assert not problems, "\n".join(map(str, problems))


def test_plan_end_is_not_guessed_in_the_order() -> None:
    # boundsDuration: the series starts at the first session, unknown at signing; no invented calendar dates
    sr = service_request(DRAFT, findings_refs=[], now=NOW + timedelta(days=3))
    assert "boundsPeriod" not in sr["occurrenceTiming"]["repeat"] and "occurrencePeriod" not in sr
