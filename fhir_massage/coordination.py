"""Pure: orders, tasks, sessions, pain scores, messages and findings (plain FHIR dicts) -> the physician's plan view.

Nothing here reads a clock: ``today`` is passed in. EHR data is read forgivingly (cumulus-etl style): a missing or
odd element becomes a warning on the row, never an exception.

What a row says, and where it comes from (reference/fhir-modelling.md "The plan", "Outcomes"):

* sessions done = completed Procedures ``basedOn`` the order (the reference: count
  ``Procedure?based-on=ServiceRequest/x&status=completed``), planned = ``quantityQuantity`` or
  ``occurrenceTiming.repeat.count``;
* plan window: start = ``occurrenceTiming.repeat.boundsPeriod.start`` (or ``occurrencePeriod.start``), else the
  order's ``authoredOn`` date; end = ``boundsPeriod.end`` / ``occurrencePeriod.end``, else start + boundsDuration.
  Starting at authoredOn (not at the first session) keeps adherence honest about a slow start and makes it a
  monotone function of the data (more sessions never lower it, time without sessions never raises it);
* adherence = sessions done / sessions expected by now (ordered frequency x elapsed plan weeks), shown once at
  least one session is expected; a gap is flagged when it is longer than twice the expected interval between
  sessions (7 days / frequency);
* plans: the orders of one ``requisition`` are one plan (order.py writes one ServiceRequest + Task per technique)
  and a visit is documented once for the plan (builders.session: one Procedure per technique used, sharing the
  ``session-visit`` identifier, the pain scores ``partOf`` all of them). ``PlanRow.plan`` (PlanStats, the same
  object on every row of the plan) counts VISITS: sessions done, adherence, gaps, the pain trend and not-done are
  per plan, so a technique given in fewer visits does not read as a missed session; the row's own counts stay
  per technique ("myofascial release in 6 of 8 visits"). A Procedure without the visit identifier (another app)
  is its own visit, unless another Procedure of the plan started at the same instant;
* pain trend: per session (date, before, after) from LOINC 72514-3 Observations ``partOf`` the Procedure; the
  change is last pre-session score minus first pre-session score (between-session change: the drop right after a
  massage is expected and short-lived). A drop of about 2 points or 30% on the 0-10 NRS is clinically important
  (Farrar JT et al. Pain 2001;94(2):149-58, PMID 11690728 [V: abstract], derived in chronic-pain drug trials;
  higher baselines need larger raw drops, hence the 30% alternative).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Sequence

from .builders.order import REQUISITION_ID_SYSTEM
from .builders.session import VISIT_ID_SYSTEM
from .codes import LOINC, TASK_IO_SYSTEM, TECHNIQUE_SYSTEM, TECHNIQUES, codings, has_code

PAIN_LOINC = "72514-3"
MCID_POINTS = 2  # Farrar 2001 [V], see the module doc
MCID_FRACTION = 0.30
ENDING_SOON_DAYS = 7
GAP_FACTOR = 2  # a gap longer than 2x the expected interval is flagged (our rule [B])
_IGNORED_STATUS = frozenset({"entered-in-error", "cancelled"})
_REF_RE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


# --- values ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PainPoint:
    date: date
    before: int | None
    after: int | None
    procedure_ref: str


@dataclass(frozen=True)
class PainTrend:
    points: tuple[PainPoint, ...]
    change: int | None  # last pre-session score - first pre-session score (negative = better)
    clinically_important: bool  # a drop of >= 2 points or >= 30% (Farrar 2001)
    worse: bool  # a rise of >= 2 points
    note: str


@dataclass(frozen=True)
class Gap:
    start: date
    end: date
    days: int
    open: bool  # still going on today


@dataclass(frozen=True)
class NotDone:
    date: date | None
    reason: str
    procedure_ref: str


@dataclass(frozen=True)
class Finding:
    ref: str
    severity: str | None
    status: str | None
    text: str


@dataclass(frozen=True)
class PlanStats:
    """One plan (the orders of one requisition), counted in visits. Field names mean what they mean on PlanRow."""

    key: str
    sessions_done: int  # visits with at least one completed technique
    sessions_planned: int | None  # the order's total sessions (the same for each technique's order)
    expected_sessions: float | None
    adherence: float | None
    sessions_per_week: float | None
    gaps: tuple[Gap, ...]
    last_session: date | None
    pain: PainTrend  # one point per visit
    not_done: tuple[NotDone, ...]  # one per visit not done
    technique_visits: tuple[tuple[str, int], ...]  # (technique, visits it was given in), the plan's techniques


@dataclass(frozen=True)
class PlanRow:
    order_ref: str
    status: str
    techniques: tuple[str, ...]
    title: str
    sites: tuple[str, ...]
    schedule_text: str
    frequency: float | None  # sessions per week
    sessions_done: int
    sessions_planned: int | None
    plan_start: date | None
    plan_end: date | None
    ending_soon: bool
    period_over: bool  # still active after the plan window ended
    expected_sessions: float | None
    adherence: float | None  # done / expected by now; None until one session is expected
    sessions_per_week: float | None
    gaps: tuple[Gap, ...]
    last_session: date | None
    pain: PainTrend
    not_done: tuple[NotDone, ...]
    findings: tuple[Finding, ...]
    task_ref: str | None
    task_status: str | None
    warnings: tuple[str, ...] = ()
    plan_key: str = ""  # requisition_key of the order, or its own reference
    plan: PlanStats | None = None  # the plan's numbers, counted in visits (shared by its rows)


@dataclass(frozen=True)
class Message:
    ref: str
    sender: str | None
    sent: datetime | None
    text: str
    category: str | None
    in_response_to: str | None


@dataclass(frozen=True)
class Thread:
    root_ref: str
    order_ref: str | None
    messages: tuple[Message, ...]  # oldest first
    unread: bool  # the last message is not from the physician: no reply yet
    categories: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Attention:
    order_ref: str | None  # None: about the patient, not one order (a finding that names no order)
    score: int
    reasons: tuple[str, ...]


# --- reading helpers (forgiving) ---------------------------------------------------------------------------------


def ref_key(reference: Any) -> str | None:
    """``Type/id`` of a reference string or Reference dict; absolute and versioned forms are reduced to it."""
    if isinstance(reference, Mapping):
        reference = reference.get("reference")
    if not isinstance(reference, str):
        return None
    m = _REF_RE.search(reference)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def requisition_key(sr: Mapping[str, Any]) -> str | None:
    """The plan an order belongs to: its ``requisition`` (R4 ServiceRequest.requisition, "composite request").
    Another app's requisition keeps its system in the key so two systems never merge."""
    req = sr.get("requisition")
    if isinstance(req, Mapping) and isinstance(req.get("value"), str) and req.get("value"):
        return req["value"] if req.get("system") == REQUISITION_ID_SYSTEM else f"{req.get('system')}|{req['value']}"
    return None


