"""chart.py: FHIR JSON -> facts. Tolerant (odd data becomes warnings), strict only about who the patient is."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_massage.chart import from_bundle, from_resources, parse_date
from fhir_massage.errors import InvalidInput
from fhir_massage.knowledge import Site
from tests.unit.test_screening_rules import (
    ICD, LOINC, RXN, SCT, bp, condition, med_request, observation, patient, site, text_condition,
)


def test_no_patient_is_an_error():
    with pytest.raises(InvalidInput, match="no Patient"):
        from_resources([condition("c", "I82.402", ICD)])


def test_several_patients_is_an_error():
    with pytest.raises(InvalidInput, match="2 patients"):
        from_resources([patient(), patient(pid="p2")])


def test_the_same_patient_twice_is_one_patient():
    chart = from_resources([patient(), patient()])
    assert chart.patient.ref == "Patient/p1"


def test_resources_of_another_patient_are_not_screened():
    other = condition("c", "I82.402", ICD)
    other["subject"] = {"reference": "Patient/someone-else"}
    chart = from_resources([patient(), other, condition("mine", "I82.402", ICD)])
    assert [c.ref for c in chart.conditions] == ["Condition/mine"]
    assert any("another patient" in w or "other than" in w for w in chart.warnings)


def test_urn_uuid_references_in_a_transaction_bundle_are_the_patient():
    pt = patient(pid="4b1c")
    cond = condition("c", "64859006")
    cond["subject"] = {"reference": "urn:uuid:4b1c"}
    b = {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"fullUrl": "urn:uuid:4b1c", "resource": pt}, {"fullUrl": "urn:uuid:c", "resource": cond}]}
    assert len(from_bundle(b).conditions) == 1


@pytest.mark.parametrize("value,expected", [
    ("2020-11-24", (date(2020, 11, 24), date(2020, 11, 24))),
    ("2020-11-24T10:00:00-05:00", (date(2020, 11, 24), date(2020, 11, 24))),
    ("2020-02", (date(2020, 2, 1), date(2020, 2, 29))),
    ("2020", (date(2020, 1, 1), date(2020, 12, 31))),
    ("yesterday", None), ("", None), (None, None), (20201124, None), ("2020-13-01", None),
])
def test_parse_date_partial_and_bad(value, expected):
    assert parse_date(value) == expected


def test_condition_fields_statuses_dates_sites():
    c = condition("c", "I82.402", ICD, status="resolved", verification="unconfirmed", onset="2020-11",
                  abatement="2020-12-23", body_site=site("30021000", "left"))
    fact = from_resources([patient(), c]).conditions[0]
    assert fact.clinical_status == "resolved" and fact.verification_status == "unconfirmed"
    assert fact.onset_earliest == date(2020, 11, 1) and fact.onset_latest == date(2020, 11, 30)
    assert fact.abated and fact.abatement_latest == date(2020, 12, 23)
    assert fact.body_sites[0].site == Site("30021000", "left")
    assert fact.codings[0] == ("icd10cm", "I82.402", None)


def test_onset_period_age_and_string():
    c1 = condition("c1", "64859006", onset=None)
    c1["onsetPeriod"] = {"start": "2019-01-05", "end": "2019-02"}
    c2 = condition("c2", "64859006", onset=None)
    c2["onsetAge"] = {"value": 40, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}
    c3 = condition("c3", "64859006", onset=None)
    c3["onsetString"] = "in her forties"
    chart = from_resources([patient(birth="1980-03-04"), c1, c2, c3])
    f1, f2, f3 = chart.conditions
    assert (f1.onset_earliest, f1.onset_latest) == (date(2019, 1, 5), date(2019, 2, 28))
    assert f2.onset_earliest == date(2020, 3, 4)
    assert f3.onset_earliest is None and f3.onset_text == "in her forties"


def test_bad_onset_date_is_a_warning_not_an_error():
    c = condition("c", "64859006", onset="last spring")
    chart = from_resources([patient(), c])
    assert chart.conditions[0].onset_earliest is None
    assert any("onset date" in w for w in chart.warnings)


def test_only_screening_observations_are_kept():
    chart = from_resources([patient(), observation("h", "8302-2", 170, "cm"), observation("t", "8310-5", 100.4, "[degF]")])
    assert [o.ref for o in chart.observations] == ["Observation/t"]
    assert chart.observations[0].value == pytest.approx(38.0) and chart.observations[0].unit == "Cel"


def test_unknown_unit_is_a_warning_and_no_value():
    chart = from_resources([patient(), observation("p", "777-3", 35, "furlongs")])
    assert chart.observations[0].value is None
    assert any("furlongs" in w for w in chart.warnings)


def test_blood_pressure_panel_and_separate_components():
    chart = from_resources([patient(), bp("panel", 150, 95), observation("s", "8480-6", 182, "mm[Hg]")])
    by_ref = {o.ref: o for o in chart.observations}
    assert (by_ref["Observation/panel"].systolic, by_ref["Observation/panel"].diastolic) == (150, 95)
    assert by_ref["Observation/s"].systolic == 182 and by_ref["Observation/s"].diastolic is None


def test_pregnancy_answers_loinc_and_snomed():
    chart = from_resources([patient(), observation("a", "82810-3", answer=(LOINC, "LA15173-0")),
                            observation("b", "82810-3", answer=(SCT, "60001007"))])
    assert [o.answer for o in chart.observations] == ["pregnant", "not-pregnant"]


def test_medication_reference_to_contained_and_bundled_medication():
    contained = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
                 "subject": {"reference": "Patient/p1"}, "authoredOn": "2024-05-01",
                 "contained": [{"resourceType": "Medication", "id": "med",
                                "code": {"coding": [{"system": RXN, "code": "855332"}]}}],
                 "medicationReference": {"reference": "#med"}}
    bundled = {"resourceType": "MedicationStatement", "id": "m2", "status": "active",
               "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "Medication/x"}}
    medication = {"resourceType": "Medication", "id": "x",
                  "code": {"text": "compounded"},
                  "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXN, "code": "1364430"}]}}]}
    chart = from_resources([patient(), contained, bundled, medication])
    codes = {m.ref: {c for _, c, _ in m.codings} for m in chart.medications}
    assert codes == {"MedicationRequest/m1": {"855332"}, "MedicationStatement/m2": {"1364430"}}


def test_missing_referenced_medication_is_a_warning():
    r = med_request("m", "x")
    del r["medicationCodeableConcept"]
    r["medicationReference"] = {"reference": "Medication/gone", "display": "Eliquis 5 mg"}
    chart = from_resources([patient(), r])
    assert chart.medications[0].text == "Eliquis 5 mg"
    assert any("Medication/gone" in w for w in chart.warnings)


def test_operation_outcome_from_a_failed_search_becomes_a_warning():
    oo = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "incomplete",
                                                         "diagnostics": "Procedure search failed"}]}
    chart = from_resources([patient(), oo])
    assert any("Procedure search failed" in w for w in chart.warnings)


def test_text_only_condition_is_kept():
    chart = from_resources([patient(), text_condition("c", "Left calf DVT")])
    assert chart.conditions[0].text == "Left calf DVT" and chart.conditions[0].codings == ()


# Odd data must never raise: any JSON-ish values in the places the reader looks.
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
                     max_leaves=10)
_coding = st.fixed_dictionaries({}, optional={"system": st.sampled_from([SCT, ICD, RXN, LOINC, "x"]) | _json,
                                               "code": st.sampled_from(["I82.402", "777-3", "855332", "128053003", "8310-5", "85354-9", "8480-6"]) | _json,
                                               "display": _json})
_concept = st.fixed_dictionaries({}, optional={"coding": st.lists(_coding, max_size=3) | _json, "text": _json})
_shaped = st.dictionaries(st.sampled_from(["code", "clinicalStatus", "valueQuantity", "medicationCodeableConcept", "bodySite",
                                           "valueCodeableConcept", "component", "category"]),
                          _concept | st.lists(_concept, max_size=2) | st.fixed_dictionaries({"value": _json, "unit": _json, "code": _json}),
                          max_size=5)
_keys = st.sampled_from(["code", "clinicalStatus", "verificationStatus", "onsetDateTime", "onsetPeriod", "onsetAge",
                         "abatementDateTime", "abatementBoolean", "bodySite", "subject", "status", "effectiveDateTime",
                         "valueQuantity", "component", "valueCodeableConcept", "medicationCodeableConcept",
                         "medicationReference", "contained", "authoredOn", "effectivePeriod", "reaction",
                         "performedPeriod", "category", "id", "issue", "patient", "recordedDate"])
_types = st.sampled_from(["Condition", "Observation", "MedicationRequest", "MedicationStatement",
                          "MedicationAdministration", "AllergyIntolerance", "Procedure", "Medication",
                          "OperationOutcome", "Encounter", None, 7])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_types, st.dictionaries(_keys, _json, max_size=6) | _shaped), max_size=6))
def test_odd_data_never_raises(items):
    from datetime import date as _date

    from fhir_massage.screening import screen

    resources = [patient()]
    for rtype, body in items:
        r = dict(body)
        r["resourceType"] = rtype
        resources.append(r)
    chart = from_resources(resources)
    screen(chart, today=_date(2024, 6, 1))
