"""The app against a sandbox that plays an EHR without transactions (SandboxConfig.transactions=False): its
CapabilityStatement omits 'transaction' and a transaction Bundle answers 501 not-supported. Signing an order then
writes the order first, its findings after, links them, and says so; a failure half way says what was saved, keeps
the draft, and signing again finishes only what is missing."""

from __future__ import annotations

from html import unescape

import pytest
import requests

from fhir_massage.fhir import FhirClient, StaticToken, request_entry, transaction_bundle
from fhir_massage.writes import supports_transactions, write_bundle
from tests.fixtures.smart_sandbox import get_token, sandbox_faults, start_smart_sandbox
from tests.integration.test_ordering import (DANA, LEFT_LOWER_LEG, LOWER_BACK, PHYSICIAN, TOM, form_fields,
                                             hidden, launch, open_order_form, search, sign_url)

pytestmark = pytest.mark.integration

NOT_ATOMIC = "This EHR does not accept all-or-nothing writes: the order was saved first, then its findings."


@pytest.fixture(scope="module")
def smart_sandbox():
    sb = start_smart_sandbox(transactions=False)
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def app(smart_sandbox):
    from tests.fixtures.app import register_with_sandbox

    server = register_with_sandbox(smart_sandbox, {}, AREAS=("orders",), ORDERS_VALIDATE=True)
    yield server
    server.stop()


@pytest.fixture
def reader(smart_sandbox):
    def read(patient: str, path: str, params: dict | None = None) -> dict:
        tok = get_token(smart_sandbox, "test-public", PHYSICIAN, patient, scopes="launch openid fhirUser patient/*.rs")
        r = requests.get(f"{smart_sandbox.fhir_base}/{path}", params=params or {}, timeout=10,
                         headers={"Authorization": f"Bearer {tok['access_token']}", "Accept": "application/fhir+json"})
        assert r.status_code == 200, r.text[:500]
        return r.json()

    return read


def test_sandbox_switch_drops_transaction_from_metadata_and_refuses_one(smart_sandbox):
    cap = requests.get(f"{smart_sandbox.fhir_base}/metadata", timeout=10).json()
    assert supports_transactions(cap) is False
    assert {"code": "batch"} in cap["rest"][0]["interaction"]
    tok = get_token(smart_sandbox, "test-public", PHYSICIAN, TOM, scopes="launch openid fhirUser patient/*.cruds")
    r = requests.post(smart_sandbox.fhir_base, timeout=10, json={"resourceType": "Bundle", "type": "transaction",
                                                                  "entry": []},
                      headers={"Authorization": f"Bearer {tok['access_token']}",
                               "Content-Type": "application/fhir+json"})
    assert r.status_code == 501
    assert r.json()["issue"][0]["code"] == "not-supported"


def test_write_bundle_one_by_one_against_the_sandbox(smart_sandbox):
    tok = get_token(smart_sandbox, "test-public", PHYSICIAN, TOM, scopes="launch openid fhirUser patient/*.cruds")
    sr_urn, di_urn = "urn:uuid:7a0b1f0e-0000-4000-8000-00000000a001", "urn:uuid:7a0b1f0e-0000-4000-8000-00000000a002"
    ident = "https://fhir-massage.dev/test|no-tx-1"
    bundle = transaction_bundle([
        request_entry("POST", "ServiceRequest", {
            "resourceType": "ServiceRequest", "identifier": [{"system": ident.split("|")[0], "value": "no-tx-1"}],
            "status": "draft", "intent": "order", "subject": {"reference": f"Patient/{TOM}"},
            "code": {"text": "Massage"}, "supportingInfo": [{"reference": di_urn}]},
            full_url=sr_urn, if_none_exist=[("identifier", ident)]),
        request_entry("POST", "DetectedIssue", {
            "resourceType": "DetectedIssue", "identifier": [{"system": ident.split("|")[0], "value": "no-tx-1-di"}],
            "status": "final", "patient": {"reference": f"Patient/{TOM}"}, "implicated": [{"reference": sr_urn}]},
            full_url=di_urn, if_none_exist=[("identifier", ident + "-di")]),
    ])
    with FhirClient(smart_sandbox.fhir_base, token_source=StaticToken(tok["access_token"])) as client:
        outcome = write_bundle(client, bundle, transactions=None)  # unknown: tries, gets 501, goes one by one
        assert not outcome.atomic and outcome.complete
        sr_id, di_id = outcome.by_type()["ServiceRequest"][0], outcome.by_type()["DetectedIssue"][0]
        sr = client.read("ServiceRequest", sr_id)
        assert sr["supportingInfo"] == [{"reference": f"DetectedIssue/{di_id}"}]
        assert client.read("DetectedIssue", di_id)["implicated"] == [{"reference": f"ServiceRequest/{sr_id}"}]
        again = write_bundle(client, bundle, transactions=False)
        assert again.by_type() == outcome.by_type()  # conditional creates matched: nothing new


