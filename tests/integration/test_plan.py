"""The plan area against the real sandbox on loopback: what the physician sees (counts, adherence, pain values,
sessions not done, a contraindication that appeared after signing shown first), replies, status changes with the
Task following, the version-conflict page (nothing overwritten), the panel with and without user/ scopes, and the
round trips of the view not growing with the number of sessions."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from html import unescape
from urllib.parse import urlsplit

import pytest
import requests

from fhir_massage.fhir import FhirClient, StaticToken
from fhir_massage.smart import default_scopes
from smart_app import plan as plan_area
from tests.fixtures.smart_sandbox import create_launch, get_token, start_smart_sandbox
from tests.integration.test_plan_helpers import (DR_REF, DR_ROLE_REF, LMT_REF, PHYSICIAN, THERAPIST, document,
                                                 message, sign_order, writer)

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)
USER_SCOPES = ("launch openid fhirUser online_access " + " ".join(
    f"user/{t}.rs" for t in plan_area.PANEL_NEEDS + plan_area.RESCREEN_NEEDS + ("Practitioner", "PractitionerRole",
                                                                              "Medication")))


@pytest.fixture(scope="module")
def sandbox():
    sb = start_smart_sandbox()
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def w(sandbox):
    return writer(sandbox)


def launch(sandbox, app, patient: str, user: str = PHYSICIAN) -> tuple[requests.Session, str]:
    """EHR launch with a browser-like session; returns (session, the plan page URL)."""
    browser = requests.Session()
    out = create_launch(sandbox, app.client_id, user, patient)
    r = browser.get(out["launch_url"], timeout=30)
    assert r.status_code == 200, r.text[:500]
    lsid = re.match(r"^/p/([^/]+)/", urlsplit(r.url).path).group(1)
    return browser, f"{app.url}/p/{lsid}/plan/"


def forms(html: str) -> list[dict]:
    """Each <form> of the page: its action, hidden fields and submit buttons."""
    out = []
    for m in re.finditer(r'<form method="post" action="([^"]+)"[^>]*>(.*?)</form>', html, re.S):
        body = m.group(2)
        hidden = {unescape(n): unescape(v) for n, v in
                  re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body)}
        buttons = re.findall(r'<button type="submit" name="action" value="([^"]+)"', body)
        out.append({"action": unescape(m.group(1)), "hidden": hidden, "buttons": buttons, "body": body})
    return out


def status_form(html: str, plan_key: str) -> dict:
    return next(f for f in forms(html) if f["hidden"].get("plan") == plan_key and f["buttons"])


def post(browser, app, form: dict, **fields) -> requests.Response:
    data = {**form["hidden"], **fields}
    return browser.post(app.url + form["action"], data=data, timeout=30)


def read(w: FhirClient, ref: str) -> dict:
    rtype, rid = ref.split("/")
    return w.read(rtype, rid)


def task_of(w: FhirClient, order_ref: str) -> dict:
    return w.search_all("Task", {"focus": order_ref})[0]


def fever_today(w: FhirClient, patient: str) -> None:
    """A temperature of 38.9 °C charted after the order was signed (screening: defer massage with fever)."""
    w.create({"resourceType": "Observation", "status": "final",
              "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                        "code": "vital-signs"}]}],
              "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"}],
                       "text": "Temperature"},
              "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": NOW.isoformat(timespec="seconds"),
              "valueQuantity": {"value": 38.9, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}})


def test_plan_view_shows_counts_adherence_pain_not_done_and_the_new_finding_first(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-tom-becker", authored=NOW - timedelta(days=14))
    for i, (before, after) in enumerate([(7, 4), (6, 3), (5, 2)]):
        document(w, plan, start=NOW - timedelta(days=12 - 3 * i), pain=(before, after))
    document(w, plan, start=NOW - timedelta(days=2), not_done="Patient had a fever of 38.9")
    message(w, plan, "Pain is easing; she asked about adding her neck.")
    fever_today(w, "demo-tom-becker")

    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-tom-becker")
    r = browser.get(url, timeout=30)
    assert r.status_code == 200, r.text[:1000]
    html = r.text
    assert re.search(r'data-testid="sessions-done">3 of 12<', html)
    # 3 sessions in 2 weeks against 2/week = 4 expected: 75 %
    assert re.search(r'data-testid="adherence"><span class="adh adh--mid">75%</span>', html)
    table = re.search(r'data-testid="pain-table">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r"<tr><th scope=\"row\">([\d-]+)</th><td>(\d+)</td><td>(\d+)</td><td>([+-]\d+)</td></tr>", table)
    assert [r_[1:] for r_ in rows] == [("7", "4", "-3"), ("6", "3", "-3"), ("5", "2", "-3")]
    assert re.search(r'<svg class="pain-chart"[^>]* role="img" aria-labelledby="pain-0-title pain-0-desc"', html)
    assert '<title id="pain-0-title">' in html and "3 sessions with pain scores" in html
    assert "Patient had a fever of 38.9" in re.search(r'data-testid="not-done">(.*?)</ul>', html, re.S).group(1)
    assert "Pain is easing" in html and "Awaiting your reply" in html
    # the contraindication that appeared after signing comes before everything else about the plan
    new_at = html.index('data-testid="new-findings"')
    assert new_at < html.index('data-testid="plan"') and new_at < html.index('data-testid="sessions-done"')
    section = html[new_at:html.index("</section>", new_at)]
    assert "fever" in section.lower() and 'role="alert"' in html[new_at - 60:new_at]


def test_reply_writes_a_communication_in_response_to_the_therapist(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-helen-brooks", authored=NOW - timedelta(days=7))
    document(w, plan, start=NOW - timedelta(days=3), pain=(6, 4))  # Sam gave a session: his role is on record
    original = message(w, plan, "New bruise on the left calf; I skipped the legs.", category="condition-change")
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-helen-brooks")
    html = browser.get(url, timeout=30).text
    form = next(f for f in forms(html) if f["action"].endswith("/plan/reply"))
    assert form["hidden"]["in_response_to"] == f"Communication/{original['id']}"
    r = post(browser, app, form, text="Thanks. Hold the legs until I have seen her.", category="request")
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
    replies = [c for c in w.search_all("Communication", {"based-on": plan.order_ref})
               if c.get("inResponseTo")]
    assert len(replies) == 1
    reply = replies[0]
    assert reply["inResponseTo"] == [{"reference": f"Communication/{original['id']}"}]
    assert reply["sender"]["reference"] == DR_REF and reply["recipient"] == [{"reference": LMT_REF}]
    assert reply["payload"][0]["contentString"] == "Thanks. Hold the legs until I have seen her."
    # the thread is answered now: no more "awaiting your reply" on it
    page = browser.get(url, timeout=30).text
    assert "Awaiting your reply" not in page
    # the section holds both sides, so it is "Messages", each message with its author and role
    assert re.search(r'<h3 id="msg-1-h">Messages</h3>', page) and "Messages from the therapist" not in page
    authors = re.findall(r'data-testid="message-author">([^<]+)</strong>( <span class="message__role" '
                         r'data-testid="message-role">([^<]+)</span>)?', page)
    assert [(a, role) for a, _, role in authors] == [("Sam Reyes", "Massage therapist"), ("Ada Grey", "Physician")], \
        authors
    # a re-sent form (double click, lost answer) writes nothing new: the draft id keys a conditional create
    post(browser, app, form, text="Thanks. Hold the legs until I have seen her.", category="request")
    assert len([c for c in w.search_all("Communication", {"based-on": plan.order_ref}) if c.get("inResponseTo")]) == 1


def test_hold_resume_complete_and_revoke_with_the_task_following(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-eleanor-price", authored=NOW - timedelta(days=10))
    other = sign_order(w, "demo-eleanor-price", techniques=("stretching",), authored=NOW - timedelta(days=9))
    document(w, plan, start=NOW - timedelta(days=8), pain=(5, 3))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-eleanor-price")
    order, task = plan.order_ref, f"Task/{task_of(w, plan.order_ref)['id']}"

    def act(key: str, action: str, **extra) -> requests.Response:
        form = status_form(browser.get(url, timeout=30).text, key)
        assert action in form["buttons"], (action, form["buttons"])
        r = post(browser, app, form, action=action, **extra)
        assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
        return r

    act(plan.draft_id, "hold", reason="Fracture follow-up pending")
    assert read(w, order)["status"] == "on-hold" and read(w, task)["status"] == "on-hold"
    assert read(w, order)["note"][-1]["text"] == "On hold: Fracture follow-up pending"
    act(plan.draft_id, "resume")
    assert read(w, order)["status"] == "active" and read(w, task)["status"] == "in-progress"  # a session was done
    act(plan.draft_id, "complete")
    assert read(w, order)["status"] == "completed" and read(w, task)["status"] == "completed"
    act(other.draft_id, "revoke", reason="Not needed")
    other_task = task_of(w, other.order_ref)
    assert read(w, other.order_ref)["status"] == "revoked" and other_task["status"] == "cancelled"
    # every change is signed: a Provenance (UPDATE) names the physician and the order
    provs = w.search_all("Provenance", {"target": other.order_ref})
    assert any(p["activity"]["coding"][0]["code"] == "UPDATE" and p["agent"][0]["who"]["reference"] == DR_REF
               for p in provs)
    # a finished plan offers no more status changes
    assert not any(f["hidden"].get("plan") == plan.draft_id and f["buttons"]
                   for f in forms(browser.get(url, timeout=30).text))


def test_modify_sites_and_schedule_and_the_task_follows(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-ray-okafor", authored=NOW - timedelta(days=3))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-ray-okafor")
    html = browser.get(url, timeout=30).text
    form = next(f for f in forms(html) if f["hidden"].get("action") == "modify")
    site = re.search(r'name="site" value="([^"]+)" checked', form["body"]).group(1)
    r = post(browser, app, form, site=site, add_site="", frequency="1", weeks="4", minutes="30",
             reason="Shorter course", **{f"technique-{plan.orders[0]['id']}": "swedish"})
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
    sr = read(w, plan.order_ref)
    assert sr["occurrenceTiming"]["repeat"]["frequency"] == 1 and sr["quantityQuantity"]["value"] == 4
    task = task_of(w, plan.order_ref)
    assert task["restriction"]["repetitions"] == 4 and task["businessStatus"]["text"] == "0 of 4 sessions done"


def test_version_conflict_shows_both_versions_and_overwrites_nothing(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-maria-santos", authored=NOW - timedelta(days=5))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-maria-santos")
    stale = status_form(browser.get(url, timeout=30).text, plan.draft_id)  # both updates start from this version
    first = post(browser, app, stale, action="hold", reason="Waiting for obstetric clearance")
    assert first.status_code == 200 and read(w, plan.order_ref)["status"] == "on-hold"
    version_after_first = read(w, plan.order_ref)["meta"]["versionId"]

    second = post(browser, app, stale, action="revoke", reason="Duplicate order")
    assert second.status_code == 409, second.text[:800]
    html = second.text
    assert 'data-testid="conflict"' in html and "not saved" in html
    status_row = re.search(r'<tr class="([^"]*)" data-field="Status">(.*?)</tr>', html, re.S)
    assert "diff--theirs" in status_row.group(1)  # someone else changed the status
    assert re.search(r'data-testid="wanted">revoked<', status_row.group(2))
    assert re.search(r'data-testid="current">on-hold<', status_row.group(2))
    notes_row = re.search(r'data-field="Notes">(.*?)</tr>', html, re.S).group(1)
    assert "Revoked: Duplicate order" in notes_row and "On hold: Waiting for obstetric clearance" in notes_row
    # nothing overwritten
    sr = read(w, plan.order_ref)
    assert sr["status"] == "on-hold" and sr["meta"]["versionId"] == version_after_first
    assert task_of(w, plan.order_ref)["status"] == "on-hold"
    # "apply my change on top of the new version": the revoke goes through against the current version
    again = next(f for f in forms(html) if f["action"].endswith("/plan/action"))
    assert again["hidden"][f"v-{plan.orders[0]['id']}"] == version_after_first
    r = post(browser, app, again)
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
    sr = read(w, plan.order_ref)
    assert sr["status"] == "revoked" and [n["text"] for n in sr["note"]][-2:] == [
        "On hold: Waiting for obstetric clearance", "Revoked: Duplicate order"]
    assert task_of(w, plan.order_ref)["status"] == "cancelled"


def test_therapist_sees_the_plan_but_no_order_actions(sandbox, w, make_app_server):
    sign_order(w, "demo-frank-delgado", authored=NOW - timedelta(days=5))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-frank-delgado", user="lmt-sam-reyes")
    html = browser.get(url, timeout=30).text
    assert 'data-testid="plan"' in html and not forms(html)
    r = browser.post(url + "action", data={"plan": "x", "action": "hold"}, timeout=30)
    assert r.status_code in (400, 403)  # CSRF-less or forbidden: never a change


def test_panel_without_user_scopes_says_which_to_ask_for(sandbox, make_app_server):
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-tom-becker")
    r = browser.get(url + "panel", timeout=30)
    assert r.status_code == 200
    needed = re.search(r'data-testid="missing-scopes">(.*?)</ul>', r.text, re.S).group(1)
    assert "user/ServiceRequest.rs" in needed and "user/Communication.rs" in needed


def test_without_user_scopes_the_plan_has_no_dead_end_panel_link(sandbox, make_app_server):
    """A patient launch grants patient/ scopes only: the panel could only say what is missing, so the plan page
    shows no link to it, just one muted line naming what the EHR would have to grant."""
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-tom-becker")
    html = browser.get(url, timeout=30).text
    assert 'data-testid="panel-link"' not in html and "All my patients with massage orders</a>" not in html
    line = re.search(r'data-testid="panel-unavailable" data-missing-scopes="([^"]*)">(.*?)</p>', html, re.S)
    assert line and "user/ServiceRequest.rs" in line.group(1) and "user/Communication.rs" in line.group(1)
    assert "patient-level access only" in line.group(2)
    assert "Read from the EHR in" not in html and re.search(r'data-round-trips="\d+"', html)


def test_an_empty_plan_offers_to_order_massage(make_app_server):
    """No orders yet: a physician who may order (the orders area's role and scopes, as the launch page decides)
    gets the link to order; a therapist does not."""
    sb = start_smart_sandbox()
    try:
        app = make_app_server(sb)
        browser, url = launch(sb, app, "demo-maria-santos")
        html = browser.get(url, timeout=30).text
        assert 'data-testid="no-orders"' in html
        link = re.search(r'<a href="([^"]+)" data-testid="order-link">Order massage</a>', html)
        assert link and link.group(1).endswith("/orders/"), html[-2000:]
        assert browser.get(app.url + unescape(link.group(1)), timeout=30).status_code == 200
        browser, url = launch(sb, app, "demo-maria-santos", user=THERAPIST)
        html = browser.get(url, timeout=30).text
        assert 'data-testid="no-orders"' in html and 'data-testid="order-link"' not in html
    finally:
        sb.stop()


def test_panel_with_user_scopes_lists_patients_by_attention(sandbox, w, make_app_server):
    calm = sign_order(w, "demo-dana-whitfield", techniques=("lymphatic-drainage",), sites=("53120007:right",),
                      authored=NOW - timedelta(days=2))
    worried = sign_order(w, "demo-frank-delgado", authored=NOW - timedelta(days=21))
    message(w, worried, "He looked unwell today.", category="condition-change")
    app = make_app_server(sandbox, registration={"scopes": USER_SCOPES})
    browser, url = launch(sandbox, app, "demo-dana-whitfield")
    assert 'data-testid="panel-link"' in browser.get(url, timeout=30).text  # usable: linked from the plan
    r = browser.get(url + "panel", timeout=30)
    assert r.status_code == 200, r.text[:800]
    order = re.findall(r'<tr data-patient="(Patient/[^"]+)"', r.text)
    assert "Patient/demo-frank-delgado" in order and "Patient/demo-dana-whitfield" in order
    assert order.index("Patient/demo-frank-delgado") < order.index("Patient/demo-dana-whitfield")
    frank = re.search(r'data-patient="Patient/demo-frank-delgado"[^>]*>(.*?)</tr>', r.text, re.S).group(1)
    assert "unread message" in frank and "change in condition" in frank
    assert calm.order_ref  # the calm plan is listed but below


def test_round_trips_do_not_grow_with_sessions(sandbox, w):
    small = sign_order(w, "demo-tom-becker", authored=NOW - timedelta(days=200))
    tok = get_token(sandbox, "test-public", PHYSICIAN, "demo-tom-becker",
                    scopes="launch openid fhirUser user/*.rs")["access_token"]
    reader = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok))
    before = plan_area.load(reader, "demo-tom-becker")
    big = sign_order(w, "demo-tom-becker", frequency=3, weeks=20, authored=NOW - timedelta(days=190))
    for i in range(50):
        document(w, big, start=NOW - timedelta(days=180 - 3 * i), pain=(8 - i % 5, 4 - i % 4))
    after = plan_area.load(reader, "demo-tom-becker")
    assert len(after.procedures) >= len(before.procedures) + 50 and len(after.observations) >= 100
    assert after.round_trips == before.round_trips <= 2
    assert small.order_ref


def test_a_session_documented_meanwhile_does_not_block_the_hold(sandbox, w, make_app_server):
    """Only the Task moved (the therapist documented a session after the page was read): the orders are as the
    physician saw them, so the hold goes through and the Task follows from its new version."""
    plan = sign_order(w, "demo-maria-santos", authored=NOW - timedelta(days=6))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, "demo-maria-santos")
    form = status_form(browser.get(url, timeout=30).text, plan.draft_id)
    document(w, plan, start=NOW - timedelta(days=1), pain=(4, 2))  # Task version moves on
    r = post(browser, app, form, action="hold")
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
    task = task_of(w, plan.order_ref)
    assert read(w, plan.order_ref)["status"] == "on-hold" and task["status"] == "on-hold"
    assert len(task["output"]) == 1  # the session the therapist wrote is still there


def test_record_a_new_finding_then_mark_it_reviewed(sandbox, w, make_app_server):
    plan = sign_order(w, "demo-dana-whitfield", techniques=("swedish",), sites=("53120007:left",),
                      authored=NOW - timedelta(days=3))
    # marking reviewed updates the DetectedIssue: this registration asks for patient/DetectedIssue.crus
    scopes = default_scopes("v2", standalone=False).replace("patient/DetectedIssue.crs", "patient/DetectedIssue.crus")
    app = make_app_server(sandbox, registration={"scopes": scopes})
    browser, url = launch(sandbox, app, "demo-dana-whitfield")
    html = browser.get(url, timeout=30).text
    # Dana's acute DVT (left leg) was not recorded with this order: it is new, and first on the page
    record = [f for f in forms(html) if f["action"].endswith("/plan/finding") and f["hidden"]["plan"] == plan.draft_id]
    assert record, html[:2000]
    rule = record[0]["hidden"]["rule"]
    r = post(browser, app, record[0], mitigation="")
    assert r.status_code == 200 and "The finding is recorded on the order." in r.text, r.text[:800]
    written = [i for i in w.search_all("DetectedIssue", {"patient": "demo-dana-whitfield"})
               if {"reference": plan.order_ref} in (i.get("implicated") or [])]
    assert len(written) == 1 and written[0]["status"] == "final" and written[0]["author"]["reference"] == DR_REF
    assert rule not in [f["hidden"].get("rule") for f in forms(r.text) if f["action"].endswith("/plan/finding")
                        and f["hidden"]["plan"] == plan.draft_id]
    # now an open issue (no mitigation yet): mark it reviewed
    review = next(f for f in forms(r.text) if f["action"].endswith("/plan/review")
                  and f["hidden"]["issue"] == f"DetectedIssue/{written[0]['id']}")
    r = post(browser, app, review, mitigation="Left leg excluded; cleared by vascular")
    assert r.status_code == 200 and "marked reviewed" in r.text, r.text[:800]
    issue = w.read("DetectedIssue", written[0]["id"])
    assert issue["mitigation"][-1]["action"]["text"] == "Left leg excluded; cleared by vascular"
    assert f"DetectedIssue/{issue['id']}" not in r.text.split('id="oi-')[1].split("</section>")[0]
    # a stale review form (someone changed the finding since) is refused, nothing overwritten
    r = post(browser, app, review, mitigation="again")
    assert r.status_code == 409 and len(w.read("DetectedIssue", written[0]["id"])["mitigation"]) == 1


def test_a_plan_of_two_techniques_counts_visits_once(sandbox, w, make_app_server):
    """One visit note for swedish + myofascial release writes two Procedures; the physician sees one session, and
    each technique's share of the visits (the second visit gave swedish only)."""
    from fhir_massage.builders.session import VisitNote, VisitOrder, visit_transaction
    from tests.integration.test_plan_helpers import default_site

    patient = "95efed54-0648-4faf-a179-9a2b3c45e92d"  # Suzi Bechtelar: this module's only plan for her
    plan = sign_order(w, patient, techniques=("swedish", "myofascial-release"), frequency=2, weeks=4,
                      authored=NOW - timedelta(days=14))
    orders, tasks = [], {}
    for o in plan.orders:
        technique = next(c["code"] for c in o["code"]["coding"] if c["system"].endswith("massage-technique"))
        task = w.search_all("Task", {"focus": f"ServiceRequest/{o['id']}"})[0]
        orders.append(VisitOrder(technique, f"ServiceRequest/{o['id']}", f"Task/{task['id']}"))
    for i, (techniques, pain) in enumerate([(("swedish", "myofascial-release"), (7, 4)),
                                            (("swedish", "myofascial-release"), (6, 3)),
                                            (("swedish",), (5, 3))]):
        tasks = {o.task_ref: w.read("Task", o.task_ref.split("/")[1]) for o in orders}
        start = NOW - timedelta(days=12 - 4 * i)
        note = VisitNote(draft_id=f"visit-{plan.draft_id}-{i}", orders=tuple(orders), patient_ref=f"Patient/{patient}",
                         performer_ref=LMT_REF, start=start, end=start + timedelta(minutes=45),
                         techniques=techniques, sites=(default_site(),), pain_before=pain[0], pain_after=pain[1])
        w.transaction(visit_transaction(note, tasks, start + timedelta(hours=1)))

    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, patient)
    html = browser.get(url, timeout=30).text
    assert re.search(r'data-testid="sessions-done">3 of 8<', html)  # 3 visits, not 5 Procedures nor "max 3"
    # 3 visits in 2 weeks against 2/week = 4 expected: 75 % for the plan
    assert re.search(r'data-testid="adherence"><span class="adh adh--mid">75%</span>', html)
    done = dict(re.findall(r'<th scope="row">([^<]+)</th>\s*<td>.*?</td>\s*<td data-testid="technique-done">([^<]+)<',
                           html, re.S))
    assert done == {"Swedish massage": "in 3 of 3 visits", "Myofascial release": "in 2 of 3 visits"}, done
    table = re.search(r'data-testid="pain-table">(.*?)</table>', html, re.S).group(1)
    assert len(re.findall(r'<tr><th scope="row">', table)) == 3  # one pain point per visit
    # attention speaks of the plan's visits, once: not of myofascial release's 2 Procedures
    assert html.count("Adherence below plan: 3 sessions, 4 expected by now") == 1
    assert "2 sessions, 4 expected" not in html and "Low adherence" not in html


