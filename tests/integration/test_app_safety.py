"""App-wide safety sweep: the product brief's web standards, checked on EVERY route of the real app.

The routes come from Flask's ``url_map`` (not from a list written here), so a route added later is covered the
day it appears; a path argument this file has no sample for fails the sweep by name (add a sample in ``SAMPLES``).

One world per module: two secured sandboxes (EHR A and EHR B) and one app registered with both. EHR A's chart for
Jacki Feil carries hostile text (a Condition, the physician's name, a Communication) and a DVT, so the flow that
runs once at the start - physician launch, order with an override, therapist launch, session note draft, message,
plan, a token refresh - reaches every area with markup in the EHR data. Every log record of the whole module is
kept (root logger at DEBUG) and checked at the end for tokens and patient data.

Standards checked (brief, "App protection" of SMART App Launch 2.2 and the HTTP security headers it implies):
CSRF on every state-changing route (only /cds-services/* is exempt: the EHR's JWT authenticates it); the security
headers and cookie attributes on every page; never a 500 or a traceback for a user's mistake; EHR text escaped;
no secrets or patient data in logs; a token goes only to its issuer (RFC 6750 §5.3); accessible page basics.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from html import unescape
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey

from fhir_massage.sandbox.access import OPEN
from fhir_massage.sandbox.fhir_api import EXT
from tests.fixtures.app import AppServer, start_app_server
from tests.fixtures.smart_sandbox import SmartSandbox, create_launch, register_client, start_smart_sandbox

pytestmark = pytest.mark.integration

CDS_KEY = ECKey.generate_key("P-384", private=True)
CDS_KEY.ensure_kid()

PHYSICIAN = "dr-ada-grey"
THERAPIST = "lmt-sam-reyes"
FEIL = "98671a34-1c6e-4569-a1bc-6ee40c8d03a5"  # Jacki Feil (Synthea): id is not her name, so logs can be searched
FEIL_NAME = ("Jacki", "Feil", "Reichel")
FEIL_BIRTH = "1968-05-19"
FEIL_MRN = "2dfcf7a9-5fb8-4f56-9cf3-a35a74c60438"
SUZI = "95efed54-0648-4faf-a179-9a2b3c45e92d"  # the fuzz writes its orders here, away from the flow's patient
LOWER_BACK = "37822005"
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
RAW_MARKUP = ("<script>alert(", "<img src=x", "<img src=\"x\"")
SECRET_A = "safety-a-" + secrets.token_urlsafe(18)
CDS_ISS = "https://ehr-a.test/cds-client"
CSRF_EXEMPT_PREFIXES = ("/cds-services",)  # server-to-server, authenticated by the EHR's signed JWT (cds.py)
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "File \"/", "werkzeug.exceptions", "jinja2.exceptions",
                     "KeyError", "TypeError", "AttributeError", "ValueError:")


# ---------------------------------------------------------------------------------------------------------------
# A recording WSGI layer in front of each sandbox: what reached it, with which Authorization header, and the
# secrets its authorization server handed out (for the log check). It can also add a `next` link pointing at
# another server to every searchset it answers (a hostile or misconfigured EHR).


@dataclass
class Seen:
    method: str
    path: str
    query: str
    authorization: str | None
    writes: bool = False  # could change FHIR data (a create/update/delete, or a Bundle carrying one)


@dataclass
class Recorder:
    sandbox: SmartSandbox
    seen: list[Seen] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    foreign_next: str | None = None  # a FHIR base on ANOTHER server: searchsets get a next link there
    injected: int = 0  # searchsets that got such a link

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.inner = self.sandbox.app.wsgi_app
        self.sandbox.app.wsgi_app = self  # Flask.__call__ reads wsgi_app on every request

    def fhir_writes(self, since: int) -> list[Seen]:
        """Requests since index ``since`` that could change FHIR data (a batch of GETs is a read)."""
        with self.lock:
            return [s for s in self.seen[since:] if s.writes]

    def mark(self) -> int:
        with self.lock:
            return len(self.seen)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        auth = environ.get("HTTP_AUTHORIZATION")
        method = environ.get("REQUEST_METHOD", "")
        writes = False
        if path.startswith("/fhir") and method in ("PUT", "PATCH", "DELETE"):
            writes = True
        elif path.startswith("/fhir") and method == "POST" and not path.endswith("/_search"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            raw = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(raw)
            writes = True
            if path.rstrip("/") == "/fhir":  # batch/transaction: a write only if an entry is not a GET
                try:
                    bundle = json.loads(raw)
                    writes = any(((e or {}).get("request") or {}).get("method", "GET") != "GET"
                                 for e in bundle.get("entry") or [])
                except (ValueError, AttributeError):
                    writes = True
        with self.lock:
            self.seen.append(Seen(method, path, environ.get("QUERY_STRING", ""), auth, writes))
        if path == "/auth/token":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(body)
            for k, v in parse_qsl(body.decode("latin-1")):
                if k in ("code", "code_verifier", "refresh_token", "client_assertion", "client_secret") and v:
                    self.secrets.add(v)
            if auth and auth.lower().startswith("basic "):
                import base64

                user_pass = base64.b64decode(auth[6:]).decode()
                self.secrets.add(user_pass.split(":", 1)[1])
                self.secrets.add(auth[6:])
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        result = self.inner(environ, capture)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        headers = list(captured["headers"])
        ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
        location = next((v for k, v in headers if k.lower() == "location"), "")
        if location:
            for k, v in parse_qsl(urlsplit(location).query):
                if k == "code":
                    self.secrets.add(v)
        if path == "/auth/token" and body:
            try:
                doc = json.loads(body)
                for k in ("access_token", "refresh_token", "id_token"):
                    if isinstance(doc.get(k), str):
                        self.secrets.add(doc[k])
            except ValueError:
                pass
        if self.foreign_next and path.startswith("/fhir") and "json" in ctype and body:
            body = self._inject(body, path)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers)
        return [body]

    def _inject(self, body: bytes, path: str) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:
            return body

        def add(bundle: Any, rtype: str) -> None:
            if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle" and bundle.get("type") == "searchset":
                links = [lk for lk in bundle.get("link") or [] if lk.get("relation") != "next"]
                links.append({"relation": "next", "url": f"{self.foreign_next}/{rtype}?_getpages=stolen&page=2"})
                bundle["link"] = links
                self.injected += 1

        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            if doc.get("type") == "searchset":
                add(doc, path.rstrip("/").rsplit("/", 1)[-1] or "Patient")
            for e in doc.get("entry") or []:
                add((e or {}).get("resource"), "ServiceRequest")
        return json.dumps(doc).encode()


# ---------------------------------------------------------------------------------------------------------------
# Log capture for the whole module


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def rendered(self) -> list[str]:
        out = []
        for r in list(self.records):
            try:
                text = self.fmt.format(r)
            except Exception as exc:  # a record that cannot render is itself a finding; keep its raw parts
                text = f"{r.name} UNRENDERABLE {exc!r} {r.msg!r} {r.args!r}"
            out.append(f"{text} | raw args={r.args!r}")
        return out


@pytest.fixture(scope="module")
def log_capture() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    names = ("", "werkzeug", "urllib3", "urllib3.connectionpool", "smart_app", "fhir_massage", "authlib", "joserfc")
    before = {n: logging.getLogger(n).level for n in names}
    root.addHandler(handler)
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    for n, level in before.items():
        logging.getLogger(n).setLevel(level)


# ---------------------------------------------------------------------------------------------------------------
# The world


@dataclass
class Launch:
    browser: requests.Session
    landing: str
    lsid: str
    user: str
    patient: str


@dataclass
class World:
    a: SmartSandbox
    b: SmartSandbox
    rec_a: Recorder
    rec_b: Recorder
    app: AppServer
    physician: Launch
    therapist: Launch
    draft_id: str
    order_id: str
    service_id: str
    pages: dict[str, requests.Response] = field(default_factory=dict)  # every page the flow reached, by name

    def launch(self, user: str, patient: str = FEIL) -> Launch:
        return do_launch(self.a, self.app, "safety-a", user, patient)


def do_launch(sandbox: SmartSandbox, app: AppServer, client_id: str, user: str, patient: str) -> Launch:
    browser = requests.Session()
    out = create_launch(sandbox, client_id, user, patient)
    r = browser.get(out["launch_url"], timeout=60)
    assert r.status_code == 200, r.text[:800]
    m = re.search(r"/p/([A-Za-z0-9_\-]+)/", urlsplit(r.url).path)
    assert m, r.url
    return Launch(browser, r.url, m.group(1), user, patient)


def hidden(html: str, name: str) -> str:
    m = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html)
    assert m, f"no hidden {name}"
    return unescape(m.group(1))


def csrf_of(launch: Launch) -> str:
    r = launch.browser.get(launch.landing, timeout=30)
    m = re.search(r'name="csrf_token" value="([^"]+)"', r.text) or re.search(
        r'<meta name="csrf-token" content="([^"]+)"', r.text)
    if m:
        return unescape(m.group(1))
    # the landing has no form: take it from the order page or any page with a form
    for path in ("orders/", "plan/", "sessions/"):
        r = launch.browser.get(launch.landing + path, timeout=60)
        m = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        if m:
            return unescape(m.group(1))
    raise AssertionError("no page of this launch carries a CSRF token")


def versions(sb: SmartSandbox) -> int:
    """Every FHIR write adds a history row in the sandbox: the count is the chart's version, across all resources."""
    return sb.app.extensions[EXT]["store"].query("SELECT count(*) FROM history")[0][0]


