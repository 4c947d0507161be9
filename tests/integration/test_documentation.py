"""Therapist documentation against the real sandbox (issue 7): the app on loopback, launched as the therapist,
documents sessions for orders the tests post straight to the sandbox (order_transaction bundles).

What is checked: the written Procedure + 2 pain Observations + Provenance + Task progress (each validated against
our profiles); a plan of two techniques (one ServiceRequest + Task each, one requisition) is ONE card and ONE
visit note: a Procedure per technique used, the pain scores once (partOf both), each Task +1; a fever recorded after the order is flagged on re-screen; not-done with a reason; an injected EHR
failure on submit keeps the draft and the retry writes once; a Task version conflict on retry does not double
count; token expiry mid-note; an app restart on the same SQLite file keeps the draft; another user cannot read it;
the last session completes the Task; messages thread with inResponseTo.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from html import unescape
from typing import Any
from urllib.parse import urlsplit

import flask
import pytest
import requests

from fhir_massage.builders.detected_issue import detected_issue
from fhir_massage.builders.messages import communication
from fhir_massage.chart import from_resources
from fhir_massage.chart_fetch import fetch_chart_resources
from fhir_massage.screening import screen
from fhir_massage.builders.order import order_transaction
from fhir_massage.builders.session import SESSION_ID_SYSTEM, VISIT_ID_SYSTEM, SessionNote, VisitNote, VisitOrder
from fhir_massage.errors import FhirConflict
from fhir_massage.fhir import FhirClient, StaticToken
from fhir_massage.orders_model import OrderDraft
from fhir_massage.validation import errors, validate_resource
from smart_app.drafts import DraftKey, DraftStore
from smart_app.launch import NS_TOKENS
from smart_app.sessions import write_session, write_visit
from tests.fixtures.smart_sandbox import (FhirCallCounter, create_launch, get_token, sandbox_faults,
                                     start_smart_sandbox)

pytestmark = pytest.mark.integration

PHYSICIAN = "dr-ada-grey"
THERAPIST = "lmt-sam-reyes"
THERAPIST_REF = "Practitioner/lmt-sam-reyes"
TOM = "demo-tom-becker"  # clear chart: chronic low back pain
DANA = "demo-dana-whitfield"  # DVT left lower leg on apixaban
FEIL = "98671a34-1c6e-4569-a1bc-6ee40c8d03a5"  # Jacki Feil, chronic pain, nothing to avoid
SUZI = "95efed54-0648-4faf-a179-9a2b3c45e92d"  # Suzi Bechtelar, fibromyalgia, clear
LOWER_BACK = "37822005"
WRITE_SCOPES = ("launch openid fhirUser patient/Patient.rs patient/ServiceRequest.crus patient/Task.crus "
                "patient/MedicationRequest.rs patient/MedicationStatement.rs patient/MedicationAdministration.rs "
                "patient/AllergyIntolerance.rs "
                "patient/DetectedIssue.crs patient/Provenance.crs patient/Observation.crus patient/Condition.crus "
                "patient/Procedure.crus patient/Communication.crs user/Practitioner.rs")


@pytest.fixture(scope="module")
def sandbox():
    """A sandbox of this module's own: the tests change charts (a fever, new orders)."""
    sb = start_smart_sandbox()
    yield sb
    sb.stop()


@pytest.fixture(autouse=True)
def no_faults(sandbox):
    yield
    requests.delete(f"{sandbox.url}/_sandbox/faults", timeout=10)


def ehr_client(sandbox, patient: str, user: str = PHYSICIAN) -> FhirClient:
    tok = get_token(sandbox, "test-public", user, patient, scopes=WRITE_SCOPES)
    return FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]), max_retries=0)


def post_order(sandbox, patient: str, *, technique: str = "swedish", sites=(LOWER_BACK,), frequency: int = 1,
               weeks: int = 2, notes: str = "Gentle; report any numbness.", screened: bool = False
               ) -> tuple[str, str]:
    """A signed order + its fulfilment Task owned by the therapist, as the ordering UI would write it."""
    ((order_id, task_id),) = post_plan(sandbox, patient, techniques=(technique,), sites=sites, frequency=frequency,
                                       weeks=weeks, notes=notes, screened=screened).values()
    return order_id, task_id


def post_plan(sandbox, patient: str, *, techniques=("swedish", "myofascial-release"), sites=(LOWER_BACK,),
              frequency: int = 1, weeks: int = 2, notes: str = "Gentle; report any numbness.",
              screened: bool = False) -> dict[str, tuple[str, str]]:
    """A signed plan: one order + fulfilment Task per technique (one requisition), as the ordering UI writes it.
    technique -> (ServiceRequest id, Task id)."""
    now = datetime.now(timezone.utc)
    draft = OrderDraft(draft_id=str(uuid.uuid4()), patient_ref=f"Patient/{patient}",
                       requester_ref="Practitioner/dr-ada-grey", techniques=tuple(techniques), sites=tuple(sites),
                       frequency=frequency, duration_weeks=weeks, session_minutes=45,
                       authored=now - timedelta(minutes=1), reason_text="Chronic low back pain", pressure="moderate",
                       notes=notes)
    client = ehr_client(sandbox, patient)
    issues = []
    if screened:  # what the ordering UI does: screen the chart, sign with the findings as DetectedIssues
        chart = from_resources(fetch_chart_resources(client, patient))
        result = screen(chart, techniques=list(techniques), sites=list(sites), today=now.date())
        issues = [detected_issue(f, patient_ref=f"Patient/{patient}", now=now) for f in result.findings
                  if not f.informational]
        assert issues, "the chart was expected to have findings"
    bundle = order_transaction(draft, issues, now, owner_ref="PractitionerRole/lmt-sam-reyes-role")
    answer = client.transaction(bundle)
    orders: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for sent, e in zip(bundle["entry"], answer["entry"]):
        m = re.search(r"(ServiceRequest|Task)/([^/]+)", e["response"]["location"])
        if not m:
            continue
        res = sent["resource"]
        if m.group(1) == "ServiceRequest":
            technique = next(c["code"] for c in res["code"]["coding"] if c["system"].endswith("massage-technique"))
            orders[sent["fullUrl"]] = technique
            orders[technique] = m.group(2)
        else:
            tasks[orders[res["focus"]["reference"]]] = m.group(2)
    return {t: (orders[t], tasks[t]) for t in techniques}


