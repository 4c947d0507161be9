"""Contraindication screening: (PatientChart, proposed techniques and sites, today, KB) -> Screening. Pure.

The verdict (issue 4):
* ``contraindicated`` — an absolute finding applies to a proposed technique at a proposed site, or a local finding's
  site overlaps a proposed site for a proposed technique;
* ``caution`` — otherwise, a relative finding applies to a proposed technique; or a local or absolute finding exists
  that does not apply to this proposal (it is elsewhere on the body, or for another technique); or the chart holds
  something the engine could not code that mentions a contraindication (``needs_review``). The last two widen the
  issue's definition on purpose: the engine must never say "clear" when the chart says otherwise;
* ``clear`` — nothing of the above. Relative findings for techniques not proposed (e.g. anticoagulants when only
  Swedish is proposed) stay in ``findings`` but do not raise the verdict.
No techniques given = all seven; no sites given = the whole body.

Rules marked ``informational`` in the knowledge base (an allergy to a massage product: nut oils, latex, fragrance)
are not contraindications. Issue 4 asks for "an informational finding": what the therapist must know to pick the
products, nothing the physician must clear. They never reach ``findings`` and never change the verdict (a chart
whose only concern is a latex allergy is ``clear``); they are listed in ``Screening.information`` (JSON
``information``), with the same keys as a finding except ``class``, so ``findings[].class`` keeps its three values.

Everything is evaluated *as of* ``today``: a Condition with onset after ``today`` does not exist yet, one whose
abatement date is after ``today`` was still active then, observations and orders after ``today`` are ignored. So a
full chart can be screened at any date inside an episode and give the answer a clinician would have given then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Iterable, Mapping, Sequence

from fhir_massage.chart import (
    ConditionFact, MedicationFact, ObservationFact, PatientChart, from_bundle,
)
from fhir_massage.codes import TECHNIQUES
from fhir_massage.errors import InvalidInput
from fhir_massage.knowledge import CodeMatch, KnowledgeBase, Rule, Site, load_kb, norm_icd, parse_site
from fhir_massage.units import quantity_text, unit_text

__all__ = ["Screening", "Finding", "Evidence", "screen", "screen_bundle", "VERDICTS", "normalize_techniques", "normalize_sites"]

VERDICTS = ("clear", "caution", "contraindicated")
_CLASS_RANK = {"absolute": 0, "local": 1, "relative": 2}
_INVALID_VERIFICATION = frozenset({"refuted", "entered-in-error"})
_UNCONFIRMED = frozenset({"unconfirmed", "provisional", "differential"})
_RESOLVED = frozenset({"inactive", "remission", "resolved"})
_OBS_VALID = frozenset({"final", "amended", "corrected"})
_SYSTEM_URI = {"snomed": "http://snomed.info/sct", "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm",
               "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm", "loinc": "http://loinc.org"}


@dataclass(frozen=True)
class Evidence:
    """One triggering resource, with what a clinician needs to judge it: dates, value, status, the matched code."""

    ref: str
    display: str
    status: str | None = None
    dates: Mapping[str, str] = field(default_factory=dict)
    value: float | None = None
    unit: str | None = None
    code: CodeMatch | None = None
    note: str | None = None
    unconfirmed: bool = False

    def summary(self) -> str:
        parts = [self.display]
        bits = []
        if self.value is not None:
            bits.append(quantity_text(self.value, self.unit))  # "38.9 °C", never "38.9 Cel" (fhir_massage.units)
        for k, v in self.dates.items():
            bits.append(f"{k} {v}")
        if self.status:
            bits.append(self.status)
        if bits:
            parts.append(f"({', '.join(bits)})")
        if self.note:
            parts.append(f"— {self.note}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref, "display": self.display}
        if self.status:
            out["status"] = self.status
        if self.dates:
            out["dates"] = dict(self.dates)
        if self.value is not None:
            out["value"] = self.value
            out["unit"] = self.unit
        if self.code is not None:
            out["code"] = {"system": self.code.system, "code": self.code.code, "display": self.code.display,
                           "tag": self.code.tag, "verified": self.code.verified}
        if self.note:
            out["note"] = self.note
        if self.unconfirmed:
            out["unconfirmed"] = True
        return out


@dataclass(frozen=True)
class Finding:
    rule: str
    cls: str
    techniques: tuple[str, ...]
    sites: tuple[Site, ...]
    evidence: tuple[str, ...]
    message: str
    evidence_class: str
    source: str
    verified: bool
    details: tuple[Evidence, ...]
    title: str = ""
    act_code: str = "COND"
    reference: str | None = None
    tag: str = ""
    unconfirmed: bool = False
    informational: bool = False
    parent: str | None = None

    def applies_to(self, techniques: Iterable[str] | None = None, sites: Iterable[Site | str] | None = None,
                   *, kb: KnowledgeBase | None = None) -> bool:
        """Does this finding concern any proposed technique at any proposed site? (None = all / whole body)."""
        kb = kb or load_kb()
        if techniques is not None and not (set(techniques) & set(self.techniques)):
            return False
        proposed = normalize_sites(sites, kb)
        return any(kb.overlaps(a, b) for a in self.sites for b in proposed)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "class": self.cls, "techniques": list(self.techniques),
            "sites": [str(s) for s in self.sites], "evidence": list(self.evidence), "message": self.message,
            "evidenceClass": self.evidence_class, "source": self.source, "verified": self.verified,
            "title": self.title, "tag": self.tag, "actCode": self.act_code, "reference": self.reference,
            "unconfirmed": self.unconfirmed, "informational": self.informational,
            "details": [d.to_json() for d in self.details],
        }


@dataclass(frozen=True)
class Screening:
    verdict: str
    findings: tuple[Finding, ...]
    needs_review: tuple[Mapping[str, str], ...]
    warnings: tuple[str, ...]
    techniques: tuple[str, ...]
    sites: tuple[Site, ...]
    today: date
    patient: str
    kb_version: str
    applicable: tuple[str, ...] = ()  # rule ids of findings that apply to the proposal
    # informational items (product allergies): never in ``findings``, never part of the verdict
    information: tuple[Finding, ...] = ()
    information_applicable: tuple[str, ...] = ()  # rule ids of information items about a proposed technique

    def to_json(self) -> dict[str, Any]:
        applicable = set(self.applicable)
        # needsReview entries: {"evidence": "Type/id", "reason": "..."} (+ "alsoIn": [refs] for repeated copies)
        findings = []
        for f in self.findings:
            j = f.to_json()
            j["appliesToProposal"] = f.rule in applicable
            findings.append(j)
        information = []
        for f in self.information:
            # no "class": an information item restricts no technique or site, and a value here would either
            # claim a contraindication class it does not have or add a fourth value scripts do not expect
            j = {k: v for k, v in f.to_json().items() if k != "class"}
            j["appliesToProposal"] = f.rule in self.information_applicable
            information.append(j)
        return {
            "verdict": self.verdict,
            "findings": findings,
            "information": information,
            "needsReview": [{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in n.items()}
                            for n in self.needs_review],
            "warnings": list(self.warnings),
            "patient": self.patient,
            "screenedOn": self.today.isoformat(),
            "proposal": {"techniques": list(self.techniques), "sites": [str(s) for s in self.sites]},
            "knowledgeBase": self.kb_version,
        }


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def normalize_techniques(techniques: Iterable[str] | None) -> tuple[str, ...]:
    if techniques is None:
        return TECHNIQUES
    if isinstance(techniques, str):
        techniques = [techniques]
    out = []
    for t in techniques:
        if t not in TECHNIQUES:
            raise InvalidInput(f"Unknown technique {t!r}; use one of: {', '.join(TECHNIQUES)}.")
        if t not in out:
            out.append(t)
    return tuple(out) if out else TECHNIQUES


def normalize_sites(sites: Iterable[Site | str] | None, kb: KnowledgeBase) -> tuple[Site, ...]:
    if sites is None:
        return (Site(kb.root_site),)
    if isinstance(sites, (str, Site)):
        sites = [sites]
    out = []
    for s in sites:
        site = s if isinstance(s, Site) else parse_site(s, kb)
        if site not in out:
            out.append(site)
    return tuple(out) if out else (Site(kb.root_site),)


# ---------------------------------------------------------------------------------------------------------------
# The engine


class _Acc:
    """Findings under construction, one per rule id (duplicates from repeated resources merge here)."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self.sites: dict[str, set[Site]] = {}
        self.evidence: dict[str, dict[str, Evidence]] = {}

    def add(self, rule: Rule, sites: Iterable[Site], ev: Evidence) -> None:
        self.sites.setdefault(rule.id, set()).update(sites)
        bucket = self.evidence.setdefault(rule.id, {})
        old = bucket.get(ev.ref)
        # the same resource may match a rule through several codings: keep the verified/most specific match
        if old is None or (ev.code is not None and old.code is not None and ev.code.verified and not old.code.verified):
            bucket[ev.ref] = ev

    def fired(self, rule_id: str) -> bool:
        return rule_id in self.evidence

    def build(self) -> list[Finding]:
        out = []
        root = self.kb.root_site
        for rid, bucket in self.evidence.items():
            rule = self.kb.rules[rid]
            details = tuple(sorted(bucket.values(), key=lambda e: (_first_date(e), e.ref)))
            sites = self._simplify(self.sites.get(rid) or {Site(root)})
            unconfirmed = all(d.unconfirmed for d in details)
            verified = all(d.code.verified for d in details if d.code is not None)
            shown = [d.summary() for d in details[:3]]
            if len(details) > 3:
                shown.append(f"and {len(details) - 3} more")
            message = named_thresholds(rule, self.kb) + " Evidence: " + "; ".join(shown) + "."
            if unconfirmed:
                message += " (Recorded as unconfirmed/provisional: confirm with the physician.)"
            out.append(Finding(
                rule=rid, cls=rule.cls, techniques=tuple(t for t in TECHNIQUES if t in rule.techniques),
                sites=sites, evidence=tuple(d.ref for d in details), message=message,
                evidence_class=rule.evidence_class, source=rule.source, verified=verified, details=details,
                title=rule.title, act_code=rule.act_code, reference=rule.reference, tag=rule.tag,
                unconfirmed=unconfirmed, informational=rule.informational, parent=rule.parent,
            ))
        out.sort(key=lambda f: (_CLASS_RANK[f.cls], f.rule))
        return out

    def _simplify(self, sites: set[Site]) -> tuple[Site, ...]:
        """Drop sites contained in another listed site (same or compatible side): the list reads like a clinician's."""
        kb = self.kb
        items = sorted(sites)
        keep = []
        for s in items:
            covered = False
            for o in items:
                if o == s:
                    continue
                info = kb.sites.get(s.code)
                if info is None or o.code not in info.ancestors:
                    continue
                if o.laterality is None or o.laterality == "bilateral" or o.laterality == s.laterality:
                    if o.code != s.code or o.laterality != s.laterality:
                        covered = True
                        break
            if not covered:
                keep.append(s)
        # same code with left and right = bilateral
        by_code: dict[str, set[str | None]] = {}
        for s in keep:
            by_code.setdefault(s.code, set()).add(s.laterality)
        out = []
        for code, lats in by_code.items():
            if None in lats:
                out.append(Site(code))
            elif "bilateral" in lats or {"left", "right"} <= lats:
                out.append(Site(code, "bilateral"))
            else:
                out.extend(Site(code, lat) for lat in sorted(lats))
        return tuple(sorted(out))


