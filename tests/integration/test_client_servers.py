"""FhirClient against real FHIR servers on loopback: an independent one (SEKMET) and our own sandbox.

Each test runs once per server fixture. The sandbox fixture (``sandbox_open_url``, tests/fixtures/sandbox.py) is
owned by the sandbox work; until it exists the sandbox cases are skipped with a reason that says so. Servers are
session-wide, so every test writes data with its own random marker and only searches for that marker.
Differences between the servers found here are written up in docs/server-differences.md.
"""

from __future__ import annotations

import uuid

import pytest

from fhir_massage.errors import FhirConflict, FhirError, FhirNotFound
from fhir_massage.fhir import (FhirClient, FhirResult, entry_outcomes, new_urn, request_entry, resources,
                               transaction_bundle)

pytestmark = pytest.mark.integration

SERVERS = ["sekmet_server", "sandbox_open_url"]
MARK_SYSTEM = "urn:fhir-massage:test-marker"


@pytest.fixture(params=SERVERS)
def client(request: pytest.FixtureRequest):
    base = request.getfixturevalue(request.param)
    with FhirClient(base, timeout=(5, 30), max_retries=0) as fhir:
        yield fhir


def marker() -> str:
    return uuid.uuid4().hex


def patient(family: str, mark: str | None = None, **extra) -> dict:
    resource = {"resourceType": "Patient", "name": [{"family": family, "given": ["Test"]}], "gender": "female",
                "birthDate": "1970-01-01", **extra}
    if mark:
        resource["identifier"] = [{"system": MARK_SYSTEM, "value": mark}]
    return resource


def test_capabilities_say_r4(client: FhirClient) -> None:
    statement = client.capabilities()
    assert statement["fhirVersion"] == "4.0.1"
    assert any(rest.get("mode") == "server" for rest in statement.get("rest", []))


def test_create_read_vread_update_delete(client: FhirClient) -> None:
    family = f"Crud{marker()[:10]}"
    created = client.create(patient(family))
    assert isinstance(created, FhirResult) and created.created
    pid = created.id
    assert pid and created.version_id

    first = client.read("Patient", pid)
    assert first["name"][0]["family"] == family
    v1 = first["meta"]["versionId"]

    first["gender"] = "male"
    updated = client.update(first, if_match=True)
    assert updated.status == 200
    assert updated.version_id and updated.version_id != v1
    assert client.read("Patient", pid)["gender"] == "male"
    assert client.vread("Patient", pid, v1)["gender"] == "female"  # the old version stays readable

    with pytest.raises(FhirConflict) as stale:
        client.update(first, if_match=v1)  # http.html#concurrency: 412 for a stale If-Match
    assert stale.value.status in (409, 412)
    assert stale.value.message  # words from the server's OperationOutcome or a plain fallback

    deleted = client.delete("Patient", pid)
    assert deleted.status in (200, 202, 204)
    with pytest.raises(FhirNotFound) as gone:
        client.read("Patient", pid)
    assert gone.value.status in (404, 410)


def test_read_of_unknown_id_is_not_found(client: FhirClient) -> None:
    with pytest.raises(FhirNotFound) as info:
        client.read("Patient", f"no-such-{marker()[:12]}")
    assert info.value.status == 404


def test_search_pages_through_more_than_two_pages(client: FhirClient) -> None:
    family = f"Pager{marker()[:10]}"
    client.transaction([request_entry("POST", "Patient", patient(family)) for _ in range(7)])
    client.reset_request_count()

    pages = list(client.iter_pages("Patient", {"family": family, "_count": 3}))

    assert len(pages) == 3
    assert client.request_count == 3
    found = [r for page in pages for r in resources(page, "Patient")]
    assert len(found) == 7 and len({r["id"] for r in found}) == 7
    assert all(r["name"][0]["family"] == family for r in found)


