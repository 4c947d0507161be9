"""A documented session: SessionNote -> Procedure + pain Observations + Task progress + Provenance, as one
idempotent transaction Bundle (reference/fhir-modelling.md "The session", "Outcomes: Observation").

* One Procedure per session, ``basedOn`` the order, ``performedPeriod`` (start/end gives the minutes CPT timed
  units need), CPT + technique codings like the order, SOAP narrative as four ``note`` annotations.
* Pain NRS before/after as two Observations (LOINC 72514-3, ``valueInteger`` 0-10 [V]), ``partOf`` the Procedure and
  ``basedOn`` the order; "before" is effective at the session start, "after" at its end, and each says so in
  ``note`` (coordination pairs them by time, the note is for people).
* The fulfilment Task is updated in the same transaction with ``PUT`` + ``If-Match`` (http.html#concurrency):
  one more ``output`` (type ``session`` -> the Procedure, with the Procedure's identifier in the Reference, so a
  re-read Task shows whether this session is already in), status ``in-progress`` or ``completed`` after the last
  authorized session. A retry after a lost answer fails the If-Match with 412 (FhirConflict): re-read the Task and
  ask ``session_recorded(task, draft_id)``; if true, the first attempt landed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..codes import (
    LOINC,
    NUCC,
    NUCC_MASSAGE_THERAPIST,
    OBSERVATION_CATEGORY,
    TASK_IO_SYSTEM,
    TECHNIQUE_CPT,
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
OBSERVATION_ID_SYSTEM = f"{IDENTIFIER_BASE}/session-observation"
PAIN_NRS = coding(LOINC, "72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported")  # [V]
STATUSES = ("completed", "not-done")
MAX_SESSION_MINUTES = 240
_TERMINAL_TASK = frozenset({"completed", "cancelled", "failed", "rejected", "entered-in-error"})


@dataclass(frozen=True)
class SessionNote:
    draft_id: str  # uuid the app assigns per note draft; identifiers of the session transaction derive from it
    order_ref: str  # ServiceRequest/..
    task_ref: str  # Task/.. (the order's fulfilment Task)
    patient_ref: str
    performer_ref: str  # PractitionerRole/.. or Practitioner/.. of the therapist
    start: datetime  # for not-done: when the session was due
    end: datetime | None = None
    status: str = "completed"  # completed | not-done
    status_reason: str = ""  # why not done (fever, new calf swelling, patient cancelled, ...)
    technique: str = ""  # the order's technique (one Procedure per technique: profiles, cpt 1..1 technique 1..1)
    sites: tuple[str, ...] = ()
    pressure: str | None = None
    position: str = ""
    response: str = ""  # how the patient responded ("tolerated well")
    adverse_events: tuple[str, ...] = ()
    pain_before: int | None = None  # NRS 0-10
    pain_after: int | None = None
    subjective: str = ""
    objective: str = ""
    assessment: str = ""
    plan: str = ""
    follow_up: str = ""
    task_version: str | None = None  # Task version the therapist saw (If-Match fallback)
    encounter_ref: str | None = None

    @property
    def minutes(self) -> int:
        if self.end is None:
            return 0
        return max(0, int((self.end - self.start).total_seconds() // 60))


def cpt_units(minutes: int) -> int:
    """Timed CPT units under the CMS 8-minute rule [V2, reference "Billing rules"]: < 8 min -> 0, 8-22 -> 1,
    23-37 -> 2, 38-52 -> 3, ... (each further unit needs 8 more minutes beyond the full 15-minute units)."""
    if minutes < 8:
        return 0
    return (minutes + 7) // 15


def session_cpt(note: SessionNote) -> str | None:
    known = TECHNIQUE_CPT.get(note.technique)
    return known[0] if known else None


def visit_units(notes: Sequence[SessionNote]) -> dict[str, int]:
    """CPT units per code for one visit (the completed notes of one patient on one day, one per technique), CMS
    way [V2, reference "Billing rules"]: the units come from the pooled minutes of all timed codes; each code
    gets its full 15-minute units, and the units left go to the codes with the most remaining minutes.
    E.g. 33 min of 97140 + 7 min of 97124 = 40 min = 3 units: 97140 x 2, 97124 x 1."""
    per_code: dict[str, int] = {}
    for n in notes:
        cpt = session_cpt(n)
        if n.status == "completed" and cpt:
            per_code[cpt] = per_code.get(cpt, 0) + n.minutes
    total = cpt_units(sum(per_code.values()))
    units = {c: m // 15 for c, m in per_code.items()}
    left = total - sum(units.values())
    by_rest = sorted(per_code, key=lambda c: (-(per_code[c] % 15), -per_code[c], c))
    for c in by_rest[:max(0, left)]:
        units[c] += 1
    return {c: u for c, u in units.items() if u}


def session_problems(note: SessionNote) -> dict[str, str]:
    """What stops this note from being written, field by field, in plain words (empty = none)."""
    out: dict[str, str] = {}
    if not note.draft_id:
        out["draft_id"] = "The note has no id; start a new note."
    for name, value, types, what in (
        ("order_ref", note.order_ref, ("ServiceRequest",), "order"),
        ("task_ref", note.task_ref, ("Task",), "order's task"),
        ("patient_ref", note.patient_ref, ("Patient",), "patient"),
        ("performer_ref", note.performer_ref, ("Practitioner", "PractitionerRole"), "therapist"),
    ):
        problem = ref_problem(value, types, what)
        if problem:
            out[name] = problem
    if not note.technique:
        out["technique"] = "Say which technique (of the order) the session was for."
    elif note.technique not in TECHNIQUES:
        out["technique"] = f"Unknown technique '{note.technique}'."
    if note.status not in STATUSES:
        out["status"] = "A session is either completed or not done."
    if not isinstance(note.start, datetime) or note.start.tzinfo is None:
        out["start"] = "The session start needs a date, a time and a time zone."
    if note.status == "not-done":
        if not note.status_reason.strip():
            out["status_reason"] = "Say why the session was not done."
    elif note.status == "completed":
        if note.end is None or not isinstance(note.end, datetime) or note.end.tzinfo is None:
            out["end"] = "The session end needs a date, a time and a time zone."
        elif "start" not in out and note.end <= note.start:
            out["end"] = "The session must end after it starts."
        elif "start" not in out and note.minutes > MAX_SESSION_MINUTES:
            out["end"] = f"{note.minutes} minutes is longer than any session; check the start and end times."
        if not note.sites:
            out["sites"] = "Say which body sites were treated."
        for name, value in (("pain_before", note.pain_before), ("pain_after", note.pain_after)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10):
                out[name] = "Pain is a whole number from 0 (no pain) to 10 (worst imaginable)."
    if note.sites:
        msgs = [m for m in (site_problem(s) for s in note.sites) if m]
        if msgs:
            out["sites"] = " ".join(msgs)
    if note.pressure is not None and note.pressure not in PRESSURES:
        out["pressure"] = f"Pressure is one of {', '.join(PRESSURES)}."
    return out


def _require_valid(note: SessionNote) -> None:
    problems = session_problems(note)
    if problems:
        raise InvalidInput("The session note is not complete: " + " ".join(problems.values()))


def _soap(note: SessionNote) -> list[str]:
    # SOAP as four annotations (reference "The session": note), the structure massage SOAP templates use
    # (product-anchors.md, MassageBook: S = complaint and pain, O = findings, A = assessment, P = plan).
    out = [f"{label}: {text.strip()}" for label, text in (
        ("S", note.subjective), ("O", note.objective), ("A", note.assessment), ("P", note.plan)) if text.strip()]
    details = []
    if note.pressure:
        details.append(f"{note.pressure.capitalize()} pressure")
    if note.position.strip():
        details.append(f"position: {note.position.strip()}")
    if details:
        out.append("Delivery: " + "; ".join(details) + ".")
    return out


def procedure(note: SessionNote, now: datetime, *,
              body_structure_refs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The session as a Procedure (MassageProcedure). Raises InvalidInput if ``session_problems`` is not empty."""
    _require_valid(note)
    sites = [s for s in (parse_site(v) for v in note.sites) if s is not None]
    proc: dict[str, Any] = {"resourceType": "Procedure", "meta": meta("Procedure")}
    extensions = target_body_structures(sites, body_structure_refs)
    if extensions:
        proc["extension"] = extensions
    proc["identifier"] = [identifier(SESSION_ID_SYSTEM, note.draft_id)]
    proc["basedOn"] = [ref(note.order_ref)]
    proc["status"] = note.status
    if note.status == "not-done":
        proc["statusReason"] = {"text": note.status_reason.strip()}
    proc["category"] = {"coding": [CATEGORY_PT], "text": "Medical massage"}
    proc["code"] = {"coding": technique_codings(note.technique), "text": code_text(note.technique, sites)}
    proc["subject"] = ref(note.patient_ref)
    if note.encounter_ref:
        proc["encounter"] = ref(note.encounter_ref)
    if note.status == "completed":
        proc["performedPeriod"] = {"start": instant(note.start), "end": instant(note.end)}  # type: ignore[arg-type]
    else:
        # When the session was due (the plan view needs a date for "not done, and why"); a Period because our
        # profile allows only Period (performed[x] 1..1), with no end: nothing was performed.
        proc["performedPeriod"] = {"start": instant(note.start)}
    proc["recorder"] = ref(note.performer_ref)
    proc["performer"] = [{"function": {"coding": [coding(NUCC, NUCC_MASSAGE_THERAPIST, "Massage Therapist")]},
                          "actor": ref(note.performer_ref)}]
    if sites:
        proc["bodySite"] = [body_site(s) for s in sites]
    if note.response.strip():
        proc["outcome"] = {"text": note.response.strip()}
    if note.adverse_events:
        proc["complication"] = [{"text": e.strip()} for e in note.adverse_events if e.strip()]
    if note.follow_up.strip():
        proc["followUp"] = [{"text": note.follow_up.strip()}]
    texts = _soap(note)
    if texts:
        proc["note"] = [annotation(t, author_ref=note.performer_ref, time=now) for t in texts]
    return proc


