"""Ordering against the real secured sandbox and the real app on loopback, launched as the demo physician.

Clear patient -> ServiceRequest + Task + Provenance written and valid; the DVT patient -> blocked, then overridden
with a reason -> DetectedIssue with mitigation; double submit -> one order; a 503 on the transaction -> nothing
written, draft kept, retry writes once; no ServiceRequest write scope -> unavailable page; therapist -> not offered.
"""

from __future__ import annotations

import re
from html import unescape
from urllib.parse import urlsplit

import pytest
import requests

from fhir_massage.builders.order import ORDER_ID_SYSTEM, REQUISITION_ID_SYSTEM
from fhir_massage.validation import errors, validate_resource
from tests.fixtures.smart_sandbox import create_launch, get_token, sandbox_faults

pytestmark = pytest.mark.integration

PHYSICIAN = "dr-ada-grey"
THERAPIST = "lmt-sam-reyes"
TOM = "demo-tom-becker"
DANA = "demo-dana-whitfield"
LEFT_LOWER_LEG = "30021000"
LOWER_BACK = "37822005"

ALL_SCOPES = ("launch openid fhirUser online_access patient/*.cruds user/Practitioner.rs user/PractitionerRole.rs")


@pytest.fixture
def app(smart_sandbox, make_app_server):
    return make_app_server(smart_sandbox, None, AREAS=("orders",), ORDERS_VALIDATE=True)


@pytest.fixture
def reader(smart_sandbox):
    """Reads the sandbox with a token of its own (patient/*.rs for one patient), like an auditor would."""

    def read(patient: str, path: str, params: dict | None = None) -> dict:
        tok = get_token(smart_sandbox, "test-public", PHYSICIAN, patient,
                        scopes="launch openid fhirUser patient/*.rs")
        r = requests.get(f"{smart_sandbox.fhir_base}/{path}", params=params or {},
                         headers={"Authorization": f"Bearer {tok['access_token']}", "Accept": "application/fhir+json"},
                         timeout=10)
        assert r.status_code == 200, r.text[:500]
        return r.json()

    return read


def launch(sandbox, app, user=PHYSICIAN, patient=TOM) -> tuple[requests.Session, str]:
    """EHR launch through the sandbox -> (browser session, the app's landing URL)."""
    browser = requests.Session()
    out = create_launch(sandbox, app.client_id, user, patient)
    r = browser.get(out["launch_url"], timeout=30)
    assert r.status_code == 200, r.text[:500]
    return browser, r.url


def open_order_form(browser: requests.Session, landing: str) -> requests.Response:
    r = browser.get(landing + "orders/", timeout=30)
    assert r.status_code == 200, r.text[:800]
    assert "/orders/draft/" in r.url
    return r


def hidden(html: str, name: str) -> str:
    m = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html)
    assert m, f"no hidden {name}"
    return unescape(m.group(1))


def form_fields(page: requests.Response, **fields) -> dict:
    data = {"csrf_token": hidden(page.text, "csrf_token"), "draft_id": hidden(page.text, "draft_id"),
            "frequency": "2", "duration_weeks": "6", "session_minutes": "45", "reason_text": "Chronic low back pain"}
    data.update(fields)
    return data


def sign_url(page: requests.Response) -> str:
    return page.url.split("/orders/")[0] + "/orders/sign"


def search(reader, patient, rtype, draft_id) -> list[dict]:
    system = REQUISITION_ID_SYSTEM if rtype in ("ServiceRequest",) else None
    if rtype == "ServiceRequest":
        params = {"patient": patient, "requisition": f"{system}|{draft_id}"}
        bundle = reader(patient, rtype, params)
        found = [e["resource"] for e in bundle.get("entry") or []]
        if not found:  # a server without the requisition parameter: filter by identifier ourselves
            bundle = reader(patient, rtype, {"patient": patient})
            found = [e["resource"] for e in bundle.get("entry") or []]
        return [r for r in found if any(i.get("system") == ORDER_ID_SYSTEM and i["value"].startswith(draft_id)
                                        for i in r.get("identifier") or [])]
    bundle = reader(patient, rtype, {"patient": patient} if rtype != "Provenance" else {})
    return [e["resource"] for e in bundle.get("entry") or []]


def assert_valid(resource: dict) -> None:
    problems = errors(validate_resource(resource))
    assert not problems, "\n".join(map(str, problems))