class Therapist:
    """A browser (requests session) launched into the app by the EHR as ``user`` for ``patient``."""

    def __init__(self, sandbox, app, patient: str, user: str = THERAPIST) -> None:
        self.app = app
        self.http = requests.Session()
        out = create_launch(sandbox, app.client_id, user, patient)
        r = self.http.get(out["launch_url"], timeout=30)
        assert r.status_code == 200, r.text[:500]
        self.lsid = re.match(r"^/p/([^/]+)/", urlsplit(r.url).path).group(1)
        self.base = f"{app.url}/p/{self.lsid}/sessions"

    def page(self, order_id: str) -> requests.Response:
        return self.http.get(f"{self.base}/{order_id}", timeout=30)

    @staticmethod
    def csrf(html: str) -> str:
        return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)

    @staticmethod
    def draft_id(html: str) -> str:
        return re.search(r'name="draft_id" value="([^"]+)"', html).group(1)

    @staticmethod
    def plan_key(html: str) -> str:
        return unescape(re.search(r'name="plan_key" value="([^"]+)"', html).group(1))

    def autosave(self, order_id: str, html: str, fields: dict[str, Any]) -> requests.Response:
        data = {"draft_id": self.draft_id(html), "plan_key": self.plan_key(html), **fields}
        return self.http.post(f"{self.base}/{order_id}/draft", data=data, timeout=30,
                              headers={"X-CSRF-Token": self.csrf(html), "Accept": "application/json"})

    def submit(self, order_id: str, html: str, fields: dict[str, Any] | None, action: str = "submit"
               ) -> requests.Response:
        data = {"csrf_token": self.csrf(html), "draft_id": self.draft_id(html), "plan_key": self.plan_key(html),
                "action": action, **(fields or {})}
        return self.http.post(f"{self.base}/{order_id}", data=data, timeout=60)


def note_fields(**over: Any) -> dict[str, Any]:
    today = datetime.now(timezone.utc).date().isoformat()
    fields = {"status": "completed", "techniques": ["swedish"], "sites": [LOWER_BACK], "date": today, "start": "09:00",
              "end": "09:40", "tz": "0", "pressure": "moderate", "position": "prone", "response": "Tolerated well",
              "adverse_events": "", "pain_before": "6", "pain_after": "3", "subjective": "Low back stiff after work",
              "objective": "Hypertonic lumbar paraspinals", "assessment": "Improving", "plan": "Continue weekly",
              "follow_up": "Re-assess range of motion at session 4"}
    fields.update(over)
    return fields


def session_resources(client: FhirClient, order_id: str) -> dict[str, list[dict[str, Any]]]:
    procs = client.search_all("Procedure", [("based-on", f"ServiceRequest/{order_id}")])
    obs = client.search_all("Observation", [("based-on", f"ServiceRequest/{order_id}")]) if procs else []
    return {"Procedure": [p for p in procs if p["resourceType"] == "Procedure"],
            "Observation": [o for o in obs if o["resourceType"] == "Observation"]}


def assert_valid(resource: dict[str, Any]) -> None:
    problems = errors(validate_resource(resource))
    assert problems == [], [str(p) for p in problems]


@pytest.fixture
def app(sandbox, make_app_server):
    return make_app_server(sandbox)


# ---------------------------------------------------------------------------------------------------------------


