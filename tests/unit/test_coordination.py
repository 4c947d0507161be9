"""Coordination: plan rows (sessions vs planned, adherence, gaps, pain trend, not-done), message threads, and the
attention ordering of the physician's panel. The data is written by our own builders and then "stored" the way a
FHIR server would (ids assigned, urn:uuid references rewritten), so the round trip is tested too."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_massage.builders.messages import communication
from fhir_massage.builders.order import order_transaction
from fhir_massage.builders.session import SessionNote, session_transaction
from fhir_massage.coordination import (
    PlanRow,
    PlanStats,
    adherence,
    attention,
    pain_trend,
    PainPoint,
    physician_refs,
    plan_rows,
    ref_key,
    threads,
)
from fhir_massage.orders_model import OrderDraft

AUTHORED = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)  # a Monday
DRAFT = OrderDraft(
    draft_id="order-1", patient_ref="Patient/p1", requester_ref="PractitionerRole/dr1",
    techniques=("lymphatic-drainage",), sites=("53120007:left",), frequency=2, duration_weeks=6,
    session_minutes=45, authored=AUTHORED, reason_text="Lymphedema, left arm")


class Server:
    """Just enough of a FHIR server for round trips: ids per type, urn:uuid references rewritten, PUT replaces."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def transact(self, bundle: dict[str, Any]) -> None:
        urns: dict[str, str] = {}
        for e in bundle["entry"]:
            res = e["resource"]
            if e["request"]["method"] == "POST":
                urns[e["fullUrl"]] = f"{res['resourceType']}/{next(self._ids)}"
            else:
                urns[e["request"]["url"]] = e["request"]["url"]
        for e in bundle["entry"]:
            res = self._rewrite(copy.deepcopy(e["resource"]), urns)
            key = urns[e.get("fullUrl") or e["request"]["url"]]
            version = int((self.store.get(key, {}).get("meta") or {}).get("versionId", "0")) + 1
            res["id"] = key.split("/")[1]
            res["meta"] = {**res.get("meta", {}), "versionId": str(version)}
            self.store[key] = res

    def _rewrite(self, value: Any, urns: dict[str, str]) -> Any:
        if isinstance(value, dict):
            return {k: (urns.get(v, v) if k == "reference" and isinstance(v, str) else self._rewrite(v, urns))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self._rewrite(v, urns) for v in value]
        return value

    def all(self, rtype: str) -> list[dict[str, Any]]:
        return [r for k, r in self.store.items() if k.startswith(rtype + "/")]

    def one(self, rtype: str) -> dict[str, Any]:
        (only,) = self.all(rtype)
        return only


def at(day: int, hour: int = 9) -> datetime:
    return datetime.combine(AUTHORED.date() + timedelta(days=day), time(hour), tzinfo=timezone.utc)


def ordered(server: Server, draft: OrderDraft = DRAFT, findings: list[dict[str, Any]] | None = None) -> None:
    server.transact(order_transaction(draft, findings or [], AUTHORED, owner_ref="PractitionerRole/lmt1"))


def session(server: Server, day: int, *, before: int | None = None, after: int | None = None,
            not_done: str | None = None, n: int | None = None) -> None:
    sr = server.one("ServiceRequest")
    task = server.one("Task")
    note = SessionNote(
        draft_id=f"note-{n if n is not None else day}", order_ref=f"ServiceRequest/{sr['id']}",
        task_ref=f"Task/{task['id']}", patient_ref="Patient/p1", performer_ref="PractitionerRole/lmt1",
        start=at(day), end=None if not_done else at(day) + timedelta(minutes=45), technique="lymphatic-drainage",
        sites=("53120007:left",), pain_before=before, pain_after=after,
        status="not-done" if not_done else "completed", status_reason=not_done or "")
    server.transact(session_transaction(note, task, at(day, 11)))