def visit_key(proc: Mapping[str, Any]) -> str:
    """Which visit a Procedure belongs to: our ``session-visit`` identifier, else its start instant (another app's
    Procedures of one visit), else the Procedure itself."""
    for i in proc.get("identifier") or []:
        if isinstance(i, Mapping) and i.get("system") == VISIT_ID_SYSTEM and isinstance(i.get("value"), str):
            return "visit:" + i["value"]
    period = proc.get("performedPeriod")
    if isinstance(period, Mapping) and isinstance(period.get("start"), str):
        return "start:" + period["start"]
    return "ref:" + (_own_ref(proc) or str(id(proc)))


def _own_ref(resource: Mapping[str, Any]) -> str | None:
    rid = resource.get("id")
    rtype = resource.get("resourceType")
    return f"{rtype}/{rid}" if isinstance(rid, str) and isinstance(rtype, str) else None


def parse_date(value: Any) -> date | None:
    """The calendar date of a FHIR date/dateTime (as recorded, in its own zone); None for partial dates."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _weeks(quantity: Any) -> float | None:
    """A UCUM duration as weeks (Timing.repeat.boundsDuration)."""
    if not isinstance(quantity, Mapping):
        return None
    value = _number(quantity.get("value"))
    unit = quantity.get("code") or quantity.get("unit")
    factor = {"wk": 1.0, "d": 1 / 7, "mo": 30.4375 / 7, "a": 365.25 / 7}.get(str(unit))
    return value * factor if value is not None and factor else None


def _per_week(repeat: Mapping[str, Any]) -> float | None:
    freq = _number(repeat.get("frequency")) or 1.0
    period = _number(repeat.get("period"))
    unit = repeat.get("periodUnit")
    days = {"d": 1.0, "wk": 7.0, "mo": 30.4375, "a": 365.25, "h": 1 / 24}.get(str(unit))
    if not period or not days:
        return None
    return freq * 7.0 / (period * days)


def _text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if isinstance(concept.get("text"), str):
        return concept["text"]
    for c in codings(concept):
        if c.get("display"):
            return str(c["display"])
    return ""


# --- plan rows ---------------------------------------------------------------------------------------------------


def _session_date(proc: Mapping[str, Any]) -> date | None:
    period = proc.get("performedPeriod")
    if isinstance(period, Mapping):
        return parse_date(period.get("start")) or parse_date(period.get("end"))
    return parse_date(proc.get("performedDateTime"))


def _pain_value(obs: Mapping[str, Any]) -> int | None:
    if "valueInteger" in obs:
        v = obs["valueInteger"]
    else:
        v = (obs.get("valueQuantity") or {}).get("value") if isinstance(obs.get("valueQuantity"), Mapping) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10 or int(v) != v:
        return None
    return int(v)


def _pain_by_procedure(observations: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for obs in observations:
        if not isinstance(obs, Mapping) or obs.get("resourceType") != "Observation":
            continue
        if obs.get("status") in _IGNORED_STATUS or not has_code(obs.get("code"), LOINC, [PAIN_LOINC]):
            continue
        for part in obs.get("partOf") or []:
            key = ref_key(part)
            if key and key.startswith("Procedure/"):
                out.setdefault(key, []).append(obs)
    return out


def _before_after(proc: Mapping[str, Any], obs: list[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """Which score is 'before' and which 'after': what the Observation says (note or code text, as our builder
    writes), else its time against the session period, else the earlier one is 'before'."""
    period = proc.get("performedPeriod") if isinstance(proc.get("performedPeriod"), Mapping) else {}
    start, end = _utc(parse_datetime(period.get("start"))), _utc(parse_datetime(period.get("end")))
    before = after = None
    undecided: list[tuple[str, int]] = []
    for o in obs:
        value = _pain_value(o)
        if value is None:
            continue
        words = " ".join(str(n.get("text", "")) for n in o.get("note") or [] if isinstance(n, Mapping))
        words = (words + " " + _text(o.get("code"))).lower()
        when = _utc(parse_datetime(o.get("effectiveDateTime")))
        if "before" in words and "after" not in words:
            before = value
        elif "after" in words and "before" not in words:
            after = value
        elif when is not None and end is not None and when >= end:
            after = value
        elif when is not None and start is not None and when <= start:
            before = value
        else:
            undecided.append((str(o.get("effectiveDateTime") or ""), value))
    for _, value in sorted(undecided):
        if before is None:
            before = value
        elif after is None:
            after = value
    return before, after


def _utc(dt: datetime | None) -> datetime | None:
    """Aware datetimes compared in UTC; a naive one (odd data) is taken as UTC rather than crashing a comparison."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc) if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def pain_trend(points: Sequence[PainPoint]) -> PainTrend:
    with_before = [p for p in points if p.before is not None]
    if len(with_before) < 2:
        return PainTrend(tuple(points), None, False, False,
                         "Not enough pre-session pain scores for a trend yet." if points else "No pain scores yet.")
    first, last = with_before[0].before, with_before[-1].before
    assert first is not None and last is not None
    change = last - first
    drop = -change
    important = drop >= MCID_POINTS or (first > 0 and drop / first >= MCID_FRACTION and drop > 0)
    worse = change >= MCID_POINTS
    if important:
        note = (f"Pain before sessions went from {first} to {last}: a clinically important drop "
                f"(about 2 points or 30% on the 0-10 scale; Farrar 2001).")
    elif worse:
        note = f"Pain before sessions went from {first} to {last}: worse by {change} points."
    else:
        note = f"Pain before sessions went from {first} to {last}: no clinically important change yet."
    return PainTrend(tuple(points), change, important, worse, note)


