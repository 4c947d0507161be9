"""A documented visit: VisitNote -> one Procedure per technique used + pain Observations + Task progress +
Provenance, as ONE idempotent transaction Bundle (reference/fhir-modelling.md "The session", "Outcomes:
Observation").

A physician's order with several techniques is one ServiceRequest + one fulfilment Task per technique, grouped
by ``ServiceRequest.requisition`` (builders.order.order_transaction). The therapist documents the VISIT once:

* One Procedure per technique used (our profiles slice ``code.coding`` into cpt 1..1 and technique 1..1, so two
  techniques cannot share one Procedure), each ``basedOn`` its own technique's ServiceRequest, all with the same
  ``performedPeriod`` (start/end: the visit's minutes drive CPT timed units) and the same sites, SOAP narrative
  and response. Identifiers: ``session-draft|<draft id>:<technique>`` (the conditional-create key, one per
  Procedure) and ``session-visit|<draft id>`` (shared: groups the visit's Procedures for the plan view).
* Only techniques the plan ordered can be documented. A technique without an order has nothing to be ``basedOn``
  (MassageProcedure: basedOn 1..* ServiceRequest), its CPT code was not authorized, and the pre-session re-screen
  did not look at it; the therapist asks the physician to add it instead (our product choice [B]).
* Pain NRS before/after ONCE per visit (LOINC 72514-3, ``valueInteger`` 0-10 [V]), ``partOf`` every Procedure
  of the visit (Observation.partOf 0..*, MassagePainScore does not narrow it) and ``basedOn`` every order used;
  "before" is effective at the visit start, "after" at its end.
* Each involved fulfilment Task is updated in the same transaction with ``PUT`` + ``If-Match``
  (http.html#concurrency): one more ``output`` (type ``session`` -> its technique's Procedure, with that
  Procedure's identifier in the Reference, so a re-read Task shows whether this visit is already in), status
  ``in-progress`` or ``completed`` after its last authorized session. A retry after a lost answer fails the
  If-Match with 412 (FhirConflict): re-read the Tasks and ask ``session_recorded(task, draft_id)`` per Task;
  a Task that already lists the visit is left alone when the Bundle is rebuilt.
* Not done: the whole visit. One not-done Procedure per ordered technique whose Task is still open, each Task
  gets a ``session-not-done`` output (listed, not counted), no pain scores.
* CPT units: the CMS 8-minute rule applies to the TOTAL timed minutes of the visit across codes; the units are
  then shared between the codes by their minutes (``visit_units``). Minutes per technique are optional: with one
  CPT code all minutes are its own; with several, the split needs the minutes of all codes but one.

``SessionNote`` / ``session_transaction(note, task, now)`` are the one-technique form of the same thing (kept
for callers that document against one order).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from ..codes import (
    LOINC,
    NUCC,
    NUCC_MASSAGE_THERAPIST,
    OBSERVATION_CATEGORY,
    TASK_IO_SYSTEM,
    TECHNIQUE_CPT,
    TECHNIQUE_DISPLAY,
    TECHNIQUES,
    coding,
)
from ..errors import InvalidInput
from ..fhir import request_entry, transaction_bundle
from ..orders_model import PRESSURES, parse_site, ref_problem, site_problem
from .order import (
    CATEGORY_PT,
    IDENTIFIER_BASE,
    OUTPUT_SESSION,
    OUTPUT_SESSION_NOT_DONE,
    _output_type,
    annotation,
    body_site,
    body_structure_entries,
    business_status,
    code_text,
    conditional_create,
    identifier,
    instant,
    meta,
    provenance,
    provenance_entry,
    ref,
    target_body_structures,
    technique_codings,
    urn,
)

SESSION_ID_SYSTEM = f"{IDENTIFIER_BASE}/session-draft"
VISIT_ID_SYSTEM = f"{IDENTIFIER_BASE}/session-visit"
OBSERVATION_ID_SYSTEM = f"{IDENTIFIER_BASE}/session-observation"
PAIN_NRS = coding(LOINC, "72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported")  # [V]
STATUSES = ("completed", "not-done")
MAX_SESSION_MINUTES = 240
_TERMINAL_TASK = frozenset({"completed", "cancelled", "failed", "rejected", "entered-in-error"})


def _whole_minutes(start: datetime, end: datetime | None) -> int:
    """A visit's length in whole minutes (the CPT time-unit count starts from it); 0 without an end."""
    if end is None:
        return 0
    return max(0, int((end - start).total_seconds() // 60))

@dataclass(frozen=True)
class VisitOrder:
    """One technique's order of the plan: its ServiceRequest and fulfilment Task."""

    technique: str
    order_ref: str  # ServiceRequest/..
    task_ref: str  # Task/..


@dataclass(frozen=True)
class VisitNote:
    draft_id: str  # uuid the app assigns per note draft; identifiers of the visit transaction derive from it
    orders: tuple[VisitOrder, ...]  # the plan's orders (one per technique)
    patient_ref: str
    performer_ref: str  # PractitionerRole/.. or Practitioner/.. of the therapist
    start: datetime  # for not-done: when the visit was due
    end: datetime | None = None
    status: str = "completed"  # completed | not-done (the whole visit)
    status_reason: str = ""
    techniques: tuple[str, ...] = ()  # the techniques actually used (completed visits)
    technique_minutes: tuple[tuple[str, int], ...] = ()  # optional (technique, minutes) for the CPT split
    sites: tuple[str, ...] = ()
    pressure: str | None = None
    position: str = ""
    response: str = ""
    adverse_events: tuple[str, ...] = ()
    pain_before: int | None = None  # NRS 0-10, once per visit
    pain_after: int | None = None
    subjective: str = ""
    objective: str = ""
    assessment: str = ""
    plan: str = ""
    follow_up: str = ""
    task_versions: tuple[tuple[str, str], ...] = ()  # (Task/.., version the therapist saw): If-Match fallback
    encounter_ref: str | None = None

    @property
    def minutes(self) -> int:
        return _whole_minutes(self.start, self.end)

    def used_orders(self) -> tuple[VisitOrder, ...]:
        """The orders this visit writes against: the techniques used, in the plan's order; all of them when the
        visit was not done."""
        if self.status == "not-done":
            return self.orders
        wanted = set(self.techniques)
        return tuple(o for o in self.orders if o.technique in wanted)


@dataclass(frozen=True)
class SessionNote:
    """One technique's session (the one-order form of a VisitNote)."""

    draft_id: str
    order_ref: str  # ServiceRequest/..
    task_ref: str  # Task/..
    patient_ref: str
    performer_ref: str
    start: datetime
    end: datetime | None = None
    status: str = "completed"
    status_reason: str = ""
    technique: str = ""
    sites: tuple[str, ...] = ()
    pressure: str | None = None
    position: str = ""
    response: str = ""
    adverse_events: tuple[str, ...] = ()
    pain_before: int | None = None
    pain_after: int | None = None
    subjective: str = ""
    objective: str = ""
    assessment: str = ""
    plan: str = ""
    follow_up: str = ""
    task_version: str | None = None
    encounter_ref: str | None = None

    @property
    def minutes(self) -> int:
        return _whole_minutes(self.start, self.end)

    def as_visit(self) -> VisitNote:
        return VisitNote(
            draft_id=self.draft_id, orders=(VisitOrder(self.technique, self.order_ref, self.task_ref),),
            patient_ref=self.patient_ref, performer_ref=self.performer_ref, start=self.start, end=self.end,
            status=self.status, status_reason=self.status_reason,
            techniques=(self.technique,) if self.technique else (), sites=self.sites, pressure=self.pressure,
            position=self.position, response=self.response, adverse_events=self.adverse_events,
            pain_before=self.pain_before, pain_after=self.pain_after, subjective=self.subjective,
            objective=self.objective, assessment=self.assessment, plan=self.plan, follow_up=self.follow_up,
            task_versions=((self.task_ref, self.task_version),) if self.task_version else (),
            encounter_ref=self.encounter_ref)


def _visit(note: VisitNote | SessionNote) -> VisitNote:
    return note.as_visit() if isinstance(note, SessionNote) else note


# --- CPT units -----------------------------------------------------------------------------------------------------


def cpt_units(minutes: int) -> int:
    """Timed CPT units under the CMS 8-minute rule [V2, reference "Billing rules"]: < 8 min -> 0, 8-22 -> 1,
    23-37 -> 2, 38-52 -> 3, ... (each further unit needs 8 more minutes beyond the full 15-minute units)."""
    if minutes < 8:
        return 0
    return (minutes + 7) // 15


def session_cpt(note: SessionNote) -> str | None:
    known = TECHNIQUE_CPT.get(note.technique)
    return known[0] if known else None


def technique_cpt(technique: str) -> str | None:
    known = TECHNIQUE_CPT.get(technique)
    return known[0] if known else None


def units_by_code(minutes_by_code: Mapping[str, int]) -> dict[str, int]:
    """CPT units per code from the timed minutes per code of one visit, CMS way [V2, reference "Billing rules"]:
    the units come from the pooled minutes of all timed codes; each code gets its full 15-minute units, and the
    units left go to the codes with the most remaining minutes. E.g. 33 min of 97140 + 7 min of 97124 = 40 min
    = 3 units: 97140 x 2, 97124 x 1."""
    per_code = {c: int(m) for c, m in minutes_by_code.items() if m and m > 0}
    total = cpt_units(sum(per_code.values()))
    units = {c: m // 15 for c, m in per_code.items()}
    left = total - sum(units.values())
    by_rest = sorted(per_code, key=lambda c: (-(per_code[c] % 15), -per_code[c], c))
    for c in by_rest[:max(0, left)]:
        units[c] += 1
    return {c: u for c, u in units.items() if u}


def visit_cpt_minutes(visit: VisitNote) -> dict[str, int] | None:
    """Timed minutes per CPT code of a completed visit, or None when they cannot be told apart (several codes and
    the minutes of more than one of them not given). Techniques sharing a code pool their minutes."""
    if visit.status != "completed" or visit.end is None:
        return {}
    given = dict(visit.technique_minutes)
    codes: dict[str, list[str]] = {}
    for t in visit.techniques:
        c = technique_cpt(t)
        if c:
            codes.setdefault(c, []).append(t)
    if len(codes) == 1:
        (only,) = codes
        return {only: visit.minutes}
    known = {c: sum(given[t] for t in ts if t in given) for c, ts in codes.items()
             if any(t in given for t in ts)}
    unknown = [c for c in codes if c not in known]
    if len(unknown) > 1:
        return None
    out = dict(known)
    if unknown:
        out[unknown[0]] = max(0, visit.minutes - sum(known.values()))
    return out


def visit_units(notes: VisitNote | Sequence[SessionNote]) -> dict[str, int]:
    """CPT units per code for one visit: a VisitNote (see ``visit_cpt_minutes``; {} when the split is unknown),
    or the completed one-technique notes of one patient on one day."""
    if isinstance(notes, VisitNote):
        return units_by_code(visit_cpt_minutes(notes) or {})
    per_code: dict[str, int] = {}
    for n in notes:
        cpt = session_cpt(n)
        if n.status == "completed" and cpt:
            per_code[cpt] = per_code.get(cpt, 0) + n.minutes
    return units_by_code(per_code)


# --- checks --------------------------------------------------------------------------------------------------------


def visit_problems(visit: VisitNote) -> dict[str, str]:
    """What stops this visit note from being written, field by field, in plain words (empty = none). Fields:
    draft_id, orders, order_ref, task_ref, patient_ref, performer_ref, techniques, minutes, status,
    status_reason, start, end, sites, pain_before, pain_after, pressure."""
    out: dict[str, str] = {}
    if not visit.draft_id:
        out["draft_id"] = "The note has no id; start a new note."
    for name, value, types, what in (
        ("patient_ref", visit.patient_ref, ("Patient",), "patient"),
        ("performer_ref", visit.performer_ref, ("Practitioner", "PractitionerRole"), "therapist"),
    ):
        problem = ref_problem(value, types, what)
        if problem:
            out[name] = problem
    if not visit.orders:
        out["orders"] = "The visit is not for any order; open it from the patient's massage orders."
    ordered: dict[str, VisitOrder] = {}
    for o in visit.orders:
        for name, value, types, what in (("order_ref", o.order_ref, ("ServiceRequest",), "order"),
                                         ("task_ref", o.task_ref, ("Task",), "order's task")):
            problem = ref_problem(value, types, what)
            if problem:
                out.setdefault(name, problem)
        if o.technique not in TECHNIQUES:
            out.setdefault("orders", f"The plan has an order for an unknown technique '{o.technique}'.")
        elif o.technique in ordered:
            out.setdefault("orders", f"The plan has two orders for {TECHNIQUE_DISPLAY[o.technique].lower()}.")
        ordered[o.technique] = o
    if visit.status not in STATUSES:
        out["status"] = "A session is either completed or not done."
    if not isinstance(visit.start, datetime) or visit.start.tzinfo is None:
        out["start"] = "The session start needs a date, a time and a time zone."
    if visit.status == "not-done":
        if not visit.status_reason.strip():
            out["status_reason"] = "Say why the session was not done."
    elif visit.status == "completed":
        unknown = [t for t in visit.techniques if t not in TECHNIQUES]
        not_ordered = [t for t in visit.techniques if t in TECHNIQUES and t not in ordered]
        if unknown:
            out["techniques"] = f"Unknown technique '{unknown[0]}'."
        elif not_ordered:
            names = ", ".join(TECHNIQUE_DISPLAY[t].lower() for t in not_ordered)
            out["techniques"] = (f"{names.capitalize()} was not ordered in this plan; only ordered techniques can "
                                 "be documented. Ask the physician to add it (message below).")
        elif not visit.techniques:
            out["techniques"] = "Tick the techniques you used (at least one of the ordered ones)."
        elif len(set(visit.techniques)) != len(visit.techniques):
            out["techniques"] = "Each technique is listed once."
        if visit.end is None or not isinstance(visit.end, datetime) or visit.end.tzinfo is None:
            out["end"] = "The session end needs a date, a time and a time zone."
        elif "start" not in out and visit.end <= visit.start:
            out["end"] = "The session must end after it starts."
        elif "start" not in out and visit.minutes > MAX_SESSION_MINUTES:
            out["end"] = f"{visit.minutes} minutes is longer than any session; check the start and end times."
        if not visit.sites:
            out["sites"] = "Say which body sites were treated."
        for name, value in (("pain_before", visit.pain_before), ("pain_after", visit.pain_after)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10):
                out[name] = "Pain is a whole number from 0 (no pain) to 10 (worst imaginable)."
        minutes = dict(visit.technique_minutes)
        if any(t not in visit.techniques for t in minutes):
            out["minutes"] = "Minutes can only be given for the techniques you ticked."
        elif any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in minutes.values()):
            out["minutes"] = "Minutes per technique are whole numbers."
        elif "end" not in out and "start" not in out and sum(minutes.values()) > visit.minutes:
            out["minutes"] = (f"The minutes per technique add up to {sum(minutes.values())}, more than the "
                              f"{visit.minutes}-minute visit.")
    if visit.sites:
        msgs = [m for m in (site_problem(s) for s in visit.sites) if m]
        if msgs:
            out["sites"] = " ".join(msgs)
    if visit.pressure is not None and visit.pressure not in PRESSURES:
        out["pressure"] = f"Pressure is one of {', '.join(PRESSURES)}."
    return out


def session_problems(note: SessionNote) -> dict[str, str]:
    """``visit_problems`` of a one-technique note, with its field names (technique, order_ref, task_ref)."""
    problems = visit_problems(note.as_visit())
    out: dict[str, str] = {}
    for name, message in problems.items():
        if name == "techniques" or (name == "orders" and note.technique not in TECHNIQUES):
            name = "technique"
            if not note.technique:
                message = "Say which technique (of the order) the session was for."
            elif note.technique not in TECHNIQUES:
                message = f"Unknown technique '{note.technique}'."
        out.setdefault(name, message)
    if not note.technique:
        out.setdefault("technique", "Say which technique (of the order) the session was for.")
    return out


def _require_valid(visit: VisitNote) -> None:
    problems = visit_problems(visit)
    if problems:
        raise InvalidInput("The session note is not complete: " + " ".join(problems.values()))


# --- resources -----------------------------------------------------------------------------------------------------


def _soap(visit: VisitNote, technique: str) -> list[str]:
    # SOAP as four annotations (reference "The session": note), the structure massage SOAP templates use
    # (product-anchors.md, MassageBook: S = complaint and pain, O = findings, A = assessment, P = plan).
    out = [f"{label}: {text.strip()}" for label, text in (
        ("S", visit.subjective), ("O", visit.objective), ("A", visit.assessment), ("P", visit.plan)) if text.strip()]
    details = []
    if visit.pressure:
        details.append(f"{visit.pressure.capitalize()} pressure")
    if visit.position.strip():
        details.append(f"position: {visit.position.strip()}")
    if details:
        out.append("Delivery: " + "; ".join(details) + ".")
    others = [TECHNIQUE_DISPLAY[o.technique].lower() for o in visit.used_orders() if o.technique != technique]
    if visit.status == "completed" and others:
        # the visit's other Procedures carry the same narrative: say so, so nobody reads it as two visits
        out.append(f"Same visit as {', '.join(others)} (one note for the visit).")
    minutes = dict(visit.technique_minutes).get(technique)
    if visit.status == "completed" and minutes is not None:
        out.append(f"Time: {minutes} of the visit's {visit.minutes} minutes.")
    return out


def procedure_identifier(draft_id: str, technique: str) -> dict[str, str]:
    return identifier(SESSION_ID_SYSTEM, f"{draft_id}:{technique}")


def _procedure(visit: VisitNote, order: VisitOrder, now: datetime,
               body_structure_refs: Mapping[str, str] | None) -> dict[str, Any]:
    sites = [s for s in (parse_site(v) for v in visit.sites) if s is not None]
    proc: dict[str, Any] = {"resourceType": "Procedure", "meta": meta("Procedure")}
    extensions = target_body_structures(sites, body_structure_refs)
    if extensions:
        proc["extension"] = extensions
    proc["identifier"] = [procedure_identifier(visit.draft_id, order.technique),
                          identifier(VISIT_ID_SYSTEM, visit.draft_id)]
    proc["basedOn"] = [ref(order.order_ref)]
    proc["status"] = visit.status
    if visit.status == "not-done":
        proc["statusReason"] = {"text": visit.status_reason.strip()}
    proc["category"] = {"coding": [CATEGORY_PT], "text": "Medical massage"}
    proc["code"] = {"coding": technique_codings(order.technique), "text": code_text(order.technique, sites)}
    proc["subject"] = ref(visit.patient_ref)
    if visit.encounter_ref:
        proc["encounter"] = ref(visit.encounter_ref)
    if visit.status == "completed":
        proc["performedPeriod"] = {"start": instant(visit.start), "end": instant(visit.end)}  # type: ignore[arg-type]
    else:
        # When the session was due (the plan view needs a date for "not done, and why"); a Period because our
        # profile allows only Period (performed[x] 1..1), with no end: nothing was performed.
        proc["performedPeriod"] = {"start": instant(visit.start)}
    proc["recorder"] = ref(visit.performer_ref)
    proc["performer"] = [{"function": {"coding": [coding(NUCC, NUCC_MASSAGE_THERAPIST, "Massage Therapist")]},
                          "actor": ref(visit.performer_ref)}]
    if sites:
        proc["bodySite"] = [body_site(s) for s in sites]
    if visit.response.strip():
        proc["outcome"] = {"text": visit.response.strip()}
    if visit.adverse_events:
        proc["complication"] = [{"text": e.strip()} for e in visit.adverse_events if e.strip()]
    if visit.follow_up.strip():
        proc["followUp"] = [{"text": visit.follow_up.strip()}]
    texts = _soap(visit, order.technique)
    if texts:
        proc["note"] = [annotation(t, author_ref=visit.performer_ref, time=now) for t in texts]
    return proc


def procedures(visit: VisitNote, now: datetime, *,
               body_structure_refs: Mapping[str, str] | None = None) -> list[tuple[VisitOrder, dict[str, Any]]]:
    """(order, Procedure) per technique of the visit (MassageProcedure). Raises InvalidInput if
    ``visit_problems`` is not empty."""
    _require_valid(visit)
    return [(o, _procedure(visit, o, now, body_structure_refs)) for o in visit.used_orders()]


def procedure(note: SessionNote, now: datetime, *,
              body_structure_refs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The one-technique session as a Procedure."""
    return procedures(note.as_visit(), now, body_structure_refs=body_structure_refs)[0][1]


def pain_observations(note: VisitNote | SessionNote, procedure_refs: str | Sequence[str], *,
                      now: datetime) -> list[dict[str, Any]]:
    """Pain NRS before and after the visit (those given), ``partOf`` every Procedure of the visit, ``basedOn``
    every order used.

    Category ``survey`` [B]: a patient-reported score is an assessment, not a vital sign (the vital-signs category
    carries US Core's vital-sign profiles and their fixed codes). The patient is the performer: 72514-3 is the
    *reported* score."""
    visit = _visit(note)
    if visit.status != "completed":
        return []
    refs = [procedure_refs] if isinstance(procedure_refs, str) else list(procedure_refs)
    out = []
    for which, value, when, words in (("before", visit.pain_before, visit.start, "Before the session"),
                                      ("after", visit.pain_after, visit.end, "After the session")):
        if value is None:
            continue
        out.append({
            "resourceType": "Observation",
            "meta": meta("Observation"),
            "identifier": [identifier(OBSERVATION_ID_SYSTEM, f"{visit.draft_id}:pain-{which}")],
            "basedOn": [ref(o.order_ref) for o in visit.used_orders()],
            "partOf": [ref(r) for r in refs],
            "status": "final",
            "category": [{"coding": [coding(OBSERVATION_CATEGORY, "survey", "Survey")]}],
            "code": {"coding": [PAIN_NRS], "text": f"Pain (0-10), {which} massage"},
            "subject": ref(visit.patient_ref),
            "effectiveDateTime": instant(when),  # type: ignore[arg-type]
            "issued": instant(now),
            "performer": [ref(visit.patient_ref)],
            "valueInteger": value,
            "note": [{"text": words}],
        })
    return out


# --- the Tasks -----------------------------------------------------------------------------------------------------


def session_recorded(task: Mapping[str, Any], draft_id: str) -> bool:
    """Whether ``task`` already lists the visit written from note ``draft_id`` (see the module doc)."""
    for o in task.get("output") or []:
        if not isinstance(o, Mapping):
            continue
        ident = (o.get("valueReference") or {}).get("identifier") or {}
        value = ident.get("value")
        if ident.get("system") == SESSION_ID_SYSTEM and isinstance(value, str) and (
                value == draft_id or value.startswith(f"{draft_id}:")):
            return True
    return False


def _task_version(task: Mapping[str, Any], visit: VisitNote, task_ref: str) -> str:
    version = (task.get("meta") or {}).get("versionId") or dict(visit.task_versions).get(task_ref)
    if not version:
        raise InvalidInput("The order's task has no version; read it again before documenting the session.")
    return str(version)


def _task_label(task: Mapping[str, Any], technique: str | None) -> str:
    return f"The {TECHNIQUE_DISPLAY[technique].lower()} order's task" if technique in TECHNIQUE_DISPLAY \
        else "The order's task"


def task_after_session(task: Mapping[str, Any], note: VisitNote | SessionNote, procedure_ref: str, now: datetime,
                       *, technique: str | None = None) -> dict:
    """The fulfilment Task with this visit added (a new dict; the input is not changed). ``technique``: whose
    Procedure ``procedure_ref`` is (a one-technique note's own by default)."""
    visit = _visit(note)
    technique = technique or (note.technique if isinstance(note, SessionNote) else None)
    status = task.get("status")
    if status in _TERMINAL_TASK:
        raise InvalidInput(f"{_task_label(task, technique)} is {status}; no more sessions can be documented "
                           "against it. Ask the physician to renew the order.")
    total = (task.get("restriction") or {}).get("repetitions")
    done = sum(1 for o in task.get("output") or [] if _output_type(o) == OUTPUT_SESSION)
    if visit.status == "completed" and isinstance(total, int) and done >= total:
        raise InvalidInput(f"All {total} authorized sessions are documented; ask the physician to renew the order.")
    updated = copy.deepcopy(dict(task))
    kind = OUTPUT_SESSION if visit.status == "completed" else OUTPUT_SESSION_NOT_DONE
    label = "Session" if kind == OUTPUT_SESSION else "Session not done"
    updated.setdefault("output", []).append({
        "type": {"coding": [coding(TASK_IO_SYSTEM, kind, label)]},
        "valueReference": {"reference": procedure_ref,
                           "identifier": procedure_identifier(visit.draft_id, technique or "session")},
    })
    if visit.status == "completed":
        done += 1
        updated["status"] = "completed" if isinstance(total, int) and done >= total else "in-progress"
    updated["businessStatus"] = business_status(done, total if isinstance(total, int) else None)
    updated["lastModified"] = instant(now)
    updated.pop("text", None)  # a stale narrative would contradict the new counts
    return updated


def session_urns(draft_id: str, techniques: Iterable[str] = ()) -> dict[str, str]:
    out = {"pain-before": urn("session-pain-before", draft_id), "pain-after": urn("session-pain-after", draft_id)}
    for t in techniques:
        out[t] = urn("session", draft_id, t)
    return out


def _visit_orders(visit: VisitNote, tasks: Mapping[str, Mapping[str, Any]]) -> tuple[VisitNote, list[VisitOrder]]:
    """The orders the transaction writes against. A not-done visit skips orders whose Task is already finished
    (all its sessions documented, or closed) unless the Task lists this visit."""
    for o in visit.used_orders():
        task = tasks.get(o.task_ref)
        if task is None or task.get("resourceType") != "Task" or not task.get("id"):
            raise InvalidInput("The order's task must be the Task as read from the EHR (with its id).")
        if o.task_ref != f"Task/{task['id']}":
            raise InvalidInput(f"The note is for {o.task_ref} but the task given is Task/{task['id']}.")
    if visit.status != "not-done":
        return visit, list(visit.used_orders())
    open_orders = tuple(o for o in visit.orders if tasks[o.task_ref].get("status") not in _TERMINAL_TASK
                        or session_recorded(tasks[o.task_ref], visit.draft_id))
    if not open_orders:
        status = tasks[visit.orders[0].task_ref].get("status")
        raise InvalidInput(f"The order's task is {status}; no more sessions can be documented against it. "
                           "Ask the physician to renew the order.")
    trimmed = VisitNote(**{**visit.__dict__, "orders": open_orders})
    return trimmed, list(open_orders)


def visit_transaction(note: VisitNote, tasks: Mapping[str, Mapping[str, Any]], now: datetime, *,
                      app_version: str | None = None, body_structures: bool = False,
                      provenance_mode: str = "put") -> dict[str, Any]:
    """ONE transaction Bundle for the visit: [BodyStructures], one Procedure per technique, the pain
    Observations, each involved Task's update (PUT, If-Match), one Provenance (PUT with a derived id, see
    order.provenance_entry). ``tasks``: "Task/<id>" -> the current Task as read (with ``meta.versionId``), for
    every order the visit writes against. A Task that already lists this visit is left alone (the creates are
    no-ops on retry)."""
    _require_valid(note)
    visit, used = _visit_orders(note, tasks)
    urns = session_urns(visit.draft_id, [o.technique for o in used])
    sites = [s for s in (parse_site(v) for v in visit.sites) if s is not None]
    bs_entries, bs_refs = body_structure_entries(sites, visit.patient_ref) if body_structures else ([], {})
    procs = procedures(visit, now, body_structure_refs=bs_refs)
    written: list[tuple[str, dict[str, Any]]] = [(e["fullUrl"], e["resource"]) for e in bs_entries]
    written += [(urns[o.technique], p) for o, p in procs]
    for obs in pain_observations(visit, [urns[o.technique] for o in used], now=now):
        which = obs["identifier"][0]["value"].rsplit(":", 1)[1]
        written.append((urns[which], obs))
    entries = [conditional_create(r, u) for u, r in written]
    targets: list[dict[str, Any]] = [{"reference": u, "identifier": dict(r["identifier"][0])} for u, r in written]
    for o in used:
        task = tasks[o.task_ref]
        if session_recorded(task, visit.draft_id):
            continue
        version = _task_version(task, visit, o.task_ref)
        updated = task_after_session(task, visit, urns[o.technique], now, technique=o.technique)
        entries.append(request_entry("PUT", o.task_ref, updated, full_url=None, if_match=version))
        targets.append({"reference": o.task_ref})
    prov = provenance(targets, author_ref=visit.performer_ref, now=now, activity="CREATE", app_version=app_version)
    entries.append(provenance_entry(prov, f"session/{visit.draft_id}", mode=provenance_mode,
                                    key=procs[0][1]["identifier"][0]))
    return transaction_bundle(entries)


def session_transaction(note: SessionNote, task: Mapping[str, Any], now: datetime, *,
                        app_version: str | None = None, body_structures: bool = False,
                        provenance_mode: str = "put") -> dict[str, Any]:
    """``visit_transaction`` for a one-technique note and its order's Task (as read, with its id)."""
    task_id = task.get("id")
    if task.get("resourceType") != "Task" or not task_id:
        raise InvalidInput("The order's task must be the Task as read from the EHR (with its id).")
    if note.task_ref != f"Task/{task_id}":
        raise InvalidInput(f"The note is for {note.task_ref} but the task given is Task/{task_id}.")
    return visit_transaction(note.as_visit(), {note.task_ref: task}, now, app_version=app_version,
                             body_structures=body_structures, provenance_mode=provenance_mode)


__all__ = [
    "SESSION_ID_SYSTEM", "VISIT_ID_SYSTEM", "OBSERVATION_ID_SYSTEM", "PAIN_NRS", "VisitOrder", "VisitNote",
    "SessionNote", "cpt_units", "units_by_code", "visit_cpt_minutes", "visit_units", "session_cpt", "technique_cpt",
    "visit_problems", "session_problems", "procedures", "procedure", "procedure_identifier", "pain_observations",
    "visit_transaction", "session_transaction", "session_recorded", "task_after_session", "session_urns",
]
