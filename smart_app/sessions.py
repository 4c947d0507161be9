"""Therapist documentation (issue 7): the worklist of massage orders, the point-of-care re-screen, the session
note (drafted on the server while it is typed, written once), and messages to the ordering physician.

Pages (all under the launch, ``/p/<lsid>/sessions``; therapists only):

* ``GET  /``                     the patient's active massage plans (the per-technique orders of one requisition,
                                 grouped as plan_view.group_plans does) with their fulfilment Tasks and message
                                 threads; held plans ("On hold", the physician's reason, the messages, no "Document
                                 a session"); completed and revoked ones as a short "Past orders" list: ONE batch
                                 request (ServiceRequest search with ``_revinclude=Task:focus``, Communications).
                                 A session on an order that is not active is refused (``closed_order_text``).
* ``GET  /<order_id>``           the plan of that order (any of its orders leads to the same page), the re-screen
                                 for the union of the plan's techniques and sites ("new since the order" first) and
                                 ONE note for the visit, prefilled from the server-side draft. ONE batch request: the
                                 patient's orders with their Tasks, DetectedIssues and Communications, and the chart
                                 searches screening needs.
* ``POST /<order_id>``           ``action=save`` keeps the draft (the no-JavaScript path); ``action=submit`` keeps
                                 the draft first, then writes the visit in one transaction (one Procedure per
                                 technique used, the pain scores once, every involved Task +1); the draft is
                                 deleted only after the EHR confirmed it.
* ``POST /<order_id>/draft``     autosave (sessions.js, JSON answer), same draft rules.
* ``POST /<order_id>/discard``   throw the draft away.
* ``POST /<order_id>/message``   a Communication to the ordering physician (progress, change in condition,
                                 request), optionally ``inResponseTo`` a message of the thread.

Drafts are keyed by (EHR, author, patient, plan): the plan is its requisition (or the order when it has none);
the page sends the plan key back with every autosave, so an autosave needs no EHR round trip.

Techniques: the note offers the plan's ordered techniques only (builders.session: a technique without an order
has nothing to be ``basedOn`` and was not re-screened); the therapist asks the physician to add another.

The pure helpers (order summary, plan grouping, new-since-order, form -> VisitNote, threads) take plain data and no Flask
globals, so tests/unit/test_sessions_*.py exercise them directly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlencode

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for

from fhir_massage import chart as chart_mod
from fhir_massage import screening as screening_mod
from fhir_massage.builders.detected_issue import RULE_IDENTIFIER_SYSTEM
from fhir_massage.builders.messages import CATEGORIES as MESSAGE_CATEGORIES
from fhir_massage.builders.messages import MESSAGE_ID_SYSTEM, communication
from fhir_massage.builders.order import ORDER_DETAIL_SYSTEM, sessions_done
from fhir_massage.builders.session import (VISIT_ID_SYSTEM, SessionNote, VisitNote, VisitOrder, cpt_units,
                                           session_recorded, technique_cpt, visit_cpt_minutes, visit_problems,
                                           visit_transaction, visit_units)
from fhir_massage.chart_fetch import batch_patient, chart_searches
from fhir_massage.codes import TECHNIQUE_DISPLAY, TECHNIQUE_SYSTEM, TECHNIQUES
from fhir_massage.errors import FhirAuthError, FhirConflict, FhirError, InvalidInput, LaunchError
from fhir_massage.fhir import FhirResult, batch_bundle, entry_outcomes, request_entry, resources
from fhir_massage.knowledge import load_kb
from fhir_massage.orders_model import LATERALITIES, PRESSURES, is_lateralizable, parse_site
from fhir_massage.plan_view import requisition_of
from fhir_massage.writes import PartialWrite, batch_or_each, raise_conflict

from . import errors, identity, writes
from .forms import review_label
from .drafts import DraftAlreadyWritten, DraftError, DraftKey, DraftStore, is_draft_id, new_draft_id
from .launch import LaunchContext, fhir_client, require_launch

log = logging.getLogger("smart_app.sessions")

bp = Blueprint("sessions", __name__, url_prefix="/p/<lsid>/sessions")

_ORDER_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR id (datatypes.html#id)
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_PAIN = re.compile(r"^\d{1,2}$")
ABSOLUTE_STOP = ("absolute", "local")  # an applicable finding of these classes stops the ordered session

# The note form's fields (what a draft keeps). Lists are multi-value fields.
def minutes_field(technique: str) -> str:
    """The form field for a technique's minutes (draft field names allow no hyphen)."""
    return "minutes_" + technique.replace("-", "_")


TEXT_FIELDS = ("status", "status_reason", "date", "start", "end", "tz", "pressure", "position",
               "response", "adverse_events", "pain_before", "pain_after", "subjective", "objective", "assessment",
               "plan", "follow_up") + tuple(minutes_field(t) for t in TECHNIQUES)
LIST_FIELDS = ("sites", "techniques")
_PLAN_KEY = re.compile(r"^[\x21-\x7e]{1,300}$")  # a requisition key or an order reference, printable ASCII


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: orders and tasks


def order_technique(sr: Mapping[str, Any]) -> str | None:
    for c in (sr.get("code") or {}).get("coding") or []:
        if isinstance(c, Mapping) and c.get("system") == TECHNIQUE_SYSTEM and c.get("code") in TECHNIQUES:
            return c["code"]
    return None


def is_massage_order(sr: Mapping[str, Any]) -> bool:
    return sr.get("resourceType") == "ServiceRequest" and order_technique(sr) is not None \
        and sr.get("intent") in ("order", "original-order", "filler-order", "instance-order")


def site_key(body_site: Mapping[str, Any]) -> str | None:
    """Our site key (``CODE`` or ``CODE:side``) from a bodySite written by builders.order.body_site: the SNOMED
    coding gives the structure, ``text`` the side (Site.text: "Left lower leg", "Lower leg, both sides")."""
    code = None
    for c in body_site.get("coding") or []:
        if isinstance(c, Mapping) and c.get("system") == "http://snomed.info/sct" and c.get("code") in load_kb().sites:
            code = c["code"]
            break
    if code is None:
        return None
    if not is_lateralizable(code):
        return code
    text = str(body_site.get("text") or "").strip().lower()
    if text.endswith("both sides") or text.startswith("bilateral"):
        return f"{code}:bilateral"
    for side in ("left", "right"):
        if text.startswith(side):
            return f"{code}:{side}"
    return None  # a side we cannot tell: the therapist picks it


def _texts(items: Any) -> list[str]:
    return [str(i["text"]).strip() for i in items or [] if isinstance(i, Mapping) and str(i.get("text") or "").strip()]


@dataclass(frozen=True)
class OrderSummary:
    id: str
    ref: str
    technique: str | None
    technique_label: str
    title: str
    sites: tuple[str, ...]  # site keys
    site_texts: tuple[str, ...]
    details: tuple[str, ...]  # orderDetail texts (schedule, pressure, positioning)
    precautions: tuple[str, ...]  # pressure / positioning details only
    notes: tuple[str, ...]  # the physician's notes
    patient_instruction: str
    authored: str | None
    requester: str | None
    requester_name: str | None
    status: str
    task: Mapping[str, Any] | None
    task_ref: str | None
    done: int
    total: int | None
    task_status: str | None
    finding_refs: tuple[str, ...]  # supportingInfo DetectedIssues
    pressure: str | None = None  # ordered pressure (orderDetail pressure-<level>), the note's default

    @property
    def progress(self) -> str:
        if self.total:
            return f"{self.done} of {self.total} sessions done"
        return f"{self.done} sessions done"

    @property
    def all_done(self) -> bool:
        return bool(self.total) and self.done >= (self.total or 0)