# --- a mistake in a change keeps what was typed ---------------------------------------------------------------

LEONOR, SANA, ALI = ("b9c29481-4cd2-4656-8fda-2b89c32722a5", "19467eb6-583c-444e-8c59-588a8abdce4f",
                     "d00b080d-706e-4cd8-ae87-6531e798b1fd")


def lateral_site() -> str:
    from fhir_massage.orders_model import _sites

    return next(code for code, (_name, lat) in sorted(_sites().items()) if lat)


def field_error(html: str, name: str) -> str:
    m = re.search(rf'<p class="field-error" id="[^"]+" data-error-for="{name}">([^<]+)</p>', html)
    return unescape(m.group(1)) if m else ""


@pytest.mark.parametrize("typed, field, words", [
    ({"site": [], "add_site": ""}, "site", "at least one body site"),
    ({"add_site": "LATERAL", "add_side": ""}, "site", "which side"),
    ({"frequency": "9"}, "frequency", "more than one a day"),
    ({"minutes": "500"}, "minutes", "10 to 120 minutes"),
    ({"weeks": "six"}, "weeks", "whole number"),
])
def test_a_change_mistake_shows_the_page_again_with_what_was_typed(sandbox, w, make_app_server, typed, field, words):
    plan = sign_order(w, ALI, authored=NOW - timedelta(days=4))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, ALI)
    html = browser.get(url, timeout=30).text
    form = next(f for f in forms(html)
                if f["hidden"].get("action") == "modify" and f["hidden"]["plan"] == plan.draft_id)
    site = re.search(r'name="site" value="([^"]+)" checked', form["body"]).group(1)
    version = read(w, plan.order_ref)["meta"]["versionId"]
    reason = f"Typed reason {plan.draft_id[:8]}"
    data = {**form["hidden"], "site": [site], "frequency": "3", "weeks": "5", "minutes": "40", "reason": reason,
            **{k: (lateral_site() if v == "LATERAL" else v) for k, v in typed.items()}}
    r = browser.post(app.url + form["action"], data=data, timeout=30, allow_redirects=False)
    assert r.status_code == 422, (r.status_code, r.text[:800])
    assert words in field_error(r.text, field), (field, field_error(r.text, field), r.text[-3000:])
    assert 'data-testid="change-problems"' in r.text and "not saved" in r.text
    again = next(f for f in forms(r.text) if f["hidden"].get("action") == "modify"
                 and f["hidden"]["plan"] == plan.draft_id)
    # what was typed is in the form again, the other fields too, and the details are open
    assert f'value="{reason}"' in again["body"]
    for name in ("frequency", "weeks", "minutes"):
        if name not in typed:
            assert re.search(rf'name="{name}"[^>]* value="{data[name]}"', again["body"]), name
    assert re.search(r'<details class="modify" open>', r.text)
    assert (f'value="{site}" checked' in again["body"]) == bool(data["site"])
    # nothing was written, and the form still carries the version first seen
    assert read(w, plan.order_ref)["meta"]["versionId"] == version
    assert again["hidden"][f"v-{plan.orders[0]['id']}"] == version