def rows(server: Server, today_day: int) -> list[PlanRow]:
    return plan_rows(server.all("ServiceRequest"), server.all("Task"), server.all("Procedure"),
                     server.all("Observation"), server.all("DetectedIssue"),
                     today=AUTHORED.date() + timedelta(days=today_day))


# --- plan rows -----------------------------------------------------------------------------------------------------


def test_plan_row_round_trip() -> None:
    server = Server()
    ordered(server)
    for day, before, after in ((3, 7, 4), (6, 6, 4), (10, 5, 3), (13, 4, 2)):
        session(server, day, before=before, after=after)
    session(server, 17, not_done="Temperature 38.4 C")
    (row,) = rows(server, 21)
    assert row.techniques == ("lymphatic-drainage",) and row.sites == ("Left upper limb",)
    assert row.schedule_text == "twice a week for 6 weeks (12 sessions), 45-minute sessions"
    assert (row.sessions_done, row.sessions_planned, row.status) == (4, 12, "active")
    assert row.plan_start == date(2026, 11, 2) and row.plan_end == date(2026, 12, 14)
    assert row.expected_sessions == pytest.approx(6.0) and row.adherence == pytest.approx(4 / 6)
    assert row.last_session == date(2026, 11, 15)
    assert [(p.before, p.after) for p in row.pain.points] == [(7, 4), (6, 4), (5, 3), (4, 2)]
    assert row.pain.change == -3 and row.pain.clinically_important and not row.pain.worse
    assert [(n.date, n.reason) for n in row.not_done] == [(date(2026, 11, 19), "Temperature 38.4 C")]
    assert row.task_status == "in-progress" and row.warnings == ()
    assert not row.ending_soon and not row.period_over


ADHERENCE_CASES = [
    # (id, sessions on days, today as day, expected adherence or None, open gap?)
    ("on-plan-twice-weekly", [1, 4, 8, 11, 15, 18], 21, 1.0, False),
    ("too-early-to-tell-day-2", [], 2, None, False),
    ("no-session-in-3-weeks", [], 21, 0.0, True),
    ("slow-start-then-regular", [10, 13, 17, 20], 21, 4 / 6, False),
    ("stopped-coming-after-week-1", [1, 4], 21, 2 / 6, True),
    ("window-over-counts-only-the-6-plan-weeks", [1, 4, 8, 11, 15, 18, 22, 25, 29, 32, 36, 39], 60, 1.0, False),
]


@pytest.mark.parametrize("days,today,expected,open_gap", [c[1:] for c in ADHERENCE_CASES],
                         ids=[c[0] for c in ADHERENCE_CASES])
def test_adherence_and_gaps(days: list[int], today: int, expected: float | None, open_gap: bool) -> None:
    server = Server()
    ordered(server)
    for d in days:
        session(server, d)
    (row,) = rows(server, today)
    if expected is None:
        assert row.adherence is None
    else:
        assert row.adherence == pytest.approx(expected)
    assert any(g.open for g in row.gaps) == open_gap


def test_gap_between_sessions_is_flagged() -> None:
    server = Server()
    ordered(server)
    for d in (1, 4, 16, 19):  # 12 days between day 4 and 16; twice weekly expects 3.5, flag above 7
        session(server, d)
    (row,) = rows(server, 20)
    assert [(g.start.day, g.end.day, g.days, g.open) for g in row.gaps] == [(6, 18, 12, False)]


def test_ending_soon_and_period_over() -> None:
    server = Server()
    ordered(server)
    (row,) = rows(server, 40)
    assert row.ending_soon and not row.period_over
    (row,) = rows(server, 45)
    assert row.period_over and not row.ending_soon


PAIN_CASES = [
    ("two-point-drop-is-clinically-important", [7, 6, 5], -2, True, False),
    ("one-point-drop-from-3-is-a-third", [3, 2], -1, True, False),
    ("one-point-drop-from-8-is-not", [8, 7], -1, False, False),
    ("pain-up-two-points-is-worse", [4, 5, 6], 2, False, True),
    ("single-score-no-trend", [5], None, False, False),
]


