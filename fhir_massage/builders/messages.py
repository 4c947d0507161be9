"""Physician <-> therapist messages as Communication (reference/fhir-modelling.md "Messages: Communication").

``basedOn`` the order, ``about`` what the message is about (Procedures, DetectedIssues, the CarePlan), replies
chain with ``inResponseTo``. Two categories: ours (progress | condition-change | request) and the nearest HL7
communication-category code [B] (notification | alert | instruction), as two CodeableConcepts because they do not
mean the same thing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from ..codes import COMMUNICATION_CATEGORY, MESSAGE_CATEGORY_SYSTEM, coding
from ..errors import InvalidInput
from ..orders_model import ref_problem
from .order import IDENTIFIER_BASE, identifier, instant, meta, ref

MESSAGE_ID_SYSTEM = f"{IDENTIFIER_BASE}/message"
CATEGORIES: dict[str, tuple[str, str, str]] = {
    # ours -> (display, HL7 communication-category code, its display)
    "progress": ("Progress report", "notification", "Notification"),
    "condition-change": ("Change in condition", "alert", "Alert"),
    "request": ("Request", "instruction", "Instruction"),
}
MAX_TEXT = 10_000


def message_problems(*, text: str, category: str, sender_ref: str, recipient_ref: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(text, str) or not text.strip():
        out["text"] = "Write the message."
    elif len(text) > MAX_TEXT:
        out["text"] = f"The message is too long ({len(text)} characters; at most {MAX_TEXT})."
    if category not in CATEGORIES:
        out["category"] = f"The kind of message is one of {', '.join(CATEGORIES)}."
    for name, value, what in (("sender_ref", sender_ref, "sender"), ("recipient_ref", recipient_ref, "recipient")):
        problem = ref_problem(value, ("Practitioner", "PractitionerRole"), what)
        if problem:
            out[name] = problem
    return out


def communication(*, order_ref: str, patient_ref: str, sender_ref: str, recipient_ref: str, text: str,
                  about_refs: Sequence[str] = (), category: str, in_response_to: str | None = None,
                  now: datetime, draft_id: str) -> dict[str, Any]:
    """A sent message (status ``completed``; ``sent`` = now). ``draft_id`` gives the identifier used for an
    idempotent create (``ifNoneExist: identifier=MESSAGE_ID_SYSTEM|draft_id``)."""
    problems = message_problems(text=text, category=category, sender_ref=sender_ref, recipient_ref=recipient_ref)
    for name, value, types, what in (("order_ref", order_ref, ("ServiceRequest", "CarePlan"), "order"),
                                     ("patient_ref", patient_ref, ("Patient",), "patient")):
        problem = ref_problem(value, types, what)
        if problem:
            problems[name] = problem
    if in_response_to is not None and ref_problem(in_response_to, ("Communication",), "message replied to"):
        problems["in_response_to"] = "A reply must point at the Communication it answers."
    if not draft_id:
        problems["draft_id"] = "The message has no id; start a new message."
    if problems:
        raise InvalidInput("The message cannot be sent: " + " ".join(problems.values()))
    display, hl7_code, hl7_display = CATEGORIES[category]
    msg: dict[str, Any] = {
        "resourceType": "Communication",
        "meta": meta("Communication"),
        "identifier": [identifier(MESSAGE_ID_SYSTEM, draft_id)],
        "basedOn": [ref(order_ref)],
    }
    if in_response_to:
        msg["inResponseTo"] = [ref(in_response_to)]
    msg.update({
        "status": "completed",
        "category": [{"coding": [coding(MESSAGE_CATEGORY_SYSTEM, category, display)]},
                     {"coding": [coding(COMMUNICATION_CATEGORY, hl7_code, hl7_display)]}],
        "subject": ref(patient_ref),
    })
    if about_refs:
        msg["about"] = [ref(r) for r in about_refs]
    msg.update({
        "sent": instant(now),
        "recipient": [ref(recipient_ref)],
        "sender": ref(sender_ref),
        "payload": [{"contentString": text.strip()}],
    })
    return msg


__all__ = ["MESSAGE_ID_SYSTEM", "CATEGORIES", "communication", "message_problems"]