def test_post_search_finds_the_same_as_get(client: FhirClient) -> None:
    family = f"Post{marker()[:10]}"
    client.create(patient(family))
    client.create(patient(family))
    by_get = {r["id"] for r in client.search_all("Patient", {"family": family}, method="get")}
    by_post = {r["id"] for r in client.search_all("Patient", {"family": family}, method="post")}
    assert len(by_get) == 2 and by_post == by_get


def test_conditional_create_returns_the_existing_resource(client: FhirClient) -> None:
    mark = marker()
    criteria = {"identifier": f"{MARK_SYSTEM}|{mark}"}
    first = client.create(patient("Cond", mark), if_none_exist=criteria)
    again = client.create(patient("Cond", mark), if_none_exist=criteria)
    assert first.created
    assert again.status == 200 and not again.created  # http.html#ccreate: one match -> 200, nothing created
    assert again.id == first.id
    assert len(client.search_all("Patient", criteria)) == 1


def test_conditional_create_with_several_matches_is_a_conflict(client: FhirClient) -> None:
    family = f"Twin{marker()[:10]}"
    client.create(patient(family))
    client.create(patient(family))
    with pytest.raises(FhirConflict) as info:  # http.html#ccreate: multiple matches -> 412
        client.create(patient(family), if_none_exist={"family": family})
    assert info.value.status == 412


def test_transaction_resolves_urn_uuid_references(client: FhirClient) -> None:
    mark = marker()
    patient_urn, obs_urn = new_urn(), new_urn()
    observation = {"resourceType": "Observation", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                   "subject": {"reference": patient_urn},
                   "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org",
                                     "code": "/min"}}
    answer = client.transaction(transaction_bundle([
        request_entry("POST", "Patient", patient("Tx", mark), full_url=patient_urn,
                      if_none_exist={"identifier": f"{MARK_SYSTEM}|{mark}"}),
        request_entry("POST", "Observation", observation, full_url=obs_urn),
    ]))
    made_patient, made_obs = entry_outcomes(answer)
    assert isinstance(made_patient, FhirResult) and made_patient.created and made_patient.id
    assert isinstance(made_obs, FhirResult) and made_obs.created and made_obs.id
    stored = client.read("Observation", made_obs.id)
    # bundle.html#references / http.html#trules: urn:uuid references become the new resource's reference
    assert stored["subject"]["reference"].endswith(f"Patient/{made_patient.id}")
    assert not stored["subject"]["reference"].startswith("urn:")


def test_failed_transaction_changes_nothing(client: FhirClient) -> None:
    family = f"Atomic{marker()[:10]}"
    existing = client.create(patient(f"Other{marker()[:10]}")).resource  # not a prefix match of `family`
    assert existing is not None
    with pytest.raises(FhirError) as info:
        client.transaction([
            request_entry("POST", "Patient", patient(family)),
            request_entry("PUT", f"Patient/{existing['id']}", existing, if_match="999"),  # stale -> fails
        ])
    assert info.value.status in (400, 409, 412, 422)
    assert client.search_all("Patient", {"family": family}) == []  # http.html#transaction: all or nothing


def test_batch_entries_succeed_or_fail_one_by_one(client: FhirClient) -> None:
    family = f"Batch{marker()[:10]}"
    answer = client.batch([
        request_entry("POST", "Patient", patient(family)),
        request_entry("GET", f"Patient/no-such-{marker()[:12]}"),
        request_entry("GET", f"Patient?family={family}"),
    ])
    created, missing, search = entry_outcomes(answer)
    assert isinstance(created, FhirResult) and created.created
    assert isinstance(missing, FhirNotFound) and missing.status == 404
    assert isinstance(search, FhirResult) and search.status == 200
    assert search.resource is not None and search.resource["type"] == "searchset"
    # entries are processed in order (http.html#trules), so the search sees the Patient made just before it
    assert [r["id"] for r in resources(search.resource)] == [created.id]