def test_a_change_that_changes_nothing_says_so_in_the_page(sandbox, w, make_app_server):
    plan = sign_order(w, ALI, frequency=2, weeks=6, minutes=45, authored=NOW - timedelta(days=4))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, ALI)
    form = next(f for f in forms(browser.get(url, timeout=30).text) if f["hidden"].get("action") == "modify"
                and f["hidden"]["plan"] == plan.draft_id)
    site = re.search(r'name="site" value="([^"]+)" checked', form["body"]).group(1)
    r = post(browser, app, form, site=site, frequency="2", weeks="6", minutes="45", reason="Same as before")
    assert r.status_code == 422 and "Nothing was changed" in r.text, r.text[:800]
    assert 'value="Same as before"' in r.text


# --- the physician is their Practitioner and each of its PractitionerRoles ------------------------------------


def test_an_order_and_messages_under_the_physicians_role_are_theirs(sandbox, w, make_app_server):
    """The order's requester and the message's recipient are PractitionerRole/dr-ada-grey-role while the user is
    Practitioner/dr-ada-grey (fhirUser): the panel lists the patient, the message is unread, and a reply sent under
    the role counts as the physician's own."""
    plan = sign_order(w, LEONOR, requester=DR_ROLE_REF, authored=NOW - timedelta(days=5))
    message(w, plan, "Her shoulder is stiffer this week.", recipient=DR_ROLE_REF, category="condition-change")
    app = make_app_server(sandbox, registration={"scopes": USER_SCOPES})
    browser, url = launch(sandbox, app, LEONOR)
    r = browser.get(url + "panel", timeout=30)
    assert r.status_code == 200, r.text[:800]
    row = re.search(rf'data-patient="Patient/{LEONOR}"[^>]*>(.*?)</tr>', r.text, re.S)
    assert row, "the order requested under the physician's PractitionerRole is missing from the panel"
    assert "unread message" in row.group(1)
    html = browser.get(url, timeout=30).text
    assert "Awaiting your reply" in html and 'data-testid="authorship"' not in html  # their own order
    # a reply written elsewhere under the role answers the thread: nothing awaits a reply any more
    message(w, plan, "Noted, I will see her.", sender=DR_ROLE_REF, recipient=LMT_REF,
            in_response_to=f"Communication/{plan.messages[0]['id']}",
            now=datetime.now(timezone.utc) + timedelta(seconds=5))
    html = browser.get(url, timeout=30).text
    assert "Awaiting your reply" not in html
    assert html.count("message--mine") == 1
    r = browser.get(url + "panel", timeout=30)
    row = re.search(rf'data-patient="Patient/{LEONOR}"[^>]*>(.*?)</tr>', r.text, re.S).group(1)
    assert "unread message" not in row