def _gaps(dates: Sequence[date], start: date | None, until: date, frequency: float | None,
          ongoing: bool) -> tuple[Gap, ...]:
    if not frequency or frequency <= 0 or start is None:
        return ()
    limit = GAP_FACTOR * 7.0 / frequency
    marks = [start] + sorted(d for d in dates if d >= start)
    out = []
    for a, b in zip(marks, marks[1:]):
        if (b - a).days > limit:
            out.append(Gap(a, b, (b - a).days, False))
    if ongoing and until >= marks[-1] and (until - marks[-1]).days > limit:
        out.append(Gap(marks[-1], until, (until - marks[-1]).days, True))
    return tuple(out)


def adherence(done: int, frequency: float | None, start: date | None, end: date | None,
              today: date) -> tuple[float | None, float | None, float | None]:
    """(expected sessions by ``today``, adherence = done / expected, sessions per week) over the elapsed plan
    weeks (the window stops at the plan end). Adherence is None until at least one session is expected."""
    if start is None or not frequency:
        return None, None, None
    until = min(today, end) if end else today
    weeks = max(0.0, (until - start).days / 7.0)
    expected = frequency * weeks
    per_week = done / max(weeks, 1.0)
    if expected < 1.0:
        return expected, None, per_week
    return expected, done / expected, per_week


