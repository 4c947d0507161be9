"""The therapist's worklist as plain data: active, held (with the physician's reason) and past plans, and the
plain refusal of a session on an order that is not active."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fhir_massage.builders.plan import order_status_update
from smart_app.sessions import closed_order_text, group_orders, split_worklist

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
TECH = "https://fhir-massage.dev/fhir/CodeSystem/massage-technique"


def sr(oid: str, status: str = "active", technique: str = "swedish", requisition: str | None = None) -> dict:
    out = {"resourceType": "ServiceRequest", "id": oid, "status": status, "intent": "order",
           "subject": {"reference": "Patient/p1"},
           "code": {"coding": [{"system": TECH, "code": technique}], "text": f"{technique} massage"}}
    if requisition:
        out["requisition"] = {"system": "https://fhir-massage.dev/id/requisition", "value": requisition}
    return out


def held(oid: str, reason: str | None) -> dict:
    return order_status_update(sr(oid), "hold", reason_text=reason, author_ref="Practitioner/dr", now=NOW)


def test_split_into_active_held_and_past():
    orders = [sr("a"), held("h", "Awaiting MRI"), order_status_update(sr("r"), "revoke", reason_text="Duplicate",
                                                                      now=NOW),
              order_status_update(sr("c"), "complete", now=NOW), sr("d", status="draft"),
              sr("e", status="entered-in-error")]
    active, on_hold, past = split_worklist(group_orders([(o, None) for o in orders]))
    assert [p.id for p in active] == ["a"]
    assert [p.id for p in on_hold] == ["h"] and on_hold[0].status_label == "On hold"
    assert on_hold[0].hold_reason == "Awaiting MRI"
    assert sorted(p.id for p in past) == ["c", "r"]
    assert next(p for p in past if p.id == "r").status_reason == "Duplicate"


def test_latest_hold_reason_wins_and_no_reason_is_none():
    again = order_status_update(order_status_update(held("h", "First"), "resume", now=NOW), "hold",
                                reason_text="Second", now=NOW)
    (plan,) = group_orders([(again, None)])
    assert plan.hold_reason == "Second"
    (plain,) = group_orders([(held("h2", None), None)])
    assert plain.hold_reason is None and plain.status == "on-hold"


def test_a_plan_with_one_active_order_is_active():
    (plan,) = group_orders([(sr("a", requisition="r1"), None),
                            (dict(sr("b", technique="stretching", requisition="r1"), status="on-hold"), None)])
    assert plan.status == "active"


@pytest.mark.parametrize("order,words", [
    (held("h", "Awaiting MRI"), "The physician has put this order on hold (Awaiting MRI), so no session can be "
                                "documented on it."),
    (held("h", None), "The physician has put this order on hold, so no session"),
    (sr("r", status="revoked"), "This order is revoked (cancelled), so no session can be documented on it."),
    (sr("c", status="completed"), "This order is completed"),
])
def test_closed_orders_are_refused_in_words(order, words):
    assert words in (closed_order_text(order) or "")


def test_an_active_order_is_not_closed():
    assert closed_order_text(sr("a")) is None