def test_document_a_session_writes_procedure_pain_provenance_and_task(sandbox, app):
    order_id, task_id = post_order(sandbox, TOM, weeks=3)
    t = Therapist(sandbox, app, TOM)
    listing = t.http.get(f"{t.base}/", timeout=30)
    assert listing.status_code == 200
    assert f'data-order="{order_id}"' in listing.text and "0 of 3 sessions done" in listing.text
    assert "Gentle; report any numbness." in unescape(listing.text)  # the physician's notes
    page = t.page(order_id)
    assert page.status_code == 200, page.text[:800]
    assert 'data-testid="nothing-new"' in page.text  # Tom's chart is clear and nothing changed
    assert "Moderate pressure" in page.text  # the order's precautions
    r = t.submit(order_id, page.text, note_fields())
    assert r.status_code == 200 and "Session recorded in the chart" in r.text, r.text[:800]
    assert "1 of 3 sessions done" in r.text

    client = ehr_client(sandbox, TOM)
    found = session_resources(client, order_id)
    (proc,) = found["Procedure"]
    assert proc["status"] == "completed" and proc["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    assert proc["performedPeriod"]["start"].endswith("T09:00:00Z") and proc["performedPeriod"]["end"].endswith("T09:40:00Z")
    assert proc["performer"][0]["actor"]["reference"] == THERAPIST_REF
    assert proc["bodySite"][0]["coding"][0]["code"] == LOWER_BACK
    assert proc["followUp"][0]["text"].startswith("Re-assess")
    assert any(n["text"].startswith("S: Low back stiff") for n in proc["note"])
    assert_valid(proc)
    pain = sorted(found["Observation"], key=lambda o: o["effectiveDateTime"])
    assert [o["valueInteger"] for o in pain] == [6, 3]
    for o in pain:
        assert o["code"]["coding"][0]["code"] == "72514-3"
        assert o["partOf"] == [{"reference": f"Procedure/{proc['id']}"}]
        assert_valid(o)
    task = client.read("Task", task_id)
    assert task["status"] == "in-progress" and task["businessStatus"]["text"] == "1 of 3 sessions done"
    assert task["output"][0]["valueReference"]["reference"] == f"Procedure/{proc['id']}"
    assert_valid(task)
    provs = [p for p in client.search_all("Provenance", [("target", f"Procedure/{proc['id']}")])
             if p["resourceType"] == "Provenance"]
    assert len(provs) == 1 and provs[0]["agent"][0]["who"]["reference"] == THERAPIST_REF
    assert_valid(provs[0])
    # the draft is gone once the EHR confirmed the write; the page starts a new note
    again = t.page(order_id)
    assert "Not saved yet" in again.text and t.draft_id(again.text) != t.draft_id(page.text)


def test_fever_after_the_order_is_flagged_and_session_recorded_not_done(sandbox, app):
    order_id, task_id = post_order(sandbox, FEIL)
    client = ehr_client(sandbox, FEIL)
    now = datetime.now(timezone.utc)
    client.create({
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"}]},
        "subject": {"reference": f"Patient/{FEIL}"}, "effectiveDateTime": now.isoformat(timespec="seconds"),
        "valueQuantity": {"value": 38.9, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}})
    t = Therapist(sandbox, app, FEIL)
    page = t.page(order_id)
    html = unescape(page.text)
    assert 'data-testid="stop"' in html and "Do not give this session as ordered" in html
    new = re.findall(r'data-testid="new-finding"', html)
    assert new, html[:3000]
    assert "38.9" in html  # the evidence is shown
    # the new finding is shown before the form, and the message to the physician is pre-filled
    assert html.index("New since the order") < html.index('id="note"')
    assert "Re-screen before the swedish massage session" in html.lower() or "Re-screen before the" in html
    r = t.submit(order_id, page.text, note_fields(status="not-done", status_reason="Fever 38.9 °C at arrival",
                                                  start="", end="", pain_before="", pain_after=""))
    assert "Session recorded" in r.text, r.text[:1500]
    (proc,) = session_resources(client, order_id)["Procedure"]
    assert proc["status"] == "not-done" and proc["statusReason"]["text"] == "Fever 38.9 °C at arrival"
    assert "end" not in proc["performedPeriod"]
    assert_valid(proc)
    assert session_resources(client, order_id)["Observation"] == []
    task = client.read("Task", task_id)
    assert task["output"][0]["type"]["coding"][0]["code"] == "session-not-done"
    assert task["businessStatus"]["text"] == "0 of 2 sessions done" and task["status"] == "ready"

    # notify the physician with the pre-filled message; the physician answers; the thread shows both, nested
    page = t.page(order_id)
    text = unescape(re.search(r'<textarea name="text" rows="7" required>(.*?)</textarea>', page.text, re.S).group(1))
    about = re.findall(r'name="about" value="([^"]+)"', page.text)
    msg_id = re.search(r'id="message-form".*?name="message_id" value="([^"]+)"', page.text, re.S).group(1)
    form = {"csrf_token": t.csrf(page.text), "message_id": msg_id, "category": "condition-change", "text": text,
            "about": about}
    r = t.http.post(f"{t.base}/{order_id}/message", data=form, timeout=30)
    assert r.status_code == 200 and "Message sent" in r.text
    t.http.post(f"{t.base}/{order_id}/message", data=form, timeout=30)  # a double click sends it once
    comms = [c for c in client.search_all("Communication", [("based-on", f"ServiceRequest/{order_id}")])
             if c["resourceType"] == "Communication"]
    assert len(comms) == 1
    (sent,) = comms
    assert sent["recipient"] == [{"reference": "Practitioner/dr-ada-grey"}]
    assert sent["sender"]["reference"] == THERAPIST_REF and any(a["reference"].startswith("Observation/")
                                                               for a in sent["about"])
    assert_valid(sent)
    reply = communication(order_ref=f"ServiceRequest/{order_id}", patient_ref=f"Patient/{FEIL}",
                          sender_ref="Practitioner/dr-ada-grey", recipient_ref=THERAPIST_REF,
                          text="Hold massage until afebrile 48 h.", category="request",
                          in_response_to=f"Communication/{sent['id']}", now=datetime.now(timezone.utc),
                          draft_id=str(uuid.uuid4()))
    client.create(reply)
    listing = unescape(t.http.get(f"{t.base}/", timeout=30).text)
    block = listing[listing.index(f'data-order="{order_id}"'):]
    assert "Hold massage until afebrile 48 h." in block
    assert re.search(r'thread__msg--depth1[^>]*>.*?Hold massage until afebrile', block, re.S)
    # the therapist answers from the thread: the reply points at the physician's message
    raw = t.http.get(f"{t.base}/", timeout=30).text
    form = re.search(r'<form method="post" action="[^"]*/message">(.*?)</form>', raw[raw.index(f'data-order="{order_id}"'):],
                     re.S).group(1)
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    assert hidden["in_response_to"].startswith("Communication/")
    r = t.http.post(f"{t.base}/{order_id}/message", data={**hidden, "text": "Understood, holding."}, timeout=30)
    assert r.status_code == 200
    answer = [c for c in client.search_all("Communication", [("based-on", f"ServiceRequest/{order_id}")])
              if c["resourceType"] == "Communication" and c["payload"][0]["contentString"] == "Understood, holding."]
    assert len(answer) == 1 and answer[0]["inResponseTo"] == [{"reference": hidden["in_response_to"]}]
    assert answer[0]["recipient"] == [{"reference": "Practitioner/dr-ada-grey"}]
    assert_valid(answer[0])  # the reply as it landed in the sandbox, against its profile


def test_failed_submit_keeps_the_draft_and_the_retry_writes_once(sandbox, app):
    order_id, task_id = post_order(sandbox, SUZI)
    t = Therapist(sandbox, app, SUZI)
    page = t.page(order_id)
    saved = t.autosave(order_id, page.text, note_fields(subjective="Typed before the EHR failed"))
    assert saved.status_code == 200 and saved.json()["saved"]
    # the page's batch read passes, the transaction (the next POST to /fhir) gets a 500
    with sandbox_faults(sandbox, {"fail_every_n": 2, "fail_status": 500, "fail_methods": ["POST"]}):
        r = t.submit(order_id, page.text, note_fields(subjective="Typed before the EHR failed"))
    assert r.status_code == 503
    words = unescape(r.text)
    assert "The EHR answered with an error (500)." in words
    assert "Your note is saved as a draft on this server" in words and "nothing was written to the chart" in words
    client = ehr_client(sandbox, SUZI)
    assert session_resources(client, order_id)["Procedure"] == []
    # reopen: the draft is there
    page2 = t.page(order_id)
    assert "Typed before the EHR failed" in page2.text and t.draft_id(page2.text) == t.draft_id(page.text)
    # "Try again" posts only the draft id: the stored draft is written
    r = t.http.post(f"{t.base}/{order_id}", data={"csrf_token": t.csrf(page2.text), "action": "submit",
                                                 "draft_id": t.draft_id(page2.text)}, timeout=60)
    assert "Session recorded" in r.text, r.text[:1000]
    found = session_resources(client, order_id)
    assert len(found["Procedure"]) == 1 and len(found["Observation"]) == 2
    assert found["Procedure"][0]["identifier"] == [{"system": SESSION_ID_SYSTEM, "value": f"{t.draft_id(page.text)}:swedish"},
                                                   {"system": VISIT_ID_SYSTEM, "value": t.draft_id(page.text)}]
    # a late autosave from the closed tab cannot bring the written note back
    late = t.autosave(order_id, page.text, note_fields())
    assert late.status_code == 409
    assert "Not saved yet" in t.page(order_id).text
    assert client.read("Task", task_id)["businessStatus"]["text"] == "1 of 2 sessions done"


def test_timeout_on_submit_keeps_the_draft_and_a_retry_writes_once(sandbox, make_app_server):
    app = make_app_server(sandbox, HTTP_TIMEOUT=(2.0, 1.0))
    order_id, task_id = post_order(sandbox, FEIL, weeks=4)
    t = Therapist(sandbox, app, FEIL)
    page = t.page(order_id)
    # every POST to the FHIR API now answers after the app stopped waiting; the EHR may still act on it
    with sandbox_faults(sandbox, {"latency_ms": 1500, "fail_methods": ["POST"]}):
        r = t.submit(order_id, page.text, note_fields(subjective="Written while the EHR was slow",
                                                      status="completed", pain_before="", pain_after=""))
    assert r.status_code == 503
    words = unescape(r.text)
    assert "The EHR did not answer (timeout)." in words
    assert "Your note is saved as a draft on this server; nothing was written to the chart." in words
    page2 = t.page(order_id)
    assert "Written while the EHR was slow" in page2.text
    r = t.http.post(f"{t.base}/{order_id}", data={"csrf_token": t.csrf(page2.text), "action": "submit",
                                                 "draft_id": t.draft_id(page2.text)}, timeout=60)
    assert "Session recorded" in r.text, r.text[:800]
    client = ehr_client(sandbox, FEIL)
    assert len(session_resources(client, order_id)["Procedure"]) == 1
    assert client.read("Task", task_id)["businessStatus"]["text"] == "1 of 4 sessions done"


@pytest.fixture
def flask_context():
    """write_visit goes through smart_app.writes, which keeps what it learnt of the EHR on the current app."""
    with flask.Flask("test-writes").app_context():
        yield


def test_task_conflict_on_retry_does_not_double_count(sandbox, flask_context):
    order_id, task_id = post_order(sandbox, SUZI)
    client = ehr_client(sandbox, SUZI)
    task = client.read("Task", task_id)
    now = datetime.now(timezone.utc)
    note = SessionNote(draft_id=str(uuid.uuid4()), order_ref=f"ServiceRequest/{order_id}", task_ref=f"Task/{task_id}",
                       patient_ref=f"Patient/{SUZI}", performer_ref=THERAPIST_REF, start=now - timedelta(minutes=30),
                       end=now, technique="swedish", sites=(LOWER_BACK,), pain_before=5, pain_after=2)
    first = write_session(client, note, task, now)
    assert first["already"] is False and first["procedure"].startswith("Procedure/")
    # the answer was "lost": the retry still holds the old Task version -> 412 -> re-read -> already recorded
    again = write_session(client, note, task, now)
    assert again == {"procedure": first["procedure"], "already": True}
    after = client.read("Task", task_id)
    assert after["businessStatus"]["text"] == "1 of 2 sessions done" and len(after["output"]) == 1
    assert len(session_resources(client, order_id)["Procedure"]) == 1
    # someone else changed the Task in between (not our session): rebuilt on the fresh Task and written
    other = dict(after, description=after["description"] + " (edited)")
    client.update(other, if_match=True)
    note2 = SessionNote(**{**note.__dict__, "draft_id": str(uuid.uuid4())})
    res = write_session(client, note2, after, now)
    assert res["already"] is False
    assert client.read("Task", task_id)["businessStatus"]["text"] == "2 of 2 sessions done"
    with pytest.raises(FhirConflict):  # a conflict that never resolves is not hidden
        class Always:
            base_url = "http://127.0.0.1:9/fhir"  # smart_app.writes keys what it learns by the FHIR base

            def transaction(self, bundle):
                raise FhirConflict("conflict", status=412)

            def read(self, *a):
                return after
        write_session(Always(), SessionNote(**{**note.__dict__, "draft_id": str(uuid.uuid4())}),
                      dict(after, status="in-progress", restriction={"repetitions": 9}), now)


def test_token_expiry_mid_note_refreshes_and_submits(sandbox, make_app_server, token_time):
    app = make_app_server(sandbox)
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    page = t.page(order_id)
    assert t.autosave(order_id, page.text, note_fields()).status_code == 200
    # the token's lifetime passes while the note is written (moved clocks, tests/fixtures/token_time.py)
    first = token_time.expire_session_token(sandbox, app, t.lsid)
    r = t.submit(order_id, page.text, note_fields(subjective="Written after the token expired"))
    assert "Session recorded" in r.text, r.text[:800]
    assert app.store.get(NS_TOKENS, t.lsid)["access_token"] != first["access_token"]
    procs = session_resources(ehr_client(sandbox, TOM), order_id)["Procedure"]
    assert len(procs) == 1 and any("Written after the token expired" in n["text"] for n in procs[0]["note"])


def test_refresh_refused_keeps_the_draft_for_a_new_launch(sandbox, make_app_server, token_time):
    app = make_app_server(sandbox, {"refresh": False})
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    page = t.page(order_id)
    assert t.autosave(order_id, page.text, note_fields(subjective="Before the session ended")).status_code == 200
    assert not app.store.get(NS_TOKENS, t.lsid).get("refresh_token")  # the EHR gave no way to renew it
    token_time.expire_session_token(sandbox, app, t.lsid)
    r = t.submit(order_id, page.text, note_fields(subjective="Before the session ended"))
    assert r.status_code == 401
    words = unescape(r.text)
    assert "Your session with the EHR has ended" in words and "saved as a draft on this server" in words
    # a new launch finds the draft; the EHR's clock is back in step with the app's first (the app checks the new
    # id_token's iat and exp against its own clock, which token_time cannot move)
    token_time.restore()
    t2 = Therapist(sandbox, app, TOM)
    assert "Before the session ended" in t2.page(order_id).text


def test_app_restart_keeps_the_draft(sandbox, make_app_server, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'app.db'}"
    first = make_app_server(sandbox, STORE_URL=store_url)
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, first, TOM)
    page = t.page(order_id)
    assert t.autosave(order_id, page.text, note_fields(subjective="Survives a restart")).status_code == 200
    first.stop()
    first.store.close()
    second = make_app_server(sandbox, STORE_URL=store_url)
    t2 = Therapist(sandbox, second, TOM)
    page2 = t2.page(order_id)
    assert "Survives a restart" in page2.text and t2.draft_id(page2.text) == t.draft_id(page.text)
    assert "Draft saved" in page2.text
    r = t2.submit(order_id, page2.text, None)  # "try again" shape: the stored draft is written
    assert "Session recorded" in r.text
    assert len(session_resources(ehr_client(sandbox, TOM), order_id)["Procedure"]) == 1