def plan_rows(service_requests: Iterable[Mapping[str, Any]], tasks: Iterable[Mapping[str, Any]] = (),
              procedures: Iterable[Mapping[str, Any]] = (), observations: Iterable[Mapping[str, Any]] = (),
              detected_issues: Iterable[Mapping[str, Any]] = (), *, today: date,
              ending_soon_days: int = ENDING_SOON_DAYS) -> list[PlanRow]:
    """One row per massage order (ServiceRequest), newest first."""
    procs_by_order: dict[str, list[Mapping[str, Any]]] = {}
    seen_procs: set[str] = set()
    for p in procedures:
        if not isinstance(p, Mapping) or p.get("resourceType") != "Procedure":
            continue
        own = _own_ref(p) or f"Procedure/#{len(seen_procs)}"
        if own in seen_procs:
            continue
        seen_procs.add(own)
        for b in p.get("basedOn") or []:
            key = ref_key(b)
            if key and key.startswith("ServiceRequest/"):
                procs_by_order.setdefault(key, []).append(p)
    tasks_by_order: dict[str, Mapping[str, Any]] = {}
    for t in tasks:
        if not isinstance(t, Mapping) or t.get("resourceType") != "Task" or t.get("status") in _IGNORED_STATUS:
            continue
        if "fulfill" not in {c.get("code") for c in codings(t.get("code"))}:
            continue
        key = ref_key(t.get("focus")) or next((ref_key(b) for b in t.get("basedOn") or []), None)
        if key:
            tasks_by_order.setdefault(key, t)
    issues = {r: i for i in detected_issues if isinstance(i, Mapping) and (r := _own_ref(i))}
    issues_by_order: dict[str, list[str]] = {}
    for r, i in issues.items():
        for imp in i.get("implicated") or []:
            key = ref_key(imp)
            if key and key.startswith("ServiceRequest/"):
                issues_by_order.setdefault(key, []).append(r)
    pain = _pain_by_procedure(observations)

    rows = []
    for sr in service_requests:
        if not isinstance(sr, Mapping) or sr.get("resourceType") != "ServiceRequest":
            continue
        if sr.get("status") == "entered-in-error":
            continue
        order_ref = _own_ref(sr)
        if not order_ref:
            continue
        row = _row(sr, order_ref, procs_by_order.get(order_ref, []), tasks_by_order.get(order_ref),
                   pain, issues, issues_by_order.get(order_ref, []), today, ending_soon_days)
        rows.append(replace(row, plan_key=requisition_key(sr) or order_ref))
    by_plan: dict[str, list[PlanRow]] = {}
    for r in rows:
        by_plan.setdefault(r.plan_key, []).append(r)
    stats = {k: _plan_stats(k, rs, procs_by_order, pain, today) for k, rs in by_plan.items()}
    rows = [replace(r, plan=stats[r.plan_key]) for r in rows]
    rows.sort(key=lambda r: (r.plan_start or date.min, r.order_ref), reverse=True)
    return rows


