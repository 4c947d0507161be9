"""The therapist documents a visit in headless Chromium, inside the sandbox EHR's iframe: the plan has two
techniques (one order each, one requisition) and gets ONE note: both techniques ticked, the CPT units of the
visit's total minutes split by the minutes given per technique; types a note (the autosave says "Draft saved"),
the EHR fails the submit (injected fault), a reload finds the draft, the submit then writes a Procedure per
technique and the pain Observations once (partOf both). A screenshot of the note page goes to
/tmp/session-page.png for a person to look at."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests

from fhir_massage.builders.order import order_transaction
from fhir_massage.fhir import FhirClient, StaticToken
from fhir_massage.orders_model import OrderDraft
from tests.fixtures.app import launch_in_ehr
from tests.fixtures.smart_sandbox import default_clients, get_token

pytestmark = pytest.mark.browser

TOM = "demo-tom-becker"
SCOPES = ("launch openid fhirUser patient/Patient.rs patient/ServiceRequest.crus patient/Task.crus "
          "patient/DetectedIssue.crs patient/Provenance.crs patient/Procedure.rs patient/Observation.rs")
SCREENSHOT = "/tmp/session-page.png"


def _order(sandbox) -> tuple[FhirClient, str, str]:
    tok = get_token(sandbox, "test-public", "dr-ada-grey", TOM, scopes=SCOPES)
    client = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]), max_retries=0)
    now = datetime.now(timezone.utc)
    draft = OrderDraft(draft_id=str(uuid.uuid4()), patient_ref=f"Patient/{TOM}",
                       requester_ref="Practitioner/dr-ada-grey", techniques=("swedish", "myofascial-release"),
                       sites=("37822005", "16982005:left"), frequency=2, duration_weeks=3, session_minutes=45,
                       authored=now - timedelta(minutes=1), reason_text="Chronic low back pain", pressure="moderate",
                       notes="Avoid deep pressure over the lumbar spine.")
    answer = client.transaction(order_transaction(draft, [], now, owner_ref="PractitionerRole/lmt-sam-reyes-role"))
    order_ids = [re.search(r"ServiceRequest/([^/]+)", e["response"]["location"]).group(1)
                 for e in answer["entry"] if "ServiceRequest/" in e["response"]["location"]]
    return client, order_ids[0], order_ids[1]  # swedish, myofascial release (the draft's order)


def test_note_survives_a_failed_submit_and_is_written_once(make_smart_sandbox, make_app_server, browser):
    clients, keys = default_clients()
    sandbox = make_smart_sandbox(clients=clients[:1], keys={})
    app = make_app_server(sandbox)
    client, order_id, mfr_id = _order(sandbox)
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        frame = launch_in_ehr(page, sandbox, app, "lmt-sam-reyes", TOM)
        frame.get_by_role("link", name="Document a session").first.click()
        order_card = frame.locator(f'[data-order="{order_id}"]')
        assert order_card.get_attribute("data-orders") == f"{order_id} {mfr_id}"  # one card for the plan
        assert frame.locator(f'[data-order="{mfr_id}"]').count() == 0
        order_card.get_by_role("link", name="Document a session").click()
        frame.get_by_test_id("rescreen").wait_for()
        assert frame.get_by_test_id("nothing-new").is_visible()

        ticked = frame.locator('input[name="techniques"]:checked')
        assert [ticked.nth(i).get_attribute("value") for i in range(ticked.count())] == ["swedish",
                                                                                        "myofascial-release"]
        frame.locator('input[name="start"]').fill("09:00")
        frame.locator('input[name="end"]').fill("09:38")
        minutes = frame.get_by_test_id("minutes")
        # 8-minute rule on the visit's total: 38 min = 3 units; two codes need the minutes to split them
        assert minutes.inner_text() == ("38 min · 3 CPT units (97124 + 97140: give the minutes per technique to "
                                        "split them)"), minutes.inner_text()
        frame.locator('input[name="minutes_myofascial_release"]').fill("20")
        assert minutes.inner_text() == "38 min · 3 CPT units: 97124 × 1, 97140 × 2", minutes.inner_text()
        # unticking one technique gives all the minutes to the other's code
        frame.locator('input[name="techniques"][value="myofascial-release"]').uncheck()
        assert minutes.inner_text() == "38 min · 3 CPT units (97124)", minutes.inner_text()
        frame.locator('input[name="techniques"][value="myofascial-release"]').check()
        frame.locator('input[name="pain_before"]').fill("7")
        frame.locator('input[name="pain_after"]').fill("4")
        frame.locator('textarea[name="subjective"]').fill("Low back ache after gardening, 7/10.")
        frame.locator('textarea[name="objective"]').fill("Hypertonic left erector spinae; guarded lumbar flexion.")
        frame.locator('input[name="response"]').fill("Tolerated well; relaxed by the end.")
        # the shared body diagram drives the site checkboxes (patient's right lower leg, then off again)
        region = frame.locator('#session-body [data-key="30021000:right"]')
        region.click()
        assert frame.locator('input[name="sites"][value="30021000:right"]').is_checked()
        assert region.get_attribute("aria-checked") == "true"
        region.press(" ")
        assert not frame.locator('input[name="sites"][value="30021000:right"]').is_checked()
        assert frame.locator('#session-body [data-key="16982005:left"]').get_attribute("aria-checked") == "true"
        status = frame.get_by_test_id("draft-status")
        status.filter(has_text=re.compile(r"^Draft saved \d\d:\d\d$")).wait_for()

        app_frame = next(f for f in page.frames if f.url.startswith(app.url))
        note_url = app_frame.url
        shot = context.new_page()
        shot.goto(note_url)
        shot.get_by_test_id("draft-status").filter(has_text="Draft saved").wait_for()
        shot.screenshot(path=SCREENSHOT, full_page=True)
        shot.close()

        # the EHR fails the write: the batch read passes, the transaction (next POST) answers 500
        requests.post(f"{sandbox.url}/_sandbox/faults", json={"fail_every_n": 2, "fail_status": 500,
                                                              "fail_methods": ["POST"]}, timeout=10)
        frame.get_by_test_id("submit").click()
        failed = frame.get_by_test_id("not-sent")
        failed.wait_for()
        assert "nothing was written to the chart" in failed.inner_text()
        requests.delete(f"{sandbox.url}/_sandbox/faults", timeout=10)

        app_frame = next(f for f in page.frames if f.url.startswith(app.url))
        app_frame.goto(note_url)  # reload the note page: the draft is there
        assert frame.locator('textarea[name="subjective"]').input_value() == "Low back ache after gardening, 7/10."
        assert frame.locator('input[name="end"]').input_value() == "09:38"
        assert frame.locator('input[name="minutes_myofascial_release"]').input_value() == "20"
        assert frame.get_by_test_id("minutes").inner_text() == "38 min · 3 CPT units: 97124 × 1, 97140 × 2"
        assert frame.get_by_test_id("draft-status").inner_text().startswith("Draft saved")

        frame.get_by_test_id("submit").click()
        frame.get_by_text("Session recorded in the chart").wait_for()
        assert "1 of 6 sessions done" in frame.locator(f'[data-order="{order_id}"]').inner_text()
    finally:
        context.close()

    written = []
    for oid in (order_id, mfr_id):
        procs = [p for p in client.search_all("Procedure", [("based-on", f"ServiceRequest/{oid}")])
                 if p["resourceType"] == "Procedure"]
        assert len(procs) == 1  # once, despite the failed first submit
        (proc,) = procs
        start, end = (datetime.fromisoformat(proc["performedPeriod"][k].replace("Z", "+00:00"))
                      for k in ("start", "end"))
        assert end - start == timedelta(minutes=38)
        written.append(proc)
    assert any(n["text"] == "Time: 20 of the visit's 38 minutes." for n in written[1]["note"])
    obs = [o for o in client.search_all("Observation", [("based-on", f"ServiceRequest/{order_id}")])
           if o["resourceType"] == "Observation"]
    assert sorted(o["valueInteger"] for o in obs) == [4, 7]
    assert all(o["partOf"] == [{"reference": f"Procedure/{p['id']}"} for p in written] for o in obs)
