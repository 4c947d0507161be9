"""Domain values for ordering and documenting medical massage, and their checks in plain words.

Frozen dataclasses the web layer fills from a form; the builders turn them into FHIR dicts. Checks return
``{field: message}`` (empty = fine) so a form can show each message next to its field; they never raise.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

from .codes import TECHNIQUE_DISPLAY, TECHNIQUES

PERIOD_UNIT = "wk"  # frequency is always "sessions per week" (the unit therapy orders use, product-anchors.md)
PRESSURES: tuple[str, ...] = ("light", "moderate", "firm")
LATERALITIES: dict[str, tuple[str, str]] = {
    # SNOMED laterality qualifiers, reference/fhir-modelling.md "Body sites" [V]
    "left": ("7771000", "Left"),
    "right": ("24028007", "Right"),
    "bilateral": ("51440002", "Right and left"),
}

# Body sites we can name and which of them take a side: the screening knowledge base's body-site hierarchy
# (fhir_massage/knowledge/body_sites.json: SNOMED body structures from DICOM CID 4031 [V], each with
# ``lateralizable`` after SNOMED's Lateralizable body structure reference set 723264001 [V2]). Read as data through
# its documented, stable file format (knowledge/README.md), once per process.
@functools.lru_cache(maxsize=1)
def _sites() -> dict[str, tuple[str, bool]]:
    raw = json.loads((Path(__file__).parent / "knowledge" / "body_sites.json").read_text(encoding="utf-8"))
    return {s["code"]: (s["display"], bool(s["lateralizable"])) for s in raw["sites"]}


_SITE_RE = re.compile(r"^(\d{6,18})(?::([a-z]+))?$")

MAX_PER_WEEK = 7  # more than one session a day is not a massage plan
MAX_WEEKS = 52
MIN_MINUTES, MAX_MINUTES = 10, 120
MAX_TOTAL_SESSIONS = 156  # 3/week for a year; beyond that the order is a typo, not a plan


@dataclass(frozen=True)
class Site:
    code: str  # SNOMED body structure
    display: str
    laterality: str | None  # left | right | bilateral | None

    @property
    def key(self) -> str:
        return f"{self.code}:{self.laterality}" if self.laterality else self.code

    @property
    def text(self) -> str:
        if not self.laterality:
            return self.display
        if self.laterality == "bilateral":
            return f"{self.display}, both sides"
        return f"{self.laterality.capitalize()} {self.display.lower()}"


def is_lateralizable(code: str) -> bool:
    known = _sites().get(code)
    return bool(known and known[1])


def parse_site(value: str) -> Site | None:
    """``"72696002:left"`` -> Site; None when the string is not a site we know (see ``site_problem``)."""
    m = _SITE_RE.match(value.strip()) if isinstance(value, str) else None
    if not m or m.group(1) not in _sites():
        return None
    side = m.group(2)
    if side is not None and side not in LATERALITIES:
        return None
    return Site(code=m.group(1), display=_sites()[m.group(1)][0], laterality=side)


def site_problem(value: str) -> str | None:
    m = _SITE_RE.match(value.strip()) if isinstance(value, str) else None
    if not m:
        return f"'{value}' is not a body site code (expected a SNOMED code, optionally ':left', ':right' or ':bilateral')."
    code, side = m.group(1), m.group(2)
    if code not in _sites():
        return f"Body site {code} is not one we can treat or name; pick a site from the list."
    name = _sites()[code][0]
    if side is not None and side not in LATERALITIES:
        return f"'{side}' is not a side; use left, right or bilateral for the {name.lower()}."
    if side is not None and not is_lateralizable(code):
        return f"The {name.lower()} has no left or right; remove the side."
    if side is None and is_lateralizable(code):
        return f"Say which side for the {name.lower()}: left, right or bilateral."
    return None


@dataclass(frozen=True)
class Schedule:
    """Frequency x duration x session length, e.g. 2 sessions a week for 6 weeks, 45 minutes each."""

    frequency: int  # sessions per week (PERIOD_UNIT)
    duration_weeks: int
    session_minutes: int

    @property
    def total_sessions(self) -> int:
        return self.frequency * self.duration_weeks

    @property
    def text(self) -> str:
        times = "once" if self.frequency == 1 else ("twice" if self.frequency == 2 else f"{self.frequency} times")
        weeks = "1 week" if self.duration_weeks == 1 else f"{self.duration_weeks} weeks"
        return (f"{times} a week for {weeks} ({self.total_sessions} sessions), "
                f"{self.session_minutes}-minute sessions")


@dataclass(frozen=True)
class OrderDraft:
    draft_id: str  # uuid the app assigns per draft; every identifier of the order transaction derives from it
    patient_ref: str
    requester_ref: str  # Practitioner/.. or PractitionerRole/..
    techniques: tuple[str, ...]
    sites: tuple[str, ...]  # "SNOMEDCODE" or "SNOMEDCODE:left|right|bilateral"
    frequency: int  # sessions per week
    duration_weeks: int
    session_minutes: int
    authored: datetime
    reason_refs: tuple[str, ...] = ()  # Condition/..
    reason_text: str = ""
    pressure: str | None = None  # light | moderate | firm
    pressure_note: str = ""
    positioning: tuple[str, ...] = ()  # e.g. "side-lying only (pregnancy > 20 weeks)"
    notes: str = ""  # to the therapist
    patient_instruction: str = ""
    encounter_ref: str | None = None

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.frequency, self.duration_weeks, self.session_minutes)

    def parsed_sites(self) -> list[Site]:
        return [s for s in (parse_site(v) for v in self.sites) if s is not None]


_REF_RE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def ref_problem(value: str | None, types: Iterable[str], what: str) -> str | None:
    """A literal relative reference of one of ``types`` (urn:uuid: also accepted: entries of the same Bundle)."""
    allowed = tuple(types)
    if not value:
        return f"The {what} is missing."
    if isinstance(value, str) and value.startswith("urn:uuid:"):
        return None
    if not isinstance(value, str) or not _REF_RE.match(value) or value.split("/")[0] not in allowed:
        return f"The {what} must be a reference to {' or '.join(allowed)} (got '{value}')."
    return None


def schedule_problems(frequency: int, duration_weeks: int, session_minutes: int) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(frequency, int) or frequency < 1:
        out["frequency"] = "Give at least one session a week."
    elif frequency > MAX_PER_WEEK:
        out["frequency"] = f"{frequency} sessions a week is more than one a day; at most {MAX_PER_WEEK}."
    if not isinstance(duration_weeks, int) or duration_weeks < 1:
        out["duration_weeks"] = "Give the plan length in weeks (at least 1)."
    elif duration_weeks > MAX_WEEKS:
        out["duration_weeks"] = f"{duration_weeks} weeks is more than a year; order at most {MAX_WEEKS} and renew."
    if not isinstance(session_minutes, int) or not MIN_MINUTES <= session_minutes <= MAX_MINUTES:
        out["session_minutes"] = f"A session lasts {MIN_MINUTES} to {MAX_MINUTES} minutes."
    if not out and frequency * duration_weeks > MAX_TOTAL_SESSIONS:
        out["duration_weeks"] = (f"{frequency * duration_weeks} sessions in total is too many for one order "
                                 f"(at most {MAX_TOTAL_SESSIONS}).")
    return out


def order_problems(draft: OrderDraft) -> dict[str, str]:
    """What stops this draft from becoming an order, field by field, in plain words (empty dict = none)."""
    out: dict[str, str] = {}
    if not draft.draft_id or not isinstance(draft.draft_id, str):
        out["draft_id"] = "The draft has no id; start a new order."
    for name, value, types, what in (
        ("patient_ref", draft.patient_ref, ("Patient",), "patient"),
        ("requester_ref", draft.requester_ref, ("Practitioner", "PractitionerRole"), "ordering physician"),
    ):
        problem = ref_problem(value, types, what)
        if problem:
            out[name] = problem
    if draft.encounter_ref:
        problem = ref_problem(draft.encounter_ref, ("Encounter",), "encounter")
        if problem:
            out["encounter_ref"] = problem
    if not draft.techniques:
        out["techniques"] = "Choose at least one technique."
    else:
        unknown = [t for t in draft.techniques if t not in TECHNIQUES]
        if unknown:
            out["techniques"] = (f"Unknown technique {', '.join(repr(t) for t in unknown)}; choose from "
                                 f"{', '.join(TECHNIQUE_DISPLAY[t] for t in TECHNIQUES)}.")
        elif len(set(draft.techniques)) != len(draft.techniques):
            out["techniques"] = "A technique is listed twice."
    if not draft.sites:
        out["sites"] = "Choose at least one body site to treat."
    else:
        site_msgs = [m for m in (site_problem(s) for s in draft.sites) if m]
        if site_msgs:
            out["sites"] = " ".join(site_msgs)
        elif len({s.strip() for s in draft.sites}) != len(draft.sites):
            out["sites"] = "A body site is listed twice."
    out.update(schedule_problems(draft.frequency, draft.duration_weeks, draft.session_minutes))
    bad_reasons = [r for r in draft.reason_refs if ref_problem(r, ("Condition",), "reason")]
    if bad_reasons:
        out["reason_refs"] = f"Reasons must be Conditions from the chart (got {', '.join(bad_reasons)})."
    if not draft.reason_refs and not draft.reason_text.strip():
        out["reason_text"] = "Give the reason for the order: pick a condition or write it in words."
    if draft.pressure is not None and draft.pressure not in PRESSURES:
        out["pressure"] = f"Pressure is one of {', '.join(PRESSURES)}."
    if not isinstance(draft.authored, datetime) or draft.authored.tzinfo is None:
        out["authored"] = "The order time needs a time zone."
    return out
