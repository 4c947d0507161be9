"""The sandbox's SMART authorization server against real HTTP on loopback: every strict rule an EHR enforces."""

from __future__ import annotations

import re
import secrets
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from fhir_massage.sandbox.demo import DEMO_PATIENTS
from fhir_massage.serving import serve_in_thread
from tests.fixtures.smart_sandbox import (
    LAUNCH_URL,
    REDIRECT_URI,
    V2_SCOPES,
    _key_pair,
    _public_jwks,
    authorize,
    client_assertion,
    create_launch,
    get_token,
    pkce_pair,
    redirect_params,
    register_client,
    token_request,
)

pytestmark = pytest.mark.integration

PATIENT_A = DEMO_PATIENTS[0]["id"]
PATIENT_B = DEMO_PATIENTS[1]["id"]


def fhir_get(sb, path, token, **params):
    return requests.get(f"{sb.fhir_base}/{path}", params=params, timeout=10,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})


def code_for(sb, client_id, scopes=V2_SCOPES, patient=PATIENT_A, **ctx):
    launch = create_launch(sb, client_id, "dr-ada-grey", patient, **ctx)
    verifier, challenge = pkce_pair()
    params = redirect_params(authorize(sb, client_id, scopes, launch=launch["launch"],
                                       verifier_challenge=(verifier, challenge)))
    return params["code"], verifier


def exchange(sb, client_id, code, verifier, **assertion):
    return token_request(sb, client_id, {"grant_type": "authorization_code", "code": code,
                                         "redirect_uri": REDIRECT_URI, "code_verifier": verifier}, **assertion)


# --- discovery --------------------------------------------------------------------------------------------------

def test_smart_configuration_and_capability_statement_agree(smart_sandbox):
    sb = smart_sandbox
    conf = requests.get(f"{sb.fhir_base}/.well-known/smart-configuration", timeout=10).json()
    assert conf["issuer"] == sb.url
    assert conf["authorization_endpoint"] == f"{sb.url}/auth/authorize"
    assert conf["token_endpoint"] == f"{sb.url}/auth/token"
    assert conf["code_challenge_methods_supported"] == ["S256"]
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert {"launch-ehr", "launch-standalone", "permission-v1", "permission-v2", "authorize-post"} <= set(
        conf["capabilities"])
    cap = requests.get(f"{sb.fhir_base}/metadata", timeout=10).json()
    security = cap["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    ext = next(e for e in security["extension"]
               if e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris")
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    assert uris["authorize"] == conf["authorization_endpoint"]
    assert uris["token"] == conf["token_endpoint"]
    assert uris["introspect"] == conf["introspection_endpoint"]
    assert uris["revoke"] == conf["revocation_endpoint"]
    oidc = requests.get(f"{sb.url}/.well-known/openid-configuration", timeout=10).json()
    assert oidc["issuer"] == sb.url and oidc["id_token_signing_alg_values_supported"] == ["RS256"]


def test_capability_only_discovery_mode(make_smart_sandbox):
    sb = make_smart_sandbox(seed=False, auth={"discovery": "capability-only"})
    assert requests.get(f"{sb.fhir_base}/.well-known/smart-configuration", timeout=10).status_code == 404
    security = requests.get(f"{sb.fhir_base}/metadata", timeout=10).json()["rest"][0]["security"]
    assert security["extension"][0]["extension"][0]["valueUri"] == f"{sb.url}/auth/authorize"


# --- EHR launch and tokens ----------------------------------------------------------------------------------------

def test_ehr_launch_token_response_carries_context_and_valid_id_token(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", patient=PATIENT_A, encounter="enc-1", intent="order-massage",
                    fhir_context=[{"reference": "ServiceRequest/sr-1"}], need_patient_banner=False)
    assert tok["token_type"] == "Bearer" and tok["expires_in"] == 3600
    assert tok["patient"] == PATIENT_A and tok["encounter"] == "enc-1"
    assert tok["intent"] == "order-massage" and tok["fhirContext"] == [{"reference": "ServiceRequest/sr-1"}]
    assert tok["need_patient_banner"] is False
    assert tok["smart_style_url"] == f"{sb.url}/ehr/smart-style.json"
    assert tok["refresh_token"]  # online_access was asked
    assert set(tok["scope"].split()) == set(V2_SCOPES.split())
    keys = KeySet.import_key_set(requests.get(f"{sb.url}/auth/jwks", timeout=10).json())
    idt = jwt.decode(tok["id_token"], keys, algorithms=["RS256"])
    assert idt.header["alg"] == "RS256"
    assert idt.claims["iss"] == sb.url and idt.claims["aud"] == "test-public"
    assert idt.claims["fhirUser"] == f"{sb.fhir_base}/Practitioner/dr-ada-grey"
    style = requests.get(tok["smart_style_url"], timeout=10).json()
    assert style["color_highlight"] and style["font_family_body"]


def test_nonce_is_echoed_in_id_token(smart_sandbox):
    sb = smart_sandbox
    launch = create_launch(sb, "test-public", "dr-ada-grey", PATIENT_A)
    verifier, challenge = pkce_pair()
    nonce = secrets.token_urlsafe(12)
    params = redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"],
                                       verifier_challenge=(verifier, challenge), extra={"nonce": nonce}))
    tok = exchange(sb, "test-public", params["code"], verifier).json()
    assert jwt.decode(tok["id_token"], KeySet.import_key_set(
        requests.get(f"{sb.url}/auth/jwks", timeout=10).json())).claims["nonce"] == nonce