def pain_observations(note: SessionNote, procedure_ref: str, *, now: datetime) -> list[dict[str, Any]]:
    """Pain NRS before and after the session (those given), ``partOf`` the Procedure, ``basedOn`` the order.

    Category ``survey`` [B]: a patient-reported score is an assessment, not a vital sign (the vital-signs category
    carries US Core's vital-sign profiles and their fixed codes). The patient is the performer: 72514-3 is the
    *reported* score."""
    if note.status != "completed":
        return []
    out = []
    for which, value, when, words in (("before", note.pain_before, note.start, "Before the session"),
                                      ("after", note.pain_after, note.end, "After the session")):
        if value is None:
            continue
        out.append({
            "resourceType": "Observation",
            "meta": meta("Observation"),
            "identifier": [identifier(OBSERVATION_ID_SYSTEM, f"{note.draft_id}:pain-{which}")],
            "basedOn": [ref(note.order_ref)],
            "partOf": [ref(procedure_ref)],
            "status": "final",
            "category": [{"coding": [coding(OBSERVATION_CATEGORY, "survey", "Survey")]}],
            "code": {"coding": [PAIN_NRS], "text": f"Pain (0-10), {which} massage"},
            "subject": ref(note.patient_ref),
            "effectiveDateTime": instant(when),  # type: ignore[arg-type]
            "issued": instant(now),
            "performer": [ref(note.patient_ref)],
            "valueInteger": value,
            "note": [{"text": words}],
        })
    return out


