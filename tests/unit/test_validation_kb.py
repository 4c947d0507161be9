"""The knowledge-base value sets in the FHIR package are exactly what the knowledge base says (one source of truth).

Pure Python (no Node.js): regenerates the ValueSets from fhir_massage/knowledge and compares them with the committed
profiles/package files, then checks membership rule by rule with the validator's value-set look-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_massage import codes, profiles_build
from fhir_massage.validation import PACKAGE_DIR, errors, validate_resource, valueset_contains

KB = profiles_build.KNOWLEDGE_DIR
RULES = json.loads((KB / "rules.json").read_text())["rules"]
BODY_SITES = json.loads((KB / "body_sites.json").read_text())
VS = f"{codes.CANONICAL_BASE}/ValueSet/"


def committed(vs_id: str) -> dict:
    return json.loads((PACKAGE_DIR / f"ValueSet-{vs_id}.json").read_text())


@pytest.mark.parametrize("vs", profiles_build.knowledge_value_sets(), ids=lambda vs: vs["id"])
def test_committed_value_set_is_regenerated_identically(vs: dict) -> None:
    assert committed(vs["id"]) == vs, "knowledge base changed: run `make profiles` and commit profiles/package"


def test_no_stale_rule_value_sets_remain() -> None:
    expected = {f"contraindication-{r['id']}" for r in RULES}
    present = {p.stem.removeprefix("ValueSet-") for p in PACKAGE_DIR.glob("ValueSet-contraindication-*.json")}
    assert present == expected


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r["id"])
def test_every_code_of_a_rule_is_in_its_value_set(rule: dict) -> None:
    url = VS + f"contraindication-{rule['id']}"
    c = rule["codes"]
    for key, system in (("snomed", codes.SNOMED), ("rxnorm", codes.RXNORM), ("loinc", codes.LOINC)):
        for entry in c.get(key) or []:
            assert valueset_contains(url, system, entry["code"]) is True, entry
            assert valueset_contains(url, system, entry["code"] + "0") is False
    for entry in c.get("icd10cm") or []:
        prefix = entry["prefix"]
        child = prefix + ("X" if "." in prefix else ".9") + ("A" if entry.get("seventh") else "")
        assert valueset_contains(url, codes.ICD10CM, prefix) is True, prefix
        assert valueset_contains(url, codes.ICD10CM, child) is True, child
        for ex in entry.get("exclude") or []:
            assert valueset_contains(url, codes.ICD10CM, ex) is False, ex


@pytest.mark.parametrize(
    "code,expected",
    [("S72.001A", True), ("S72001A", True), ("S72.001B", True), ("S72.001D", False), ("S72.001S", False),
     ("S72", True), ("S73.001A", False)],
    ids=["initial-encounter", "without-dot", "open-fracture-initial", "subsequent-encounter", "sequela",
         "category-only", "other-category"],
)
def test_fracture_value_set_honours_the_seventh_character(code: str, expected: bool) -> None:
    assert valueset_contains(VS + "contraindication-fracture-acute", codes.ICD10CM, code) is expected


def test_body_site_value_set_is_exactly_the_knowledge_base_sites() -> None:
    (inc,) = committed("massage-body-site")["compose"]["include"]
    assert inc["system"] == codes.SNOMED
    assert [c["code"] for c in inc["concept"]] == [s["code"] for s in BODY_SITES["sites"]]
    (lat,) = committed("massage-laterality")["compose"]["include"]
    assert {c["code"] for c in lat["concept"]} == set(BODY_SITES["laterality"])


def test_order_body_site_outside_the_treatable_sites_is_a_warning_not_an_error() -> None:
    order = json.loads((Path(profiles_build.EXAMPLES_DIR) / "ServiceRequest-massage-order-mld.json").read_text())
    order["bodySite"] = [{"coding": [{"system": codes.SNOMED, "code": "32849002", "display": "Esophagus"}]}]
    issues = validate_resource(order)
    assert errors(issues) == []
    assert any(i.path == "ServiceRequest.bodySite[0]" and "massage-body-site" in i.message for i in issues)
