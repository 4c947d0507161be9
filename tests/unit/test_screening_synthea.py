"""Verdicts a clinician would expect on the trimmed Synthea patients (at dates inside their episodes) and on the
hand-made demo patients. Data: fhir_massage/sandbox/demo (package data; never /work/shared)."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_massage.sandbox.demo import demo_bundles, synthea_bundle
from fhir_massage.screening import screen_bundle

CASES = [
    # (id, patient, today, techniques, sites, verdict, rules present, rules absent)
    ("sana-keeling-inside-acute-dvt-any-massage-contraindicated",
     "Sana Keeling", "2020-12-01", ["swedish"], ["53120007:left"], "contraindicated", {"dvt-acute", "dvt-acute-mld"}, set()),
    ("sana-keeling-dvt-resolved-3-weeks-ago-still-in-acute-window",
     "Sana Keeling", "2021-01-15", ["swedish"], None, "contraindicated", {"dvt-acute"}, {"dvt-history"}),
    ("sana-keeling-a-year-after-dvt-history-deep-tissue-caution",
     "Sana Keeling", "2021-12-01", ["deep-tissue"], None, "caution", {"dvt-history"}, {"dvt-acute"}),
    ("sana-keeling-before-the-dvt-no-dvt-finding",
     "Sana Keeling", "2020-06-01", ["swedish"], None, None, set(), {"dvt-acute", "dvt-history"}),
    ("leonor-lucio-day-of-pe-contraindicated-on-enoxaparin",
     "Leonor Lucio", "2021-05-05", ["swedish"], None, "contraindicated", {"pe-acute", "anticoagulant"}, set()),
    ("leonor-lucio-two-weeks-after-pe-still-deferred",
     "Leonor Lucio", "2021-05-20", ["swedish"], None, "contraindicated", {"pe-acute"}, set()),
    ("leonor-lucio-years-after-pe-history-caution",
     "Leonor Lucio", "2023-06-01", ["deep-tissue"], None, "caution", {"pe-history"}, {"pe-acute"}),
    ("clarine-okeefe-active-warfarin-deep-tissue-caution",
     "Clarine O'Keefe", "2021-06-01", ["deep-tissue"], None, "caution", {"anticoagulant"}, set()),
    ("catina-sawayn-osteoporosis-deep-tissue-caution",
     "Catina Sawayn", "2021-06-01", ["deep-tissue"], None, "caution", {"osteoporosis"}, set()),
    ("lonnie-von-osteoporosis-with-fracture",
     "Lonnie Von", "2021-03-01", ["deep-tissue"], None, "contraindicated", {"osteoporosis", "fracture-acute"}, set()),
    ("tommy-friesen-heart-failure-mld-caution",
     "Tommy Friesen", "2021-06-01", ["lymphatic-drainage"], None, "caution", {"heart-failure"}, set()),
    ("marc-corkery-inside-burn-episode-local",
     "Marc Corkery", "2021-01-20", ["swedish"], None, "contraindicated", {"burn"}, set()),
    ("marc-corkery-after-the-burn-healed-clear",
     "Marc Corkery", "2021-06-01", ["swedish"], None, "clear", set(), {"burn"}),
    ("nereida-rogahn-pregnant-caution",
     "Nereida Rogahn", "2021-06-01", ["swedish"], None, "caution", {"pregnancy"}, set()),
    ("luis-delarosa-colon-cancer-mld-contraindicated",
     "Luis Miguel Delarosa", "2021-06-01", ["lymphatic-drainage"], None, "contraindicated", {"cancer-mld", "cancer-active"}, set()),
    ("luis-delarosa-week-after-colectomy-abdomen-contraindicated",
     "Luis Miguel Delarosa", "2021-03-09", ["swedish"], ["818981001"], "contraindicated", {"surgery-recent"}, set()),
    ("dirk-kuhlman-shoulder-surgery-other-arm-not-contraindicated",
     "Dirk Kuhlman", "2020-12-20", ["swedish"], ["85562004:left"], "caution", {"surgery-recent"}, set()),
    ("jacki-feil-chronic-pain-clear",
     "Jacki Feil", "2021-06-01", None, None, "clear", set(), set()),
    ("suzi-bechtelar-fibromyalgia-clear",
     "Suzi Bechtelar", "2021-06-01", None, None, "clear", set(), set()),
]


@pytest.mark.parametrize("name,today,techniques,sites,verdict,present,absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_synthea_patient(name, today, techniques, sites, verdict, present, absent):
    result = screen_bundle(synthea_bundle(name), techniques=techniques, sites=sites, today=date.fromisoformat(today))
    found = {f.rule for f in result.findings}
    if verdict is not None:
        assert result.verdict == verdict, (result.verdict, sorted(found), result.needs_review)
    assert present <= found, sorted(found)
    assert not (absent & found), sorted(found)


def test_synthea_evidence_points_at_the_real_resources():
    result = screen_bundle(synthea_bundle("Sana Keeling"), today=date(2020, 12, 1))
    dvt = next(f for f in result.findings if f.rule == "dvt-acute")
    assert dvt.evidence == ("Condition/9bbbceab-cd58-4e78-9133-0fd37818fdc2",)
    assert dvt.details[0].dates == {"onset": "2020-11-24", "abatement": "2020-12-23"}


def test_synthea_enoxaparin_administrations_count_only_around_the_day():
    leonor = synthea_bundle("Leonor Lucio")
    assert "anticoagulant" in {f.rule for f in screen_bundle(leonor, today=date(2021, 5, 5)).findings}
    assert "anticoagulant" not in {f.rule for f in screen_bundle(leonor, today=date(2021, 7, 1)).findings}


TODAY = date(2026, 11, 28)
HAND = [
    # (patient id, techniques, sites, verdict, rules present, rules absent)
    ("demo-tom-becker", None, None, "clear", set(), set()),
    ("demo-dana-whitfield", ["swedish"], ["30021000:left"], "contraindicated", {"dvt-acute", "anticoagulant"}, set()),
    ("demo-dana-whitfield", ["swedish"], ["30021000:right"], "caution", {"dvt-acute"}, set()),
    ("demo-maria-santos", ["swedish"], None, "contraindicated", {"pregnancy-high-risk", "pregnancy"}, {"pregnancy-first-trimester"}),
    ("demo-ray-okafor", ["swedish"], ["14975008:right"], "contraindicated", {"open-wound", "burn"}, set()),
    ("demo-ray-okafor", ["swedish"], ["77568009"], "caution", {"open-wound", "burn"}, set()),
    ("demo-ray-okafor", ["swedish"], ["85562004:right"], "caution", {"burn"}, set()),
    ("demo-eleanor-price", ["swedish"], ["122495006"], "contraindicated", {"fracture-acute", "osteoporosis"}, set()),
    ("demo-eleanor-price", ["deep-tissue"], ["61685007"], "caution", {"osteoporosis"}, set()),
    ("demo-frank-delgado", ["swedish"], None, "contraindicated", {"temperature-high", "platelets-low", "thrombocytopenia"}, set()),
    ("demo-helen-brooks", None, None, "caution", set(), {"dvt-acute", "pe-acute"}),
]


@pytest.fixture(scope="module")
def hand_made():
    out = {}
    for b in demo_bundles(TODAY):
        pts = [e["resource"] for e in b.get("entry", []) if e.get("resource", {}).get("resourceType") == "Patient"]
        if len(pts) == 1 and pts[0]["id"].startswith("demo-"):
            out[pts[0]["id"]] = b
    return out


@pytest.mark.parametrize("pid,techniques,sites,verdict,present,absent", HAND,
                         ids=[f"{h[0]}-{'+'.join(h[1] or ['all'])}-{'+'.join(h[2] or ['whole-body'])}" for h in HAND])
def test_hand_made_demo_patient(hand_made, pid, techniques, sites, verdict, present, absent):
    result = screen_bundle(hand_made[pid], techniques=techniques, sites=sites, today=TODAY)
    found = {f.rule for f in result.findings}
    assert result.verdict == verdict, (result.verdict, sorted(found), result.needs_review)
    assert present <= found and not (absent & found), sorted(found)


def test_helen_brooks_text_only_clot_is_in_needs_review(hand_made):
    result = screen_bundle(hand_made["demo-helen-brooks"], today=TODAY)
    assert [n["evidence"] for n in result.needs_review] == ["Condition/demo-helen-brooks-text-only-clot"]
