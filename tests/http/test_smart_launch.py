"""The app's launch against a `responses`-mocked EHR: spec-exact answers and vendor quirks (reference checklist)."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from smart_app.launch import NS_SESSION, NS_TOKENS
from tests.fixtures.app import smart_launch


def _lsid(location: str) -> str:
    m = re.match(r"^/p/([^/]+)/$", urlsplit(location).path)
    assert m, location
    return m.group(1)


def test_ehr_launch_authorize_request_is_spec_exact(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = client.get("/launch?" + urlencode({"iss": ehr.iss, "launch": "opaque+launch/id="}))
    assert r.status_code == 302
    loc = urlsplit(r.headers["Location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == ehr.authorize_url
    q = {k: v[0] for k, v in parse_qs(loc.query).items()}
    # rows 8, 10, 11, 13: launch echoed opaque, aud = iss verbatim, PKCE S256 always
    assert q["response_type"] == "code"
    assert q["client_id"] == ehr.client_id
    assert q["redirect_uri"] == "http://127.0.0.1:5000/callback"
    assert q["aud"] == ehr.iss
    assert q["launch"] == "opaque+launch/id="
    assert q["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_\-]{43}", q["code_challenge"])
    assert len(base64.urlsafe_b64decode(q["state"] + "==")) >= 16  # >= 128 bits
    assert q["nonce"]
    scopes = q["scope"].split()
    assert "launch" in scopes and "launch/patient" not in scopes
    assert {"openid", "fhirUser", "patient/ServiceRequest.crus", "patient/Condition.rs"} <= set(scopes)
    # the browser got an opaque cookie, no token in it
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("fm_browser=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_full_ehr_launch_shows_patient_and_role(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    r = smart_launch(client, ehr)
    assert r.status_code == 303
    lsid = _lsid(r.headers["Location"])
    page = client.get(r.headers["Location"])
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Ada Quirk" in html and "1961-04-02" in html and "MRN-0042" in html and "Female" in html
    assert "Dr. William Osler" in html
    assert "Physician" in html
    # public client: client_id in the body, no Authorization header (row 17); PKCE verifier sent (row 13)
    tr = ehr.token_requests[0]
    assert tr["body"]["client_id"] == ehr.client_id
    assert "Authorization" not in tr["headers"]
    assert tr["body"]["code_verifier"]
    assert tr["body"]["grant_type"] == "authorization_code"
    # tokens only in the store, the session record has none
    store = app.extensions["store"]
    assert store.get(NS_TOKENS, lsid)["access_token"] in ehr.access_tokens
    session = store.get(NS_SESSION, lsid)
    assert not any(t in str(session) for t in ehr.access_tokens)
    # the absolute fhirUser (Epic) became a relative reference
    assert session["user_ref"] == "Practitioner/doc-1"
    # the landing data came in ONE batch with the bearer token
    assert [f["method"] for f in ehr.fhir_requests] == ["POST"]
    assert ehr.fhir_requests[0]["auth"].startswith("Bearer ")


def test_relative_fhir_user_and_jwt_access_token(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.absolute_fhir_user = False
    ehr.opaque_tokens = False
    ehr.expires_in = None  # the JWT's exp is used for scheduling
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    r = smart_launch(client, ehr)
    lsid = _lsid(r.headers["Location"])
    assert app.extensions["store"].get(NS_SESSION, lsid)["user_ref"] == "Practitioner/doc-1"
    tokens = app.extensions["store"].get(NS_TOKENS, lsid)
    assert 500 < tokens["expires_at"] - __import__("time").time() <= 600


def test_opaque_token_without_expires_in_uses_a_short_fallback(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.expires_in = None
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    lsid = _lsid(smart_launch(client, ehr).headers["Location"])
    tokens = app.extensions["store"].get(NS_TOKENS, lsid)
    assert 250 < tokens["expires_at"] - __import__("time").time() <= 300


def test_standalone_launch_asks_for_patient_context(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = client.get("/launch?" + urlencode({"iss": ehr.iss}))
    q = parse_qs(urlsplit(r.headers["Location"]).query)
    assert "launch" not in q
    assert "launch/patient" in q["scope"][0].split() and "launch" not in q["scope"][0].split()
    cb = urlsplit(ehr.authorize(r.headers["Location"]))
    assert client.get(cb.path + "?" + cb.query).status_code == 303


def _with_orders_stand_in(app):
    """Registers a stand-in orders area (an "orders" blueprint), so the landing page can link it."""
    from flask import Blueprint

    orders = Blueprint("orders", __name__, url_prefix="/p/<lsid>/orders")
    orders.add_url_rule("/", "index", lambda: "orders")
    app.register_blueprint(orders)
    return app


def _area(page: str, name: str) -> str:
    """The landing page's list item for one area."""
    return re.search(rf'data-area="{name}">(.*?)</li>', page, re.S).group(1)