def test_clear_patient_order_lands_with_task_and_provenance(smart_sandbox, app, reader):
    browser, landing = launch(smart_sandbox, app)
    page = open_order_form(browser, landing)
    assert 'data-verdict="clear"' in page.text
    assert "Chronic low back pain" in page.text  # an active condition offered as the reason
    draft_id = hidden(page.text, "draft_id")
    tom_back = next(c for c in re.findall(r'name="reason_ref" value="([^"]+)"', page.text) if "low-back" in c)
    data = form_fields(page, technique=["swedish"], site=[LOWER_BACK], reason_ref=tom_back, pressure="moderate",
                       notes="Focus on the paraspinals.")
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert r.status_code == 200, r.text[:1500]
    assert "/orders/done/" in r.url and 'data-testid="order-signed"' in r.text
    assert "Twice a week for 6 weeks (12 sessions), 45-minute sessions" in r.text
    sr_id = re.search(r'data-testid="order-id">ServiceRequest/([^<]+)<', r.text).group(1)

    orders = search(reader, TOM, "ServiceRequest", draft_id)
    assert [o["id"] for o in orders] == [sr_id]
    sr = orders[0]
    assert_valid(sr)
    assert sr["requester"]["reference"] == f"Practitioner/{PHYSICIAN}"
    assert sr["reasonReference"] == [{"reference": tom_back}]
    assert sr["occurrenceTiming"]["repeat"]["count"] == 12
    tasks = [t for t in search(reader, TOM, "Task", draft_id) if t["focus"]["reference"] == f"ServiceRequest/{sr_id}"]
    assert len(tasks) == 1
    assert_valid(tasks[0])
    assert tasks[0]["code"]["coding"][0]["code"] == "fulfill" and tasks[0]["restriction"]["repetitions"] == 12
    provs = reader(TOM, "Provenance", {"target": f"ServiceRequest/{sr_id}"})["entry"]
    assert len(provs) == 1
    prov = provs[0]["resource"]
    assert_valid(prov)
    agents = {a["type"]["coding"][0]["code"]: a["who"] for a in prov["agent"]}
    assert agents["author"] == {"reference": f"Practitioner/{PHYSICIAN}"}
    assert agents["transmitter"]["type"] == "Device"


def test_dvt_leg_blocked_then_overridden_with_reason(smart_sandbox, app, reader):
    browser, landing = launch(smart_sandbox, app, patient=DANA)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    screen_url = page.url.split("/orders/")[0] + "/orders/screen"
    base = form_fields(page, technique=["deep-tissue"], site=[LEFT_LOWER_LEG], **{f"side-{LEFT_LOWER_LEG}": "left"},
                       reason_text="Calf cramps")
    live = browser.post(screen_url, data={k: v for k, v in base.items() if k != "csrf_token"},
                        headers={"X-CSRF-Token": base["csrf_token"], "Accept": "application/json"}, timeout=30)
    assert live.status_code == 200, live.text[:500]
    body = live.json()
    assert body["verdict"] == "contraindicated"
    assert f"{LEFT_LOWER_LEG}:left" in body["markedSites"] and f"{LEFT_LOWER_LEG}:right" not in body["markedSites"]
    dvt = next(f for f in body["findings"] if f["rule"] == "dvt-acute")
    assert dvt["applies"] and dvt["action"] == "override" and dvt["evidence"][0]["facts"].startswith("onset")

    # signing without the override is refused, nothing is written, and the page says why
    r = browser.post(sign_url(page), data=base, timeout=30)
    assert r.status_code == 422
    assert "This finding blocks signing" in r.text
    assert search(reader, DANA, "ServiceRequest", draft_id) == []

    data = dict(base, **{"override-dvt-acute": "clearance-obtained",
                         "override-note-dvt-acute": "Vascular surgery cleared light work after 6 weeks of apixaban",
                         "ack-anticoagulant": "yes", "ack-dvt-acute-elsewhere": "yes"})
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert r.status_code == 200 and "/orders/done/" in r.url, r.text[:1500]
    assert "Overridden by the ordering physician" in r.text
    orders = search(reader, DANA, "ServiceRequest", draft_id)
    assert len(orders) == 1
    sr = orders[0]
    issues = {}
    for e in reader(DANA, "DetectedIssue", {"patient": DANA})["entry"]:
        res = e["resource"]
        if any(i["value"].startswith(draft_id) for i in res["identifier"]):
            issues[res["identifier"][1]["value"]] = res
    assert {"dvt-acute", "anticoagulant", "dvt-acute-elsewhere"} <= set(issues)
    for issue in issues.values():
        assert_valid(issue)
        assert {"reference": f"ServiceRequest/{sr['id']}"} in issue["implicated"]
    mit = issues["dvt-acute"]["mitigation"][0]
    assert "Clearance from the treating specialist" in mit["action"]["text"] and "apixaban" in mit["action"]["text"]
    assert mit["author"] == {"reference": f"Practitioner/{PHYSICIAN}"}
    assert "Acknowledged" in issues["anticoagulant"]["mitigation"][0]["action"]["text"]
    assert {f"DetectedIssue/{i['id']}" for i in issues.values()} <= {s["reference"] for s in sr["supportingInfo"]}
    provs = reader(DANA, "Provenance", {"target": f"ServiceRequest/{sr['id']}"})["entry"]
    targets = {t["reference"] for t in provs[0]["resource"]["target"]}
    assert {f"DetectedIssue/{i['id']}" for i in issues.values()} <= targets