def _store_resource(sb: SmartSandbox, resource: dict[str, Any]) -> dict[str, Any]:
    service = sb.app.extensions[EXT]["service"]
    if resource.get("id"):
        return service.update(OPEN, sb.fhir_base, resource["resourceType"], resource["id"], resource).resource
    return service.create(OPEN, sb.fhir_base, resource["resourceType"], resource).resource


def plant_hostile_text(sb: SmartSandbox) -> None:
    """Markup in the EHR's own data, written by the EHR itself (open grant, in process)."""
    onset = (date.today() - timedelta(days=5)).isoformat()
    _store_resource(sb, {
        "resourceType": "Condition", "subject": {"reference": f"Patient/{FEIL}"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "problem-list-item"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "128053003", "display": XSS}], "text": XSS},
        "onsetDateTime": onset, "note": [{"text": XSS}],
    })
    service = sb.app.extensions[EXT]["service"]
    doc = service.read(OPEN, sb.fhir_base, "Practitioner", PHYSICIAN).resource
    doc = {**doc, "name": [{"use": "official", "family": XSS, "given": [XSS], "prefix": ["Dr."]}]}
    doc.pop("meta", None)
    _store_resource(sb, doc)


def plant_message(sb: SmartSandbox, order_id: str) -> None:
    _store_resource(sb, {
        "resourceType": "Communication", "status": "completed", "subject": {"reference": f"Patient/{FEIL}"},
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}], "sent": f"{date.today().isoformat()}T08:00:00Z",
        "sender": {"reference": f"Practitioner/{PHYSICIAN}"}, "recipient": [{"reference": f"Practitioner/{THERAPIST}"}],
        "payload": [{"contentString": XSS}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category",
                                  "code": "notification"}], "text": XSS}],
    })


def sign_with_overrides(launch: Launch) -> tuple[str, str, list[requests.Response]]:
    """Open the order form, sign: the DVT blocks; override every blocking finding, acknowledge the rest."""
    pages = []
    r = launch.browser.get(launch.landing + "orders/", timeout=60)
    assert r.status_code == 200 and "/orders/draft/" in r.url, (r.status_code, r.text[:800])
    pages.append(r)
    draft_id = hidden(r.text, "draft_id")
    data: dict[str, Any] = {"csrf_token": hidden(r.text, "csrf_token"), "draft_id": draft_id, "technique": "swedish",
                            "site": LOWER_BACK, "frequency": "1", "duration_weeks": "2", "session_minutes": "45",
                            "reason_text": "Chronic pain", "pressure": "light"}
    sign = launch.landing + "orders/sign"
    r = launch.browser.post(sign, data=data, timeout=60)
    pages.append(r)
    assert r.status_code == 422, (r.status_code, r.text[:1500])  # the DVT blocks signing
    for name in re.findall(r'name="(override-(?!note-)[^"]+)"', r.text):
        block = r.text[r.text.index(f'name="{name}"'):]
        value = re.search(r'<option value="([^"]+)"', block)
        data[unescape(name)] = unescape(value.group(1)) if value else "clinical-judgement"
    for name in re.findall(r'name="(override-note-[^"]+)"', r.text):
        data[unescape(name)] = "Checked with the vascular team; lower back only, light pressure."
    for name in re.findall(r'name="(ack-[^"]+)"', r.text):
        data[unescape(name)] = "yes"
    r = launch.browser.post(sign, data=data, timeout=60)
    pages.append(r)
    assert r.status_code == 200 and "/orders/done/" in r.url, (r.status_code, r.text[:2000])
    m = re.search(r"ServiceRequest/([A-Za-z0-9\-.]+)", r.text)
    assert m, r.text[:2000]
    return draft_id, m.group(1), pages


@pytest.fixture(scope="module")
def world(log_capture: Capture) -> Iterator[World]:
    a = start_smart_sandbox()
    b = start_smart_sandbox()
    rec_a, rec_b = Recorder(a), Recorder(b)
    app = None
    try:
        def regs(url: str) -> list[dict[str, Any]]:
            return [
                {"iss": a.fhir_base, "client_id": "safety-a", "name": "EHR A", "frame_ancestors": [a.url],
                 "auth": "client_secret_basic", "client_secret": SECRET_A, "cds_iss": CDS_ISS,
                 "cds_jwks": {"keys": [{**CDS_KEY.as_dict(private=False), "kid": CDS_KEY.kid, "alg": "ES384",
                                        "use": "sig"}]}},
                {"iss": b.fhir_base, "client_id": "safety-b", "name": "EHR B", "frame_ancestors": [b.url]},
            ]

        app = start_app_server(regs, ORDERS_VALIDATE=True)
        register_client(a, {"client_id": "safety-a", "auth_method": "client_secret_basic", "client_secret": SECRET_A,
                            "redirect_uris": [app.redirect_uri], "launch_url": app.launch_url, "name": "safety A"})
        register_client(b, {"client_id": "safety-b", "auth_method": "none", "redirect_uris": [app.redirect_uri],
                            "launch_url": app.launch_url, "name": "safety B"})
        rec_a.secrets.add(SECRET_A)
        plant_hostile_text(a)

        pages: dict[str, requests.Response] = {}
        physician = do_launch(a, app, "safety-a", PHYSICIAN, FEIL)
        pages["landing (physician)"] = physician.browser.get(physician.landing, timeout=60)
        draft_id, order_id, order_pages = sign_with_overrides(physician)
        pages["order form"], pages["order form (blocked)"], pages["order done"] = order_pages
        plant_message(a, order_id)
        pages["plan (physician)"] = physician.browser.get(physician.landing + "plan/", timeout=60)
        pages["panel"] = physician.browser.get(physician.landing + "plan/panel", timeout=60)

        therapist = do_launch(a, app, "safety-a", THERAPIST, FEIL)
        pages["landing (therapist)"] = therapist.browser.get(therapist.landing, timeout=60)
        pages["sessions"] = therapist.browser.get(therapist.landing + "sessions/", timeout=60)
        doc = therapist.browser.get(therapist.landing + f"sessions/{order_id}", timeout=60)
        pages["session note"] = doc
        if doc.status_code == 200:
            token = hidden(doc.text, "csrf_token")
            therapist.browser.post(therapist.landing + f"sessions/{order_id}/draft", timeout=60, data={
                "csrf_token": token, "draft_id": hidden(doc.text, "draft_id"), "status": "completed",
                "subjective": "Feels better", "pain_before": "5", "pain_after": "3"},
                headers={"X-CSRF-Token": token, "Accept": "application/json"})
            therapist.browser.post(therapist.landing + f"sessions/{order_id}/message", timeout=60, data={
                "csrf_token": token, "message_id": secrets.token_hex(16), "category": "progress",
                "text": "Session went well."})
        pages["plan (therapist)"] = therapist.browser.get(therapist.landing + "plan/", timeout=60)

        # A token refresh in the middle of a launch (the stored access token is due): the next page refreshes.
        from smart_app.launch import NS_TOKENS

        rec = app.store.get(NS_TOKENS, physician.lsid)
        assert rec and rec.get("refresh_token"), "the launch got no refresh token (online_access)"
        app.store.put(NS_TOKENS, physician.lsid, {**rec, "expires_at": time.time() - 5}, 3600)
        pages["plan after refresh"] = physician.browser.get(physician.landing + "plan/", timeout=60)
        after = app.store.get(NS_TOKENS, physician.lsid)
        assert after["access_token"] != rec["access_token"], "no refresh happened"

        services = requests.get(f"{app.url}/cds-services", timeout=30).json()["services"]
        yield World(a, b, rec_a, rec_b, app, physician, therapist, draft_id, order_id, services[0]["id"], pages)
    finally:
        if app is not None:
            app.stop()
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------------------------------------------
# Routes from the url_map


