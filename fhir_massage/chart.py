"""FHIR R4 JSON (plain dicts) -> PatientChart: the facts screening reads. Pure, tolerant, never raises on odd data.

One pass over the resources. Only what screening can use is kept: every Condition, AllergyIntolerance, Procedure
and medication resource, and the Observations of the kinds in knowledge/observations.json (platelets, INR, blood
pressure, temperature, eGFR, pregnancy status, EDD) — the bulk of a real chart (vital signs, survey answers, claims)
is skipped after one dict probe. Odd data (a malformed date, a value in an unknown unit, a resource about another
patient) becomes a warning on the chart, never an exception; the only errors are a missing Patient or several
patients (``InvalidInput``), because screening the wrong person is worse than screening nobody.

Dates: FHIR dateTime/date strings may be partial ("2020", "2020-11"). Each date is kept as its earliest and latest
possible day, so "not yet started" uses the earliest (never drops a condition that might already exist) and
windows / abatement use the latest (a condition counts as recent or still active as long as it might be).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Iterable, Mapping

from fhir_massage.errors import InvalidInput
from fhir_massage.knowledge import KnowledgeBase, Site, load_kb

__all__ = [
    "PatientChart", "PatientFact", "ConditionFact", "ObservationFact", "MedicationFact", "AllergyFact",
    "ProcedureFact", "BodySite", "from_resources", "from_bundle", "parse_date", "SNOMED", "ICD10CM", "RXNORM", "LOINC",
]

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
# Some EHRs send ICD-10-CM under its OID or the WHO ICD-10 URI; the codes are the same for our prefixes.
_ICD_SYSTEMS = frozenset({ICD10CM, "urn:oid:2.16.840.1.113883.6.90", "http://hl7.org/fhir/sid/icd-10"})
_SNOMED_SYSTEMS = frozenset({SNOMED, "urn:oid:2.16.840.1.113883.6.96"})
_RXNORM_SYSTEMS = frozenset({RXNORM, "urn:oid:2.16.840.1.113883.6.88"})
_LOINC_SYSTEMS = frozenset({LOINC, "urn:oid:2.16.840.1.113883.6.1"})

Coded = tuple[str, str, str | None]  # (normalized system: "snomed" | "icd10cm" | "rxnorm" | "loinc" | raw URI, code, display)


def _norm_system(system: Any) -> str:
    if not isinstance(system, str):
        return ""
    if system in _SNOMED_SYSTEMS:
        return "snomed"
    if system in _ICD_SYSTEMS:
        return "icd10cm"
    if system in _RXNORM_SYSTEMS:
        return "rxnorm"
    if system in _LOINC_SYSTEMS:
        return "loinc"
    return system


# ---------------------------------------------------------------------------------------------------------------
# Facts


def _display(text: str | None, codings: tuple[Coded, ...], missing: str) -> str:
    """What a fact is called on a page: its text, else the first coding's display, else the first code, else
    ``missing`` (a fact with neither code nor text)."""
    if text:
        return text
    for _, _, d in codings:
        if d:
            return d
    return codings[0][1] if codings else missing

@dataclass(frozen=True, slots=True)
class BodySite:
    """A body site as the chart states it: a mapped Site (or None when the code is not in our site list)."""

    site: Site | None
    laterality: str | None
    text: str | None


@dataclass(frozen=True, slots=True)
class PatientFact:
    ref: str
    id: str
    gender: str | None
    birth_date: date | None
    full_url: str | None = None

    def age_on(self, day: date) -> int | None:
        if self.birth_date is None:
            return None
        b = self.birth_date
        return day.year - b.year - ((day.month, day.day) < (b.month, b.day))


@dataclass(frozen=True, slots=True)
class ConditionFact:
    ref: str
    codings: tuple[Coded, ...]
    text: str | None
    clinical_status: str | None
    verification_status: str | None
    onset_earliest: date | None
    onset_latest: date | None
    onset_text: str | None
    abated: bool  # any abatement[x] present
    abatement_latest: date | None
    recorded: date | None
    body_sites: tuple[BodySite, ...]

    @property
    def display(self) -> str:
        return _display(self.text, self.codings, "(no code or text)")


@dataclass(frozen=True, slots=True)
class ObservationFact:
    ref: str
    kind: str
    code: str
    status: str | None
    effective: datetime | None
    effective_date: date | None
    value: float | None  # in the kind's canonical unit (Celsius for temperature)
    unit: str | None  # canonical unit
    systolic: float | None = None
    diastolic: float | None = None
    answer: str | None = None  # pregnancy status: pregnant | not-pregnant | unknown
    value_date: date | None = None  # EDD
    display: str | None = None


@dataclass(frozen=True, slots=True)
class MedicationFact:
    ref: str
    resource_type: str
    status: str | None
    codings: tuple[Coded, ...]
    text: str | None
    authored: date | None
    start: date | None
    end: date | None
    intent: str | None = None

    @property
    def display(self) -> str:
        return _display(self.text, self.codings, "(medication without code or text)")


@dataclass(frozen=True, slots=True)
class AllergyFact:
    ref: str
    codings: tuple[Coded, ...]
    texts: tuple[str, ...]
    clinical_status: str | None
    verification_status: str | None
    recorded: date | None

    @property
    def display(self) -> str:
        for t in self.texts:
            if t:
                return t
        return self.codings[0][1] if self.codings else "(allergy without code or text)"


@dataclass(frozen=True, slots=True)
class ProcedureFact:
    ref: str
    codings: tuple[Coded, ...]
    text: str | None
    status: str | None
    start: date | None
    end: date | None
    body_sites: tuple[BodySite, ...]
    categories: tuple[Coded, ...]

    @property
    def display(self) -> str:
        return _display(self.text, self.codings, "(procedure without code or text)")


@dataclass(frozen=True)
class PatientChart:
    patient: PatientFact
    conditions: tuple[ConditionFact, ...] = ()
    observations: tuple[ObservationFact, ...] = ()
    medications: tuple[MedicationFact, ...] = ()
    allergies: tuple[AllergyFact, ...] = ()
    procedures: tuple[ProcedureFact, ...] = ()
    warnings: tuple[str, ...] = ()
    resource_count: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Small tolerant readers


def parse_date(value: Any) -> tuple[date, date] | None:
    """A FHIR date/dateTime/instant string -> (earliest day, latest day); None when unreadable."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) >= 10 and value[4] == "-" and value[7] == "-":
            d = date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
            return d, d
        if len(value) == 7 and value[4] == "-":
            y, m = int(value[0:4]), int(value[5:7])
            return date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])
        if len(value) == 4:
            y = int(value)
            return date(y, 1, 1), date(y, 12, 31)
    except ValueError:
        return None
    return None