def test_state_is_echoed_and_authorize_post_works(smart_sandbox):
    sb = smart_sandbox
    launch = create_launch(sb, "test-public", "dr-ada-grey", PATIENT_A)
    state = "s-" + secrets.token_urlsafe(20)
    resp = authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"], extra={"state": state}, method="POST")
    params = redirect_params(resp)
    assert resp.headers["Location"].startswith(REDIRECT_URI + "?")
    assert params["state"] == state and params["code"]


@pytest.mark.parametrize("client_id", ["test-basic", "test-rs384", "test-es384"])
def test_confidential_clients(smart_sandbox, client_id):
    tok = get_token(smart_sandbox, client_id)
    assert fhir_get(smart_sandbox, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 200


def test_confidential_client_without_credentials_is_refused(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-basic")
    resp = requests.post(sb.token_url, data={"grant_type": "authorization_code", "code": code, "client_id": "test-basic",
                                             "redirect_uri": REDIRECT_URI, "code_verifier": verifier}, timeout=10)
    assert resp.status_code in (400, 401) and resp.json()["error"] == "invalid_client"
    bad = requests.post(sb.token_url, auth=("test-basic", "wrong"), timeout=10,
                        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
                              "code_verifier": verifier})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"


def test_private_key_jwt_from_jwks_uri(smart_sandbox):
    from flask import Flask, jsonify

    key = _key_pair("ES384")
    jwks_app = Flask("client-jwks")
    jwks_app.add_url_rule("/jwks.json", "jwks", lambda: jsonify(_public_jwks(key, "ES384")))
    server = serve_in_thread(jwks_app)
    try:
        cid = "jwks-uri-" + secrets.token_hex(4)
        register_client(smart_sandbox, {"client_id": cid, "redirect_uris": [REDIRECT_URI], "launch_url": LAUNCH_URL,
                                        "auth_method": "private_key_jwt", "jwks_uri": f"{server.url}/jwks.json"},
                        key=key)
        assert get_token(smart_sandbox, cid)["access_token"]
    finally:
        server.stop()


def test_jwks_uri_must_be_https_or_loopback(smart_sandbox):
    resp = requests.post(f"{smart_sandbox.url}/_sandbox/clients", timeout=10, json={
        "client_id": "plain-http-jwks", "redirect_uris": [REDIRECT_URI], "auth_method": "private_key_jwt",
        "jwks_uri": "http://example.org/jwks.json"})
    assert resp.status_code == 400 and "https" in resp.json()["error_description"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        pytest.param({"exp_offset": 600}, "5 minutes", id="exp more than 5 minutes away"),
        pytest.param({"aud": "http://127.0.0.1:1/other/token"}, "aud", id="aud not the token URL"),
        pytest.param({"iss": "someone-else"}, "", id="iss differs from sub"),
        pytest.param({"alg": "RS256"}, "RS384", id="RS256 is not an accepted assertion alg"),
    ],
)
def test_bad_client_assertions_are_refused(smart_sandbox, overrides, fragment):
    import time

    sb = smart_sandbox
    code, verifier = code_for(sb, "test-rs384")
    if "exp_offset" in overrides:
        overrides = {"exp": int(time.time()) + overrides.pop("exp_offset")}
    resp = exchange(sb, "test-rs384", code, verifier, **overrides)
    assert resp.status_code in (400, 401), resp.text
    body = resp.json()
    assert body["error"] == "invalid_client"
    assert fragment.lower() in body.get("error_description", "").lower()


def test_jti_replay_is_refused(smart_sandbox):
    sb = smart_sandbox
    jti = secrets.token_urlsafe(12)
    code, verifier = code_for(sb, "test-es384")
    assert exchange(sb, "test-es384", code, verifier, jti=jti).status_code == 200
    code2, verifier2 = code_for(sb, "test-es384")
    replay = exchange(sb, "test-es384", code2, verifier2, jti=jti)
    assert replay.status_code in (400, 401) and replay.json()["error"] == "invalid_client"
    assert "jwt id" in replay.json()["error_description"].lower()


# --- authorize refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "extra, error, fragment",
    [
        pytest.param({"code_challenge": None, "code_challenge_method": None}, "invalid_request", "PKCE",
                     id="missing PKCE"),
        pytest.param({"code_challenge_method": "plain"}, "invalid_request", "S256", id="plain PKCE"),
        pytest.param({"code_challenge_method": None}, "invalid_request", "S256", id="method missing means plain"),
        pytest.param({"aud": "http://127.0.0.1:1/fhir"}, "invalid_request", "aud", id="wrong aud"),
        pytest.param({"aud": None}, "invalid_request", "aud", id="missing aud"),
        pytest.param({"launch": "not-a-launch-we-issued"}, "invalid_request", "launch", id="unknown launch"),
        pytest.param({"response_type": "token"}, "unsupported_response_type", "", id="implicit flow"),
        pytest.param({"scope": "patient/Condition.rs"}, "invalid_scope", "launch", id="launch without launch scope"),
    ],
)
def test_authorize_refusals_redirect_with_error_and_state(smart_sandbox, extra, error, fragment):
    sb = smart_sandbox
    launch = create_launch(sb, "test-public", "dr-ada-grey", PATIENT_A)
    state = secrets.token_urlsafe(16)
    resp = authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"], extra={"state": state, **extra})
    params = redirect_params(resp)
    assert resp.headers["Location"].startswith(REDIRECT_URI)
    assert params["error"] == error and params["state"] == state
    assert "code" not in params
    assert fragment.lower() in params.get("error_description", "").lower()