@pytest.mark.parametrize("befores,change,important,worse", [c[1:] for c in PAIN_CASES], ids=[c[0] for c in PAIN_CASES])
def test_pain_trend(befores: list[int], change: int | None, important: bool, worse: bool) -> None:
    points = [PainPoint(date(2026, 11, 3 + i), b, None, f"Procedure/{i}") for i, b in enumerate(befores)]
    trend = pain_trend(points)
    assert (trend.change, trend.clinically_important, trend.worse) == (change, important, worse)
    assert trend.note


def test_forgiving_reading_of_odd_ehr_data() -> None:
    sr = {"resourceType": "ServiceRequest", "id": "x", "status": "active", "authoredOn": "2026-11",
          "code": {"text": "Massage"}}
    proc = {"resourceType": "Procedure", "id": "p", "status": "completed",
            "basedOn": [{"reference": "https://ehr.example/fhir/ServiceRequest/x/_history/3"}]}
    (row,) = plan_rows([sr, {"resourceType": "Patient"}, "junk"], [], [proc, proc], [], today=date(2026, 12, 1))
    assert row.sessions_done == 1 and row.adherence is None and row.title == "Massage"
    assert any("no start date" in w for w in row.warnings) and any("no date" in w for w in row.warnings)
    assert ref_key("https://ehr.example/fhir/ServiceRequest/x/_history/3") == "ServiceRequest/x"
    assert ref_key({"display": "no reference"}) is None


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=20), st.integers(min_value=0, max_value=90),
       st.integers(min_value=1, max_value=7), st.integers(min_value=0, max_value=30))
def test_adherence_is_monotone(days: list[int], today: int, frequency: int, later: int) -> None:
    start, end = date(2026, 11, 2), date(2026, 11, 2) + timedelta(weeks=6)
    done = len([d for d in days if d <= today])
    t = start + timedelta(days=today)
    _, a, per_week = adherence(done, frequency, start, end, t)
    _, more, more_per_week = adherence(done + 1, frequency, start, end, t)
    _, after, after_per_week = adherence(done, frequency, start, end, t + timedelta(days=later))
    if a is not None:
        assert more is not None and more >= a  # one more session never lowers adherence
        assert after is not None and after <= a  # time passing without sessions never raises it
    assert more_per_week >= per_week and after_per_week <= per_week  # type: ignore[operator]


# --- threads and attention ------------------------------------------------------------------------------------------


def _message(cid: str, sender: str, sent_day: int, category: str = "progress", reply_to: str | None = None,
             order: str = "ServiceRequest/1") -> dict[str, Any]:
    recipient = "PractitionerRole/dr1" if sender != "PractitionerRole/dr1" else "PractitionerRole/lmt1"
    c = communication(order_ref=order, patient_ref="Patient/p1", sender_ref=sender, recipient_ref=recipient,
                      text=f"message {cid}", category=category, in_response_to=reply_to, now=at(sent_day),
                      draft_id=cid)
    c["id"] = cid
    return c


def test_threads_and_unread() -> None:
    comms = [
        _message("a", "PractitionerRole/lmt1", 5),
        _message("b", "PractitionerRole/dr1", 6, reply_to="Communication/a"),
        _message("c", "PractitionerRole/lmt1", 7, category="condition-change"),
        _message("d", "PractitionerRole/lmt1", 8, reply_to="Communication/b"),
        _message("e", "PractitionerRole/lmt1", 9, category="request", reply_to="Communication/c"),
    ]
    # EHRs may answer with absolute references
    comms[3]["inResponseTo"] = [{"reference": "https://ehr.example/fhir/Communication/b"}]
    found = threads(list(reversed(comms)), physician_refs=["PractitionerRole/dr1"])
    assert [(t.root_ref, [m.ref for m in t.messages], t.unread) for t in found] == [
        ("Communication/c", ["Communication/c", "Communication/e"], True),
        ("Communication/a", ["Communication/a", "Communication/b", "Communication/d"], True),
    ]
    assert found[0].categories == frozenset({"condition-change", "request"})
    answered = threads(comms[:2], physician_refs=["PractitionerRole/dr1"])
    assert [t.unread for t in answered] == [False]