def _parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) <= 10:
            d = parse_date(value)
            return datetime(d[1].year, d[1].month, d[1].day) if d else None
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # compare instants in UTC: two labs on the same day from different time zones must order correctly
        return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt
    except (ValueError, TypeError):
        return None


def _list(value: Any) -> list | tuple:
    """A FHIR array element, or nothing: a malformed value (a string, an object, true) must not be iterated."""
    return value if isinstance(value, list) else ()


def _status_code(concept: Any) -> str | None:
    """clinicalStatus / verificationStatus CodeableConcept -> its code (or the text, lower-cased)."""
    if isinstance(concept, str):
        return concept
    if not isinstance(concept, dict):
        return None
    for c in _list(concept.get("coding")):
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            return c["code"]
    text = concept.get("text")
    return text.strip().lower() if isinstance(text, str) else None


def _codings(concept: Any) -> tuple[Coded, ...]:
    if not isinstance(concept, dict):
        return ()
    out = []
    for c in _list(concept.get("coding")):
        if isinstance(c, dict):
            code = c.get("code")
            if isinstance(code, str) and code:
                disp = c.get("display")
                out.append((_norm_system(c.get("system")), code.strip(), disp if isinstance(disp, str) else None))
    return tuple(out)


def _text(concept: Any) -> str | None:
    if isinstance(concept, dict):
        t = concept.get("text")
        if isinstance(t, str) and t.strip():
            return t.strip()
    return None


def _ref_of(res: Mapping[str, Any], rtype: str, full_url: str | None, index: int, warnings: list[str]) -> str:
    rid = res.get("id")
    if isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    if isinstance(full_url, str) and full_url:
        tail = full_url.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        if tail:
            return f"{rtype}/{tail}"
    warnings.append(f"A {rtype} without an id (entry {index}) is referred to as {rtype}/entry-{index}.")
    return f"{rtype}/entry-{index}"