def _plan_stats(key: str, rows: Sequence[PlanRow], procs_by_order: Mapping[str, list[Mapping[str, Any]]],
                pain: Mapping[str, list[Mapping[str, Any]]], today: date) -> PlanStats:
    """A plan's numbers counted in visits (see the module doc). The rows share the plan's schedule: the first
    row that has a frequency / window gives it."""
    completed: dict[str, list[Mapping[str, Any]]] = {}
    not_done: dict[str, NotDone] = {}
    per_technique: dict[str, set[str]] = {}
    for r in rows:
        for p in procs_by_order.get(r.order_ref, []):
            k = visit_key(p)
            if p.get("status") == "completed":
                completed.setdefault(k, []).append(p)
                for t in r.techniques:
                    per_technique.setdefault(t, set()).add(k)
            elif p.get("status") == "not-done" and k not in not_done:
                not_done[k] = NotDone(_session_date(p), _text(p.get("statusReason")) or "no reason given",
                                      _own_ref(p) or "Procedure/?")
    for k in list(not_done):
        if k in completed:  # a technique not done in a visit that gave another one: the visit happened
            del not_done[k]
    visits = sorted(((min((_session_date(p) or date.min for p in ps)), k, ps) for k, ps in completed.items()),
                    key=lambda v: (v[0], v[1]))
    dated = [d for d, _, _ in visits if d != date.min and d <= today]
    first = next((r for r in rows if r.frequency), rows[0])
    frequency, start, end = first.frequency, first.plan_start, first.plan_end
    planned_all = [r.sessions_planned for r in rows if r.sessions_planned]
    planned = max(planned_all) if planned_all else None
    expected, adh, per_week = adherence(len(dated), frequency, start, end, today)
    finished = planned is not None and len(visits) >= planned
    active = any(r.status == "active" for r in rows)
    gaps = _gaps(dated, start, min(today, end) if end else today, frequency, ongoing=active and not finished)
    points = []
    for d, _, ps in visits:
        seen: set[str] = set()
        obs = []
        for p in ps:  # the visit's pain scores are partOf each of its Procedures: keep each Observation once
            for o in pain.get(_own_ref(p) or "", []):
                ident = _own_ref(o) or str(id(o))
                if ident not in seen:
                    seen.add(ident)
                    obs.append(o)
        if obs:
            before, after = _before_after(ps[0], obs)
            if before is not None or after is not None:
                points.append(PainPoint(d, before, after, _own_ref(ps[0]) or "Procedure/?"))
    techniques = tuple(dict.fromkeys(t for r in rows for t in r.techniques))
    return PlanStats(
        key=key, sessions_done=len(visits), sessions_planned=planned, expected_sessions=expected, adherence=adh,
        sessions_per_week=per_week, gaps=gaps, last_session=max(dated) if dated else None, pain=pain_trend(points),
        not_done=tuple(sorted(not_done.values(), key=lambda n: (n.date or date.min, n.procedure_ref))),
        technique_visits=tuple((t, len(per_technique.get(t, ()))) for t in techniques))