def test_another_user_cannot_read_the_draft(sandbox, app):
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    page = t.page(order_id)
    assert t.autosave(order_id, page.text, note_fields(subjective="Private words")).status_code == 200
    doctor = Therapist(sandbox, app, TOM, user=PHYSICIAN)
    r = doctor.page(order_id)
    assert r.status_code == 403 and "Private words" not in r.text
    landing = doctor.http.get(f"{app.url}/p/{doctor.lsid}/", timeout=30)
    r = doctor.http.post(f"{doctor.base}/{order_id}/draft", data={"draft_id": t.draft_id(page.text)}, timeout=30,
                         headers={"X-CSRF-Token": Therapist.csrf(landing.text), "Accept": "application/json"})
    assert r.status_code == 403 and "Private words" not in r.text
    # at the store: the same patient and order under the physician's name finds nothing
    drafts = DraftStore(app.store, 3600)
    plan = t.plan_key(page.text)  # the plan's requisition
    assert drafts.load(DraftKey.for_plan(sandbox.fhir_base, "Practitioner/dr-ada-grey", TOM, plan)) is None
    assert drafts.load(DraftKey.for_plan(sandbox.fhir_base, THERAPIST_REF, TOM, plan))["fields"][
        "subjective"] == "Private words"


def test_last_session_completes_the_task(sandbox, app):
    order_id, task_id = post_order(sandbox, SUZI, frequency=1, weeks=1)
    t = Therapist(sandbox, app, SUZI)
    r = t.submit(order_id, t.page(order_id).text, note_fields())
    assert "Session recorded" in r.text and "1 of 1 sessions done" in r.text
    client = ehr_client(sandbox, SUZI)
    task = client.read("Task", task_id)
    assert task["status"] == "completed"
    assert_valid(task)
    # one more completed session is refused in plain words, the draft kept
    page = t.page(order_id)
    r = t.submit(order_id, page.text, note_fields(start="10:00", end="10:30"))
    assert r.status_code == 400 and "All 1 ordered sessions are documented" in unescape(r.text)
    assert len(session_resources(client, order_id)["Procedure"]) == 1


