"""Pure: what the physician's plan view adds on top of coordination.py - plans (the per-technique orders signed
together), findings that are new since signing, the open recorded findings, and a field-by-field comparison of
two versions of an order (for the version-conflict page).

No I/O, no clock reads (``today``/``now`` are passed in), EHR data read forgivingly (a missing element is a
blank, never an exception).

* A plan = the ServiceRequests of one ``requisition`` (order.py writes one ServiceRequest + Task per technique,
  all with the draft id as ``requisition``: R4 ServiceRequest.requisition, "composite request"). Orders without a
  requisition (written by another app) are a plan of their own. Its sessions, adherence, gaps, pain and
  not-done are counted in VISITS (coordination.PlanStats: a visit that gave two techniques counts once); each
  technique's own count is kept beside it ("myofascial release in 6 of 8 visits").
* New since signing: the chart is screened again for the plan's techniques and sites; a finding that applies
  and whose rule was not recorded with the plan, or that rests on chart entries the recorded finding did not
  name (a second DVT, a new platelet count), is new. Recorded = a DetectedIssue of the patient that implicates one
  of the plan's orders or that an order lists in ``supportingInfo``, with the rule id in its identifier
  (detected_issue.RULE_IDENTIFIER_SYSTEM).
* Open = a recorded finding that APPLIES to the plan's techniques and sites and has no ``mitigation`` (R4
  DetectedIssue.mitigation: "an action taken ... to reduce or eliminate the risk"), not cancelled or entered in error.
  At signing every finding in the chart is written as a DetectedIssue, also those about other techniques or sites
  (a left-leg DVT on a shoulder order), and only those the physician acted on carry a mitigation: so a finding
  that does not apply is "elsewhere in the chart", never an open issue of this plan (``split_issues``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, Iterable, Mapping, Sequence

from .builders.detected_issue import RULE_IDENTIFIER_SYSTEM, detected_issue
from .builders.order import business_status, instant, sessions_done
from .codes import ORDER_DETAIL_SYSTEM, SNOMED, TECHNIQUE_DISPLAY, TECHNIQUE_SYSTEM, TECHNIQUES, codings
from .coordination import PainPoint, PainTrend, PlanRow, pain_trend, parse_date, ref_key, requisition_key
from .errors import InvalidInput
from .knowledge import load_kb, parse_site
from .orders_model import Schedule, is_lateralizable
from .screening import Finding

__all__ = [
    "PlanGroup", "OpenIssue", "DiffRow", "group_plans", "order_sites", "order_techniques", "recorded_issues",
    "open_issues", "new_findings", "IssueSplit", "issue_applies", "split_issues", "StatusNote", "status_note",
    "order_precautions", "with_rescreen", "describe_order", "version_diff", "task_follow_schedule", "requisition_of",
]

_DEAD = frozenset({"cancelled", "entered-in-error"})


@dataclass(frozen=True)
class OpenIssue:
    ref: str
    severity: str | None
    text: str
    identified: date | None
    version: str | None = None  # meta.versionId, for an update with If-Match
    mitigation: str = ""  # what was done (the latest mitigation's action), for an addressed finding


@dataclass(frozen=True)
class PlanGroup:
    key: str  # requisition value, or the order ref when the order has none
    rows: tuple[PlanRow, ...]  # one per technique (order), coordination's rows
    techniques: tuple[str, ...]
    sites: tuple[str, ...]  # display texts
    site_codes: tuple[str, ...]  # "CODE" / "CODE:left" for the re-screen
    schedule_text: str
    status: str  # the orders' common status, or "mixed"
    authored: date | None
    sessions_done: int
    sessions_planned: int | None
    last_session: date | None
    pain: PainTrend  # one point per visit, by date
    open_issues: tuple[OpenIssue, ...]
    not_done: tuple[Any, ...]  # coordination.NotDone, one per visit not done, by date
    expected_sessions: float | None = None  # by today, from the plan's frequency (coordination.adherence)
    adherence: float | None = None  # visits done / expected by now
    sessions_per_week: float | None = None
    gaps: tuple[Any, ...] = ()  # coordination.Gap between visits
    technique_visits: tuple[tuple[str, int], ...] = ()  # (technique, visits it was given in)
    elsewhere_issues: tuple[OpenIssue, ...] = ()  # recorded with the order, not about its techniques/sites
    addressed_issues: tuple[OpenIssue, ...] = ()  # apply, and were overridden or acknowledged (a mitigation)
    status_note: "StatusNote | None" = None  # why the plan is in its current status, who said so and when
    precautions: tuple[str, ...] = ()  # pressure and positioning, as ordered

    @property
    def order_refs(self) -> tuple[str, ...]:
        return tuple(r.order_ref for r in self.rows)

    @property
    def active(self) -> bool:
        return any(r.status in ("active", "on-hold", "draft") for r in self.rows)


@dataclass(frozen=True)
class DiffRow:
    field: str
    wanted: str  # what the physician asked for (the action applied to the version they saw)
    current: str  # what the chart holds now
    seen: str  # the version they saw

    @property
    def they_changed(self) -> bool:
        return self.current != self.seen

    @property
    def differs(self) -> bool:
        return self.wanted != self.current


def requisition_of(sr: Mapping[str, Any]) -> str | None:
    """The plan key of an order (coordination.requisition_key; one definition for both modules)."""
    return requisition_key(sr)


def order_techniques(sr: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(c["code"] for c in codings(sr.get("code")) if c.get("system") == TECHNIQUE_SYSTEM
                 and c.get("code") in TECHNIQUES)


def _side_from_text(text: str) -> str | None:
    """Laterality as order.py writes it into bodySite.text (orders_model.Site.text): "Left knee", "Right hand",
    "Lower leg, both sides"."""
    t = text.strip().lower()
    if t.endswith(", both sides"):
        return "bilateral"
    if t.startswith("left "):
        return "left"
    if t.startswith("right "):
        return "right"
    return None


def order_sites(sr: Mapping[str, Any]) -> tuple[str, ...]:
    """The order's sites as screening site strings (``CODE`` or ``CODE:side``). A lateralizable site whose side
    cannot be read is given without a side, which screening takes as both sides (the cautious reading)."""
    out: list[str] = []
    for b in sr.get("bodySite") or []:
        if not isinstance(b, Mapping):
            continue
        code = next((c.get("code") for c in codings(b) if c.get("system") == SNOMED and c.get("code")), None)
        if not code:
            continue
        side = _side_from_text(str(b.get("text") or ""))
        key = f"{code}:{side}" if side and is_lateralizable(code) else str(code)
        if key not in out:
            out.append(key)
    return tuple(out)


def _issue_rules(issue: Mapping[str, Any]) -> set[str]:
    return {str(i.get("value")) for i in issue.get("identifier") or []
            if isinstance(i, Mapping) and i.get("system") == RULE_IDENTIFIER_SYSTEM and i.get("value")}


def _issue_refs(issue: Mapping[str, Any]) -> set[str]:
    refs = {ref_key(r) for r in issue.get("implicated") or []}
    for ev in issue.get("evidence") or []:
        if isinstance(ev, Mapping):
            refs |= {ref_key(d) for d in ev.get("detail") or []}
    return {r for r in refs if r}


def recorded_issues(orders: Sequence[Mapping[str, Any]], issues: Iterable[Mapping[str, Any]]
                    ) -> list[Mapping[str, Any]]:
    """The DetectedIssues recorded with these orders (implicating one of them, or in an order's supportingInfo)."""
    order_refs = {f"ServiceRequest/{o.get('id')}" for o in orders if o.get("id")}
    supporting = {ref_key(s) for o in orders for s in o.get("supportingInfo") or []}
    out = []
    for i in issues:
        if not isinstance(i, Mapping) or i.get("resourceType") != "DetectedIssue" or i.get("status") in _DEAD:
            continue
        own = f"DetectedIssue/{i.get('id')}"
        if own in supporting or _issue_refs(i) & order_refs:
            out.append(i)
    return out


def open_issues(recorded: Iterable[Mapping[str, Any]]) -> tuple[OpenIssue, ...]:
    """Every unmitigated recorded finding, most severe first, WITHOUT asking whether it applies to the plan: the
    page uses ``split_issues`` (signing records findings about other techniques and sites too)."""
    order = {"high": 0, "moderate": 1, "low": 2}
    out = []
    for i in recorded:
        if i.get("mitigation"):
            continue
        text = str(i.get("detail") or (i.get("code") or {}).get("text") or "Contraindication finding")
        version = (i.get("meta") or {}).get("versionId") if isinstance(i.get("meta"), Mapping) else None
        out.append(OpenIssue(f"DetectedIssue/{i.get('id')}", i.get("severity"), text,
                             parse_date(i.get("identifiedDateTime")), str(version) if version else None))
    out.sort(key=lambda x: (order.get(str(x.severity), 3), x.ref))
    return tuple(out)


def _as_issue(i: Mapping[str, Any]) -> OpenIssue:
    text = str(i.get("detail") or (i.get("code") or {}).get("text") or "Contraindication finding")
    version = (i.get("meta") or {}).get("versionId") if isinstance(i.get("meta"), Mapping) else None
    mits = [m for m in i.get("mitigation") or [] if isinstance(m, Mapping)]
    action = mits[-1].get("action") if mits else None
    what = ""
    if isinstance(action, Mapping):
        what = str(action.get("text") or next((c.get("display") or c.get("code") for c in codings(action)), "") or "")
    return OpenIssue(f"DetectedIssue/{i.get('id')}", i.get("severity"), text, parse_date(i.get("identifiedDateTime")),
                     str(version) if version else None, what)


# "Rule R ... (absolute; techniques: swedish, deep-tissue; sites: 61685007:left)." - builders/detected_issue.py
_RULE_LINE = re.compile(r"\(\w+; techniques: (?P<t>[^;]*); sites: (?P<s>[^)]*)\)")


def _recorded_scope(issue: Mapping[str, Any]) -> tuple[set[str], list[str]] | None:
    """The techniques and sites a DetectedIssue written by builders/detected_issue.py names in its ``detail``
    (None when it is not in that form, e.g. written by another app)."""
    m = _RULE_LINE.search(str(issue.get("detail") or ""))
    if not m:
        return None
    techs = {t.strip() for t in m["t"].split(",") if t.strip()}
    sites = [s.strip() for s in m["s"].split(",") if s.strip()]
    return (techs, sites) if techs and sites else None


def issue_applies(issue: Mapping[str, Any], *, techniques: Sequence[str], sites: Sequence[str],
                  screening: Any = None, kb: Any = None) -> bool:
    """Does a recorded DetectedIssue concern the plan's techniques at the plan's sites? The screening engine
    decides (screening.Finding.applies_to, which needs the finding's own sites, read from the chart):

    1. the re-screen of the plan (``screening``, screening.Screening for the plan's techniques and sites) found
       the issue's rule: it applies iff the rule is in ``screening.applicable``;
    2. else the techniques and sites the issue was recorded with (its detail, builders/detected_issue.py) are
       checked with the same Finding.applies_to; a technique the KB rule does not cover never applies;
    3. else (no rule id, an unknown rule, a detail in another form): it applies - an unknown finding is kept in
       front of the physician rather than hidden.
    """
    rules = _issue_rules(issue)
    if screening is not None and rules:
        found = {f.rule for f in getattr(screening, "findings", ()) or ()}
        if rules & found:
            return bool(rules & set(getattr(screening, "applicable", ()) or ()))
    kb = kb or load_kb()
    known = [kb.rules[r] for r in rules if r in kb.rules]
    if not known:
        return True
    plan_techs = set(techniques)
    if plan_techs and not any(plan_techs & set(r.techniques) for r in known):
        return False  # the KB rule is about other techniques (deep pressure, not lymphatic drainage)
    scope = _recorded_scope(issue)
    if scope is None:
        return True
    techs, site_texts = scope
    try:
        recorded_sites = tuple(parse_site(s, kb) for s in site_texts)
    except InvalidInput:  # a site this KB does not know cannot be ruled out
        return True
    probe = Finding(rule=known[0].id, cls=known[0].cls, techniques=tuple(techs), sites=recorded_sites, evidence=(),
                    message="", evidence_class="", source="", verified=True, details=())
    return probe.applies_to(tuple(techniques) or None, tuple(sites) or None, kb=kb)


@dataclass(frozen=True)
class IssueSplit:
    open: tuple[OpenIssue, ...]  # apply to the plan, no mitigation: the physician has something to decide
    elsewhere: tuple[OpenIssue, ...]  # recorded with the order but about other techniques or sites
    addressed: tuple[OpenIssue, ...]  # apply, with a mitigation (overridden or acknowledged)


def _ranked(items: Iterable[OpenIssue]) -> tuple[OpenIssue, ...]:
    order = {"high": 0, "moderate": 1, "low": 2}
    return tuple(sorted(items, key=lambda x: (order.get(str(x.severity), 3), x.ref)))


def split_issues(recorded: Iterable[Mapping[str, Any]], *, techniques: Sequence[str], sites: Sequence[str],
                 screening: Any = None, kb: Any = None) -> IssueSplit:
    """The recorded findings of a plan split for the page: open (apply, no mitigation), elsewhere in the chart
    (do not apply to this plan, whatever their mitigation) and addressed (apply, mitigated). Most severe first."""
    open_, elsewhere, addressed = [], [], []
    for i in recorded:
        if not isinstance(i, Mapping) or i.get("status") in _DEAD:
            continue
        item = _as_issue(i)
        if not issue_applies(i, techniques=techniques, sites=sites, screening=screening, kb=kb):
            elsewhere.append(item)
        elif i.get("mitigation"):
            addressed.append(item)
        else:
            open_.append(item)
    return IssueSplit(_ranked(open_), _ranked(elsewhere), _ranked(addressed))


# --- status and precautions ---------------------------------------------------------------------------------------

# builders/plan.py order_status_update writes the reason as a note "<label>: <reason>" (R4 ServiceRequest has no
# statusReason); a change by a covering physician adds "<action label>: done by a physician other than ...".
_STATUS_LABEL = {"on-hold": "On hold", "active": "Resumed", "revoked": "Revoked", "completed": "Completed"}


@dataclass(frozen=True)
class StatusNote:
    status: str
    reason: str  # "" when the change was made without a reason
    author_ref: str | None
    time: datetime | None


def status_note(sr: Mapping[str, Any]) -> StatusNote | None:
    """Why the order is in its current status: the latest note order_status_update wrote for that status (its
    reason, author and time). For a status with no such note, the last update (meta.lastUpdated) without a
    reason; None for an active order never put on hold or a draft."""
    status = str(sr.get("status") or "")
    label = _STATUS_LABEL.get(status)
    if label is None:
        return None
    for n in reversed([n for n in sr.get("note") or [] if isinstance(n, Mapping)]):
        text = str(n.get("text") or "")
        if text.startswith(label + ": "):
            return StatusNote(status, text[len(label) + 2:].strip(), ref_key(n.get("authorReference")),
                              _parse_instant(n.get("time")))
    if status == "active":
        return None
    meta = sr.get("meta") if isinstance(sr.get("meta"), Mapping) else {}
    return StatusNote(status, "", None, _parse_instant(meta.get("lastUpdated")))


def _parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def order_precautions(sr: Mapping[str, Any]) -> tuple[str, ...]:
    """Pressure and positioning as ordered (builders/order.py order_details: ServiceRequest.orderDetail coded in
    ORDER_DETAIL_SYSTEM, "pressure-*" and "positioning", the text holding the physician's words). An order from
    another app without those codes: its "Precautions: ..." note, as written."""
    out: list[str] = []
    for d in sr.get("orderDetail") or []:
        if not isinstance(d, Mapping):
            continue
        codes = {c.get("code") for c in codings(d) if c.get("system") == ORDER_DETAIL_SYSTEM}
        if any(str(c).startswith("pressure-") or c == "positioning" for c in codes):
            text = str(d.get("text") or next((c.get("display") for c in codings(d) if c.get("display")), ""))
            if text and text not in out:
                out.append(text)
    if not out:
        for n in sr.get("note") or []:
            text = str(n.get("text") or "") if isinstance(n, Mapping) else ""
            if text.startswith("Precautions: "):
                out.append(text[len("Precautions: "):].rstrip("."))
    return tuple(out)


def new_findings(screening: Any, recorded: Iterable[Mapping[str, Any]], *, patient_ref: str,
                 order_refs: Sequence[str], now: datetime) -> list[dict[str, Any]]:
    """Findings of ``screening`` (screening.Screening for the plan's techniques and sites) that apply to the plan
    and were not recorded with it, as unsaved DetectedIssue dicts (status preliminary, implicating the plan's
    orders) - the shape coordination.attention reads. Most severe first."""
    recorded = list(recorded)
    known_rules: dict[str, set[str]] = {}
    for i in recorded:
        for rule in _issue_rules(i):
            known_rules.setdefault(rule, set()).update(_issue_refs(i))
    applicable = set(getattr(screening, "applicable", ()) or ())
    out = []
    for f in getattr(screening, "findings", ()) or ():
        if f.rule not in applicable or getattr(f, "informational", False):
            continue
        evidence = {r for r in (ref_key(e) for e in f.evidence) if r}
        seen = known_rules.get(f.rule)
        if seen is not None and evidence <= seen:
            continue
        issue = detected_issue(f, patient_ref=patient_ref, now=now, status="preliminary")
        issue["implicated"] = [{"reference": r} for r in order_refs] + list(issue.get("implicated") or [])
        issue["_new_evidence"] = sorted(evidence - (seen or set()))  # for the page: what is new (not written)
        issue["_rule"] = f.rule
        out.append(issue)
    rank = {"high": 0, "moderate": 1, "low": 2}
    out.sort(key=lambda i: (rank.get(i.get("severity"), 3), i["_rule"]))
    return out


def group_plans(service_requests: Iterable[Mapping[str, Any]], rows: Sequence[PlanRow],
                issues: Iterable[Mapping[str, Any]] = ()) -> list[PlanGroup]:
    """Plans (orders of one requisition) from coordination's rows, newest first."""
    by_ref = {f"ServiceRequest/{sr.get('id')}": sr for sr in service_requests
              if isinstance(sr, Mapping) and sr.get("resourceType") == "ServiceRequest" and sr.get("id")}
    issues = [i for i in issues if isinstance(i, Mapping)]
    groups: dict[str, list[PlanRow]] = {}
    for row in rows:
        sr = by_ref.get(row.order_ref, {})
        groups.setdefault(row.plan_key or requisition_of(sr) or row.order_ref, []).append(row)
    out = []
    for key, grows in groups.items():
        grows.sort(key=lambda r: (r.techniques, r.order_ref))
        srs = [by_ref[r.order_ref] for r in grows if r.order_ref in by_ref]
        techniques = tuple(dict.fromkeys(t for r in grows for t in r.techniques))
        sites = tuple(dict.fromkeys(s for r in grows for s in r.sites))
        site_codes = tuple(dict.fromkeys(s for sr in srs for s in order_sites(sr)))
        statuses = {r.status for r in grows}
        planned = [r.sessions_planned for r in grows]
        points = sorted((p for r in grows for p in r.pain.points), key=lambda p: (p.date, p.procedure_ref))
        lasts = [r.last_session for r in grows if r.last_session]
        authored = min((d for d in (parse_date(sr.get("authoredOn")) for sr in srs) if d), default=None)
        not_done = sorted((n for r in grows for n in r.not_done), key=lambda n: (n.date or date.min, n.procedure_ref))
        stats = next((r.plan for r in grows if r.plan is not None and r.plan.key == key), None)
        common = dict(key=key, rows=tuple(grows), techniques=techniques, sites=sites, site_codes=site_codes,
                      schedule_text=next((r.schedule_text for r in grows if r.schedule_text), ""),
                      status=statuses.pop() if len(statuses) == 1 else "mixed", authored=authored,
                      **_issue_fields(split_issues(recorded_issues(srs, issues), techniques=techniques,
                                                   sites=site_codes)),
                      status_note=next((n for n in (status_note(sr) for sr in srs) if n), None),
                      precautions=tuple(dict.fromkeys(p for sr in srs for p in order_precautions(sr))))
        if stats is not None:  # counted in visits by coordination (one visit = one session of the plan)
            out.append(PlanGroup(
                **common, sessions_done=stats.sessions_done, sessions_planned=stats.sessions_planned,
                last_session=stats.last_session, pain=stats.pain, not_done=stats.not_done,
                expected_sessions=stats.expected_sessions, adherence=stats.adherence,
                sessions_per_week=stats.sessions_per_week, gaps=stats.gaps, technique_visits=stats.technique_visits))
            continue
        # rows made without plan numbers (not from coordination.plan_rows): the best estimate from the rows
        out.append(PlanGroup(
            **common, sessions_done=max(r.sessions_done for r in grows),
            sessions_planned=max(p for p in planned if p) if any(planned) else None,
            last_session=max(lasts) if lasts else None, pain=_merged_trend(points), not_done=tuple(not_done),
            technique_visits=tuple((t, sum(r.sessions_done for r in grows if t in r.techniques))
                                   for t in techniques)))
    out.sort(key=lambda g: (g.active, g.authored or date.min, g.key), reverse=True)
    return out


def _issue_fields(split: IssueSplit) -> dict[str, tuple[OpenIssue, ...]]:
    return {"open_issues": split.open, "elsewhere_issues": split.elsewhere, "addressed_issues": split.addressed}


def with_rescreen(group: PlanGroup, recorded: Iterable[Mapping[str, Any]], screening: Any) -> PlanGroup:
    """The plan with its recorded findings split again by the re-screen (the chart's own finding sites)."""
    return replace(group, **_issue_fields(split_issues(recorded, techniques=group.techniques,
                                                       sites=group.site_codes, screening=screening)))


def _merged_trend(points: Sequence[PainPoint]) -> PainTrend:
    """One pain series per plan: two techniques given in one visit are two Procedures with the same scores; keep
    one point per (date, before, after) so a visit is not counted twice."""
    seen: set[tuple[date, int | None, int | None]] = set()
    kept = []
    for p in points:
        k = (p.date, p.before, p.after)
        if k in seen:
            continue
        seen.add(k)
        kept.append(p)
    return pain_trend(kept)


# --- versions -------------------------------------------------------------------------------------------------


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if isinstance(concept.get("text"), str):
        return concept["text"]
    return next((str(c.get("display") or c.get("code")) for c in codings(concept)), "")


def describe_order(sr: Mapping[str, Any] | None) -> dict[str, str]:
    """The fields a physician changes, in words (the conflict page compares these)."""
    if not sr:
        return {}
    repeat = ((sr.get("occurrenceTiming") or {}).get("repeat") or {}) if isinstance(sr.get("occurrenceTiming"),
                                                                                    Mapping) else {}
    schedule = _concept_text((sr.get("occurrenceTiming") or {}).get("code")) if isinstance(
        sr.get("occurrenceTiming"), Mapping) else ""
    if repeat and not schedule:
        schedule = f"{repeat.get('frequency', '?')} per {repeat.get('period', 1)} {repeat.get('periodUnit', '')}"
    qty = sr.get("quantityQuantity") if isinstance(sr.get("quantityQuantity"), Mapping) else {}
    techniques = [TECHNIQUE_DISPLAY.get(t, t) for t in order_techniques(sr)]
    notes = [str(n.get("text")) for n in sr.get("note") or [] if isinstance(n, Mapping) and n.get("text")]
    return {
        "Status": str(sr.get("status") or ""),
        "Technique": ", ".join(techniques) or _concept_text(sr.get("code")),
        "Body sites": "; ".join(t for t in (_concept_text(b) for b in sr.get("bodySite") or []) if t),
        "Schedule": schedule,
        "Sessions authorized": str(qty.get("value") if qty.get("value") is not None else repeat.get("count", "")),
        "Notes": " | ".join(notes),
    }


def version_diff(seen: Mapping[str, Any] | None, wanted: Mapping[str, Any] | None,
                 current: Mapping[str, Any] | None) -> list[DiffRow]:
    """Field by field: the version the physician saw, what they wanted (their change applied to it), and what the
    chart holds now. Every field is listed; ``they_changed`` marks what someone else changed meanwhile."""
    s, w, c = describe_order(seen), describe_order(wanted), describe_order(current)
    fields = list(dict.fromkeys([*w, *c, *s]))
    return [DiffRow(f, w.get(f, ""), c.get(f, ""), s.get(f, "")) for f in fields]


def task_follow_schedule(task: Mapping[str, Any], schedule: Schedule, technique: str | None, *,
                         now: datetime) -> dict[str, Any] | None:
    """The fulfilment Task after its order's schedule changed: sessions authorized (``restriction.repetitions``),
    the count in words and the description follow. None when nothing changes or the Task is finished."""
    if task.get("status") in ("completed", "cancelled", "entered-in-error", "failed", "rejected"):
        return None
    total = schedule.total_sessions
    done = sessions_done(task)
    out = copy.deepcopy(dict(task))
    out["restriction"] = {**(out.get("restriction") or {}), "repetitions": total}
    out["businessStatus"] = business_status(done, total)
    if technique in TECHNIQUE_DISPLAY:
        out["description"] = f"Provide {TECHNIQUE_DISPLAY[technique].lower()}: {schedule.text}"
    out.pop("text", None)
    if {k: v for k, v in out.items() if k != "lastModified"} == {k: v for k, v in task.items()
                                                                  if k not in ("lastModified", "text")}:
        return None
    out["lastModified"] = instant(now)
    return out