def test_launch_is_single_use_and_bound_to_its_client(smart_sandbox):
    sb = smart_sandbox
    launch = create_launch(sb, "test-public", "dr-ada-grey", PATIENT_A)
    assert "code" in redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"]))
    again = redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"]))
    assert again["error"] == "invalid_request"
    other = create_launch(sb, "test-basic", "dr-ada-grey", PATIENT_A)
    assert redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=other["launch"]))["error"] == "invalid_request"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"client_id": "no-such-client"}, id="unknown client"),
        pytest.param({"redirect_uri": REDIRECT_URI + "/extra"}, id="redirect_uri not registered exactly"),
        pytest.param({"redirect_uri": None}, id="redirect_uri missing"),
    ],
)
def test_bad_client_or_redirect_uri_is_an_error_page_not_a_redirect(smart_sandbox, extra):
    resp = authorize(smart_sandbox, "test-public", V2_SCOPES, extra=extra)
    assert resp.status_code == 400
    assert "Location" not in resp.headers
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "not registered" in resp.text
    assert "Content-Security-Policy" in resp.headers


# --- codes and refresh tokens -------------------------------------------------------------------------------------

def test_code_replay_fails_and_revokes_what_the_code_issued(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-public")
    first = exchange(sb, "test-public", code, verifier)
    assert first.status_code == 200
    tok = first.json()
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 200
    replay = exchange(sb, "test-public", code, verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 401
    refreshed = token_request(sb, "test-public", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]})
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"


def test_code_expires_after_60_seconds(make_smart_sandbox):
    sb = make_smart_sandbox(seed=False)
    store = sb.app.extensions["fhir_massage.sandbox"]["auth"].store
    code, verifier = code_for(sb, "test-public")
    real = store.clock
    store.clock = lambda: real() + 61
    resp = exchange(sb, "test-public", code, verifier)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_grant"


def test_wrong_code_verifier_is_refused(smart_sandbox):
    sb = smart_sandbox
    code, _ = code_for(sb, "test-public")
    other_verifier, _ = pkce_pair()
    resp = exchange(sb, "test-public", code, other_verifier)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_grant"


def test_access_token_expiry_and_refresh(make_smart_sandbox):
    # A configured lifetime (not the default 3600) and a moved clock: a 1-second token could expire on a busy
    # machine before the first read below, and waiting for it would make the test slow and timing-dependent.
    clients = [{"client_id": "short", "redirect_uris": [REDIRECT_URI], "launch_url": LAUNCH_URL,
                "access_token_lifetime": 900}]
    sb = make_smart_sandbox(clients=clients)
    store = sb.app.extensions["fhir_massage.sandbox"]["auth"].store
    tok = get_token(sb, "short", patient=PATIENT_A)
    assert tok["expires_in"] == 900
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 200
    real = store.clock
    store.clock = lambda: real() + 899  # still live one second before its end
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 200
    store.clock = lambda: real() + 901  # and refused once the lifetime has passed, without waiting for it
    expired = fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"])
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    fresh = token_request(sb, "short", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]})
    assert fresh.status_code == 200, fresh.text
    body = fresh.json()
    assert body["patient"] == PATIENT_A and body["expires_in"] == 900
    assert fhir_get(sb, f"Patient/{PATIENT_A}", body["access_token"]).status_code == 200


def test_refresh_rotation_and_reuse_revokes_the_family(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-basic")
    r1 = token_request(sb, "test-basic", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}).json()
    assert r1["refresh_token"] != tok["refresh_token"]
    assert fhir_get(sb, f"Patient/{PATIENT_A}", r1["access_token"]).status_code == 200
    reuse = token_request(sb, "test-basic", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]})
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert fhir_get(sb, f"Patient/{PATIENT_A}", r1["access_token"]).status_code == 401
    after = token_request(sb, "test-basic", {"grant_type": "refresh_token", "refresh_token": r1["refresh_token"]})
    assert after.status_code == 400


def test_refresh_with_a_narrower_scope_and_not_wider(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public")
    wider = token_request(sb, "test-public", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"],
                                              "scope": "online_access patient/Observation.rs"})
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrow = token_request(sb, "test-public", {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"],
                                               "scope": "online_access patient/Patient.rs"})
    assert narrow.status_code == 200 and narrow.json()["scope"] == "online_access patient/Patient.rs"
    assert fhir_get(sb, "Condition", narrow.json()["access_token"], patient=PATIENT_A).status_code == 403


def test_no_refresh_token_without_offline_or_online_access(smart_sandbox):
    tok = get_token(smart_sandbox, "test-public", scopes="launch openid fhirUser patient/Patient.rs")
    assert "refresh_token" not in tok


# --- scopes on the FHIR API ---------------------------------------------------------------------------------------