def practitioner_names(found: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """"Practitioner/x" -> display name, from Practitioners included in a search (``_include=...:requester``)."""
    out = {}
    for r in found:
        if isinstance(r, Mapping) and r.get("resourceType") == "Practitioner" and r.get("id"):
            name = identity.human_name(r)
            if name:
                out[f"Practitioner/{r['id']}"] = name
    return out


def order_summary(sr: Mapping[str, Any], task: Mapping[str, Any] | None,
                  names: Mapping[str, str] | None = None) -> OrderSummary:
    technique = order_technique(sr)
    keys, texts = [], []
    for bs in sr.get("bodySite") or []:
        if not isinstance(bs, Mapping):
            continue
        k = site_key(bs)
        if k:
            keys.append(k)
        texts.append(str(bs.get("text") or k or "unnamed site"))
    details, precautions = [], []
    pressure = None
    for d in sr.get("orderDetail") or []:
        if not isinstance(d, Mapping) or not d.get("text"):
            continue
        details.append(str(d["text"]))
        codes = [c.get("code") for c in d.get("coding") or [] if isinstance(c, Mapping)
                 and c.get("system") == ORDER_DETAIL_SYSTEM]
        if any(str(c).startswith(("pressure", "positioning")) for c in codes):
            precautions.append(str(d["text"]))
        for c in codes:
            if str(c).startswith("pressure-") and str(c)[9:] in PRESSURES:
                pressure = str(c)[9:]
    requester = (sr.get("requester") or {}).get("reference")
    total = None
    if task is not None:
        reps = (task.get("restriction") or {}).get("repetitions")
        total = reps if isinstance(reps, int) else None
    if total is None:
        q = (sr.get("quantityQuantity") or {}).get("value")
        total = int(q) if isinstance(q, (int, float)) else None
    return OrderSummary(
        id=str(sr.get("id")), ref=f"ServiceRequest/{sr.get('id')}", technique=technique,
        technique_label=TECHNIQUE_DISPLAY.get(technique or "", "Unknown technique"),
        title=str((sr.get("code") or {}).get("text") or TECHNIQUE_DISPLAY.get(technique or "", "Massage order")),
        sites=tuple(keys), site_texts=tuple(texts), details=tuple(details), precautions=tuple(precautions),
        notes=tuple(_texts(sr.get("note"))), patient_instruction=str(sr.get("patientInstruction") or ""),
        authored=sr.get("authoredOn"), requester=requester,
        requester_name=(sr.get("requester") or {}).get("display") or (names or {}).get(requester or ""),
        status=str(sr.get("status") or ""),
        task=task, task_ref=f"Task/{task['id']}" if task and task.get("id") else None,
        done=sessions_done(task) if task else 0, total=total, task_status=(task or {}).get("status"),
        finding_refs=tuple(r["reference"] for r in sr.get("supportingInfo") or []
                           if isinstance(r, Mapping) and str(r.get("reference") or "").startswith("DetectedIssue/")),
        pressure=pressure,
    )


def pair_orders_and_tasks(found: Iterable[Mapping[str, Any]]) -> list[tuple[dict, dict | None]]:
    """(ServiceRequest, its fulfilment Task) from a search answer with ``_revinclude=Task:focus``. When an order has
    several Tasks (a re-issued Task), the open one wins, then the latest."""
    orders = [dict(r) for r in found if isinstance(r, Mapping) and is_massage_order(r)]
    tasks: dict[str, list[dict]] = {}
    for r in found:
        if isinstance(r, Mapping) and r.get("resourceType") == "Task":
            focus = (r.get("focus") or {}).get("reference")
            if focus:
                tasks.setdefault(str(focus), []).append(dict(r))
    out = []
    for sr in orders:
        mine = tasks.get(f"ServiceRequest/{sr.get('id')}") or []
        mine.sort(key=lambda t: (t.get("status") not in ("completed", "cancelled", "failed", "entered-in-error"),
                                 str(t.get("lastModified") or t.get("authoredOn") or "")), reverse=True)
        out.append((sr, mine[0] if mine else None))
    out.sort(key=lambda p: str(p[0].get("authoredOn") or ""), reverse=True)
    return out


def _visits_on(task: Mapping[str, Any] | None) -> set[str]:
    """The visits a fulfilment Task counts (its ``session`` outputs), by the note's draft id when the output's
    identifier carries it (``<draft id>:<technique>``), else by the Procedure reference."""
    out: set[str] = set()
    for o in (task or {}).get("output") or []:
        if not isinstance(o, Mapping):
            continue
        if not any(isinstance(c, Mapping) and c.get("code") == "session"
                   for c in (o.get("type") or {}).get("coding") or []):
            continue
        vref = o.get("valueReference") or {}
        value = (vref.get("identifier") or {}).get("value")
        if isinstance(value, str) and value:
            out.add("visit:" + value.split(":", 1)[0])
        elif vref.get("reference"):
            out.add(str(vref["reference"]))
    return out


_OPEN_TASK = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")


@dataclass(frozen=True)
class PlanSummary:
    """The orders of one plan (one ``requisition``; an order without one is a plan of its own), one per technique,
    as the therapist documents them: one visit at a time. Attribute names follow OrderSummary where they mean the
    same, so the pages and the re-screen read either."""

    key: str  # requisition key (plan_view.requisition_of) or the order reference
    orders: tuple[OrderSummary, ...]  # the plan's orders, in TECHNIQUES order

    @property
    def lead(self) -> OrderSummary:
        return self.orders[0]

    @property
    def id(self) -> str:
        return self.lead.id

    @property
    def ref(self) -> str:
        return self.lead.ref

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(o.ref for o in self.orders)

    @property
    def techniques(self) -> tuple[str, ...]:
        return tuple(o.technique for o in self.orders if o.technique)

    @property
    def technique(self) -> str | None:
        return self.lead.technique

    @property
    def technique_label(self) -> str:
        return " + ".join(o.technique_label for o in self.orders)

    @property
    def title(self) -> str:
        return self.lead.title if len(self.orders) == 1 else self.technique_label

    def _union(self, name: str) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(v for o in self.orders for v in getattr(o, name)))

    @property
    def sites(self) -> tuple[str, ...]:
        return self._union("sites")

    @property
    def site_texts(self) -> tuple[str, ...]:
        return self._union("site_texts")

    @property
    def details(self) -> tuple[str, ...]:
        return self._union("details")

    @property
    def precautions(self) -> tuple[str, ...]:
        return self._union("precautions")

    @property
    def notes(self) -> tuple[str, ...]:
        return self._union("notes")

    @property
    def finding_refs(self) -> tuple[str, ...]:
        return self._union("finding_refs")

    @property
    def patient_instruction(self) -> str:
        return next((o.patient_instruction for o in self.orders if o.patient_instruction), "")

    @property
    def authored(self) -> str | None:
        dates = [o.authored for o in self.orders if o.authored]
        return min(dates) if dates else None

    @property
    def requester_name(self) -> str | None:
        return next((o.requester_name for o in self.orders if o.requester_name), None)

    @property
    def pressure(self) -> str | None:
        return next((o.pressure for o in self.orders if o.pressure), None)

    @property
    def done(self) -> int:
        """Visits documented: one visit counts once however many of the plan's techniques it gave."""
        visits: set[str] = set()
        for o in self.orders:
            visits |= _visits_on(o.task)
        return len(visits)

    @property
    def total(self) -> int | None:
        totals = [o.total for o in self.orders if o.total]
        return max(totals) if totals else None

    @property
    def progress(self) -> str:
        if self.total:
            return f"{self.done} of {self.total} sessions done"
        return f"{self.done} sessions done"

    @property
    def all_done(self) -> bool:
        return all(o.all_done for o in self.orders)

    @property
    def task_status(self) -> str | None:
        statuses = [o.task_status for o in self.orders if o.task_status]
        if not statuses:
            return None
        return statuses[0] if len(set(statuses)) == 1 else "mixed"

    @property
    def open_techniques(self) -> tuple[str, ...]:
        """Techniques a completed visit can still be counted against (an open Task with sessions left)."""
        return tuple(o.technique for o in self.orders if o.technique and o.task is not None and not o.all_done
                     and (o.task_status or "") in _OPEN_TASK)

    @property
    def status(self) -> str:
        """The plan's order status: active when any of its orders is (the others are then shown per technique),
        else the lead order's (on-hold, completed, revoked)."""
        statuses = [o.status for o in self.orders]
        return "active" if "active" in statuses else (self.lead.status or "unknown")

    @property
    def status_label(self) -> str:
        return ORDER_STATUS_WORDS.get(self.status, self.status.replace("-", " ").capitalize())

    @property
    def hold_reason(self) -> str | None:
        """The physician's reason for the latest hold: the last ``On hold: ...`` note (R4 ServiceRequest has no
        statusReason, so builders/plan.py order_status_update writes it as a note), None when none was given."""
        return _status_reason(self.orders, "On hold: ")

    @property
    def status_reason(self) -> str | None:
        """The physician's reason for the current status (hold, revoke or complete), when one was given."""
        prefix = {"on-hold": "On hold: ", "revoked": "Revoked: ", "completed": "Completed: "}.get(self.status)
        return _status_reason(self.orders, prefix) if prefix else None

    def technique_rows(self) -> list[tuple[OrderSummary, str]]:
        """(order, "3 of 8 sessions") per technique, for the per-technique details."""
        return [(o, f"{o.done} of {o.total}" if o.total else str(o.done)) for o in self.orders]


