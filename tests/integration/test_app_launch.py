"""The real app against the real sandbox on loopback: EHR and standalone launches, every client authentication,
refresh, narrowed scopes, state tampering, unknown iss, two launches in one browser, escaping, clean logs."""

from __future__ import annotations

import logging
import re
import time
from html import unescape
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from flask import Blueprint, g, render_template_string

from fhir_massage.fhir import FhirClient, StaticToken
from fhir_massage.serving import serve_in_thread
from smart_app.launch import NS_TOKENS, fhir_client, require_launch
from tests.fixtures.smart_sandbox import create_launch, get_token

pytestmark = pytest.mark.integration

PHYSICIAN = "dr-ada-grey"
THERAPIST = "lmt-sam-reyes"
TOM = ("demo-tom-becker", "Tom Becker")
DANA = ("demo-dana-whitfield", "Dana Whitfield")


def probe_blueprint() -> Blueprint:
    """A stand-in area: reads through fhir_client() and renders EHR text through base.html."""
    bp = Blueprint("probe", __name__, url_prefix="/p/<lsid>/probe")

    @bp.get("/patient")
    @require_launch
    def patient():
        return fhir_client().read("Patient", g.ctx.patient_id)["name"][0]["family"]

    @bp.get("/conditions")
    @require_launch
    def conditions():
        items = fhir_client().search_all("Condition", {"patient": g.ctx.patient_id})
        names = [(c.get("code") or {}).get("text") or "" for c in items]
        return render_template_string('{% extends "base.html" %}{% block content %}<ul>{% for n in names %}'
                                      '<li class="condition">{{ n }}</li>{% endfor %}</ul>{% endblock %}', names=names)

    return bp


def orders_blueprint() -> Blueprint:
    bp = Blueprint("orders", __name__, url_prefix="/p/<lsid>/orders")
    bp.add_url_rule("/", "index", lambda: "orders")
    return bp


@pytest.fixture
def sandbox(smart_sandbox):
    """The shared session sandbox: each app registers its own client there and only reads demo data."""
    return smart_sandbox


@pytest.fixture
def app_for(sandbox, make_app_server):
    def make(client=None, **config):
        config.setdefault("BLUEPRINTS", [probe_blueprint(), orders_blueprint()])
        config.setdefault("AREAS", ())
        return make_app_server(sandbox, client, **config)

    return make


def ehr_launch(browser: requests.Session, sandbox, app, user=PHYSICIAN, patient=TOM[0], **ctx) -> requests.Response:
    out = create_launch(sandbox, app.client_id, user, patient, **ctx)
    assert out["launch_url"].startswith(app.launch_url + "?")
    r = browser.get(out["launch_url"], timeout=30)
    return r


def banner_name(html: str) -> str | None:
    m = re.search(r'data-testid="patient-name">([^<]*)<', html)
    return unescape(m.group(1)) if m else None


def lsid_of(url: str) -> str:
    return re.match(r"^/p/([^/]+)/", urlsplit(url).path).group(1)


def test_ehr_launch_shows_patient_user_and_role(sandbox, app_for):
    app = app_for()
    browser = requests.Session()
    r = ehr_launch(browser, sandbox, app)
    assert r.status_code == 200, r.text[:500]
    assert banner_name(r.text) == TOM[1]
    assert "Ada Grey" in r.text and "role-badge--physician" in r.text
    hops = [urlsplit(h.url).path for h in r.history]
    assert hops == ["/launch", "/auth/authorize", "/callback"]
    # the physician may order: the (stand-in) orders area is linked
    assert f'href="/p/{lsid_of(r.url)}/orders/"' in r.text
    assert browser.get(r.url.replace("/p/", "/p/", 1) + "probe/patient", timeout=10).text == "Becker"


def test_therapist_launch(sandbox, app_for):
    app = app_for()
    r = ehr_launch(requests.Session(), sandbox, app, user=THERAPIST, patient=DANA[0])
    assert banner_name(r.text) == DANA[1]
    assert "role-badge--therapist" in r.text
    block = re.search(r'data-area="orders">(.*?)</li>', r.text, re.S).group(1)
    assert "unavailable" in block and "physicians" in block


def _hidden_fields(html: str) -> dict[str, str]:
    return {unescape(n): unescape(v) for n, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html)}


