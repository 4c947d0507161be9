"""UCUM units as a person reads them (fhir_massage.units): the codes charts carry -> the printed form."""

from __future__ import annotations

import pytest

from fhir_massage.knowledge import load_kb
from fhir_massage.screening import Evidence, named_thresholds, threshold_text
from fhir_massage.units import number_text, quantity_text, unit_text

UNITS = [
    ("Cel", "°C"), ("[degF]", "°F"), ("10*9/L", "×10⁹/L"), ("10*3/uL", "×10³/µL"), ("mm[Hg]", "mmHg"),
    ("mL/min/{1.73_m2}", "mL/min/1.73 m²"), ("{score}", ""), ("1", ""), (None, ""), ("", ""), ("%", "%"),
    ("kg", "kg"), ("kg/m2", "kg/m²"), ("ug/mL", "µg/mL"), ("umol/L", "µmol/L"), ("{cells}/uL", "cells/µL"),
    ("10*6/mL", "×10⁶/mL"), ("g/dL", "g/dL"), ("mmol/L", "mmol/L"), ("[in_i]", "in"), ("[lb_av]", "lb"),
    ("{beats}/min", "beats/min"), ("mg", "mg"), ("wk", "wk"),
]


@pytest.mark.parametrize("ucum,shown", UNITS, ids=[repr(u) for u, _ in UNITS])
def test_unit_text(ucum, shown):
    assert unit_text(ucum) == shown


QUANTITIES = [
    (38.9, "Cel", None, "38.9 °C"), (38, "10*9/L", None, "38 ×10⁹/L"), (101.3, "[degF]", None, "101.3 °F"),
    (120.0, "mm[Hg]", None, "120 mmHg"), (3.2, "1", None, "3.2"), (6, "{score}", None, "6"), (95, "%", None, "95%"),
    (72, "/min", None, "72/min"), (38.0, "Cel", 1, "38.0 °C"), (None, "Cel", None, "°C"), (25, "mL/min/{1.73_m2}",
                                                                                        None, "25 mL/min/1.73 m²"),
]


@pytest.mark.parametrize("value,ucum,decimals,shown", QUANTITIES)
def test_quantity_text(value, ucum, decimals, shown):
    assert quantity_text(value, ucum, decimals=decimals) == shown


def test_number_text_drops_float_noise():
    assert number_text(38.90) == "38.9" and number_text(120.0) == "120" and number_text(7) == "7"


def test_evidence_summary_prints_units_for_people_and_json_keeps_ucum():
    ev = Evidence(ref="Observation/t", display="Body temperature", value=38.9, unit="Cel")
    assert "38.9 °C" in ev.summary() and "Cel" not in ev.summary()
    assert ev.to_json()["unit"] == "Cel"  # the stable JSON interface keeps the UCUM code


def test_messages_name_their_threshold_values():
    kb = load_kb()
    assert "the fever threshold (38.0 °C)" in named_thresholds(kb.rules["temperature-high"], kb)
    assert "(180/110 mmHg; uncontrolled hypertension)" in named_thresholds(kb.rules["bp-critical"], kb)
    assert "the relative threshold (3.0; supratherapeutic)" in named_thresholds(kb.rules["inr-high"], kb)
    assert "the relative threshold (50 ×10⁹/L)" in named_thresholds(kb.rules["platelets-low"], kb)
    # an override of the knowledge base shows the value actually used
    kb2 = kb.with_overrides({"temperature_absolute_celsius": 38.5})
    assert "the fever threshold (38.5 °C)" in named_thresholds(kb2.rules["temperature-high"], kb2)
    for rule in kb.rules.values():
        if (rule.observation or {}).get("threshold"):
            text = named_thresholds(rule, kb)
            assert "threshold" not in text or "threshold (" in text, (rule.id, text)
    assert threshold_text(kb, "temperature_absolute_celsius") == "38.0 °C"


def test_cds_card_detail_prints_units_for_people():
    from fhir_massage import codes as C
    from tests.unit.test_cds_cards import TODAY, _patient, cards_for, massage_sr

    fever = {"resourceType": "Observation", "id": "t1", "status": "final", "subject": {"reference": "Patient/p1"},
             "code": {"coding": [{"system": C.LOINC, "code": "8310-5"}]},
             "effectiveDateTime": TODAY.isoformat(),
             "valueQuantity": {"value": 38.9, "unit": "Cel", "system": C.UCUM, "code": "Cel"}}
    cards, _ = cards_for([_patient(), fever], [massage_sr(techniques=("swedish",), patient="p1",
                                                          sites=(("37822005", "Lower back", "Lower back"),))],
                         patient="p1")
    detail = "\n".join(c.get("detail") or "" for c in cards)
    assert "38.9 °C" in detail and "the fever threshold (38.0 °C)" in detail, detail
    assert "Cel" not in detail


def test_order_page_findings_print_units_for_people():
    from datetime import date

    from fhir_massage.chart import from_bundle
    from fhir_massage.screening import screen
    from smart_app.orders import finding_views
    from tests.unit.test_screening_rules import bundle, observation

    chart = from_bundle(bundle(observation("p", "777-3", 38, "10*3/uL"), observation("t", "8310-5", 102.0, "[degF]")))
    views = finding_views(screen(chart, today=date(2024, 6, 1)), [])
    facts = [e["facts"] for v in views for e in v["evidence"]]
    assert any(f.startswith("38 ×10⁹/L") for f in facts), facts
    assert any("°C" in f for f in facts), facts
    assert not any(raw in f for f in facts for raw in ("10*9/L", "Cel", "[degF]")), facts