def _routes_at_collection() -> list[tuple[str, str, frozenset[str]]]:
    """(endpoint, rule, methods) of the app as create_app builds it, so each route is its own test id; the world's
    app is built by the same create_app, and a route missing there fails the test by name."""
    from smart_app import create_app

    app = create_app({"SECRET_KEY": "collect", "REGISTRATIONS": [], "STORE_URL": "sqlite:///:memory:"})
    return sorted((r.endpoint, r.rule, frozenset(r.methods or ())) for r in app.url_map.iter_rules()
                  if r.endpoint != "static")


ROUTES = _routes_at_collection()
_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}

# Failures found by this sweep in areas whose owners are still at work: strict xfails, removed when fixed.
# (check, endpoint) -> reason. Never add a finished area here: fix it instead.
KNOWN_ISSUES: dict[tuple[str, str], str] = {}


def route_params(check: str, want: Any) -> list[Any]:
    out = []
    for endpoint, rule, methods in ROUTES:
        if not want(rule, methods):
            continue
        reason = KNOWN_ISSUES.get((check, endpoint))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(endpoint, rule, id=endpoint, marks=marks))
    return out


def world_rule(world: World, endpoint: str, rule: str) -> Any:
    for r in rules(world):
        if r.endpoint == endpoint and r.rule == rule:
            return r
    pytest.fail(f"{endpoint} {rule} is not a route of the running app")


def rules(world: World) -> list[Any]:
    return [r for r in world.app.app.url_map.iter_rules() if r.endpoint != "static"]


def blueprint_of(rule: Any) -> str:
    return rule.endpoint.split(".", 1)[0] if "." in rule.endpoint else ""


def launch_for(world: World, rule: Any) -> Launch:
    # sessions are the therapist's; every other launch area is tried as the physician
    return world.therapist if blueprint_of(rule) == "sessions" else world.physician


def samples(world: World) -> dict[str, str]:
    return {"draft_id": world.draft_id, "order_id": world.order_id, "service_id": world.service_id}


def build(world: World, rule: Any, launch: Launch | None = None, **override: str) -> str:
    values = dict(samples(world))
    launch = launch or launch_for(world, rule)
    values["lsid"] = launch.lsid
    values.update(override)
    missing = [a for a in rule.arguments if a not in values]
    if missing:
        pytest.fail(f"route {rule.rule} has path arguments this sweep has no sample for: {missing}; add one in "
                    "samples() so the route is covered")
    path = rule.rule
    for arg in rule.arguments:
        path = re.sub(rf"<(?:[a-z]+:)?{arg}>", quote(str(values[arg]), safe=""), path)
    return world.app.url + path


def unsafe_methods(rule: Any) -> list[str]:
    return sorted((rule.methods or set()) & {"POST", "PUT", "PATCH", "DELETE"})


def is_exempt_path(rule: Any) -> bool:
    return rule.rule.startswith(CSRF_EXEMPT_PREFIXES)


# every form field any page of the app has (a request that carries them would go through if CSRF were missing)
PLAUSIBLE = {
    "draft_id": None, "message_id": None, "technique": "swedish", "site": LOWER_BACK, "frequency": "1",
    "duration_weeks": "2", "session_minutes": "45", "reason_text": "pain", "pressure": "light", "status": "completed",
    "text": "hello", "category": "progress", "action": "hold", "reason": "patient request", "plan": "x",
    "mitigation": "ok", "subjective": "s", "pain_before": "4", "pain_after": "2", "role": "physician",
    "next": "//evil.example/p/x/",
}


def plausible_form(world: World, rule: Any) -> dict[str, str]:
    data = {k: v for k, v in PLAUSIBLE.items() if v is not None}
    data["draft_id"] = world.draft_id if blueprint_of(rule) == "orders" else secrets.token_hex(16)
    data["message_id"] = secrets.token_hex(16)
    return data


def friendly(resp: requests.Response) -> str | None:
    """Why the body is not a friendly error (None when it is)."""
    body = resp.text
    for marker in TRACEBACK_MARKERS:
        if marker in body:
            return f"the body shows internals ({marker!r})"
    ctype = resp.headers.get("Content-Type", "")
    if "json" in ctype:
        try:
            doc = resp.json()
        except ValueError:
            return "a JSON content type with a body that is not JSON"
        if not isinstance(doc, dict) or not (doc.get("message") or doc.get("error_description") or doc.get("issue")):
            return f"JSON without a message: {body[:200]}"
        return None
    if "html" in ctype:
        if not re.search(r"<h1[^>]*>\s*\S", body):
            return "an HTML error page without a heading"
        return None
    return f"neither HTML nor JSON ({ctype!r}): {body[:200]}"


# ---------------------------------------------------------------------------------------------------------------
# 1. CSRF


def test_only_cds_services_are_csrf_exempt(world):
    """A new csrf_exempt view (or blueprint) must be a deliberate, reviewed exemption: it fails here first."""
    from smart_app import security

    app = world.app.app
    attr = security._EXEMPT_ATTR
    exempt = []
    for rule in rules(world):
        view = app.view_functions[rule.endpoint]
        bp = app.blueprints.get(blueprint_of(rule))
        if (getattr(view, attr, False) or (bp is not None and getattr(bp, attr, False))) and unsafe_methods(rule):
            exempt.append(rule.rule)
    assert exempt and all(r.startswith(CSRF_EXEMPT_PREFIXES) for r in exempt), exempt


def test_callback_and_launch_are_get_only(world):
    for rule in rules(world):
        if rule.rule in ("/callback", "/launch"):
            assert not unsafe_methods(rule), f"{rule.rule} accepts {unsafe_methods(rule)}: it would need CSRF"


def is_csrf_refusal(r: requests.Response) -> bool:
    """The answer is the app's CSRF refusal (errors.py shows the machine code on the page and in JSON)."""
    if "json" in r.headers.get("Content-Type", ""):
        return r.json().get("error") == "csrf"
    return "<code>csrf</code>" in r.text


def test_the_sweep_sees_the_state_changing_routes():
    """The parametrized sweeps below are only as good as the route table: it must hold every area's forms."""
    unsafe = {e for e, _r, m in ROUTES if m & _UNSAFE}
    assert {"launch.role", "orders.sign", "orders.screen_json"} <= unsafe, unsafe
    assert any(e.startswith("sessions.") for e in unsafe) and any(e.startswith("plan.") for e in unsafe), unsafe


@pytest.mark.parametrize("endpoint, rule_text", route_params(
    "csrf", lambda rule, methods: bool(methods & _UNSAFE) and not rule.startswith(CSRF_EXEMPT_PREFIXES)))
def test_state_changing_route_refuses_a_missing_or_wrong_csrf_token(world, endpoint, rule_text):
    from flask import g

    from smart_app.security import cookie_name, csrf_token

    app = world.app.app
    rule = world_rule(world, endpoint, rule_text)
    problems = []
    data_before = versions(world.a), versions(world.b)
    for method in unsafe_methods(rule):
        launch = launch_for(world, rule)
        url = build(world, rule, launch)
        form = plausible_form(world, rule)
        with app.test_request_context():
            g.fm_browser_id = secrets.token_urlsafe(32)  # another browser: a token valid for IT, not for this one
            other_token = csrf_token()
        assert launch.browser.cookies.get(cookie_name(app)), "the launch browser has no app cookie"
        variants = {
            "no cookie, no token": (requests.Session(), {}, {}),
            "cookie, no token": (launch.browser, {}, {}),
            "cookie, wrong token": (launch.browser, {"csrf_token": "0" * 64}, {}),
            "cookie, wrong header token": (launch.browser, {}, {"X-CSRF-Token": "f" * 64}),
            "cookie, another browser's token": (launch.browser, {"csrf_token": other_token}, {}),
            "cookie, empty token": (launch.browser, {"csrf_token": ""}, {"X-CSRF-Token": ""}),
            "cookie, token of the right length but truncated": (launch.browser, {"csrf_token": csrf_of(launch)[:-1]},
                                                                {}),
        }
        for name, (session, extra, headers) in variants.items():
            before_a, before_b = world.rec_a.mark(), world.rec_b.mark()
            r = session.request(method, url, data={**form, **extra}, headers=headers, timeout=60,
                                allow_redirects=False)
            if not 400 <= r.status_code < 500:
                problems.append(f"{method} {rule.rule} [{name}]: {r.status_code} (want a 4xx)")
                continue
            why = friendly(r)
            if why:
                problems.append(f"{method} {rule.rule} [{name}]: {r.status_code}, {why}")
            elif not is_csrf_refusal(r):
                # refused, but for another reason (an invalid form): the CSRF check itself did not run
                problems.append(f"{method} {rule.rule} [{name}]: {r.status_code} without the CSRF refusal")
            fhir = world.rec_a.fhir_writes(before_a) + world.rec_b.fhir_writes(before_b)
            if fhir:
                problems.append(f"{method} {rule.rule} [{name}]: reached the EHR: {fhir}")
    if (versions(world.a), versions(world.b)) != data_before:
        problems.append(f"{rule.rule}: the sandbox's data changed during the refused requests")
    # a page of another site cannot get a preflight through to send the X-CSRF-Token header with the cookie
    pre = requests.options(build(world, rule), timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": unsafe_methods(rule)[0],
        "Access-Control-Request-Headers": "x-csrf-token"})
    if pre.headers.get("Access-Control-Allow-Origin") or pre.headers.get("Access-Control-Allow-Credentials"):
        problems.append(f"{rule.rule}: a CORS preflight from another site is allowed")
    # the same request WITH the token gets past the CSRF check (else the refusals above prove nothing)
    launch = launch_for(world, rule)
    r = launch.browser.request(unsafe_methods(rule)[0], build(world, rule, launch), allow_redirects=False,
                               data={**plausible_form(world, rule), "csrf_token": csrf_of(launch)}, timeout=60)
    if r.status_code == 400 and "did not come from this app" in r.text:
        problems.append(f"{rule.rule}: refused even with the right token")
    assert not problems, "\n".join(problems)