def _first_date(e: Evidence) -> str:
    for v in e.dates.values():
        return v
    return ""


def _days(a: date, b: date) -> int:
    return (a - b).days


class _Engine:
    def __init__(self, chart: PatientChart, kb: KnowledgeBase, today: date) -> None:
        self.chart = chart
        self.kb = kb
        self.today = today
        self.th = kb.thresholds
        self.acc = _Acc(kb)
        self.review: dict[tuple[str, str], dict[str, str]] = {}
        self.warnings: list[str] = list(chart.warnings)
        self.gestational_days: list[tuple[int, Evidence]] = []

    # -- helpers -----------------------------------------------------------------------------------------------

    def needs_review(self, ref: str, reason: str) -> None:
        self.review.setdefault((ref, reason), {"evidence": ref, "reason": reason})


    def fire(self, rule: Rule, sites: Iterable[Site], ev: Evidence, *, companions: bool = True) -> None:
        self.acc.add(rule, sites, ev)
        if not companions:
            return
        for cid in rule.companions:
            c = self.kb.rules[cid]
            if c.when is not None:
                continue  # conditional companions are added by the logic that knows the condition
            self.acc.add(c, self.sites_for(c, None, None, ev), ev)

    def sites_for(self, rule: Rule, fact: Any, cm: CodeMatch | None, ev: Evidence | None,
                  base: Sequence[Site] | None = None) -> tuple[Site, ...]:
        kb = self.kb
        if rule.scope == "systemic":
            return (Site(kb.root_site),)
        if rule.scope == "fixed-site":
            return rule.sites or (Site(kb.root_site),)
        if base is None:
            base = self._fact_sites(fact, cm) if fact is not None else ()
            if not base and ev is not None and rule.parent:
                # a companion shares the parent's facts: reuse the sites computed for the parent's evidence
                base = tuple(self._sites_by_ref.get(ev.ref, ()))
        if not base:
            base = rule.sites or (Site(kb.root_site),)
        return tuple(kb.widen(s, rule.margin) for s in base)

    _sites_by_ref: dict[str, tuple[Site, ...]]
    _inferred: dict[str, str]

    def _fact_sites(self, fact: Any, cm: CodeMatch | None) -> tuple[Site, ...]:
        kb = self.kb
        body = getattr(fact, "body_sites", ()) or ()
        mapped = [b.site for b in body if b.site is not None]
        lat = next((b.laterality for b in body if b.laterality), None)
        if mapped:
            out = tuple(mapped)
        elif cm is not None and cm.site:
            info = kb.sites.get(cm.site)
            out = (Site(cm.site, lat if info and info.lateralizable else None),)
        else:
            out_list = []
            for system, code, _ in getattr(fact, "codings", ()):
                if system == "icd10cm":
                    hit = kb.icd_site(code)
                    if hit:
                        site, _tag = hit
                        if site.laterality is None and lat and kb.sites[site.code].lateralizable:
                            site = Site(site.code, lat)
                        out_list.append(site)
            out = tuple(out_list)
        if not out and kb.text_site_re is not None:
            words = " ".join([getattr(fact, "text", None) or ""] + [d for _, _, d in getattr(fact, "codings", ()) if d])
            found = []
            for m in kb.text_site_re.finditer(words):
                code = kb.text_sites[m.group(0).lower()]
                info = kb.sites[code]
                found.append(Site(code, lat if info.lateralizable else None))
            if found:
                out = tuple(dict.fromkeys(found))
                self._inferred[fact.ref] = ", ".join(sorted({m.group(0).lower() for m in kb.text_site_re.finditer(words)}))
        self._sites_by_ref[fact.ref] = out
        return out

    def _matches(self, codings: Iterable[tuple[str, str, str | None]]) -> list[tuple[str, CodeMatch]]:
        kb = self.kb
        out: list[tuple[str, CodeMatch]] = []
        for system, code, _ in codings:
            if system == "snomed":
                out.extend(kb.snomed.get(code, ()))
            elif system == "icd10cm":
                out.extend(kb.match_icd(code))
            elif system == "rxnorm":
                out.extend(kb.rxnorm.get(code, ()))
        return out

    # -- Conditions --------------------------------------------------------------------------------------------

    def conditions(self) -> None:
        today = self.today
        for fact in self.chart.conditions:
            vs = fact.verification_status
            if vs in _INVALID_VERIFICATION:
                continue  # refuted / entered-in-error never count
            if fact.onset_earliest is not None and fact.onset_earliest > today:
                continue  # not yet: screening as of `today`
            if fact.onset_earliest is None and fact.recorded is not None and fact.recorded > today:
                continue
            if fact.abatement_latest is not None:
                active = fact.abatement_latest > today
            elif fact.abated or fact.clinical_status in _RESOLVED:
                active = False
            else:
                active = True  # active, recurrence, relapse, or no status at all (assume the worst)
            unconfirmed = vs in _UNCONFIRMED
            matches = self._matches(fact.codings)
            if not matches:
                self._unmatched_condition(fact, active)
                continue
            for rule_id, cm in matches:
                rule = self.kb.rules[rule_id]
                if rule.kind == "observation":
                    continue
                self._condition_rule(fact, rule, cm, active, unconfirmed)

    def _condition_ev(self, fact: ConditionFact, cm: CodeMatch, active: bool, unconfirmed: bool, note: str | None = None) -> Evidence:
        dates = {}
        if fact.onset_latest is not None:
            dates["onset"] = (fact.onset_earliest or fact.onset_latest).isoformat()
        elif fact.onset_text:
            dates["onset"] = fact.onset_text
        if fact.abatement_latest is not None:
            dates["abatement"] = fact.abatement_latest.isoformat()
        if fact.recorded is not None and not dates:
            dates["recorded"] = fact.recorded.isoformat()
        status = "active" if active else (fact.clinical_status or "resolved")
        if active and fact.clinical_status in _RESOLVED:
            status = f"active on {self.today.isoformat()} (recorded {fact.clinical_status} later)"
        if unconfirmed:
            status += f", {fact.verification_status}"
        code = next(((s, c, d) for s, c, d in fact.codings if c == cm.code or (s == "icd10cm" and norm_icd(c) == norm_icd(cm.code))), None)
        shown = CodeMatch(_SYSTEM_URI.get(code[0], code[0]) if code else cm.system, cm.code,
                          (code[2] if code and code[2] else cm.display), cm.tag, cm.verified, cm.site)
        display = fact.display
        if display == cm.code or not display.strip():
            display = shown.display  # a bare code: show what it means
        return Evidence(ref=fact.ref, display=display, status=status, dates=dates, code=shown, note=note,
                        unconfirmed=unconfirmed)

    def _condition_rule(self, fact: ConditionFact, rule: Rule, cm: CodeMatch, active: bool, unconfirmed: bool) -> None:
        today, th = self.today, self.th
        since_onset = _days(today, fact.onset_latest) if fact.onset_latest else None
        note = None
        if rule.status == "history":
            qualifies = True
        elif rule.status == "any":
            key = rule.time.get("onsetWithinDays")
            if key:
                qualifies = active if since_onset is None else since_onset <= th[key]
                if since_onset is not None and qualifies:
                    note = f"onset {since_onset} days ago"
            else:
                qualifies = True
        else:  # active / current
            qualifies = active
            stale_key = rule.time.get("staleActiveAfterDays")
            if (active and stale_key and fact.abatement_latest is None and since_onset is not None
                    and since_onset > th[stale_key]):
                self.needs_review(fact.ref, f"'{fact.display[:120]}' ({rule.id}) is still recorded active {since_onset} days "
                                            "after onset — probably never closed; confirm it has resolved before treating.")
                return
            key = rule.time.get("acuteWindowDays")
            if not qualifies and key and since_onset is not None and since_onset <= th[key]:
                qualifies = True
                note = f"onset {since_onset} days ago: within the {th[key]:g}-day acute window although recorded resolved"
        if not qualifies:
            for hid in self.kb.history_rules.get(rule.id, ()):
                self._history(fact, self.kb.rules[hid], cm, active, unconfirmed)
            return
        if rule.kind == "pregnancy":
            key = rule.time.get("maxDurationDays")
            if key and since_onset is not None and since_onset > th[key]:
                note = (f"onset {since_onset} days ago — longer than a pregnancy; check whether it is still current")
            for system, code, _ in fact.codings:
                weeks = _z3a_weeks(system, code)
                if weeks is not None:
                    self.gestational_days.append((weeks * 7, self._condition_ev(fact, cm, active, unconfirmed)))
                trimester = _o_code_trimester(system, code)
                if trimester is not None and active:
                    # a representative gestational age inside that trimester (only the trimester is known)
                    ga = {1: 49, 2: 140, 3: 230}[trimester]
                    self.gestational_days.append((ga, self._condition_ev(fact, cm, active, unconfirmed,
                                                                         f"trimester {trimester} from the ICD-10-CM code")))
        sites = self.sites_for(rule, fact, cm, None)
        ev = self._condition_ev(fact, cm, active, unconfirmed, self._with_inferred(fact.ref, note, rule))
        self.fire(rule, sites, ev)

    def _with_inferred(self, ref: str, note: str | None, rule: Rule) -> str | None:
        words = self._inferred.get(ref)
        if not words or rule.scope != "site":
            return note
        extra = f"site inferred from the words '{words}'"
        return f"{note}; {extra}" if note else extra

    def _history(self, fact: ConditionFact, rule: Rule, cm: CodeMatch, active: bool, unconfirmed: bool) -> None:
        note = None
        key = rule.time.get("clearanceWithinDays")
        end = fact.abatement_latest or fact.onset_latest
        if end is not None:
            ago = _days(self.today, end)
            note = f"{'ended' if fact.abatement_latest else 'onset'} {ago} days ago"
            if key and ago <= self.th[key]:
                note += f" — within {self.th[key]:g} days: physician clearance needed"
        sites = self.sites_for(rule, fact, cm, None)
        ev = self._condition_ev(fact, cm, active, unconfirmed, self._with_inferred(fact.ref, note, rule))
        self.fire(rule, sites, ev)

    def _unmatched_condition(self, fact: ConditionFact, active: bool) -> None:
        words = " ".join([fact.text or ""] + [d for _, _, d in fact.codings if d])
        if not words.strip():
            return
        key = ("condition" if active else "condition-history", words)
        if key not in self._kw_memo:  # Synthea-style charts repeat the same problem text many times
            rx = self.kb.keyword_re[key[0]]
            found = rx.search(words) if rx else None
            self._kw_memo[key] = found.group(0).lower() if found else None
        word = self._kw_memo[key]
        if word is None:
            return
        coded = any(s in ("snomed", "icd10cm") for s, _, _ in fact.codings)
        how = ("its code is not in the knowledge base" if coded
               else "it has no code the engine can read (text only or an unknown code system)")
        state = "active" if active else "resolved"
        self.needs_review(fact.ref, f"Problem '{fact.display[:120]}' ({state}) mentions '{word}' but {how}; "
                                    "a clinician must check it.")

    # -- Medications -------------------------------------------------------------------------------------------

    def medications(self) -> None:
        th, today = self.th, self.today
        for fact in self.chart.medications:
            current, status_text = self._medication_current(fact)
            if not current:
                continue
            matches = [(rid, cm) for rid, cm in self._matches(fact.codings) if self.kb.rules[rid].kind == "medication"]
            if not matches:
                words = " ".join([fact.text or ""] + [d for _, _, d in fact.codings if d])
                rx = self.kb.keyword_re["medication"]
                m = rx.search(words) if rx and words.strip() else None
                if m:
                    self.needs_review(fact.ref, f"Medication '{fact.display[:120]}' mentions '{m.group(0).lower()}' but "
                                                "has no RxNorm code in the knowledge base; a clinician must check it.")
                continue
            for rid, cm in matches:
                rule = self.kb.rules[rid]
                dates = {}
                if fact.authored:
                    dates["authored"] = fact.authored.isoformat()
                if fact.start and fact.start != fact.authored:
                    dates["start"] = fact.start.isoformat()
                if fact.end:
                    dates["end"] = fact.end.isoformat()
                code = next(((s, c, d) for s, c, d in fact.codings if c == cm.code), None)
                shown = CodeMatch(cm.system, cm.code, (code[2] if code and code[2] else cm.display), cm.tag, cm.verified)
                ev = Evidence(ref=fact.ref, display=fact.display, status=status_text, dates=dates, code=shown)
                self.fire(rule, self.sites_for(rule, fact, cm, ev), ev)

    def _medication_current(self, fact: MedicationFact) -> tuple[bool, str]:
        th, today = self.th, self.today
        status = fact.status
        rt = fact.resource_type
        if status in ("entered-in-error", "cancelled", "not-taken", "not-done"):
            return False, ""
        if rt == "MedicationRequest":
            if fact.authored is not None and fact.authored > today:
                return False, ""
            if status in ("completed", "stopped"):
                last = max(d for d in (fact.authored, fact.end, fact.start) if d) if (fact.authored or fact.end or fact.start) else None
                window = th["medication_request_recent_days"]
                if last is None or _days(today, last) > window:
                    return False, ""
                return True, f"{status}, within {window:g} days"
            return True, status or "status unknown"
        if rt == "MedicationStatement":
            if fact.start is not None and fact.start > today and status != "intended":
                return False, ""
            window = th["medication_statement_recent_days"]
            if fact.end is not None and _days(today, fact.end) > window:
                return False, ""
            if status in ("completed", "stopped"):
                last = fact.end or fact.start or fact.authored
                if last is None or _days(today, last) > window:
                    return False, ""
                return True, f"{status}, within {window:g} days"
            return True, status or "status unknown"
        # MedicationAdministration: counts for a few days (LMWH and heparin act for about a day)
        if fact.start is None or fact.start > today:
            return False, ""
        window = th["medication_administration_recent_days"]
        last = fact.end or fact.start
        if _days(today, last) > window:
            return False, ""
        return True, f"administered {last.isoformat()}"

    # -- Observations ------------------------------------------------------------------------------------------

    def observations(self) -> None:
        today = self.today
        by_kind: dict[str, list[ObservationFact]] = {}
        for o in self.chart.observations:
            if o.status not in _OBS_VALID:
                continue  # preliminary, cancelled, entered-in-error, registered, unknown: not a result to act on
            if o.effective_date is None:
                continue
            if o.effective_date > today:
                continue
            by_kind.setdefault(o.kind, []).append(o)
        rules_by_kind: dict[str, list[Rule]] = {}
        for r in self.kb.rules.values():
            if r.kind == "observation" and r.observation and not r.parent:
                rules_by_kind.setdefault(r.observation["kind"], []).append(r)
        for kind, rules in rules_by_kind.items():
            facts = by_kind.get(kind)
            if not facts:
                continue
            if kind == "bp":
                self._bp(facts, rules)
                continue
            usable = [o for o in facts if o.value is not None]
            if not usable:
                continue
            latest = max(usable, key=_obs_key)
            self._apply(kind, rules, latest, {"value": latest.value})
        self._pregnancy_observations(by_kind)

    def _stale_days(self, kind: str) -> float:
        info = self.kb.obs_kinds[kind]
        if kind == "platelets" and self.acc.fired("cancer-active"):
            return self.th["platelets_stale_days_on_chemo"]
        return self.th[info["staleDays"]]

    def _apply(self, kind: str, rules: list[Rule], o: ObservationFact, values: dict[str, float | None]) -> None:
        stale = self._stale_days(kind)
        age = _days(self.today, o.effective_date)
        fired: set[str] = set()
        # absolute rules first so 'unlessRule' (the milder tier) can see them
        for rule in sorted(rules, key=lambda r: _CLASS_RANK[r.cls]):
            spec = rule.observation
            unless = spec.get("unlessRule")
            if unless and unless in fired:
                continue
            if not _compare(spec, values, self.th):
                continue
            ev = self._obs_ev(o, rule, values)
            if age > stale:
                self.needs_review(o.ref, f"Latest {kind} result ({ev.summary()}) would trigger '{rule.id}' but is "
                                         f"{age} days old (older than {stale:g} days): recheck before treating.")
                fired.add(rule.id)
                continue
            fired.add(rule.id)
            self.fire(rule, (Site(self.kb.root_site),), ev)

    def _obs_ev(self, o: ObservationFact, rule: Rule, values: Mapping[str, float | None]) -> Evidence:
        cm = next((CodeMatch("http://loinc.org", c, d, t, v) for c, d, t, v in self._loinc(rule) if c == o.code), None)
        dates = {"effective": o.effective_date.isoformat()} if o.effective_date else {}
        if o.kind == "bp":
            sysv, diav = values.get("systolic"), values.get("diastolic")
            shown = f"{sysv:g}" if sysv is not None else "?"
            shown += f"/{diav:g}" if diav is not None else "/?"
            return Evidence(ref=o.ref, display=(o.display or "Blood pressure") + f" {shown} {unit_text('mm[Hg]')}",
                            status=o.status,
                            dates=dates, code=cm)
        return Evidence(ref=o.ref, display=o.display or o.kind, status=o.status, dates=dates, value=o.value,
                        unit=o.unit, code=cm)

    def _loinc(self, rule: Rule) -> list[tuple[str, str, str, bool]]:
        raw = self.kb._raw["rules"].get(rule.id) or {}
        return [(c["code"], c["display"], c["tag"], bool(c["verified"])) for c in (raw.get("codes") or {}).get("loinc") or ()]

    def _bp(self, facts: list[ObservationFact], rules: list[Rule]) -> None:
        with_sys = [o for o in facts if o.systolic is not None]
        with_dia = [o for o in facts if o.diastolic is not None]
        if not with_sys and not with_dia:
            return
        ls = max(with_sys, key=_obs_key) if with_sys else None
        ld = max(with_dia, key=_obs_key) if with_dia else None
        if ls is not None and ld is not None and ls.ref == ld.ref:
            self._apply("bp", rules, ls, {"systolic": ls.systolic, "diastolic": ls.diastolic})
            return
        # systolic and diastolic sent as separate Observations: judge each latest value on its own
        if ls is not None:
            self._apply("bp", rules, ls, {"systolic": ls.systolic, "diastolic": None})
        if ld is not None:
            self._apply("bp", rules, ld, {"systolic": None, "diastolic": ld.diastolic})

    # -- Pregnancy ---------------------------------------------------------------------------------------------

    def _pregnancy_observations(self, by_kind: Mapping[str, list[ObservationFact]]) -> None:
        rule = self.kb.rules["pregnancy"]
        today, th = self.today, self.th
        status_obs = [o for o in by_kind.get("pregnancy-status", ()) if o.answer]
        if status_obs:
            latest = max(status_obs, key=_obs_key)
            age = _days(today, latest.effective_date)
            ev = Evidence(ref=latest.ref, display=f"Pregnancy status: {latest.answer}", status=latest.status,
                          dates={"effective": latest.effective_date.isoformat()},
                          code=CodeMatch("http://loinc.org", "82810-3", "Pregnancy status", "[V]", True))
            if latest.answer in ("pregnant", "possible"):
                if age > th["pregnancy_status_stale_days"]:
                    self.needs_review(latest.ref, f"Pregnancy status '{latest.answer}' was recorded {age} days ago; "
                                                  "confirm whether the patient is pregnant now.")
                else:
                    if latest.answer == "possible":  # SNOMED 102874004 Possible pregnancy: act as if, flagged
                        ev = Evidence(ref=ev.ref, display="Pregnancy status: possible pregnancy", status=ev.status,
                                      dates=ev.dates, code=ev.code, unconfirmed=True)
                    self.fire(rule, (Site(self.kb.root_site),), ev)
            elif latest.answer == "unknown":
                self._ask_pregnancy(latest.ref)
        edd_obs = [o for o in by_kind.get("edd", ()) if o.value_date]
        if edd_obs:
            latest = max(edd_obs, key=_obs_key)
            to_go = _days(latest.value_date, today)
            if 0 <= to_go <= 300:
                ga = 280 - to_go
                ev = Evidence(ref=latest.ref, display=f"Estimated delivery date {latest.value_date.isoformat()}",
                              status=latest.status, dates={"effective": latest.effective_date.isoformat()},
                              code=CodeMatch("http://loinc.org", "11778-8", "Delivery date Estimated", "[V]", True),
                              note=f"gestational age about {max(ga, 0) // 7} weeks {max(ga, 0) % 7} days")
                self.fire(rule, (Site(self.kb.root_site),), ev)
                self.gestational_days.append((ga, ev))

    def _ask_pregnancy(self, ref: str) -> None:
        p = self.chart.patient
        age = p.age_on(self.today)
        if p.gender == "female" and age is not None and self.th["pregnancy_ask_age_min"] <= age <= self.th["pregnancy_ask_age_max"]:
            self.needs_review(ref, "Pregnancy status is recorded as unknown for a woman of child-bearing age: ask "
                                   "before treating (pregnancy changes positioning and techniques).")

    def trimester(self) -> None:
        if not self.gestational_days or not self.acc.fired("pregnancy"):
            return
        ga, ev = max(self.gestational_days, key=lambda x: (x[1].dates.get("effective", ""), x[0]))
        if ga < self.th["first_trimester_end_days"]:
            c = self.kb.rules["pregnancy-first-trimester"]
            self.acc.add(c, (Site(self.kb.root_site),), ev)

    # -- Allergies, procedures ---------------------------------------------------------------------------------

    def allergies(self) -> None:
        rules = [r for r in self.kb.rules.values() if r.kind == "allergy" and not r.parent]
        if not rules:
            return
        rx = self.kb.keyword_re["allergy"]
        for fact in self.chart.allergies:
            if fact.verification_status in _INVALID_VERIFICATION:
                continue
            if fact.clinical_status in ("inactive", "resolved"):
                continue
            hit = next(((s, c, d) for s, c, d in fact.codings if s == "snomed" and c in self.kb.allergy_codes), None)
            word = None
            if hit is None and rx is not None:
                m = rx.search(" ".join(fact.texts))
                word = m.group(0).lower() if m else None
            if hit is None and word is None:
                continue
            for rule in rules:
                cm = None
                if hit is not None:
                    cm = next((m for rid, m in self.kb.snomed.get(hit[1], ()) if rid == rule.id), None)
                ev = Evidence(ref=fact.ref, display=f"Allergy/intolerance: {fact.display}",
                              status=fact.clinical_status or "active",
                              dates={"recorded": fact.recorded.isoformat()} if fact.recorded else {},
                              code=cm, note=(f"matched the word '{word}'" if word else None),
                              unconfirmed=fact.verification_status in _UNCONFIRMED)
                self.fire(rule, (Site(self.kb.root_site),), ev)

    def procedures(self) -> None:
        rule = self.kb.rules.get("surgery-recent")
        if rule is None:
            return
        today, th = self.today, self.th
        window = th[rule.time.get("performedWithinDays", "post_surgery_days")]
        rx = self.kb.keyword_re["surgery"]
        surgical_codes = {c for c, hits in self.kb.snomed.items() for rid, _ in hits if rid == rule.id}
        early: list[Evidence] = []
        for fact in self.chart.procedures:
            if fact.status in ("entered-in-error", "not-done", "preparation"):
                continue
            when = fact.end or fact.start
            if fact.start is None or fact.start > today or when is None:
                continue
            ago = _days(today, when)
            if ago > window:
                continue
            surgical = any(s == "snomed" and c in surgical_codes for s, c, _ in fact.categories)
            word = None
            if not surgical and rx is not None:
                m = rx.search(" ".join([fact.text or ""] + [d for _, _, d in fact.codings if d]))
                if m:
                    surgical, word = True, m.group(0).lower()
            if not surgical:
                continue
            code = fact.codings[0] if fact.codings else None
            cm = CodeMatch(_SYSTEM_URI.get(code[0], code[0]), code[1], code[2] or fact.display, "[B]", False) if code else None
            sites = self.sites_for(rule, fact, None, None)
            note = f"{max(ago, 0)} days ago" + (f"; recognised as surgery by the word '{word}'" if word else "")
            ev = Evidence(ref=fact.ref, display=f"Surgery: {fact.display}", status=fact.status,
                          dates={"performed": (fact.start or when).isoformat()}, code=cm,
                          note=self._with_inferred(fact.ref, note, rule))
            self.fire(rule, sites, ev)
            if ago <= th["post_surgery_systemic_days"]:
                early.append(ev)
        for ev in early:
            c = self.kb.rules["surgery-recent-systemic"]
            self.acc.add(c, self.sites_for(c, None, None, ev), ev)

    # -- run ---------------------------------------------------------------------------------------------------

    def run(self) -> tuple[list[Finding], list[Finding], list[dict[str, str]]]:
        """(findings, information items, needs-review entries)."""
        self._sites_by_ref = {}
        self._inferred = {}
        self._kw_memo: dict[tuple[str, str], str | None] = {}
        self.conditions()
        self.medications()
        self.observations()
        self.trimester()
        self.allergies()
        self.procedures()
        built = self.acc.build()
        findings = [f for f in built if not f.informational]
        information = [f for f in built if f.informational]
        # Repeated copies of one problem (Synthea repeats conditions at every encounter) give the same reason:
        # one entry, the other resources listed under "alsoIn".
        by_reason: dict[str, list[str]] = {}
        for ref, reason in self.review:
            by_reason.setdefault(reason, []).append(ref)
        review = []
        for reason, refs in by_reason.items():
            refs = sorted(set(refs))
            entry = {"evidence": refs[0], "reason": reason}
            if len(refs) > 1:
                entry["alsoIn"] = refs[1:]
            review.append(entry)
        review.sort(key=lambda r: (r["evidence"], r["reason"]))
        return findings, information, review


