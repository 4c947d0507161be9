"""chart_fetch: one batch request for the whole chart; fallbacks when a server refuses batch or one search."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
import responses

from fhir_massage.chart import from_resources
from fhir_massage.chart_fetch import chart_searches, fetch_chart_resources
from fhir_massage.errors import FhirNotFound
from fhir_massage.fhir import FhirClient

BASE = "http://ehr.test/fhir"
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1980-01-01"}
COND = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I82.402"}]},
        "clinicalStatus": {"coding": [{"code": "active"}]}}


def searchset(*resources, next_url=None):
    b = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


def client():
    return FhirClient(BASE, max_retries=0, sleep=lambda s: None)


@responses.activate
def test_one_batch_request_fetches_everything_and_follows_paging():
    n = len(chart_searches("p1"))
    entries = [{"resource": PATIENT, "response": {"status": "200 OK"}},
               {"resource": searchset(COND, next_url=f"{BASE}/Condition?page=2"), "response": {"status": "200 OK"}}]
    entries += [{"resource": searchset(), "response": {"status": "200 OK"}} for _ in range(n - 1)]
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    second = dict(COND, id="c2")
    responses.get(f"{BASE}/Condition", json=searchset(second))
    with client() as c:
        found = fetch_chart_resources(c, "p1")
    assert [r["id"] for r in found] == ["p1", "c1", "c2"]
    batch = json.loads(responses.calls[0].request.body)
    assert batch["type"] == "batch" and len(batch["entry"]) == n + 1
    urls = [e["request"]["url"] for e in batch["entry"]]
    assert urls[0] == "Patient/p1"
    obs = dict(parse_qsl(next(u for u in urls if u.startswith("Observation?")).split("?", 1)[1]))
    assert obs["patient"] == "p1" and "http://loinc.org|777-3" in obs["code"].split(",")
    assert all(e["request"]["method"] == "GET" for e in batch["entry"])
    assert len(responses.calls) == 2


@responses.activate
def test_batch_refused_falls_back_to_searches():
    responses.post(BASE, status=405, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "batch not supported"}]})
    responses.get(f"{BASE}/Patient/p1", json=PATIENT)
    responses.get(f"{BASE}/Condition", json=searchset(COND))
    for rtype, _ in chart_searches("p1"):
        if rtype != "Condition":
            responses.get(f"{BASE}/{rtype}", json=searchset())
    with client() as c:
        found = fetch_chart_resources(c, "p1")
    assert {r["resourceType"] for r in found} == {"Patient", "Condition"}
    chart = from_resources(found)
    assert chart.conditions[0].ref == "Condition/c1"


@responses.activate
def test_a_failed_entry_is_retried_alone_and_reported_when_it_still_fails():
    n = len(chart_searches("p1"))
    entries = [{"resource": PATIENT, "response": {"status": "200 OK"}}]
    for i, (rtype, _) in enumerate(chart_searches("p1")):
        if rtype == "MedicationAdministration":
            entries.append({"response": {"status": "400 Bad Request", "outcome": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "unknown resource"}]}}})
        else:
            entries.append({"resource": searchset(), "response": {"status": "200 OK"}})
    assert len(entries) == n + 1
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    responses.get(f"{BASE}/MedicationAdministration", status=400,
                  json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "unknown resource"}]})
    with client() as c:
        found = fetch_chart_resources(c, "p1")
    chart = from_resources(found)
    assert any("MedicationAdministration" in w for w in chart.warnings)


@responses.activate
def test_missing_patient_is_not_found():
    n = len(chart_searches("p1"))
    entries = [{"response": {"status": "404 Not Found"}}] + [{"resource": searchset(), "response": {"status": "200 OK"}} for _ in range(n)]
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    with client() as c, pytest.raises(FhirNotFound):
        fetch_chart_resources(c, "p1")


@responses.activate
def test_referenced_medications_are_read_in_a_second_batch_only_when_needed():
    searches = chart_searches("p1")
    mr = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
          "subject": {"reference": "Patient/p1"}, "authoredOn": "2024-05-01",
          "medicationReference": {"reference": "Medication/med1"}}
    entries = [{"resource": PATIENT, "response": {"status": "200 OK"}}]
    for rtype, _ in searches:
        entries.append({"resource": searchset(mr) if rtype == "MedicationRequest" else searchset(), "response": {"status": "200 OK"}})
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    med = {"resourceType": "Medication", "id": "med1",
           "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "855332"}]}}
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response",
                               "entry": [{"resource": med, "response": {"status": "200 OK"}}]})
    with client() as c:
        found = fetch_chart_resources(c, "p1")
    second = json.loads(responses.calls[1].request.body)
    assert [e["request"]["url"] for e in second["entry"]] == ["Medication/med1"]
    chart = from_resources(found)
    assert {code for _, code, _ in chart.medications[0].codings} == {"855332"}
    assert len(responses.calls) == 2
