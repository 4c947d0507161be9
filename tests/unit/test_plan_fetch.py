"""The plan's data fetch (smart_app.plan.fetch) when the EHR cannot give the Patient: the error the EHR answered
reaches the app's error pages; it is never turned into a misleading "the data has no Patient resource"."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_massage.errors import FhirAuthError, FhirError, FhirNotFound, FhirUnavailable
from smart_app.plan import fetch, plan_searches


class BatchOnlyEhr:
    """Answers every batch entry with 200 and an empty searchset, except the Patient read, which gets ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.batches = 0

    def next_page(self, bundle: dict[str, Any]) -> None:
        return None  # every searchset here is a single page

    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]:
        self.batches += 1
        entries = []
        for e in bundle["entry"]:
            url = e["request"]["url"]
            if url.startswith("Patient/"):
                entries.append({"response": {"status": str(self.status), "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "exception", "diagnostics": "EHR trouble"}]}}})
            else:
                entries.append({"resource": {"resourceType": "Bundle", "type": "searchset", "total": 0},
                                "response": {"status": "200"}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}


@pytest.mark.parametrize(("status", "error"), [(500, FhirUnavailable), (503, FhirUnavailable), (404, FhirNotFound),
                                                (403, FhirAuthError)],
                         ids=["server-error", "unavailable-after-retry", "patient-gone", "refused"])
def test_a_patient_the_ehr_cannot_give_raises_what_it_answered(status: int, error: type[FhirError]) -> None:
    assert any(key == "patient" for key, _ in plan_searches("p1"))
    ehr = BatchOnlyEhr(status)
    with pytest.raises(error) as raised:
        fetch(ehr, "p1")
    assert raised.value.status == status
    assert ehr.batches <= 2  # at most one retry batch for a retryable answer
