"""The plan and changes to a running order: CarePlan (MassagePlan), order status changes (hold, resume, revoke,
complete) and modifications, each returned as the new resource for a ``PUT`` with ``If-Match`` = its
``meta.versionId`` (http.html#concurrency) - the caller reads, changes with these functions, and writes back.

References: reference/fhir-modelling.md "The plan: CarePlan", "The order" (status values).
"""

from __future__ import annotations

import copy
from html import escape
from datetime import date, datetime
from typing import Any, Mapping, Sequence

from ..codes import ORDER_DETAIL_SYSTEM, TECHNIQUE_SYSTEM, TECHNIQUES, US_CORE_CAREPLAN_CATEGORY, codings, coding
from ..errors import InvalidInput
from ..orders_model import Schedule, parse_site, ref_problem, schedule_problems, site_problem
from .order import (
    IDENTIFIER_BASE,
    TARGET_BODY_STRUCTURE,
    _output_type,
    OUTPUT_SESSION,
    annotation,
    body_site,
    code_text,
    identifier,
    instant,
    meta,
    ref,
    sessions_quantity,
    target_body_structures,
    technique_codings,
    timing,
)

PLAN_ID_SYSTEM = f"{IDENTIFIER_BASE}/care-plan"

# action -> ServiceRequest.status, and the statuses each may start from (R4 request-status; an order that is
# revoked or completed is finished and stays so: a new order is needed).
ACTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "hold": ("on-hold", frozenset({"active"})),
    "resume": ("active", frozenset({"on-hold"})),
    "revoke": ("revoked", frozenset({"draft", "active", "on-hold"})),
    "complete": ("completed", frozenset({"active", "on-hold"})),
}
_STATUS_TO_ACTION = {status: action for action, (status, _) in ACTIONS.items()}
_EDITABLE = frozenset({"draft", "active", "on-hold"})
# How the fulfilment Task follows its order (R4 task-status).
_TASK_FOR_ORDER = {"on-hold": "on-hold", "revoked": "cancelled", "completed": "completed"}


def care_plan(*, draft_id: str, patient_ref: str, order_refs: Sequence[str], author_ref: str, start: date,
              end: date | None = None, addresses: Sequence[str] = (), goal_refs: Sequence[str] = (),
              title: str | None = None, now: datetime) -> dict[str, Any]:
    """Medical massage plan: status active, intent plan, US Core category ``assess-plan`` [V], one
    ``activity.reference`` per order (R4 cpl-3: an activity has a reference or a detail, not both - the order
    carries the schedule), ``addresses`` the Conditions, ``goal`` the Goals."""
    problems = []
    for r in order_refs:
        if ref_problem(r, ("ServiceRequest",), "order"):
            problems.append(f"{r} is not an order (ServiceRequest).")
    if not order_refs:
        problems.append("A plan needs at least one order.")
    for value, types, what in ((patient_ref, ("Patient",), "patient"),
                               (author_ref, ("Practitioner", "PractitionerRole"), "author")):
        p = ref_problem(value, types, what)
        if p:
            problems.append(p)
    problems += [f"{a} is not a Condition." for a in addresses if ref_problem(a, ("Condition",), "condition")]
    problems += [f"{g} is not a Goal." for g in goal_refs if ref_problem(g, ("Goal",), "goal")]
    if end is not None and end < start:
        problems.append("The plan must end after it starts.")
    if not draft_id:
        problems.append("The plan has no id.")
    if problems:
        raise InvalidInput("The plan cannot be written: " + " ".join(problems))
    period = {"start": start.isoformat()}
    if end is not None:
        period["end"] = end.isoformat()
    title = title or "Medical massage plan"
    when = f"from {start.isoformat()}" + (f" to {end.isoformat()}" if end else "")
    orders = ", ".join(order_refs)
    plan: dict[str, Any] = {
        "resourceType": "CarePlan",
        "meta": meta("CarePlan"),
        # US Core CarePlan (mirrored by MassagePlan) requires a narrative; generated = from the structured data
        "text": {"status": "generated",
                 "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{escape(title)}, {escape(when)}: '
                        f'{escape(orders)}</p></div>'},
        "identifier": [identifier(PLAN_ID_SYSTEM, draft_id)],
        "status": "active",
        "intent": "plan",
        "category": [{"coding": [coding(US_CORE_CAREPLAN_CATEGORY, "assess-plan", "Assessment and Plan of Treatment")]}],
        "title": title,
        "subject": ref(patient_ref),
        "period": period,
        "created": instant(now),
        "author": ref(author_ref),
    }
    if addresses:
        plan["addresses"] = [ref(a) for a in addresses]
    if goal_refs:
        plan["goal"] = [ref(g) for g in goal_refs]
    plan["activity"] = [{"reference": ref(r)} for r in order_refs]
    return plan


