"""Fetch what screening reads for one patient from a live FHIR R4 server, in ONE batch request when possible.

The batch (FHIR R4 http.html#transaction, type ``batch``) holds GET searches: the Patient, Conditions,
Observations of the LOINC codes screening uses, the three medication resources, AllergyIntolerance and Procedure.
Each batch-response entry is a searchset page; further pages are followed with the client's paging (same-origin
links only). Medications given as ``medicationReference`` to a Medication that is neither contained nor already
fetched are read in a second batch, only when there are any: ``_include=MedicationRequest:medication`` would save
that round trip but is not supported everywhere (servers answer 400), and one refused entry must not cost the
medication list.

Servers differ: some reject batch, some answer an entry with an error (an unsupported resource type or search
parameter). Then the failed searches are repeated one by one, in parallel, and a search that still fails is
reported as an OperationOutcome in the returned list, which chart.py turns into a warning: a missing part of the
chart is shown to the clinician, never silently read as "nothing there".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fhir_massage.errors import FhirAuthError, FhirError, FhirNotFound
from fhir_massage.fhir import FhirClient, FhirResult, batch_bundle, entry_outcomes, request_entry, resources
from fhir_massage.knowledge import load_kb

__all__ = ["fetch_chart_resources", "chart_searches", "batch_patient"]

_COUNT = "200"
_PAGE_CAP = 50


def chart_searches(patient_id: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The searches, as (resource type, params). The Patient is read separately (first batch entry)."""
    kb = load_kb()
    loinc = sorted(kb.obs_code_kind)
    obs_codes = ",".join(f"http://loinc.org|{c}" for c in loinc)
    p = ("patient", patient_id)
    return [
        ("Condition", [p, ("_count", _COUNT)]),
        ("Observation", [p, ("code", obs_codes), ("_count", _COUNT)]),
        ("MedicationRequest", [p, ("_count", _COUNT)]),
        ("MedicationStatement", [p, ("_count", _COUNT)]),
        ("MedicationAdministration", [p, ("_count", _COUNT)]),
        ("AllergyIntolerance", [p, ("_count", _COUNT)]),
        ("Procedure", [p, ("_count", _COUNT)]),
    ]


def batch_patient(entry: FhirResult | FhirError) -> dict[str, Any] | None:
    """The Patient of a batch-response entry that read it (``GET Patient/<id>``; entry_outcomes gives a FhirResult or
    the entry's FhirError, and a page reading one by one hands in what the read raised), for every page that reads
    the patient in its batch. None when the entry holds no Patient for another reason (not found, unsupported, a
    server error): the caller retries or says what is missing.

    A refused read (401/403) is raised as the FhirAuthError it is. An EHR refuses the patient itself when the token
    does not reach that chart (user/ scopes reach only what "the current user can access", SMART App Launch 2.2
    "Scopes and Launch Context": a patient outside the user's care team), and nothing a page shows about the patient
    can be right then: the user must read that the EHR refused, not that the data has no Patient."""
    if isinstance(entry, FhirAuthError):
        raise entry
    if isinstance(entry, FhirResult) and isinstance(entry.resource, dict) \
            and entry.resource.get("resourceType") == "Patient":
        return entry.resource
    return None


def _query(params: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode

    # fully percent-encoded (RFC 3986): '|' and '/' in token searches are not valid raw in a URI; servers decode them
    return urlencode(params)


def _outcome(what: str, error: Exception) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "incomplete",
                       "diagnostics": f"The server could not return the patient's {what}: {error}"}]}


