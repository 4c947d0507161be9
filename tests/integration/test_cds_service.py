"""The CDS Hooks service (smart_app/cds.py) over real HTTP on loopback: the app, an EHR key server (JWKS + a counting
stand-in FHIR endpoint), and the real sandbox (open mode, and the secured one with a SMART token)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from flask import Flask, jsonify
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_massage import cds_cards as cc
from fhir_massage import codes as C
from fhir_massage.fhir import FhirClient, StaticToken
from fhir_massage.serving import serve_in_thread, wait_ready
from fhir_massage.validation import errors, validate_resource
from tests.fixtures.app import start_app_server
from tests.fixtures.sandbox import start_sandbox
from tests.fixtures.smart_sandbox import get_token

pytestmark = pytest.mark.integration

PATIENT = "demo-dana-whitfield"
SCOPES = ("launch openid fhirUser patient/Patient.rs patient/Condition.rs patient/Observation.rs "
          "patient/MedicationRequest.rs patient/MedicationStatement.rs patient/MedicationAdministration.rs "
          "patient/AllergyIntolerance.rs patient/Procedure.rs patient/DetectedIssue.crs")


@dataclass
class KeyServer:
    """The EHR side we need: its JWKS (counted) and a FHIR base that counts every request it gets."""

    url: str
    server: Any
    hits: dict[str, int] = field(default_factory=lambda: {"jwks": 0, "fhir": 0})

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    @property
    def fhir_base(self) -> str:
        return f"{self.url}/fhir"


class Signer:
    def __init__(self, iss: str, alg: str = "ES384") -> None:
        self.iss = iss
        self.alg = alg
        self.key = ECKey.generate_key("P-384", private=True) if alg == "ES384" else RSAKey.generate_key(
            2048, private=True)
        self.key.ensure_kid()

    def public(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "kid": self.key.kid, "alg": self.alg, "use": "sig"}

    def token(self, aud: str, *, header: dict[str, Any] | None = None, key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.iss, "aud": aud, "exp": now + 300, "iat": now, "jti": secrets.token_urlsafe(16)}
        body.update(claims)
        hdr = {"alg": self.alg, "kid": self.key.kid, "typ": "JWT", **(header or {})}
        return jwt.encode(hdr, {k: v for k, v in body.items() if v is not None}, key or self.key,
                          algorithms=[hdr["alg"]])


EHR_ISS = "https://ehr.test/cds-client"
EHR2_ISS = "https://ehr2.test/cds-client"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(EHR_ISS, "ES384")


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer(EHR2_ISS, "RS384")


@pytest.fixture(scope="module")
def keys(signer: Signer, rsa_signer: Signer) -> Any:
    app = Flask("ehr-keys")
    holder: dict[str, KeyServer] = {}

    @app.get("/jwks")
    def jwks():
        holder["ks"].hits["jwks"] += 1
        return jsonify({"keys": [signer.public()]})

    @app.route("/fhir/<path:rest>", methods=["GET", "POST", "PUT"])
    def fhir(rest):
        holder["ks"].hits["fhir"] += 1
        return jsonify({"resourceType": "OperationOutcome", "issue": []}), 500

    running = serve_in_thread(app)
    ks = KeyServer(running.url, running)
    holder["ks"] = ks
    wait_ready(ks.jwks_url)
    ks.hits["jwks"] = 0
    yield ks
    running.stop()


@pytest.fixture(scope="module")
def sandbox():
    handle = start_sandbox(open=True, seed=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def app_server(keys: KeyServer, sandbox, rsa_signer: Signer, smart_sandbox):
    def regs(url: str) -> list[dict[str, Any]]:
        return [
            {"iss": sandbox.fhir_base, "client_id": "cds-open", "cds_iss": EHR_ISS, "cds_jwks_url": keys.jwks_url},
            {"iss": keys.fhir_base, "client_id": "cds-counting", "cds_iss": "https://counting.test",
             "cds_jwks_url": keys.jwks_url},
            # keys exchanged out of band (inline JWKS), for the secured sandbox
            {"iss": smart_sandbox.fhir_base, "client_id": "cds-secured", "cds_iss": EHR2_ISS,
             "cds_jwks": {"keys": [rsa_signer.public()]}},
        ]

    server = start_app_server(regs)
    yield server
    server.stop()


def service_url(app_server, service="massage-order-sign") -> str:
    return f"{app_server.url}/cds-services/{service}"


def dvt_leg_order(sid="draft-dt-1", technique="deep-tissue") -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": sid, "status": "draft", "intent": "order",
            "code": {"coding": [{"system": C.CPT, "code": C.TECHNIQUE_CPT[technique][0]},
                                {"system": C.TECHNIQUE_SYSTEM, "code": technique,
                                 "display": C.TECHNIQUE_DISPLAY[technique]}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "bodySite": [{"coding": [{"system": C.SNOMED, "code": "30021000", "display": "Lower leg"}],
                          "text": "Left lower leg"}]}


def hook_body(*, prefetch=None, fhir=None, hook="order-sign", drafts=None, selections=None) -> dict[str, Any]:
    ctx: dict[str, Any] = {"userId": "Practitioner/dr-ada-grey", "patientId": PATIENT,
                           "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                           "entry": [{"resource": d} for d in (drafts or [dvt_leg_order()])]}}
    if selections is not None:
        ctx["selections"] = selections
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": ctx}
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir is not None:
        body["fhirServer"], token = fhir
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": SCOPES, "subject": "cds-open"}
    return body


def call(url: str, body: Any, token: str | None, **kw: Any) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, (bytes, str)) else None
    return requests.post(url, json=None if data is not None else body, data=data, headers=headers, timeout=20, **kw)


def full_prefetch(fhir_base: str, token: str = "any") -> dict[str, Any]:
    """What an EHR would prefetch: every template run against the FHIR server."""
    out: dict[str, Any] = {}
    with FhirClient(fhir_base, token_source=StaticToken(token)) as client:
        for key, query in cc.prefetch_queries(PATIENT).items():
            path, _, qs = query.partition("?")
            out[key] = client.read(*path.split("/")) if not qs else client.get_url(query)
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_discovery_is_open_and_lists_both_services(app_server):
    r = requests.get(f"{app_server.url}/cds-services", timeout=10)
    assert r.status_code == 200
    assert {s["id"]: s["hook"] for s in r.json()["services"]} == {"massage-order-select": "order-select",
                                                                    "massage-order-sign": "order-sign"}


def test_missing_prefetch_without_fhir_access_is_412(app_server, signer):
    url = service_url(app_server)
    r = call(url, hook_body(prefetch={"patient": {"resourceType": "Patient", "id": PATIENT}}), signer.token(url))
    assert r.status_code == 412
    assert r.json()["error"] == "cds-prefetch" and "conditions" in r.json()["message"]


def test_full_prefetch_gives_the_critical_dvt_card(app_server, signer, sandbox):
    url = service_url(app_server)
    r = call(url, hook_body(prefetch=full_prefetch(sandbox.fhir_base)), signer.token(url))
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    assert cards[0]["indicator"] == "critical" and cards[0]["source"]["topic"]["code"] == "dvt-acute"
    assert cards[0]["links"][0]["url"] == f"{app_server.url}/launch"
    # our appContext (docs/cds-hooks.md): the app opens its orders area on this finding after the launch
    assert json.loads(cards[0]["links"][0]["appContext"])["area"] == "orders"
    assert "not prefetched" not in cards[0]["detail"]
    # every update suggestion's text is rebuilt from its new content (techniques, sites)
    updates = [a["resource"] for c in cards for s in c.get("suggestions", []) for a in s["actions"]
               if a["type"] == "update"]
    assert updates
    for res in updates:
        techniques = " + ".join(c["display"] for c in res["code"]["coding"]
                                if c["system"].endswith("/massage-technique"))
        sites = "; ".join(b["text"] for b in res.get("bodySite", []))
        assert res["code"]["text"] == (f"{techniques}: {sites}" if sites else techniques)


def test_fhir_access_to_the_open_sandbox_replaces_the_prefetch(app_server, signer, sandbox):
    url = service_url(app_server)
    r = call(url, hook_body(fhir=(sandbox.fhir_base, "any-token")), signer.token(url))
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    assert [c["source"]["topic"]["code"] for c in cards if c["indicator"] == "critical"] == ["dvt-acute"]
    assert "read from the EHR's FHIR server" in cards[0]["detail"]


def test_secured_sandbox_with_a_smart_token_and_an_inline_jwks(app_server, rsa_signer, smart_sandbox):
    token = get_token(smart_sandbox, "test-public", patient=PATIENT, scopes=SCOPES)["access_token"]
    url = service_url(app_server, "massage-order-select")
    body = hook_body(fhir=(smart_sandbox.fhir_base, token), hook="order-select",
                     selections=["ServiceRequest/draft-dt-1"])
    r = call(url, body, rsa_signer.token(url))
    assert r.status_code == 200, r.text
    assert any(c["indicator"] == "critical" for c in r.json()["cards"])
    # the token is the EHR's: a wrong one is refused by the sandbox, and the service says so without a 500
    body = hook_body(fhir=(smart_sandbox.fhir_base, "not-a-token"), hook="order-select",
                     selections=["ServiceRequest/draft-dt-1"])
    r = call(url, body, rsa_signer.token(url))
    assert r.status_code == 412 and r.json()["error"] == "fhir-auth"


def test_no_massage_order_is_an_empty_card_list(app_server, signer):
    url = service_url(app_server)
    xray = {"resourceType": "ServiceRequest", "id": "x", "status": "draft", "intent": "order",
            "code": {"coding": [{"system": C.LOINC, "code": "36554-4"}]}, "subject": {"reference": f"Patient/{PATIENT}"}}
    r = call(url, hook_body(drafts=[xray]), signer.token(url))
    assert r.status_code == 200 and r.json() == {"cards": []}


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"hook": "order-sign"}', "\ud800".encode("utf-8",
                                                                                                   "surrogatepass")],
                         ids=["bad-json", "array", "no-context", "bad-utf8"])
def test_bad_bodies_are_400_json_never_500(app_server, signer, body):
    url = service_url(app_server)
    r = call(url, body, signer.token(url))
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"] == "cds-request"


def test_fhir_server_must_be_the_registered_one(app_server, signer):
    url = service_url(app_server)
    r = call(url, hook_body(fhir=("http://127.0.0.1:9/fhir", "token")), signer.token(url))
    assert r.status_code == 400 and r.json()["error"] == "cds-fhir-server"


def _counting_body(keys: KeyServer) -> dict[str, Any]:
    return hook_body(fhir=(keys.fhir_base, "token"))


@pytest.fixture
def counting(signer: Signer) -> Signer:
    """Signs as the EHR whose registered FHIR base is the counting endpoint (same key set as ``signer``)."""
    out = Signer("https://counting.test")
    out.key = signer.key
    return out


def test_a_good_jwt_reaches_the_counting_fhir_server(app_server, keys, counting):
    # control for the 401 tests below: with a valid JWT the same body does make the outbound FHIR call
    url = service_url(app_server)
    before = keys.hits["fhir"]
    r = call(url, _counting_body(keys), counting.token(url))
    assert r.status_code == 502 and keys.hits["fhir"] > before


@pytest.mark.parametrize("case", ["no-header", "not-bearer", "garbage", "wrong-key", "expired", "wrong-aud",
                                  "unknown-iss", "hs256", "alg-none", "jku-not-allowed", "no-jti", "too-long-lived"])
def test_bad_jwts_are_401_and_nothing_is_fetched(app_server, keys, counting, case):
    url = service_url(app_server)
    body = _counting_body(keys)
    headers_token: str | None
    if case == "no-header":
        headers_token = None
    elif case == "not-bearer":
        r = requests.post(url, json=body, headers={"Authorization": "Basic Zm9vOmJhcg=="}, timeout=10)
        assert r.status_code == 401
        return
    elif case == "garbage":
        headers_token = "abc.def"
    elif case == "wrong-key":
        headers_token = counting.token(url, key=ECKey.generate_key("P-384", private=True))
    elif case == "expired":
        headers_token = counting.token(url, exp=int(time.time()) - 120)
    elif case == "wrong-aud":
        headers_token = counting.token(service_url(app_server, "massage-order-select"))
    elif case == "unknown-iss":
        headers_token = counting.token(url, iss="https://evil.test")
    elif case == "hs256":
        from joserfc.jwk import OctKey

        headers_token = jwt.encode({"alg": "HS256", "typ": "JWT"}, {"iss": counting.iss, "aud": url,
                                   "exp": int(time.time()) + 60, "jti": "x"}, OctKey.generate_key(256))
    elif case == "alg-none":
        import base64
        import json

        def b64(d):
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

        headers_token = b64({"alg": "none", "typ": "JWT"}) + "." + b64(
            {"iss": counting.iss, "aud": url, "exp": int(time.time()) + 60, "jti": "y"}) + "."
    elif case == "jku-not-allowed":
        headers_token = counting.token(url, header={"jku": "http://127.0.0.1:9/evil-jwks"})
    elif case == "no-jti":
        headers_token = counting.token(url, jti=None)
    else:
        headers_token = counting.token(url, exp=int(time.time()) + 7200)
    before = dict(keys.hits)
    r = call(url, body, headers_token)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "cds-auth" and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert keys.hits["fhir"] == before["fhir"], "no outbound FHIR request for a refused call"
    if case not in ("wrong-key",):
        # refused before any key was needed (the wrong-key case may fetch the JWKS once, to verify)
        assert keys.hits["jwks"] == before["jwks"]


def test_a_replayed_jwt_is_401(app_server, signer, sandbox):
    url = service_url(app_server)
    token = signer.token(url)
    body = hook_body(prefetch=full_prefetch(sandbox.fhir_base))
    assert call(url, body, token).status_code == 200
    r = call(url, body, token)
    assert r.status_code == 401 and "already used" in r.json()["message"]


def test_jku_on_the_allow_list_is_used(app_server, signer, sandbox, keys):
    url = service_url(app_server)
    token = signer.token(url, header={"jku": keys.jwks_url})
    assert call(url, hook_body(prefetch=full_prefetch(sandbox.fhir_base)), token).status_code == 200


def test_feedback_is_recorded_and_an_override_becomes_a_detected_issue(app_server, signer, sandbox):
    url = service_url(app_server)
    r = call(url, hook_body(fhir=(sandbox.fhir_base, "any")), signer.token(url))
    cards = r.json()["cards"]
    critical = next(c for c in cards if c["indicator"] == "critical")
    warning = next(c for c in cards if c["indicator"] == "warning" and c.get("suggestions"))
    fb_url = url + "/feedback"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    accepted = {"feedback": [{"card": warning["uuid"], "outcome": "accepted", "outcomeTimestamp": now,
                              "acceptedSuggestions": [{"id": warning["suggestions"][0]["uuid"]}]}]}
    r = call(fb_url, accepted, signer.token(fb_url))
    assert r.status_code == 200, r.text
    assert r.json()["feedback"] == [{"card": warning["uuid"], "status": "recorded"}]
    rec = app_server.store.get("cds-feedback", warning["uuid"])
    assert rec["outcome"] == "accepted" and rec["acceptedSuggestions"][0]["label"] == warning["suggestions"][0]["label"]

    override = {"fhirServer": sandbox.fhir_base,
                "fhirAuthorization": {"access_token": "any", "token_type": "Bearer", "scope": SCOPES,
                                      "subject": "cds-open"},
                "feedback": [{"card": critical["uuid"], "outcome": "overridden", "outcomeTimestamp": now,
                              "overrideReason": {"reason": critical["overrideReasons"][0],
                                                 "userComment": "Cleared by vascular surgery"}}]}
    r = call(fb_url, override, signer.token(fb_url))
    assert r.status_code == 200, r.text
    (result,) = r.json()["feedback"]
    assert result["status"] == "recorded" and result["detectedIssue"].startswith("DetectedIssue/")
    rec = app_server.store.get("cds-feedback", critical["uuid"])
    assert rec["outcome"] == "overridden" and rec["overrideReason"]["code"] == "clearance-obtained"
    assert rec["userComment"] == "Cleared by vascular surgery" and rec["outcomeTimestamp"] == now
    with FhirClient(sandbox.fhir_base) as client:
        issue = client.read("DetectedIssue", result["detectedIssue"].split("/")[1])
    assert issue["patient"]["reference"] == f"Patient/{PATIENT}"
    assert issue["mitigation"][0]["action"]["coding"][0]["code"] == "clearance-obtained"
    assert "Cleared by vascular surgery" in issue["mitigation"][0]["action"]["text"]
    # what landed in the sandbox holds to its profile (read back, not the builder's dict)
    problems = errors(validate_resource(issue))
    assert problems == [], [str(p) for p in problems]
    # the same feedback again (a retry) finds the same DetectedIssue (If-None-Exist on the card identifier)
    r = call(fb_url, override, signer.token(fb_url))
    assert r.json()["feedback"][0]["detectedIssue"] == result["detectedIssue"]


def test_feedback_for_an_unknown_card_or_from_another_ehr_is_not_recorded(app_server, signer, rsa_signer, sandbox):
    url = service_url(app_server)
    cards = call(url, hook_body(prefetch=full_prefetch(sandbox.fhir_base)), signer.token(url)).json()["cards"]
    fb_url = url + "/feedback"
    now = "2026-11-28T10:00:00Z"
    body = {"feedback": [{"card": cards[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": now},
                         {"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": now}]}
    r = call(fb_url, body, rsa_signer.token(fb_url))  # another registered EHR did not get these cards
    assert [x["status"] for x in r.json()["feedback"]] == ["unknown-card", "unknown-card"]
    assert app_server.store.get("cds-feedback", cards[0]["uuid"]) is None
    r = call(fb_url, {"feedback": "x"}, signer.token(fb_url))
    assert r.status_code == 400
    r = call(fb_url, body, None)
    assert r.status_code == 401


def _whole_store(store: Any) -> tuple[set[str], str]:
    """(namespaces, text of every row of every table) of the app's SQLite store: the whole store, not the keys
    a test knows about (the Store protocol has no listing, so the tables are read directly)."""
    tables = [row[0] for row in store._exec("SELECT name FROM sqlite_master WHERE type='table'")]
    assert "kv" in tables, tables
    namespaces = {row[0] for row in store._exec("SELECT DISTINCT ns FROM kv")}
    text = "\n".join(repr(row) for t in tables for row in store._exec(f'SELECT * FROM "{t}"'))
    return namespaces, text


def test_fhir_authorization_tokens_are_never_stored_or_logged(app_server, signer, rsa_signer, sandbox, smart_sandbox,
                                                              caplog):
    """CDS Hooks 2.0 "FHIR Resource Access": the token is the EHR's, for this call. After hooks, a refused token
    and feedback that all carried fhirAuthorization, no table of the app's store and no log line holds one."""
    caplog.set_level(logging.DEBUG)
    open_token = f"cds-open-token-{secrets.token_hex(16)}"  # the open sandbox takes any bearer token
    refused_token = f"cds-refused-token-{secrets.token_hex(16)}"
    real_token = get_token(smart_sandbox, "test-public", patient=PATIENT, scopes=SCOPES)["access_token"]
    tokens = {"open": open_token, "refused": refused_token, "real": real_token}

    url = service_url(app_server)
    r = call(url, hook_body(fhir=(sandbox.fhir_base, open_token)), signer.token(url))
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    critical = next(c for c in cards if c["indicator"] == "critical")
    warning = next(c for c in cards if c["indicator"] == "warning" and c.get("suggestions"))
    select = service_url(app_server, "massage-order-select")
    r = call(select, hook_body(fhir=(smart_sandbox.fhir_base, real_token), hook="order-select",
                               selections=["ServiceRequest/draft-dt-1"]), rsa_signer.token(select))
    assert r.status_code == 200, r.text
    r = call(select, hook_body(fhir=(smart_sandbox.fhir_base, refused_token), hook="order-select",
                               selections=["ServiceRequest/draft-dt-1"]), rsa_signer.token(select))
    assert r.status_code == 412 and r.json()["error"] == "fhir-auth"

    fb_url = url + "/feedback"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    access = {"fhirServer": sandbox.fhir_base,
              "fhirAuthorization": {"access_token": open_token, "token_type": "Bearer", "scope": SCOPES,
                                    "subject": "cds-open"}}
    r = call(fb_url, {**access, "feedback": [
        {"card": warning["uuid"], "outcome": "accepted", "outcomeTimestamp": now,
         "acceptedSuggestions": [{"id": warning["suggestions"][0]["uuid"]}]},
        {"card": critical["uuid"], "outcome": "overridden", "outcomeTimestamp": now,
         "overrideReason": {"reason": critical["overrideReasons"][0], "userComment": "Cleared"}}]},
        signer.token(fb_url))
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["feedback"]] == ["recorded", "recorded"]
    assert r.json()["feedback"][1]["detectedIssue"].startswith("DetectedIssue/")  # the token was used to write

    namespaces, text = _whole_store(app_server.store)
    # the dump does see what these calls stored (the test could fail): the cards and the feedback on them
    assert {"cds-card", "cds-feedback"} <= namespaces, namespaces
    assert critical["uuid"] in text and warning["uuid"] in text
    for kind, token in tokens.items():
        assert token not in text, f"the {kind} fhirAuthorization token is in the app's store"
        assert token not in caplog.text, f"the {kind} fhirAuthorization token is in a log line"
