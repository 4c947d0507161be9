"""Sandbox search semantics, against the FHIR core with an in-memory store (no HTTP).

Each table row names the R4 rule it checks (http://hl7.org/fhir/R4/search.html sections)."""

from __future__ import annotations

import pytest

from fhir_massage.sandbox.access import OPEN
from fhir_massage.sandbox.outcome import FhirProblem
from fhir_massage.sandbox.service import FhirService
from fhir_massage.sandbox.store import Store

BASE = "http://127.0.0.1:9/fhir"
SCT = "http://snomed.info/sct"
CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def put(svc: FhirService, resource: dict) -> dict:
    return svc.update(OPEN, BASE, resource["resourceType"], resource["id"], resource).resource


def ids(result) -> list[str]:
    return [e["resource"]["id"] for e in result.body.get("entry", []) if e["search"]["mode"] == "match"]


def cond(cid: str, patient: str, code: str, onset, status: str = "active", **extra) -> dict:
    c = {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {"coding": [{"system": CLIN, "code": status}]},
        "code": {"coding": [{"system": SCT, "code": code}], "text": f"code {code}"},
        "subject": {"reference": f"Patient/{patient}"},
        **extra,
    }
    if isinstance(onset, dict):
        c["onsetPeriod"] = onset
    elif onset:
        c["onsetDateTime"] = onset
    return c


@pytest.fixture
def svc() -> FhirService:
    s = FhirService(Store(None))
    for resource in seed_resources():
        put(s, resource)
    return s


def seed_resources() -> list[dict]:
    """The data every row of SEARCHES runs against (also over HTTP: tests/integration/test_sandbox_search_http.py)."""
    return [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Zoë"]}],
         "gender": "female", "birthDate": "1970-05-06", "identifier": [{"system": "urn:mrn", "value": "MRN-1"}]},
        {"resourceType": "Patient", "id": "p2", "name": [{"family": "Mullins", "given": ["Ann"]}],
         "gender": "male", "birthDate": "1980"},
        cond("c1", "p1", "128053003", "2020-03-15"),
        cond("c2", "p1", "38341003", "2021-07-01T10:00:00Z", status="resolved"),
        cond("c3", "p2", "128053003", {"start": "2019-12-30", "end": "2020-01-05"}),
        cond("c4", "p2", "44054006", {"start": "2022-01-01"}),  # open-ended: ongoing
    ]


SEARCHES = [
    # token (§3.1.1.4.6)
    ("token system|code", "Condition", [("code", f"{SCT}|128053003")], ["c1", "c3"]),
    ("token code only", "Condition", [("code", "38341003")], ["c2"]),
    ("token |code needs no system", "Condition", [("code", "|38341003")], []),
    ("token comma is OR", "Condition", [("code", "38341003,44054006")], ["c2", "c4"]),
    ("token :not", "Condition", [("clinical-status:not", "resolved")], ["c1", "c3", "c4"]),
    ("token on code element", "Patient", [("gender", "male")], ["p2"]),
    ("token on Identifier", "Patient", [("identifier", "urn:mrn|MRN-1")], ["p1"]),
    ("repeated param is AND", "Condition", [("code", "128053003"), ("patient", "p2")], ["c3"]),
    # reference (§3.1.1.4.4)
    ("reference Type/id", "Condition", [("patient", "Patient/p1")], ["c1", "c2"]),
    ("reference bare id", "Condition", [("subject", "p2")], ["c3", "c4"]),
    ("reference absolute URL on this server", "Condition", [("patient", f"{BASE}/Patient/p1")], ["c1", "c2"]),
    ("reference :Type modifier", "Condition", [("subject:Patient", "p1")], ["c1", "c2"]),
    # string (§3.1.1.4.9): starts-with, case- and accent-insensitive
    ("string starts-with folds accents/case", "Patient", [("family", "mull")], ["p1", "p2"]),
    ("string folding on ü", "Patient", [("family", "MULLER")], ["p1"]),
    ("string :exact keeps accents", "Patient", [("family:exact", "Müller")], ["p1"]),
    ("string :exact is exact", "Patient", [("family:exact", "muller")], []),
    ("string :contains", "Patient", [("name", "ins")], []),
    ("string :contains mid-word", "Patient", [("name:contains", "llin")], ["p2"]),
    ("string name covers given", "Patient", [("name", "zoe")], ["p1"]),
    # date (§3.1.1.4.2): ranges
    ("date eq year contains day", "Condition", [("onset-date", "2020")], ["c1"]),
    ("date eq month", "Condition", [("onset-date", "2020-03")], ["c1"]),
    ("date eq needs full containment", "Condition", [("onset-date", "2019-12")], []),
    ("date ge overlaps period", "Condition", [("onset-date", "ge2020-01-01")], ["c1", "c2", "c3", "c4"]),
    ("date gt after the whole day", "Condition", [("onset-date", "gt2020-03-15")], ["c2", "c4"]),
    ("date lt", "Condition", [("onset-date", "lt2020-01-01")], ["c3"]),
    ("date le includes the day", "Condition", [("onset-date", "le2020-03-15")], ["c1", "c3"]),
    ("date ne", "Condition", [("onset-date", "ne2020-03-15")], ["c2", "c3", "c4"]),
    ("date open period is ongoing", "Condition", [("onset-date", "gt2030-01-01")], ["c4"]),
    ("date with time and zone", "Condition", [("onset-date", "ge2021-07-01T11:00:00+02:00"), ("onset-date", "le2021-07-01T12:00:00+02:00")], ["c2"]),
    ("birthdate partial stored", "Patient", [("birthdate", "1980-06-01")], []),
    ("birthdate partial stored ge", "Patient", [("birthdate", "ge1980-06-01")], ["p2"]),
    # common
    ("_id", "Condition", [("_id", "c2,c4")], ["c2", "c4"]),
    ("_lastUpdated ge today", "Condition", [("_lastUpdated", "ge2000-01-01")], ["c1", "c2", "c3", "c4"]),
    ("_lastUpdated lt past", "Condition", [("_lastUpdated", "lt2000-01-01")], []),
]