def _row(sr: Mapping[str, Any], order_ref: str, procs: list[Mapping[str, Any]], task: Mapping[str, Any] | None,
         pain: Mapping[str, list[Mapping[str, Any]]], issues: Mapping[str, Mapping[str, Any]],
         implicating: list[str], today: date, ending_soon_days: int) -> PlanRow:
    warnings: list[str] = []
    status = str(sr.get("status") or "unknown")
    techniques = tuple(c["code"] for c in codings(sr.get("code"))
                       if c.get("system") == TECHNIQUE_SYSTEM and c.get("code") in TECHNIQUES)
    title = _text(sr.get("code")) or "Massage order"
    sites = tuple(t for t in (_text(b) for b in sr.get("bodySite") or []) if t)

    timing = sr.get("occurrenceTiming") if isinstance(sr.get("occurrenceTiming"), Mapping) else {}
    repeat = timing.get("repeat") if isinstance(timing.get("repeat"), Mapping) else {}
    frequency = _per_week(repeat) if repeat else None
    schedule_text = _text(timing.get("code"))
    if not schedule_text:
        for d in sr.get("orderDetail") or []:
            if any(c.get("code") == "schedule" for c in codings(d)):
                schedule_text = _text(d)
    bounds = repeat.get("boundsPeriod") if isinstance(repeat.get("boundsPeriod"), Mapping) else None
    period = sr.get("occurrencePeriod") if isinstance(sr.get("occurrencePeriod"), Mapping) else None
    window = bounds or period or {}
    start = parse_date(window.get("start")) or parse_date(sr.get("authoredOn"))
    end = parse_date(window.get("end"))
    if end is None and start is not None:
        weeks = _weeks(repeat.get("boundsDuration"))
        if weeks:
            end = start + timedelta(days=round(weeks * 7))
    if start is None:
        warnings.append("The order has no start date (no authoredOn or occurrence period); adherence not computed.")
    if frequency is None:
        warnings.append("The order has no machine-readable frequency; adherence not computed.")

    planned_q = sr.get("quantityQuantity") if isinstance(sr.get("quantityQuantity"), Mapping) else {}
    planned_n = _number(planned_q.get("value")) or _number(repeat.get("count"))
    planned = int(planned_n) if planned_n else None

    completed: list[tuple[date, Mapping[str, Any]]] = []
    not_done: list[NotDone] = []
    for p in procs:
        pref = _own_ref(p) or "Procedure/?"
        d = _session_date(p)
        if p.get("status") == "completed":
            if d is None:
                warnings.append(f"{pref} is completed but has no date; it is counted but not placed in time.")
            completed.append((d or date.min, p))
        elif p.get("status") == "not-done":
            not_done.append(NotDone(d, _text(p.get("statusReason")) or "no reason given", pref))
    completed.sort(key=lambda x: (x[0], str(x[1].get("id"))))
    done = len(completed)
    dated = [d for d, _ in completed if d != date.min and d <= today]

    if task is not None:
        counted = sum(1 for o in task.get("output") or [] if isinstance(o, Mapping) and has_code(
            o.get("type"), TASK_IO_SYSTEM, ["session"]))
        if counted != done and (task.get("output") or []):
            warnings.append(f"The task lists {counted} sessions but {done} completed sessions are on record.")

    active = status == "active"
    expected, adh, per_week = adherence(len(dated), frequency, start, end, today)
    finished = planned is not None and done >= planned
    gaps = _gaps(dated, start, min(today, end) if end else today, frequency, ongoing=active and not finished)
    ending_soon = bool(active and end and 0 <= (end - today).days <= ending_soon_days)
    period_over = bool(active and end and end < today)

    points = []
    for d, p in completed:
        pref = _own_ref(p)
        if pref and pref in pain:
            before, after = _before_after(p, pain[pref])
            if before is not None or after is not None:
                points.append(PainPoint(d, before, after, pref))

    finding_refs = [k for k in (ref_key(s) for s in sr.get("supportingInfo") or []) if k and
                    k.startswith("DetectedIssue/")]
    for r in implicating:
        if r not in finding_refs:
            finding_refs.append(r)
    findings = []
    for r in finding_refs:
        i = issues.get(r, {})
        findings.append(Finding(r, i.get("severity"), i.get("status"), str(i.get("detail") or _text(i.get("code")))))

    return PlanRow(
        order_ref=order_ref, status=status, techniques=techniques, title=title, sites=sites,
        schedule_text=schedule_text, frequency=frequency, sessions_done=done, sessions_planned=planned,
        plan_start=start, plan_end=end, ending_soon=ending_soon, period_over=period_over,
        expected_sessions=expected, adherence=adh, sessions_per_week=per_week, gaps=gaps,
        last_session=max(dated) if dated else None, pain=pain_trend(points),
        not_done=tuple(sorted(not_done, key=lambda n: (n.date or date.min, n.procedure_ref))),
        findings=tuple(findings), task_ref=_own_ref(task) if task else None,
        task_status=task.get("status") if task else None, warnings=tuple(warnings))


# --- who "the physician" is ---------------------------------------------------------------------------------------