def _role(rid: str, practitioner: str | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "PractitionerRole", "id": rid, **extra}
    if practitioner:
        out["practitioner"] = {"reference": practitioner}
    return out


@pytest.mark.parametrize("user, found, expected", [
    # a Practitioner user: their roles (an absolute reference, an inactive role too), never a colleague's
    ("Practitioner/dr1", [_role("r1", "Practitioner/dr1"), _role("r2", "https://ehr.example/fhir/Practitioner/dr1",
                                                                 active=False),
                          _role("x", "Practitioner/dr2"), {"resourceType": "Practitioner", "id": "dr1"}],
     ["Practitioner/dr1", "PractitionerRole/r1", "PractitionerRole/r2"]),
    # a PractitionerRole user: that role first, the practitioner's other roles, then the practitioner
    ("PractitionerRole/r1", [_role("r1", "Practitioner/dr1"), _role("r3", "Practitioner/dr1"),
                             _role("x", "Practitioner/dr2")],
     ["PractitionerRole/r1", "PractitionerRole/r3", "Practitioner/dr1"]),
    # a role naming no practitioner: just the role (nothing guessed)
    ("PractitionerRole/r1", [_role("r1", None), _role("x", "Practitioner/dr2")], ["PractitionerRole/r1"]),
    # nothing found (no PractitionerRole access): the user's own reference
    ("Practitioner/dr1", [], ["Practitioner/dr1"]),
    ("https://ehr.example/fhir/Practitioner/dr1", [], ["Practitioner/dr1"]),
    (None, [_role("r1", "Practitioner/dr1")], []),
    ("not a reference", [], []),
])
def test_physician_refs(user: str | None, found: list[dict[str, Any]], expected: list[str]) -> None:
    assert physician_refs(user, found) == expected


def test_a_reply_under_another_of_the_physicians_references_answers_the_thread() -> None:
    comms = [_message("a", "PractitionerRole/lmt1", 5), _message("b", "PractitionerRole/dr1", 6,
                                                                  reply_to="Communication/a")]
    refs = physician_refs("Practitioner/dr1", [_role("dr1", "Practitioner/dr1")])
    assert [t.unread for t in threads(comms, physician_refs=refs)] == [False]
    assert [t.unread for t in threads(comms, physician_refs=["Practitioner/dr1"])] == [True]


def test_attention_orders_the_panel() -> None:
    def row(ref: str, **changes: Any) -> PlanRow:
        # adherence and session counts are the plan's (PlanStats, counted in visits): changed there (intended:
        # attention now reads a plan's numbers once, not each technique's)
        server = Server()
        ordered(server)
        (base,) = rows(server, 3)
        assert base.plan is not None
        plan_level = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(PlanStats)}}
        return dataclasses.replace(base, order_ref=ref, plan_key=ref, plan=dataclasses.replace(base.plan, **plan_level),
                                   **{k: v for k, v in changes.items() if k not in plan_level})

    quiet = row("ServiceRequest/quiet")
    ending = row("ServiceRequest/ending", ending_soon=True, plan_end=date(2026, 12, 14))
    lagging = row("ServiceRequest/lagging", adherence=0.3, expected_sessions=6.0, sessions_done=2)
    messaged = row("ServiceRequest/messaged")
    flagged = row("ServiceRequest/flagged")
    finding = {"resourceType": "DetectedIssue", "id": "f", "severity": "high",
               "implicated": [{"reference": "ServiceRequest/flagged"}],
               "detail": "Acute deep vein thrombosis of the left leg recorded 2026-11-20."}
    unread = threads([_message("m", "PractitionerRole/lmt1", 5, category="condition-change",
                               order="ServiceRequest/messaged")], physician_refs=["PractitionerRole/dr1"])
    ranked = attention([quiet, ending, lagging, messaged, flagged], [finding], unread)
    assert [a.order_ref for a in ranked] == ["ServiceRequest/flagged", "ServiceRequest/messaged",
                                             "ServiceRequest/lagging", "ServiceRequest/ending", "ServiceRequest/quiet"]
    assert ranked[0].reasons[0].startswith("New finding (high): Acute deep vein thrombosis")
    assert "change in condition" in ranked[1].reasons[0]
    assert ranked[-1].score == 0 and ranked[-1].reasons == ()


