"""UCUM units as a person reads them: ``Cel`` -> ``°C``, ``10*9/L`` -> ``×10⁹/L``, ``mm[Hg]`` -> ``mmHg``.

FHIR Quantity.code carries UCUM (datatypes.html#Quantity; https://ucum.org/ucum), a case-sensitive syntax made for
machines: ``Cel``, ``[degF]``, ``10*9/L``, ``mL/min/{1.73_m2}``, ``{score}``. A clinician reading "38.9 Cel" or
"38 10*9/L" on a page has to translate it, so every text shown to a person (pages, CDS card details, the
``screen --format text`` report, finding messages) goes through ``unit_text`` / ``quantity_text``; machine output
(``screen --format json``'s ``unit``, the resources we write) keeps the UCUM code unchanged.

Pure and tolerant: an unknown unit is shown as it is (minus UCUM's square brackets), never refused.
"""

from __future__ import annotations

import re

__all__ = ["unit_text", "quantity_text", "number_text"]

# Whole codes with a conventional printed form (UCUM's print symbols, ucum-essence.xml <printSymbol>, and the way
# lab reports write cell counts: "×10⁹/L").
_WHOLE: dict[str, str] = {
    "Cel": "°C",
    "[degF]": "°F",
    "mm[Hg]": "mmHg",
    "cm[H2O]": "cmH₂O",
    "10*9/L": "×10⁹/L",
    "10*3/uL": "×10³/µL",
    "10*3/mm3": "×10³/mm³",
    "10*6/uL": "×10⁶/µL",
    "10*12/L": "×10¹²/L",
    "mL/min/{1.73_m2}": "mL/min/1.73 m²",
    "mL/min/1.73m2": "mL/min/1.73 m²",
    "kg/m2": "kg/m²",
    "/min": "/min",
    "{beats}/min": "beats/min",
    "{breaths}/min": "breaths/min",
    "[in_i]": "in",
    "[lb_av]": "lb",
    "[ft_i]": "ft",
    "[oz_av]": "oz",
}
# Unity and dimensionless annotations: the number alone says it (INR 3.2, a pain score of 6).
_NO_UNIT = {"1", "{score}", "{ratio}", "{index}", "{INR}", "{index_val}", "{Score}", "{#}", "{count}"}

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_POWER_OF_TEN = re.compile(r"^10\*(-?\d+)")
_ANNOTATION = re.compile(r"\{([^{}]*)\}")
_EXPONENT = re.compile(r"(?<=[A-Za-z\]])(\d)(?![\d.])")  # m2 -> m², but not 10*3 (handled above) or numbers


def unit_text(unit: str | None) -> str:
    """The UCUM code as printed for a person ("" for no unit or a dimensionless one)."""
    if unit is None:
        return ""
    u = str(unit).strip()
    if u in _WHOLE:
        return _WHOLE[u]
    if u in _NO_UNIT:
        return ""
    out = _POWER_OF_TEN.sub(lambda m: "×10" + m.group(1).translate(_SUPERSCRIPT), u)
    out = _ANNOTATION.sub(lambda m: m.group(1).replace("_", " "), out)  # {cells}/uL -> cells/uL
    out = re.sub(r"(?<![A-Za-z])u(?=[A-Za-z])", "µ", out)  # micro: ug -> µg, uL -> µL, umol -> µmol
    out = _EXPONENT.sub(lambda m: m.group(1).translate(_SUPERSCRIPT), out)
    return out.replace("[", "").replace("]", "")


def number_text(value: float | int | str) -> str:
    """A measured value without float noise: 38.9, 120, 3.25."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def quantity_text(value: float | int | str | None, unit: str | None, *, decimals: int | None = None) -> str:
    """"38.9 °C", "38 ×10⁹/L", "95%", "72/min", "3.2" (INR): the value and its printed unit. ``decimals``
    fixes the number of decimals (a threshold: "38.0 °C")."""
    if value is None:
        return unit_text(unit)
    if decimals is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = f"{float(value):.{decimals}f}"
    else:
        number = number_text(value)
    shown = unit_text(unit)
    if not shown:
        return number
    if shown == "%" or shown.startswith("/"):
        # SI puts a space before every unit, but clinical text closes up "95%" and a rate "72/min"
        return f"{number}{shown}"
    return f"{number} {shown}"
