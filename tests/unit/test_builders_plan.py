"""Plan builders (CarePlan, order status changes, order modification) and messages (Communication)."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_massage.builders.messages import MESSAGE_ID_SYSTEM, communication
from fhir_massage.builders.order import TARGET_BODY_STRUCTURE, fulfillment_task, service_request
from fhir_massage.builders.plan import care_plan, modify_order, order_status_update, task_follow_order
from fhir_massage.codes import US_CORE_CAREPLAN_CATEGORY
from fhir_massage.errors import InvalidInput
from fhir_massage.orders_model import OrderDraft, Schedule
from fhir_massage.validation import errors, validate_resource

NOW = datetime(2026, 12, 10, 15, 0, tzinfo=timezone.utc)
DRAFT = OrderDraft(
    draft_id="order-1", patient_ref="Patient/p1", requester_ref="PractitionerRole/dr1",
    techniques=("deep-tissue",), sites=("37822005", "68367000:right"), frequency=1, duration_weeks=8,
    session_minutes=60, authored=datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc),
    reason_text="Chronic low back pain")


def valid(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    problems = errors(validate_resource(resource))
    assert not problems, "\n".join(map(str, problems))


def order(status: str = "active") -> dict[str, Any]:
    sr = service_request(DRAFT, findings_refs=[], now=NOW, body_structure_refs={"68367000:right": "BodyStructure/b1"})
    sr.update({"id": "sr1", "status": status, "meta": {**sr["meta"], "versionId": "2"}})
    return sr


# --- CarePlan ------------------------------------------------------------------------------------------------------


def test_care_plan_shape() -> None:
    plan = care_plan(draft_id="plan-1", patient_ref="Patient/p1", order_refs=["ServiceRequest/sr1"],
                     author_ref="PractitionerRole/dr1", start=date(2026, 11, 28), end=date(2027, 1, 23),
                     addresses=["Condition/lbp"], goal_refs=["Goal/pain-3"], title="Medical massage plan - low back",
                     now=NOW)
    valid(plan)
    assert (plan["status"], plan["intent"]) == ("active", "plan")
    assert plan["category"][0]["coding"][0]["system"] == US_CORE_CAREPLAN_CATEGORY
    assert plan["activity"] == [{"reference": {"reference": "ServiceRequest/sr1"}}]
    assert plan["period"] == {"start": "2026-11-28", "end": "2027-01-23"}
    assert plan["addresses"] == [{"reference": "Condition/lbp"}] and plan["goal"] == [{"reference": "Goal/pain-3"}]
    assert "Medical massage plan - low back" in plan["text"]["div"]


CARE_PLAN_REFUSALS = [
    ("no-order-in-the-plan", {"order_refs": []}),
    ("activity-must-be-an-order", {"order_refs": ["Procedure/x"]}),
    ("ends-before-it-starts", {"end": date(2026, 11, 1)}),
    ("addresses-must-be-conditions", {"addresses": ["Observation/x"]}),
    ("author-cannot-be-a-patient", {"author_ref": "Patient/p1"}),
]


@pytest.mark.parametrize("changes", [c[1] for c in CARE_PLAN_REFUSALS], ids=[c[0] for c in CARE_PLAN_REFUSALS])
def test_care_plan_refusals(changes: dict[str, Any]) -> None:
    args: dict[str, Any] = {"draft_id": "plan-1", "patient_ref": "Patient/p1", "order_refs": ["ServiceRequest/sr1"],
                            "author_ref": "PractitionerRole/dr1", "start": date(2026, 11, 28), "now": NOW}
    with pytest.raises(InvalidInput):
        care_plan(**{**args, **changes})


def test_care_plan_narrative_is_escaped() -> None:
    plan = care_plan(draft_id="p", patient_ref="Patient/p1", order_refs=["ServiceRequest/sr1"],
                     author_ref="PractitionerRole/dr1", start=date(2026, 11, 28), title="<b>x</b> & y", now=NOW)
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in plan["text"]["div"]


# --- status changes ------------------------------------------------------------------------------------------------

STATUS_CASES = [
    ("hold-an-active-order-for-new-dvt-workup", "active", "hold", "on-hold"),
    ("resume-after-clearance", "on-hold", "resume", "active"),
    ("revoke-an-active-order", "active", "revoke", "revoked"),
    ("revoke-while-on-hold", "on-hold", "revoked", "revoked"),
    ("complete-an-active-order", "active", "complete", "completed"),
    ("complete-while-on-hold", "on-hold", "completed", "completed"),
    ("cannot-resume-an-active-order", "active", "resume", None),
    ("cannot-hold-a-revoked-order", "revoked", "hold", None),
    ("cannot-resume-a-completed-order", "completed", "resume", None),
    ("already-on-hold", "on-hold", "on-hold", None),
    ("unknown-action", "active", "pause", None),
]


@pytest.mark.parametrize("current,action,expected", [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES])
def test_order_status_update(current: str, action: str, expected: str | None) -> None:
    sr = order(current)
    if expected is None:
        with pytest.raises(InvalidInput):
            order_status_update(sr, action)
        return
    out = order_status_update(sr, action, reason_text="New calf swelling; Doppler ordered.",
                              author_ref="PractitionerRole/dr1", now=NOW)
    valid(out)
    assert out["status"] == expected and sr["status"] == current  # input untouched
    assert out["meta"]["versionId"] == "2"  # the caller PUTs with If-Match on the version it read
    assert out["note"][-1]["text"].endswith("New calf swelling; Doppler ordered.")
    assert out["note"][-1]["time"] == "2026-12-10T15:00:00Z"


TASK_FOLLOW_CASES = [
    ("order-on-hold-pauses-the-task", "in-progress", "on-hold", "on-hold"),
    ("revoked-order-cancels-the-task", "ready", "revoked", "cancelled"),
    ("completed-order-completes-the-task", "in-progress", "completed", "completed"),
    ("resume-with-no-sessions-is-ready-again", "on-hold", "active", "ready"),
    ("resume-of-a-running-task-changes-nothing", "in-progress", "active", None),
    ("a-cancelled-task-stays-cancelled", "cancelled", "on-hold", None),
]


@pytest.mark.parametrize("task_status,order_status,expected", [c[1:] for c in TASK_FOLLOW_CASES],
                         ids=[c[0] for c in TASK_FOLLOW_CASES])
def test_task_follows_order(task_status: str, order_status: str, expected: str | None) -> None:
    task = fulfillment_task(DRAFT, order_ref="ServiceRequest/sr1", now=NOW, owner_ref="PractitionerRole/lmt1")
    task["status"] = task_status
    out = task_follow_order(task, order_status, now=NOW)
    if expected is None:
        assert out is None
    else:
        assert out is not None and out["status"] == expected
        valid(out)


# --- modification --------------------------------------------------------------------------------------------------


def test_modify_schedule_rewrites_timing_quantity_and_words() -> None:
    out = modify_order(order(), schedule=Schedule(2, 4, 45), reason_text="More often, shorter.",
                       author_ref="PractitionerRole/dr1", now=NOW)
    valid(out)
    repeat = out["occurrenceTiming"]["repeat"]
    assert (repeat["frequency"], repeat["boundsDuration"]["value"], repeat["duration"], repeat["count"]) == (2, 4, 45, 8)
    assert out["quantityQuantity"]["value"] == 8
    schedule_details = [d for d in out["orderDetail"] if d["coding"][0]["code"] == "schedule"]
    assert [d["text"] for d in schedule_details] == ["twice a week for 4 weeks (8 sessions), 45-minute sessions"]
    assert out["identifier"] == order()["identifier"]


def test_modify_technique_and_sites() -> None:
    out = modify_order(order(), technique="myofascial-release", sites=["77568009"])
    valid(out)
    assert [c["code"] for c in out["code"]["coding"]] == ["97140", "myofascial-release"]
    assert out["code"]["text"] == "Myofascial release: Back"
    assert [b["text"] for b in out["bodySite"]] == ["Back"]
    assert not any(e["url"] == TARGET_BODY_STRUCTURE for e in out.get("extension", []))
    only_tech = modify_order(order(), technique="swedish")
    assert only_tech["code"]["text"] == "Swedish massage: Lower back; Right thigh"


MODIFY_REFUSALS = [
    ("revoked-order-cannot-change", {"sr_status": "revoked", "technique": "swedish"}),
    ("unknown-technique", {"technique": "reiki"}),
    ("side-missing-for-thigh", {"sites": ["68367000"]}),
    ("no-sites-left", {"sites": []}),
    ("ten-a-week", {"schedule": Schedule(10, 4, 45)}),
]


@pytest.mark.parametrize("args", [c[1] for c in MODIFY_REFUSALS], ids=[c[0] for c in MODIFY_REFUSALS])
def test_modify_refusals(args: dict[str, Any]) -> None:
    status = args.pop("sr_status", "active")
    with pytest.raises(InvalidInput):
        modify_order(order(status), **args)


# --- messages ------------------------------------------------------------------------------------------------------


def msg(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "order_ref": "ServiceRequest/sr1", "patient_ref": "Patient/p1", "sender_ref": "PractitionerRole/lmt1",
        "recipient_ref": "PractitionerRole/dr1", "text": "Session 4 of 8: pain before 5 (was 7).",
        "about_refs": ["Procedure/s4"], "category": "progress", "in_response_to": None, "now": NOW,
        "draft_id": "msg-1"}
    args.update(changes)
    return communication(**args)


def test_communication_shape() -> None:
    c = msg()
    valid(c)
    assert c["status"] == "completed" and c["sent"] == "2026-12-10T15:00:00Z"
    assert c["identifier"] == [{"system": MESSAGE_ID_SYSTEM, "value": "msg-1"}]
    assert c["basedOn"] == [{"reference": "ServiceRequest/sr1"}] and c["about"] == [{"reference": "Procedure/s4"}]
    assert c["payload"] == [{"contentString": "Session 4 of 8: pain before 5 (was 7)."}]
    assert [cat["coding"][0]["code"] for cat in c["category"]] == ["progress", "notification"]
    reply = msg(sender_ref="PractitionerRole/dr1", recipient_ref="PractitionerRole/lmt1", text="Thanks, continue.",
                in_response_to="Communication/c1", category="request", draft_id="msg-2")
    valid(reply)
    assert reply["inResponseTo"] == [{"reference": "Communication/c1"}]


MESSAGE_REFUSALS = [
    ("empty-message", {"text": "   "}),
    ("unknown-category", {"category": "gossip"}),
    ("reply-to-a-procedure", {"in_response_to": "Procedure/x"}),
    ("sender-is-a-patient", {"sender_ref": "Patient/p1"}),
    ("no-draft-id", {"draft_id": ""}),
    ("no-time-zone", {"now": datetime(2026, 12, 10, 15, 0)}),
]


@pytest.mark.parametrize("changes", [c[1] for c in MESSAGE_REFUSALS], ids=[c[0] for c in MESSAGE_REFUSALS])
def test_message_refusals(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        msg(**changes)