def test_form_problems_are_shown_next_to_fields_and_nothing_is_written(sandbox, app):
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    page = t.page(order_id)
    r = t.submit(order_id, page.text, note_fields(end="08:30", pain_after="11", sites=[]))
    assert r.status_code == 400
    words = unescape(r.text)
    assert 'id="err-end"' in r.text and "must end after it starts" in words
    assert 'id="err-pain_after"' in r.text and 'id="err-sites"' in r.text
    assert "saved as a draft, but not sent" in words
    assert session_resources(ehr_client(sandbox, TOM), order_id)["Procedure"] == []
    assert "08:30" in t.page(order_id).text  # what was typed is kept


def test_round_trips_one_batch_per_page_and_two_for_a_submit(sandbox, app):
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    counter = FhirCallCounter(sandbox.app.wsgi_app)
    sandbox.app.wsgi_app = counter
    try:
        assert t.http.get(f"{t.base}/", timeout=30).status_code == 200
        assert counter.calls == [("POST", "/fhir")]  # orders + Tasks + requesters + messages: one batch
        counter.calls.clear()
        page = t.page(order_id)
        assert counter.calls == [("POST", "/fhir")]  # order, Task, findings, messages and the chart: one batch
        counter.calls.clear()
        assert t.autosave(order_id, page.text, note_fields()).status_code == 200
        assert counter.calls == []  # a draft never waits for the EHR
        r = t.http.post(f"{t.base}/{order_id}", allow_redirects=False, timeout=60, data={
            "csrf_token": t.csrf(page.text), "draft_id": t.draft_id(page.text), "action": "submit", **note_fields()})
        assert r.status_code == 303 and "recorded=" in r.headers["Location"]
        assert counter.calls == [("POST", "/fhir"), ("POST", "/fhir")]  # re-read (batch) + the transaction
    finally:
        sandbox.app.wsgi_app = counter.app