def test_double_submit_creates_one_order(smart_sandbox, app, reader):
    from concurrent.futures import ThreadPoolExecutor

    browser, landing = launch(smart_sandbox, app)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    data = form_fields(page, technique=["swedish", "stretching"], site=[LOWER_BACK])
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: browser.post(sign_url(page), data=data, timeout=60), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert all("/orders/done/" in a.url for a in answers)
    again = browser.post(sign_url(page), data=data, timeout=60)  # a browser retry long after
    assert "/orders/done/" in again.url
    orders = search(reader, TOM, "ServiceRequest", draft_id)
    assert sorted(o["code"]["coding"][1]["code"] for o in orders) == ["stretching", "swedish"]


@pytest.mark.parametrize("status", [503, 500])
def test_fault_writes_nothing_keeps_draft_and_retry_writes_once(smart_sandbox, app, reader, status):
    browser, landing = launch(smart_sandbox, app)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    data = form_fields(page, technique=["swedish"], site=[LOWER_BACK], notes="Keep it gentle")
    with sandbox_faults(smart_sandbox, {"fail_every_n": 1, "fail_status": status, "fail_methods": ["POST"]}):
        r = browser.post(sign_url(page), data=data, timeout=60)
    assert r.status_code == (503 if status == 503 else 502)
    assert (f"The EHR did not accept the order (it answered {status}). Nothing was saved. Your order is kept here: "
            "try again.") in unescape(r.text)
    assert search(reader, TOM, "ServiceRequest", draft_id) == []
    # the draft is kept: the same page shows what was typed
    again = browser.get(page.url, timeout=30)
    assert "Keep it gentle" in again.text and 'value="swedish" checked' in again.text
    r = browser.post(sign_url(page), data=data, timeout=60)
    assert "/orders/done/" in r.url, r.text[:1000]
    assert len(search(reader, TOM, "ServiceRequest", draft_id)) == 1


def test_impossible_input_is_explained_next_to_the_field(smart_sandbox, app):
    browser, landing = launch(smart_sandbox, app)
    page = open_order_form(browser, landing)
    data = form_fields(page, technique=[], site=[LEFT_LOWER_LEG], frequency="0", duration_weeks="abc",
                       session_minutes="240")
    r = browser.post(sign_url(page), data=data, timeout=30)
    assert r.status_code == 422
    text = unescape(r.text)
    assert 'id="err-techniques" data-error-for="techniques">Choose at least one technique.' in text
    assert "Say which side for the lower leg" in text
    assert "Give at least one session a week." in text
    assert "must be a whole number (got 'abc')" in text
    assert "A session lasts 10 to 120 minutes." in text


def test_without_service_request_write_scope_ordering_is_unavailable(smart_sandbox, make_app_server):
    narrowed = ("launch openid fhirUser online_access patient/Patient.rs patient/Condition.rs "
                "patient/ServiceRequest.rs user/Practitioner.rs user/PractitionerRole.rs")
    app = make_app_server(smart_sandbox, {"allowed_scopes": narrowed}, AREAS=("orders",))
    browser, landing = launch(smart_sandbox, app)
    r = browser.get(landing + "orders/", timeout=30)
    assert r.status_code == 403
    assert 'data-testid="orders-unavailable"' in r.text
    assert "patient/ServiceRequest.c" in r.text and "Task" in r.text