def test_order_with_findings_is_written_in_steps_and_says_so(smart_sandbox, app, reader):
    browser, landing = launch(smart_sandbox, app, patient=DANA)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    data = form_fields(page, technique=["swedish"], site=[LEFT_LOWER_LEG + ":left", LOWER_BACK], **{
        "override-dvt-acute": "clearance-obtained",
        "override-note-dvt-acute": "Vascular surgery cleared light work after 6 weeks of apixaban",
        "ack-anticoagulant": "yes", "ack-dvt-acute-elsewhere": "yes"})
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert r.status_code == 200 and "/orders/done/" in r.url, unescape(r.text)[:1500]
    assert NOT_ATOMIC in unescape(r.text)
    (sr,) = search(reader, DANA, "ServiceRequest", draft_id)
    issues = [e["resource"] for e in reader(DANA, "DetectedIssue", {"patient": DANA})["entry"]
              if any(i["value"].startswith(draft_id) for i in e["resource"]["identifier"])]
    assert issues and {f"DetectedIssue/{i['id']}" for i in issues} == {s["reference"] for s in sr["supportingInfo"]}
    assert all({"reference": f"ServiceRequest/{sr['id']}"} in i["implicated"] for i in issues)
    provs = reader(DANA, "Provenance", {"target": f"ServiceRequest/{sr['id']}"})["entry"]
    assert len(provs) == 1


def test_failure_half_way_says_what_was_saved_and_signing_again_finishes(smart_sandbox, app, reader):
    browser, landing = launch(smart_sandbox, app, patient=DANA)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    data = form_fields(page, technique=["swedish"], site=[LOWER_BACK], **{"ack-anticoagulant": "yes",
                                                                            "ack-dvt-acute-elsewhere": "yes"})
    with sandbox_faults(smart_sandbox, {"fail_every_n": 1, "fail_status": 500, "fail_methods": ["POST"],
                                        "fail_paths": ["/fhir/DetectedIssue"]}):
        r = browser.post(sign_url(page), data=data, timeout=60)
    text = unescape(r.text)
    assert r.status_code == 502, text[:1500]
    (sr,) = search(reader, DANA, "ServiceRequest", draft_id)
    assert f"Saved in the chart: ServiceRequest/{sr['id']}, Task/" in text
    assert "Not saved: the order (or its link to its findings), the screening findings, the authorship record" in text
    assert "sign again to save only what is missing" in text
    assert "supportingInfo" not in sr
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert "/orders/done/" in r.url, unescape(r.text)[:1500]
    (sr2,) = search(reader, DANA, "ServiceRequest", draft_id)  # the same order, not a second one
    assert sr2["id"] == sr["id"] and sr2["supportingInfo"]
    tasks = [t for t in reader(DANA, "Task", {"patient": DANA})["entry"]
             if t["resource"].get("focus", {}).get("reference") == f"ServiceRequest/{sr['id']}"]
    assert len(tasks) == 1



