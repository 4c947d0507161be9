"""Registration errors say what is wrong in words: which EHR (its iss), which key was probably meant, what is
wrong with a key file; never an exception class name ("could not be read (Error)")."""

from __future__ import annotations

import re

import pytest
from joserfc.jwk import ECKey, RSAKey

from fhir_massage.errors import InvalidInput
from smart_app.config import Registration, load_registrations_toml

ISS = "https://ehr.example.org/fhir"
PKJ = {"iss": ISS, "client_id": "app", "auth": "private_key_jwt"}


def message(data: dict) -> str:
    with pytest.raises(InvalidInput) as caught:
        Registration.from_dict(data)
    text = caught.value.message
    # no exception class names, no "(None)"
    assert not re.search(r"\((?:[A-Z]\w*Error|Error|Exception|None)\)", text), text
    return text


def test_unknown_key_names_the_ehr_and_the_key_meant():
    text = message({"iss": ISS, "client-id": "app"})
    assert text.startswith(f"The registration for {ISS} has an unknown key: client-id (did you mean client_id?)")


@pytest.mark.parametrize("wrong,meant", [("client-id", "client_id"), ("Client_ID", "client_id"),
                                         ("private_key_fle", "private_key_file"), ("scope-dialect", "scope_dialect"),
                                         ("frame-ancestors", "frame_ancestors")])
def test_near_misses_are_suggested(wrong, meant):
    assert f"{wrong} (did you mean {meant}?)" in message({"iss": ISS, "client_id": "app", wrong: "x"})


def test_an_unrelated_key_gets_no_suggestion_and_a_registration_without_iss_says_so():
    text = message({"client_id": "app", "colour": "red"})
    assert "An EHR registration (without an iss) has an unknown key: colour." in text and "did you mean" not in text


def pem(key) -> str:
    return key.as_pem(private=True).decode()


KEY_CASES = [
    ("empty", "", "the key is empty"),
    ("not-a-key", "hello", "neither PEM text"),
    ("public-pem", RSAKey.generate_key(2048).as_pem(private=False).decode(), "public key or a certificate"),
    ("cut-off-pem", "-----BEGIN PRIVATE KEY-----\nMIIE", "cut off"),
    ("garbled-pem", "-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----",
     "could not be read as an RSA or EC (P-384) private key"),
    ("encrypted-pem", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nabc\n-----END ENCRYPTED PRIVATE KEY-----", "passphrase"),
    ("public-jwk", {"kty": "RSA", "n": "x", "e": "AQAB"}, 'public key only (no "d")'),
    ("jwks-not-jwk", {"keys": [{"kty": "RSA"}]}, "JWK Set"),
    ("unknown-kty", {"kty": "oct", "k": "abc"}, "'oct' is not supported"),
    ("wrong-curve", {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}, "'P-256' is not supported"),
    ("bad-rsa-values", {"kty": "RSA", "n": "x", "e": "AQAB", "d": "y"}, "do not form a valid key (check n, e and d)"),
    ("bad-json", "{not json", "not valid JSON"),
]


@pytest.mark.parametrize("case,key,words", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_key_problems_in_words(case, key, words):
    text = message({**PKJ, "private_key": key})
    assert text.startswith(f"The private key for {ISS} (private_key) cannot be used: "), text
    assert words in text, text


def test_a_key_that_does_not_fit_the_algorithm_says_so():
    text = message({**PKJ, "private_key": pem(ECKey.generate_key("P-256"))})
    assert "ES384 needs a P-384 key" in text


def test_missing_and_unreadable_key_files(tmp_path):
    assert "there is no file" in message({**PKJ, "private_key_file": str(tmp_path / "nope.pem")})
    assert "is a directory" in message({**PKJ, "private_key_file": str(tmp_path)})
    der = tmp_path / "key.der"
    der.write_bytes(b"\x30\x82\xff\xfe\x00\x01")
    assert "is not text" in message({**PKJ, "private_key_file": str(der)})
    public = tmp_path / "pub.pem"
    public.write_text(RSAKey.generate_key(2048).as_pem(private=False).decode())
    text = message({**PKJ, "private_key_file": str(public)})
    assert f"({public})" in text and "public key or a certificate" in text


def test_registrations_file_problems(tmp_path):
    with pytest.raises(InvalidInput, match="there is no file"):
        load_registrations_toml(tmp_path / "none.toml")
    bad = tmp_path / "plain.toml"
    bad.write_text('ehr = ["https://ehr.example.org/fhir"]\n')
    with pytest.raises(InvalidInput, match=r"list of \[\[ehr\]\] tables"):
        load_registrations_toml(bad)
