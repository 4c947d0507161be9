"""The sandbox EHR's order entry (fhir_massage/sandbox/ehr_orders.py) as a CDS Hooks client of the app's service,
over loopback: discovery, prefetch from the sandbox's data, ES384 JWTs whose JWKS the sandbox serves, FHIR access
with a token from the sandbox's authorization server; cards rendered and acted on (accept a suggestion, override
with a reason, feedback, sign, launch the app from a smart link)."""

from __future__ import annotations

import html
import json
import re
import secrets
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

from fhir_massage.sandbox import ehr_orders
from fhir_massage.sandbox.access import OPEN
from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
from fhir_massage.serving import RunningServer, serve_in_thread, wait_ready
from tests.fixtures.app import AppServer, start_app_server
from tests.fixtures.smart_sandbox import pkce_pair

pytestmark = pytest.mark.integration

DANA = "demo-dana-whitfield"
DVT_CRITICAL = "Absolute contraindication: Deep vein thrombosis, current or acute (left lower limb)"
OVERRIDE_SYSTEM = "https://fhir-massage.dev/fhir/CodeSystem/cds-override-reason"
CARD_ID_SYSTEM = "https://fhir-massage.dev/fhir/identifier/cds-card"


@dataclass
class CdsPair:
    sandbox_url: str
    sandbox: RunningServer
    sandbox_app: Any
    app: AppServer
    client_id: str

    def stop(self) -> None:
        self.app.stop()
        self.sandbox.stop()
        self.sandbox_app.extensions["fhir_massage.sandbox"]["store"].close()

    def fhir(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        """Search the sandbox's store directly (the EHR's own view, no token)."""
        ext = self.sandbox_app.extensions["fhir_massage.sandbox"]
        body = ext["service"].search(OPEN, f"{self.sandbox_url}/fhir", rtype, list(params.items())).body
        return [e["resource"] for e in body.get("entry") or [] if e.get("search", {}).get("mode") == "match"]


def start_cds_pair(*, configure: bool = True, secured: bool = True) -> CdsPair:
    """A seeded sandbox (create_sandbox_app installs the order entry) and the app, registered both ways: the app
    accepts the sandbox's CDS JWTs, and (``secured``) the sandbox's authorization server knows the app as a SMART
    client (so the EHR can give the CDS service FHIR access and launch the app from a smart link)."""
    cfg = SandboxConfig(open=not secured, seed=True)
    sb_app = create_sandbox_app(cfg)
    running = serve_in_thread(sb_app)
    wait_ready(f"{running.url}/_sandbox/health", ok=lambda r: r.status_code == 200)
    sb = running.url
    client_id = f"fm-cds-{secrets.token_hex(4)}"
    app = start_app_server(lambda url: [{"iss": f"{sb}/fhir", "client_id": client_id, "cds_iss": sb,
                                         "cds_jwks_url": f"{sb}/ehr/cds-jwks", "frame_ancestors": [sb]}])
    if secured:
        r = requests.post(f"{sb}/_sandbox/clients", timeout=10, json={
            "client_id": client_id, "auth_method": "none", "redirect_uris": [app.redirect_uri],
            "launch_url": app.launch_url, "name": "fhir-massage (test)"})
        assert r.status_code == 201, r.text
    if configure:
        r = requests.post(f"{sb}/ehr/orders/settings", json={"cds_base_url": app.url}, timeout=10)
        assert r.status_code == 200, r.text
    return CdsPair(sb, running, sb_app, app, client_id)


@pytest.fixture(scope="module")
def pair():
    p = start_cds_pair()
    yield p
    p.stop()


def order(pair: CdsPair, *, action="sign", patient=DANA, techniques=("deep-tissue",),
          sites=("30021000:left",), user="dr-ada-grey") -> requests.Response:
    data = [("user", user), ("patient", patient), ("action", action)]
    data += [("technique", t) for t in techniques] + [("site", s) for s in sites]
    return requests.post(f"{pair.sandbox_url}/ehr/orders", data=data, timeout=30)


# --- reading the page like a browser would (forms, buttons, links) -----------------------------------------------


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.links: list[tuple[str, str]] = []
        self._form: dict[str, Any] | None = None
        self._button: dict[str, Any] | None = None
        self._a: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = {"action": a.get("action", ""), "fields": {}, "buttons": [], "radios": []}
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None:
            if a.get("type") == "radio":
                self._form["radios"].append((a["name"], a["value"]))
            elif a.get("name"):
                self._form["fields"][a["name"]] = a.get("value", "")
        elif tag == "button" and self._form is not None:
            self._button = {"text": "", "formaction": a.get("formaction")}
        elif tag == "a":
            self._a = {"href": a.get("href", ""), "text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "button" and self._button is not None and self._form is not None:
            self._form["buttons"].append(self._button)
            self._button = None
        elif tag == "a" and self._a is not None:
            self.links.append((self._a["text"].strip(), self._a["href"]))
            self._a = None

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button["text"] += data
        if self._a is not None:
            self._a["text"] += data


def _parse(page: str) -> _Forms:
    p = _Forms()
    p.feed(page)
    return p


def submit(pair: CdsPair, resp: requests.Response, button: str, **extra: str) -> requests.Response:
    """Press the button whose text starts with ``button`` (the first such) with the form's fields + ``extra``."""
    for form in _parse(resp.text).forms:
        for b in form["buttons"]:
            if b["text"].strip().startswith(button):
                action = b["formaction"] or form["action"]
                return requests.post(urljoin(resp.url, action), data={**form["fields"], **extra}, timeout=30)
    raise AssertionError(f"no button {button!r} on the page")


def card_block(page: str, summary: str) -> str:
    """The <article> of the card with that summary."""
    for block in re.findall(r"<article .*?</article>", page, flags=re.S):
        if summary in block:
            return block
    raise AssertionError(f"no card {summary!r}")


def card_form(page: str, summary: str, button: str) -> dict[str, Any]:
    for form in _parse(card_block(page, summary)).forms:
        if any(b["text"].strip().startswith(button) for b in form["buttons"]):
            return form
    raise AssertionError(f"no {button!r} on the card {summary!r}")


def press(pair: CdsPair, resp: requests.Response, summary: str, button: str, **extra: str) -> requests.Response:
    form = card_form(resp.text, summary, button)
    return requests.post(urljoin(resp.url, form["action"]), data={**form["fields"], **extra}, timeout=30)


def notice(page: str) -> str:
    m = re.search(r'<div class="notice[^"]*"[^>]*id="notice">(.*?)</div>', page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", m.group(1))) if m else ""


def _card_records(pair: CdsPair) -> list[dict[str, Any]]:
    rows = pair.app.store._exec("SELECT value FROM kv WHERE ns=?", ("cds-card",))
    return [json.loads(row[0]) for row in rows]


# --- hooks and cards ---------------------------------------------------------------------------------------------


def test_the_sandbox_serves_its_cds_client_jwks(pair):
    jwks = requests.get(f"{pair.sandbox_url}/ehr/cds-jwks", timeout=10).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-384" and key["alg"] == "ES384" and "d" not in key


def test_order_sign_on_the_dvt_leg_shows_the_critical_card_and_holds_the_signature(pair):
    r = order(pair)
    assert r.status_code == 200, r.text
    assert "/ehr/orders/s/" in r.url  # post/redirect/get: a refresh does not send the hook again
    page = r.text
    assert 'data-indicator="critical"' in page
    assert DVT_CRITICAL in page
    assert "<code>dvt-acute</code>" in page
    assert "Accept: Request physician clearance" in page
    assert "Not signed: 1 critical card is neither accepted nor overridden." in notice(page)
    assert "the service was given FHIR access" in page
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "<script" not in page
    # the card stored for feedback came from this sandbox's JWT issuer
    records = [v for v in _card_records(pair) if v["rule"] == "dvt-acute"]
    assert records and records[-1]["iss"] == pair.sandbox_url
    # nothing was written: a blocked order stays a draft
    draft_id = re.search(r"<code>ServiceRequest/([0-9a-f-]{36})</code>", page).group(1)
    assert pair.fhir("ServiceRequest", _id=draft_id) == []


def test_order_select_with_swedish_on_the_back_has_no_critical_card(pair):
    r = order(pair, action="select", techniques=("swedish",), sites=("77568009",))
    assert r.status_code == 200, r.text
    assert 'data-indicator="critical"' not in r.text
    assert re.search(r"order-select: \d+ card\(s\)", r.text)


def test_a_clear_patient_gets_no_cards_and_sign_goes_straight_through(pair):
    r = order(pair, patient="demo-tom-becker", techniques=("swedish",), sites=("37822005",))
    assert r.status_code == 200 and "No cards" in r.text
    assert "Order signed." in notice(r.text)
    ref = re.search(r"(ServiceRequest/[0-9a-f-]{36}) is in the sandbox", r.text).group(1)
    (sr,) = pair.fhir("ServiceRequest", _id=ref.split("/")[1])
    assert sr["status"] == "active" and sr["subject"]["reference"] == "Patient/demo-tom-becker"


def test_form_errors_are_shown_not_sent(pair):
    r = order(pair, techniques=())
    assert r.status_code == 400 and "Choose at least one technique." in r.text


def offered(page: str, select: str) -> list[str]:
    """The option values of the form's <select id=...> (what the page lets the user choose)."""
    m = re.search(rf'<select id="{select}"[^>]*>(.*?)</select>', page, flags=re.S)
    return re.findall(r'<option value="([^"]*)"', m.group(1)) if m else []


def selected(page: str, select: str) -> list[str]:
    m = re.search(rf'<select id="{select}"[^>]*>(.*?)</select>', page, flags=re.S)
    return re.findall(r'<option value="([^"]*)" selected>', m.group(1)) if m else []


def test_the_form_offers_a_clinician_only_the_patients_on_their_care_teams(pair):
    # docs/sandbox-fhir.md: Dr. Lee Chen is only on Tom Becker's and Dana Whitfield's care teams
    r = requests.get(f"{pair.sandbox_url}/ehr/orders", params={"user": "dr-lee-chen"}, timeout=10)
    assert r.status_code == 200, r.text
    assert offered(r.text, "patient") == ["demo-tom-becker", DANA]
    assert selected(r.text, "user") == ["dr-lee-chen"]
    assert "Dr. Lee Chen, MD (2 patients)</option>" in r.text
    # Dr. Ada Grey is on every team; she is the clinician when none is chosen
    r = requests.get(f"{pair.sandbox_url}/ehr/orders", timeout=10)
    assert selected(r.text, "user") == ["dr-ada-grey"]
    assert "demo-maria-santos" in offered(r.text, "patient") and DANA in offered(r.text, "patient")
    # no script on the page: choosing another clinician and pressing "Show this clinician's patients" reloads the
    # form (GET) with that clinician's patients, keeping what was already ticked
    (form,) = [f for f in _parse(r.text).forms
               if any(b["text"].startswith("Show this clinician") for b in f["buttons"])]
    (button,) = [b for b in form["buttons"] if b["text"].startswith("Show this clinician")]
    r = requests.get(urljoin(r.url, button["formaction"]), timeout=10,
                     params=[("user", "dr-lee-chen"), ("patient", DANA), ("technique", "swedish")])
    assert offered(r.text, "patient") == ["demo-tom-becker", DANA] and selected(r.text, "patient") == [DANA]
    assert 'value="swedish" checked' in r.text


def test_a_patient_outside_the_clinicians_care_teams_is_refused_plainly(pair):
    before = len(_card_records(pair))
    r = order(pair, user="dr-lee-chen", patient="demo-maria-santos", action="select")
    assert r.status_code == 403
    assert "/ehr/orders/s/" not in r.url  # no order session was made
    assert "Dr. Lee Chen, MD may not order for this patient: they are not on the patient's care team" in \
        html.unescape(r.text)
    assert "Traceback" not in r.text and "<script" not in r.text
    assert offered(r.text, "patient") == ["demo-tom-becker", DANA]  # the form again, with their own patients
    assert len(_card_records(pair)) == before  # the CDS service was not called for a chart the user may not open
    # one of their own patients goes through
    r = order(pair, user="dr-lee-chen", patient=DANA, action="select")
    assert r.status_code == 200 and "/ehr/orders/s/" in r.url, r.text


def test_an_open_sandbox_offers_every_patient_to_every_clinician():
    p = start_cds_pair(secured=False)
    try:
        r = requests.get(f"{p.sandbox_url}/ehr/orders", params={"user": "dr-lee-chen"}, timeout=10)
        assert "demo-maria-santos" in offered(r.text, "patient")
        assert "Show this clinician" not in r.text and "(2 patients)" not in r.text
        r = order(p, user="dr-lee-chen", patient="demo-maria-santos", techniques=("swedish",), sites=("77568009",),
                  action="select")
        assert r.status_code == 200 and "/ehr/orders/s/" in r.url, r.text
    finally:
        p.stop()


def test_settings_are_loopback_only_and_checked(pair):
    r = requests.post(f"{pair.sandbox_url}/ehr/orders/settings", json={"cds_base_url": "ftp://x"}, timeout=10)
    assert r.status_code == 400


def test_an_unknown_order_session_is_a_plain_404(pair):
    r = requests.get(f"{pair.sandbox_url}/ehr/orders/s/nope", timeout=10)
    assert r.status_code == 404 and "unknown or has expired" in r.text
    r = requests.post(f"{pair.sandbox_url}/ehr/orders/s/nope/sign", timeout=10)
    assert r.status_code == 404


def test_without_a_configured_service_the_page_says_so():
    p = start_cds_pair(configure=False, secured=False)
    try:
        r = order(p)
        assert r.status_code == 502 and "No CDS service is configured" in r.text
    finally:
        p.stop()


# --- acting on cards ---------------------------------------------------------------------------------------------


def test_accepting_remove_the_site_updates_the_draft_and_asks_again(pair):
    r = order(pair, sites=("30021000:left", "77568009"))
    first = r.text
    before = re.search(r"hookInstance <code>([^<]+)</code>", first).group(1)
    form = card_form(first, DVT_CRITICAL, "Accept: Remove Left lower leg from the order")
    card_uuid, suggestion_uuid = form["fields"]["card"], form["fields"]["suggestion"]
    r2 = press(pair, r, DVT_CRITICAL, "Accept: Remove Left lower leg from the order")
    assert r2.status_code == 200, r2.text
    page = r2.text
    # the draft changed (sites), the hook fired again with a new hookInstance, and the DVT card is gone
    assert re.search(r'class="draft-sites">Back</dd>', page)
    after = re.search(r"hookInstance <code>([^<]+)</code>", page).group(1)
    assert after != before
    assert DVT_CRITICAL not in card_blocks_text(page)
    assert "order-sign sent again with the changed order (new hookInstance)" in notice(page)
    # feedback "accepted" with the suggestion's uuid, recorded in the app's store
    fb = pair.app.store.get("cds-feedback", card_uuid)
    assert fb["outcome"] == "accepted" and fb["acceptedSuggestions"][0]["id"] == suggestion_uuid
    assert "Feedback sent; the service answered: recorded by the service." in page
    # the old card's forms are stale now: acting on it is refused plainly
    stale = requests.post(urljoin(r.url, form["action"]), data=form["fields"], timeout=30)
    assert "Those cards were replaced by a newer call" in notice(stale.text)
    # signed (the cards left are warnings): the order's text names what is ordered now, not the removed leg
    r3 = submit(pair, r2, "Sign order")
    assert "Order signed." in notice(r3.text), notice(r3.text)
    draft_id = re.search(r"<code>ServiceRequest/([0-9a-f-]{36})</code>", r3.text).group(1)
    (sr,) = pair.fhir("ServiceRequest", _id=draft_id)
    assert [b["text"] for b in sr["bodySite"]] == ["Back"]
    assert sr["code"]["text"] == "Deep tissue massage: Back"


def card_blocks_text(page: str) -> str:
    return " ".join(re.findall(r"<article .*?</article>", page, flags=re.S))


ANTICOAGULANT = "Relative contraindication: Anticoagulant therapy"


def test_accepting_light_swedish_changes_technique_and_pressure_and_the_card_goes(pair):
    r = order(pair)
    r2 = press(pair, r, ANTICOAGULANT, "Accept: Change to light-pressure Swedish massage")
    assert re.search(r'class="draft-techniques">Swedish massage <span', r2.text)
    assert re.search(r'class="draft-details">Light pressure</dd>', r2.text)
    assert ANTICOAGULANT not in card_blocks_text(r2.text)


def test_accepting_the_services_light_pressure_suggestion_resolves_its_card(pair):
    # Every light-pressure suggestion the service offers on the card must make the card go once the EHR applies it
    # and fires the hook again. The screen reads techniques and sites, not pressure, so a suggestion that only sets
    # the pressure ("Keep the order at light pressure", offered before) brought the same card back: it is gone, and
    # light pressure now comes with the technique change (light Swedish massage) that the screen does see.
    r = order(pair)
    block = card_block(r.text, ANTICOAGULANT)
    labels = [b["text"].strip() for f in _parse(block).forms for b in f["buttons"]]
    assert "Accept: Keep the order at light pressure" not in labels
    light = [label for label in labels if re.search(r"light[ -]pressure", label, flags=re.I)]
    assert light, labels
    for label in light:
        r = order(pair)
        r2 = press(pair, r, ANTICOAGULANT, label)
        assert re.search(r'class="draft-details">Light pressure</dd>', r2.text), label  # applied by the client
        assert re.search(r'class="draft-techniques">Swedish massage <span', r2.text), label
        assert ANTICOAGULANT not in card_blocks_text(r2.text), label


def test_accepting_clearance_creates_the_task_in_the_sandbox(pair):
    r = order(pair)
    r2 = press(pair, r, DVT_CRITICAL, "Accept: Request physician clearance (the order is not changed)")
    page = r2.text
    ref = re.search(r"(Task/[0-9a-f-]{36}) created in the sandbox", page).group(1)
    (task,) = pair.fhir("Task", _id=ref.split("/")[1])
    draft_id = re.search(r"<code>ServiceRequest/([0-9a-f-]{36})</code>", page).group(1)
    assert task["code"]["coding"][0]["code"] == "approve" and task["focus"]["reference"] == f"ServiceRequest/{draft_id}"
    # nothing in the order changed, so the card stays, accepted, and no longer blocks signing
    assert "Accepted: Request physician clearance" in card_block(page, DVT_CRITICAL)
    r3 = submit(pair, r2, "Sign order")
    assert "Order signed." in notice(r3.text)
    (sr,) = pair.fhir("ServiceRequest", _id=draft_id)
    assert sr["status"] == "active"  # the Task's focus now resolves to the signed order


def test_accepting_remove_the_order_deletes_the_draft(pair):
    r = order(pair)
    r2 = press(pair, r, DVT_CRITICAL, "Accept: Remove this massage order")
    assert "No draft order is left" in r2.text
    assert "Sign order" not in r2.text


def test_override_needs_a_reason_then_sends_feedback_and_the_detected_issue_lands(pair):
    r = order(pair)
    form = card_form(r.text, DVT_CRITICAL, "Override this card")
    card_uuid = form["fields"]["card"]
    assert [v for _, v in form["radios"]] == ["0", "1", "2", "3"]
    # no reason: refused, nothing sent
    r1 = press(pair, r, DVT_CRITICAL, "Override this card")
    assert "Choose one of the card's override reasons." in notice(r1.text)
    assert pair.app.store.get("cds-feedback", card_uuid) is None
    # with a reason and a comment
    r2 = press(pair, r1, DVT_CRITICAL, "Override this card", reason="0", comment="Cleared by hematology today")
    page = r2.text
    fb = pair.app.store.get("cds-feedback", card_uuid)
    assert fb["outcome"] == "overridden"
    assert fb["overrideReason"]["system"] == OVERRIDE_SYSTEM and fb["overrideReason"]["code"] == "clearance-obtained"
    assert fb["userComment"] == "Cleared by hematology today"
    (issue,) = pair.fhir("DetectedIssue", identifier=f"{CARD_ID_SYSTEM}|{card_uuid}")
    assert fb["detectedIssue"] == f"DetectedIssue/{issue['id']}"
    assert "Physician clearance obtained" in issue["mitigation"][0]["action"]["text"]
    assert f"DetectedIssue/{issue['id']}</code>" in card_block(page, DVT_CRITICAL)
    assert f"DetectedIssue/{issue['id']} is in the sandbox" in notice(page)


def test_sign_is_blocked_until_the_critical_card_is_overridden(pair):
    r = order(pair, action="select")
    assert DVT_CRITICAL in r.text  # order-select shows it too
    r1 = submit(pair, r, "Sign order")  # order-sign fires now: new cards, critical one undecided
    assert "Not signed: 1 critical card is" in notice(r1.text)
    r2 = submit(pair, r1, "Sign order")  # pressing again without acting is still blocked
    assert "Not signed: 1 critical card is" in notice(r2.text)
    draft_id = re.search(r"<code>ServiceRequest/([0-9a-f-]{36})</code>", r2.text).group(1)
    assert pair.fhir("ServiceRequest", _id=draft_id) == []
    r3 = press(pair, r2, DVT_CRITICAL, "Override this card", reason="1")
    r4 = submit(pair, r3, "Sign order")
    assert "Order signed." in notice(r4.text), notice(r4.text)
    (sr,) = pair.fhir("ServiceRequest", _id=draft_id)
    assert sr["status"] == "active" and sr["code"]["coding"][1]["code"] == "deep-tissue"
    assert "Sign order" not in r4.text  # a signed order offers no second signature


def test_the_smart_link_launches_the_app_with_a_real_launch_and_app_context(pair):
    r = order(pair)
    links = [href for text, href in _parse(card_block(r.text, DVT_CRITICAL)).links
             if text == "Open the massage screen (fhir-massage)"]
    assert len(links) == 1
    # embedded (default): the EHR frame with the app's launch URL, the frame allowed by CSP
    framed = requests.get(urljoin(r.url, links[0]), timeout=10)
    src = re.search(r'<iframe class="app-frame" src="([^"]+)"', framed.text).group(1).replace("&amp;", "&")
    assert src.startswith(f"{pair.app.url}/launch?")
    assert f"frame-src {pair.app.url} 'self'" in framed.headers["Content-Security-Policy"]
    # embed=0: straight to the app's launch URL with iss and a launch id
    resp = requests.get(urljoin(r.url, links[0]) + "&embed=0", allow_redirects=False, timeout=10)
    assert resp.status_code == 303
    loc = urlsplit(resp.headers["Location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == pair.app.launch_url
    q = {k: v[0] for k, v in parse_qs(loc.query).items()}
    assert q["iss"] == f"{pair.sandbox_url}/fhir"
    # the launch id is real: the app's client can authorize with it; the token carries the patient and the
    # card's appContext (CDS Hooks 2.0 Link.appContext)
    verifier, challenge = pkce_pair()
    auth = requests.get(f"{pair.sandbox_url}/auth/authorize", allow_redirects=False, timeout=10, params={
        "response_type": "code", "client_id": pair.client_id, "redirect_uri": pair.app.redirect_uri,
        "scope": "launch openid fhirUser patient/Patient.rs", "state": "s1", "aud": q["iss"],
        "code_challenge": challenge, "code_challenge_method": "S256", "launch": q["launch"]})
    assert auth.status_code == 302, auth.text
    code = parse_qs(urlsplit(auth.headers["Location"]).query)["code"][0]
    tok = requests.post(f"{pair.sandbox_url}/auth/token", timeout=10, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": pair.app.redirect_uri,
        "code_verifier": verifier, "client_id": pair.client_id}).json()
    assert tok["patient"] == DANA
    app_context = json.loads(tok["appContext"])
    assert app_context["area"] == "orders"
    assert app_context["rule"] == "dvt-acute" and app_context["patient"] == DANA
    assert app_context["serviceRequest"].startswith("ServiceRequest/")


def test_the_smart_link_opens_the_apps_orders_area_on_the_cards_finding(pair):
    # the whole path a clinician takes: card link -> EHR launch -> the app's SMART launch -> the app reads the
    # appContext from the token response and opens its orders area with the card's finding as the target
    r = order(pair)
    (href,) = [h for t, h in _parse(card_block(r.text, DVT_CRITICAL)).links if t.startswith("Open the massage")]
    browser = requests.Session()
    app = browser.get(urljoin(r.url, href) + "&embed=0", timeout=30)
    assert app.status_code == 200, app.text[:500]
    (callback,) = [h for h in app.history if urlsplit(h.url).path == "/callback"]
    lsid = callback.headers["Location"].split("/")[2]
    assert callback.headers["Location"] == f"/p/{lsid}/orders/#finding-dvt-acute"
    assert urlsplit(app.url).path.startswith(f"/p/{lsid}/orders/draft/")
    assert 'data-rule="dvt-acute" id="finding-dvt-acute"' in app.text


def test_the_smart_link_on_an_open_sandbox_says_it_cannot_launch():
    p = start_cds_pair(secured=False)
    try:
        r = order(p)
        assert "prefetch only, no FHIR access" in r.text
        (href,) = [h for t, h in _parse(card_block(r.text, DVT_CRITICAL)).links if t.startswith("Open the massage")]
        r2 = requests.get(urljoin(r.url, href), timeout=10)
        assert "runs open (without its authorization server), so it cannot launch SMART apps" in notice(r2.text)
        # an override still reaches the service; without FHIR access no DetectedIssue is written
        r3 = press(p, r2, DVT_CRITICAL, "Override this card", reason="2")
        assert "Feedback sent; the service answered: recorded by the service." in r3.text
        assert "DetectedIssue/" not in r3.text
    finally:
        p.stop()


def test_render_markdown_shows_html_as_text():
    out = str(ehr_orders.render_markdown("**a** <script>x</script> \\*b\\* `<i>` &lt;c&gt;\n\n- item"))
    assert out == ("<p><strong>a</strong> &lt;script&gt;x&lt;/script&gt; *b* <code>&lt;i&gt;</code> &lt;c&gt;</p>"
                   "<ul><li>item</li></ul>")