def test_therapist_is_not_offered_ordering(smart_sandbox, app):
    browser, landing = launch(smart_sandbox, app, user=THERAPIST, patient=DANA)
    r = browser.get(landing + "orders/", timeout=30)
    assert r.status_code == 403
    assert "Ordering is for physicians" in r.text
    assert "You are signed in as a massage therapist." in r.text
    # and the JSON endpoints refuse too
    sid = urlsplit(landing).path.split("/")[2]
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', r.text).group(1)
    s = browser.post(f"{landing}orders/sign", data={"csrf_token": csrf, "draft_id": "x"}, timeout=30)
    assert s.status_code == 403 and sid


@pytest.mark.parametrize("patient,words", [
    ("demo-helen-brooks", "Couldn't code this problem: review it."),
    ("demo-ray-okafor", "Some codes behind this finding are not verified against a published code list"),
])
def test_review_items_and_unverified_codes_are_said_plainly(smart_sandbox, app, patient, words):
    browser, landing = launch(smart_sandbox, app, patient=patient)
    page = open_order_form(browser, landing)
    assert words in unescape(page.text)
    assert 'data-verdict="clear"' not in page.text


def test_a_problem_entered_while_the_form_is_open_is_screened_before_signing(make_smart_sandbox, make_app_server):
    from datetime import date

    sandbox = make_smart_sandbox()  # its own sandbox: this test changes Tom Becker's chart
    app = make_app_server(sandbox, None, AREAS=("orders",), ORDERS_SIGN_CHART_AGE=0)
    browser, landing = launch(sandbox, app)
    page = open_order_form(browser, landing)
    assert 'data-verdict="clear"' in page.text
    tok = get_token(sandbox, "test-public", PHYSICIAN, TOM, scopes="launch openid fhirUser patient/Condition.cruds")
    dvt = {"resourceType": "Condition", "subject": {"reference": f"Patient/{TOM}"},
           "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                          "code": "active"}]},
           "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                              "code": "confirmed"}]},
           "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I82.402"}],
                    "text": "Acute DVT, left lower leg"},
           "onsetDateTime": date.today().isoformat()}
    r = requests.post(f"{sandbox.fhir_base}/Condition", json=dvt, timeout=10,
                      headers={"Authorization": f"Bearer {tok['access_token']}",
                               "Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text[:500]
    data = form_fields(page, technique=["swedish"], site=[LEFT_LOWER_LEG], **{f"side-{LEFT_LOWER_LEG}": "left"})
    signed = browser.post(sign_url(page), data=data, timeout=60)
    assert signed.status_code == 422, signed.url
    assert 'name="override-dvt-acute"' in signed.text


def test_allergy_only_patient_signs_without_acknowledgements_and_sees_the_information(make_smart_sandbox,
                                                                                       make_app_server):
    # issue 4: an allergy to a massage product is "an informational finding": the page shows it calmly under
    # "For your information", the verdict stays clear, signing needs no acknowledgement, no DetectedIssue is written
    sandbox = make_smart_sandbox()  # its own sandbox: this test adds a latex allergy to Tom Becker's chart
    app = make_app_server(sandbox, None, AREAS=("orders",), ORDERS_VALIDATE=True)
    tok = get_token(sandbox, "test-public", PHYSICIAN, TOM,
                    scopes="launch openid fhirUser patient/AllergyIntolerance.cruds")
    cs = "http://terminology.hl7.org/CodeSystem/allergyintolerance-"
    latex = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{TOM}"},
             "clinicalStatus": {"coding": [{"system": cs + "clinical", "code": "active"}]},
             "verificationStatus": {"coding": [{"system": cs + "verification", "code": "confirmed"}]},
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "300916003", "display": "Latex allergy"}],
                      "text": "Latex allergy"}}
    r = requests.post(f"{sandbox.fhir_base}/AllergyIntolerance", json=latex, timeout=10,
                      headers={"Authorization": f"Bearer {tok['access_token']}",
                               "Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text[:500]
    allergy_ref = f"AllergyIntolerance/{r.json()['id']}"

    browser, landing = launch(sandbox, app)
    page = open_order_form(browser, landing)
    text = unescape(page.text)
    assert 'data-verdict="clear"' in page.text
    assert 'data-testid="information"' in page.text and "For your information" in text
    assert "latex-free" in text and allergy_ref in text
    assert 'name="ack-allergy-massage-product"' not in page.text
    assert 'data-rule="allergy-massage-product"' in page.text and 'class="finding finding--' not in page.text

    screen_url = page.url.split("/orders/")[0] + "/orders/screen"
    data = form_fields(page, technique=["swedish"], site=[LOWER_BACK])
    live = browser.post(screen_url, data={k: v for k, v in data.items() if k != "csrf_token"},
                        headers={"X-CSRF-Token": data["csrf_token"], "Accept": "application/json"}, timeout=30)
    body = live.json()
    assert body["verdict"] == "clear" and body["findings"] == [] and body["signStatus"] == "Ready to sign."
    assert [i["rule"] for i in body["information"]] == ["allergy-massage-product"]
    assert "For your information" in body["html"]

    draft_id = hidden(page.text, "draft_id")
    signed = browser.post(sign_url(page), data=data, timeout=60)  # no ack-* field at all
    assert signed.status_code == 200 and "/orders/done/" in signed.url, signed.text[:1500]
    reader_tok = get_token(sandbox, "test-public", PHYSICIAN, TOM, scopes="launch openid fhirUser patient/*.rs")
    issues = requests.get(f"{sandbox.fhir_base}/DetectedIssue", params={"patient": TOM}, timeout=10,
                          headers={"Authorization": f"Bearer {reader_tok['access_token']}"}).json()
    mine = [e["resource"] for e in issues.get("entry") or []
            if any(i["value"].startswith(draft_id) for i in e["resource"].get("identifier") or [])]
    assert mine == []  # information is never written as a DetectedIssue


def test_needs_review_entry_must_be_acknowledged_and_is_recorded_on_the_order(smart_sandbox, app, reader):
    # Helen Brooks has a text-only "hx of blood clot in leg": the engine cannot code it, so it is a needs-review
    # entry; signing must not be "Ready" until the physician confirms having read it, and the confirmation is
    # written on the order (ServiceRequest.note, forms.finding_issues says why not a DetectedIssue)
    helen = "demo-helen-brooks"
    browser, landing = launch(smart_sandbox, app, patient=helen)
    page = open_order_form(browser, landing)
    draft_id = hidden(page.text, "draft_id")
    ack_names = sorted(set(re.findall(r'name="(ack-review-[0-9a-f]{12})"', page.text)))
    assert ack_names, "no acknowledgement checkbox for the needs-review entry"
    base = form_fields(page, technique=["swedish"], site=[LOWER_BACK])
    screen_url = page.url.split("/orders/")[0] + "/orders/screen"
    live = browser.post(screen_url, data={k: v for k, v in base.items() if k != "csrf_token"},
                        headers={"X-CSRF-Token": base["csrf_token"], "Accept": "application/json"}, timeout=30)
    body = live.json()
    assert body["signStatus"] != "Ready to sign." and "could not screen" in body["signStatus"]

    refused = browser.post(sign_url(page), data=base, timeout=30)
    assert refused.status_code == 422
    assert "The app could not screen this chart entry" in unescape(refused.text)
    assert search(reader, helen, "ServiceRequest", draft_id) == []

    # everything the refused page asks for (the review boxes, and any relative finding of Helen's chart)
    asked = set(re.findall(r'name="(ack-[a-z0-9\-]+)"', refused.text))
    assert set(ack_names) <= asked
    assert not re.search(r'<select name="override-', refused.text), "Helen's lower back should not be blocked"
    signed = browser.post(sign_url(page), data=dict(base, **{n: "yes" for n in asked}), timeout=60)
    assert signed.status_code == 200 and "/orders/done/" in signed.url, signed.text[:1500]
    assert 'data-testid="reviewed"' in signed.text and "hx of blood clot in leg" in unescape(signed.text)
    orders = search(reader, helen, "ServiceRequest", draft_id)
    assert len(orders) == 1
    sr = orders[0]
    assert_valid(sr)
    notes = [n for n in sr.get("note") or [] if n["text"].startswith("Reviewed by the physician before signing")]
    assert len(notes) == len(ack_names)
    clot = next(n for n in notes if "hx of blood clot in leg" in n["text"])
    assert re.search(r"\(Condition/[^)]+\) — not screened automatically\.$", clot["text"]), clot["text"]
    assert clot["authorReference"] == {"reference": f"Practitioner/{PHYSICIAN}"} and clot.get("time")
