"""Table-driven screening tests: one row per clinical case, the reason in the row's id.

Also holds the small FHIR builders the other screening test modules import (tests never read /work/shared).
"""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhir_massage.codes import TECHNIQUES
from fhir_massage.knowledge import load_kb
from fhir_massage.screening import screen_bundle

SCT = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
RXN = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
TODAY = date(2024, 6, 1)
PID = "p1"


# ---------------------------------------------------------------------------------------------------------------
# builders


def patient(gender: str = "female", birth: str = "1980-03-04", pid: str = PID) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}


def condition(rid: str, code: str, system: str = SCT, *, status: str | None = "active", verification: str | None = None,
              onset: str | None = "2024-05-20", abatement: str | None = None, body_site: list | None = None,
              text: str | None = None, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    r: dict[str, Any] = {"resourceType": "Condition", "id": rid, "subject": {"reference": f"Patient/{PID}"},
                         "code": {"coding": [coding]}}
    if text:
        r["code"]["text"] = text
    if status:
        r["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]}
    if verification:
        r["verificationStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]}
    if onset:
        r["onsetDateTime"] = onset
    if abatement:
        r["abatementDateTime"] = abatement
    if body_site is not None:
        r["bodySite"] = body_site
    return r


def text_condition(rid: str, text: str, **kw) -> dict[str, Any]:
    r = condition(rid, "x", **kw)
    r["code"] = {"text": text}
    return r


def med_request(rid: str, code: str, *, status: str = "active", authored: str = "2024-05-01", display: str | None = None) -> dict[str, Any]:
    c = {"system": RXN, "code": code}
    if display:
        c["display"] = display
    return {"resourceType": "MedicationRequest", "id": rid, "status": status, "intent": "order",
            "subject": {"reference": f"Patient/{PID}"}, "authoredOn": authored,
            "medicationCodeableConcept": {"coding": [c]}}


def observation(rid: str, code: str, value: float | None = None, unit: str | None = None, *, when: str = "2024-05-31T10:00:00Z",
                status: str = "final", components: list | None = None, answer: tuple[str, str] | None = None,
                value_date: str | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": status,
                         "code": {"coding": [{"system": LOINC, "code": code}]},
                         "subject": {"reference": f"Patient/{PID}"}, "effectiveDateTime": when}
    if value is not None:
        r["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    if components is not None:
        r["component"] = components
    if answer is not None:
        r["valueCodeableConcept"] = {"coding": [{"system": answer[0], "code": answer[1]}]}
    if value_date is not None:
        r["valueDateTime"] = value_date
    return r


def bp(rid: str, systolic: float, diastolic: float, **kw) -> dict[str, Any]:
    comps = [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": systolic, "unit": "mm[Hg]", "code": "mm[Hg]"}},
             {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": diastolic, "unit": "mm[Hg]", "code": "mm[Hg]"}}]
    return observation(rid, "85354-9", components=comps, **kw)


def procedure(rid: str, display: str, *, performed: str = "2024-05-25", body_site: list | None = None,
              status: str = "completed", code: str = "1234567") -> dict[str, Any]:
    r = {"resourceType": "Procedure", "id": rid, "status": status, "subject": {"reference": f"Patient/{PID}"},
         "code": {"coding": [{"system": SCT, "code": code, "display": display}], "text": display},
         "performedDateTime": performed}
    if body_site is not None:
        r["bodySite"] = body_site
    return r


def allergy(rid: str, text: str, code: str | None = None) -> dict[str, Any]:
    r = {"resourceType": "AllergyIntolerance", "id": rid, "patient": {"reference": f"Patient/{PID}"},
         "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": text}}
    if code:
        r["code"]["coding"] = [{"system": SCT, "code": code}]
    return r


def site(code: str, laterality: str | None = None) -> list[dict[str, Any]]:
    out = [{"coding": [{"system": SCT, "code": code}]}]
    if laterality:
        lat = {"left": "7771000", "right": "24028007", "bilateral": "51440002"}[laterality]
        out.append({"coding": [{"system": SCT, "code": lat}]})
    return out


def bundle(*resources: dict[str, Any], with_patient: bool = True) -> dict[str, Any]:
    items = ([patient()] if with_patient else []) + list(resources)
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in items]}


def run(*resources, techniques=None, sites=None, today=TODAY, kb=None):
    return screen_bundle(bundle(*resources), techniques=techniques, sites=sites, today=today, kb=kb)


def rules_of(result) -> set[str]:
    return {f.rule for f in result.findings}


# ---------------------------------------------------------------------------------------------------------------
# Hand-written clinical cases

CASES = [
    # (id, resources, techniques, sites, expected verdict, rules that must be present, rules that must be absent)
    ("dvt-left-icd-left-calf-any-technique-contraindicated",
     [condition("c", "I82.402", ICD)], ["swedish"], ["30021000:left"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-left-icd-undotted-is-the-same-code",
     [condition("c", "I82402", ICD)], ["swedish"], ["30021000:left"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-left-icd-right-leg-swedish-only-caution",
     [condition("c", "I82.402", ICD)], ["swedish"], ["30021000:right"], "caution", {"dvt-acute", "dvt-acute-elsewhere"}, set()),
    ("dvt-right-icd-left-leg-caution",
     [condition("c", "I82.401", ICD)], ["deep-tissue"], ["68367000:left"], "caution", {"dvt-acute"}, set()),
    ("dvt-bilateral-icd-either-leg-contraindicated",
     [condition("c", "I82.403", ICD)], ["swedish"], ["56459004:right"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-unspecified-side-icd-assumes-both-legs",
     [condition("c", "I82.409", ICD)], ["swedish"], ["30021000:right"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-left-leg-arm-work-is-caution-not-clear",
     [condition("c", "I82.402", ICD)], ["swedish"], ["53120007"], "caution", {"dvt-acute-elsewhere"}, set()),
    ("dvt-mld-anywhere-contraindicated",
     [condition("c", "I82.402", ICD)], ["lymphatic-drainage"], ["53120007:right"], "contraindicated", {"dvt-acute-mld"}, set()),
    ("dvt-snomed-no-site-assumes-whole-body",
     [condition("c", "128053003")], ["swedish"], ["53120007:right"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-snomed-child-concept-lower-limb-left-by-bodysite",
     [condition("c", "404223003", body_site=site("61685007", "left"))], ["swedish"], ["53120007:right"], "caution", {"dvt-acute"}, set()),
    ("dvt-bodysite-left-lower-leg-widened-to-left-limb",
     [condition("c", "128053003", body_site=site("30021000", "left"))], ["swedish"], ["68367000:left"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-resolved-within-90-days-still-acute",
     [condition("c", "128053003", status="resolved", onset="2024-04-01", abatement="2024-05-01")], None, None,
     "contraindicated", {"dvt-acute"}, {"dvt-history"}),
    ("dvt-resolved-long-ago-history-relative-deep-tissue",
     [condition("c", "128053003", status="resolved", onset="2020-04-01", abatement="2020-05-01")], ["deep-tissue"], None,
     "caution", {"dvt-history"}, {"dvt-acute"}),
    ("dvt-history-swedish-only-clear",
     [condition("c", "128053003", status="resolved", onset="2020-04-01", abatement="2020-05-01")], ["swedish"], None,
     "clear", {"dvt-history"}, set()),
    ("dvt-history-z-code-counts-although-active-status",
     [condition("c", "Z86.718", ICD)], ["deep-tissue"], None, "caution", {"dvt-history"}, set()),
    ("dvt-refuted-never-counts",
     [condition("c", "I82.402", ICD, verification="refuted")], None, None, "clear", set(), {"dvt-acute"}),
    ("dvt-entered-in-error-never-counts",
     [condition("c", "I82.402", ICD, verification="entered-in-error")], None, None, "clear", set(), {"dvt-acute"}),
    ("dvt-unconfirmed-counts-flagged",
     [condition("c", "I82.402", ICD, verification="unconfirmed")], ["swedish"], ["30021000:left"], "contraindicated", {"dvt-acute"}, set()),
    ("dvt-onset-after-today-does-not-exist-yet",
     [condition("c", "I82.402", ICD, onset="2024-07-01")], None, None, "clear", set(), {"dvt-acute"}),
    ("dvt-recorded-resolved-later-was-active-on-the-day",
     [condition("c", "128053003", status="resolved", onset="2024-01-24", abatement="2024-06-23")], ["swedish"], None,
     "contraindicated", {"dvt-acute"}, set()),
    ("pe-acute-all-techniques-contraindicated",
     [condition("c", "I26.99", ICD)], ["swedish"], ["53120007:left"], "contraindicated", {"pe-acute"}, set()),
    ("pe-history-deep-tissue-caution",
     [condition("c", "706870000", status="resolved", onset="2021-05-05", abatement="2021-05-06")], ["deep-tissue"], None,
     "caution", {"pe-history"}, {"pe-acute"}),
    ("warfarin-scd-deep-tissue-caution",
     [med_request("m", "855332")], ["deep-tissue"], None, "caution", {"anticoagulant"}, set()),
    ("warfarin-scd-swedish-clear",
     [med_request("m", "855332")], ["swedish"], None, "clear", {"anticoagulant"}, set()),
    ("apixaban-ingredient-code-deep-tissue-caution",
     [med_request("m", "1364430")], ["trigger-point"], None, "caution", {"anticoagulant"}, set()),
    ("anticoagulant-stopped-long-ago-does-not-count",
     [med_request("m", "855332", status="stopped", authored="2023-01-01")], ["deep-tissue"], None, "clear", set(), {"anticoagulant"}),
    ("anticoagulant-cancelled-never-counts",
     [med_request("m", "855332", status="cancelled")], ["deep-tissue"], None, "clear", set(), {"anticoagulant"}),
    ("anticoagulant-ordered-after-today-ignored",
     [med_request("m", "855332", authored="2024-07-01")], ["deep-tissue"], None, "clear", set(), {"anticoagulant"}),
    ("long-term-anticoagulant-z-code",
     [condition("c", "Z79.01", ICD)], ["deep-tissue"], None, "caution", {"anticoagulant"}, set()),
    ("clopidogrel-trigger-point-caution",
     [med_request("m", "32968")], ["trigger-point"], None, "caution", {"antiplatelet"}, set()),
    ("platelets-15k-absolute",
     [observation("o", "777-3", 15, "10*3/uL")], ["swedish"], None, "contraindicated", {"platelets-critical"}, {"platelets-low"}),
    ("platelets-35k-relative-light-only",
     [observation("o", "777-3", 35, "10*3/uL")], ["swedish"], None, "caution", {"platelets-low"}, {"platelets-critical"}),
    ("platelets-35000-per-uL-unit-converted",
     [observation("o", "777-3", 35000, "/uL")], ["swedish"], None, "caution", {"platelets-low"}, set()),
    ("platelets-normal-clear",
     [observation("o", "777-3", 250, "10*3/uL")], None, None, "clear", set(), {"platelets-low"}),
    ("platelets-latest-normal-wins-over-older-low",
     [observation("o1", "777-3", 15, "10*3/uL", when="2024-05-01T10:00:00Z"), observation("o2", "777-3", 210, "10*3/uL")],
     None, None, "clear", set(), {"platelets-critical"}),
    ("platelets-entered-in-error-ignored",
     [observation("o", "777-3", 10, "10*3/uL", status="entered-in-error")], None, None, "clear", set(), {"platelets-critical"}),
    ("platelets-stale-low-goes-to-review",
     [observation("o", "777-3", 10, "10*3/uL", when="2023-01-01T10:00:00Z")], None, None, "caution", set(), {"platelets-critical"}),
    ("inr-3-5-relative",
     [observation("o", "6301-6", 3.5, "{INR}")], ["deep-tissue"], None, "caution", {"inr-high"}, set()),
    ("inr-5-absolute",
     [observation("o", "6301-6", 5.0, "{INR}")], ["swedish"], None, "contraindicated", {"inr-critical"}, {"inr-high"}),
    ("bp-185-over-95-absolute",
     [bp("o", 185, 95)], ["swedish"], None, "contraindicated", {"bp-critical"}, {"bp-high"}),
    ("bp-165-over-90-relative-deep",
     [bp("o", 165, 90)], ["deep-tissue"], None, "caution", {"bp-high"}, set()),
    ("bp-separate-diastolic-112-absolute",
     [observation("o", "8462-4", 112, "mm[Hg]")], ["swedish"], None, "contraindicated", {"bp-critical"}, set()),
    ("bp-85-systolic-hypotension-mld",
     [bp("o", 85, 55)], ["lymphatic-drainage"], None, "caution", {"bp-low"}, set()),
    ("fever-in-fahrenheit-101-absolute",
     [observation("o", "8310-5", 101.3, "[degF]")], ["swedish"], None, "contraindicated", {"temperature-high"}, set()),
    ("temperature-99F-clear",
     [observation("o", "8310-5", 99.0, "[degF]")], None, None, "clear", set(), {"temperature-high"}),
    ("temperature-38-2-celsius-absolute",
     [observation("o", "8310-5", 38.2, "Cel")], ["swedish"], None, "contraindicated", {"temperature-high"}, set()),
    ("egfr-25-mld-caution",
     [observation("o", "62238-1", 25, "mL/min/{1.73_m2}")], ["lymphatic-drainage"], None, "caution", {"egfr-low"}, set()),
    ("pregnancy-status-loinc-answer-caution",
     [observation("o", "82810-3", answer=(LOINC, "LA15173-0"))], ["swedish"], None, "caution", {"pregnancy"}, set()),
    ("pregnancy-status-snomed-answer-caution",
     [observation("o", "82810-3", answer=(SCT, "77386006"))], ["swedish"], None, "caution", {"pregnancy"}, set()),
    ("not-pregnant-answer-clear",
     [observation("o", "82810-3", answer=(LOINC, "LA26683-5"))], None, None, "clear", set(), {"pregnancy"}),
    ("pregnancy-unknown-woman-30-needs-review",
     [observation("o", "82810-3", answer=(LOINC, "LA4489-6"))], None, None, "caution", set(), {"pregnancy"}),
    ("edd-in-5-months-pregnant-second-trimester",
     [observation("o", "11778-8", value_date="2024-11-01")], ["swedish"], None, "caution", {"pregnancy"}, {"pregnancy-first-trimester"}),
    ("edd-in-8-months-first-trimester",
     [observation("o", "11778-8", value_date="2025-02-01")], ["swedish"], None, "caution", {"pregnancy", "pregnancy-first-trimester"}, set()),
    ("normal-pregnancy-snomed-caution",
     [condition("c", "72892002")], ["swedish"], None, "caution", {"pregnancy"}, set()),
    ("pre-eclampsia-icd-absolute",
     [condition("c", "O14.13", ICD)], ["swedish"], None, "contraindicated", {"pregnancy-high-risk", "pregnancy"}, set()),
    ("open-wound-left-lower-leg-local",
     [condition("c", "S81.812A", ICD)], ["swedish"], ["30021000:left"], "contraindicated", {"open-wound"}, set()),
    ("open-wound-left-lower-leg-back-work-caution",
     [condition("c", "S81.812A", ICD)], ["swedish"], ["77568009"], "caution", {"open-wound"}, set()),
    ("open-wound-right-lower-leg-left-leg-caution",
     [condition("c", "S81.811A", ICD)], ["swedish"], ["30021000:left"], "caution", {"open-wound"}, set()),
    ("laceration-of-foot-snomed-implies-foot",
     [condition("c", "284551006")], ["swedish"], ["53120007"], "caution", {"open-wound"}, set()),
    ("open-wound-open-for-a-year-goes-to-review",
     [condition("c", "125643001", onset="2023-01-01")], None, None, "caution", set(), {"open-wound"}),
    ("burn-of-right-hand-local",
     [condition("c", "T23.201A", ICD)], ["swedish"], ["85562004:right"], "contraindicated", {"burn"}, set()),
    ("burn-40-percent-absolute",
     [condition("c", "T31.40", ICD)], ["swedish"], ["53120007"], "contraindicated", {"burn-extensive"}, set()),
    ("osteoporosis-deep-tissue-caution",
     [condition("c", "64859006")], ["deep-tissue"], None, "caution", {"osteoporosis"}, set()),
    ("osteoporosis-icd-m81-stretching-caution",
     [condition("c", "M81.0", ICD)], ["stretching"], None, "caution", {"osteoporosis"}, set()),
    ("osteoporosis-swedish-clear",
     [condition("c", "64859006")], ["swedish"], None, "clear", {"osteoporosis"}, set()),
    ("femur-fracture-initial-encounter-local",
     [condition("c", "S72.001A", ICD)], ["swedish"], ["68367000:right"], "contraindicated", {"fracture-acute"}, set()),
    ("femur-fracture-subsequent-encounter-not-acute",
     [condition("c", "S72.001D", ICD)], ["swedish"], ["68367000:right"], "clear", set(), {"fracture-acute"}),
    ("recent-knee-surgery-with-site-local",
     [procedure("p", "Total knee arthroplasty", body_site=site("72696002", "left"))], ["swedish"], ["72696002:left"],
     "contraindicated", {"surgery-recent"}, set()),
    ("recent-knee-surgery-other-knee-caution",
     [procedure("p", "Total knee arthroplasty", body_site=site("72696002", "left"), performed="2024-04-25")], ["swedish"],
     ["72696002:right"], "caution", {"surgery-recent"}, {"surgery-recent-systemic"}),
    ("surgery-two-months-ago-clear",
     [procedure("p", "Appendectomy", performed="2024-03-01")], None, None, "clear", set(), {"surgery-recent"}),
    ("medication-reconciliation-is-not-surgery",
     [procedure("p", "Medication reconciliation (procedure)")], None, None, "clear", set(), {"surgery-recent"}),
    ("cellulitis-left-lower-limb-local-and-mld",
     [condition("c", "L03.116", ICD)], ["lymphatic-drainage"], ["53120007"], "contraindicated", {"cellulitis", "cellulitis-mld"}, set()),
    ("cellulitis-left-lower-limb-swedish-arm-caution",
     [condition("c", "L03.116", ICD)], ["swedish"], ["53120007"], "caution", {"cellulitis"}, set()),
    ("sepsis-absolute",
     [condition("c", "A41.9", ICD)], ["swedish"], None, "contraindicated", {"systemic-infection"}, set()),
    ("active-cancer-deep-tissue-caution-mld-absolute",
     [condition("c", "C50.911", ICD)], ["lymphatic-drainage"], None, "contraindicated", {"cancer-active", "cancer-mld"}, set()),
    ("active-cancer-swedish-caution-elsewhere",
     [condition("c", "C50.911", ICD)], ["swedish"], None, "caution", {"cancer-active"}, set()),
    ("basal-cell-skin-c44-not-systemic-cancer",
     [condition("c", "C44.91", ICD)], ["deep-tissue"], None, "clear", set(), {"cancer-active"}),
    ("bone-metastasis-relative-for-swedish",
     [condition("c", "C79.51", ICD)], ["swedish"], None, "caution", {"bone-metastasis", "cancer-active", "cancer-mld"}, set()),
    ("lymphedema-mld-is-an-indication-caution-only",
     [condition("c", "I89.0", ICD)], ["lymphatic-drainage"], None, "caution", {"lymphedema"}, set()),
    ("lymphedema-deep-tissue-site-unknown-contraindicated",
     [condition("c", "I89.0", ICD)], ["deep-tissue"], None, "contraindicated", {"lymphedema"}, set()),
    ("heart-failure-mld-caution",
     [condition("c", "88805009")], ["lymphatic-drainage"], None, "caution", {"heart-failure"}, set()),
    ("acute-heart-failure-mld-absolute",
     [condition("c", "I50.21", ICD)], ["lymphatic-drainage"], None, "contraindicated", {"heart-failure-acute", "heart-failure"}, set()),
    ("hypertensive-urgency-absolute",
     [condition("c", "I16.0", ICD)], ["swedish"], None, "contraindicated", {"hypertension-crisis"}, set()),
    ("varicose-veins-right-leg-deep-work-left-leg-caution",
     [condition("c", "I83.91", ICD)], ["deep-tissue"], ["30021000:left"], "caution", {"varicose-veins"}, set()),
    ("varicose-veins-right-leg-deep-work-right-leg-contraindicated",
     [condition("c", "I83.91", ICD)], ["deep-tissue"], ["30021000:right"], "contraindicated", {"varicose-veins"}, set()),
    ("abdominal-aortic-aneurysm-abdomen-contraindicated",
     [condition("c", "I71.4", ICD)], ["swedish"], ["818981001"], "contraindicated", {"aneurysm"}, set()),
    ("abdominal-aortic-aneurysm-legs-caution",
     [condition("c", "I71.4", ICD)], ["swedish"], ["61685007"], "caution", {"aneurysm"}, set()),
    ("stroke-two-weeks-ago-relative-all",
     [condition("c", "I63.9", ICD, onset="2024-05-18")], ["swedish"], None, "caution", {"stroke-recent"}, {"stroke-history"}),
    ("stroke-years-ago-history-deep-tissue",
     [condition("c", "230690007", onset="2019-05-26")], ["deep-tissue"], None, "caution", {"stroke-history"}, {"stroke-recent"}),
    ("mi-three-weeks-ago-relative",
     [condition("c", "I21.4", ICD, onset="2024-05-10")], ["swedish"], None, "caution", {"mi-recent"}, set()),
    ("mi-years-ago-clear",
     [condition("c", "22298006", onset="2015-01-01")], ["swedish"], None, "clear", set(), {"mi-recent"}),
    ("esrd-mld-caution",
     [condition("c", "N18.6", ICD)], ["lymphatic-drainage"], None, "caution", {"renal-insufficiency"}, set()),
    ("diabetic-neuropathy-deep-tissue-caution",
     [condition("c", "E11.40", ICD)], ["deep-tissue"], None, "caution", {"peripheral-neuropathy", "diabetes"}, set()),
    ("asthma-mld-caution",
     [condition("c", "J45.909", ICD)], ["lymphatic-drainage"], None, "caution", {"asthma-mld"}, set()),
    ("thyroid-neck-mld-neck-caution",
     [condition("c", "E05.00", ICD)], ["lymphatic-drainage"], ["45048000"], "caution", {"thyroid-neck-mld"}, set()),
    ("thyroid-neck-mld-leg-clear",
     [condition("c", "E05.00", ICD)], ["lymphatic-drainage"], ["61685007"], "clear", {"thyroid-neck-mld"}, set()),
    ("rheumatoid-arthritis-stretching-caution",
     [condition("c", "69896004")], ["stretching"], None, "caution", {"ra-flare"}, set()),
    # A product allergy is information for the therapist (issue 4: "an informational finding"), not a
    # contraindication: the verdict stays clear and the rule is listed under information, never under findings
    # (test_product_allergy_* below check that it is there).
    ("nut-allergy-massage-oil-is-information-clear",
     [allergy("a", "Allergy to peanuts", "91935009")], ["swedish"], None, "clear", set(), {"allergy-massage-product"}),
    ("latex-allergy-by-text-is-information-clear",
     [allergy("a", "Latex")], ["swedish"], None, "clear", set(), {"allergy-massage-product"}),
    ("penicillin-allergy-is-not-a-massage-product",
     [allergy("a", "Penicillin")], ["swedish"], None, "clear", set(), {"allergy-massage-product"}),
    ("text-only-blood-clot-needs-review",
     [text_condition("c", "Blood clot left calf")], ["swedish"], None, "caution", set(), set()),
    ("unknown-code-system-dvt-text-needs-review",
     [condition("c", "X1", "http://example.org/local", display="DVT of popliteal vein")], ["swedish"], None, "caution", set(), set()),
    ("unrelated-text-only-problem-clear",
     [text_condition("c", "Seasonal allergic rhinitis")], None, None, "clear", set(), set()),
    ("synthea-sprain-is-not-a-contraindication",
     [condition("c", "44465007")], None, None, "clear", set(), set()),
]


@pytest.mark.parametrize("resources,techniques,sites,verdict,present,absent",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_clinical_case(resources, techniques, sites, verdict, present, absent):
    result = run(*resources, techniques=techniques, sites=sites)
    found = rules_of(result)
    assert result.verdict == verdict, (result.verdict, [f.to_json()["message"] for f in result.findings], result.needs_review)
    assert present <= found, found
    assert not (absent & found), found


def information_of(result) -> set[str]:
    return {f.rule for f in result.information}


@pytest.mark.parametrize("res", [allergy("a", "Allergy to peanuts", "91935009"), allergy("a", "Latex")],
                         ids=["coded-nut", "latex-text"])
def test_product_allergy_only_is_clear_with_an_information_item(res):
    result = run(res, techniques=["swedish"])
    assert result.verdict == "clear" and not result.findings and not result.needs_review
    assert information_of(result) == {"allergy-massage-product"}
    item = result.information[0]
    assert item.informational and item.evidence == ("AllergyIntolerance/a",)
    assert "Allergy/intolerance" in item.message and item.evidence_class == "CONS"
    out = result.to_json()
    assert out["verdict"] == "clear" and out["findings"] == []
    [j] = out["information"]
    assert "class" not in j  # findings[].class keeps its three values; information has none
    assert {"rule", "techniques", "sites", "evidence", "message", "evidenceClass", "source", "verified",
            "informational", "details", "appliesToProposal"} <= set(j)
    assert j["rule"] == "allergy-massage-product" and j["evidence"] == ["AllergyIntolerance/a"]
    assert j["details"][0]["ref"] == "AllergyIntolerance/a" and j["appliesToProposal"] is True


def test_product_allergy_with_a_dvt_is_contraindicated_and_still_lists_the_information():
    result = run(allergy("a", "Latex"), condition("c", "I82.402", ICD, onset="2024-05-20"),
                 techniques=["swedish"], sites=["30021000:left"])
    assert result.verdict == "contraindicated"
    assert "dvt-acute" in rules_of(result) and "allergy-massage-product" not in rules_of(result)
    assert information_of(result) == {"allergy-massage-product"}
    out = result.to_json()
    assert {f["class"] for f in out["findings"]} <= {"absolute", "relative", "local"}
    assert [i["rule"] for i in out["information"]] == ["allergy-massage-product"]


def test_inactive_or_refuted_product_allergy_gives_no_information():
    inactive = dict(allergy("a", "Latex"), clinicalStatus={"coding": [{"code": "inactive"}]})
    refuted = dict(allergy("b", "Latex"), verificationStatus={"coding": [{"code": "refuted"}]})
    result = run(inactive, refuted)
    assert result.verdict == "clear" and not result.information and result.to_json()["information"] == []


def test_text_only_problem_goes_to_needs_review_with_the_reference():
    result = run(text_condition("c", "DVT right leg"))
    assert result.needs_review and result.needs_review[0]["evidence"] == "Condition/c"
    assert "dvt" in result.needs_review[0]["reason"].lower()


def test_unconfirmed_finding_is_flagged():
    result = run(condition("c", "I82.402", ICD, verification="provisional"))
    f = next(f for f in result.findings if f.rule == "dvt-acute")
    assert f.unconfirmed and "unconfirmed" in f.message.lower()


def test_finding_details_carry_dates_values_and_codes():
    result = run(observation("o", "777-3", 15, "10*3/uL"), condition("c", "I82.402", ICD, onset="2024-05-20"))
    plt = next(f for f in result.findings if f.rule == "platelets-critical")
    d = plt.details[0]
    assert d.ref == "Observation/o" and d.value == 15 and d.unit == "10*9/L" and d.dates["effective"] == "2024-05-31"
    dvt = next(f for f in result.findings if f.rule == "dvt-acute")
    assert dvt.details[0].dates["onset"] == "2024-05-20" and dvt.details[0].code.code == "I82.402"
    assert "2024-05-20" in dvt.message


def test_duplicate_conditions_merge_into_one_finding_with_all_evidence():
    result = run(*[condition(f"c{i}", "64859006") for i in range(12)], techniques=["deep-tissue"])
    findings = [f for f in result.findings if f.rule == "osteoporosis"]
    assert len(findings) == 1 and len(findings[0].evidence) == 12
    assert "and 9 more" in findings[0].message


def test_threshold_override_changes_the_answer():
    kb = load_kb({"platelets_relative_below": 30})
    assert "platelets-low" not in rules_of(run(observation("o", "777-3", 35, "10*3/uL"), kb=kb))
    assert "platelets-low" in rules_of(run(observation("o", "777-3", 35, "10*3/uL")))


def test_unverified_codes_are_flagged_on_the_finding():
    result = run(condition("c", "132281000119108"))  # Acute DVT child concept: [B] in the KB
    f = next(f for f in result.findings if f.rule == "dvt-acute")
    assert f.verified is False
    result = run(condition("c", "I82.402", ICD))
    assert next(f for f in result.findings if f.rule == "dvt-acute").verified is True


# ---------------------------------------------------------------------------------------------------------------
# Every rule in the KB fires from its own first code, for its techniques (generated from the data)


def _rule_rows():
    kb = load_kb()
    raw = kb._raw["rules"]
    rows = []
    for rid, r in raw.items():
        rule = kb.rules[rid]
        codes = r.get("codes") or {}
        if rule.kind in ("observation", "allergy", "procedure"):
            continue
        for system, key in ((SCT, "snomed"), (ICD, "icd10cm"), (RXN, "rxnorm")):
            entries = codes.get(key) or []
            if not entries:
                continue
            e = entries[0]
            code = e.get("code") or e["prefix"]
            if key == "icd10cm" and e.get("seventh"):
                code = code + "XXXA"[: max(0, 7 - len(code.replace(".", "")))] if len(code.replace(".", "")) < 7 else code
            rows.append(pytest.param(rid, system, code, id=f"{rid}-{key}-{code}"))
    return rows


@pytest.mark.parametrize("rule_id,system,code", _rule_rows())
def test_every_rule_fires_from_its_codes_for_each_of_its_techniques(rule_id, system, code):
    kb = load_kb()
    rule = kb.rules[rule_id]
    onset = "2024-05-28"
    if system == RXN:
        res = med_request("m", code)
    else:
        res = condition("c", code, system, onset=onset)
    result = run(res)
    assert rule_id in rules_of(result), (rule_id, rules_of(result), result.needs_review)
    finding = next(f for f in result.findings if f.rule == rule_id)
    for technique in TECHNIQUES:
        applies = finding.applies_to([technique], None)
        assert applies == (technique in rule.techniques), technique
        verdict = run(res, techniques=[technique]).verdict
        if applies and rule.cls in ("absolute", "local"):
            assert verdict == "contraindicated"
        elif applies:
            assert verdict in ("caution", "contraindicated")


def test_repeated_uncoded_problem_is_one_review_entry():
    result = run(*[text_condition(f"c{i}", "Blood clot in leg") for i in range(5)])
    assert len(result.needs_review) == 1
    entry = result.to_json()["needsReview"][0]
    assert entry["evidence"] == "Condition/c0" and entry["alsoIn"] == [f"Condition/c{i}" for i in range(1, 5)]


@pytest.mark.parametrize("code,first", [("O09.91", True), ("O09.92", False), ("O88.211", True), ("O36.5131", False)],
                         ids=["o-code-first-trimester", "o-code-second-trimester", "obstetric-vte-first-trimester",
                              "seven-character-o-code-last-digit-is-the-fetus"])
def test_trimester_from_o_code(code, first):
    found = rules_of(run(condition("c", code, ICD)))
    assert "pregnancy" in found
    assert ("pregnancy-first-trimester" in found) is first


def test_possible_pregnancy_answer_counts_unconfirmed():
    result = run(observation("o", "82810-3", answer=(SCT, "102874004")), techniques=["swedish"])
    f = next(f for f in result.findings if f.rule == "pregnancy")
    assert result.verdict == "caution" and f.unconfirmed