def test_finding_without_an_order_is_about_the_patient() -> None:
    ranked = attention([], [{"resourceType": "DetectedIssue", "severity": "moderate", "detail": "Pregnant, 22 weeks"}])
    assert ranked == [ranked[0]] and ranked[0].order_ref is None and ranked[0].score == 60


# --- visits: one note for several techniques ------------------------------------------------------------------------

PLAN_DRAFT = dataclasses.replace(DRAFT, draft_id="order-2", techniques=("swedish", "myofascial-release"),
                                 sites=("37822005",), frequency=2, duration_weeks=4)


def visit(server: Server, day: int, techniques: tuple[str, ...], *, pain: tuple[int, int] | None = None,
          not_done: str | None = None) -> None:
    from fhir_massage.builders.session import VisitNote, VisitOrder, visit_transaction
    orders, tasks = [], {}
    for task in server.all("Task"):
        sr = server.store[task["focus"]["reference"]]
        technique = next(c["code"] for c in sr["code"]["coding"] if c["system"].endswith("massage-technique"))
        orders.append(VisitOrder(technique, f"ServiceRequest/{sr['id']}", f"Task/{task['id']}"))
        tasks[f"Task/{task['id']}"] = task
    note = VisitNote(draft_id=f"visit-{day}", orders=tuple(orders), patient_ref="Patient/p1",
                     performer_ref="PractitionerRole/lmt1", start=at(day),
                     end=None if not_done else at(day) + timedelta(minutes=45),
                     status="not-done" if not_done else "completed", status_reason=not_done or "",
                     techniques=() if not_done else techniques, sites=("37822005",),
                     pain_before=pain[0] if pain else None, pain_after=pain[1] if pain else None)
    server.transact(visit_transaction(note, tasks, at(day, 11)))


def test_plan_of_two_techniques_counts_visits_round_trip() -> None:
    server = Server()
    ordered(server, PLAN_DRAFT)
    visit(server, 1, ("swedish", "myofascial-release"), pain=(7, 5))
    visit(server, 4, ("swedish", "myofascial-release"), pain=(6, 4))
    visit(server, 8, ("swedish",), pain=(4, 3))
    visit(server, 11, (), not_done="Patient cancelled: flu")
    found = rows(server, 12)
    assert len(found) == 2 and found[0].plan is found[1].plan and found[0].plan_key == "order-2"
    plan = found[0].plan
    assert plan is not None
    by_technique = {r.techniques[0]: r for r in found}
    assert by_technique["swedish"].sessions_done == 3 and by_technique["myofascial-release"].sessions_done == 2
    assert (plan.sessions_done, plan.sessions_planned) == (3, 8)
    assert plan.technique_visits == (("swedish", 3), ("myofascial-release", 2))
    # 2/week since 2026-11-02 -> 12 days = 3.43 expected: 3 visits, not 5 Procedures
    assert plan.adherence == pytest.approx(3 / (2 * 12 / 7))
    assert [(p.date.day, p.before, p.after) for p in plan.pain.points] == [(3, 7, 5), (6, 6, 4), (10, 4, 3)]
    assert [n.reason for n in plan.not_done] == ["Patient cancelled: flu"]
    # both Tasks list the visits they took part in; each row agrees with its Task (no warning)
    assert all(r.warnings == () for r in found)
    reasons = [text for a in attention(found) for text in a.reasons]
    assert reasons.count("Session not done on 2026-11-13: Patient cancelled: flu") == 1  # once for the plan