def test_no_token_unknown_token_are_401(smart_sandbox):
    sb = smart_sandbox
    assert requests.get(f"{sb.fhir_base}/Patient/{PATIENT_A}", timeout=10).status_code == 401
    assert fhir_get(sb, f"Patient/{PATIENT_A}", "not-a-token").status_code == 401
    assert requests.get(f"{sb.fhir_base}/metadata", timeout=10).status_code == 200


def test_patient_token_cannot_read_another_patient(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", patient=PATIENT_A)["access_token"]
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok).status_code == 200
    assert fhir_get(sb, f"Patient/{PATIENT_B}", tok).status_code == 403
    other = fhir_get(sb, "Condition", tok, patient=PATIENT_B)
    assert other.status_code == 403 or not other.json().get("entry")
    mine = fhir_get(sb, "Condition", tok, patient=PATIENT_A).json()
    assert all(e["resource"]["subject"]["reference"] == f"Patient/{PATIENT_A}" for e in mine.get("entry", []))


def test_v2_scopes_enforced_per_type_and_interaction(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", scopes="launch patient/Condition.rs")["access_token"]
    assert fhir_get(sb, "Condition", tok, patient=PATIENT_A).status_code == 200
    assert fhir_get(sb, "Observation", tok, patient=PATIENT_A).status_code == 403
    create = requests.post(f"{sb.fhir_base}/Condition", timeout=10, json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{PATIENT_A}"},
        "code": {"text": "test"}}, headers={"Authorization": f"Bearer {tok}",
                                            "Content-Type": "application/fhir+json"})
    assert create.status_code == 403