def test_csrf_refusal_keeps_the_app_side_drafts(world):
    """A refused autosave must not overwrite the note draft kept on the server (nothing lost, nothing changed)."""
    t = world.therapist
    rule = next((r for r in rules(world) if r.endpoint == "sessions.autosave"), None)
    assert rule is not None, "the app has no sessions.autosave route: this test checks its CSRF refusal"
    page = t.browser.get(t.landing + f"sessions/{world.order_id}", timeout=60)
    assert page.status_code == 200, page.text[:500]
    before = page.text.count("Feels better")
    r = t.browser.post(build(world, rule, t), data={"draft_id": hidden(page.text, "draft_id"),
                                                    "subjective": "OVERWRITTEN-BY-FORGERY"}, timeout=60)
    assert r.status_code == 400
    after = t.browser.get(t.landing + f"sessions/{world.order_id}", timeout=60)
    assert "OVERWRITTEN-BY-FORGERY" not in after.text
    assert after.text.count("Feels better") == before


# ---------------------------------------------------------------------------------------------------------------
# 2. Security headers and cookies on every page


def all_get_urls(world: World) -> list[tuple[str, str, Launch]]:
    out = []
    for rule in rules(world):
        if "GET" not in (rule.methods or ()):
            continue
        for launch in ((world.physician, world.therapist) if "lsid" in rule.arguments else (world.physician,)):
            out.append((rule.rule, build(world, rule, launch), launch))
    return out


TOKENISH = re.compile(r"[A-Za-z0-9_\-.~+/]{16,}")


def header_problems(world: World, what: str, resp: requests.Response) -> list[str]:
    problems = []
    h = resp.headers
    csp = h.get("Content-Security-Policy")
    if not csp:
        return [f"{what}: no Content-Security-Policy"]
    directives = {d.strip().split(" ", 1)[0]: d.strip().split()[1:] for d in csp.split(";") if d.strip()}
    allowed = {"'self'", world.a.url, world.b.url}
    fa = directives.get("frame-ancestors")
    if fa is None:
        problems.append(f"{what}: CSP without frame-ancestors")
    elif not fa or set(fa) - allowed or "*" in fa:
        problems.append(f"{what}: frame-ancestors {fa} (allowed: {sorted(allowed)})")
    scripts = directives.get("script-src", directives.get("default-src", []))
    if "'unsafe-inline'" in scripts or "'unsafe-eval'" in scripts or "*" in scripts:
        problems.append(f"{what}: script-src allows {scripts}")
    if "script-src" not in directives and "default-src" not in directives:
        problems.append(f"{what}: CSP restricts no scripts")
    if "/p/" in urlsplit(resp.url).path and any(k.lower().startswith("access-control-allow") for k in h):
        # a launch page readable cross-origin would hand its CSRF token (and the chart) to any site
        problems.append(f"{what}: CORS headers on a launch page")
    if h.get("X-Content-Type-Options", "").lower() != "nosniff":
        problems.append(f"{what}: X-Content-Type-Options {h.get('X-Content-Type-Options')!r}")
    if h.get("Referrer-Policy", "").lower() not in ("no-referrer", "same-origin", "strict-origin"):
        problems.append(f"{what}: Referrer-Policy {h.get('Referrer-Policy')!r}")
    ctype = h.get("Content-Type", "")
    cacheable = urlsplit(resp.url).path in ("/.well-known/jwks.json",) or "/static/" in resp.url
    if ("html" in ctype or "json" in ctype) and not cacheable and "no-store" not in h.get("Cache-Control", ""):
        problems.append(f"{what}: Cache-Control {h.get('Cache-Control')!r} on a {ctype} page (want no-store)")
    for raw in resp.raw.headers.getlist("Set-Cookie") if resp.raw is not None else []:
        low = raw.lower()
        if "httponly" not in low:
            problems.append(f"{what}: cookie without HttpOnly: {raw.split('=')[0]}")
        if "samesite=" not in low:
            problems.append(f"{what}: cookie without SameSite: {raw.split('=')[0]}")
        value = raw.split(";", 1)[0].split("=", 1)[1] if "=" in raw.split(";", 1)[0] else ""
        for s in world.rec_a.secrets | world.rec_b.secrets:
            if s and s in raw:
                problems.append(f"{what}: a token or secret in Set-Cookie {raw.split('=')[0]}")
        if "." in value and value.count(".") == 2 and len(value) > 60:
            problems.append(f"{what}: a JWT-like cookie value in {raw.split('=')[0]}")
    return problems


def test_every_page_of_the_flow_sends_the_security_headers(world):
    problems = []
    for name, resp in world.pages.items():
        problems += header_problems(world, name, resp)
        for hop in resp.history:
            problems += header_problems(world, f"{name} (redirect {hop.url})", hop)
    assert not problems, "\n".join(problems)


def test_every_get_route_sends_the_security_headers(world):
    problems = []
    for rule, url, launch in all_get_urls(world):
        r = launch.browser.get(url, timeout=60, allow_redirects=False)
        problems += header_problems(world, f"GET {rule} as {launch.user} ({r.status_code})", r)
    # error pages too: unknown page, launch of an unknown EHR, a launch URL of no session, a bad state
    for what, url in (("404", "/no/such/page"), ("unknown iss", "/launch?iss=https://evil.example/fhir&launch=x"),
                      ("no session", "/p/" + "x" * 30 + "/"), ("bad state", "/callback?state=nope&code=x"),
                      ("no iss", "/launch"), ("method not allowed", "/healthz")):
        method = "POST" if what == "method not allowed" else "GET"
        problems += header_problems(world, f"error page {what}",
                                    requests.request(method, world.app.url + url, timeout=30))
    # static files: no CSP needed for the policy to hold, but nosniff is (a script served as the wrong type)
    from pathlib import Path

    import smart_app

    for f in sorted((Path(smart_app.__file__).parent / "static").glob("*.*")):
        r = requests.get(f"{world.app.url}/static/{f.name}", timeout=30)
        if r.headers.get("X-Content-Type-Options", "").lower() != "nosniff":
            problems.append(f"static {f.name}: no nosniff")
    assert not problems, "\n".join(problems)


def test_no_get_route_writes_to_the_ehr(world):
    """A GET can be triggered cross-site (links, images, SameSite=Lax top-level navigations) and carries no CSRF
    token, so no GET may change the chart."""
    problems = []
    data_before = versions(world.a)
    for rule, url, launch in all_get_urls(world):
        before = world.rec_a.mark()
        launch.browser.get(url, timeout=60)
        written = world.rec_a.fhir_writes(before)
        if written:
            problems.append(f"GET {rule} as {launch.user}: {[(s.method, s.path) for s in written]}")
    if versions(world.a) != data_before:
        problems.append("the sandbox's data changed while only GET requests were made")
    assert not problems, "\n".join(problems)
    # the recorder does see writes (else this proves nothing): the flow signed an order through a transaction
    assert any(s.writes for s in world.rec_a.seen)


def test_no_token_or_secret_is_ever_sent_to_the_browser(world):
    secrets_seen = {s for s in world.rec_a.secrets | world.rec_b.secrets if s and len(s) >= 8}
    assert secrets_seen
    problems = []
    for name, r in world.pages.items():
        for hop in [*r.history, r]:
            blob = hop.text + " ".join(f"{k}: {v}" for k, v in hop.headers.items())
            for s in secrets_seen:
                if s in blob and not (hop.status_code in (302, 303) and "code=" in hop.headers.get("Location", "")
                                      and "/callback?" in hop.headers.get("Location", "")):
                    problems.append(f"{name} ({hop.url}): carries a token or secret …{s[-6:]}")
    assert not problems, "\n".join(problems)