def test_no_answer_to_the_first_write_says_part_may_be_saved_and_signing_again_finishes(smart_sandbox, app, reader):
    browser, landing = launch(smart_sandbox, app)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    data = form_fields(page, technique=["swedish"], site=[LOWER_BACK])
    with sandbox_faults(smart_sandbox, {"drop_every_n": 1, "fail_methods": ["POST"],
                                        "fail_paths": ["/fhir/ServiceRequest"]}):
        r = browser.post(sign_url(page), data=data, timeout=60)
    text = unescape(r.text)
    assert r.status_code == 502, text[:1500]
    assert "The EHR did not answer, so part of the order may have been saved." in text
    assert "Nothing was saved" not in text
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert "/orders/done/" in r.url, unescape(r.text)[:1500]
    assert len(search(reader, TOM, "ServiceRequest", draft_id)) == 1

# -- sessions ----------------------------------------------------------------------------------------------------

SUZI = "95efed54-0648-4faf-a179-9a2b3c45e92d"  # Suzi Bechtelar, fibromyalgia, clear
THERAPIST_REF = "Practitioner/lmt-sam-reyes"
SESSION_SCOPES = ("launch openid fhirUser patient/Patient.rs patient/ServiceRequest.crus patient/Task.crus "
                  "patient/Observation.crus patient/Procedure.crus patient/Provenance.crs patient/DetectedIssue.crs "
                  "user/Practitioner.rs")


def _client(sandbox, patient: str) -> FhirClient:
    tok = get_token(sandbox, "test-public", PHYSICIAN, patient, scopes=SESSION_SCOPES)
    return FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]), max_retries=0)


def _order_with_task(client: FhirClient, patient: str) -> tuple[str, dict]:
    import uuid
    from datetime import datetime, timedelta, timezone

    from fhir_massage.builders.order import order_transaction
    from fhir_massage.orders_model import OrderDraft

    now = datetime.now(timezone.utc)
    draft = OrderDraft(draft_id=str(uuid.uuid4()), patient_ref=f"Patient/{patient}",
                       requester_ref=f"Practitioner/{PHYSICIAN}", techniques=("swedish",), sites=(LOWER_BACK,),
                       frequency=1, duration_weeks=2, session_minutes=45, authored=now - timedelta(minutes=1),
                       reason_text="Chronic pain", pressure="moderate")
    outcome = write_bundle(client, order_transaction(draft, [], now, owner_ref="PractitionerRole/lmt-sam-reyes-role"),
                           transactions=False)
    assert outcome.complete
    return outcome.by_type()["ServiceRequest"][0], client.read("Task", outcome.by_type()["Task"][0])


def _note(order_id: str, task: dict, patient: str):
    import uuid
    from datetime import datetime, timedelta, timezone

    from fhir_massage.builders.session import SessionNote

    now = datetime.now(timezone.utc)
    return SessionNote(draft_id=str(uuid.uuid4()), order_ref=f"ServiceRequest/{order_id}",
                       task_ref=f"Task/{task['id']}", patient_ref=f"Patient/{patient}", performer_ref=THERAPIST_REF,
                       start=now - timedelta(minutes=30), end=now, technique="swedish", sites=(LOWER_BACK,),
                       pain_before=5, pain_after=2), now