def test_a_physician_launched_as_a_practitioner_role_sees_their_practitioners_orders(sandbox, w, make_app_server):
    """fhirUser = PractitionerRole (the sandbox can name it): orders requested as the Practitioner are found."""
    from fhir_massage.fhir import FhirClient, StaticToken

    sign_order(w, LEONOR, authored=NOW - timedelta(days=2))  # requester Practitioner/dr-ada-grey
    tok = get_token(sandbox, "test-public", PHYSICIAN, LEONOR, scopes="launch openid fhirUser user/*.rs")
    reader = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]))
    assert plan_area.my_refs(reader, DR_ROLE_REF) == [DR_ROLE_REF, DR_REF]
    assert plan_area.my_refs(reader, DR_REF) == [DR_REF, DR_ROLE_REF]
    data = plan_area.load(reader, LEONOR, user_ref=DR_ROLE_REF)
    assert plan_area.physician_refs_of(data) == [DR_ROLE_REF, DR_REF]
    assert data.people.get(DR_ROLE_REF) == data.people.get(DR_REF) and data.people.get(DR_REF)


# --- changes by someone other than the ordering physician -----------------------------------------------------


def test_a_covering_physician_changes_the_order_and_the_record_says_so(sandbox, w, make_app_server):
    cover = w.create({"resourceType": "Practitioner", "active": True,
                      "name": [{"use": "official", "family": "Okonkwo", "given": ["Ife"], "prefix": ["Dr."]}]}).resource
    cover_ref = f"Practitioner/{cover['id']}"
    plan = sign_order(w, SANA, requester=cover_ref, authored=NOW - timedelta(days=6))
    mine = sign_order(w, SANA, techniques=("stretching",), authored=NOW - timedelta(days=6))
    app = make_app_server(sandbox)
    browser, url = launch(sandbox, app, SANA)
    html = browser.get(url, timeout=30).text
    notices = re.findall(r'data-testid="authorship">(.*?)</p>', html, re.S)
    assert len(notices) == 1, notices  # on the colleague's plan only, not on the physician's own
    text = unescape(re.sub(r"<[^>]+>", "", notices[0]))
    assert "Ordered by Dr. Ife Okonkwo; you are changing it as Ada Grey." in text, text
    assert plan.draft_id in html.split('data-testid="authorship"')[0].rsplit('data-testid="plan"', 1)[1]

    r = post(browser, app, status_form(html, plan.draft_id), action="hold", reason="Covering: waiting for imaging")
    assert r.status_code == 200 and 'data-testid="done"' in r.text, r.text[:800]
    sr = read(w, plan.order_ref)
    assert sr["status"] == "on-hold"
    assert sr["requester"]["reference"] == cover_ref  # authorship of the order never moves
    assert [n.get("authorReference", {}).get("reference") for n in sr["note"][-2:]] == [DR_REF, DR_REF]
    assert sr["note"][-2]["text"] == "On hold: Covering: waiting for imaging"
    assert "other than the ordering one (Dr. Ife Okonkwo)" in sr["note"][-1]["text"]
    provs = [p for p in w.search_all("Provenance", {"target": plan.order_ref})
             if p["activity"]["coding"][0]["code"] == "UPDATE"]
    assert len(provs) == 1 and provs[0]["agent"][0]["who"]["reference"] == DR_REF
    # the physician's own order: no covering note
    r = post(browser, app, status_form(browser.get(url, timeout=30).text, mine.draft_id), action="hold")
    assert r.status_code == 200
    assert not read(w, mine.order_ref).get("note") or all(
        "other than the ordering one" not in n["text"] for n in read(w, mine.order_ref)["note"])