def _z3a_weeks(system: str, code: str) -> int | None:
    """ICD-10-CM Z3A.nn 'Weeks of gestation': Z3A.08 = 8 weeks; Z3A.01 = less than 8 weeks; Z3A.00 unknown."""
    if system != "icd10cm":
        return None
    c = norm_icd(code)
    if not c.startswith("Z3A") or len(c) != 5 or not c[3:].isdigit():
        return None
    n = int(c[3:])
    if n == 0:
        return None
    return 7 if n == 1 else n


def _o_code_trimester(system: str, code: str) -> int | None:
    """ICD-10-CM O-codes carry the trimester in their last character (O88.211 first, O44.13 third) [V per the
    reference]; only 5-6 character codes, because 7-character ones end with the fetus number (O36.5131)."""
    if system != "icd10cm":
        return None
    c = norm_icd(code)
    if not c.startswith("O") or len(c) not in (5, 6) or c[-1] not in "123":
        return None
    return int(c[-1])


# "the fever threshold", "the threshold", optionally followed by a parenthesis of words ("(supratherapeutic)")
_THRESHOLD_WORDS = re.compile(r"\bthe (?:[a-z]+ )?threshold\b(?: \(([^()0-9]*)\))?")


def threshold_text(kb: KnowledgeBase, keys: str | Sequence[str]) -> str:
    """The value of a threshold (or "180/110 mmHg" for a systolic/diastolic pair) as a person reads it; a
    temperature keeps one decimal ("38.0 °C")."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    units = [str((kb.threshold_meta.get(k) or {}).get("unit") or "") for k in keys]
    # a temperature and an INR are read with one decimal (38.0 °C, INR 4.0)
    decimals = 1 if units and units[0] in ("Cel", "[degF]", "1") else None
    if len(keys) == 2 and units[0] == units[1]:
        return quantity_text(f"{kb.thresholds[keys[0]]:g}/{kb.thresholds[keys[1]]:g}", units[0])
    return " or ".join(quantity_text(kb.thresholds[k], u, decimals=decimals) for k, u in zip(keys, units))


def named_thresholds(rule: Rule, kb: KnowledgeBase) -> str:
    """The rule's message with the value after "the X threshold" ("the fever threshold (38.0 °C)"): a message that
    names a threshold without its value makes the reader look it up. The value is the knowledge base's current one
    (kb overrides included)."""
    spec = rule.observation or {}
    keys = spec.get("threshold")
    if not keys or not rule.message:
        return rule.message
    try:
        shown = threshold_text(kb, keys)
    except (KeyError, TypeError, ValueError):
        return rule.message

    def name(m: re.Match[str]) -> str:
        words = m.group(0).split(" (", 1)[0]
        return f"{words} ({shown}; {m.group(1)})" if m.group(1) else f"{words} ({shown})"

    return _THRESHOLD_WORDS.sub(name, rule.message, count=1)


def _obs_key(o: ObservationFact) -> tuple:
    # latest first by instant, then a deterministic tie-break (never the order of the resources)
    return (o.effective or o.effective_date, o.ref)


def _compare(spec: Mapping[str, Any], values: Mapping[str, float | None], th: Mapping[str, float]) -> bool:
    op = spec["op"]
    if op == "bp>=":
        ks, kd = spec["threshold"]
        s, d = values.get("systolic"), values.get("diastolic")
        return (s is not None and s >= th[ks]) or (d is not None and d >= th[kd])
    if op == "sys<":
        s = values.get("systolic")
        return s is not None and s < th[spec["threshold"]]
    v = values.get("value")
    if v is None:
        return False
    t = th[spec["threshold"]]
    return {"<": v < t, ">": v > t, ">=": v >= t, "<=": v <= t}[op]


def _verdict(findings: Sequence[Finding], techniques: tuple[str, ...], sites: tuple[Site, ...], kb: KnowledgeBase,
             needs_review: Sequence[Any]) -> tuple[str, tuple[str, ...]]:
    applicable = []
    verdict = "clear"
    for f in findings:
        if f.informational:
            continue  # never part of the verdict (screen() keeps them out of findings; this guards other callers)
        applies = f.applies_to(techniques, sites, kb=kb)
        if applies:
            applicable.append(f.rule)
        if f.cls in ("absolute", "local"):
            if applies:
                verdict = "contraindicated"
            elif verdict == "clear":
                verdict = "caution"
        elif applies and verdict == "clear":
            verdict = "caution"
    if verdict == "clear" and needs_review:
        verdict = "caution"
    return verdict, tuple(applicable)


def screen(chart: PatientChart, *, techniques: Iterable[str] | None = None, sites: Iterable[Site | str] | None = None,
           today: date, kb: KnowledgeBase | None = None) -> Screening:
    """Screen ``chart`` for the proposed ``techniques`` (keys of codes.TECHNIQUES) at ``sites`` as of ``today``.

    Raises ``InvalidInput`` only for an unknown technique key or a malformed/unknown site.
    """
    kb = kb or load_kb()
    if not isinstance(today, date):
        raise InvalidInput("screen() needs today as a datetime.date.")
    techs = normalize_techniques(techniques)
    proposed = normalize_sites(sites, kb)
    engine = _Engine(chart, kb, today)
    findings, information, review = engine.run()
    verdict, applicable = _verdict(findings, techs, proposed, kb, review)
    return Screening(
        verdict=verdict, findings=tuple(findings), needs_review=tuple(review),
        warnings=tuple(dict.fromkeys(engine.warnings)), techniques=techs, sites=proposed, today=today,
        patient=chart.patient.ref, kb_version=kb.version, applicable=applicable,
        information=tuple(information),
        information_applicable=tuple(f.rule for f in information if f.applies_to(techs, proposed, kb=kb)),
    )


def screen_bundle(bundle: Mapping[str, Any], *, techniques: Iterable[str] | None = None,
                  sites: Iterable[Site | str] | None = None, today: date, kb: KnowledgeBase | None = None) -> Screening:
    """Screen the one patient in a FHIR Bundle (searchset, collection, batch/transaction, batch-response)."""
    kb = kb or load_kb()
    return screen(from_bundle(bundle, kb=kb), techniques=techniques, sites=sites, today=today, kb=kb)
