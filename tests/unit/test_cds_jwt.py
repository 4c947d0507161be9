"""CDS client JWT verification (fhir_massage/cds_jwt.py), pure: keys generated here, clock and JWKS injected."""

from __future__ import annotations

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from fhir_massage.cds_jwt import CdsAuthError, issuers_from_registrations, is_https_or_loopback, verify_cds_jwt

NOW = 1_800_000_000
AUD = "https://cds.example.org/cds-services/massage-order-sign"
ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/cds/jwks"


def _key(kind="EC"):
    key = ECKey.generate_key("P-384", private=True) if kind == "EC" else RSAKey.generate_key(2048, private=True)
    key.ensure_kid()
    return key


EC = _key("EC")
RSA = _key("RSA")


def _pub(key, alg):
    return {**key.as_dict(private=False), "kid": key.kid, "alg": alg}


REGS = [{"iss": "https://ehr.example.org/fhir", "client_id": "a", "cds_iss": ISS, "cds_jwks_url": JWKS_URL},
        {"iss": "https://other.example.org/fhir", "client_id": "b", "cds_iss": ["https://other.example.org"],
         "cds_jwks": {"keys": [_pub(RSA, "RS384")]}},
        {"iss": "https://smart-only.example.org/fhir", "client_id": "c"}]
ISSUERS = issuers_from_registrations(REGS)


def sign(key=EC, alg="ES384", header=None, **claims):
    body = {"iss": ISS, "aud": AUD, "exp": NOW + 300, "iat": NOW, "jti": "j-1"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT", **(header or {})}, body, key, algorithms=[alg])


class Calls:
    def __init__(self):
        self.fetched: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        self.remembered: list[tuple[str, str, float]] = []

    def get_jwks(self, url, kid):
        self.fetched.append(url)
        return {"keys": [_pub(EC, "ES384")]}

    def remember(self, iss, jti, ttl):
        self.remembered.append((iss, jti, ttl))
        if (iss, jti) in self.seen:
            return False
        self.seen.add((iss, jti))
        return True


def verify(token, calls=None, **kw):
    calls = calls or Calls()
    kw.setdefault("expected_aud", AUD)
    return verify_cds_jwt(token, issuers=ISSUERS, get_jwks=calls.get_jwks, remember_jti=calls.remember, now=NOW, **kw)


def test_registrations_map_cds_issuers_and_skip_those_without_keys():
    assert set(ISSUERS) == {ISS, "https://other.example.org"}
    assert ISSUERS[ISS].fhir_servers == ("https://ehr.example.org/fhir",)
    assert ISSUERS[ISS].jwks_urls == (JWKS_URL,)


def test_a_good_es384_token_verifies_and_remembers_its_jti_until_it_expires():
    calls = Calls()
    caller = verify(sign(), calls)
    assert caller.iss == ISS and caller.jti == "j-1" and calls.fetched == [JWKS_URL]
    assert calls.remembered == [(ISS, "j-1", 330.0)]
    with pytest.raises(CdsAuthError, match="already used"):
        verify(sign(), calls)


def test_rs384_with_an_inline_jwks_and_an_audience_array():
    calls = Calls()
    token = sign(RSA, "RS384", iss="https://other.example.org", aud=["https://x", AUD])
    assert verify(token, calls).iss == "https://other.example.org"
    assert calls.fetched == []  # keys exchanged out of band: nothing fetched


@pytest.mark.parametrize("token, message", [
    (lambda: sign(iss="https://evil.example"), "issuer"),
    (lambda: sign(iss="https://smart-only.example.org/fhir"), "issuer"),
    (lambda: sign(aud="https://cds.example.org/cds-services/massage-order-select"), "audience"),
    (lambda: sign(aud=None), "audience"),
    (lambda: sign(exp=NOW - 60), "expired"),
    (lambda: sign(exp=None), "expiry"),
    (lambda: sign(exp=NOW + 3600), "too long"),
    (lambda: sign(iat=NOW + 600), "future"),
    (lambda: sign(jti=None), "jti"),
    (lambda: sign(header={"typ": "at+jwt"}), "typ"),
    (lambda: sign(header={"jku": "https://evil.example/jwks"}), "jku"),
    (lambda: sign(_key("EC")), "signature|kid"),
    (lambda: jwt.encode({"alg": "HS256"}, {"iss": ISS, "aud": AUD, "exp": NOW + 60, "jti": "x"},
                        OctKey.generate_key(256)), "algorithm"),
    (lambda: sign(RSA, "RS256"), "algorithm"),
    (lambda: "a.b", "not a signed JWT"),
    (lambda: "e30.e30.", "algorithm"),
    (lambda: "!!.!!.!!", "decoded"),
], ids=["unknown-iss", "iss-without-cds-keys", "other-endpoint", "no-aud", "expired", "no-exp", "too-long-lived",
        "iat-future", "no-jti", "wrong-typ", "jku-not-allowed", "unknown-key", "hmac", "rs256-not-allowed",
        "two-parts", "empty-header", "not-base64"])
def test_bad_tokens_are_refused_before_the_jti_is_spent(token, message):
    calls = Calls()
    with pytest.raises(CdsAuthError, match=message):
        verify(token(), calls)
    assert calls.remembered == []


@pytest.mark.parametrize("case", ["unknown-iss", "wrong-aud", "expired", "jku-not-allowed", "hmac"])
def test_cheap_refusals_fetch_no_keys(case):
    token = {"unknown-iss": lambda: sign(iss="https://evil.example"), "wrong-aud": lambda: sign(aud="https://x"),
             "expired": lambda: sign(exp=NOW - 600),
             "jku-not-allowed": lambda: sign(header={"jku": "https://evil.example/jwks"}),
             "hmac": lambda: jwt.encode({"alg": "HS256"}, {"iss": ISS}, OctKey.generate_key(256))}[case]()
    calls = Calls()
    with pytest.raises(CdsAuthError):
        verify(token, calls)
    assert calls.fetched == []


def test_jku_on_the_allow_list_is_fetched():
    calls = Calls()
    verify(sign(header={"jku": JWKS_URL}), calls)
    assert calls.fetched == [JWKS_URL]


def test_algorithms_can_be_widened_by_configuration():
    issuers = issuers_from_registrations([{"iss": "https://o.example/fhir", "cds_iss": "https://o.example",
                                           "cds_jwks": {"keys": [_pub(RSA, "RS256")]}}])
    token = sign(RSA, "RS256", iss="https://o.example")
    calls = Calls()
    with pytest.raises(CdsAuthError, match="algorithm"):
        verify_cds_jwt(token, expected_aud=AUD, issuers=issuers, get_jwks=calls.get_jwks,
                       remember_jti=calls.remember, now=NOW)
    assert verify_cds_jwt(token, expected_aud=AUD, issuers=issuers, get_jwks=calls.get_jwks,
                          remember_jti=calls.remember, now=NOW, algorithms=("RS256",)).iss == "https://o.example"


@pytest.mark.parametrize("url, ok", [("https://ehr/jwks", True), ("http://127.0.0.1:9/jwks", True),
                                     ("http://localhost/jwks", True), ("http://ehr.example/jwks", False),
                                     ("ftp://x", False), ("http://[::1]:80/x", True)])
def test_https_or_loopback(url, ok):
    assert is_https_or_loopback(url) is ok
