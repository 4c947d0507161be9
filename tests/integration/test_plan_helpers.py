"""Helpers for the plan tests and benchmarks/bench_plan.py (no tests here): write orders, sessions, messages and
findings into a running sandbox with the builders' own transactions, as the ordering and documentation areas do."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from fhir_massage.builders.messages import MESSAGE_ID_SYSTEM, communication
from fhir_massage.builders.order import order_transaction
from fhir_massage.builders.session import SessionNote, session_transaction
from fhir_massage.fhir import FhirClient, StaticToken, entry_outcomes
from fhir_massage.orders_model import OrderDraft
from fhir_massage.plan_view import order_sites

PHYSICIAN = "dr-ada-grey"
THERAPIST = "lmt-sam-reyes"
DR_REF = "Practitioner/dr-ada-grey"
DR_ROLE_REF = "PractitionerRole/dr-ada-grey-role"
LMT_REF = "Practitioner/lmt-sam-reyes"
WRITE_SCOPES = "launch openid fhirUser user/*.cruds"


def writer(sandbox: Any, user: str = THERAPIST, patient: str = "demo-tom-becker") -> FhirClient:
    """A FhirClient with a user-level write token for ``user`` (the sandbox grants user/ scopes when asked)."""
    from tests.fixtures.smart_sandbox import get_token

    tok = get_token(sandbox, "test-public", user, patient, scopes=WRITE_SCOPES)
    return FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]))


@dataclass
class SeededPlan:
    draft_id: str
    orders: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    procedures: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def order_ref(self) -> str:
        return f"ServiceRequest/{self.orders[0]['id']}"


def sign_order(client: FhirClient, patient_id: str, *, techniques: Sequence[str] = ("swedish",),
               sites: Sequence[str] = (), frequency: int = 2, weeks: int = 6, minutes: int = 45,
               authored: datetime, findings: Sequence[dict[str, Any]] = (), requester: str = DR_REF) -> SeededPlan:
    draft_id = uuid.uuid4().hex
    draft = OrderDraft(draft_id=draft_id, patient_ref=f"Patient/{patient_id}", requester_ref=requester,
                       techniques=tuple(techniques), sites=tuple(sites) or (default_site(),), frequency=frequency,
                       duration_weeks=weeks, session_minutes=minutes, authored=authored,
                       reason_text="Chronic low back pain")
    answer = client.transaction(order_transaction(draft, list(findings), authored + timedelta(minutes=1)))
    written = [r.resource for r in entry_outcomes(answer) if not isinstance(r, Exception) and r.resource]
    orders = [r for r in written if r["resourceType"] == "ServiceRequest"]
    tasks = [r for r in written if r["resourceType"] == "Task"]
    if not orders:  # the server answered return=minimal: read them back
        from fhir_massage.builders.order import ORDER_ID_SYSTEM

        orders = [o for t in techniques
                  for o in client.search_all("ServiceRequest", {"identifier": f"{ORDER_ID_SYSTEM}|{draft_id}:{t}"})]
    return SeededPlan(draft_id, orders, tasks)


def default_site() -> str:
    from fhir_massage.orders_model import _sites

    sites = _sites()
    for code, (name, lat) in sites.items():
        if "lumbar" in name.lower() and not lat:
            return code
    return next(code for code, (_n, lat) in sites.items() if not lat)


def document(client: FhirClient, plan: SeededPlan, *, technique: str | None = None, start: datetime,
             pain: tuple[int | None, int | None] = (None, None), not_done: str | None = None,
             minutes: int = 45) -> dict[str, Any]:
    """One session (or a not-done one) against the plan's order for ``technique`` (the first by default)."""
    idx = 0
    if technique is not None:
        idx = next(i for i, o in enumerate(plan.orders)
                   if any(c.get("code") == technique for c in o["code"]["coding"]))
    order = plan.orders[idx]
    order_ref = f"ServiceRequest/{order['id']}"
    task = client.search_all("Task", {"focus": order_ref})[0]
    note = SessionNote(
        draft_id=uuid.uuid4().hex, order_ref=order_ref, task_ref=f"Task/{task['id']}",
        patient_ref=order["subject"]["reference"], performer_ref=LMT_REF, start=start,
        end=None if not_done else start + timedelta(minutes=minutes), status="not-done" if not_done else "completed",
        status_reason=not_done or "", technique=next(c["code"] for c in order["code"]["coding"]
                                                     if c["system"].endswith("massage-technique")),
        sites=order_sites(order), pain_before=pain[0], pain_after=pain[1], subjective="Low back pain" if not not_done else "")
    answer = client.transaction(session_transaction(note, task, start + timedelta(hours=2)))
    return answer


def message(client: FhirClient, plan: SeededPlan, text: str, *, sender: str = LMT_REF, recipient: str = DR_REF,
            category: str = "progress", in_response_to: str | None = None, now: datetime | None = None
            ) -> dict[str, Any]:
    draft = uuid.uuid4().hex
    msg = communication(order_ref=plan.order_ref, patient_ref=plan.orders[0]["subject"]["reference"],
                        sender_ref=sender, recipient_ref=recipient, text=text, category=category,
                        in_response_to=in_response_to, now=now or datetime.now(timezone.utc), draft_id=draft)
    res = client.create(msg, if_none_exist=[("identifier", f"{MESSAGE_ID_SYSTEM}|{draft}")])
    plan.messages.append(res.resource or {})
    return res.resource or {}
