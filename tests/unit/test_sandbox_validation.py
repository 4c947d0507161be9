"""Write-time validation, date ranges, fault settings and the generated CapabilityStatement."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fhir_massage.sandbox import dates
from fhir_massage.sandbox.capability import capability_statement
from fhir_massage.sandbox.faults import FaultConfig, FaultInjector
from fhir_massage.sandbox.outcome import FhirProblem
from fhir_massage.sandbox.searchparams import SEARCH_PARAMS
from fhir_massage.sandbox.validation import validate

SUBJECT = {"reference": "Patient/1"}

INVALID = [
    ("unknown element", {"resourceType": "Condition", "subject": SUBJECT, "colour": "red"}, "Condition.colour"),
    ("missing required", {"resourceType": "Condition"}, "Condition.subject"),
    ("bad dateTime", {"resourceType": "Condition", "subject": SUBJECT, "onsetDateTime": "2020-13-01"},
     "Condition.onsetDateTime"),
    ("impossible day", {"resourceType": "Condition", "subject": SUBJECT, "recordedDate": "2021-02-30"},
     "Condition.recordedDate"),
    ("wrong JSON type deep", {"resourceType": "Condition", "subject": SUBJECT,
                              "code": {"coding": [{"system": 7}]}}, "Condition.code.coding[0].system"),
    ("required binding", {"resourceType": "Patient", "gender": "f"}, "Patient.gender"),
    ("bad id", {"resourceType": "Patient", "id": "has space"}, "Patient.id"),
    ("narrative not XHTML", {"resourceType": "Patient", "text": {"status": "generated", "div": "<p>hi</p>"}},
     "Patient.text.div"),
]


@pytest.mark.parametrize("resource,expression", [r[1:] for r in INVALID], ids=[r[0] for r in INVALID])
def test_invalid_resources_name_the_element(resource: dict, expression: str) -> None:
    with pytest.raises(FhirProblem) as err:
        validate(resource)
    assert err.value.status == 400
    assert any(expression in i.get("expression", []) for i in err.value.issues), err.value.issues
    assert expression in err.value.message


def test_type_mismatch_and_unknown_type() -> None:
    with pytest.raises(FhirProblem) as err:
        validate({"resourceType": "Patient"}, expected_type="Condition")
    assert err.value.status == 400 and "URL is for Condition" in err.value.message
    with pytest.raises(FhirProblem):
        validate({"resourceType": "Spaceship"})
    with pytest.raises(FhirProblem):
        validate(["not", "an", "object"])


def test_valid_resource_passes_unchanged() -> None:
    r = {"resourceType": "Observation", "status": "final", "code": {"text": "t"},
         "effectivePeriod": {"start": "2020-01-01T10:00:00Z"}, "valueQuantity": {"value": 38.5, "unit": "Cel"}}
    assert validate(r) is r


def _utc(*a: int) -> float:
    return datetime(*a, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("text,lo,hi", [
    ("2020", _utc(2020, 1, 1), _utc(2021, 1, 1)),
    ("2020-12", _utc(2020, 12, 1), _utc(2021, 1, 1)),
    ("2020-02-29", _utc(2020, 2, 29), _utc(2020, 3, 1)),
    ("2020-01-01T10:00", _utc(2020, 1, 1, 10), _utc(2020, 1, 1, 10, 1)),
    ("2020-01-01T10:00:00+02:00", _utc(2020, 1, 1, 8), _utc(2020, 1, 1, 8, 0, 1)),
    ("2020-01-01T10:00:00.5Z", _utc(2020, 1, 1, 10) + 0.5, _utc(2020, 1, 1, 10) + 0.6),
])
def test_dates_are_ranges(text: str, lo: float, hi: float) -> None:
    got = dates.date_range(text)
    assert got[0] == pytest.approx(lo) and got[1] == pytest.approx(hi)


@pytest.mark.parametrize("text", ["2021-02-29", "20", "2020-1-1", "2020-01-01T25:00", "yesterday", ""])
def test_bad_dates(text: str) -> None:
    with pytest.raises(dates.BadDate):
        dates.date_range(text)


def test_open_period_is_unbounded() -> None:
    lo, hi = dates.period_range({"start": "2020"})
    assert lo == _utc(2020, 1, 1) and hi == dates.OPEN_HIGH


@pytest.mark.parametrize("data", [
    {"fail_status": 404}, {"latency_ms": -1}, {"fail_every_n": "2"}, {"speed": 1}, [], {"fail_methods": "POST"},
], ids=str)
def test_fault_config_rejects_nonsense(data) -> None:
    with pytest.raises(ValueError):
        FaultConfig.from_json(data)


def test_fault_injector_counts_matching_requests_only() -> None:
    inj = FaultInjector(FaultConfig(fail_every_n=2, fail_status=429, fail_methods=("POST",), retry_after=3))
    got = [inj.decide(m, p).fail_status for m, p in [
        ("POST", "/fhir/Patient"), ("GET", "/fhir/Patient"), ("POST", "/fhir/Patient"), ("POST", "/_sandbox/x"),
        ("POST", "/fhir"), ("POST", "/fhir")]]
    assert got == [None, None, 429, None, None, 429]
    assert not FaultInjector().decide("GET", "/fhir/Patient").fail_status


def test_capability_statement_is_generated_from_the_table() -> None:
    cs = capability_statement("http://x/fhir", {"service": [{"text": "SMART"}]}, date="2026-01-01")
    assert cs["fhirVersion"] == "4.0.1" and "json" in cs["format"]
    rest = cs["rest"][0]
    assert rest["security"] == {"service": [{"text": "SMART"}]}
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) == set(SEARCH_PARAMS)
    for rtype, table in SEARCH_PARAMS.items():
        names = {p["name"] for p in by_type[rtype]["searchParam"]}
        assert names == set(table) | {"_id", "_lastUpdated"}
    assert "Procedure:based-on" in by_type["ServiceRequest"]["searchRevInclude"]
    assert "ServiceRequest:patient" in by_type["ServiceRequest"]["searchInclude"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}


def test_fault_injector_latency_and_drop_decisions() -> None:
    inj = FaultInjector(FaultConfig(latency_ms=250, drop_every_n=3, fail_paths=("/fhir/Condition",)))
    decisions = [inj.decide("GET", p) for p in ["/fhir/Condition", "/fhir/Patient", "/fhir/Condition",
                                                 "/fhir/Condition?x=1"]]
    assert [d.delay_s for d in decisions] == [0.25, 0.0, 0.25, 0.25]
    assert [d.drop for d in decisions] == [False, False, False, True]
    inj.set(FaultConfig())
    assert inj.decide("GET", "/fhir/Condition").delay_s == 0.0