def test_standalone_launch_with_login_and_patient_picker(sandbox, app_for):
    app = app_for()
    browser = requests.Session()
    r = browser.get(f"{app.launch_url}?{urlencode({'iss': sandbox.fhir_base})}", timeout=30)
    assert "Sign in to the sandbox EHR" in r.text
    q = parse_qs(urlsplit(r.history[-1].headers["Location"] if r.history else r.url).query)
    assert "launch" not in q
    action = f"{sandbox.url}/auth/authorize"
    r = browser.post(action, data={**_hidden_fields(r.text), "sandbox_user": THERAPIST, "sandbox_action": "allow"},
                     timeout=30)
    assert "Choose a patient" in r.text
    r = browser.post(action, data={**_hidden_fields(r.text), "sandbox_patient": DANA[0], "sandbox_action": "allow"},
                     timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert banner_name(r.text) == DANA[1]
    assert "role-badge--therapist" in r.text


@pytest.mark.parametrize("method,alg", [("client_secret_basic", None), ("private_key_jwt", "RS384"),
                                        ("private_key_jwt", "ES384")])
def test_confidential_clients(sandbox, app_for, method, alg):
    client = {"auth_method": method}
    if alg:
        client["alg"] = alg
    app = app_for(client)
    r = ehr_launch(requests.Session(), sandbox, app)
    assert r.status_code == 200, r.text[:800]
    assert banner_name(r.text) == TOM[1]


def test_private_key_jwt_with_inline_jwks(sandbox, app_for):
    app = app_for({"auth_method": "private_key_jwt", "alg": "ES384", "inline_jwks": True})
    assert banner_name(ehr_launch(requests.Session(), sandbox, app).text) == TOM[1]


def test_expired_token_is_refreshed(sandbox, app_for, token_time):
    app = app_for()
    browser = requests.Session()
    r = ehr_launch(browser, sandbox, app)
    lsid = lsid_of(r.url)
    # the token's lifetime passes for the EHR and the app (moved clocks, tests/fixtures/token_time.py)
    first = token_time.expire_session_token(sandbox, app, lsid)
    assert browser.get(f"{app.url}/p/{lsid}/probe/patient", timeout=10).text == "Becker"
    second = app.store.get(NS_TOKENS, lsid)
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"]


def test_token_rejected_by_ehr_is_refreshed_once(sandbox, app_for):
    app = app_for()
    browser = requests.Session()
    lsid = lsid_of(ehr_launch(browser, sandbox, app).url)
    rec = app.store.get(NS_TOKENS, lsid)
    # An access token the EHR no longer accepts though it has not expired by the app's clock (revoking it at the
    # sandbox would revoke the refresh token with it, RFC 7009 §2.1): the app gets a 401 and refreshes once.
    app.store.put(NS_TOKENS, lsid, dict(rec, access_token="no-longer-valid"), 600)
    assert browser.get(f"{app.url}/p/{lsid}/probe/patient", timeout=10).text == "Becker"
    assert app.store.get(NS_TOKENS, lsid)["access_token"] not in ("no-longer-valid", rec["access_token"])


def test_refresh_refused_ends_the_session_with_a_clear_page(sandbox, app_for, token_time):
    app = app_for({"refresh": False})
    browser = requests.Session()
    lsid = lsid_of(ehr_launch(browser, sandbox, app).url)
    assert not app.store.get(NS_TOKENS, lsid).get("refresh_token")  # the EHR gave no way to renew it
    token_time.expire_session_token(sandbox, app, lsid)
    r = browser.get(f"{app.url}/p/{lsid}/probe/patient", timeout=10)
    assert r.status_code == 401
    assert "session has ended" in r.text and "open fhir-massage again" in r.text


def test_narrowed_scopes_show_ordering_unavailable(sandbox, app_for):
    app = app_for({"allowed_scopes": ["launch", "openid", "fhirUser", "online_access", "patient/Patient.rs",
                                      "patient/Condition.rs", "user/Practitioner.rs", "user/PractitionerRole.rs"]})
    r = ehr_launch(requests.Session(), sandbox, app)
    assert banner_name(r.text) == TOM[1]
    block = re.search(r'data-area="orders">(.*?)</li>', r.text, re.S).group(1)
    assert "unavailable" in block and "create ServiceRequest" in block and "href" not in block


# A client the EHR allows user/ scopes only: its token reaches the patients on the user's care teams, whatever
# patient the launch names (docs/sandbox-fhir.md: Dr. Lee Chen is on Tom Becker's and Dana Whitfield's teams only).
USER_SCOPES = ("launch openid fhirUser online_access user/Patient.rs user/Condition.rs user/Observation.rs "
               "user/MedicationRequest.rs user/MedicationStatement.rs user/MedicationAdministration.rs "
               "user/AllergyIntolerance.rs user/Procedure.crus user/ServiceRequest.crus user/DetectedIssue.crs "
               "user/Task.crus user/Communication.crs user/Provenance.crs user/CarePlan.rs user/Practitioner.rs "
               "user/PractitionerRole.rs")
LEE = "dr-lee-chen"
MARIA = "demo-maria-santos"


def test_a_launch_on_a_patient_the_ehr_refuses_says_the_ehr_did_not_allow_it(sandbox, make_app_server):
    # POST /_sandbox/launches does not check care teams (the FHIR API does): the launch lands on Maria Santos, whose
    # Patient read the EHR refuses (403). The app says the EHR refused, not "The data has no Patient resource".
    app = make_app_server(sandbox, {"allowed_scopes": USER_SCOPES.split()}, registration={"scopes": USER_SCOPES})
    browser = requests.Session()
    r = browser.get(create_launch(sandbox, app.client_id, LEE, MARIA)["launch_url"], timeout=30)
    assert r.status_code == 403, r.text[:800]
    assert "The EHR did not allow this" in r.text
    assert "no Patient resource" not in r.text and "Traceback" not in r.text
    assert app.store._exec("SELECT count(*) FROM kv WHERE ns=?", (NS_TOKENS,)) == [(0,)]  # no session was kept
    # the same app and user on one of Dr. Chen's own patients: the launch and the chart pages work
    r = browser.get(create_launch(sandbox, app.client_id, LEE, DANA[0])["launch_url"], timeout=30)
    assert r.status_code == 200 and banner_name(r.text) == DANA[1]
    assert browser.get(f"{app.url}/p/{lsid_of(r.url)}/plan/", timeout=30).status_code == 200


def test_every_chart_load_raises_the_ehrs_refusal_of_the_patient(sandbox):
    # One helper (chart_fetch.batch_patient) reads the Patient out of every page's batch: the orders chart, the plan
    # and the therapist's order page all raise the FhirAuthError that smart_app/errors.py shows as a plain page.
    from fhir_massage.chart_fetch import fetch_chart_resources
    from fhir_massage.errors import FhirAuthError
    from smart_app import plan, sessions

    tok = get_token(sandbox, "test-public", LEE, MARIA, scopes="launch openid fhirUser user/*.rs")
    ehr = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]))
    loads = {"orders": lambda: fetch_chart_resources(ehr, MARIA), "plan": lambda: plan.load(ehr, MARIA),
             "sessions": lambda: sessions.load_order_page(ehr, MARIA, "any-order")}
    for name, load in loads.items():
        with pytest.raises(FhirAuthError) as refused:
            load()
        assert refused.value.status == 403, name
    assert fetch_chart_resources(ehr, DANA[0])[0]["id"] == DANA[0]  # his own patient is read