def physician_refs(user_ref: str | None, roles: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Every reference that stands for the signed-in physician, the user's own first: their Practitioner and each
    PractitionerRole of that Practitioner found in ``roles`` (PractitionerRole/Practitioner resources from a
    ``PractitionerRole?practitioner=`` search or a read of the user's role with ``_include``). EHRs put either in
    ServiceRequest.requester and Communication.recipient/sender (R4 both allow Practitioner | PractitionerRole), and
    SMART's fhirUser may be either (SMART App Launch 2.2 "fhirUser claim"), so an order or message under any of
    them is the physician's. A role of another practitioner is never counted, whatever the search returned."""
    me = ref_key(user_ref)
    if not me:
        return []
    out = [me]
    roles = [r for r in roles if isinstance(r, Mapping)]
    people = {me} if me.startswith("Practitioner/") else set()
    for r in roles:  # the Practitioner behind a PractitionerRole user
        if r.get("resourceType") == "PractitionerRole" and _own_ref(r) == me:
            who = ref_key(r.get("practitioner"))
            if who and who.startswith("Practitioner/"):
                people.add(who)
    for r in roles:
        if r.get("resourceType") != "PractitionerRole":
            continue  # an inactive role counts too: the orders filed under it are still this physician's
        own = _own_ref(r)
        if own and ref_key(r.get("practitioner")) in people and own not in out:
            out.append(own)
    out += sorted(p for p in people if p not in out)
    return out


# --- messages ----------------------------------------------------------------------------------------------------


def threads(communications: Iterable[Mapping[str, Any]], *, physician_refs: Iterable[str]) -> list[Thread]:
    """Messages grouped into threads by ``inResponseTo`` (a reply joins the thread of the message it answers),
    newest activity first. ``unread``: the last message is not from the physician (no reply from them yet)."""
    mine = {k for k in (ref_key(r) for r in physician_refs) if k}
    msgs: dict[str, tuple[Message, str | None, Mapping[str, Any]]] = {}
    for c in communications:
        if not isinstance(c, Mapping) or c.get("resourceType") != "Communication":
            continue
        if c.get("status") in _IGNORED_STATUS:
            continue
        own = _own_ref(c)
        if not own:
            continue
        text = " ".join(str(p.get("contentString")) for p in c.get("payload") or []
                        if isinstance(p, Mapping) and isinstance(p.get("contentString"), str))
        cats = [cc.get("code") for cat in c.get("category") or [] for cc in codings(cat)]
        ours = next((x for x in cats if x in ("progress", "condition-change", "request")), None)
        parent = next((ref_key(r) for r in c.get("inResponseTo") or [] if ref_key(r)), None)
        order = next((ref_key(b) for b in c.get("basedOn") or [] if ref_key(b)), None)
        msgs[own] = (Message(own, ref_key(c.get("sender")), parse_datetime(c.get("sent")), text,
                             ours or (cats[0] if cats else None), parent), order, c)

    def root(ref: str) -> str:
        seen = set()
        while True:
            parent = msgs[ref][0].in_response_to
            if not parent or parent not in msgs or parent in seen:
                return ref
            seen.add(ref)
            ref = parent

    def depth(ref: str) -> int:
        n, seen = 0, set()
        while (parent := msgs[ref][0].in_response_to) and parent in msgs and parent not in seen:
            seen.add(ref)
            ref, n = parent, n + 1
        return n

    grouped: dict[str, list[str]] = {}
    for ref in msgs:
        grouped.setdefault(root(ref), []).append(ref)
    out = []
    for root_ref, refs in grouped.items():
        # ``sent`` has whole seconds: a reply sent within the second of its message must still come after it
        ordered = sorted(refs, key=lambda r: (_sort_time(msgs[r][0].sent), depth(r), r))
        messages = tuple(msgs[r][0] for r in ordered)
        order = msgs[root_ref][1] or next((msgs[r][1] for r in ordered if msgs[r][1]), None)
        unread = messages[-1].sender not in mine
        cats = frozenset(m.category for m in messages if m.category)
        out.append(Thread(root_ref, order, messages, unread, cats))
    out.sort(key=lambda t: (_sort_time(t.messages[-1].sent), t.root_ref), reverse=True)
    return out


def _sort_time(dt: datetime | None) -> tuple[int, str]:
    utc = _utc(dt)
    return (1, utc.isoformat()) if utc else (0, "")


# --- attention ---------------------------------------------------------------------------------------------------

_SEVERITY_SCORE = {"high": 100, "moderate": 60, "low": 25}


def attention(rows: Sequence[PlanRow], new_findings: Iterable[Mapping[str, Any]] = (),
              unread: Iterable[Thread] = ()) -> list[Attention]:
    """What the physician should look at first, highest score first: new findings (by severity), unread
    messages (a reported change in condition weighs more), pain getting worse, low adherence and long gaps,
    plans ending or over. Weights are our product choice [B], tuned so that any new high-severity finding
    outranks everything else."""
    reasons: dict[str | None, list[tuple[int, str]]] = {r.order_ref: [] for r in rows}
    known = set(reasons)
    for f in new_findings:
        if not isinstance(f, Mapping):
            continue
        severity = f.get("severity")
        text = str(f.get("detail") or _text(f.get("code")) or "New contraindication finding")
        short = text if len(text) <= 90 else text[:87] + "..."
        targets = [k for k in (ref_key(i) for i in f.get("implicated") or []) if k in known] or [None]
        for t in targets:
            reasons.setdefault(t, []).append((_SEVERITY_SCORE.get(str(severity), 40),
                                              f"New finding ({severity or 'unknown severity'}): {short}"))
    by_order: dict[str | None, list[Thread]] = {}
    for th in unread:
        if th.unread:
            by_order.setdefault(th.order_ref if th.order_ref in known else None, []).append(th)
    for order, ths in by_order.items():
        n = sum(1 for _ in ths)
        score = 40 + 10 * (n - 1) + (30 if any("condition-change" in t.categories for t in ths) else 0)
        label = "unread message" if n == 1 else "unread messages"
        extra = " (change in condition reported)" if any("condition-change" in t.categories for t in ths) else ""
        reasons.setdefault(order, []).append((score, f"{n} {label} from the therapist{extra}"))
    given: set[tuple[str, str]] = set()  # (plan, reason): a plan's rows share its numbers; say each once
    for r in rows:
        out = reasons[r.order_ref]
        p: Any = r.plan or r  # adherence, gaps, pain and not-done count the plan's visits (PlanStats)
        mine: list[tuple[int, str]] = []
        if p.pain.worse:
            mine.append((25, f"Pain is worse: {p.pain.note}"))
        if r.status == "active":
            if p.adherence is not None and p.adherence < 0.5:
                mine.append((30, f"Low adherence: {p.sessions_done} sessions, {p.expected_sessions:.0f} expected "
                                 "by now"))
            elif p.adherence is not None and p.adherence < 0.8:
                mine.append((15, f"Adherence below plan: {p.sessions_done} sessions, "
                                 f"{p.expected_sessions:.0f} expected by now"))
            open_gap = next((g for g in p.gaps if g.open), None)
            if open_gap:
                mine.append((20, f"No session for {open_gap.days} days"))
            if r.period_over:
                mine.append((15, f"Plan ended on {r.plan_end}; complete or renew the order"))
            elif r.ending_soon:
                mine.append((10, f"Plan ends on {r.plan_end}"))
        if p.not_done:
            last = p.not_done[-1]
            mine.append((10, f"Session not done{' on ' + str(last.date) if last.date else ''}: {last.reason}"))
        for score, text in mine:
            if (r.plan_key or r.order_ref, text) not in given:
                given.add((r.plan_key or r.order_ref, text))
                out.append((score, text))
        if r.status == "on-hold":
            out.append((5, "Order on hold"))
    result = [Attention(order, sum(s for s, _ in items), tuple(t for _, t in sorted(items, key=lambda x: -x[0])))
              for order, items in reasons.items()]
    result.sort(key=lambda a: (-a.score, a.order_ref or ""))
    return result


__all__ = [
    "PainPoint", "PainTrend", "Gap", "NotDone", "Finding", "PlanRow", "PlanStats", "Message", "Thread", "Attention",
    "plan_rows", "pain_trend", "adherence", "threads", "attention", "ref_key", "parse_date", "requisition_key",
    "visit_key", "physician_refs",
    "MCID_POINTS", "MCID_FRACTION", "GAP_FACTOR",
]