def test_session_written_one_by_one_procedure_first(smart_sandbox):
    from smart_app.sessions import write_session

    client = _client(smart_sandbox, SUZI)
    order_id, task = _order_with_task(client, SUZI)
    note, now = _note(order_id, task, SUZI)
    result = write_session(client, note, task, now)
    assert result["already"] is False and result["procedure"].startswith("Procedure/")
    proc = client.read("Procedure", result["procedure"].split("/")[1])
    assert proc["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    after = client.read("Task", task["id"])
    assert result["procedure"] in [(o.get("valueReference") or {}).get("reference") for o in after.get("output") or []]


def test_session_failing_half_way_says_what_was_saved_and_a_retry_finishes(smart_sandbox):
    from fhir_massage.writes import PartialWrite
    from smart_app.sessions import write_session

    client = _client(smart_sandbox, SUZI)
    order_id, task = _order_with_task(client, SUZI)
    note, now = _note(order_id, task, SUZI)
    with sandbox_faults(smart_sandbox, {"fail_every_n": 1, "fail_status": 500, "fail_methods": ["PUT"],
                                        "fail_paths": ["/fhir/Task"]}):
        with pytest.raises(PartialWrite) as caught:
            write_session(client, note, task, now)
    words = caught.value.message
    procs = client.search_all("Procedure", [("based-on", f"ServiceRequest/{order_id}")])
    assert len(procs) == 1
    assert f"Saved in the chart: Procedure/{procs[0]['id']}, Observation/" in words
    assert "Not saved: the task, the authorship record (Provenance)" in words
    assert not client.read("Task", task["id"]).get("output")  # the session is not counted yet

    again = write_session(client, note, client.read("Task", task["id"]), now)
    assert again["procedure"] == f"Procedure/{procs[0]['id']}"  # the same Procedure, matched, not a second one
    assert len(client.search_all("Procedure", [("based-on", f"ServiceRequest/{order_id}")])) == 1
    outputs = client.read("Task", task["id"]).get("output") or []
    assert len(outputs) == 1


# -- plan changes ------------------------------------------------------------------------------------------------


def _plan(sandbox, patient: str):
    import uuid
    from datetime import datetime, timedelta, timezone

    from fhir_massage.builders.order import order_transaction
    from fhir_massage.orders_model import OrderDraft
    from tests.integration.test_plan_helpers import DR_REF, SeededPlan, default_site, writer

    w = writer(sandbox, patient=patient)
    authored = datetime.now(timezone.utc) - timedelta(days=3)
    draft = OrderDraft(draft_id=uuid.uuid4().hex, patient_ref=f"Patient/{patient}", requester_ref=DR_REF,
                       techniques=("swedish",), sites=(default_site(),), frequency=2, duration_weeks=6,
                       session_minutes=45, authored=authored, reason_text="Chronic low back pain")
    outcome = write_bundle(w, order_transaction(draft, [], authored), transactions=False)
    assert outcome.complete
    orders = [w.read("ServiceRequest", i) for i in outcome.by_type()["ServiceRequest"]]
    tasks = [w.read("Task", i) for i in outcome.by_type()["Task"]]
    return w, SeededPlan(draft.draft_id, orders, tasks)


def test_plan_hold_without_transactions_task_follows_and_a_failure_says_what_was_saved(smart_sandbox):
    from tests.fixtures.app import register_with_sandbox
    from tests.integration.test_plan import launch as plan_launch
    from tests.integration.test_plan import post, status_form

    patient = "demo-eleanor-price"
    w, plan = _plan(smart_sandbox, patient)
    app = register_with_sandbox(smart_sandbox, {})
    try:
        browser, url = plan_launch(smart_sandbox, app, patient)
        r = post(browser, app, status_form(browser.get(url, timeout=30).text, plan.draft_id), action="hold",
                 reason="Waiting for imaging")
        assert r.status_code == 200 and 'data-testid="done"' in r.text, unescape(r.text)[:1500]
        order = w.read("ServiceRequest", plan.orders[0]["id"])
        task = w.read("Task", plan.tasks[0]["id"])
        assert order["status"] == "on-hold" and task["status"] == "on-hold"

        with sandbox_faults(smart_sandbox, {"fail_every_n": 1, "fail_status": 500, "fail_methods": ["PUT"],
                                            "fail_paths": ["/fhir/Task"]}):
            r = post(browser, app, status_form(browser.get(url, timeout=30).text, plan.draft_id), action="resume")
        words = unescape(r.text)
        assert r.status_code == 502, words[:1500]
        assert f"Saved in the chart: ServiceRequest/{order['id']}." in words
        assert "Not saved: the therapists' task following the order, the record of who changed it" in words
        assert w.read("ServiceRequest", order["id"])["status"] == "active"
        assert w.read("Task", task["id"])["status"] == "on-hold"
    finally:
        app.stop()