@pytest.mark.parametrize("tamper", ["altered", "dropped", "replayed"])
def test_state_tampering_gives_a_clear_page(sandbox, app_for, tamper):
    app = app_for()
    browser = requests.Session()
    out = create_launch(sandbox, app.client_id, PHYSICIAN, TOM[0])
    r = browser.get(out["launch_url"], allow_redirects=False, timeout=10)
    r = browser.get(r.headers["Location"], allow_redirects=False, timeout=10)  # the sandbox's authorize
    callback = r.headers["Location"]
    parts = urlsplit(callback)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    if tamper == "altered":
        q["state"] = q["state"][::-1]
    elif tamper == "dropped":
        q.pop("state")
    else:
        assert browser.get(callback, timeout=10).status_code == 200
    r = browser.get(f"{app.url}/callback?{urlencode(q)}", allow_redirects=False, timeout=10)
    assert r.status_code == 400
    assert "This sign-in link is not valid" in r.text and "Traceback" not in r.text


def test_unknown_iss_makes_no_outbound_request(app_for):
    hits: list[str] = []

    def trap(environ, start_response):
        hits.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    trap_server = serve_in_thread(trap)
    try:
        app = app_for()
        evil = f"{trap_server.url}/fhir"
        r = requests.get(f"{app.launch_url}?{urlencode({'iss': evil, 'launch': 'x'})}", allow_redirects=False,
                         timeout=10)
        assert r.status_code == 400 and "not set up" in r.text
        assert "Location" not in r.headers
        # control: the trap does record requests when someone calls it
        requests.get(f"{trap_server.url}/ping", timeout=5)
        assert hits == ["/ping"]
    finally:
        trap_server.stop()


