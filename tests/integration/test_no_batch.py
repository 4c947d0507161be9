"""The app against a sandbox that plays an EHR with neither batch nor transaction (SandboxConfig.batch=False,
transactions=False): what readiness promises for "no-batch" - every page reads with one request per search instead
of one batch, with the same content - and writes go entry by entry. The launch banner, the order screen, signing,
the therapist's worklist and note, and the physician's plan all work."""

from __future__ import annotations

import re
from html import unescape

import pytest
import requests

from tests.fixtures.smart_sandbox import FhirCallCounter, start_smart_sandbox
from tests.integration.test_documentation import Therapist, note_fields
from tests.integration.test_ordering import (LOWER_BACK, PHYSICIAN, TOM, form_fields, hidden, launch,
                                             open_order_form, sign_url)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox():
    sb = start_smart_sandbox(transactions=False, batch=False)
    counter = FhirCallCounter(sb.app.wsgi_app)
    sb.app.wsgi_app = counter
    sb.counter = counter
    yield sb
    sb.app.wsgi_app = counter.app
    sb.stop()


@pytest.fixture(scope="module")
def app(sandbox):
    from tests.fixtures.app import register_with_sandbox

    server = register_with_sandbox(sandbox, {})
    yield server
    server.stop()


def test_metadata_lists_neither_batch_nor_transaction(sandbox):
    cap = requests.get(f"{sandbox.fhir_base}/metadata", timeout=10).json()
    assert cap["rest"][0]["interaction"] == []


def test_order_screen_reads_search_by_search_and_signing_writes_in_steps(sandbox, app):
    sandbox.counter.calls.clear()
    browser, landing = launch(sandbox, app, user=PHYSICIAN, patient=TOM)
    start = browser.get(landing, timeout=30)
    assert "Tom" in unescape(start.text)  # the banner's patient, read without a batch
    page = open_order_form(browser, landing)
    assert 'data-verdict="clear"' in page.text and "Chronic low back pain" in page.text
    reads = [c for c in sandbox.counter.calls if c[0] == "GET" and c[1] != "/fhir/metadata"]
    assert len(reads) >= 8  # Patient + every chart search, one request each (the batch answered 501)
    assert ("POST", "/fhir") in sandbox.counter.calls  # tried once per page, refused
    draft_id = hidden(page.text, "draft_id")
    r = browser.post(sign_url(page), data=form_fields(page, technique=["swedish"], site=[LOWER_BACK]), timeout=60)
    assert "/orders/done/" in r.url, unescape(r.text)[:1500]
    assert "This EHR does not accept all-or-nothing writes" in unescape(r.text)
    assert draft_id


def test_therapist_worklist_note_and_plan_work_without_batch(sandbox, app):
    browser, landing = launch(sandbox, app, user=PHYSICIAN, patient=TOM)
    page = open_order_form(browser, landing)
    r = browser.post(sign_url(page), data=form_fields(page, technique=["swedish"], site=[LOWER_BACK]), timeout=60)
    order_id = re.search(r'data-testid="order-id">ServiceRequest/([^<]+)<', r.text).group(1)

    t = Therapist(sandbox, app, TOM)
    listing = t.http.get(f"{t.base}/", timeout=30)
    assert listing.status_code == 200 and f'data-order="{order_id}"' in listing.text, unescape(listing.text)[:1500]
    note_page = t.page(order_id)
    assert note_page.status_code == 200, unescape(note_page.text)[:1500]
    done = t.submit(order_id, note_page.text, note_fields())
    assert done.status_code == 200 and "Session recorded in the chart" in done.text, unescape(done.text)[:1500]
    assert ("This EHR does not accept all-or-nothing writes: the session was saved first, then its pain scores, "
            "the task count and the authorship record.") in unescape(done.text)

    plan = browser.get(landing + "plan/", timeout=30)
    assert plan.status_code == 200, unescape(plan.text)[:1500]
    assert f"ServiceRequest/{order_id}" in plan.text or order_id in plan.text