def test_trimmed_scopes_show_ordering_unavailable(fake_ehr, app_factory):
    """Oracle Health trims scopes silently (reference vendor table): the app reads the granted scope."""
    ehr, rsps = fake_ehr
    ehr.granted_scope = ("launch openid fhirUser patient/Patient.rs patient/Condition.rs user/Practitioner.rs "
                         "user/PractitionerRole.rs")
    ehr.install(rsps)
    client = _with_orders_stand_in(app_factory(ehr)).test_client()
    page = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    block = _area(page, "orders")
    assert "unavailable" in block
    assert "permission to create ServiceRequest" in block
    assert "href" not in block
    assert "fewer permissions than asked" in page


def test_granted_scopes_link_installed_area(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = _with_orders_stand_in(app_factory(ehr)).test_client()
    location = smart_launch(client, ehr).headers["Location"]
    page = client.get(location).get_data(as_text=True)
    lsid = _lsid(location)
    block = _area(page, "orders")
    assert f'href="/p/{lsid}/orders/"' in block
    # the therapist area is not for a physician
    sessions = _area(page, "sessions")
    assert "unavailable" in sessions


def test_oauth_error_redirect_is_a_clear_page(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = client.get("/launch?" + urlencode({"iss": ehr.iss, "launch": "abc"}))
    state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
    r = client.get("/callback?" + urlencode({"error": "access_denied", "error_description": "<b>User</b> said no",
                                             "state": state}))
    html = r.get_data(as_text=True)
    assert r.status_code == 400
    assert "access_denied" in html and "&lt;b&gt;User&lt;/b&gt; said no" in html
    assert not ehr.token_requests
    # the state was consumed: replaying a code with it fails
    r = client.get("/callback?" + urlencode({"code": "x", "state": state}))
    assert r.status_code == 400 and "not valid" in r.get_data(as_text=True)


@pytest.mark.parametrize("tamper", ["missing", "altered", "replayed", "other-browser"])
def test_state_tampering_is_refused_without_token_exchange(fake_ehr, app_factory, tamper):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    r = client.get("/launch?" + urlencode({"iss": ehr.iss, "launch": "abc"}))
    callback = urlsplit(ehr.authorize(r.headers["Location"]))
    q = {k: v[0] for k, v in parse_qs(callback.query).items()}
    if tamper == "missing":
        del q["state"]
    elif tamper == "altered":
        q["state"] = q["state"][:-2] + ("AA" if not q["state"].endswith("AA") else "BB")
    elif tamper == "replayed":
        assert client.get("/callback?" + urlencode(q)).status_code == 303
        ehr.token_requests.clear()
    else:
        client = app.test_client()  # another browser: no cookie
    r = client.get("/callback?" + urlencode(q))
    assert r.status_code == 400
    assert "Traceback" not in r.get_data(as_text=True)
    assert not ehr.token_requests


def test_unknown_iss_makes_no_outbound_request(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = client.get("/launch?" + urlencode({"iss": "https://evil.example.org/fhir", "launch": "x"}))
    assert r.status_code == 400
    assert "not set up" in r.get_data(as_text=True)
    assert len(rsps.calls) == 0
    # trailing-slash variants are not the registered issuer either (aud must be verbatim, row 11)
    r = client.get("/launch?" + urlencode({"iss": ehr.iss + "/", "launch": "x"}))
    assert r.status_code == 400 and len(rsps.calls) == 0


def test_missing_iss_is_a_400_page_listing_registered_ehrs(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    client = app_factory(ehr).test_client()
    r = client.get("/launch")
    assert r.status_code == 400
    assert "Fake EHR" in r.get_data(as_text=True)
    assert len(rsps.calls) == 0


@pytest.mark.parametrize("mutation", ["bad-signature", "wrong-aud", "expired", "nonce", "wrong-iss"])
def test_bad_id_token_is_a_launch_error(fake_ehr, app_factory, mutation):
    ehr, rsps = fake_ehr
    ehr.id_token_mutation = mutation
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    r = smart_launch(client, ehr)
    assert r.status_code == 400
    assert "id_token" in r.get_data(as_text=True)
    assert not ehr.fhir_requests  # no FHIR call with a token whose id_token failed


def test_id_token_keys_from_openid_configuration_when_smart_config_has_no_jwks(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.jwks_in_smart_config = False
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    assert smart_launch(client, ehr).status_code == 303
    assert any(c.request.url.endswith("/.well-known/openid-configuration") for c in rsps.calls)


def test_relative_discovery_urls(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.relative_urls = True
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = smart_launch(client, ehr)
    assert r.status_code == 303
    assert ehr.token_requests


def test_capability_statement_only_discovery(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.well_known = False
    ehr.jwks_in_smart_config = False
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = smart_launch(client, ehr)
    assert r.status_code == 303, r.get_data(as_text=True)
    urls = [c.request.url for c in rsps.calls]
    assert urls[0].endswith("/.well-known/smart-configuration") and urls[1].endswith("/metadata")
    # no capabilities are known: v1 scope syntax
    assert "patient/Condition.read" in ehr.authorize_params[0]["scope"].split()


def test_discovery_is_cached_per_issuer(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    smart_launch(client, ehr)
    smart_launch(client, ehr, launch="second")
    wk = [c for c in rsps.calls if c.request.url.endswith("smart-configuration")]
    jwks = [c for c in rsps.calls if c.request.url == ehr.jwks_url]
    assert len(wk) == 1 and len(jwks) == 1


def test_need_patient_banner_false_hides_banner(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.token_extra = {"need_patient_banner": False}
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    html = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    assert 'class="patient-banner"' not in html


def test_patient_name_markup_is_escaped(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.patient_name = "<script>alert(1)</script> Evil"
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    html = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_unknown_role_is_asked_once(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.roles = []
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    landing = smart_launch(client, ehr).headers["Location"]
    r = client.get(landing)
    assert r.status_code == 302 and "/role" in r.headers["Location"]
    form = client.get(r.headers["Location"]).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    lsid = _lsid(landing)
    # without the CSRF token the choice is refused
    assert client.post(f"/p/{lsid}/role", data={"role": "therapist"}).status_code == 400
    r = client.post(f"/p/{lsid}/role", data={"role": "therapist", "csrf_token": token})
    assert r.status_code == 303
    page = client.get(landing).get_data(as_text=True)
    assert "Massage therapist" in page and "you chose it" in page
    # asked once: a second answer does not change it
    client.post(f"/p/{lsid}/role", data={"role": "physician", "csrf_token": token})
    assert "Massage therapist" in client.get(landing).get_data(as_text=True)


def test_therapist_role_from_practitioner_role(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.roles = [{"resourceType": "PractitionerRole", "id": "r2", "specialty": [{"coding": [
        {"system": "http://nucc.org/provider-taxonomy", "code": "225700000X"}]}]}]
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    html = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    assert "role-badge--therapist" in html


def test_client_secret_basic(fake_ehr, app_factory, monkeypatch):
    ehr, rsps = fake_ehr
    ehr.install(rsps)
    monkeypatch.setenv("FAKE_EHR_SECRET", "s3cr:et/+")
    app = app_factory(ehr, REGISTRATIONS=[{"iss": ehr.iss, "client_id": ehr.client_id, "auth": "client_secret_basic",
                                           "client_secret_env": "FAKE_EHR_SECRET"}])
    client = app.test_client()
    assert smart_launch(client, ehr).status_code == 303
    tr = ehr.token_requests[0]
    assert "client_id" not in tr["body"]  # AL: omit for confidential apps
    assert "client_secret" not in tr["body"]
    raw = base64.b64decode(tr["headers"]["Authorization"].removeprefix("Basic ")).decode()
    assert raw == "fm-client:s3cr%3Aet%2F%2B"  # RFC 6749 §2.3.1 form-encodes both parts


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_private_key_jwt(fake_ehr, app_factory, alg):
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey, KeySet, RSAKey

    ehr, rsps = fake_ehr
    ehr.install(rsps)
    key = RSAKey.generate_key(2048, private=True) if alg == "RS384" else ECKey.generate_key("P-384", private=True)
    app = app_factory(ehr, REGISTRATIONS=[{"iss": ehr.iss, "client_id": ehr.client_id, "auth": "private_key_jwt",
                                           "private_key": key.as_dict(private=True), "private_key_alg": alg}])
    client = app.test_client()
    assert smart_launch(client, ehr).status_code == 303
    body = ehr.token_requests[0]["body"]
    assert body["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "client_id" not in body
    jwks = client.get("/.well-known/jwks.json")
    assert jwks.status_code == 200 and "max-age" in jwks.headers["Cache-Control"]
    assert all("d" not in k for k in jwks.json["keys"])  # public parts only
    token = jose_jwt.decode(body["client_assertion"], KeySet.import_key_set(jwks.json), algorithms=[alg])
    assert token.header["alg"] == alg and token.header["typ"] == "JWT" and token.header["kid"]
    c = token.claims
    assert c["iss"] == c["sub"] == ehr.client_id
    assert c["aud"] == ehr.token_url
    assert 0 < c["exp"] - c["iat"] <= 300 and c["jti"]


def test_jwks_is_404_without_private_key_clients(fake_ehr, app_factory):
    ehr, _ = fake_ehr
    assert app_factory(ehr).test_client().get("/.well-known/jwks.json").status_code == 404


def test_pkce_challenge_matches_rfc7636_vector():
    from fhir_massage.smart import pkce_challenge

    # RFC 7636 Appendix B
    assert pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_verifier_and_challenge_pair():
    from fhir_massage.smart import pkce_pair

    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert challenge == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def test_no_patient_in_context_is_said_plainly(fake_ehr, app_factory):
    """Reference row 22: the app copes with a missing ``patient`` (e.g. only user/ scopes were granted)."""
    ehr, rsps = fake_ehr
    ehr.token_extra = {"patient": None}
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    r = smart_launch(client, ehr)
    html = client.get(r.headers["Location"]).get_data(as_text=True)
    assert "No patient in context" in html and "did not give a patient" in html


def test_intent_and_fhir_context_reach_the_launch_context(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.token_extra = {"intent": "order-massage", "fhirContext": [{"reference": "ServiceRequest/sr-1"}]}
    ehr.install(rsps)
    app = app_factory(ehr)
    client = app.test_client()
    location = smart_launch(client, ehr).headers["Location"]
    with app.test_request_context(location):
        from flask import g

        from smart_app.launch import load_context

        g.fm_browser_id = client.get_cookie("fm_browser").value
        ctx = load_context(_lsid(location))
    assert ctx.intent == "order-massage"
    assert ctx.fhir_context == ({"reference": "ServiceRequest/sr-1"},)
    assert ctx.can("ServiceRequest", "create") and ctx.role == "physician"
    assert "order-massage" in client.get(location).get_data(as_text=True)


def test_unreachable_ehr_is_a_503_page(fake_ehr, app_factory):
    import requests as rq

    ehr, rsps = fake_ehr
    rsps.get(f"{ehr.iss}/.well-known/smart-configuration", body=rq.ConnectionError("refused"))
    r = app_factory(ehr).test_client().get("/launch?" + urlencode({"iss": ehr.iss, "launch": "x"}))
    assert r.status_code == 503 and "could not be reached" in r.get_data(as_text=True)


def test_fhir_user_as_practitioner_role(fake_ehr, app_factory):
    """fhirUser may name a PractitionerRole (SC "fhirUser"): role and name come from one search with _include."""
    ehr, rsps = fake_ehr
    ehr.user_ref = "PractitionerRole/role-1"
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    html = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    assert "William Osler" in html and "role-badge--physician" in html
    assert len(ehr.fhir_requests) == 1


def test_patient_id_that_is_not_a_fhir_id_is_ignored(fake_ehr, app_factory):
    ehr, rsps = fake_ehr
    ehr.token_extra = {"patient": "x?_include=*"}
    ehr.install(rsps)
    client = app_factory(ehr).test_client()
    html = client.get(smart_launch(client, ehr).headers["Location"]).get_data(as_text=True)
    assert "not a valid FHIR id" in html and "No patient in context" in html