def test_the_browser_cookie_is_an_opaque_id(world):
    jar = world.physician.browser.cookies
    names = [c.name for c in jar]
    assert names, "the launch set no cookie"
    for c in jar:
        assert c.value not in world.rec_a.secrets, c.name
        assert c.has_nonstandard_attr("HttpOnly") or c._rest.get("HttpOnly") is not None, c.name  # noqa: SLF001
        assert len(c.value) <= 64, f"cookie {c.name} is {len(c.value)} characters: more than an id"


# ---------------------------------------------------------------------------------------------------------------
# 3. Never a 500 (or a traceback) for a user's mistake


HUGE = "Ω" + "x" * 60_000
GARBAGE_FORMS = {
    "empty form": {},
    "one field beyond the form memory limit": "beyond",
    "too many fields": "many",
    "huge strings": "huge",
    "wrong types": "types",
    "control characters": "controls",
}


def garbage(form: dict[str, str], kind: str) -> list[tuple[str, str]]:
    if kind == "beyond":
        return [(k, "y" * 700_000 if k in ("text", "reason_text", "subjective") else v) for k, v in form.items()]
    if kind == "many":
        return list(form.items()) + [(f"f{i}", "z") for i in range(3000)]
    if kind == "huge":
        return [(k, HUGE) for k in form] + [("csrf_token", "")]
    if kind == "types":
        out = []
        for k in form:
            out += [(k, v) for v in ("-1", "1e309", "NaN", "[]", "{}", "true", "null", "0x10", "９", "")]
        return out
    if kind == "controls":
        return [(k, "\x00\x01\u202e\ud7ff<>\"'&%00\r\n") for k in form]
    return []


def _post(launch: Launch, url: str, items: list[tuple[str, str]], token: str, *, json_accept: bool = False
          ) -> requests.Response:
    items = [(k, v) for k, v in items if k != "csrf_token"] + [("csrf_token", token)]
    headers = {"Accept": "application/json"} if json_accept else {}
    return launch.browser.post(url, data=items, headers=headers, timeout=60, allow_redirects=False)


def user_mistake_problems(what: str, r: requests.Response) -> list[str]:
    if r.status_code in (301, 302, 303, 307, 308):
        loc = r.headers.get("Location", "")
        if loc.startswith(("//", "/\\")) or (urlsplit(loc).netloc and urlsplit(loc).netloc != urlsplit(r.url).netloc):
            return [f"{what}: redirect off the app to {loc}"]
    if not 400 <= r.status_code < 500 and r.status_code not in (200, 303):
        return [f"{what}: {r.status_code} {r.text[:300]!r}"]
    for marker in TRACEBACK_MARKERS:
        if marker in r.text:
            return [f"{what}: {r.status_code}, the body shows {marker!r}"]
    if r.status_code >= 400:
        why = friendly(r)
        if why:
            return [f"{what}: {r.status_code}, {why}"]
    return []


@pytest.mark.parametrize("endpoint, rule_text", route_params(
    "garbage", lambda rule, methods: bool(methods & _UNSAFE) and not rule.startswith(CSRF_EXEMPT_PREFIXES)))
def test_garbage_forms_are_a_4xx_with_words(world, endpoint, rule_text):
    rule = world_rule(world, endpoint, rule_text)
    problems = []
    launch = launch_for(world, rule)
    token = csrf_of(launch)
    url = build(world, rule, launch)
    form = plausible_form(world, rule)
    for kind, spec in GARBAGE_FORMS.items():
        items = [] if spec == {} else garbage(form, spec)
        for method in unsafe_methods(rule):
            r = _post(launch, url, items, token) if method == "POST" else launch.browser.request(
                method, url, data=items + [("csrf_token", token)], timeout=60, allow_redirects=False)
            problems += user_mistake_problems(f"{method} {rule.rule} [{kind}]", r)
    # a JSON body where a form is expected
    r = launch.browser.post(url, data=json.dumps({"draft_id": [1, 2], "x": {"y": None}}), timeout=60,
                            headers={"Content-Type": "application/json", "X-CSRF-Token": token},
                            allow_redirects=False)
    problems += user_mistake_problems(f"POST {rule.rule} [JSON body]", r)
    # ids that exist nowhere, in the path ...
    for arg_value in ("does-not-exist", "a" * 300, "..%2F..%2Fmetadata", "Patient/x", "%00", " "):
        bad = {a: arg_value for a in rule.arguments if a != "lsid"}
        if bad:
            r = _post(launch, build(world, rule, launch, **bad), list(form.items()), token)
            problems += user_mistake_problems(f"POST {rule.rule} [path id {arg_value[:20]!r}]", r)
    # ... and in the form
    bad_form = {**form, "draft_id": "does-not-exist", "in_response_to": "Communication/nope",
                "issue": "DetectedIssue/nope", "version": "W/\"1\"", "plan": "nope", "rule": "nope"}
    problems += user_mistake_problems(f"POST {rule.rule} [unknown ids in the form]",
                                      _post(launch, url, list(bad_form.items()), token))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("endpoint, rule_text", route_params(
    "unknown-ids", lambda rule, methods: "GET" in methods and bool(re.search(r"<(?!lsid>)[^>]+>", rule))))