def test_two_launches_in_one_browser_do_not_mix(sandbox, app_for):
    app = app_for()
    browser = requests.Session()
    first = ehr_launch(browser, sandbox, app, patient=TOM[0])
    second = ehr_launch(browser, sandbox, app, patient=DANA[0])
    assert lsid_of(first.url) != lsid_of(second.url)
    assert banner_name(browser.get(first.url, timeout=10).text) == TOM[1]
    assert banner_name(browser.get(second.url, timeout=10).text) == DANA[1]
    assert browser.get(first.url + "probe/patient", timeout=10).text == "Becker"
    assert browser.get(second.url + "probe/patient", timeout=10).text == "Whitfield"
    # the same URL in another browser opens nothing
    r = requests.get(first.url, timeout=10)
    assert r.status_code == 403 and TOM[1] not in r.text


def test_script_in_a_condition_name_is_shown_as_text(make_smart_sandbox, make_app_server):
    sandbox = make_smart_sandbox()  # its own sandbox: this test writes a Condition
    tok = get_token(sandbox, "test-public", PHYSICIAN, TOM[0],
                    scopes="launch openid fhirUser patient/Condition.cruds patient/Patient.rs")
    ehr = FhirClient(sandbox.fhir_base, token_source=StaticToken(tok["access_token"]))
    evil = "<script>alert('x')</script> Tendinitis & <b>bold</b>"
    ehr.create({"resourceType": "Condition", "subject": {"reference": f"Patient/{TOM[0]}"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "verificationStatus": {"coding": [{"system":
                                                   "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                   "code": "confirmed"}]},
                "code": {"text": evil}})
    app = make_app_server(sandbox, None, BLUEPRINTS=[probe_blueprint()], AREAS=())
    browser = requests.Session()
    lsid = lsid_of(ehr_launch(browser, sandbox, app).url)
    html = browser.get(f"{app.url}/p/{lsid}/probe/conditions", timeout=10).text
    assert "<script>alert" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Tendinitis &amp; &lt;b&gt;bold&lt;/b&gt;" in html


def test_logs_of_a_whole_launch_hold_no_token_code_or_patient_data(sandbox, app_for, caplog):
    app = app_for()
    browser = requests.Session()
    with caplog.at_level(logging.DEBUG):
        r = ehr_launch(browser, sandbox, app)
        lsid = lsid_of(r.url)
        browser.get(f"{app.url}/p/{lsid}/probe/patient", timeout=10)
        tokens = app.store.get(NS_TOKENS, lsid)
        # force one refresh so refresh traffic is in the logs too
        tokens_expired = dict(tokens, expires_at=time.time() - 1)
        app.store.put(NS_TOKENS, lsid, tokens_expired, 600)
        browser.get(f"{app.url}/p/{lsid}/probe/patient", timeout=10)
    callback = next(h.url for h in r.history if urlsplit(h.url).path == "/callback")
    code = parse_qs(urlsplit(callback).query)["code"][0]
    state = parse_qs(urlsplit(callback).query)["state"][0]
    after = app.store.get(NS_TOKENS, lsid)
    secrets_ = [code, state, tokens["access_token"], tokens["refresh_token"], after["access_token"],
                after["refresh_token"], "Tom Becker", "Becker", "1979-07-04", "SBX-1007"]
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "GET /callback?" in text  # the request lines were captured, with the query redacted
    for s in secrets_:
        assert s and s not in text, f"found a secret or patient datum in the logs: {s[:6]}…"


def test_ehr_style_is_applied_after_validation(sandbox, app_for):
    app = app_for()
    browser = requests.Session()
    r = ehr_launch(browser, sandbox, app, smart_style_url=f"{sandbox.url}/ehr/smart-style.json")
    lsid = lsid_of(r.url)
    assert f'href="/p/{lsid}/style.css"' in r.text
    css = browser.get(f"{app.url}/p/{lsid}/style.css", timeout=10)
    assert css.headers["Content-Type"].startswith("text/css")
    assert "--fm-bg: #f5f7f9;" in css.text and "--fm-font-body: system-ui" in css.text


def test_style_from_another_server_is_not_fetched(sandbox, app_for):
    hits: list[str] = []

    def other(environ, start_response):
        hits.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"color_background": "#000000"}']

    other_server = serve_in_thread(other)
    try:
        app = app_for()
        browser = requests.Session()
        r = ehr_launch(browser, sandbox, app, smart_style_url=f"{other_server.url}/style.json")
        css = browser.get(f"{app.url}/p/{lsid_of(r.url)}/style.css", timeout=10)
        assert css.text == "/* no EHR style */\n"
        assert hits == []  # not the EHR's origin: never contacted (no SSRF through the token response)
    finally:
        other_server.stop()


@pytest.mark.parametrize("auth", [
    pytest.param({"discovery": "capability-only"}, id="capability-only discovery (v1 server)"),
    pytest.param({"fhir_user": "relative"}, id="relative fhirUser"),
])
def test_sandbox_modes(make_smart_sandbox, make_app_server, auth):
    sandbox = make_smart_sandbox(clients=[], auth=auth)
    app = make_app_server(sandbox, None, AREAS=())
    r = ehr_launch(requests.Session(), sandbox, app, user=THERAPIST)
    assert r.status_code == 200, r.text[:600]
    assert banner_name(r.text) == TOM[1] and "role-badge--therapist" in r.text


def test_v1_only_client_gets_v1_scopes(sandbox, app_for):
    app = app_for({"scope_dialect": "v1"}, registration={"scope_dialect": "v1"})
    r = ehr_launch(requests.Session(), sandbox, app)
    assert banner_name(r.text) == TOM[1]
    granted = re.search(r"<summary>Permissions granted by the EHR</summary>\s*<p><code>([^<]*)<", r.text).group(1)
    assert "patient/ServiceRequest.write" in granted.split()
    assert f'href="/p/{lsid_of(r.url)}/orders/"' in r.text  # v1 .write allows ordering


# --- a launch from a CDS card's smart link (appContext, CDS Hooks 2.0 "Link"; format in docs/cds-hooks.md) ---------


def card_launch(browser: requests.Session, sandbox, app, app_context, *, user=PHYSICIAN, patient=DANA[0]):
    """An EHR launch that carries a card link's appContext to the token response, as the sandbox's order entry
    makes it (the sandbox's /_sandbox/launches HTTP endpoint does not take appContext; its auth service does)."""
    auth = sandbox.app.extensions["fhir_massage.sandbox"]["auth"]
    with sandbox.app.test_request_context(base_url=sandbox.url):  # the sandbox's base URL comes from the request
        out = auth.create_launch(app.client_id, user, patient, app_context=app_context)
    return browser.get(out["launch_url"], timeout=30)


def _callback_location(r: requests.Response) -> str:
    (callback,) = [h for h in r.history if urlsplit(h.url).path == "/callback"]
    return callback.headers["Location"]


def test_app_context_from_a_card_opens_the_orders_area_on_the_finding(sandbox, app_for):
    from fhir_massage.cds_cards import app_context

    app = app_for(BLUEPRINTS=[probe_blueprint()], AREAS=("orders",))
    r = card_launch(requests.Session(), sandbox, app,
                    app_context(patient_id=DANA[0], order_ref="ServiceRequest/abc", rule_id="dvt-acute"))
    assert r.status_code == 200, r.text[:800]
    lsid = lsid_of(r.url)
    # the launch lands in the orders area, the card's finding as the fragment (kept by the browser through the
    # orders area's redirect to a new draft), and the page has that finding with the id the fragment targets
    assert _callback_location(r) == f"/p/{lsid}/orders/#finding-dvt-acute"
    assert urlsplit(r.url).path.startswith(f"/p/{lsid}/orders/draft/")
    assert banner_name(r.text) == DANA[1]
    assert re.search(r'<li class="finding finding--absolute[^"]*" data-rule="dvt-acute" id="finding-dvt-acute">',
                     r.text)


@pytest.mark.parametrize("raw, user", [
    ("not json", PHYSICIAN),
    ('{"area": "orders", "patient": "demo-tom-becker", "rule": "dvt-acute"}', PHYSICIAN),
    ('{"area": "billing", "patient": "demo-dana-whitfield"}', PHYSICIAN),
    ('{"area": "orders", "patient": "demo-dana-whitfield", "rule": "dvt-acute"}', THERAPIST),
    ("x" * 5000, PHYSICIAN),
], ids=["not-json", "another-patient", "unknown-area", "therapist-cannot-order", "too-long"])
def test_app_context_that_does_not_fit_lands_as_usual(sandbox, app_for, raw, user):
    app = app_for(BLUEPRINTS=[probe_blueprint()], AREAS=("orders",))
    r = card_launch(requests.Session(), sandbox, app, raw, user=user)
    assert r.status_code == 200, r.text[:800]
    lsid = lsid_of(r.url)
    assert _callback_location(r) == f"/p/{lsid}/"
    assert urlsplit(r.url).path == f"/p/{lsid}/" and banner_name(r.text) == DANA[1]


def test_app_context_with_an_unknown_rule_still_opens_the_orders_area(sandbox, app_for):
    app = app_for()  # the stand-in orders area
    r = card_launch(requests.Session(), sandbox, app,
                    '{"area": "orders", "patient": "demo-dana-whitfield", "rule": "not-a-rule"}')
    assert _callback_location(r) == f"/p/{lsid_of(_callback_location(r))}/orders/"
    assert r.text == "orders"