@pytest.mark.parametrize("rtype,pairs,expected", [r[1:] for r in SEARCHES], ids=[r[0] for r in SEARCHES])
def test_search_semantics(svc: FhirService, rtype: str, pairs: list, expected: list) -> None:
    result = svc.search(OPEN, BASE, rtype, pairs)
    assert sorted(ids(result)) == sorted(expected)
    assert result.body["total"] == len(expected)


def test_sort_by_date_both_ways(svc: FhirService) -> None:
    asc = ids(svc.search(OPEN, BASE, "Condition", [("_sort", "onset-date")]))
    desc = ids(svc.search(OPEN, BASE, "Condition", [("_sort", "-onset-date")]))
    assert asc == ["c3", "c1", "c2", "c4"]
    assert desc == ["c4", "c2", "c1", "c3"]


def test_sort_on_a_token_is_refused(svc: FhirService) -> None:
    with pytest.raises(FhirProblem) as err:
        svc.search(OPEN, BASE, "Condition", [("_sort", "code")])
    assert err.value.status == 400


def test_paging_links_are_absolute_and_cover_everything(svc: FhirService) -> None:
    first = svc.search(OPEN, BASE, "Condition", [("_count", "3"), ("code", "128053003,38341003,44054006")]).body
    links = {l["relation"]: l["url"] for l in first["link"]}
    assert links["self"].startswith(BASE + "/Condition?")
    assert "_offset=3" in links["next"] and "previous" not in links
    second = svc.search(OPEN, BASE, "Condition", [("code", "128053003,38341003,44054006"), ("_count", "3"), ("_offset", "3")]).body
    assert "next" not in {l["relation"] for l in second["link"]}
    assert {l["relation"] for l in second["link"]} >= {"self", "previous"}
    got = [e["resource"]["id"] for e in first["entry"] + second["entry"]]
    assert sorted(got) == ["c1", "c2", "c3", "c4"] and first["total"] == 4


def test_count_is_capped_and_checked(svc: FhirService) -> None:
    big = svc.search(OPEN, BASE, "Condition", [("_count", "100000")]).body
    assert "_count=1000" in big["link"][0]["url"]
    with pytest.raises(FhirProblem) as err:
        svc.search(OPEN, BASE, "Condition", [("_count", "lots")])
    assert err.value.status == 400 and "_count" in err.value.message


def test_summary_count_gives_total_only(svc: FhirService) -> None:
    body = svc.search(OPEN, BASE, "Condition", [("_summary", "count")]).body
    assert body["total"] == 4 and "entry" not in body