def session_recorded(task: Mapping[str, Any], draft_id: str) -> bool:
    """Whether ``task`` already lists the session written from note ``draft_id`` (see the module doc)."""
    for o in task.get("output") or []:
        if not isinstance(o, Mapping):
            continue
        ident = (o.get("valueReference") or {}).get("identifier") or {}
        if ident.get("system") == SESSION_ID_SYSTEM and ident.get("value") == draft_id:
            return True
    return False


def _task_version(task: Mapping[str, Any], note: SessionNote) -> str:
    version = (task.get("meta") or {}).get("versionId") or note.task_version
    if not version:
        raise InvalidInput("The order's task has no version; read it again before documenting the session.")
    return str(version)


def task_after_session(task: Mapping[str, Any], note: SessionNote, procedure_ref: str, now: datetime) -> dict:
    """The fulfilment Task with this session added (a new dict; the input is not changed)."""
    status = task.get("status")
    if status in _TERMINAL_TASK:
        raise InvalidInput(f"The order's task is {status}; no more sessions can be documented against it. "
                           "Ask the physician to renew the order.")
    total = (task.get("restriction") or {}).get("repetitions")
    done = sum(1 for o in task.get("output") or [] if _output_type(o) == OUTPUT_SESSION)
    if note.status == "completed" and isinstance(total, int) and done >= total:
        raise InvalidInput(f"All {total} authorized sessions are documented; ask the physician to renew the order.")
    updated = copy.deepcopy(dict(task))
    kind = OUTPUT_SESSION if note.status == "completed" else OUTPUT_SESSION_NOT_DONE
    label = "Session" if kind == OUTPUT_SESSION else "Session not done"
    updated.setdefault("output", []).append({
        "type": {"coding": [coding(TASK_IO_SYSTEM, kind, label)]},
        "valueReference": {"reference": procedure_ref,
                           "identifier": identifier(SESSION_ID_SYSTEM, note.draft_id)},
    })
    if note.status == "completed":
        done += 1
        updated["status"] = "completed" if isinstance(total, int) and done >= total else "in-progress"
    updated["businessStatus"] = business_status(done, total if isinstance(total, int) else None)
    updated["lastModified"] = instant(now)
    updated.pop("text", None)  # a stale narrative would contradict the new counts
    return updated