def fetch_chart_resources(client: FhirClient, patient_id: str) -> list[dict[str, Any]]:
    """Every resource screening needs for ``patient_id`` (Patient first). Raises FhirNotFound when the Patient is
    not there, FhirAuthError/FhirUnavailable as the client does; partial failures become OperationOutcomes."""
    searches = chart_searches(patient_id)
    entries = [request_entry("GET", f"Patient/{patient_id}")]
    entries += [request_entry("GET", f"{rtype}?{_query(params)}") for rtype, params in searches]
    out: list[dict[str, Any]] = []
    failed: list[int] = []
    try:
        response = client.batch(batch_bundle(entries))
        outcomes = entry_outcomes(response)
    except FhirError as exc:
        if exc.status in (401, 403):
            raise
        outcomes = None  # batch not supported (or refused): search one by one below
    if outcomes is not None and len(outcomes) == len(entries):
        first = outcomes[0]
        patient = batch_patient(first)  # a refused Patient raises FhirAuthError
        if patient is not None:
            out.append(patient)
        elif isinstance(first, FhirNotFound):
            raise FhirNotFound(f"Patient {patient_id} was not found on the FHIR server.", status=404)
        else:
            failed.append(-1)
        for i, result in enumerate(outcomes[1:]):
            if isinstance(result, FhirResult) and isinstance(result.resource, dict) \
                    and result.resource.get("resourceType") == "Bundle":
                out.extend(_all_pages(client, result.resource))
            else:
                failed.append(i)
    else:
        failed = [-1] + list(range(len(searches)))

    if -1 in failed:
        out.insert(0, client.read("Patient", patient_id))
        failed.remove(-1)
    if failed:

        def one(i: int) -> list[dict[str, Any]]:
            rtype, params = searches[i]
            try:
                return client.search_all(rtype, params, page_cap=_PAGE_CAP)
            except FhirError as exc:
                if exc.status in (401, 403):
                    raise
                plain = [(k, v) for k, v in params if k != "_include"]
                if exc.status == 400 and len(plain) < len(params):
                    # _include is optional for servers (search.html#include) and some reject it with a 400: the
                    # resources themselves matter more than their inlined Medications (chart.py reads the code).
                    try:
                        return client.search_all(rtype, plain, page_cap=_PAGE_CAP)
                    except FhirError as again:
                        if again.status in (401, 403):
                            raise
                        return [_outcome(rtype, again)]
                return [_outcome(rtype, exc)]

        with ThreadPoolExecutor(max_workers=min(4, len(failed))) as pool:
            for chunk in pool.map(one, failed):
                out.extend(chunk)
    out.extend(_referenced_medications(client, out))
    return out


_MED_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration")


def _referenced_medications(client: FhirClient, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medication resources referenced (``Medication/<id>``) but not yet fetched, read in one batch."""
    have = {f"Medication/{r.get('id')}" for r in found if r.get("resourceType") == "Medication"}
    wanted: list[str] = []
    for r in found:
        if r.get("resourceType") not in _MED_TYPES:
            continue
        ref = (r.get("medicationReference") or {}).get("reference") if isinstance(r.get("medicationReference"), dict) else None
        if not isinstance(ref, str) or ref.startswith("#"):
            continue
        tail = ref.split("/_history/")[0].rsplit("/", 2)
        if len(tail) >= 2 and tail[-2] == "Medication":
            key = f"Medication/{tail[-1]}"
            if key not in have and key not in wanted:
                wanted.append(key)
    if not wanted:
        return []
    out: list[dict[str, Any]] = []
    try:
        response = client.batch(batch_bundle([request_entry("GET", key) for key in wanted]))
        for key, result in zip(wanted, entry_outcomes(response)):
            if isinstance(result, FhirResult) and isinstance(result.resource, dict):
                out.append(result.resource)
            else:
                out.append(_outcome(f"medication {key}", result if isinstance(result, Exception) else Exception("no resource")))
    except FhirError as exc:
        if exc.status in (401, 403):
            raise
        for key in wanted:
            try:
                out.append(client.read("Medication", key.split("/", 1)[1]))
            except FhirError as err:
                out.append(_outcome(f"medication {key}", err))
    return out


def _all_pages(client: FhirClient, page: dict[str, Any]) -> list[dict[str, Any]]:
    found = resources(page)
    pages = 1
    while pages < _PAGE_CAP:
        nxt = client.next_page(page)
        if nxt is None:
            break
        found.extend(resources(nxt))
        page = nxt
        pages += 1
    return found
