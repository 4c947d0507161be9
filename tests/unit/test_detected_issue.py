"""DetectedIssue from a finding: valid R4 (checked with fhir.resources.R4B), codes and severity by rule kind."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from fhir.resources.R4B.detectedissue import DetectedIssue

from fhir_massage.builders.detected_issue import RULE_IDENTIFIER_SYSTEM, detected_issue
from tests.unit.test_screening_rules import ICD, condition, med_request, observation, run

NOW = datetime(2024, 6, 1, 9, 30, tzinfo=timezone.utc)


def _finding(rule_id, *resources):
    result = run(*resources)
    return result, next(f for f in result.findings if f.rule == rule_id)


@pytest.mark.parametrize("rule_id,resource,code,severity", [
    ("dvt-acute", condition("c", "I82.402", ICD), "COND", "high"),
    ("anticoagulant", med_request("m", "855332"), "DACT", "moderate"),
    ("platelets-low", observation("o", "777-3", 35, "10*3/uL"), "LAB", "moderate"),
    ("pregnancy", condition("c", "72892002"), "PREG", "moderate"),
    ("open-wound", condition("c", "S81.812A", ICD), "COND", "low"),
])
def test_detected_issue_is_valid_r4_with_code_and_severity(rule_id, resource, code, severity):
    result, finding = _finding(rule_id, resource)
    issue = detected_issue(finding, patient_ref=result.patient, now=NOW, order_ref="ServiceRequest/sr1",
                           author_ref="Practitioner/dr1",
                           mitigation={"action": {"text": "Physician clearance obtained"}, "date": "2024-06-01"})
    DetectedIssue.model_validate(issue)
    assert issue["code"]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code,
                                          "display": issue["code"]["coding"][0]["display"]}
    assert issue["severity"] == severity and issue["status"] == "final"
    assert {"system": RULE_IDENTIFIER_SYSTEM, "value": rule_id} in issue["identifier"]
    assert f"[{rule_id}]" in issue["code"]["text"]
    assert issue["implicated"][0] == {"reference": "ServiceRequest/sr1"}
    assert [i["reference"] for i in issue["implicated"][1:]] == list(finding.evidence)
    assert issue["evidence"][0]["detail"] == [{"reference": r} for r in finding.evidence]
    assert issue["patient"] == {"reference": result.patient}
    assert issue["identifiedDateTime"] == "2024-06-01T09:30:00+00:00"
    assert finding.evidence_class in issue["detail"]


def test_detail_carries_dates_and_values():
    result, finding = _finding("platelets-low", observation("o", "777-3", 35, "10*3/uL"))
    issue = detected_issue(finding, patient_ref=result.patient, now=NOW)
    assert "35 ×10⁹/L" in issue["detail"] and "2024-05-31" in issue["detail"]  # UCUM 10*9/L, printed (units.py)
    assert "10*9/L" not in issue["detail"]
    assert "implicated" in issue and "ServiceRequest" not in str(issue["implicated"])


def test_reference_url_when_the_rule_has_one():
    result, finding = _finding("pregnancy", condition("c", "72892002"))
    issue = detected_issue(finding, patient_ref=result.patient, now=NOW)
    assert issue["reference"].startswith("https://")
    DetectedIssue.model_validate(issue)


def test_extra_identifier_first_and_naive_time_refused():
    result, finding = _finding("dvt-acute", condition("c", "I82.402", ICD))
    issue = detected_issue(finding, patient_ref=result.patient, now=NOW, identifier={"system": "urn:x", "value": "1"})
    assert issue["identifier"][0] == {"system": "urn:x", "value": "1"}
    with pytest.raises(ValueError):
        detected_issue(finding, patient_ref=result.patient, now=datetime(2024, 6, 1, 9, 30))


def test_unverified_codes_are_said_in_the_detail():
    result, finding = _finding("dvt-acute", condition("c", "132281000119108"))
    assert "not verified" in detected_issue(finding, patient_ref=result.patient, now=NOW)["detail"]