def test_unknown_ids_in_a_get_route_are_a_4xx_with_words(world, endpoint, rule_text):
    rule = world_rule(world, endpoint, rule_text)
    problems = []
    args = [a for a in rule.arguments if a != "lsid"]
    launch = launch_for(world, rule)
    for value in ("does-not-exist", "b" * 300, "x.y..z", "%2e%2e", "<script>", "Patient/1"):
        r = launch.browser.get(build(world, rule, launch, **{a: value for a in args}), timeout=60,
                               allow_redirects=False)
        problems += user_mistake_problems(f"GET {rule.rule} [{value[:20]!r}]", r)
        if r.status_code == 200:
            problems.append(f"GET {rule.rule} [{value[:20]!r}]: 200 for an id that does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("endpoint, rule_text", route_params("odd-query", lambda rule, methods: "GET" in methods))
def test_odd_query_strings_are_never_a_500_or_an_open_redirect(world, endpoint, rule_text):
    rule = world_rule(world, endpoint, rule_text)
    problems = []
    odd = {"next": "//evil.example/", "recorded": HUGE[:5000], "done": "<script>", "sent": "\x00", "page": "-1",
           "iss": "x", "launch": "", "state": "s" * 5000, "code": "c", "error": "x" * 500, "saved": "[]"}
    launches = (world.physician, world.therapist) if "lsid" in rule.arguments else (world.physician,)
    for launch in launches:
        for params in (odd, {"next": "https://evil.example/p/x/"}, {"next": "/\\evil.example"}):
            r = launch.browser.get(build(world, rule, launch), params=params, timeout=60, allow_redirects=False)
            problems += user_mistake_problems(f"GET {rule.rule} as {launch.user} with odd query", r)
            if r.status_code in (301, 302, 303, 307, 308):
                loc = r.headers.get("Location", "")
                target = urlsplit(loc)
                ours = {urlsplit(u).netloc for u in (world.app.url, world.a.url, world.b.url)}
                if (target.netloc and target.netloc not in ours) or loc.startswith(("//", "/\\")):
                    problems.append(f"GET {rule.rule}: open redirect to {loc}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def ended(world) -> Launch:
    """A launch whose session the app no longer has (expired, purged)."""
    from smart_app.launch import NS_SESSION

    launch = world.launch(PHYSICIAN)
    world.app.store.delete(NS_SESSION, launch.lsid)
    return launch


@pytest.mark.parametrize("endpoint, rule_text", route_params("other-browser", lambda rule, methods: "<lsid>" in rule))
def test_a_launch_page_of_another_browser_or_an_ended_session_opens_nothing(world, ended, endpoint, rule_text):
    """A copied launch URL opens nothing in another browser; an expired session is a 'relaunch' page, not a 500."""
    rule = world_rule(world, endpoint, rule_text)
    stranger = requests.Session()
    problems = []
    launch = launch_for(world, rule)
    for method in ["GET"] * ("GET" in (rule.methods or ())) + unsafe_methods(rule)[:1]:
        for who, session, lsid in (("another browser", stranger, launch.lsid),
                                   ("expired session", ended.browser, ended.lsid),
                                   ("made-up session", launch.browser, secrets.token_urlsafe(24)),
                                   ("malformed session id", launch.browser, "../" + "z" * 10)):
            data = None
            if method != "GET" and session is not stranger:
                data = {**plausible_form(world, rule), "csrf_token": _token_for(world, session)}
            r = session.request(method, build(world, rule, launch, lsid=lsid), data=data, timeout=60,
                                allow_redirects=False)
            what = f"{method} {rule.rule} [{who}]"
            if r.status_code not in (400, 401, 403, 404, 410):
                problems.append(f"{what}: {r.status_code} (want 401/403)")
                continue
            why = friendly(r)
            if why:
                problems.append(f"{what}: {why}")
            if FEIL_NAME[1] in r.text or FEIL_BIRTH in r.text:
                problems.append(f"{what}: the page shows the patient")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def revoked(world) -> dict[str, Launch]:
    """Launches whose EHR access ended: the token is due and its refresh token is refused (revoked at the EHR), or
    the app's token record is gone. One per role, as the sessions area is the therapist's."""
    from smart_app.launch import NS_TOKENS

    out = {}
    for user in (PHYSICIAN, THERAPIST):
        launch = world.launch(user)
        rec = world.app.store.get(NS_TOKENS, launch.lsid)
        world.app.store.put(NS_TOKENS, launch.lsid, {**rec, "expires_at": time.time() - 10,
                                                     "refresh_token": "revoked-" + secrets.token_hex(8)}, 3600)
        out[user] = launch
        gone = world.launch(user)
        world.app.store.delete(NS_TOKENS, gone.lsid)
        out[user + "-gone"] = gone
    return out


@pytest.mark.parametrize("endpoint, rule_text", route_params("ehr-access-ended", lambda rule, methods: "<lsid>" in rule))
def test_a_launch_whose_ehr_access_ended_asks_for_a_relaunch(world, revoked, endpoint, rule_text):
    rule = world_rule(world, endpoint, rule_text)
    problems = []
    user = THERAPIST if blueprint_of(rule) == "sessions" else PHYSICIAN
    for key in (user, user + "-gone"):
        launch = revoked[key]
        token = _token_for(world, launch.browser)
        for method in ["GET"] * ("GET" in (rule.methods or ())) + unsafe_methods(rule)[:1]:
            data = {**plausible_form(world, rule), "csrf_token": token} if method != "GET" else None
            r = launch.browser.request(method, build(world, rule, launch), data=data, timeout=60,
                                       allow_redirects=False)
            problems += user_mistake_problems(f"{method} {rule.rule} [{key}]", r)
            relaunch = re.search(r"(?i)again from (the|your) EHR|from the EHR again|open fhir-massage again", r.text)
            if r.status_code == 401 and not relaunch and "json" not in r.headers.get("Content-Type", ""):
                problems.append(f"{method} {rule.rule} [{key}]: a 401 page that does not say how to go on")
    assert not problems, "\n".join(problems)


def _token_for(world: World, session: requests.Session) -> str:
    """The CSRF token the app would give this browser (its cookie is all it has left)."""
    from flask import g

    from smart_app.security import cookie_name, csrf_token

    app = world.app.app
    with app.test_request_context():
        g.fm_browser_id = session.cookies.get(cookie_name(app))
        return csrf_token()


# -- hypothesis: the order form and the live re-screen ----------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_launch(world) -> tuple[Launch, str, str]:
    launch = world.launch(PHYSICIAN, SUZI)
    r = launch.browser.get(launch.landing + "orders/", timeout=60)
    assert r.status_code == 200, r.text[:500]
    return launch, hidden(r.text, "csrf_token"), hidden(r.text, "draft_id")


FIELD_NAMES = ("technique", "site", "reason_ref", "reason_text", "frequency", "duration_weeks", "session_minutes",
               "pressure", "pressure_note", "positioning", "notes", f"side-{LOWER_BACK}", "side-30021000",
               "override-dvt-acute", "override-note-dvt-acute", "ack-x", "draft_id")
values = st.one_of(
    st.text(max_size=40), st.text(max_size=3000).map(lambda s: s * 3),
    st.sampled_from(["swedish", "deep-tissue", "mld", "light", "firm", "left", "right", "bilateral", LOWER_BACK,
                     "30021000", "0", "-5", "99999999999999999999", "1.5", "Condition/x", "Condition/../Patient/1",
                     "", " ", "yes"]),
    st.integers(-10**12, 10**12).map(str),
)
fuzz_form = st.lists(st.tuples(st.sampled_from(FIELD_NAMES), values), max_size=25)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=fuzz_form)
def test_fuzz_live_rescreen(fuzz_launch, items):
    launch, token, draft_id = fuzz_launch
    if not any(k == "draft_id" for k, _ in items):
        items = items + [("draft_id", draft_id)]
    r = launch.browser.post(launch.landing + "orders/screen", data=items + [("csrf_token", token)],
                            headers={"X-CSRF-Token": token, "Accept": "application/json"}, timeout=60)
    assert r.status_code < 500, r.text[:500]
    assert not user_mistake_problems("POST /orders/screen", r), r.text[:500]
    if r.status_code == 200:
        doc = r.json()
        assert doc["verdict"] in ("clear", "caution", "contraindicated")
        for bad in RAW_MARKUP:
            assert bad not in doc["html"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=fuzz_form)
def test_fuzz_order_sign(fuzz_launch, items):
    launch, token, draft_id = fuzz_launch
    if not any(k == "draft_id" for k, _ in items):
        items = items + [("draft_id", draft_id)]
    r = launch.browser.post(launch.landing + "orders/sign", data=items + [("csrf_token", token)], timeout=60,
                            allow_redirects=False)
    assert not user_mistake_problems("POST /orders/sign", r), r.text[:800]
    if r.status_code == 422:
        assert 'role="alert"' in r.text or "problem" in r.text.lower()


def cds_jwt(world: World, service_id: str) -> str:
    now = int(time.time())
    claims = {"iss": CDS_ISS, "aud": f"{world.app.url}/cds-services/{service_id}", "exp": now + 120, "iat": now,
              "jti": secrets.token_urlsafe(16)}
    return jwt.encode({"alg": "ES384", "kid": CDS_KEY.kid, "typ": "JWT"}, claims, CDS_KEY, algorithms=["ES384"])


def _massage_draft() -> dict[str, Any]:
    from fhir_massage.codes import TECHNIQUE_SYSTEM

    return {"resourceType": "ServiceRequest", "id": "draft-1", "status": "draft", "intent": "order",
            "subject": {"reference": f"Patient/{FEIL}"},
            "code": {"coding": [{"system": TECHNIQUE_SYSTEM, "code": "swedish"}]},
            "bodySite": [{"coding": [{"system": "http://snomed.info/sct", "code": LOWER_BACK}]}]}


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=15)


def _or_junk(value: Any) -> Any:
    # mostly the valid value, so the fuzz gets past the first check and into the deeper ones
    return st.one_of(st.just(value), st.just(value), st.just(value), json_junk)


@st.composite
def hook_bodies(draw: Any, fhir_base: str, access_token: str, service: Mapping[str, Any]) -> dict[str, Any]:
    entry = draw(st.fixed_dictionaries({"resource": _or_junk(_massage_draft())},
                                       optional={"fullUrl": _or_junk("urn:uuid:1")}))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": draw(_or_junk([entry]))}
    context = draw(st.fixed_dictionaries({
        "patientId": _or_junk(FEIL), "userId": _or_junk(f"Practitioner/{PHYSICIAN}"),
        "draftOrders": _or_junk(bundle), "selections": _or_junk(["ServiceRequest/draft-1"]),
    }, optional={"encounterId": json_junk}))
    auth = {"access_token": access_token, "token_type": "Bearer", "expires_in": 300, "subject": "cds",
            "scope": "patient/Condition.rs patient/Observation.rs patient/Patient.rs"}
    return draw(st.fixed_dictionaries({
        "hook": _or_junk(service["hook"]), "hookInstance": _or_junk(str(uuid.uuid4())),
        "context": _or_junk(context),
        "fhirServer": st.one_of(st.just(fhir_base), st.just(fhir_base), st.just("https://evil.example/fhir"),
                                json_junk),
        "fhirAuthorization": st.one_of(st.just(auth), st.just(auth), json_junk),
    }, optional={"prefetch": st.dictionaries(st.sampled_from(["patient", "conditions", "meds", "x"]), json_junk,
                                             max_size=3)}))


@pytest.fixture(scope="module")
def cds_access(world) -> str:
    from tests.fixtures.smart_sandbox import get_token

    return get_token(world.a, "test-public", PHYSICIAN, FEIL, scopes="launch openid fhirUser patient/*.rs")[
        "access_token"]


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, 9))
def test_fuzz_cds_hook_bodies_from_an_authenticated_ehr(world, cds_access, data, which):
    """The EHR is authenticated (a valid JWT of a registered CDS client), its JSON is anything: a 4xx with a
    message or cards, never a 5xx; a fhirServer that is not the EHR's own never gets a request."""
    services = requests.get(f"{world.app.url}/cds-services", timeout=30).json()["services"]
    service = services[which % len(services)]
    body = data.draw(hook_bodies(world.a.fhir_base, cds_access, service))
    before_b = world.rec_b.mark()
    r = requests.post(f"{world.app.url}/cds-services/{service['id']}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {cds_jwt(world, service['id'])}"})
    assert r.status_code < 500, (r.status_code, r.text[:500])
    doc = r.json()
    assert "cards" in doc if r.status_code == 200 else doc.get("message"), doc
    assert r.status_code != 401, doc  # the JWT is valid: a refusal here would mean the fuzz tests nothing
    assert not world.rec_b.seen[before_b:], "the CDS service contacted EHR B"
    CDS_OUTCOMES.append(len(doc["cards"]) if r.status_code == 200 else -r.status_code)