def order_status_update(service_request: Mapping[str, Any], new_status: str, *, reason_text: str | None = None,
                        author_ref: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The order with a new status: ``new_status`` is an action (hold | resume | revoke | complete) or the status
    itself (on-hold | active | revoked | completed). R4 ServiceRequest has no statusReason, so the reason goes in
    ``note``. Raises InvalidInput for a change that makes no sense (resume an order that is not on hold, ...)."""
    action = new_status if new_status in ACTIONS else _STATUS_TO_ACTION.get(new_status)
    if action is None:
        raise InvalidInput(f"'{new_status}' is not a change an order can take; use hold, resume, revoke or complete.")
    target, allowed_from = ACTIONS[action]
    current = service_request.get("status")
    if current == target:
        raise InvalidInput(f"The order is already {target}.")
    if current not in allowed_from:
        raise InvalidInput(f"An order that is {current} cannot be {'put on hold' if action == 'hold' else action + 'd'}"
                           f"; it must be {' or '.join(sorted(allowed_from))}.")
    out = copy.deepcopy(dict(service_request))
    out["status"] = target
    out.pop("text", None)  # a stale narrative would contradict the new status
    if reason_text and reason_text.strip():
        label = {"hold": "On hold", "resume": "Resumed", "revoke": "Revoked", "complete": "Completed"}[action]
        out.setdefault("note", []).append(annotation(f"{label}: {reason_text.strip()}", author_ref=author_ref,
                                                     time=now))
    return out


def task_follow_order(task: Mapping[str, Any], order_status: str, *, now: datetime) -> dict[str, Any] | None:
    """The fulfilment Task brought in line with its order's new status, or None when nothing changes.
    Resume puts it back to in-progress if sessions were done, else ready (owned) / requested."""
    if order_status == "active":
        if task.get("status") != "on-hold":
            return None
        done = any(_output_type(o) == OUTPUT_SESSION for o in task.get("output") or [])
        status = "in-progress" if done else ("ready" if task.get("owner") else "requested")
    elif order_status in _TASK_FOR_ORDER:
        status = _TASK_FOR_ORDER[order_status]
    else:
        raise InvalidInput(f"No task change is defined for an order that is {order_status}.")
    if task.get("status") == status or task.get("status") in ("completed", "cancelled", "entered-in-error"):
        return None
    out = copy.deepcopy(dict(task))
    out["status"] = status
    out["lastModified"] = instant(now)
    out.pop("text", None)
    return out


def modify_order(sr: Mapping[str, Any], *, technique: str | None = None,
                 sites: Sequence[str] | None = None, schedule: Schedule | None = None,
                 body_structure_refs: Mapping[str, str] | None = None, reason_text: str | None = None,
                 author_ref: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The order with a new technique, sites and/or schedule (the rest unchanged), for a PUT with If-Match.

    Changing the sites drops the old ``procedure-targetBodyStructure`` links; pass ``body_structure_refs``
    (``Site.key`` -> BodyStructure reference, existing ones) to link the new lateralized sites."""
    if sr.get("resourceType") != "ServiceRequest":
        raise InvalidInput("Only an order (ServiceRequest) can be modified here.")
    if sr.get("status") not in _EDITABLE:
        raise InvalidInput(f"An order that is {sr.get('status')} cannot be changed; write a new order.")
    problems: list[str] = []
    if technique is not None and technique not in TECHNIQUES:
        problems.append(f"Unknown technique '{technique}'.")
    if sites is not None:
        if not sites:
            problems.append("Choose at least one body site to treat.")
        problems += [m for m in (site_problem(s) for s in sites) if m]
    if schedule is not None:
        problems += list(schedule_problems(schedule.frequency, schedule.duration_weeks,
                                           schedule.session_minutes).values())
    if problems:
        raise InvalidInput("The change cannot be made: " + " ".join(problems))
    out = copy.deepcopy(dict(sr))
    out.pop("text", None)
    tech = technique if technique is not None else _technique_of(sr)
    parsed = ([s for s in (parse_site(v) for v in sites) if s is not None] if sites is not None else None)
    if technique is not None or sites is not None:
        text = code_text(tech, parsed) if parsed is not None else _with_sites_text(tech, sr)
        out["code"] = {"coding": technique_codings(tech), "text": text}
    if parsed is not None:
        out["bodySite"] = [body_site(s) for s in parsed]
        kept = [e for e in out.get("extension") or [] if e.get("url") != TARGET_BODY_STRUCTURE]
        kept += target_body_structures(parsed, body_structure_refs)
        if kept:
            out["extension"] = kept
        else:
            out.pop("extension", None)
    if schedule is not None:
        out["occurrenceTiming"] = timing(schedule)
        out["quantityQuantity"] = sessions_quantity(schedule.total_sessions)
        details = [d for d in out.get("orderDetail") or [] if not _is_schedule_detail(d)]
        out["orderDetail"] = [{"coding": [coding(ORDER_DETAIL_SYSTEM, "schedule", "Schedule")],
                               "text": schedule.text}] + details
    if reason_text and reason_text.strip():
        out.setdefault("note", []).append(annotation(f"Changed: {reason_text.strip()}", author_ref=author_ref,
                                                     time=now))
    return out


def _technique_of(sr: Mapping[str, Any]) -> str:
    found = [c.get("code") for c in codings(sr.get("code")) if c.get("system") == TECHNIQUE_SYSTEM]
    techniques = [t for t in found if t in TECHNIQUES]
    if len(techniques) != 1:
        raise InvalidInput("The order does not name one technique we know; say which technique it should have.")
    return techniques[0]


def _with_sites_text(technique: str, sr: Mapping[str, Any]) -> str:
    where = "; ".join(str(b.get("text")) for b in sr.get("bodySite") or [] if isinstance(b, Mapping) and b.get("text"))
    base = code_text(technique, [])
    return f"{base}: {where}" if where else base


def _is_schedule_detail(detail: Any) -> bool:
    return isinstance(detail, Mapping) and any(
        isinstance(c, Mapping) and c.get("system") == ORDER_DETAIL_SYSTEM and c.get("code") == "schedule"
        for c in detail.get("coding") or [])


__all__ = ["PLAN_ID_SYSTEM", "ACTIONS", "care_plan", "order_status_update", "task_follow_order", "modify_order"]