def test_v1_scopes_map_to_read_and_search(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", scopes="launch patient/*.read")
    assert tok["scope"] == "launch patient/*.read"
    assert fhir_get(sb, "Observation", tok["access_token"], patient=PATIENT_A).status_code == 200
    create = requests.post(f"{sb.fhir_base}/Condition", timeout=10, json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{PATIENT_A}"}, "code": {"text": "x"}},
        headers={"Authorization": f"Bearer {tok['access_token']}", "Content-Type": "application/fhir+json"})
    assert create.status_code == 403


@pytest.mark.parametrize(
    "dialect, requested, granted",
    [
        pytest.param("v2", "launch patient/*.read patient/Condition.rs", "launch patient/Condition.rs",
                     id="v2-only server drops v1 scopes"),
        pytest.param("v1", "launch patient/*.read patient/Condition.rs", "launch patient/*.read",
                     id="v1-only server drops v2 scopes"),
    ],
)
def test_scope_dialect_per_client(smart_sandbox, dialect, requested, granted):
    cid = f"dialect-{dialect}-{secrets.token_hex(3)}"
    register_client(smart_sandbox, {"client_id": cid, "redirect_uris": [REDIRECT_URI], "launch_url": LAUNCH_URL,
                                    "scope_dialect": dialect})
    assert get_token(smart_sandbox, cid, scopes=requested)["scope"] == granted


def test_narrowed_scopes_are_reported_and_enforced(smart_sandbox):
    sb = smart_sandbox
    cid = "narrow-" + secrets.token_hex(3)
    register_client(sb, {"client_id": cid, "redirect_uris": [REDIRECT_URI], "launch_url": LAUNCH_URL,
                         "allowed_scopes": ["launch", "openid", "fhirUser", "patient/Patient.rs"]})
    tok = get_token(sb, cid, scopes=V2_SCOPES)
    assert tok["scope"] == "launch openid fhirUser patient/Patient.rs"
    assert "refresh_token" not in tok
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 200
    assert fhir_get(sb, "Condition", tok["access_token"], patient=PATIENT_A).status_code == 403


# --- user/ scopes: the patients the user may access (active CareTeam / generalPractitioner) -----------------------

CHEN = "dr-lee-chen"  # demo physician with a two-patient panel (demo.CARE_TEAMS)
CHEN_PANEL = {"demo-tom-becker", "demo-dana-whitfield"}
OUTSIDE = "demo-maria-santos"  # on Dr. Grey's and Sam Reyes's care teams, not Dr. Chen's
USER_READ = "launch openid fhirUser user/Patient.rs user/Condition.rs user/Observation.rs user/Practitioner.rs"


def _ids(bundle: dict) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def _subjects(bundle: dict) -> set[str]:
    return {e["resource"]["subject"]["reference"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def test_user_scopes_hold_a_user_to_their_care_team_patients(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", CHEN, "demo-tom-becker", scopes=USER_READ)["access_token"]
    patients = fhir_get(sb, "Patient", tok, _count="100").json()
    assert _ids(patients) == CHEN_PANEL and patients["total"] == 2
    assert _subjects(fhir_get(sb, "Condition", tok, _count="1000").json()) == {f"Patient/{p}" for p in CHEN_PANEL}
    assert fhir_get(sb, "Condition", tok, patient="demo-dana-whitfield").status_code == 200
    assert fhir_get(sb, f"Patient/{PATIENT_B}", tok).status_code == 200
    # Outside the panel: a read or a search that names the patient is refused, with no data.
    refused = fhir_get(sb, f"Patient/{OUTSIDE}", tok)
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert "Maria" not in refused.text
    assert fhir_get(sb, f"Condition/{OUTSIDE}-high-risk-pregnancy", tok).status_code == 403
    named = fhir_get(sb, "Observation", tok, patient=OUTSIDE)
    assert named.status_code == 403 and "dr-lee-chen" in named.json()["issue"][0]["diagnostics"]
    # Types outside the Patient compartment follow the scopes only.
    assert fhir_get(sb, "Practitioner/dr-ada-grey", tok).status_code == 200
    # Dr. Grey is on every demo patient's team: she sees them all.
    grey = get_token(sb, "test-public", "dr-ada-grey", "demo-tom-becker", scopes=USER_READ)["access_token"]
    assert _ids(fhir_get(sb, "Patient", grey, _count="100").json()) == {p["id"] for p in DEMO_PATIENTS}
    assert fhir_get(sb, f"Patient/{OUTSIDE}", grey).status_code == 200


def test_user_scopes_write_only_into_the_users_patients(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", CHEN, "demo-tom-becker",
                    scopes="launch openid fhirUser user/Condition.cruds")["access_token"]
    headers = {"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"}

    def condition(pid: str) -> dict:
        return {"resourceType": "Condition", "code": {"text": "neck stiffness"}, "subject": {"reference": f"Patient/{pid}"}}

    refused = requests.post(f"{sb.fhir_base}/Condition", json=condition(OUTSIDE), headers=headers, timeout=10)
    assert refused.status_code == 403, refused.text
    made = requests.post(f"{sb.fhir_base}/Condition", json=condition("demo-tom-becker"), headers=headers, timeout=10)
    assert made.status_code == 201, made.text
    cid = made.json()["id"]
    moved = requests.put(f"{sb.fhir_base}/Condition/{cid}", json={**condition(OUTSIDE), "id": cid}, headers=headers,
                         timeout=10)
    assert moved.status_code == 403
    assert requests.delete(f"{sb.fhir_base}/Condition/{OUTSIDE}-high-risk-pregnancy", headers=headers,
                           timeout=10).status_code == 403
    assert requests.delete(f"{sb.fhir_base}/Condition/{cid}", headers=headers, timeout=10).status_code == 200


def test_a_care_team_change_applies_to_the_next_request(make_smart_sandbox):
    sb = make_smart_sandbox()
    chen = get_token(sb, "test-public", CHEN, "demo-tom-becker", scopes=USER_READ)["access_token"]
    assert fhir_get(sb, f"Patient/{OUTSIDE}", chen).status_code == 403
    admin = get_token(sb, "test-public", "dr-ada-grey", "demo-tom-becker",
                      scopes="launch openid fhirUser user/CareTeam.rus")["access_token"]
    team = fhir_get(sb, f"CareTeam/{OUTSIDE}-care-team", admin).json()
    team["participant"].append({"member": {"reference": "Practitioner/dr-lee-chen"}})
    put = requests.put(f"{sb.fhir_base}/CareTeam/{team['id']}", json=team, timeout=10,
                       headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/fhir+json"})
    assert put.status_code == 200, put.text
    assert fhir_get(sb, f"Patient/{OUTSIDE}", chen).status_code == 200
    team["status"] = "inactive"  # an ended team gives no access
    requests.put(f"{sb.fhir_base}/CareTeam/{team['id']}", json=team, timeout=10,
                 headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/fhir+json"})
    assert fhir_get(sb, f"Patient/{OUTSIDE}", chen).status_code == 403
    assert fhir_get(sb, f"Patient/{OUTSIDE}", admin).status_code == 403  # Dr. Grey was on that team too


def test_patient_scopes_are_still_the_launch_patient_only(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", CHEN, "demo-tom-becker",
                    scopes="launch openid fhirUser patient/Patient.rs patient/Condition.rs")["access_token"]
    assert fhir_get(sb, "Patient/demo-tom-becker", tok).status_code == 200
    # Dana is on Dr. Chen's panel, but a patient/ token is held to the launch patient.
    assert fhir_get(sb, "Patient/demo-dana-whitfield", tok).status_code == 403
    assert _ids(fhir_get(sb, "Patient", tok).json()) == {"demo-tom-becker"}


def test_mixed_user_and_patient_scopes_are_held_to_the_launch_patient(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-public", CHEN, "demo-tom-becker",
                    scopes="launch openid fhirUser patient/Patient.rs user/Condition.rs user/Practitioner.rs")
    assert tok["patient"] == "demo-tom-becker"
    at = tok["access_token"]
    assert _subjects(fhir_get(sb, "Condition", at).json()) == {"Patient/demo-tom-becker"}
    assert fhir_get(sb, "Condition", at, patient="demo-dana-whitfield").status_code == 403
    assert fhir_get(sb, f"Condition/{OUTSIDE}-high-risk-pregnancy", at).status_code == 403
    assert fhir_get(sb, "Practitioner/dr-lee-chen", at).status_code == 200


# --- standalone launch ------------------------------------------------------------------------------------------

def _form_fields(html: str) -> list[tuple[str, str]]:
    import html as h

    return [(h.unescape(n), h.unescape(v))
            for n, v in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)"', html)]


def test_standalone_launch_login_and_patient_picker(smart_sandbox):
    sb = smart_sandbox
    verifier, challenge = pkce_pair()
    scopes = "openid fhirUser launch/patient patient/Patient.rs patient/Condition.rs offline_access"
    page = authorize(sb, "test-public", scopes, verifier_challenge=(verifier, challenge))
    assert page.status_code == 200 and "no passwords" in page.text
    assert "<label" in page.text and "Content-Security-Policy" in page.headers
    fields = _form_fields(page.text)
    state = dict(fields)["state"]
    login = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                          data=fields + [("sandbox_user", "lmt-sam-reyes"), ("sandbox_action", "allow")])
    assert login.status_code == 200 and DEMO_PATIENTS[1]["name"] in login.text
    pick = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                         data=_form_fields(login.text) + [("sandbox_patient", PATIENT_B), ("sandbox_action", "allow")])
    params = redirect_params(pick)
    assert params["state"] == state
    tok = exchange(sb, "test-public", params["code"], verifier).json()
    assert tok["patient"] == PATIENT_B
    assert "launch/patient" in tok["scope"].split() and "offline_access" in tok["scope"].split()
    idt = jwt.decode(tok["id_token"], KeySet.import_key_set(requests.get(f"{sb.url}/auth/jwks", timeout=10).json()))
    assert idt.claims["fhirUser"].endswith("/Practitioner/lmt-sam-reyes")
    # a login ticket works once
    again = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                          data=fields + [("sandbox_user", "dr-ada-grey"), ("sandbox_action", "allow")])
    assert again.status_code == 200 and "Sign in" in again.text


def test_standalone_patient_picker_offers_only_the_users_patients(smart_sandbox):
    sb = smart_sandbox
    verifier, challenge = pkce_pair()
    page = authorize(sb, "test-public", "openid fhirUser launch/patient patient/Patient.rs",
                     verifier_challenge=(verifier, challenge))
    login = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                          data=_form_fields(page.text) + [("sandbox_user", CHEN), ("sandbox_action", "allow")])
    offered = set(re.findall(r'name="sandbox_patient" value="([^"]+)"', login.text))
    assert offered == CHEN_PANEL
    # A patient outside the panel, posted anyway, is not accepted: the picker comes back.
    forced = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                           data=_form_fields(login.text) + [("sandbox_patient", OUTSIDE), ("sandbox_action", "allow")])
    assert forced.status_code == 200 and set(re.findall(r'name="sandbox_patient" value="([^"]+)"', forced.text)) \
        == CHEN_PANEL
    pick = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                         data=_form_fields(forced.text) + [("sandbox_patient", "demo-dana-whitfield"),
                                                           ("sandbox_action", "allow")])
    tok = exchange(sb, "test-public", redirect_params(pick)["code"], verifier).json()
    assert tok["patient"] == "demo-dana-whitfield"


def test_standalone_picker_for_a_user_with_no_patients(make_smart_sandbox):
    sb = make_smart_sandbox(seed=False, auth={
        "users": [{"id": "u1", "name": "Dr. Nobody", "role": "physician", "fhirUser": "Practitioner/u1"}],
        "patients": [{"id": "p1", "name": "Pat One", "birthDate": "1970-01-01", "gender": "other", "story": "x"}]})
    page = authorize(sb, "test-public", "openid fhirUser launch/patient patient/Patient.rs")
    login = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                          data=_form_fields(page.text) + [("sandbox_user", "u1"), ("sandbox_action", "allow")])
    assert login.status_code == 200 and 'data-testid="no-patients"' in login.text
    assert 'name="sandbox_patient"' not in login.text and 'value="deny"' in login.text


def test_standalone_deny_is_access_denied(smart_sandbox):
    sb = smart_sandbox
    page = authorize(sb, "test-public", "openid fhirUser launch/patient patient/Patient.rs")
    fields = _form_fields(page.text)
    deny = requests.post(f"{sb.url}/auth/authorize", allow_redirects=False, timeout=10,
                         data=fields + [("sandbox_action", "deny")])
    params = redirect_params(deny)
    assert params["error"] == "access_denied" and params["state"] == dict(fields)["state"]


# --- introspection and revocation ---------------------------------------------------------------------------------

def test_introspection_and_revocation(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-basic")
    url = f"{sb.url}/auth/introspect"
    info = requests.post(url, data={"token": tok["access_token"]}, auth=("test-basic", "test-basic-secret"),
                         timeout=10).json()
    assert info["active"] is True and info["client_id"] == "test-basic" and info["patient"] == PATIENT_A
    assert info["scope"] == tok["scope"]
    rt = requests.post(url, data={"token": tok["refresh_token"], "token_type_hint": "refresh_token"},
                       auth=("test-basic", "test-basic-secret"), timeout=10).json()
    assert rt["active"] is True and rt["token_type"] == "refresh_token" and rt["exp"] > info["exp"]
    # public clients cannot introspect; other clients cannot see this client's tokens
    assert requests.post(url, data={"token": tok["access_token"], "client_id": "test-public"},
                         timeout=10).status_code in (400, 401)
    revoke = requests.post(f"{sb.url}/auth/revoke", data={"token": tok["refresh_token"]},
                           auth=("test-basic", "test-basic-secret"), timeout=10)
    assert revoke.status_code == 200
    assert fhir_get(sb, f"Patient/{PATIENT_A}", tok["access_token"]).status_code == 401
    info = requests.post(url, data={"token": tok["access_token"]}, auth=("test-basic", "test-basic-secret"),
                         timeout=10).json()
    assert info == {"active": False}


def test_introspection_with_private_key_jwt(smart_sandbox):
    sb = smart_sandbox
    tok = get_token(sb, "test-es384")
    info = requests.post(f"{sb.url}/auth/introspect", timeout=10, data={
        "token": tok["access_token"],
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(sb, "test-es384")}).json()
    assert info["active"] is True and info["client_id"] == "test-es384"


# --- EHR simulator ------------------------------------------------------------------------------------------------

def test_ehr_simulator_pages(smart_sandbox):
    sb = smart_sandbox
    index = requests.get(f"{sb.url}/ehr", timeout=10)
    assert index.status_code == 200
    assert "frame-ancestors 'none'" in index.headers["Content-Security-Policy"]
    assert DEMO_PATIENTS[0]["name"] in index.text and '<label for="client_id">' in index.text
    framed = requests.get(f"{sb.url}/ehr/launch", timeout=10, params={
        "client_id": "test-public", "user": "dr-ada-grey", "patient": PATIENT_A})
    assert framed.status_code == 200
    src = re.search(r'<iframe class="app" src="([^"]+)"', framed.text).group(1).replace("&amp;", "&")
    assert src.startswith(LAUNCH_URL + "?")
    q = parse_qs(urlsplit(src).query)
    assert q["iss"] == [sb.fhir_base] and q["launch"][0]
    assert "frame-src http://127.0.0.1:9" in framed.headers["Content-Security-Policy"]
    direct = requests.get(f"{sb.url}/ehr/launch", allow_redirects=False, timeout=10, params={
        "client_id": "test-public", "user": "lmt-sam-reyes", "patient": PATIENT_B, "embed": "0"})
    assert direct.status_code == 302
    launch = parse_qs(urlsplit(direct.headers["Location"]).query)["launch"][0]
    verifier, challenge = pkce_pair()
    params = redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=launch,
                                       verifier_challenge=(verifier, challenge)))
    assert exchange(sb, "test-public", params["code"], verifier).json()["patient"] == PATIENT_B
    bad = requests.get(f"{sb.url}/ehr/launch", params={"client_id": "nope", "user": "x"}, timeout=10)
    assert bad.status_code == 400


def test_ehr_simulator_offers_a_user_only_their_patients(smart_sandbox):
    sb = smart_sandbox
    everyone = requests.get(f"{sb.url}/ehr", timeout=10).text
    assert len(re.findall(r'name="patient" value=', everyone)) == len(DEMO_PATIENTS)
    teams = re.findall(r'data-testid="care-team">Care team: ([^<]*)</span>', everyone)
    assert len(teams) == len(DEMO_PATIENTS) and sum("Lee Chen" in t for t in teams) == 2
    assert all("Ada Grey" in t and "Sam Reyes" in t for t in teams)
    chen = requests.get(f"{sb.url}/ehr", params={"user": CHEN}, timeout=10).text
    assert set(re.findall(r'name="patient" value="([^"]+)"', chen)) == CHEN_PANEL
    assert re.search(rf'name="user" value="{CHEN}" checked', chen)
    refused = requests.get(f"{sb.url}/ehr/launch", allow_redirects=False, timeout=10, params={
        "client_id": "test-public", "user": CHEN, "patient": OUTSIDE, "embed": "0"})
    assert refused.status_code == 403 and "care team" in refused.text
    ok = requests.get(f"{sb.url}/ehr/launch", allow_redirects=False, timeout=10, params={
        "client_id": "test-public", "user": CHEN, "patient": "demo-dana-whitfield", "embed": "0"})
    assert ok.status_code == 302


def test_simulator_escapes_text(make_smart_sandbox):
    evil = '<script>alert(1)</script>'
    sb = make_smart_sandbox(seed=False, auth={
        "users": [{"id": "u1", "name": evil, "role": "physician", "fhirUser": "Practitioner/u1"}],
        "patients": [{"id": "p1", "name": evil, "birthDate": "1970-01-01", "gender": "other", "story": evil}]})
    page = requests.get(f"{sb.url}/ehr", timeout=10).text
    assert evil not in page and "&lt;script&gt;" in page


def test_admin_endpoints_refuse_bad_input(smart_sandbox):
    sb = smart_sandbox
    r = requests.post(f"{sb.url}/_sandbox/launches", json={"client_id": "test-public", "user": "nobody"}, timeout=10)
    assert r.status_code == 400 and "unknown user" in r.json()["error_description"]
    r = requests.post(f"{sb.url}/_sandbox/launches", data="x", timeout=10)
    assert r.status_code == 400


# --- more token-endpoint strictness -------------------------------------------------------------------------------

def test_code_is_bound_to_its_client_and_redirect_uri(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-public")
    stolen = token_request(sb, "test-basic", {"grant_type": "authorization_code", "code": code,
                                              "redirect_uri": REDIRECT_URI, "code_verifier": verifier})
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    code, verifier = code_for(sb, "test-public")
    wrong_uri = token_request(sb, "test-public", {"grant_type": "authorization_code", "code": code,
                                                  "redirect_uri": REDIRECT_URI + "x", "code_verifier": verifier})
    assert wrong_uri.status_code == 400 and wrong_uri.json()["error"] == "invalid_grant"


def test_token_parameters_in_the_url_are_refused(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-public")
    resp = requests.post(sb.token_url, params={"grant_type": "authorization_code", "code": code,
                                               "client_id": "test-public", "redirect_uri": REDIRECT_URI,
                                               "code_verifier": verifier}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
    as_json = requests.post(sb.token_url, json={"grant_type": "authorization_code", "code": code}, timeout=10)
    assert as_json.status_code == 400 and "x-www-form-urlencoded" in as_json.json()["error_description"]


def test_token_response_is_not_cached(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-public")
    resp = exchange(sb, "test-public", code, verifier)
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"].startswith("application/json")


def test_client_assertion_needs_a_kid(smart_sandbox):
    import time

    sb = smart_sandbox
    key = sb.keys["test-rs384"]
    now = int(time.time())
    assertion = jwt.encode({"alg": "RS384"}, {"iss": "test-rs384", "sub": "test-rs384", "aud": sb.token_url,
                                             "exp": now + 60, "jti": secrets.token_hex(8)}, key, algorithms=["RS384"])
    code, verifier = code_for(sb, "test-rs384")
    resp = requests.post(sb.token_url, timeout=10, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, "code_verifier": verifier,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion})
    assert resp.json()["error"] == "invalid_client" and "kid" in resp.json()["error_description"]


def test_assertion_signed_with_another_key_is_refused(smart_sandbox):
    sb = smart_sandbox
    code, verifier = code_for(sb, "test-es384")
    from joserfc.jwk import ECKey

    original = sb.keys["test-es384"]
    # same kid, different key: only the signature check can catch it
    impostor = ECKey.import_key({**_key_pair("ES384").as_dict(private=True), "kid": original.kid})
    sb.keys["test-es384"] = impostor
    try:
        resp = exchange(sb, "test-es384", code, verifier)
    finally:
        sb.keys["test-es384"] = original
    assert resp.status_code in (400, 401) and resp.json()["error"] == "invalid_client"


def test_launch_expires(make_smart_sandbox):
    sb = make_smart_sandbox(seed=False)
    store = sb.app.extensions["fhir_massage.sandbox"]["auth"].store
    launch = create_launch(sb, "test-public", "dr-ada-grey", "p1")
    real = store.clock
    store.clock = lambda: real() + 601
    params = redirect_params(authorize(sb, "test-public", V2_SCOPES, launch=launch["launch"]))
    assert params["error"] == "invalid_request" and "launch" in params["error_description"]


def test_client_ids_cannot_be_registered_twice(smart_sandbox):
    resp = requests.post(f"{smart_sandbox.url}/_sandbox/clients", timeout=10, json={
        "client_id": "test-public", "redirect_uris": ["http://127.0.0.1:9/evil"]})
    assert resp.status_code == 409


def test_signing_key_persists_in_the_data_dir(make_smart_sandbox, tmp_path):
    first = make_smart_sandbox(seed=False, data_dir=tmp_path)
    jwks1 = requests.get(f"{first.url}/auth/jwks", timeout=10).json()
    first.stop()
    second = make_smart_sandbox(seed=False, data_dir=tmp_path)
    assert requests.get(f"{second.url}/auth/jwks", timeout=10).json() == jwks1
    assert (tmp_path / "auth-signing-key.json").stat().st_mode & 0o077 == 0
    assert "d" not in jwks1["keys"][0]  # never the private part


def test_simulator_stylesheet_is_served_same_origin(smart_sandbox):
    page = requests.get(f"{smart_sandbox.url}/ehr", timeout=10).text
    href = re.search(r'<link rel="stylesheet" href="([^"]+)"', page).group(1)
    assert href.startswith("/")
    css = requests.get(f"{smart_sandbox.url}{href}", timeout=10)
    assert css.status_code == 200 and "text/css" in css.headers["Content-Type"]


def test_racing_redemptions_of_one_code_yield_one_token(smart_sandbox):
    from concurrent.futures import ThreadPoolExecutor

    sb = smart_sandbox
    code, verifier = code_for(sb, "test-public")
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(lambda _: exchange(sb, "test-public", code, verifier).status_code, range(8)))
    assert statuses.count(200) <= 1 and set(statuses) <= {200, 400}
    # whichever request won, the replays revoked it: the code gave nothing durable
    assert statuses.count(400) >= 7


def test_prompt_none_without_a_session_is_login_required(smart_sandbox):
    params = redirect_params(authorize(smart_sandbox, "test-public", "openid fhirUser patient/Patient.rs",
                                       extra={"prompt": "none"}))
    assert params["error"] == "login_required"


def test_relative_fhir_user_claim(make_smart_sandbox):
    sb = make_smart_sandbox(seed=False, auth={"fhir_user": "relative"})
    tok = get_token(sb, "test-public", patient="p1")
    claims = jwt.decode(tok["id_token"], KeySet.import_key_set(
        requests.get(f"{sb.url}/auth/jwks", timeout=10).json())).claims
    assert claims["fhirUser"] == "Practitioner/dr-ada-grey"


def test_launch_app_context_reaches_the_token_response(smart_sandbox) -> None:
    # SMART 2.2 / CDS Hooks: a card's smart link carries appContext through the launch to the app's token response.
    context = '{"area": "orders", "rule": "dvt-acute"}'
    tok = get_token(smart_sandbox, "test-public", app_context=context)
    assert tok["appContext"] == context
    assert "appContext" not in get_token(smart_sandbox, "test-public")