CDS_OUTCOMES: list[int] = []  # cards per answer (negative: the refusal's status)


def test_the_cds_fuzz_reached_the_screen():
    """Runs after the fuzz (file order): some bodies got cards, so the fuzz went past the request checks."""
    if not CDS_OUTCOMES:
        pytest.skip("the CDS fuzz did not run in this session (deselected)")
    assert sum(n > 0 for n in CDS_OUTCOMES) >= 3, sorted(CDS_OUTCOMES)


@pytest.fixture(scope="module")
def cds_cards(world, cds_access) -> tuple[str, list[str]]:
    """(service id, card uuids) from a real order-sign call for the DVT patient."""
    service = next(s for s in requests.get(f"{world.app.url}/cds-services", timeout=30).json()["services"]
                   if s["hook"] == "order-sign")
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "fhirServer": world.a.fhir_base,
            "fhirAuthorization": {"access_token": cds_access, "token_type": "Bearer", "expires_in": 300,
                                  "scope": "patient/*.rs", "subject": "cds"},
            "context": {"patientId": FEIL, "userId": f"Practitioner/{PHYSICIAN}", "draftOrders": {
                "resourceType": "Bundle", "type": "collection", "entry": [{"resource": _massage_draft()}]}}}
    r = requests.post(f"{world.app.url}/cds-services/{service['id']}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {cds_jwt(world, service['id'])}"})
    assert r.status_code == 200, r.text[:500]
    uuids = [c["uuid"] for c in r.json()["cards"] if c.get("uuid")]
    assert uuids, r.text[:500]
    return service["id"], uuids


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_cds_feedback_from_an_authenticated_ehr(world, cds_access, cds_cards, data):
    service, uuids = cds_cards
    auth = {"access_token": cds_access, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.rs",
            "subject": "cds"}
    item = data.draw(st.fixed_dictionaries({
        "card": _or_junk(uuids[0]), "outcome": _or_junk("overridden") | st.just("accepted"),
        "outcomeTimestamp": _or_junk("2026-11-28T06:00:00Z"),
    }, optional={"overrideReason": _or_junk({"reason": {"code": "x", "system": "y"}, "userComment": "because"}),
                 "acceptedSuggestions": _or_junk([{"id": "nope"}])}))
    body = data.draw(st.fixed_dictionaries({"feedback": _or_junk([item])}, optional={
        "fhirServer": st.just(world.a.fhir_base) | json_junk, "fhirAuthorization": st.just(auth) | json_junk}))
    before_b = world.rec_b.mark()
    r = requests.post(f"{world.app.url}/cds-services/{service}/feedback", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {cds_jwt(world, service + '/feedback')}"})
    assert r.status_code < 500, (r.status_code, r.text[:500])
    doc = r.json()
    assert "feedback" in doc if r.status_code == 200 else doc.get("message"), doc
    assert r.status_code != 401, doc
    assert not world.rec_b.seen[before_b:]


def test_cds_hooks_refuse_unauthenticated_garbage_in_words(world):
    problems = []
    for service in [s["id"] for s in requests.get(f"{world.app.url}/cds-services", timeout=30).json()["services"]]:
        for headers, data in (({}, "{}"), ({"Authorization": "Bearer x.y.z"}, "not json"),
                              ({"Authorization": "Basic Zm9vOmJhcg=="}, json.dumps({"hook": "order-sign"})),
                              ({"Authorization": "Bearer " + "a" * 10_000}, "[]")):
            r = requests.post(f"{world.app.url}/cds-services/{service}", data=data, timeout=30,
                              headers={"Content-Type": "application/json", **headers})
            if r.status_code != 401 or not r.json().get("message") or "Traceback" in r.text:
                problems.append(f"{service} {headers.get('Authorization', '')[:20]}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)


# -- a mistake the browser cannot catch loses nothing that was typed --------------------------------------------


def _form_of(html: str, testid_or_action: str) -> tuple[str, list[tuple[str, str]]]:
    """(action URL, hidden fields) of the first form whose data-testid or action matches."""
    for m in re.finditer(r"<form\b([^>]*)>(.*?)</form>", html, re.S):
        attrs, body = m.group(1), m.group(2)
        if testid_or_action in attrs:
            action = unescape(re.search(r'action="([^"]+)"', attrs).group(1))
            fields = [(unescape(n), unescape(v)) for n, v in
                      re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body)]
            return action, fields
    raise AssertionError(f"no form {testid_or_action}")


def _follow(launch: Launch, r: requests.Response) -> requests.Response:
    return launch.browser.get(world_url(r), timeout=60) if r.status_code in (302, 303) else r


def world_url(r: requests.Response) -> str:
    from urllib.parse import urljoin

    return urljoin(r.url, r.headers["Location"])


def test_an_order_mistake_keeps_what_was_typed(world):
    launch = world.launch(PHYSICIAN)
    page = launch.browser.get(launch.landing + "orders/", timeout=60)
    marker = "typed-" + secrets.token_hex(6)
    r = launch.browser.post(launch.landing + "orders/sign", timeout=60, allow_redirects=False, data={
        "csrf_token": hidden(page.text, "csrf_token"), "draft_id": hidden(page.text, "draft_id"),
        "technique": "swedish", "site": LOWER_BACK, "frequency": "", "duration_weeks": "2", "session_minutes": "45",
        "reason_text": "Chronic pain", "notes": marker})
    assert 400 <= r.status_code < 500, r.status_code
    assert marker in _follow(launch, r).text, "the order form came back without what the physician typed"


def test_a_session_note_mistake_keeps_what_was_typed(world):
    t = world.launch(THERAPIST)
    page = t.browser.get(t.landing + f"sessions/{world.order_id}", timeout=60)
    assert page.status_code == 200, page.text[:300]
    marker = "typed-" + secrets.token_hex(6)
    r = t.browser.post(t.landing + f"sessions/{world.order_id}", timeout=60, allow_redirects=False, data={
        "csrf_token": hidden(page.text, "csrf_token"), "draft_id": hidden(page.text, "draft_id"),
        "status": "completed", "date": date.today().isoformat(), "tz": "0", "start": "10:00", "end": "09:00",
        "technique": "swedish", "sites": LOWER_BACK, "pressure": "light", "subjective": marker,
        "pain_before": "4", "pain_after": "3", "action": "submit"})
    assert r.status_code < 500, r.status_code
    assert marker in _follow(t, r).text, "the note came back without what the therapist typed"


def test_a_plan_change_mistake_keeps_what_was_typed(world):
    """Unticking every body site is a mistake the browser lets through (a checkbox group has no 'required')."""
    launch = world.launch(PHYSICIAN)
    page = launch.browser.get(launch.landing + "plan/", timeout=60)
    action, fields = _form_of(page.text, 'data-testid="modify-form"')
    marker = "typed-" + secrets.token_hex(6)
    before = world.rec_a.mark()
    r = launch.browser.post(urlsplit(launch.landing)._replace(path=action).geturl(), timeout=60,
                            allow_redirects=False, data=fields + [
                                ("frequency", "2"), ("weeks", "3"), ("minutes", "50"), ("reason", marker)])
    assert 400 <= r.status_code < 500, r.status_code
    assert not world.rec_a.fhir_writes(before)
    assert marker in _follow(launch, r).text, "the plan change came back without the reason the physician typed"


# ---------------------------------------------------------------------------------------------------------------
# 4. Text from the EHR is escaped


def test_markup_from_the_ehr_is_shown_as_text(world):
    reached = {n: r for n, r in world.pages.items() if r.status_code in (200, 422)}
    # the hostile text must actually be on these pages (else the check proves nothing)
    for name in ("landing (physician)", "order form", "order form (blocked)", "session note", "plan (physician)"):
        assert name in reached, f"the flow did not reach {name}: {world.pages[name].status_code}"
        page = reached[name].text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page or "&lt;script&gt;alert(1)" in page, \
            f"{name}: the hostile text is not on the page at all (escaped), so escaping is not tested there"
    problems = [f"{name}: raw {bad!r} in the HTML" for name, r in world.pages.items() for bad in RAW_MARKUP
                if bad in r.text]
    assert not problems, "\n".join(problems)


def test_the_live_rescreen_html_escapes_the_ehr_text(world):
    """orders.js puts the /screen answer's html into the page with innerHTML: it must arrive escaped."""
    launch = world.launch(PHYSICIAN)
    page = launch.browser.get(launch.landing + "orders/", timeout=60)
    assert page.status_code == 200, page.text[:500]
    token = hidden(page.text, "csrf_token")
    r = launch.browser.post(launch.landing + "orders/screen", timeout=60, headers={"X-CSRF-Token": token}, data={
        "csrf_token": token, "draft_id": hidden(page.text, "draft_id"), "technique": "swedish", "site": LOWER_BACK})
    assert r.status_code == 200, r.text[:500]
    html = r.json()["html"]
    assert "&lt;script&gt;alert(1)" in html, "the planted Condition is not in the re-screen summary"
    for bad in RAW_MARKUP:
        assert bad not in html


def test_the_message_thread_escapes_the_ehr_text(world):
    for name in ("sessions", "plan (physician)", "session note"):
        r = world.pages[name]
        assert r.status_code == 200, (name, r.status_code)
        assert "onerror=alert(2)" in unescape(r.text), f"{name}: the planted message is not shown"
        for bad in RAW_MARKUP:
            assert bad not in r.text, (name, bad)


# ---------------------------------------------------------------------------------------------------------------
# 6. Tokens go only to the server that issued them


def test_tokens_of_ehr_a_never_reach_ehr_b(world):
    bearer = [s for s in world.rec_b.seen if s.authorization]
    assert not bearer, [f"{s.method} {s.path}" for s in bearer]
    assert any(s.authorization for s in world.rec_a.seen), "the recorder saw no token at A (it records nothing?)"


def test_a_paging_link_to_another_server_gets_no_token(world):
    """EHR A answers every searchset with a `next` link on EHR B: the app must not follow it with A's token."""
    # references to B inside A's data too: a message whose sender and a Condition whose evidence live on B
    _store_resource(world.a, {
        "resourceType": "Communication", "status": "completed", "subject": {"reference": f"Patient/{FEIL}"},
        "basedOn": [{"reference": f"ServiceRequest/{world.order_id}"}], "sent": f"{date.today()}T09:00:00Z",
        "sender": {"reference": f"{world.b.fhir_base}/Practitioner/{PHYSICIAN}"},
        "recipient": [{"reference": f"{world.b.fhir_base}/Practitioner/{THERAPIST}"}],
        "payload": [{"contentString": "From another server"}]})
    launch = world.launch(PHYSICIAN)
    before = len(world.rec_b.seen)
    world.rec_a.foreign_next = world.b.fhir_base
    try:
        pages = {p: launch.browser.get(launch.landing + p, timeout=60) for p in ("", "plan/", "plan/panel", "orders/")}
        t = world.launch(THERAPIST)
        pages.update({f"therapist {p}": t.browser.get(t.landing + p, timeout=60)
                      for p in ("sessions/", f"sessions/{world.order_id}")})
    finally:
        world.rec_a.foreign_next = None
    leaked = [f"{s.method} {s.path}?{s.query}" for s in world.rec_b.seen[before:] if s.authorization]
    assert not leaked, leaked
    assert world.rec_a.injected >= 5, "EHR A answered no searchset with the foreign link: the check proves nothing"
    problems = [f"{p}: {r.status_code}" for p, r in pages.items() if r.status_code >= 500 and r.status_code != 502]
    problems += [f"{p}: {why}" for p, r in pages.items() if r.status_code >= 400 and (why := friendly(r))]
    assert not problems, "\n".join(problems)


def test_a_style_url_on_another_server_is_not_fetched(world):
    """SC "SMART App Styling": smart_style_url comes from the token response; one on another server is ignored."""
    browser = requests.Session()
    out = create_launch(world.a, "safety-a", PHYSICIAN, FEIL, smart_style_url=f"{world.b.url}/ehr/smart-style.json")
    r = browser.get(out["launch_url"], timeout=60)
    assert r.status_code == 200, r.text[:500]
    before = world.rec_b.mark()
    css = browser.get(r.url + "style.css", timeout=30)
    assert css.status_code == 200 and "text/css" in css.headers["Content-Type"]
    assert world.rec_b.seen[before:] == [], [(s.method, s.path) for s in world.rec_b.seen[before:]]


def test_a_launch_with_an_iss_of_ehr_b_uses_b_only(world):
    launch = do_launch(world.b, world.app, "safety-b", PHYSICIAN, FEIL)
    assert launch.browser.get(launch.landing, timeout=30).status_code == 200
    b_tokens = {s.authorization for s in world.rec_b.seen if s.authorization}
    a_tokens = {s.authorization for s in world.rec_a.seen if s.authorization}
    assert b_tokens, "the launch from B made no authorized request to B"
    assert not (b_tokens & a_tokens), "a token was sent to both EHRs"


# ---------------------------------------------------------------------------------------------------------------
# 7. Accessibility basics (static HTML checks; axe-core runs in tests/browser/test_app_safety_browser.py)


def a11y_problems(name: str, html: str) -> list[str]:
    problems = []
    if not re.search(r"<html[^>]*\blang=\"[a-z]{2}", html):
        problems.append(f"{name}: <html> without lang")
    h1 = len(re.findall(r"<h1[\s>]", html))
    if h1 != 1:
        problems.append(f"{name}: {h1} h1 elements")
    if not re.search(r'<a[^>]+href="#[^"]+"[^>]*>[^<]*(skip|Skip)', html):
        problems.append(f"{name}: no skip link")
    if re.search(r'tabindex="[1-9]', html):
        problems.append(f"{name}: positive tabindex")
    labels_for = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    for m in re.finditer(r"<(input|select|textarea)\b([^>]*)>", html):
        attrs = m.group(2)
        if re.search(r'type="(hidden|submit|button|image|reset)"', attrs):
            continue
        ident = re.search(r'\bid="([^"]+)"', attrs)
        if ident and ident.group(1) in labels_for:
            continue
        if re.search(r"\baria-label(ledby)?=\"[^\"]+\"", attrs) or re.search(r'\btitle="[^"]+"', attrs):
            continue
        # wrapped in a <label>: the nearest label opening before it is not closed yet
        before = html[:m.start()]
        if before.rfind("<label") > before.rfind("</label>"):
            continue
        name_attr = re.search(r'\bname="([^"]*)"', attrs)
        problems.append(f"{name}: <{m.group(1)} name={name_attr.group(1) if name_attr else '?'}> has no label")
    return problems


def test_pages_have_the_accessibility_basics(world):
    problems = []
    for name, r in world.pages.items():
        if "html" in r.headers.get("Content-Type", ""):
            problems += a11y_problems(name, r.text)
    for what, url in (("404 page", "/no/such/page"), ("no session page", "/p/" + "x" * 30 + "/"),
                      ("start page", "/launch"), ("index", "/")):
        problems += a11y_problems(what, requests.get(world.app.url + url, timeout=30).text)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# 5. Logs (last: every record of the module, the flow and all the abuse above included)


def test_no_secret_or_patient_data_in_any_log_record(world, log_capture):
    secrets_seen = {s for s in world.rec_a.secrets | world.rec_b.secrets if s and len(s) >= 8}
    assert len(secrets_seen) >= 5, "the recorder caught too few secrets for this check to mean anything"
    # the app's own secrets: its signing key and the browsers' cookie values (with a launch URL they open a session)
    secrets_seen.add(world.app.app.config["SECRET_KEY"])
    for launch in (world.physician, world.therapist):
        secrets_seen.update(c.value for c in launch.browser.cookies if c.value and len(c.value) >= 16)
    patient = [*FEIL_NAME, " ".join(FEIL_NAME[:2]), FEIL_BIRTH, FEIL_MRN, "999-85-3615",
               "alert(1)", "onerror=alert", "Feels better", "Session went well", "Checked with the vascular team"]
    leaks = []
    lines = log_capture.rendered()
    assert len(lines) > 50, "almost nothing was logged: is the capture working?"
    for line in lines:
        for s in secrets_seen:
            if s in line:
                leaks.append(f"secret …{s[-6:]} in: {line[:300]}")
        for p in patient:
            if p in line:
                leaks.append(f"patient data {p!r} in: {line[:300]}")
        if re.search(r"Bearer\s+[A-Za-z0-9_\-.]{8,}", line):
            leaks.append(f"a bearer token in: {line[:300]}")
        if re.search(r"[?&](code|state|code_verifier|refresh_token|access_token)=[^&\s…]", line):
            leaks.append(f"an OAuth parameter in a URL in: {line[:300]}")
    assert not leaks, "\n".join(leaks[:40])