def test_findings_the_physician_signed_with_are_not_new(sandbox, app):
    order_id, _ = post_order(sandbox, DANA, screened=True)
    t = Therapist(sandbox, app, DANA)
    html = unescape(t.page(order_id).text)
    assert 'data-testid="nothing-new"' in html and 'data-testid="new-finding"' not in html
    assert re.search(r"Known when the order was signed \(\d+\)", html)
    # a second DVT recorded after the order is new, even though the rule was known
    client = ehr_client(sandbox, DANA)
    today = datetime.now(timezone.utc).date().isoformat()
    client.create({
        "resourceType": "Condition", "subject": {"reference": f"Patient/{DANA}"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I82.401",
                             "display": "Acute embolism and thrombosis of unspecified deep veins of right lower extremity"}]},
        "onsetDateTime": today, "recordedDate": today})
    html = unescape(t.page(order_id).text)
    assert 'data-testid="new-finding"' in html
    assert "right lower" in html.lower()


def test_save_draft_button_works_without_javascript(sandbox, app):
    order_id, _ = post_order(sandbox, TOM)
    t = Therapist(sandbox, app, TOM)
    page = t.page(order_id)
    r = t.submit(order_id, page.text, note_fields(assessment="Saved with the button"), action="save")
    assert r.status_code == 200 and "Draft saved on this server. Nothing was written to the chart yet." in r.text
    assert "Saved with the button" in r.text and 'data-testid="draft-status">Draft saved' in r.text
    assert session_resources(ehr_client(sandbox, TOM), order_id)["Procedure"] == []
    # discarding throws it away (nothing was written)
    r = t.http.post(f"{t.base}/{order_id}/discard", data={"csrf_token": t.csrf(r.text), "draft_id": t.draft_id(r.text),
                                                         "plan_key": t.plan_key(r.text)}, timeout=30)
    assert "Saved with the button" not in r.text and "Not saved yet" in r.text


# --- one note per visit for a plan of several techniques -----------------------------------------------------------