class _Reader:
    """The single pass. Kept as a small class so per-resource handlers share lookups without globals."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self.obs_code_kind = kb.obs_code_kind
        self.obs_kinds = kb.obs_kinds
        self.warnings: list[str] = []
        self.patients: dict[str, PatientFact] = {}
        self.conditions: list[tuple[ConditionFact, str | None]] = []
        self.observations: list[tuple[ObservationFact, str | None]] = []
        self.medications: list[tuple[dict, str, str | None, str | None, int]] = []
        self.medication_resources: dict[str, dict] = {}
        self.allergies: list[tuple[AllergyFact, str | None]] = []
        self.procedures: list[tuple[ProcedureFact, str | None]] = []
        self.skipped: dict[str, int] = {}
        self.count = 0
        self._unit_warned: set[tuple[str, str]] = set()
        self._ages: list[tuple[int, Mapping[str, Any]]] = []  # (condition position, onsetAge)

    # -- dispatch ----------------------------------------------------------------------------------------------

    def read(self, res: Any, full_url: str | None, index: int) -> None:
        self.count += 1
        if not isinstance(res, dict):
            self.warnings.append(f"Entry {index} is not a FHIR resource; ignored.")
            return
        rtype = res.get("resourceType")
        if rtype == "Observation":
            self._observation(res, full_url, index)
        elif rtype == "Condition":
            self._condition(res, full_url, index)
        elif rtype in ("MedicationRequest", "MedicationStatement", "MedicationAdministration"):
            # resolved after the pass: the referenced Medication may come later in the Bundle
            self.medications.append((res, rtype, full_url, _subject(res, "subject"), index))
        elif rtype == "Medication":
            rid = res.get("id")
            if isinstance(rid, str):
                self.medication_resources[f"Medication/{rid}"] = res
            if isinstance(full_url, str):
                self.medication_resources[full_url] = res
        elif rtype == "AllergyIntolerance":
            self._allergy(res, full_url, index)
        elif rtype == "Procedure":
            self._procedure(res, full_url, index)
        elif rtype == "Patient":
            self._patient(res, full_url, index)
        elif rtype == "OperationOutcome":
            # a search that failed (chart_fetch) or a server warning: the chart is incomplete, say so
            for issue in _list(res.get("issue")):
                if isinstance(issue, dict) and issue.get("severity") in ("error", "fatal", "warning"):
                    details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
                    text = issue.get("diagnostics") or details.get("text")
                    if isinstance(text, str) and text:
                        self.warnings.append(f"Incomplete chart: {text[:300]}")
        else:
            key = rtype if isinstance(rtype, str) else "(no resourceType)"
            self.skipped[key] = self.skipped.get(key, 0) + 1

    # -- Patient -----------------------------------------------------------------------------------------------

    def _patient(self, res: dict, full_url: str | None, index: int) -> None:
        ref = _ref_of(res, "Patient", full_url, index, self.warnings)
        pid = ref.split("/", 1)[1]
        bd = parse_date(res.get("birthDate"))
        gender = res.get("gender") if isinstance(res.get("gender"), str) else None
        if ref in self.patients:
            return  # the same patient twice (e.g. an _include): not "several patients"
        self.patients[ref] = PatientFact(ref=ref, id=pid, gender=gender, birth_date=bd[0] if bd else None,
                                         full_url=full_url if isinstance(full_url, str) else None)

    # -- Condition ---------------------------------------------------------------------------------------------

    def _condition(self, res: dict, full_url: str | None, index: int) -> None:
        ref = _ref_of(res, "Condition", full_url, index, self.warnings)
        code = res.get("code")
        onset_e = onset_l = None
        onset_text = None
        if "onsetDateTime" in res:
            d = parse_date(res["onsetDateTime"])
            if d:
                onset_e, onset_l = d
            else:
                self.warnings.append(f"{ref}: onset date {str(res['onsetDateTime'])[:40]!r} is not a FHIR date; treated as unknown.")
        elif "onsetPeriod" in res and isinstance(res["onsetPeriod"], dict):
            p = res["onsetPeriod"]
            ds, de = parse_date(p.get("start")), parse_date(p.get("end"))
            onset_e = ds[0] if ds else (de[0] if de else None)
            onset_l = de[1] if de else (ds[1] if ds else None)
        elif "onsetAge" in res or "onsetRange" in res:
            onset_text = "onset given as an age"  # resolved against birthDate after the pass
        elif "onsetString" in res:
            onset_text = str(res["onsetString"])[:80]
        abated = False
        ab_latest = None
        for key in ("abatementDateTime", "abatementPeriod", "abatementAge", "abatementRange", "abatementString", "abatementBoolean"):
            if key in res:
                value = res[key]
                if key == "abatementBoolean" and value is not True:
                    continue
                abated = True
                if key == "abatementDateTime":
                    d = parse_date(value)
                    ab_latest = d[1] if d else None
                elif key == "abatementPeriod" and isinstance(value, dict):
                    d = parse_date(value.get("end")) or parse_date(value.get("start"))
                    ab_latest = d[1] if d else None
                break
        rec = parse_date(res.get("recordedDate"))
        fact = ConditionFact(
            ref=ref, codings=_codings(code), text=_text(code),
            clinical_status=_status_code(res.get("clinicalStatus")),
            verification_status=_status_code(res.get("verificationStatus")),
            onset_earliest=onset_e, onset_latest=onset_l, onset_text=onset_text,
            abated=abated, abatement_latest=ab_latest, recorded=rec[0] if rec else None,
            body_sites=self._body_sites(res.get("bodySite")),
        )
        if "onsetAge" in res and isinstance(res["onsetAge"], dict):
            self._ages.append((len(self.conditions), res["onsetAge"]))
        self.conditions.append((fact, _subject(res, "subject")))

    def _body_sites(self, value: Any) -> tuple[BodySite, ...]:
        if not isinstance(value, list) or not value:
            return ()
        sites = self.kb.sites
        lat_codes = self.kb.laterality_codes
        lateralized = self.kb.lateralized
        found: list[tuple[str | None, str | None]] = []
        fixed: list[tuple[Site, str | None]] = []
        laterality = None
        texts = []
        for concept in value:
            if not isinstance(concept, dict):
                continue
            t = _text(concept)
            if t:
                texts.append(t)
            for system, code, disp in _codings(concept):
                if system == "snomed" and code in lateralized:
                    fixed.append((lateralized[code], disp))
                elif system == "snomed" and code in lat_codes:
                    laterality = lat_codes[code]
                elif system == "snomed" and code in sites:
                    found.append((code, disp))
                else:
                    found.append((None, disp or code))
                    if disp:
                        texts.append(disp)
        if laterality is None:
            tl = self.kb.text_laterality
            for t in texts:
                for word in t.lower().replace(",", " ").split():
                    if word in tl:
                        laterality = tl[word]
                        break
                if laterality:
                    break
        out = [BodySite(site, site.laterality, disp) for site, disp in fixed]
        if fixed and not any(code for code, _ in found):
            return tuple(out)
        for code, disp in found or [(None, None)]:
            if code is None:
                out.append(BodySite(None, laterality, disp or (texts[0] if texts else None)))
            else:
                lat = laterality if sites[code].lateralizable else None
                out.append(BodySite(Site(code, lat), lat, disp))
        return tuple(out)

    # -- Observation -------------------------------------------------------------------------------------------

    def _observation(self, res: dict, full_url: str | None, index: int) -> None:
        code = res.get("code")
        if not isinstance(code, dict):
            return
        kind = None
        loinc = None
        for c in _list(code.get("coding")):
            if isinstance(c, dict):
                code_value = c.get("code")
                k = self.obs_code_kind.get(code_value) if isinstance(code_value, str) else None
                if k is not None and _norm_system(c.get("system")) == "loinc":
                    kind, loinc = k, c["code"]
                    break
        if kind is None:
            return  # not something screening reads: the common case, one probe per coding
        ref = _ref_of(res, "Observation", full_url, index, self.warnings)
        status = res.get("status") if isinstance(res.get("status"), str) else None
        eff_raw = res.get("effectiveDateTime") or res.get("effectiveInstant")
        if eff_raw is None and isinstance(res.get("effectivePeriod"), dict):
            eff_raw = res["effectivePeriod"].get("end") or res["effectivePeriod"].get("start")
        if eff_raw is None:
            eff_raw = res.get("issued")
        effective = _parse_instant(eff_raw)
        eff_date = parse_date(eff_raw)
        info = self.obs_kinds[kind]
        value = unit = sysv = diav = answer = None
        value_date = None
        if kind == "bp":
            sysv, diav = self._bp(res, info, loinc, ref)
            unit = info.get("unit")
        elif kind == "pregnancy-status":
            answer = self._answer(res.get("valueCodeableConcept"), info)
            if answer is None and "valueCodeableConcept" in res:
                self.warnings.append(f"{ref}: pregnancy status answer is not one of the known codes; not used.")
        elif kind == "edd":
            d = parse_date(res.get("valueDateTime") or res.get("valueDate"))
            value_date = d[0] if d else None
        else:
            value, unit = self._quantity(res.get("valueQuantity"), info, ref, kind)
        self.observations.append((ObservationFact(
            ref=ref, kind=kind, code=loinc or "", status=status, effective=effective,
            effective_date=eff_date[1] if eff_date else None, value=value, unit=unit, systolic=sysv, diastolic=diav,
            answer=answer, value_date=value_date, display=_text(code) or next((d for _, _, d in _codings(code) if d), None),
        ), _subject(res, "subject")))

    def _quantity(self, q: Any, info: Mapping[str, Any], ref: str, kind: str) -> tuple[float | None, str | None]:
        if not isinstance(q, dict):
            return None, None
        v = q.get("value")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None, None
        units = info.get("units") or {}
        raw_unit = q.get("code") if isinstance(q.get("code"), str) else q.get("unit")
        if raw_unit is None:
            raw_unit = q.get("unit")
        factor = units.get(raw_unit) if isinstance(raw_unit, str) else None
        if factor is None and isinstance(q.get("unit"), str):
            factor = units.get(q["unit"])
        if factor is None:
            key = (kind, str(raw_unit))
            if key not in self._unit_warned:
                self._unit_warned.add(key)
                self.warnings.append(f"{ref}: {kind} value in unit {raw_unit!r} is not one we can convert; not used.")
            return None, None
        if factor == "C":
            return float(v), "Cel"
        if factor == "F":
            return round((float(v) - 32.0) * 5.0 / 9.0, 2), "Cel"
        return float(v) * float(factor), info.get("unit")

    def _bp(self, res: dict, info: Mapping[str, Any], loinc: str | None, ref: str) -> tuple[float | None, float | None]:
        sys_codes = set(info.get("systolic") or ())
        dia_codes = set(info.get("diastolic") or ())
        sysv = diav = None
        if loinc in sys_codes:
            sysv, _ = self._quantity(res.get("valueQuantity"), info, ref, "bp")
        elif loinc in dia_codes:
            diav, _ = self._quantity(res.get("valueQuantity"), info, ref, "bp")
        for comp in _list(res.get("component")):
            if not isinstance(comp, dict):
                continue
            for c in _list(comp["code"].get("coding")) if isinstance(comp.get("code"), dict) else ():
                if not isinstance(c, dict):
                    continue
                if c.get("code") in sys_codes:
                    sysv, _ = self._quantity(comp.get("valueQuantity"), info, ref, "bp")
                elif c.get("code") in dia_codes:
                    diav, _ = self._quantity(comp.get("valueQuantity"), info, ref, "bp")
        return sysv, diav

    @staticmethod
    def _answer(concept: Any, info: Mapping[str, Any]) -> str | None:
        codings = concept.get("coding") if isinstance(concept, dict) else None
        for c in _list(codings):
            if not isinstance(c, dict):
                continue
            for answer, pairs in (info.get("answers") or {}).items():
                for system, code in pairs:
                    if c.get("code") == code and (c.get("system") == system or _norm_system(c.get("system")) == _norm_system(system)):
                        return answer
        return None

    # -- AllergyIntolerance, Procedure -------------------------------------------------------------------------

    def _allergy(self, res: dict, full_url: str | None, index: int) -> None:
        ref = _ref_of(res, "AllergyIntolerance", full_url, index, self.warnings)
        code = res.get("code")
        codings = list(_codings(code))
        texts = [t for t in (_text(code),) if t]
        texts += [d for _, _, d in codings if d]
        for reaction in _list(res.get("reaction")):
            if isinstance(reaction, dict) and isinstance(reaction.get("substance"), dict):
                codings += _codings(reaction["substance"])
                t = _text(reaction["substance"])
                if t:
                    texts.append(t)
        rec = parse_date(res.get("recordedDate") or res.get("onsetDateTime"))
        self.allergies.append((AllergyFact(
            ref=ref, codings=tuple(codings), texts=tuple(texts),
            clinical_status=_status_code(res.get("clinicalStatus")),
            verification_status=_status_code(res.get("verificationStatus")),
            recorded=rec[0] if rec else None,
        ), _subject(res, "patient")))

    def _procedure(self, res: dict, full_url: str | None, index: int) -> None:
        ref = _ref_of(res, "Procedure", full_url, index, self.warnings)
        start = end = None
        if "performedDateTime" in res:
            d = parse_date(res["performedDateTime"])
            if d:
                start, end = d
        elif isinstance(res.get("performedPeriod"), dict):
            p = res["performedPeriod"]
            ds, de = parse_date(p.get("start")), parse_date(p.get("end"))
            start = ds[0] if ds else (de[0] if de else None)
            end = de[1] if de else (ds[1] if ds else None)
        cats = []
        cat = res.get("category")
        for concept in (cat if isinstance(cat, list) else [cat]):
            cats.extend(_codings(concept))
        code = res.get("code")
        self.procedures.append((ProcedureFact(
            ref=ref, codings=_codings(code), text=_text(code),
            status=res.get("status") if isinstance(res.get("status"), str) else None,
            start=start, end=end, body_sites=self._body_sites(res.get("bodySite")), categories=tuple(cats),
        ), _subject(res, "subject")))

    # -- medications (after the pass: references to Medication resources) -----------------------------------

    def medication_facts(self) -> list[tuple[MedicationFact, str | None]]:
        out = []
        for res, rtype, full_url, subject, index in self.medications:
            ref = _ref_of(res, rtype, full_url, index, self.warnings)
            concept = res.get("medicationCodeableConcept")
            codings = list(_codings(concept))
            text = _text(concept)
            mref = res.get("medicationReference")
            if isinstance(mref, dict):
                target = mref.get("reference")
                med = None
                if isinstance(target, str):
                    if target.startswith("#"):
                        for c in _list(res.get("contained")):
                            if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == target[1:]:
                                med = c
                                break
                    else:
                        med = self.medication_resources.get(target)
                        if med is None and "/Medication/" in target:
                            med = self.medication_resources.get("Medication/" + target.rsplit("/", 1)[-1])
                if med is not None:
                    codings += _codings(med.get("code"))
                    text = text or _text(med.get("code"))
                    # Ingredients: a compounded or unlisted product still names its active ingredient.
                    for ing in _list(med.get("ingredient")):
                        if isinstance(ing, dict):
                            codings += _codings(ing.get("itemCodeableConcept"))
                if isinstance(mref.get("display"), str):
                    text = text or mref["display"]
                if med is None and not codings:
                    self.warnings.append(f"{ref}: its Medication ({str(target)[:60]}) is not in the data; only the "
                                         "reference's display text can be checked.")
            authored = start = end = None
            if rtype == "MedicationRequest":
                d = parse_date(res.get("authoredOn"))
                authored = d[0] if d else None
                start = authored
                vp = (res.get("dispenseRequest") or {}).get("validityPeriod") if isinstance(res.get("dispenseRequest"), dict) else None
                if isinstance(vp, dict):
                    de = parse_date(vp.get("end"))
                    end = de[1] if de else None
            else:
                eff = res.get("effectiveDateTime")
                if eff is not None:
                    d = parse_date(eff)
                    start, end = (d[0], d[1]) if d else (None, None)
                elif isinstance(res.get("effectivePeriod"), dict):
                    p = res["effectivePeriod"]
                    ds, de = parse_date(p.get("start")), parse_date(p.get("end"))
                    start = ds[0] if ds else None
                    end = de[1] if de else None
                d = parse_date(res.get("dateAsserted"))
                authored = d[0] if d else None
            out.append((MedicationFact(
                ref=ref, resource_type=rtype, status=res.get("status") if isinstance(res.get("status"), str) else None,
                codings=tuple(codings), text=text, authored=authored, start=start, end=end,
                intent=res.get("intent") if isinstance(res.get("intent"), str) else None,
            ), subject))
        return out


def _subject(res: dict, key: str) -> str | None:
    s = res.get(key)
    if isinstance(s, dict):
        r = s.get("reference")
        return r if isinstance(r, str) else None
    return None


def _age_to_date(birth: date | None, age: Mapping[str, Any]) -> tuple[date, date] | None:
    if birth is None:
        return None
    v = age.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    unit = age.get("code") or age.get("unit")
    if unit in ("a", "yr", "year", "years"):
        y = birth.year + int(v)
        try:
            first = birth.replace(year=y)
        except ValueError:
            first = date(y, 3, 1)
        try:
            last = birth.replace(year=y + 1)
        except ValueError:
            last = date(y + 1, 3, 1)
        return first, last
    return None


def from_bundle(bundle: Mapping[str, Any], *, kb: KnowledgeBase | None = None) -> PatientChart:
    """A FHIR Bundle (searchset, collection, batch/transaction, or a batch-response whose entries are searchsets)."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise InvalidInput("Expected a FHIR Bundle (resourceType 'Bundle').")
    return _build(_bundle_pairs(bundle), kb)