# ServiceRequest.status (request-status) in the words a therapist reads on the worklist
ORDER_STATUS_WORDS = {"active": "Active", "on-hold": "On hold", "completed": "Completed", "revoked": "Revoked",
                      "draft": "Draft", "entered-in-error": "Entered in error", "unknown": "Unknown status"}
# what the worklist lists: active plans to document, held ones to see (with the reason), and past ones in short
WORKLIST_STATUSES = ("active", "on-hold", "completed", "revoked")


def _status_reason(orders: Sequence[OrderSummary], prefix: str) -> str | None:
    for o in orders:
        for n in reversed(o.notes):
            if n.startswith(prefix) and n[len(prefix):].strip():
                return n[len(prefix):].strip()
    return None


def split_worklist(plans: Iterable[PlanSummary]) -> tuple[list[PlanSummary], list[PlanSummary], list[PlanSummary]]:
    """(active, on hold, past) plans; a draft or entered-in-error order is not the therapist's business."""
    active, held, past = [], [], []
    for plan in plans:
        {"active": active, "on-hold": held}.get(plan.status, past if plan.status in ("completed", "revoked")
                                                else []).append(plan)
    return active, held, past


def _technique_rank(o: OrderSummary) -> tuple[int, str]:
    return (TECHNIQUES.index(o.technique) if o.technique in TECHNIQUES else len(TECHNIQUES), o.id)


def group_orders(pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                 names: Mapping[str, str] | None = None) -> list[PlanSummary]:
    """Plans from (order, Task) pairs: the orders of one ``requisition`` together (plan_view.requisition_of), an
    order without one on its own; newest plan first (the pairs' order)."""
    groups: dict[str, list[OrderSummary]] = {}
    for sr, task in pairs:
        key = requisition_of(sr) or f"ServiceRequest/{sr.get('id')}"
        groups.setdefault(key, []).append(order_summary(sr, task, names))
    return [PlanSummary(key, tuple(sorted(orders, key=_technique_rank))) for key, orders in groups.items()]


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: the re-screen


@dataclass(frozen=True)
class Rescreen:
    """The screening of the chart now, split into what is new since the order and what the physician saw."""

    screening: screening_mod.Screening | None
    new: tuple[tuple[screening_mod.Finding, str], ...] = ()  # (finding, why it counts as new)
    known: tuple[screening_mod.Finding, ...] = ()
    stop: tuple[screening_mod.Finding, ...] = ()  # applicable absolute/local findings: do not do the session as ordered
    warnings: tuple[str, ...] = ()
    error: str | None = None
    # for the therapist, whatever the order says: an allergy to a massage product (latex, nut oils, fragrance) from
    # the chart as it is now (screening.information); never "new", never a reason to stop
    information: tuple[screening_mod.Finding, ...] = ()

    @property
    def clear(self) -> bool:
        return self.screening is not None and not self.new and not self.stop


def _date_of(value: Any) -> date | None:
    parsed = chart_mod.parse_date(value)
    return parsed[0] if parsed else None


def known_findings(issues: Iterable[Mapping[str, Any]], refs: Iterable[str]) -> dict[str, set[str]]:
    """rule id -> evidence references, for the DetectedIssues the order carries in supportingInfo."""
    wanted = set(refs)
    out: dict[str, set[str]] = {}
    for di in issues:
        if f"DetectedIssue/{di.get('id')}" not in wanted:
            continue
        rules = [i.get("value") for i in di.get("identifier") or []
                 if isinstance(i, Mapping) and i.get("system") == RULE_IDENTIFIER_SYSTEM]
        evidence = {d.get("reference") for e in di.get("evidence") or [] for d in e.get("detail") or []
                    if isinstance(d, Mapping) and d.get("reference")}
        evidence |= {i.get("reference") for i in di.get("implicated") or [] if isinstance(i, Mapping)
                     and i.get("reference") and not str(i["reference"]).startswith("ServiceRequest/")}
        for rule in rules:
            if rule:
                out.setdefault(str(rule), set()).update(str(e) for e in evidence)
    return out


def rescreen(screening: screening_mod.Screening, order: OrderSummary | PlanSummary,
             issues: Iterable[Mapping[str, Any]]) -> Rescreen:
    """A finding is *new since the order* when its evidence is dated after the order's authoredOn, or when it is
    not among the DetectedIssues the order was signed with (another rule, or the same rule on other evidence:
    a second DVT is news even if the first was known). Dates compare by day: a same-day reading is caught by the
    second test unless the physician already saw it."""
    authored = _date_of(order.authored)
    known = known_findings(issues, order.finding_refs)
    new: list[tuple[screening_mod.Finding, str]] = []
    old: list[screening_mod.Finding] = []
    information = list(getattr(screening, "information", ()) or ())
    for f in screening.findings:
        if f.informational:  # screen() lists these under information; a screening built elsewhere may not
            information.append(f)
            continue
        later = []
        for ev in f.details:
            for label, value in ev.dates.items():
                d = _date_of(value)
                if d is not None and authored is not None and d > authored and label != "abatement":
                    later.append(f"{ev.display}: {label} {value}")
        if later:
            new.append((f, "Dated after the order (" + authored.isoformat() + "): " + "; ".join(later) + "."))
        elif f.rule not in known:
            new.append((f, "Not among the findings the physician saw when signing the order."))
        elif not set(f.evidence) <= known[f.rule]:
            new.append((f, "The same concern on new evidence the physician did not see."))
        else:
            old.append(f)
    applicable = set(screening.applicable)
    stop = tuple(f for f in screening.findings if f.rule in applicable and f.cls in ABSOLUTE_STOP
                 and not f.informational)
    new.sort(key=lambda p: (p[0] not in stop, p[0].cls != "absolute"))
    return Rescreen(screening=screening, new=tuple(new), known=tuple(old), stop=stop,
                    warnings=tuple(screening.warnings), information=tuple(information))