def test_plan_of_two_techniques_is_one_card_and_one_visit_note(sandbox, app):
    plan = post_plan(sandbox, TOM, techniques=("swedish", "myofascial-release"), weeks=3)
    (sw_order, sw_task), (mfr_order, mfr_task) = plan["swedish"], plan["myofascial-release"]
    t = Therapist(sandbox, app, TOM)
    listing = unescape(t.http.get(f"{t.base}/", timeout=30).text)
    assert listing.count(f'data-orders="{sw_order} {mfr_order}"') == 1  # one card for the plan
    assert f'data-order="{mfr_order}"' not in listing
    # either order of the plan opens the same note (same draft, same plan key)
    page = t.page(mfr_order)
    assert page.status_code == 200
    same = t.page(sw_order)
    assert t.plan_key(same.text) == t.plan_key(page.text)
    html = unescape(page.text)
    assert re.findall(r'name="techniques" value="([^"]+)"[^>]*checked', page.text) == ["swedish",
                                                                                        "myofascial-release"]
    assert "Only the plan's ordered techniques can be documented" in html
    r = t.submit(sw_order, page.text, note_fields(techniques=["swedish", "myofascial-release"], start="09:00",
                                                  end="09:45", minutes_myofascial_release="30"))
    assert r.status_code == 200 and "Session recorded in the chart" in r.text, r.text[:800]
    assert "and 1 more, one per technique" in unescape(r.text)
    assert "1 of 3 sessions done" in r.text  # the plan counts the visit once

    client = ehr_client(sandbox, TOM)
    (sw,) = session_resources(client, sw_order)["Procedure"]
    (mfr,) = session_resources(client, mfr_order)["Procedure"]
    for proc, order_id in ((sw, sw_order), (mfr, mfr_order)):
        assert proc["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}] and proc["status"] == "completed"
        assert proc["performedPeriod"] == sw["performedPeriod"]
        assert {"system": VISIT_ID_SYSTEM, "value": t.draft_id(page.text)} in proc["identifier"]
        assert_valid(proc)
    assert any(n["text"] == "Time: 30 of the visit's 45 minutes." for n in mfr["note"])
    pain = sorted(session_resources(client, sw_order)["Observation"], key=lambda o: o["effectiveDateTime"])
    assert [o["valueInteger"] for o in pain] == [6, 3]  # once for the visit
    assert session_resources(client, mfr_order)["Observation"] == pain
    for o in pain:
        assert o["partOf"] == [{"reference": f"Procedure/{sw['id']}"}, {"reference": f"Procedure/{mfr['id']}"}]
        assert o["basedOn"] == [{"reference": f"ServiceRequest/{sw_order}"},
                                {"reference": f"ServiceRequest/{mfr_order}"}]
        assert_valid(o)
    for task_id, proc in ((sw_task, sw), (mfr_task, mfr)):
        task = client.read("Task", task_id)
        assert task["businessStatus"]["text"] == "1 of 3 sessions done" and task["status"] == "in-progress"
        assert task["output"][0]["valueReference"]["reference"] == f"Procedure/{proc['id']}"
        assert_valid(task)
    provs = [p for p in client.search_all("Provenance", [("target", f"Procedure/{mfr['id']}")])
             if p["resourceType"] == "Provenance"]
    assert len(provs) == 1 and {f"Procedure/{sw['id']}", f"Task/{sw_task}", f"Task/{mfr_task}"} <= {
        x["reference"] for x in provs[0]["target"]}

    # the next visit gives swedish only: the plan counts 2 visits, myofascial release stays at 1
    page = t.page(sw_order)
    r = t.submit(sw_order, page.text, note_fields(techniques=["swedish"], start="10:00", end="10:30"))
    assert "2 of 3 sessions done" in r.text
    assert "Swedish massage: 2 of 3; Myofascial release: 1 of 3" in unescape(r.text)
    assert client.read("Task", mfr_task)["businessStatus"]["text"] == "1 of 3 sessions done"
    # a technique the plan did not order is refused in plain words, nothing written
    page = t.page(sw_order)
    r = t.submit(sw_order, page.text, note_fields(techniques=["swedish", "trigger-point"]))
    assert r.status_code == 400 and "Trigger point therapy was not ordered in this plan" in unescape(r.text)
    assert len(session_resources(client, sw_order)["Procedure"]) == 2


def test_not_done_visit_of_a_plan_is_recorded_for_every_technique(sandbox, app):
    plan = post_plan(sandbox, SUZI, techniques=("swedish", "myofascial-release"))
    t = Therapist(sandbox, app, SUZI)
    order_id = plan["swedish"][0]
    page = t.page(order_id)
    r = t.submit(order_id, page.text, note_fields(status="not-done", status_reason="Patient cancelled: flu",
                                                  start="", end="", pain_before="", pain_after=""))
    assert "Session recorded" in r.text, r.text[:800]
    client = ehr_client(sandbox, SUZI)
    for technique, (sr_id, task_id) in plan.items():
        (proc,) = session_resources(client, sr_id)["Procedure"]
        assert proc["status"] == "not-done" and proc["statusReason"]["text"] == "Patient cancelled: flu"
        task = client.read("Task", task_id)
        assert task["output"][0]["type"]["coding"][0]["code"] == "session-not-done"
        assert task["businessStatus"]["text"] == "0 of 2 sessions done"
    assert session_resources(client, order_id)["Observation"] == []


def test_visit_retry_after_a_lost_answer_counts_each_task_once(sandbox, flask_context):
    plan = post_plan(sandbox, FEIL, techniques=("swedish", "myofascial-release"))
    client = ehr_client(sandbox, FEIL)
    tasks = {f"Task/{task_id}": client.read("Task", task_id) for _, task_id in plan.values()}
    now = datetime.now(timezone.utc)
    orders = tuple(VisitOrder(t, f"ServiceRequest/{sr}", f"Task/{task}") for t, (sr, task) in plan.items())
    note = VisitNote(draft_id=str(uuid.uuid4()), orders=orders, patient_ref=f"Patient/{FEIL}",
                     performer_ref=THERAPIST_REF, start=now - timedelta(minutes=40), end=now,
                     techniques=("swedish", "myofascial-release"), sites=(LOWER_BACK,), pain_before=5, pain_after=3)
    first = write_visit(client, note, tasks, now)
    assert first["already"] is False and len(first["procedures"]) == 2
    # the answer was lost: the retry holds the old Task versions -> 412 -> re-read -> both already list it
    again = write_visit(client, note, tasks, now)
    assert again["already"] is True and sorted(again["procedures"]) == sorted(first["procedures"])
    for _, task_id in plan.values():
        after = client.read("Task", task_id)
        assert after["businessStatus"]["text"] == "1 of 2 sessions done" and len(after["output"]) == 1
    for sr, _ in plan.values():
        assert len(session_resources(client, sr)["Procedure"]) == 1
    assert len([o for o in session_resources(client, plan["swedish"][0])["Observation"]]) == 2


KARLA = "6f5557bb-1c8b-438a-a774-06a5cdf8cbab"  # Karla Kessler, clear chart, used by no other test here


def test_latex_allergy_is_shown_to_the_therapist_as_information_not_as_new(sandbox, app):
    # issue 4: an allergy to a massage product is information the therapist needs (gloves, oils), recorded after
    # the order or not; it never counts as a new finding, never stops the session, never asks the physician
    order_id, _ = post_order(sandbox, KARLA)
    tok = get_token(sandbox, "test-public", PHYSICIAN, KARLA,
                    scopes="launch openid fhirUser patient/AllergyIntolerance.cruds")
    client = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]), max_retries=0)
    today = datetime.now(timezone.utc).date().isoformat()
    created = client.create({
        "resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{KARLA}"}, "recordedDate": today,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                       "code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "300916003", "display": "Latex allergy"}],
                 "text": "Latex allergy"}})
    t = Therapist(sandbox, app, KARLA)
    page = t.page(order_id)
    assert page.status_code == 200
    html = unescape(page.text)
    assert 'data-testid="information"' in html and "For your information" in html
    assert "latex-free" in html and f"AllergyIntolerance/{created.id}" in html
    assert 'data-testid="nothing-new"' in html and 'data-testid="new-finding"' not in html
    assert 'data-testid="stop"' not in html
    # shown inside the re-screen, before the note form
    assert html.index('data-testid="rescreen"') < html.index('data-testid="information"') < html.index('id="note"')


