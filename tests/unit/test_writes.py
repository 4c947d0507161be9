"""Pure parts of fhir_massage.writes: reading transaction support from a CapabilityStatement, and the outcome's
summaries the pages use to say what was saved."""

from __future__ import annotations

import pytest

from fhir_massage.errors import FhirUnavailable, InvalidInput
from fhir_massage.fhir import FhirClient, FhirResult
from fhir_massage.writes import EntryNotWritten, WriteOutcome, supports_transactions, write_bundle


def cap(*codes: str, mode: str = "server") -> dict:
    return {"resourceType": "CapabilityStatement",
            "rest": [{"mode": mode, "interaction": [{"code": c} for c in codes]}]}


@pytest.mark.parametrize("capability, expected", [
    pytest.param(cap("transaction", "batch"), True, id="declares-transaction"),
    pytest.param(cap("batch"), False, id="batch-only"),
    pytest.param(cap(), False, id="no-system-interactions"),
    pytest.param(cap("transaction", mode="client"), None, id="client-rest-only-says-nothing-about-the-server"),
    pytest.param({"resourceType": "Bundle"}, None, id="not-a-capability-statement"),
    pytest.param(None, None, id="nothing"),
])
def test_supports_transactions(capability, expected):
    assert supports_transactions(capability) is expected


def test_outcome_summaries_follow_bundle_order():
    entries = ({"fullUrl": "urn:uuid:a", "resource": {"resourceType": "ServiceRequest"}, "request": {"method": "POST"}},
               {"fullUrl": "urn:uuid:b", "resource": {"resourceType": "DetectedIssue"}, "request": {"method": "POST"}},
               {"resource": {"resourceType": "Provenance"}, "request": {"method": "PUT", "url": "Provenance/p"}})
    out = WriteOutcome(False, [FhirResult(201)], [(entries[1], FhirUnavailable("down")),
                                                 (entries[2], EntryNotWritten("not sent"))],
                       entries, (FhirResult(201), FhirUnavailable("down"), EntryNotWritten("not sent")),
                       {"urn:uuid:a": "ServiceRequest/1"})
    assert not out.complete
    assert out.saved_refs() == ["ServiceRequest/1"]
    assert out.by_type() == {"ServiceRequest": ["1"]}
    assert out.missing_types() == ["DetectedIssue", "Provenance"]


def test_only_transaction_bundles_are_taken():
    with FhirClient("https://ehr.example.org/fhir") as client:
        with pytest.raises(InvalidInput):
            write_bundle(client, {"resourceType": "Bundle", "type": "batch", "entry": []}, transactions=False)
        with pytest.raises(InvalidInput, match="only POST, PUT and DELETE"):
            write_bundle(client, {"resourceType": "Bundle", "type": "transaction",
                                  "entry": [{"request": {"method": "GET", "url": "Patient/1"}}]}, transactions=False)