def finding_message_text(findings: Sequence[screening_mod.Finding], order: OrderSummary | PlanSummary,
                         today: date) -> str:
    """The pre-filled message to the physician about findings of the re-screen."""
    lines = [f"Re-screen before the {order.technique_label.lower()} session on {today.isoformat()} "
             f"(order of {str(order.authored or '')[:10]}):"]
    for f in findings:
        ev = "; ".join(d.summary() for d in f.details)
        shown = f" Evidence: {ev}." if ev and "Evidence:" not in f.message else ""  # some rule messages quote it
        lines.append(f"- {f.title or f.rule} [{f.rule}, {f.cls}]: {f.message}{shown}")
    lines.append("I have not given the session as ordered. Please review and advise (clearance, a change of "
                 "technique or site, or holding the order).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: the note form


def site_choices(order_sites: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(key, label, ordered) for the site picker: the order's sites first, then every site we can name, each
    lateralizable one as left / right / both sides. (The shared body diagram replaces this list when it lands.)"""
    out: list[tuple[str, str, bool]] = []
    seen = set()
    for k in order_sites:
        s = parse_site(k)
        if s and k not in seen:
            out.append((k, s.text, True))
            seen.add(k)
    for code, info in load_kb().sites.items():
        keys = [f"{code}:{side}" for side in LATERALITIES] if info.lateralizable else [code]
        for k in keys:
            if k in seen:
                continue
            s = parse_site(k)
            if s:
                out.append((k, s.text, False))
                seen.add(k)
    return out


def form_fields(form: Any) -> dict[str, Any]:
    """The note's fields from a request form (MultiDict) or a plain dict."""
    out: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = form.get(name) if hasattr(form, "get") else None
        if value is not None:
            out[name] = str(value)
    for name in LIST_FIELDS:
        if hasattr(form, "getlist"):
            out[name] = [str(v) for v in form.getlist(name)]
        else:
            v = form.get(name)
            out[name] = [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else [])
    return out


def default_fields(plan: PlanSummary, now: datetime) -> dict[str, Any]:
    """A new visit note: every technique that can still be counted ticked, the plan's sites, its pressure."""
    return {"status": "completed", "techniques": list(plan.open_techniques or plan.techniques),
            "sites": list(plan.sites), "pressure": plan.pressure or "", "date": now.date().isoformat(), "tz": "0"}


def _tz(value: str | None) -> tuple[timezone | None, str | None]:
    """The browser's UTC offset in minutes east (sessions.js fills it); absent = UTC."""
    if value in (None, ""):
        return timezone.utc, None
    try:
        minutes = int(str(value))
    except ValueError:
        return None, "The time zone sent with the form is not valid; reload the page."
    if not -14 * 60 <= minutes <= 14 * 60:
        return None, "The time zone sent with the form is not valid; reload the page."
    return timezone(timedelta(minutes=minutes)), None


def _at(day: date, hhmm: str, tz: timezone) -> datetime | None:
    m = _TIME.match(hhmm.strip())
    if not m:
        return None
    return datetime.combine(day, dtime(int(m.group(1)), int(m.group(2))), tzinfo=tz)


_ORDER_PROBLEM = {"orders": "order", "order_ref": "order", "task_ref": "order", "performer_ref": "order",
                  "patient_ref": "order", "draft_id": "order"}


def note_from_fields(fields: Mapping[str, Any], *, draft_id: str, plan: PlanSummary | OrderSummary,
                     patient_ref: str, performer_ref: str, now: datetime) -> tuple[VisitNote | None, dict[str, str]]:
    """(VisitNote, problems by form field). Problems are in plain words; the note is None when the form cannot
    even be read into one (no date, bad times). ``plan``: the visit's plan (an OrderSummary is a plan of one)."""
    if isinstance(plan, OrderSummary):
        plan = PlanSummary(plan.ref, (plan,))
    problems: dict[str, str] = {}
    get = lambda k: str(fields.get(k) or "").strip()  # noqa: E731
    status = get("status") or "completed"
    tz, tz_problem = _tz(get("tz"))
    if tz_problem:
        problems["tz"] = tz_problem
        tz = timezone.utc
    assert tz is not None
    try:
        day = date.fromisoformat(get("date")) if get("date") else now.astimezone(tz).date()
    except ValueError:
        problems["date"] = "Give the session date as YYYY-MM-DD."
        day = now.astimezone(tz).date()
    start = _at(day, get("start"), tz) if get("start") else None
    end = _at(day, get("end"), tz) if get("end") else None
    if get("start") and start is None:
        problems["start"] = "Give the start time as HH:MM (24-hour clock)."
    if get("end") and end is None:
        problems["end"] = "Give the end time as HH:MM (24-hour clock)."
    if status == "completed":
        if start is None and "start" not in problems:
            problems["start"] = "When did the session start?"
        if end is None and "end" not in problems:
            problems["end"] = "When did the session end?"
    if start is None:
        # not done: when it was due (the date, at the time of writing if no time was given)
        start = datetime.combine(day, now.astimezone(tz).timetz().replace(second=0, microsecond=0))
    pains: dict[str, int | None] = {}
    for name in ("pain_before", "pain_after"):
        raw = get(name)
        if not raw:
            pains[name] = None
        elif _PAIN.match(raw) and 0 <= int(raw) <= 10:
            pains[name] = int(raw)
        else:
            problems[name] = "Pain is a whole number from 0 (no pain) to 10 (worst imaginable)."
            pains[name] = None
    raw_techniques = fields.get("techniques")
    if raw_techniques is None and get("technique"):  # a draft from before visit notes (one technique)
        raw_techniques = [get("technique")]
    techniques = tuple(dict.fromkeys(t for t in (raw_techniques or []) if isinstance(t, str) and t))
    minutes: list[tuple[str, int]] = []
    for t in techniques:
        raw = get(minutes_field(t)) if t in TECHNIQUES else ""
        if not raw:
            continue
        if raw.isdigit() and int(raw) <= 24 * 60:
            minutes.append((t, int(raw)))
        else:
            problems.setdefault("minutes", "Minutes per technique are whole numbers.")
    pressure = get("pressure") or None
    sites = tuple(s for s in (fields.get("sites") or []) if isinstance(s, str) and s)
    orders = tuple(VisitOrder(o.technique, o.ref, o.task_ref or "") for o in plan.orders if o.technique)
    note = VisitNote(
        draft_id=draft_id, orders=orders, patient_ref=patient_ref, performer_ref=performer_ref, start=start,
        end=end if status == "completed" else None, status=status, status_reason=get("status_reason"),
        techniques=techniques if status == "completed" else (), technique_minutes=tuple(minutes), sites=sites,
        pressure=pressure, position=get("position"), response=get("response"),
        adverse_events=tuple(line.strip() for line in get("adverse_events").splitlines() if line.strip()),
        pain_before=pains["pain_before"], pain_after=pains["pain_after"], subjective=get("subjective"),
        objective=get("objective"), assessment=get("assessment"), plan=get("plan"), follow_up=get("follow_up"),
    )
    for name, message in visit_problems(note).items():
        key = _ORDER_PROBLEM.get(name, name)
        if name == "task_ref":
            message = "An order of this plan has no fulfilment task in the EHR, so sessions cannot be counted " \
                      "against it."
        problems.setdefault(key, message)
    if status == "completed":
        if plan.all_done:
            problems.setdefault("order", f"All {plan.total} ordered sessions are documented; ask the physician "
                                         "to renew the order.")
        else:
            full = [o for o in plan.orders if o.technique in techniques and o.technique not in plan.open_techniques]
            if full:
                o = full[0]
                why = f"all {o.total} ordered sessions are documented" if o.all_done else \
                    f"its task is {o.task_status or 'missing'}"
                problems.setdefault("techniques", f"{o.technique_label}: {why}; untick it, or ask the physician "
                                                  "to renew the order.")
    return note, problems


@dataclass(frozen=True)
class Units:
    """What the note shows about time and billing: the visit's minutes, the timed CPT units of the 8-minute rule
    on the TOTAL minutes (CMS), and the units per code when the minutes per code are known."""

    minutes: int = 0
    units: int = 0
    codes: tuple[str, ...] = ()  # CPT codes of the techniques used
    per_code: tuple[tuple[str, int], ...] | None = ()  # None: several codes and no minutes to split them

    @property
    def text(self) -> str:
        if not self.minutes:
            return "— min"
        head = f"{self.minutes} min · {self.units} CPT unit{'s' if self.units != 1 else ''}"
        if len(self.codes) == 1:
            return head + f" ({self.codes[0]})"
        if self.per_code is None:
            return head + f" ({' + '.join(self.codes)}: give the minutes per technique to split them)"
        if self.per_code:
            return head + ": " + ", ".join(f"{c} × {u}" for c, u in self.per_code)
        return head


def visit_minutes_and_units(note: VisitNote | None) -> Units:
    if note is None or note.status != "completed" or note.end is None or note.end <= note.start:
        return Units()
    codes = tuple(dict.fromkeys(c for c in (technique_cpt(t) for t in note.techniques) if c))
    per = visit_cpt_minutes(note)
    per_code = None if per is None else tuple(sorted(visit_units(note).items()))
    return Units(note.minutes, cpt_units(note.minutes), codes, per_code)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: message threads


@dataclass(frozen=True)
class Message:
    id: str
    ref: str
    sent: str
    sender: str
    sender_name: str
    text: str
    category: str
    in_response_to: str | None
    depth: int = 0
    mine: bool = False


def thread(comms: Iterable[Mapping[str, Any]], *, order_ref: str | Iterable[str], me: str | None,
           names: Mapping[str, str] | None = None) -> list[Message]:
    """The messages about one order (or any order of a plan: ``order_ref`` may be several), each reply under what
    it answers (depth-first, oldest first)."""
    names = names or {}
    wanted = {order_ref} if isinstance(order_ref, str) else set(order_ref)
    msgs: dict[str, Message] = {}
    for c in comms:
        if c.get("resourceType") != "Communication" or not c.get("id"):
            continue
        if not wanted & {(b or {}).get("reference") for b in c.get("basedOn") or [] if isinstance(b, Mapping)}:
            continue
        sender = str((c.get("sender") or {}).get("reference") or "")
        text = " ".join(str(p.get("contentString") or "") for p in c.get("payload") or []
                        if isinstance(p, Mapping)).strip()
        cat = ""
        for cc in c.get("category") or []:
            for cd in (cc or {}).get("coding") or []:
                if cd.get("code") in MESSAGE_CATEGORIES:
                    cat = MESSAGE_CATEGORIES[cd["code"]][0]
        irt = next((str(r.get("reference")) for r in c.get("inResponseTo") or [] if isinstance(r, Mapping)
                    and r.get("reference")), None)
        ref = f"Communication/{c['id']}"
        msgs[ref] = Message(id=str(c["id"]), ref=ref, sent=str(c.get("sent") or ""), sender=sender,
                            sender_name=names.get(sender) or (c.get("sender") or {}).get("display") or sender,
                            text=text, category=cat, in_response_to=irt, mine=bool(me) and sender == me)
    children: dict[str | None, list[Message]] = {}
    for m in msgs.values():
        parent = m.in_response_to if m.in_response_to in msgs else None
        children.setdefault(parent, []).append(m)
    out: list[Message] = []

    def walk(parent: str | None, depth: int) -> None:
        for m in sorted(children.get(parent, []), key=lambda x: x.sent):
            out.append(Message(**{**m.__dict__, "depth": min(depth, 4)}))
            walk(m.ref, depth + 1)

    walk(None, 0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# I/O: reading from the EHR


def _drafts() -> DraftStore:
    return DraftStore(current_app.extensions["store"], float(current_app.config["DRAFT_TTL"]))


def _draft_key(ctx: LaunchContext, plan_key: str) -> DraftKey:
    """The visit note's draft: one per (EHR, author, patient, plan)."""
    return DraftKey.for_plan(ctx.iss, ctx.user_ref or "", ctx.patient_id or "", plan_key)


def _posted_plan_key() -> str:
    """The plan key the page sent back (autosave, discard): only the author's own drafts are reachable with it
    (the author and patient come from the launch), so a wrong key can only miss a draft, never show another's."""
    key = request.form.get("plan_key") or ""
    if not _PLAN_KEY.match(key):
        raise DraftError("The note form has expired; reload the page.", code="draft-bad-plan")
    return key


def _now() -> datetime:
    clock = current_app.config.get("SESSIONS_CLOCK")  # tests may pin the time
    return clock() if callable(clock) else datetime.now(timezone.utc)


def _order_id(order_id: str) -> str:
    if not _ORDER_ID.match(order_id):
        raise InvalidInput("That is not an order of this patient.")
    return order_id


def _patient(ctx: LaunchContext) -> str:
    if not ctx.patient_id:
        raise LaunchError("The EHR did not give a patient for this launch; open the app from a patient's chart.",
                          code="launch")
    return ctx.patient_id


def _searchset(result: Any) -> list[dict[str, Any]] | None:
    if isinstance(result, FhirResult) and isinstance(result.resource, dict) \
            and result.resource.get("resourceType") == "Bundle":
        return resources(result.resource)
    return None


@dataclass
class PageData:
    order: PlanSummary | None = None  # the plan of the requested order
    sr: dict[str, Any] | None = None  # the requested order
    issues: list[dict[str, Any]] = field(default_factory=list)
    comms: list[dict[str, Any]] = field(default_factory=list)
    chart_resources: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)


def with_missing_tasks(client: Any, pairs: list[tuple[dict, dict | None]], found: list[dict[str, Any]]
                       ) -> list[tuple[dict, dict | None]]:
    """Servers that ignore ``_revinclude`` (it is optional, search.html#revinclude) return the orders without their
    Tasks: look those up in one more search (``Task?focus=a,b``), and only then."""
    missing = [f"ServiceRequest/{sr.get('id')}" for sr, task in pairs if task is None]
    if not missing:
        return pairs
    try:
        extra = client.search_all("Task", [("focus", ",".join(missing))])
    except FhirError as exc:
        if exc.status in (401, 403):
            return pairs  # no Task access: the page says so per order
        raise
    return pair_orders_and_tasks(list(found) + [t for t in extra if t.get("resourceType") == "Task"])


def load_order_page(client: Any, patient_id: str, order_id: str, *, with_chart: bool = True) -> PageData:
    """ONE batch: the patient's orders (+ their Tasks, requesters), DetectedIssues and messages, and (for the
    re-screen) the Patient and the chart searches. The plan is the requested order with the other active orders
    of its requisition (a search by requisition would need the order first: a second round trip). Failed entries
    become problems shown on the page."""
    p = ("patient", patient_id)
    entries = [
        request_entry("GET", "ServiceRequest?" + urlencode([p, ("_revinclude", "Task:focus"),
                                                            ("_include", "ServiceRequest:requester"),
                                                            ("_count", "200")])),
        request_entry("GET", "DetectedIssue?" + urlencode([p, ("_count", "200")])),
        request_entry("GET", "Communication?" + urlencode([p, ("_count", "200")])),
    ]
    searches = chart_searches(patient_id) if with_chart else []
    if with_chart:
        entries.append(request_entry("GET", f"Patient/{patient_id}"))
        entries += [request_entry("GET", f"{rtype}?{urlencode(params)}") for rtype, params in searches]
    answer = batch_or_each(client, batch_bundle(entries))  # an EHR without batch: the same GETs one by one
    outcomes = entry_outcomes(answer)
    data = PageData()
    found = _searchset(outcomes[0]) if outcomes else None
    if found is None:
        raise outcomes[0] if outcomes and isinstance(outcomes[0], FhirError) else \
            FhirError("The EHR did not answer the search for the order.")
    found = list(found) + _more_pages(client, outcomes[0])
    pairs = with_missing_tasks(client, pair_orders_and_tasks(found), found)
    wanted = next(((sr, task) for sr, task in pairs if sr.get("id") == order_id), None)
    if wanted is None:
        return data
    data.sr = wanted[0]
    key = requisition_of(wanted[0])
    members = [(sr, task) for sr, task in pairs
               if sr is wanted[0] or (key is not None and requisition_of(sr) == key and sr.get("status") == "active")]
    data.names = practitioner_names(found)
    data.order = group_orders(members, data.names)[0]
    issues = _searchset(outcomes[1])
    if issues is None:
        data.problems.append("The findings the order was signed with could not be read; every finding counts as "
                             "new below.")
    data.issues = [r for r in issues or [] if r.get("resourceType") == "DetectedIssue"]
    comms = _searchset(outcomes[2])
    if comms is None:
        data.problems.append("The messages about this order could not be read.")
    data.comms = [r for r in comms or [] if r.get("resourceType") == "Communication"]
    if with_chart:
        patient = batch_patient(outcomes[3])  # a refused Patient raises FhirAuthError
        if patient is not None:
            data.chart_resources.append(patient)
        for (rtype, _), result in zip(searches, outcomes[4:]):
            page = _searchset(result)
            if page is None:
                data.problems.append(f"The patient's {rtype} records could not be read; the re-screen is "
                                     "incomplete.")
                continue
            data.chart_resources.extend(page)
            data.chart_resources.extend(_more_pages(client, result))
    return data


def _more_pages(client: Any, result: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The further pages of a search answered in a batch (only when the server paged it)."""
    out: list[dict[str, Any]] = []
    nxt = result.resource if isinstance(result, FhirResult) else None
    pages = 1
    while nxt is not None and pages < limit:
        nxt = client.next_page(nxt)
        if nxt is not None:
            out.extend(resources(nxt))
            pages += 1
    return out


def run_rescreen(data: PageData, today: date) -> Rescreen:
    order = data.order
    assert order is not None
    if not data.chart_resources or data.chart_resources[0].get("resourceType") != "Patient":
        return Rescreen(screening=None, error="The patient's chart could not be read, so the re-screen did not "
                                              "run. Check the chart yourself before the session.")
    try:
        chart = chart_mod.from_resources(data.chart_resources)
        # the union of the plan's techniques and sites: the visit may give any of them
        screening = screening_mod.screen(chart, techniques=list(order.techniques) or None,
                                         sites=list(order.sites) or None, today=today)
    except InvalidInput as exc:
        return Rescreen(screening=None, error=f"The re-screen could not run: {exc.message}")
    result = rescreen(screening, order, data.issues)
    if data.problems:
        result = Rescreen(**{**result.__dict__, "warnings": tuple(data.problems) + result.warnings})
    return result


# ---------------------------------------------------------------------------------------------------------------
# Views


@bp.errorhandler(DraftError)
def _draft_error(exc: DraftError) -> Any:
    """A draft the app cannot keep (bad id, bad field, replaced by another tab) is the user's situation, not an app
    fault: the one error mapping (errors.py) shows it as "That could not be used" (400) with the draft's words."""
    return errors.handle_massage_error(InvalidInput(exc.message, code=exc.code))


def _names_for(ctx: LaunchContext, names: Mapping[str, str]) -> dict[str, str]:
    out = dict(names)
    if ctx.user_ref:
        out[ctx.user_ref] = f"You ({ctx.user_name})" if ctx.user_name else "You"
    return out


def _therapist(fn: Any) -> Any:
    return require_launch(roles=(identity.THERAPIST,))(fn)


@bp.get("/")
@_therapist
def index() -> Any:
    ctx: LaunchContext = g.ctx
    patient_id = _patient(ctx)
    p = ("patient", patient_id)
    answer = batch_or_each(fhir_client(), batch_bundle([
        # active, held and past orders (comma = OR, search.html#combining): a hold must not make an order vanish
        request_entry("GET", "ServiceRequest?" + urlencode([p, ("status", ",".join(WORKLIST_STATUSES)),
                                                            ("_revinclude", "Task:focus"),
                                                            ("_include", "ServiceRequest:requester"),
                                                            ("_count", "100")])),
        request_entry("GET", "Communication?" + urlencode([p, ("_count", "200")])),
    ]))
    outcomes = entry_outcomes(answer)
    found = _searchset(outcomes[0])
    if found is None:
        raise outcomes[0] if isinstance(outcomes[0], FhirError) else FhirError("The EHR did not list the orders.")
    comms = [r for r in _searchset(outcomes[1]) or [] if r.get("resourceType") == "Communication"]
    drafts = _drafts()
    rows, held_rows = [], []
    names = _names_for(ctx, practitioner_names(found))
    pairs = with_missing_tasks(fhir_client(), pair_orders_and_tasks(found), found)
    # one plan per status: a plan whose swedish order is held and whose stretching order is active is documented
    # for stretching and shown on hold for swedish
    by_status: dict[str, list[tuple[dict, dict | None]]] = {}
    for sr, task in pairs:
        by_status.setdefault(str(sr.get("status") or ""), []).append((sr, task))
    plans = [plan for status in WORKLIST_STATUSES for plan in group_orders(by_status.get(status, []), names)]
    active, held, past = split_worklist(plans)
    for plan in held:
        held_rows.append((plan, thread(comms, order_ref=plan.refs, me=ctx.user_ref, names=names)))
    for plan in active:
        draft = None
        if ctx.user_ref:
            try:
                draft = drafts.load(_draft_key(ctx, plan.key))
            except DraftError:
                draft = None
        rows.append((plan, thread(comms, order_ref=plan.refs, me=ctx.user_ref, names=names), draft))
    recorded = request.args.get("recorded")
    return render_template("sessions/index.html", rows=rows, held_rows=held_rows, past=past, recorded=recorded,
                           sent=request.args.get("sent"), messages_ok=_searchset(outcomes[1]) is not None)


def _render_document(order_id: str, data: PageData, *, fields: Mapping[str, Any], draft: Mapping[str, Any] | None,
                     draft_id: str, problems: Mapping[str, str] | None = None, status: int = 200,
                     notice: str | None = None, rescreen_result: Rescreen | None = None) -> Any:
    ctx: LaunchContext = g.ctx
    plan = data.order
    assert plan is not None
    now = _now()
    result = rescreen_result or run_rescreen(data, now.date())
    note, _ = note_from_fields(fields, draft_id=draft_id, plan=plan, patient_ref=f"Patient/{ctx.patient_id}",
                               performer_ref=ctx.user_ref or "Practitioner/unknown", now=now)
    units = visit_minutes_and_units(note)
    stop_message = finding_message_text(result.stop or tuple(f for f, _ in result.new), plan, now.date()) \
        if (result.stop or result.new) else ""
    # sites to hatch on the diagram: where an applicable absolute or local finding forbids a technique of the plan
    marked = sorted({str(site) for f in result.stop for site in f.sites})
    about = []
    for f in (result.stop or tuple(f for f, _ in result.new)):
        about += [e for e in f.evidence if e not in about]
    chosen = fields.get("techniques")
    if chosen is None and fields.get("technique"):
        chosen = [fields["technique"]]
    techniques = [(o, o.technique in (chosen or []), o.technique in plan.open_techniques,
                   minutes_field(o.technique or ""), technique_cpt(o.technique or "")) for o in plan.orders]
    return render_template(
        "sessions/document.html", order=plan, rescreen=result, fields=fields, draft=draft, draft_id=draft_id,
        problems=problems or {}, notice=notice, units=units, technique_choices=techniques,
        site_choices=site_choices(plan.sites), pressures=PRESSURES,
        messages=thread(data.comms, order_ref=plan.refs, me=ctx.user_ref, names=_names_for(ctx, data.names)),
        message_categories=[(k, v[0]) for k, v in MESSAGE_CATEGORIES.items()], stop_message=stop_message,
        stop_about=about, message_id=new_draft_id(), today=now.date().isoformat(), marked_sites=marked,
        closed=closed_order_text(data.sr),
        review_items=[{"label": review_label(r), "reason": r.get("reason"), "evidence": r.get("evidence")}
                      for r in (result.screening.needs_review if result.screening else ())],
        technique_cpt_map={t: technique_cpt(t) for t in TECHNIQUES},
    ), status


def closed_order_text(sr: Mapping[str, Any] | None) -> str | None:
    """Why no session can be documented on this order (it is not active), in plain words; None when it can."""
    status = str((sr or {}).get("status") or "")
    if status == "active":
        return None
    if status == "on-hold":
        reason = _status_reason([order_summary(sr or {}, None)], "On hold: ")
        return ("The physician has put this order on hold" + (f" ({reason})" if reason else "") + ", so no session "
                "can be documented on it. Message the physician, or wait until the order is resumed.")
    words = {"completed": "completed", "revoked": "revoked (cancelled)", "draft": "not signed yet",
             "entered-in-error": "entered in error"}.get(status, status or "in an unknown state")
    return f"This order is {words}, so no session can be documented on it. Ask the physician for a new order."


def _load_or_404(order_id: str) -> PageData:
    ctx: LaunchContext = g.ctx
    data = load_order_page(fhir_client(), _patient(ctx), order_id)
    if data.order is None:
        from werkzeug.exceptions import NotFound
        raise NotFound("This patient has no such massage order.")
    return data


@bp.get("/<order_id>")
@_therapist
def document(order_id: str) -> Any:
    ctx: LaunchContext = g.ctx
    order_id = _order_id(order_id)
    data = _load_or_404(order_id)
    assert data.order is not None
    draft = None
    notice = None
    if ctx.user_ref:
        try:
            draft = _drafts().load(_draft_key(ctx, data.order.key))
        except DraftError as exc:
            notice = exc.message
    else:
        notice = "The EHR did not say who you are, so the app cannot keep drafts of your note for this launch."
    fields = dict(draft["fields"]) if draft else default_fields(data.order, _now())
    draft_id = draft["draft_id"] if draft else new_draft_id()
    return _render_document(order_id, data, fields=fields, draft=draft, draft_id=draft_id, notice=notice)


def _save_posted(ctx: LaunchContext, plan_key: str) -> dict[str, Any]:
    """Keep what the browser sent as the draft (before anything talks to the EHR)."""
    posted_id = request.form.get("draft_id") or None
    if posted_id is not None and not is_draft_id(posted_id):
        raise DraftError("The draft id sent with the note is not valid; reload the page.", code="draft-bad-id")
    return _drafts().save(_draft_key(ctx, plan_key), form_fields(request.form), draft_id=posted_id)


def _saved_label(rec: Mapping[str, Any]) -> str:
    return datetime.fromtimestamp(float(rec["saved_at"]), timezone.utc).strftime("%H:%M UTC")


@bp.app_template_global("draft_saved_label")
def draft_saved_label(rec: Mapping[str, Any]) -> str:
    return _saved_label(rec)


@bp.app_template_global("fm_new_id")
def _new_id_global() -> str:
    return new_draft_id()


@bp.post("/<order_id>/draft")
@_therapist
def autosave(order_id: str) -> Any:
    """sessions.js posts the whole form here ~1 s after typing stops and when the page is hidden. No EHR round
    trip: the draft's plan is the ``plan_key`` the page was rendered with."""
    ctx: LaunchContext = g.ctx
    order_id = _order_id(order_id)
    try:
        rec = _save_posted(ctx, _posted_plan_key())
    except DraftAlreadyWritten as exc:
        return {"error": exc.code, "message": exc.message}, 409
    except DraftError as exc:
        return {"error": exc.code, "message": exc.message}, 409 if exc.code == "draft-replaced" else 400
    saved = datetime.fromtimestamp(float(rec["saved_at"]), timezone.utc)
    return {"saved": True, "draft_id": rec["draft_id"], "saved_at": saved.isoformat(timespec="seconds"),
            "saves": rec["saves"]}


@bp.post("/<order_id>/discard")
@_therapist
def discard(order_id: str) -> Any:
    ctx: LaunchContext = g.ctx
    order_id = _order_id(order_id)
    draft_id = request.form.get("draft_id") or ""
    if ctx.user_ref and is_draft_id(draft_id):
        _drafts().discard(_draft_key(ctx, _posted_plan_key()), draft_id)
    return redirect(url_for("sessions.document", order_id=order_id), code=303)


def _not_sent(order_id: str, reason: str, draft: Mapping[str, Any] | None, *, status: int, relaunch: bool = False
              ) -> Any:
    return render_template("sessions/not_sent.html", order_id=order_id, reason=reason, draft=draft,
                           relaunch=relaunch, saved=_saved_label(draft) if draft else None), status


def _failure_words(exc: Exception) -> tuple[str, int, bool]:
    if isinstance(exc, LaunchError) or (isinstance(exc, FhirAuthError) and exc.status == 401):
        return ("Your session with the EHR has ended (the sign-in could not be renewed).", 401, True)
    if isinstance(exc, FhirAuthError):
        return ("The EHR refused the write (permission denied).", 403, False)
    if isinstance(exc, PartialWrite):
        return (exc.message + " Your note is kept as a draft: try again to save only what is missing.", 502, False)
    if isinstance(exc, FhirError):
        if exc.status is None:
            what = "timeout" if "timed out" in exc.message else "no connection"
            return (f"The EHR did not answer ({what}).", 503, False)
        if exc.status >= 500 or exc.status == 429:
            return (f"The EHR answered with an error ({exc.status}).", 503, False)
        return (f"The EHR did not accept the note ({exc.status}): {exc.message}", 502, False)
    return ("The app could not finish the write.", 500, False)


def write_visit(client: Any, note: VisitNote, tasks: Mapping[str, Mapping[str, Any]], now: datetime
                ) -> dict[str, Any]:
    """The visit transaction, written once. A Task version conflict (412/409: someone else, or our own first
    attempt whose answer was lost, changed a Task) -> re-read the visit's Tasks: if every one already lists this
    note, the first attempt landed; otherwise rebuild on the fresh Tasks (a Task that lists the note is left
    alone, the creates are conditional on identifiers derived from the draft id, so nothing is written or counted
    twice) and send again. Returns {"procedure": first ref|None, "procedures": [refs], "already": bool}."""
    attempts = 0
    tasks = dict(tasks)
    while True:
        attempts += 1
        bundle = visit_transaction(note, tasks, now)
        try:
            # An EHR without transactions gets the entries one by one, the Procedure first (fhir_massage.writes);
            # a Task 412 half way is handled like a refused transaction's: re-read, send again.
            outcome = writes.write(client, bundle)
            raise_conflict(outcome)
        except FhirConflict:
            if attempts >= 3:
                raise
            used = [o.task_ref for o in note.used_orders()]
            tasks.update({ref: client.read("Task", ref.split("/", 1)[1]) for ref in used})
            if all(session_recorded(tasks[ref], note.draft_id) for ref in used):
                found = client.search("Procedure", [("identifier", f"{VISIT_ID_SYSTEM}|{note.draft_id}")])
                procs = [f"Procedure/{p['id']}" for p in resources(found, "Procedure")]
                return {"procedure": procs[0] if procs else None, "procedures": procs, "already": True}
            continue
        if not outcome.complete:
            raise PartialWrite(outcome)  # the draft is kept; "Try again" writes only what is missing
        procs = [f"Procedure/{i}" for i in outcome.by_type().get("Procedure", [])]
        return {"procedure": procs[0] if procs else None, "procedures": procs, "already": False,
                "atomic": outcome.atomic}


def write_session(client: Any, note: SessionNote, task: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """``write_visit`` for a one-technique note against its order's Task. Returns {"procedure", "already"}."""
    out = write_visit(client, note.as_visit(), {note.task_ref: task}, now)
    return {"procedure": out["procedure"], "already": out["already"]}


def _tasks_of(plan: PlanSummary) -> dict[str, Mapping[str, Any]]:
    return {o.task_ref: o.task for o in plan.orders if o.task_ref and o.task is not None}


@bp.post("/<order_id>")
@_therapist
def submit(order_id: str) -> Any:
    ctx: LaunchContext = g.ctx
    order_id = _order_id(order_id)
    if not ctx.user_ref:
        raise InvalidInput("The EHR did not say who you are, so the note cannot be signed by you. Open the app "
                           "again from the EHR.")
    drafts = _drafts()
    action = request.form.get("action") or "save"
    now = _now()
    client = fhir_client()
    # One retry at most while the therapist waits: the draft is safe on the server and "Try again" is one click,
    # so a dead EHR is reported in seconds, not after the client's full back-off.
    client.max_retries = min(client.max_retries, 1)
    posted_key = request.form.get("plan_key") or ""
    plan_key = posted_key if _PLAN_KEY.match(posted_key) else None
    data: PageData | None = None

    def keep() -> dict[str, Any] | None:
        """Keep what was posted as the draft (before anything talks to the EHR), or find the stored one."""
        assert plan_key is not None
        if request.form.get("status") is not None:  # the note form (not a bare "try again")
            return _save_posted(ctx, plan_key)
        return drafts.load(_draft_key(ctx, plan_key))

    draft = None
    try:
        if plan_key is not None:
            draft = keep()
        if action == "submit" or plan_key is None:
            try:
                data = load_order_page(client, _patient(ctx), order_id)
            except (FhirError, LaunchError) as exc:
                reason, status, relaunch = _failure_words(exc)
                return _not_sent(order_id, reason, draft, status=status, relaunch=relaunch)
            if data.order is None:
                return _not_sent(order_id, "The order is no longer in the EHR (or no longer this patient's).",
                                 draft, status=404)
            if data.order.key != plan_key:  # no key posted, or the plan was regrouped since the page was shown
                plan_key = data.order.key
                draft = keep()
    except DraftAlreadyWritten:
        return redirect(url_for("sessions.index", recorded="1"), code=303)
    if draft is None:
        return redirect(url_for("sessions.document", order_id=order_id), code=303)
    assert plan_key is not None
    key = _draft_key(ctx, plan_key)
    if action != "submit":
        return redirect(url_for("sessions.document", order_id=order_id, saved="1") + "#note", code=303)
    assert data is not None and data.order is not None
    plan = data.order
    closed = closed_order_text(data.sr)
    if closed:
        return _not_sent(order_id, closed, draft, status=409)
    note, problems = note_from_fields(draft["fields"], draft_id=draft["draft_id"], plan=plan,
                                      patient_ref=f"Patient/{ctx.patient_id}", performer_ref=ctx.user_ref, now=now)
    if problems or note is None:
        return _render_document(order_id, data, fields=draft["fields"], draft=draft, draft_id=draft["draft_id"],
                                problems=problems, status=400,
                                notice="The note is saved as a draft, but not sent: see the fields marked below.")
    try:
        result = write_visit(client, note, _tasks_of(plan), now)
    except InvalidInput as exc:  # e.g. a Task was closed meanwhile
        return _not_sent(order_id, exc.message, draft, status=409)
    except (FhirError, LaunchError) as exc:
        reason, status, relaunch = _failure_words(exc)
        log.info("session note not written (%s); the draft is kept", type(exc).__name__)
        return _not_sent(order_id, reason, draft, status=status, relaunch=relaunch)
    drafts.mark_written(key, draft["draft_id"], result={"procedures": result["procedures"]})
    target = url_for("sessions.index", recorded=(result["procedure"] or "1").split("/")[-1],
                     n=str(len(result["procedures"])) if len(result["procedures"]) > 1 else None,
                     steps="1" if result.get("atomic") is False else None)  # saved entry by entry: say so
    return redirect(target, code=303)


@bp.post("/<order_id>/message")
@_therapist
def message(order_id: str) -> Any:
    """A message to the ordering physician (builders.messages.communication), created once per message id."""
    ctx: LaunchContext = g.ctx
    order_id = _order_id(order_id)
    patient_id = _patient(ctx)
    form = request.form
    text = form.get("text") or ""
    category = form.get("category") or "progress"
    about = [a for a in form.getlist("about") if isinstance(a, str) and re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$", a)]
    reply_to = form.get("in_response_to") or None
    message_id = form.get("message_id") or ""
    if not is_draft_id(message_id):
        raise InvalidInput("The message form has expired; reload the page.")
    if not ctx.user_ref:
        raise InvalidInput("The EHR did not say who you are, so the message cannot be sent in your name.")
    client = fhir_client()
    back = url_for("sessions.document", order_id=order_id)
    try:
        found = client.search("ServiceRequest", [("_id", order_id), ("patient", patient_id)])
        orders = resources(found, "ServiceRequest")
        if not orders:
            raise InvalidInput("This patient has no such order.")
        requester = (orders[0].get("requester") or {}).get("reference")
        if not requester:
            raise InvalidInput("The order names no physician to send the message to.")
        msg = communication(order_ref=f"ServiceRequest/{order_id}", patient_ref=f"Patient/{patient_id}",
                            sender_ref=ctx.user_ref, recipient_ref=requester, text=text, about_refs=about,
                            category=category, in_response_to=reply_to, now=_now(), draft_id=message_id)
        client.create(msg, if_none_exist=[("identifier", f"{MESSAGE_ID_SYSTEM}|{message_id}")])
    except InvalidInput as exc:
        return render_template("sessions/message_failed.html", reason=exc.message, text=text, category=category,
                               about=about, reply_to=reply_to, message_id=message_id, order_id=order_id,
                               back=back, categories=[(k, v[0]) for k, v in MESSAGE_CATEGORIES.items()]), 400
    except (FhirError, LaunchError) as exc:
        reason, status, _ = _failure_words(exc)
        return render_template("sessions/message_failed.html", reason=reason + " The message was not sent.",
                               text=text, category=category, about=about, reply_to=reply_to, message_id=message_id,
                               order_id=order_id, back=back,
                               categories=[(k, v[0]) for k, v in MESSAGE_CATEGORIES.items()]), status
    return redirect(back + "?sent=1#thread", code=303)


__all__ = ["bp", "order_summary", "order_technique", "site_key", "pair_orders_and_tasks", "group_orders",
           "PlanSummary", "rescreen", "Rescreen", "known_findings", "note_from_fields", "form_fields", "thread",
           "write_visit", "write_session", "load_order_page", "site_choices", "finding_message_text",
           "visit_minutes_and_units", "minutes_field", "split_worklist", "closed_order_text", "ORDER_STATUS_WORDS"]