def test_held_order_is_listed_with_its_reason_and_cannot_be_documented(sandbox, app):
    # a hold must not make the order vanish from the therapist's worklist: it is listed "On hold" with the
    # physician's reason (ServiceRequest.note from builders/plan.py order_status_update) and the messages, without
    # "Document a session"; a session posted anyway is refused in plain words and nothing is written
    from fhir_massage.builders.plan import order_status_update

    order_id, task_id = post_order(sandbox, SUZI, notes="Hold test order")
    past_id, _ = post_order(sandbox, SUZI, technique="stretching", notes="Past test order")
    t = Therapist(sandbox, app, SUZI)
    page = t.page(order_id)  # opened while still active: the therapist has the form
    assert 'id="note"' in page.text
    client = ehr_client(sandbox, SUZI)
    now = datetime.now(timezone.utc)
    held = order_status_update(client.read("ServiceRequest", order_id), "hold",
                               reason_text="Awaiting the rheumatology review", author_ref=f"Practitioner/{PHYSICIAN}",
                               now=now)
    client.update(held)
    client.update(order_status_update(client.read("ServiceRequest", past_id), "revoke",
                                      reason_text="Duplicate order", author_ref=f"Practitioner/{PHYSICIAN}", now=now))
    client.create(communication(order_ref=f"ServiceRequest/{order_id}", patient_ref=f"Patient/{SUZI}",
                                sender_ref="Practitioner/dr-ada-grey", recipient_ref=THERAPIST_REF,
                                text="Holding until rheumatology has seen her.", category="request", now=now,
                                draft_id=str(uuid.uuid4())))

    listing = t.http.get(f"{t.base}/", timeout=30)
    assert listing.status_code == 200
    html = unescape(listing.text)
    start = html.index(f'data-order="{order_id}"')
    card = html[start:html.index('</details>', start)]
    assert 'data-status="on-hold"' in card and "On hold" in card
    assert "The physician put this order on hold: Awaiting the rheumatology review" in card
    assert "Holding until rheumatology has seen her." in card
    assert "Document a session" not in card and f"/sessions/{order_id}\"" not in card
    past = html[html.index('data-testid="past-orders"'):]
    assert f'data-order="{past_id}"' in past and "revoked (Duplicate order)" in past

    # the note form is gone from the order's page, and a post is refused server-side
    again = t.page(order_id)
    assert again.status_code == 200 and 'data-testid="order-closed"' in again.text and 'id="note"' not in again.text
    r = t.submit(order_id, page.text, note_fields())
    assert r.status_code == 409
    assert "The physician has put this order on hold (Awaiting the rheumatology review)" in unescape(r.text)
    assert session_resources(client, order_id)["Procedure"] == []
    assert sessions_done_of(client, task_id) == 0


def sessions_done_of(client: FhirClient, task_id: str) -> int:
    from fhir_massage.builders.order import sessions_done

    return sessions_done(client.read("Task", task_id))


def test_rescreen_shows_entries_it_could_not_screen_plainly(sandbox, app):
    # Helen Brooks' text-only "hx of blood clot in leg" cannot be coded: the therapist's re-screen lists it as an
    # entry to check, in plain words, with its chart reference
    helen = "demo-helen-brooks"
    order_id, _ = post_order(sandbox, helen)
    t = Therapist(sandbox, app, helen)
    page = t.page(order_id)
    assert page.status_code == 200, page.text[:800]
    html = unescape(page.text)
    block = html[html.index('data-testid="needs-review"'):]
    block = block[:block.index("</details>")]
    assert re.search(r"'hx of blood clot in leg'</strong>: not screened automatically — check the chart entry", block)
    assert re.search(r"\[Condition/[^\]]+\]", block)