def session_urns(draft_id: str) -> dict[str, str]:
    return {"procedure": urn("session", draft_id),
            "pain-before": urn("session-pain-before", draft_id), "pain-after": urn("session-pain-after", draft_id)}


def session_transaction(note: SessionNote, task: Mapping[str, Any], now: datetime, *,
                        app_version: str | None = None, body_structures: bool = False,
                        provenance_mode: str = "put") -> dict[str, Any]:
    """ONE transaction Bundle: [BodyStructures], Procedure, pain Observations, the Task update (PUT, If-Match),
    Provenance (PUT with a derived id, see order.provenance_entry). ``task`` is the current Task resource as read
    (with ``id`` and ``meta.versionId``). ``body_structures``: as in order_transaction (off by default).
    If the Task already lists this session the Bundle leaves the Task alone (the creates are no-ops on retry)."""
    _require_valid(note)
    task_id = task.get("id")
    if task.get("resourceType") != "Task" or not task_id:
        raise InvalidInput("The order's task must be the Task as read from the EHR (with its id).")
    if note.task_ref != f"Task/{task_id}":
        raise InvalidInput(f"The note is for {note.task_ref} but the task given is Task/{task_id}.")
    urns = session_urns(note.draft_id)
    sites = [s for s in (parse_site(v) for v in note.sites) if s is not None]
    bs_entries, bs_refs = body_structure_entries(sites, note.patient_ref) if body_structures else ([], {})
    proc = procedure(note, now, body_structure_refs=bs_refs)
    written: list[tuple[str, dict[str, Any]]] = [(e["fullUrl"], e["resource"]) for e in bs_entries]
    written.append((urns["procedure"], proc))
    for obs in pain_observations(note, urns["procedure"], now=now):
        which = obs["identifier"][0]["value"].rsplit(":", 1)[1]
        written.append((urns[which], obs))
    entries = [conditional_create(r, u) for u, r in written]
    targets = [{"reference": u, "identifier": dict(r["identifier"][0])} for u, r in written]
    if not session_recorded(task, note.draft_id):
        version = _task_version(task, note)
        updated = task_after_session(task, note, urns["procedure"], now)
        entries.append(request_entry("PUT", f"Task/{task_id}", updated, full_url=None, if_match=version))
        targets.append({"reference": f"Task/{task_id}"})
    prov = provenance(targets, author_ref=note.performer_ref, now=now, activity="CREATE", app_version=app_version)
    entries.append(provenance_entry(prov, f"session/{note.draft_id}", mode=provenance_mode,
                                    key=proc["identifier"][0]))
    return transaction_bundle(entries)


__all__ = [
    "SESSION_ID_SYSTEM", "OBSERVATION_ID_SYSTEM", "PAIN_NRS", "SessionNote", "cpt_units", "visit_units", "session_cpt", "session_problems", "procedure", "pain_observations", "session_transaction",
    "session_recorded", "task_after_session", "session_urns",
]
