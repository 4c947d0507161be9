"""fhir_massage.smart at the HTTP edge: discovery paths and fallbacks, token response parsing, token errors."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from fhir_massage import smart
from fhir_massage.errors import LaunchError

ISS = "https://ehr.example.org/apis/fhir/r4/tenant-1"


@responses.activate
def test_discovery_keeps_the_base_path_and_resolves_relative_urls():
    responses.get(f"{ISS}/.well-known/smart-configuration", json={
        "authorization_endpoint": "/oauth/authorize", "token_endpoint": "token",
        "jwks_uri": "https://keys.example.org/jwks", "capabilities": ["launch-ehr", 7], "issuer": "https://ehr.example.org",
        "introspection_endpoint": "../introspect"})
    cfg = smart.discover(ISS)
    assert cfg.source == "well-known"
    assert cfg.authorization_endpoint == "https://ehr.example.org/oauth/authorize"
    assert cfg.token_endpoint == f"{ISS}/token"
    assert cfg.introspection_endpoint == "https://ehr.example.org/apis/fhir/r4/introspect"
    assert cfg.capabilities == frozenset({"launch-ehr"})
    assert responses.calls[0].request.url == f"{ISS}/.well-known/smart-configuration"


@responses.activate
def test_discovery_falls_back_to_the_capability_statement():
    responses.get(f"{ISS}/.well-known/smart-configuration", status=404)
    responses.get(f"{ISS}/metadata", json={"resourceType": "CapabilityStatement", "rest": [{"security": {
        "extension": [{"url": smart.OAUTH_URIS, "extension": [
            {"url": "authorize", "valueUri": "https://auth.example.org/authorize"},
            {"url": "token", "valueUri": "https://auth.example.org/token"},
            {"url": "revoke", "valueUri": "https://auth.example.org/revoke"}]}]}}]})
    cfg = smart.discover(ISS)
    assert cfg.source == "capability-statement"
    assert cfg.token_endpoint == "https://auth.example.org/token"
    assert cfg.revocation_endpoint == "https://auth.example.org/revoke"
    assert cfg.capabilities == frozenset()


@responses.activate
@pytest.mark.parametrize("wk_status,wk_body", [(200, "not json"), (200, "[]"), (500, "{}")])
def test_broken_well_known_falls_back_too(wk_status, wk_body):
    responses.get(f"{ISS}/.well-known/smart-configuration", status=wk_status, body=wk_body)
    responses.get(f"{ISS}/metadata", status=404)
    with pytest.raises(LaunchError) as err:
        smart.discover(ISS)
    assert err.value.code == "discovery"


@responses.activate
def test_capability_statement_without_oauth_uris_is_a_clear_error():
    responses.get(f"{ISS}/.well-known/smart-configuration", status=404)
    responses.get(f"{ISS}/metadata", json={"resourceType": "CapabilityStatement", "rest": [{}]})
    with pytest.raises(LaunchError, match="neither a SMART configuration nor OAuth endpoints"):
        smart.discover(ISS)


@responses.activate
def test_unreachable_ehr():
    responses.get(f"{ISS}/.well-known/smart-configuration", body=requests.ConnectionError("refused"))
    with pytest.raises(LaunchError) as err:
        smart.discover(ISS)
    assert err.value.code == "discovery-unreachable"


def test_discovery_cache_ttl():
    now = [0.0]
    cache = smart.DiscoveryCache(ttl=10, clock=lambda: now[0])
    calls = []

    def fetch(iss):
        calls.append(iss)
        return smart.SmartConfiguration(iss=iss, authorization_endpoint="a", token_endpoint="t", source="x")

    cache.get(ISS, fetch)
    cache.get(ISS, fetch)
    now[0] = 11
    cache.get(ISS, fetch)
    assert calls == [ISS, ISS]


BASE = {"access_token": "opaque", "token_type": "Bearer"}


@pytest.mark.parametrize("body,check", [
    pytest.param({**BASE, "expires_in": "3600", "scope": "a b"}, lambda t: t.lifetime_known and t.scope == "a b",
                 id="expires_in as a string"),
    pytest.param({**BASE, "token_type": "bearer"}, lambda t: t.scope == "req" and not t.lifetime_known,
                 id="lower-case bearer, scope omitted = requested (RFC 6749 5.1)"),
    pytest.param({**BASE, "need_patient_banner": False, "intent": "order-massage", "tenant": "t1",
                  "fhirContext": [{"reference": "ServiceRequest/1"}, "junk"], "https://x.org/ext": 1},
                 lambda t: (not t.need_patient_banner and t.intent == "order-massage" and t.tenant == "t1"
                            and t.fhir_context == ({"reference": "ServiceRequest/1"},)
                            and t.extras == {"https://x.org/ext": 1}), id="context fields and extensions"),
    pytest.param({**BASE, "patient": "", "encounter": None, "refresh_token": ""},
                 lambda t: t.patient is None and t.encounter is None and t.refresh_token is None,
                 id="empty context values are absent"),
])
def test_parse_token_response(body, check):
    t = smart.parse_token_response(body, requested_scope="req", now=1000.0)
    assert check(t)
    assert "opaque" not in repr(t)


@pytest.mark.parametrize("body,words", [
    ({"token_type": "Bearer"}, "no access token"),
    ({"access_token": "x", "token_type": "mac"}, "Bearer"),
    ([1, 2], "not a JSON object"),
])
def test_bad_token_responses(body, words):
    with pytest.raises(LaunchError, match=words):
        smart.parse_token_response(body, requested_scope="", now=0)


@responses.activate
def test_token_error_uses_the_oauth_error_but_never_echoes_the_body():
    cfg = smart.SmartConfiguration(iss=ISS, authorization_endpoint="https://a/authorize",
                                   token_endpoint="https://a/token", source="well-known")
    responses.post("https://a/token", status=400, json={"error": "invalid_grant",
                                                        "error_description": "code expired"})
    with pytest.raises(LaunchError) as err:
        smart.exchange_code(cfg, smart.PublicClient("c"), code="secret-code", redirect_uri="https://app/cb",
                            code_verifier="v", requested_scope="s")
    assert err.value.code == "invalid-grant"
    assert "code expired" in err.value.message and "secret-code" not in err.value.message
    body = responses.calls[0].request.body
    assert "client_id=c" in body and "code_verifier=v" in body
    assert responses.calls[0].request.headers["Content-Type"] == "application/x-www-form-urlencoded"


@responses.activate
def test_refresh_authenticates_confidential_clients():
    cfg = smart.SmartConfiguration(iss=ISS, authorization_endpoint="https://a/authorize",
                                   token_endpoint="https://a/token", source="well-known")
    responses.post("https://a/token", json={**BASE, "expires_in": 60})
    t = smart.refresh_access_token(cfg, smart.ClientSecretBasic("c", "s"), refresh_token="rt", current_scope="x y")
    req = responses.calls[0].request
    assert req.headers["Authorization"].startswith("Basic ")
    assert "grant_type=refresh_token" in req.body and "refresh_token=rt" in req.body
    assert t.scope == "x y" and t.refresh_token is None


def test_authorize_url_appends_to_an_endpoint_with_a_query():
    cfg = smart.SmartConfiguration(iss=ISS, authorization_endpoint="https://a/authorize?tenant=1",
                                   token_endpoint="https://a/token", source="well-known")
    url = smart.authorize_url(cfg, client_id="c", redirect_uri="https://app/cb", scope="openid", state="s",
                              code_challenge="ch", aud=ISS)
    assert url.startswith("https://a/authorize?tenant=1&response_type=code&")
    assert "launch=" not in url


def test_private_key_jwt_refuses_wrong_algorithms():
    from joserfc.jwk import ECKey, RSAKey

    with pytest.raises(LaunchError, match="RS384 or ES384"):
        smart.PrivateKeyJwt("c", RSAKey.generate_key(2048, private=True), "RS256")
    with pytest.raises(LaunchError, match="P-384"):
        smart.PrivateKeyJwt("c", ECKey.generate_key("P-256", private=True), "ES384")
    with pytest.raises(LaunchError, match="not a private key"):
        smart.PrivateKeyJwt("c", RSAKey.generate_key(2048, private=False))


def test_id_token_with_alg_none_is_refused():
    import base64

    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    token = f"{b64({'alg': 'none'})}.{b64({'iss': 'x', 'aud': 'c', 'exp': 9999999999})}."
    with pytest.raises(LaunchError, match="algorithm"):
        smart.verify_id_token(token, jwks={"keys": []}, issuer="x", client_id="c", nonce=None)