def test_findings_acknowledged_at_signing_leave_no_open_issue_and_the_rest_is_elsewhere(make_app_server):
    """Dana's right-shoulder Swedish order, signed with every finding of her chart recorded and the applying ones
    acknowledged: nothing is open ('overridden or acknowledged at signing'), the acknowledged ones are listed with
    what was done, and the left-leg DVT rules are 'elsewhere in the chart', collapsed."""
    from fhir_massage.builders.detected_issue import detected_issue
    from fhir_massage.chart import from_resources
    from fhir_massage.chart_fetch import fetch_chart_resources
    from fhir_massage.screening import screen

    sb = start_smart_sandbox()
    try:
        w = writer(sb, patient="demo-dana-whitfield")
        s = screen(from_resources(fetch_chart_resources(w, "demo-dana-whitfield")), techniques=["swedish"],
                   sites=["16982005:right"], today=NOW.date())
        assert s.applicable and len(s.applicable) < len(s.findings)
        issues = []
        for f in s.findings:
            i = detected_issue(f, patient_ref="Patient/demo-dana-whitfield", now=NOW)
            if f.rule in s.applicable:
                i["mitigation"] = [{"action": {"text": "Light pressure, away from the leg"}}]
            issues.append(i)
        sign_order(w, "demo-dana-whitfield", sites=("16982005:right",), findings=issues,
                   authored=NOW - timedelta(days=1))
        app = make_app_server(sb)
        browser, url = launch(sb, app, "demo-dana-whitfield")
        html = browser.get(url, timeout=30).text
        section = html.split('id="oi-1-h"')[1].split("</section>")[0]
        assert 'data-testid="open-issues"' not in section
        assert "No open issues: every finding that applies was overridden or acknowledged at signing." in section
        addressed = re.search(r'data-testid="addressed-issues"><summary>[^<]*\((\d+)\)</summary>(.*?)</details>',
                              section, re.S)
        assert addressed and int(addressed.group(1)) == len(s.applicable)
        assert "Light pressure, away from the leg" in addressed.group(2)
        elsewhere = re.search(r'<details class="issues-other" data-testid="elsewhere-issues"><summary>Elsewhere in the '
                              r'chart, not affecting this plan \((\d+)\)</summary>', section)
        assert elsewhere and int(elsewhere.group(1)) == len(s.findings) - len(s.applicable)
    finally:
        sb.stop()