def test_include_and_revinclude(svc: FhirService) -> None:
    body = svc.search(OPEN, BASE, "Condition", [("_id", "c1"), ("_include", "Condition:patient")]).body
    modes = sorted((e["search"]["mode"], e["resource"]["id"]) for e in body["entry"])
    assert modes == [("include", "p1"), ("match", "c1")]
    body = svc.search(OPEN, BASE, "Patient", [("_id", "p2"), ("_revinclude", "Condition:patient")]).body
    assert sorted((e["search"]["mode"], e["resource"]["id"]) for e in body["entry"]) == [
        ("include", "c3"), ("include", "c4"), ("match", "p2")]


def test_medication_orders_include_their_medication(svc: FhirService) -> None:
    # R4 defines `medication` (a reference to Medication) on the three medication resources; EHRs that send
    # anticoagulants as medicationReference are read with _include=MedicationRequest:medication.
    put(svc, {"resourceType": "Medication", "id": "apixaban",
              "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1364445"}]}})
    put(svc, {"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
              "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "Medication/apixaban"}})
    body = svc.search(OPEN, BASE, "MedicationRequest",
                      [("patient", "p1"), ("_include", "MedicationRequest:medication")]).body
    assert sorted((e["search"]["mode"], e["resource"]["id"]) for e in body["entry"]) == [
        ("include", "apixaban"), ("match", "mr1")]
    assert ids(svc.search(OPEN, BASE, "MedicationRequest", [("medication", "Medication/apixaban")])) == ["mr1"]


def test_include_of_a_non_reference_param_is_a_400(svc: FhirService) -> None:
    with pytest.raises(FhirProblem):
        svc.search(OPEN, BASE, "Condition", [("_include", "Condition:code")])


def test_unknown_parameter_is_reported_or_strict_400(svc: FhirService) -> None:
    body = svc.search(OPEN, BASE, "Condition", [("colour", "blue"), ("code", "38341003")]).body
    outcome_entries = [e for e in body["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcome_entries) == 1
    assert "colour" in outcome_entries[0]["resource"]["issue"][0]["diagnostics"]
    assert ids(svc.search(OPEN, BASE, "Condition", [("colour", "blue"), ("code", "38341003")])) == ["c2"]
    with pytest.raises(FhirProblem) as err:
        svc.search(OPEN, BASE, "Condition", [("colour", "blue")], strict=True)
    assert err.value.status == 400


@pytest.mark.parametrize("pairs", [
    [("onset-date", "2020-13")], [("onset-date", "xx2020")], [("onset-date", "")], [("_offset", "x")],
    [("code:exact", "1")], [("clinical-status:missing", "maybe")], [("_include", "nonsense")],
], ids=str)
def test_bad_values_are_400_not_500(svc: FhirService, pairs: list) -> None:
    with pytest.raises(FhirProblem) as err:
        svc.search(OPEN, BASE, "Condition", pairs)
    assert err.value.status == 400


def test_index_follows_updates_and_deletes(svc: FhirService) -> None:
    c1 = svc.read(OPEN, BASE, "Condition", "c1").resource
    changed = {**c1, "code": {"coding": [{"system": SCT, "code": "999"}]}}
    svc.update(OPEN, BASE, "Condition", "c1", changed)
    assert ids(svc.search(OPEN, BASE, "Condition", [("code", "128053003")])) == ["c3"]
    assert ids(svc.search(OPEN, BASE, "Condition", [("code", "999")])) == ["c1"]
    svc.delete(OPEN, BASE, "Condition", "c1")
    assert ids(svc.search(OPEN, BASE, "Condition", [("code", "999")])) == []


# -- paging while the data changes (service.FhirService keeps a search's sorted ids for its next pages) ---------


def _page(svc: FhirService, offset: int, grant=OPEN, count: int = 3) -> tuple[list[str], int]:
    body = svc.search(grant, BASE, "Condition", [("code", "128053003"), ("_count", str(count)),
                                                 ("_offset", str(offset))]).body
    return [e["resource"]["id"] for e in body.get("entry", [])], body["total"]


def _everything(svc: FhirService, grant=OPEN) -> list[str]:
    return _page(svc, 0, grant, count=1000)[0]


@pytest.fixture
def many(svc: FhirService) -> FhirService:
    for n in range(8):
        put(svc, cond(f"m{n}", "p1" if n % 2 else "p2", "128053003", "2020-01-01"))
    return svc  # with c1 and c3: ten matches, in _lastUpdated order


def test_pages_follow_writes_made_between_them(many: FhirService) -> None:
    """Offset paging over live data (R4 §3.1.1.6 leaves consistency to the server): each page must show the data as
    it is when that page is asked for, so a write between pages is seen, never a stale copy."""
    first, total = _page(many, 0)
    assert first == _everything(many)[:3] and total == 10
    assert _page(many, 3) == (_everything(many)[3:6], 10)
    many.delete(OPEN, BASE, "Condition", "m3")
    put(many, cond("late", "p1", "128053003", "2024-02-02"))
    moved = {**many.read(OPEN, BASE, "Condition", "c1").resource, "code": {"text": "recoded"}}
    many.update(OPEN, BASE, "Condition", "c1", moved)  # leaves the matches
    now = _everything(many)
    assert "m3" not in now and "c1" not in now and now[-1] == "late" and len(now) == 9
    assert _page(many, 3) == (now[3:6], 9)  # the next page, asked for right after the writes
    walked, offset = [], 0
    while True:
        page, total = _page(many, offset)
        assert total == len(now)
        if not page:
            break
        walked += page
        offset += 3
    assert walked == now


def test_a_rolled_back_write_is_not_served_to_the_next_page(many: FhirService) -> None:
    before = _everything(many)
    assert _page(many, 0)[0] == before[:3]
    with pytest.raises(RuntimeError):
        with many.store.transaction():
            put(many, cond("ghost", "p1", "128053003", "2020-01-01"))
            # read inside the unit of work: it sees its own write, on every page
            assert _page(many, 0) == (before[:3], 11)
            assert _page(many, 9) == ([before[9], "ghost"], 11)
            raise RuntimeError("roll back")
    assert _page(many, 9) == ([before[9]], 10)
    assert _page(many, 0) == (before[:3], 10) and _everything(many) == before


def test_paging_for_a_patient_grant_never_reuses_another_grants_pages(many: FhirService) -> None:
    from fhir_massage.sandbox.access import INTERACTIONS, Grant

    g1, g2 = (Grant(permissions={"*": frozenset(INTERACTIONS)}, patient=p) for p in ("p1", "p2"))
    all1, all2, everyone = _everything(many, g1), _everything(many, g2), _everything(many)
    assert len(all1) == len(all2) == 5 and not set(all1) & set(all2) and len(everyone) == 10
    # first pages, each with a next page, interleaved; then the next pages
    assert _page(many, 0, g1) == (all1[:3], 5)
    assert _page(many, 0, g2) == (all2[:3], 5)
    assert _page(many, 0) == (everyone[:3], 10)
    assert _page(many, 3, g1) == (all1[3:], 5)
    assert _page(many, 3, g2) == (all2[3:], 5)
    assert _page(many, 3) == (everyone[3:6], 10)


def test_quantity_search_with_prefixes_units_and_missing(svc: FhirService) -> None:
    """R4 §3.1.1.4.7 (quantity): number[|system|code], eq meaning the value's precision range, prefixes."""
    ucum = "http://unitsofmeasure.org"
    for oid, value, code in (("o1", 120, "mm[Hg]"), ("o2", 145.5, "mm[Hg]"), ("o3", 80, "kg")):
        put(svc, {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "measure"},
                  "subject": {"reference": "Patient/p1"},
                  "valueQuantity": {"value": value, "system": ucum, "code": code}})
    put(svc, {"resourceType": "Observation", "id": "o4", "status": "final", "code": {"text": "note"},
              "subject": {"reference": "Patient/p1"}, "valueString": "no number"})

    def found(*pairs: tuple[str, str]) -> list[str]:
        return sorted(ids(svc.search(OPEN, BASE, "Observation", list(pairs))))

    assert found(("value-quantity", "120")) == ["o1"]
    assert found(("value-quantity", "145")) == []  # 145 means [144.5, 145.5): 145.5 is outside
    assert found(("value-quantity", "gt100")) == ["o1", "o2"]
    assert found(("value-quantity", f"lt100|{ucum}|kg")) == ["o3"]
    assert found(("value-quantity", "120,80")) == ["o1", "o3"]
    assert found(("value-quantity:missing", "true")) == ["o4"]
    assert found(("value-quantity:missing", "false")) == ["o1", "o2", "o3"]