def _bundle_pairs(bundle: Mapping[str, Any]):
    for entry in _list(bundle.get("entry")):
        if not isinstance(entry, dict):
            yield None, None
            continue
        res = entry.get("resource")
        if isinstance(res, dict) and res.get("resourceType") == "Bundle":
            # batch-response: each entry holds a searchset page
            yield from _bundle_pairs(res)
            continue
        if (entry.get("search") or {}).get("mode") == "outcome" if isinstance(entry.get("search"), dict) else False:
            continue
        if res is None:
            continue
        yield res, entry.get("fullUrl")


def from_resources(resources: Iterable[Mapping[str, Any]], *, kb: KnowledgeBase | None = None) -> PatientChart:
    """Resources (dicts) -> PatientChart. Raises ``InvalidInput`` only when there is no Patient or several."""
    return _build(((r, None) for r in resources), kb)


def _build(pairs: Iterable[tuple[Any, str | None]], kb: KnowledgeBase | None) -> PatientChart:
    kb = kb or load_kb()
    reader = _Reader(kb)
    for i, (res, full_url) in enumerate(pairs):
        if res is None:
            continue
        reader.read(res, full_url, i)
    if not reader.patients:
        raise InvalidInput("The data has no Patient resource, so there is no one to screen.")
    if len(reader.patients) > 1:
        raise InvalidInput(f"The data holds {len(reader.patients)} patients; screening needs exactly one.")
    patient = next(iter(reader.patients.values()))
    accepted = {patient.ref, f"urn:uuid:{patient.id}"}
    if patient.full_url:
        accepted.add(patient.full_url)
    warnings = reader.warnings
    foreign = 0

    def mine(subject: str | None) -> bool:
        nonlocal foreign
        if subject is None or subject in accepted or subject.startswith("Patient?"):
            return True
        if subject.endswith("/" + patient.ref) or (subject.startswith("#")):
            return True
        foreign += 1
        return False

    pairs_c = reader.conditions
    if reader._ages:
        import dataclasses

        # Condition.onsetAge: turned into dates with the patient's birthDate (earliest/latest day of that year of age)
        by_pos = dict(reader._ages)
        pairs_c = list(pairs_c)
        for pos, age in by_pos.items():
            rng = _age_to_date(patient.birth_date, age)
            if rng:
                fact, subject = pairs_c[pos]
                pairs_c[pos] = (dataclasses.replace(fact, onset_earliest=rng[0], onset_latest=rng[1], onset_text=None), subject)
    conditions = [f for f, s in pairs_c if mine(s)]
    observations = [f for f, s in reader.observations if mine(s)]
    medications = [f for f, s in reader.medication_facts() if mine(s)]
    allergies = [f for f, s in reader.allergies if mine(s)]
    procedures = [f for f, s in reader.procedures if mine(s)]
    if foreign:
        warnings.append(f"{foreign} resource(s) refer to a patient other than {patient.ref}; they were not screened.")
    return PatientChart(
        patient=patient, conditions=tuple(conditions), observations=tuple(observations),
        medications=tuple(medications), allergies=tuple(allergies), procedures=tuple(procedures),
        warnings=tuple(dict.fromkeys(warnings)), resource_count=reader.count, skipped=dict(reader.skipped),
    )
