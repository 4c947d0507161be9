"""The knowledge base as data: complete against the reference's tables, well-formed, honest about verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fhir_massage.knowledge as knowledge
from fhir_massage.codes import TECHNIQUES
from fhir_massage.errors import InvalidInput
from fhir_massage.knowledge import CLASSES, Site, load_kb, norm_icd, parse_site

KB_DIR = Path(knowledge.__file__).parent

# One rule id per row of the reference master table, the medication and observation tables, and the MLD row.
REFERENCE_ROWS = {
    "DVT current/acute": ["dvt-acute", "dvt-acute-mld", "dvt-acute-elsewhere"],
    "DVT history": ["dvt-history"],
    "Pulmonary embolism": ["pe-acute", "pe-history"],
    "Anticoagulant therapy": ["anticoagulant"],
    "Antiplatelet": ["antiplatelet"],
    "Thrombocytopenia": ["thrombocytopenia", "platelets-critical", "platelets-low"],
    "Bleeding disorders": ["bleeding-disorder"],
    "Supratherapeutic INR": ["inr-high", "inr-critical"],
    "Pregnancy uncomplicated": ["pregnancy"],
    "Pregnancy high-risk": ["pregnancy-high-risk"],
    "Pregnancy by trimester": ["pregnancy-first-trimester"],
    "Open wounds": ["open-wound"],
    "Burns": ["burn", "burn-extensive"],
    "Osteoporosis": ["osteoporosis"],
    "Osteopenia": ["osteopenia"],
    "Fracture acute": ["fracture-acute"],
    "Recent surgery": ["surgery-recent", "surgery-recent-systemic"],
    "Acute infection / fever": ["fever", "temperature-high", "systemic-infection"],
    "Cellulitis / erysipelas": ["cellulitis", "cellulitis-mld"],
    "Contagious skin conditions": ["contagious-skin", "scabies"],
    "Active cancer": ["cancer-active", "cancer-mld", "bone-metastasis", "cancer-treatment-history"],
    "Lymphedema": ["lymphedema"],
    "MLD-specific": ["dvt-acute-mld", "cellulitis-mld", "heart-failure-acute", "cancer-mld", "renal-insufficiency",
                     "egfr-low", "hypotension", "bp-low", "asthma-mld", "thyroid-neck-mld", "arterial-disease"],
    "Congestive heart failure": ["heart-failure", "heart-failure-acute", "heart-failure-acute-systemic"],
    "Uncontrolled hypertension": ["hypertension-crisis", "bp-critical", "bp-high"],
    "Varicose veins": ["varicose-veins"],
    "Peripheral neuropathy / diabetes": ["peripheral-neuropathy", "diabetes"],
    "Aneurysm": ["aneurysm", "aneurysm-systemic"],
    "Recent stroke": ["stroke-recent", "stroke-history"],
    "Recent MI": ["mi-recent"],
    "Kidney disease": ["renal-insufficiency", "egfr-low"],
    "Rheumatoid arthritis flare": ["ra-flare"],
    "Allergy to massage products": ["allergy-massage-product"],
}


def _raw_rules():
    return json.loads((KB_DIR / "rules.json").read_text())["rules"]


@pytest.mark.parametrize("row,ids", sorted(REFERENCE_ROWS.items()))
def test_every_reference_row_has_its_rules(row, ids):
    kb = load_kb()
    missing = [i for i in ids if i not in kb.rules]
    assert not missing, f"{row}: {missing}"


def test_source_article_four_contraindications_with_their_classes():
    kb = load_kb()
    assert kb.rules["pregnancy"].cls == "relative" and "consult" in kb.rules["pregnancy"].message.lower()
    assert kb.rules["open-wound"].cls == "local" and kb.rules["burn"].cls == "local"
    assert kb.rules["osteoporosis"].cls == "relative"
    assert kb.rules["dvt-acute"].cls == "absolute" and kb.rules["dvt-history"].cls == "relative"


@pytest.mark.parametrize("rule", _raw_rules(), ids=lambda r: r["id"])
def test_rule_is_well_formed(rule):
    assert rule["class"] in CLASSES
    techniques = TECHNIQUES if rule["techniques"] == "*" else rule["techniques"]
    assert techniques and set(techniques) <= set(TECHNIQUES)
    assert rule["evidenceClass"] in ("EV", "CONS", "MECH")
    assert rule["source"].strip() and rule["message"].strip() and rule["tag"].strip()
    assert rule["actCode"] in ("COND", "PREG", "LAB", "DACT", "OBSA")
    assert rule["scope"] in ("systemic", "site", "fixed-site")
    assert rule["status"] in ("active", "history", "any", "current", "latest")
    assert rule["codes"], "a rule with no codes can never fire"
    for also in rule["also"]:
        assert also["class"] in CLASSES and also["message"].strip()
    for key in ("snomed", "icd10cm", "rxnorm", "loinc"):
        for c in rule["codes"].get(key) or []:
            assert c["tag"] in ("[V]", "[V2]", "[B]")
            # an unverified code must say so in the data: the UI shows it
            assert c["verified"] is (c["tag"] != "[B]"), c
            assert c["display"].strip()
    for vs in rule["valueSets"]:
        assert vs["name"] and ("oid" in vs)


def test_rule_ids_are_unique_and_stable_slugs():
    ids = [r["id"] for r in _raw_rules()] + [a["id"] for r in _raw_rules() for a in r["also"]]
    assert len(ids) == len(set(ids))
    assert all(i == i.lower() and " " not in i for i in ids)


def test_anticoagulant_products_are_listed_not_only_ingredients():
    kb = load_kb()
    for scd in ("855332", "1364445", "1232086", "854235", "855288"):  # warfarin, apixaban, rivaroxaban, enoxaparin
        assert any(rid == "anticoagulant" for rid, _ in kb.rxnorm[scd]), scd
    assert kb.rules["anticoagulant"].value_sets[1]["oid"] == "2.16.840.1.113762.1.4.1248.22"


def test_json_files_are_plain_json_with_a_format_version():
    for name in ("rules.json", "thresholds.json", "observations.json", "body_sites.json", "icd_sites.json"):
        data = json.loads((KB_DIR / name).read_text())
        assert data["formatVersion"] == 1, name


def test_readme_documents_the_format():
    text = (KB_DIR / "README.md").read_text()
    for word in ("historyOf", "acuteWindowDays", "lateralityPosition", "seventh", "verified", "load_kb"):
        assert word in text


def test_thresholds_defaults_and_overrides():
    kb = load_kb()
    assert kb.thresholds["platelets_absolute_below"] == 20
    assert kb.thresholds["inr_relative_above"] == 3.0
    assert kb.thresholds["temperature_absolute_celsius"] == 38.0
    assert kb.thresholds["dvt_acute_days"] == 90
    custom = load_kb({"dvt_acute_days": 120, "platelets_relative_below": {"value": 40}})
    assert custom.thresholds["dvt_acute_days"] == 120 and custom.thresholds["platelets_relative_below"] == 40
    assert load_kb().thresholds["dvt_acute_days"] == 90  # the default is not changed by an override
    assert load_kb() is load_kb()


@pytest.mark.parametrize("overrides", [{"no_such_threshold": 1}, {"dvt_acute_days": "ninety"}, {"dvt_acute_days": True}])
def test_bad_overrides_are_refused(overrides):
    with pytest.raises(InvalidInput):
        load_kb(overrides)


@pytest.mark.parametrize("code,side", [("I82.401", "right"), ("I82.402", "left"), ("I82.403", "bilateral"),
                                       ("I82.409", None), ("I82402", "left"), ("i82.4z2", "left")])
def test_icd_laterality_is_data(code, side):
    site, _tag = load_kb().icd_site(code)
    assert site == Site("61685007", side)


def test_icd_matching_ignores_dot_and_case_and_respects_exclusions():
    kb = load_kb()
    assert norm_icd("i82.402") == "I82402"
    assert {r for r, _ in kb.match_icd("I82402")} == {"dvt-acute"}
    assert "cancer-active" in {r for r, _ in kb.match_icd("C50.911")}
    assert "cancer-active" not in {r for r, _ in kb.match_icd("C44.91")}
    assert "fracture-acute" in {r for r, _ in kb.match_icd("S82.101A")}
    assert "fracture-acute" not in {r for r, _ in kb.match_icd("S82.101S")}


@pytest.mark.parametrize("inner,outer", [("30021000", "61685007"), ("61685007", "38266002"), ("52612000", "77568009"),
                                         ("122496007", "37822005"), ("85562004", "53120007")])
def test_site_hierarchy(inner, outer):
    kb = load_kb()
    assert kb.overlaps(Site(inner), Site(outer)) and kb.overlaps(Site(outer), Site(inner))


def test_sides_overlap_only_when_compatible():
    kb = load_kb()
    assert not kb.overlaps(Site("30021000", "left"), Site("61685007", "right"))
    assert kb.overlaps(Site("30021000", "left"), Site("61685007", "bilateral"))
    assert kb.overlaps(Site("30021000", "left"), Site("61685007"))  # side unknown = both
    assert not kb.overlaps(Site("53120007"), Site("61685007"))
    assert kb.widen(Site("30021000", "left"), "limb") == Site("61685007", "left")
    assert kb.widen(Site("61685007", "left"), "parent") == Site("61685007", "left")


@pytest.mark.parametrize("text,expected", [("30021000", Site("30021000")), ("30021000:left", Site("30021000", "left")),
                                           (" 77568009 ", Site("77568009"))])
def test_parse_site(text, expected):
    assert parse_site(text) == expected


@pytest.mark.parametrize("text", ["", "leg", "30021000:up", "99999999", "77568009:left", "30021000:"])
def test_parse_site_refuses_malformed_or_unknown(text):
    with pytest.raises(InvalidInput):
        parse_site(text)
