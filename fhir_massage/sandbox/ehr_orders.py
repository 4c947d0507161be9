"""The sandbox EHR's order entry, a CDS Hooks 2.0.1 client (hooks order-select and order-sign v1.0) that does what
an EHR does with the cards: shows them, applies accepted suggestions, records overrides, sends feedback, blocks
signing on unaddressed critical cards and launches the SMART app from a card's ``smart`` link.

The user picks a clinician, a patient, massage technique(s) and body site(s); with the authorization server, a
clinician is offered, and may order for, only the patients on their care teams (``SandboxAuth.accessible_patients``,
as ``/ehr`` does; another patient is refused with a 403 page); an open sandbox (``--open``) offers every patient.
The page builds draft ServiceRequests (one per technique, status ``draft``, ids assigned now as an EHR does for
pending orders) and keeps them in a server-side *order session* (in memory, 2 h, id in the URL; no cookies, no
scripts). Server-side:

1. reads the CDS service's discovery document (``GET {cds_base}/cds-services``) and picks the service for the hook;
2. fills its prefetch templates from the sandbox's own FHIR data (only ``{{context.patientId}}`` /
   ``{{context.userId}}`` tokens; a key whose query fails gets an OperationOutcome, as the spec says);
3. when the sandbox runs its authorization server and the CDS service's app is a registered client, gives the
   service FHIR access: ``fhirServer`` + ``fhirAuthorization`` with a 5-minute read-only token for the patient
   (``subject`` = that client id), revoked as soon as the call returns (spec "FHIR Resource Access");
4. signs a JWT (ES384, ``kid``, ``jku``; ``iss`` = the sandbox base URL, ``aud`` = the exact URL called, ``exp`` in
   5 minutes, a fresh ``jti``) with a key made at install; its JWKS is served at ``/ehr/cds-jwks``;
5. POSTs the hook and shows the cards (markdown detail rendered from an escaped subset: paragraphs, lists,
   **bold**, `code`, backslash escapes; no HTML, no links).

Acting on a card (spec "Card Attributes", "Suggestion", "Action", "Feedback"):

- *Accept a suggestion*: its actions are applied like a FHIR transaction (all or nothing): ``update`` replaces the
  draft with that id, ``delete`` removes the draft, ``create`` writes the resource to the sandbox's FHIR store (one
  transaction Bundle through the sandbox's own service layer). Feedback ``accepted`` with ``acceptedSuggestions``
  goes to ``{service}/feedback``; then the same hook fires again on the new drafts (new ``hookInstance``) and its
  cards replace the old ones (spec: a client drops a service's stale cards when the hook fires again).
- *Override*: a reason from the card's ``overrideReasons`` is required when it has any, a comment is optional;
  feedback ``overridden`` with ``overrideReason {reason, userComment}``. When the card's hook call carried FHIR
  access, the feedback carries ``fhirServer`` + ``fhirAuthorization`` too (a fresh token that may also create
  DetectedIssue) - an extension of the feedback body that the fhir-massage service documents (smart_app/cds.py);
  the DetectedIssue it writes is then looked up in the sandbox and shown.
- *Sign*: fires order-sign unless its cards for the current drafts are already shown. Cards returned on a sign
  stop it for review; a critical card neither accepted nor overridden blocks it. Signing writes each draft as
  ``ServiceRequest/<id>`` with status ``active`` (a PUT with the id the drafts had, so Tasks and DetectedIssues
  that pointed at the draft now resolve).
- *smart link*: the EHR creates a real launch (``SandboxAuth.create_launch``, as ``/ehr/launch`` does) for the
  registered client whose launch URL is the link's URL, user and patient of the order, the link's ``appContext``
  passed through to the token response; the app opens in the EHR's frame.

Routes: ``GET /ehr/orders`` (form), ``POST /ehr/orders`` (new order session; ``action`` = ``select`` | ``sign``),
``GET /ehr/orders/s/<sid>`` (the session), ``POST /ehr/orders/s/<sid>/{check,sign,accept,override}``,
``GET /ehr/orders/s/<sid>/app`` (launch from a smart link), ``POST /ehr/orders/settings`` (loopback only, JSON
``{"cds_base_url": ..., "cds_client_id": ...}``: tests start the app after the sandbox),
``GET /ehr/orders/cards.css``, ``GET /ehr/cds-jwks``.

The CDS base URL comes from ``install(app, config, cds_base_url=...)``, else ``config.auth["cds_base_url"]``,
else the environment variable ``FHIR_MASSAGE_SANDBOX_CDS_URL``, else the settings endpoint. The CDS service's
client id (for FHIR access) from ``config.auth["cds_client_id"]`` or the settings, else the registered client whose
launch URL is under the CDS base URL.

To register the sandbox with the app's CDS service: ``{"iss": "<sandbox>/fhir", "client_id": ...,
"cds_iss": "<sandbox>", "cds_jwks_url": "<sandbox>/ehr/cds-jwks"}``.
"""

from __future__ import annotations

import functools
import html
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, redirect, render_template, request, url_for
from joserfc import jwt
from joserfc.jwk import ECKey
from markupsafe import Markup, escape

from fhir_massage import codes as C
from fhir_massage.loopback import is_loopback_addr

__all__ = ["install", "render_markdown", "EXT"]

EXT = "fhir_massage.sandbox.ehr_orders"
DISCOVERY_TTL = 60.0
TIMEOUT = (5.0, 30.0)
SESSION_TTL = 2 * 3600.0
MAX_SESSIONS = 500
TOKEN_LIFETIME = 300  # s: fhirAuthorization tokens are short-lived and revoked after the call anyway
COMMENT_MAX = 1000

bp = Blueprint("sandbox_ehr_orders", __name__, template_folder="templates", url_prefix="/ehr/orders")
jwks_bp = Blueprint("sandbox_ehr_cds_jwks", __name__, url_prefix="/ehr")

# Card look: served from here (the simulator's CSP allows only same-origin styles, no inline ones). The page
# basics (body, banner, fieldset, buttons, focus ring) are the simulator's own static/sandbox.css, served first;
# what follows adds the order entry's own parts.
SANDBOX_CSS = Path(__file__).parent / "static" / "sandbox.css"
CARDS_CSS = """
button { margin-right: 0.5rem; }
select { font-size: 1rem; }
.card { background: #fff; border: 1px solid #9aa5b1; border-left-width: 8px; border-radius: 4px;
        padding: 0.5rem 1rem; margin: 0 0 1rem; }
.card-critical { border-left-color: #b00020; }
.card-warning { border-left-color: #b45f06; }
.card-info { border-left-color: #005f73; }
.indicator { display: inline-block; font-weight: bold; font-size: 0.85rem;
             padding: 0 0.4rem; border-radius: 3px; color: #fff; }
.indicator-critical { background: #b00020; }
.indicator-warning { background: #8a4b00; }
.indicator-info { background: #005f73; }
.detail code { background: #eef2f5; padding: 0 0.2rem; }
.meta { color: #3e4c59; font-size: 0.9rem; }
.draft { background: #fff; border: 1px solid #9aa5b1; border-radius: 4px; padding: 0.5rem 1rem; margin: 0 0 1rem; }
.draft dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; margin: 0.5rem 0; }
.draft dt { font-weight: bold; }
.draft dd { margin: 0; }
.notice { border: 2px solid #005f73; background: #e6f2f4; border-radius: 4px; padding: 0.5rem 1rem; margin: 0 0 1rem; }
.notice-blocked { border-color: #b00020; background: #fdecee; }
.notice-done { border-color: #1b7f3b; background: #e8f5ec; }
.notice p { margin: 0.25rem 0; }
.decision { margin: 0.5rem 0; padding: 0.25rem 0.75rem; background: #eef2f5; border-radius: 3px; }
.decision p { margin: 0.25rem 0; }
.decision p:first-child { font-weight: bold; }
.suggestion { margin: 0.25rem 0 0.75rem; }
.suggestion form { display: inline; }
.suggestion ul { margin: 0.25rem 0 0; }
button.secondary { background: #fff; color: #005f73; }
.override summary { cursor: pointer; color: #005f73; font-weight: bold; margin: 0.5rem 0; }
.override textarea { width: 100%; max-width: 40rem; font: inherit; }
.override fieldset { margin: 0.5rem 0; }
.activity li { margin: 0.2rem 0; }
.actions { margin: 1rem 0; }
.app-frame { width: 100%; height: 80vh; border: 1px solid #9aa5b1; background: #fff; }
"""


class _State:
    def __init__(self, cds_base_url: str | None) -> None:
        self.key = ECKey.generate_key("P-384", private=True)
        self.key.ensure_kid()
        self.cds_base_url = cds_base_url.rstrip("/") if cds_base_url else None
        self.http = requests.Session()
        self._lock = threading.Lock()
        self._discovery: dict[str, tuple[float, dict[str, Any]]] = {}
        self.cds_client_id: str | None = None
        self.sessions: dict[str, OrderSession] = {}

    def session(self, sid: str) -> "OrderSession | None":
        now = time.monotonic()
        with self._lock:
            for k in [k for k, v in self.sessions.items() if v.expires < now]:
                del self.sessions[k]
            found = self.sessions.get(sid)
            if found is not None:
                found.expires = now + SESSION_TTL
            return found

    def add_session(self, sess: "OrderSession") -> None:
        with self._lock:
            if len(self.sessions) >= MAX_SESSIONS:  # the oldest goes: an in-memory sandbox, not a database
                oldest = min(self.sessions.values(), key=lambda v: v.expires)
                del self.sessions[oldest.id]
            self.sessions[sess.id] = sess

    def public_jwks(self) -> dict[str, Any]:
        pub = self.key.as_dict(private=False)
        pub.update({"kid": self.key.kid, "alg": "ES384", "use": "sig"})
        return {"keys": [pub]}

    def discovery(self, base: str) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            hit = self._discovery.get(base)
        if hit and hit[0] > now:
            return hit[1]
        resp = self.http.get(f"{base}/cds-services", timeout=TIMEOUT, headers={"Accept": "application/json"})
        doc = resp.json() if resp.status_code == 200 else None
        if not isinstance(doc, dict) or not isinstance(doc.get("services"), list):
            raise _CdsCallError(f"The CDS service's discovery answered HTTP {resp.status_code}.")
        with self._lock:
            self._discovery[base] = (now + DISCOVERY_TTL, doc)
        return doc


class _CdsCallError(Exception):
    pass


def install(app: Flask, config: Any = None, *, cds_base_url: str | None = None) -> None:
    """Add the order entry (``/ehr/orders``) and the CDS client's JWKS (``/ehr/cds-jwks``) to the sandbox app."""
    if cds_base_url is None:
        auth = getattr(config, "auth", None) or {}
        cds_base_url = (auth.get("cds_base_url") if isinstance(auth, Mapping) else None) or \
            os.environ.get("FHIR_MASSAGE_SANDBOX_CDS_URL")
    app.extensions[EXT] = state = _State(cds_base_url)
    auth = getattr(config, "auth", None) or {}
    if isinstance(auth, Mapping) and isinstance(auth.get("cds_client_id"), str):
        state.cds_client_id = auth["cds_client_id"]
    app.register_blueprint(bp)
    app.register_blueprint(jwks_bp)


def _state() -> _State:
    return current_app.extensions[EXT]


def _secure(resp: Response) -> Response:
    # Same policy as the rest of the simulator: no scripts at all, same-origin styles only.
    resp.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _base() -> str:
    return request.url_root.rstrip("/")


# ---------------------------------------------------------------------------------------------------------------
# Markdown (the subset our cards use), rendered from escaped text


_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|`([^`]*)`|\*\*|&(lt|gt|amp|quot|#39|#x27);")


def _inline(text: str) -> str:
    out: list[str] = []
    pos = 0
    strong = False
    for m in _INLINE.finditer(text):
        out.append(str(escape(text[pos:m.start()])))
        if m.group(1) is not None:
            out.append(str(escape(m.group(1))))
        elif m.group(2) is not None:
            out.append(f"<code>{escape(m.group(2))}</code>")
        elif m.group(0) == "**":
            out.append("</strong>" if strong else "<strong>")
            strong = not strong
        else:
            out.append(str(escape(html.unescape(m.group(0)))))
        pos = m.end()
    out.append(str(escape(text[pos:])))
    if strong:
        out.append("</strong>")
    return "".join(out)


def render_markdown(md: Any) -> Markup:
    """Paragraphs, ``- `` lists, ``**bold**``, `` `code` ``, backslash escapes and the entities &lt; &gt; &amp;.
    Everything else is shown as text: no raw HTML, no links or images (a CDS service's markdown is untrusted)."""
    if not isinstance(md, str) or not md:
        return Markup("")
    blocks: list[str] = []
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + " ".join(_inline(p) for p in para) + "</p>")
            para.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped.startswith(("- ", "* ")):
            if para:
                flush()
            items.append(stripped[2:])
        else:
            if items:
                flush()
            para.append(stripped)
    flush()
    return Markup("".join(blocks))


# ---------------------------------------------------------------------------------------------------------------
# Form data


def _users() -> list[dict[str, Any]]:
    from fhir_massage.sandbox import demo

    return [u for u in demo.DEMO_USERS if u.get("role") == "physician"] or list(demo.DEMO_USERS)


def _patients(user: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every demo patient, or with ``user`` and the authorization server, only the patients whose charts that user
    may open (an EHR offers a clinician the patients of their care relationships; same rule as ``/ehr`` and the
    FHIR API's user/ grants). An open sandbox has no access rules: every patient."""
    from fhir_massage.sandbox import demo

    patients = list(demo.DEMO_PATIENTS)
    auth = _sandbox().get("auth")
    if auth is None or user is None:
        return patients
    mine = auth.accessible_patients(user)
    return [p for p in patients if p["id"] in mine]


def _may_order(user: Mapping[str, Any], patient: Mapping[str, Any]) -> bool:
    return any(p["id"] == patient["id"] for p in _patients(user))


def _site_options() -> list[tuple[str, str]]:
    from fhir_massage.knowledge import load_kb

    kb = load_kb()
    out = []
    for code, info in kb.sites.items():
        if info.lateralizable:
            for side in ("left", "right", "bilateral"):
                label = f"{info.display}, both sides" if side == "bilateral" else f"{side.capitalize()} " \
                                                                                  f"{info.display.lower()}"
                out.append((f"{code}:{side}", label))
        else:
            out.append((code, info.display))
    return out


def _render(status: int = 200, **ctx: Any) -> Response:
    """The new-order form (with errors, or with the cards of a call that failed before a session existed)."""
    form = ctx.pop("form", {})
    users = _users()
    chosen = None
    counts: dict[str, int] = {}
    if _sandbox().get("auth") is not None:
        # The page runs no script to refill the patient list when another clinician is chosen: the list is the
        # chosen clinician's ("Show this clinician's patients" reloads it), and send() refuses any other patient.
        chosen = next((u for u in users if u["id"] == form.get("user")), users[0] if users else None)
        counts = {u["id"]: len(_patients(u)) for u in users}
    resp = current_app.make_response((render_template(
        "ehr_orders/index.html", users=users, patients=_patients(chosen), chosen=chosen, counts=counts,
        techniques=C.TECHNIQUES, technique_display=C.TECHNIQUE_DISPLAY, sites=_site_options(), form=form,
        cds_base=_state().cds_base_url, render_markdown=render_markdown, **ctx), status))
    return _secure(resp)


@bp.get("")
@bp.get("/")
def index() -> Response:
    # "Show this clinician's patients" comes back here (GET) with the whole form: keep what was already chosen
    a = request.args
    return _render(form={"patient": a.get("patient", ""), "user": a.get("user", ""),
                         "techniques": a.getlist("technique"), "sites": a.getlist("site")})


@bp.get("/cards.css")
def cards_css() -> Response:
    return Response(_sandbox_css() + CARDS_CSS, mimetype="text/css")


@functools.cache
def _sandbox_css() -> str:
    return SANDBOX_CSS.read_text(encoding="utf-8")


@jwks_bp.get("/cds-jwks")
def cds_jwks() -> Response:
    return jsonify(_state().public_jwks())


@bp.post("/settings")
def settings() -> Response:
    if not is_loopback_addr(request.remote_addr):
        return jsonify({"error": "forbidden", "message": "Settings answer loopback callers only."}), 403
    data = request.get_json(silent=True)
    url = data.get("cds_base_url") if isinstance(data, dict) else None
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        return jsonify({"error": "invalid", "message": "cds_base_url must be an http(s) URL."}), 400
    client_id = data.get("cds_client_id") if isinstance(data, dict) else None
    if client_id is not None and not isinstance(client_id, str):
        return jsonify({"error": "invalid", "message": "cds_client_id must be a string."}), 400
    _state().cds_base_url = url.rstrip("/")
    if client_id is not None:
        _state().cds_client_id = client_id or None
    return jsonify({"cds_base_url": _state().cds_base_url, "cds_client_id": _state().cds_client_id})


# ---------------------------------------------------------------------------------------------------------------
# Sending a hook


# ---------------------------------------------------------------------------------------------------------------
# Order sessions: the drafts, the last hook's cards and what the user did with them (server-side, in memory)


@dataclass
class HookResult:
    hook: str
    service_id: str
    service_title: str
    service_url: str
    hook_instance: str
    cards: list[dict[str, Any]]
    drafts_version: int
    fhir_access: bool  # the call carried fhirServer + fhirAuthorization

    def keyed(self) -> list[tuple[str, dict[str, Any]]]:
        return [(_card_key(c, i), c) for i, c in enumerate(self.cards)]


@dataclass
class Decision:
    outcome: str  # accepted | overridden
    suggestion: str | None = None
    reason: str | None = None
    comment: str | None = None
    feedback: str | None = None  # what the service answered, in words
    detected_issue: dict[str, Any] | None = None  # {"ref", "status", "mitigation"} as read back from the sandbox


@dataclass
class OrderSession:
    id: str
    patient: dict[str, Any]
    user: dict[str, Any]
    drafts: list[dict[str, Any]]
    expires: float
    drafts_version: int = 0
    result: HookResult | None = None
    decisions: dict[str, Decision] = field(default_factory=dict)
    notice: dict[str, Any] | None = None  # {"kind": info|blocked|done|error, "title": str, "lines": [str]}
    activity: list[dict[str, Any]] = field(default_factory=list)
    signed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def log(self, text: str, ref: str | None = None) -> None:
        self.activity.append({"at": time.strftime("%H:%M:%S", time.gmtime()), "text": text, "ref": ref})

    def say(self, kind: str, title: str, *lines: str) -> None:
        self.notice = {"kind": kind, "title": title, "lines": [ln for ln in lines if ln]}


def _card_key(card: Mapping[str, Any], index: int) -> str:
    uid = card.get("uuid")
    return uid if isinstance(uid, str) and uid else f"#{index}"


class _ActionError(Exception):
    pass


def _now_instant() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sandbox() -> dict[str, Any]:
    from fhir_massage.sandbox.fhir_api import EXT as FHIR_EXT

    return current_app.extensions[FHIR_EXT]


def _fhir_base() -> str:
    auth = _sandbox().get("auth")
    return auth.fhir_base() if auth is not None else f"{_base()}/fhir"


# ---------------------------------------------------------------------------------------------------------------
# Drafts


def _draft_orders(patient: str, user_ref: str, techniques: list[str], sites: list[str]) -> list[dict[str, Any]]:
    labels = dict(_site_options())
    from fhir_massage.knowledge import load_kb

    kb = load_kb()
    body_sites = []
    for s in sites:
        code = s.split(":")[0]
        info = kb.sites[code]
        body_sites.append({"coding": [C.coding(C.SNOMED, code, info.display)], "text": labels[s]})
    authored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    orders = []
    for t in techniques:
        cpt = C.TECHNIQUE_CPT[t][0]
        sr: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            # The id a pending order has in a real EHR, kept when signed: a clearance Task or a DetectedIssue that
            # points at the draft points at the signed order too.
            "id": str(uuid.uuid4()),
            "status": "draft",
            "intent": "order",
            "category": [{"coding": [C.coding(C.SNOMED, "91251008", "Physical therapy procedure (regime/therapy)")],
                          "text": "Medical massage"}],
            "code": {"coding": [C.coding(C.CPT, cpt, C.CPT_DISPLAY.get(cpt)),
                                C.coding(C.TECHNIQUE_SYSTEM, t, C.TECHNIQUE_DISPLAY[t])],
                     "text": C.TECHNIQUE_DISPLAY[t] + (": " + "; ".join(b["text"] for b in body_sites)
                                                       if body_sites else "")},
            "subject": {"reference": f"Patient/{patient}"},
            "authoredOn": authored,
            "requester": {"reference": user_ref},
        }
        if body_sites:
            sr["bodySite"] = body_sites
        orders.append(sr)
    return orders


def _texts(items: Any) -> list[str]:
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        text = item.get("text") or next((c.get("display") or c.get("code") for c in C.codings(item)
                                         if c.get("display") or c.get("code")), None)
        if text:
            out.append(str(text))
    return out


def _draft_view(sr: Mapping[str, Any]) -> dict[str, Any]:
    """What the order entry shows of a draft: the parts a suggestion changes (technique, sites, pressure)."""
    code = sr.get("code") if isinstance(sr.get("code"), dict) else {}
    techniques = [str(c.get("display") or c.get("code")) for c in C.codings(code)
                  if c.get("system") == C.TECHNIQUE_SYSTEM]
    cpts = [f"{c.get('code')} {c.get('display') or ''}".strip() for c in C.codings(code) if c.get("system") == C.CPT]
    notes = [str(n.get("text")) for n in sr.get("note") or [] if isinstance(n, dict) and n.get("text")]
    return {"id": sr.get("id"), "status": sr.get("status"), "techniques": techniques or [code.get("text") or "?"],
            "cpt": cpts, "sites": _texts(sr.get("bodySite")), "details": _texts(sr.get("orderDetail")),
            "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# FHIR access for the CDS service (spec "FHIR Resource Access")

_READ_V2 = ("patient/Patient.rs patient/Condition.rs patient/Observation.rs patient/MedicationRequest.rs "
            "patient/MedicationStatement.rs patient/MedicationAdministration.rs patient/AllergyIntolerance.rs "
            "patient/Procedure.rs").split()
_READ_V1 = ["patient/*.read"]


def _cds_client(auth: Any) -> Any:
    """The registered client the CDS service belongs to: configured, else the one whose launch URL is under the
    CDS base URL (the service and the SMART app are one registered application)."""
    state = _state()
    if state.cds_client_id:
        return auth.query_client(state.cds_client_id)
    base = state.cds_base_url
    if not base:
        return None
    return next((c for c in auth.all_clients() if c.launch_url and c.launch_url.startswith(base + "/")), None)


def _fhir_access(sess: OrderSession, *, write_detected_issue: bool = False) -> tuple[dict[str, Any], Any] | None:
    """(``{"fhirServer", "fhirAuthorization"}``, revoke) or None when the sandbox cannot give access (open mode: no
    authorization server; or the service's app is not registered here)."""
    from fhir_massage.sandbox.auth_store import Token, new_secret

    auth = _sandbox().get("auth")
    if auth is None:
        return None
    client = _cds_client(auth)
    user = auth.find_user(sess.user.get("id"))
    if client is None or user is None:
        return None
    # Least privilege: a hook call reads the chart; a feedback call only writes (conditionally) a DetectedIssue.
    if client.scope_dialect == "v1":
        requested = ["patient/DetectedIssue.read", "patient/DetectedIssue.write"] if write_detected_issue \
            else _READ_V1
    else:
        requested = ["patient/DetectedIssue.crs"] if write_detected_issue else _READ_V2
    granted = auth.final_scopes(requested, client, {"patient": sess.patient["id"]})
    if not granted:
        return None
    # The EHR's authorization server issues the token itself, to the client the service is registered as (CDS
    # Hooks "FHIR Resource Access": tokens for the service are short-lived and scoped to the service, the user and
    # the patient; subject = the service's client id). No OAuth round trip: the EHR is the authorization server.
    tok = Token(client_id=client.client_id, scope=" ".join(granted), user=user,
                context={"launch": False, "patient": sess.patient["id"]}, family=new_secret(16),
                issued_at=auth.store.clock(), expires_in=TOKEN_LIFETIME, access_token=new_secret(32),
                clock=lambda: auth.store.clock())
    auth.store.add_token(tok)
    body = {"fhirServer": auth.fhir_base(),
            "fhirAuthorization": {"access_token": tok.access_token, "token_type": "Bearer",
                                  "expires_in": TOKEN_LIFETIME, "scope": tok.scope, "subject": client.client_id,
                                  "patient": sess.patient["id"]}}
    return body, lambda: auth.store.revoke_family(tok.family)


# ---------------------------------------------------------------------------------------------------------------
# Sending a hook, sending feedback


def _prefetch(templates: Mapping[str, Any], patient: str, user_ref: str) -> dict[str, Any]:
    """Fill the service's prefetch templates from the sandbox's own data (the EHR reads its own database; no
    token involved). Keys with tokens we do not have are left out (spec: the client may satisfy some keys)."""
    from fhir_massage.sandbox.access import OPEN
    from fhir_massage.sandbox.outcome import FhirProblem

    service = _sandbox()["service"]
    base = _fhir_base()
    out: dict[str, Any] = {}
    for key, template in templates.items():
        if not isinstance(template, str):
            continue
        query = template.replace("{{context.patientId}}", patient).replace("{{context.userId}}", user_ref)
        if "{{" in query:
            continue
        path, _, qs = query.partition("?")
        try:
            if qs:
                result = service.search(OPEN, base, path, parse_qsl(qs, keep_blank_values=True))
            else:
                rtype, _, rid = path.partition("/")
                result = service.read(OPEN, base, rtype, rid)
            out[key] = result.body
        except FhirProblem as exc:
            out[key] = {"resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "processing", "diagnostics": exc.message}]}
    return out


def _token(aud: str) -> str:
    state = _state()
    now = int(time.time())
    header = {"alg": "ES384", "typ": "JWT", "kid": state.key.kid, "jku": f"{_base()}/ehr/cds-jwks"}
    claims = {"iss": _base(), "aud": aud, "exp": now + 300, "iat": now, "jti": secrets.token_urlsafe(24)}
    return jwt.encode(header, claims, state.key, algorithms=["ES384"])


def _post(url: str, body: dict[str, Any]) -> requests.Response:
    try:
        return _state().http.post(url, json=body, timeout=TIMEOUT, allow_redirects=False,
                                  headers={"Authorization": f"Bearer {_token(url)}", "Accept": "application/json"})
    except requests.RequestException:
        raise _CdsCallError("The CDS service could not be reached.") from None


def _answer(resp: requests.Response) -> dict[str, Any]:
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code != 200 or not isinstance(answer, dict):
        message = answer.get("message") if isinstance(answer, dict) else None
        raise _CdsCallError(f"The CDS service answered HTTP {resp.status_code}"
                            + (f": {message}" if isinstance(message, str) else "."))
    return answer


def _call(hook: str, sess: OrderSession) -> HookResult:
    state = _state()
    base = state.cds_base_url
    if not base:
        raise _CdsCallError("No CDS service is configured for this sandbox (install(..., cds_base_url=...), "
                            "auth.cds_base_url or FHIR_MASSAGE_SANDBOX_CDS_URL).")
    try:
        doc = state.discovery(base)
    except (requests.RequestException, ValueError):
        raise _CdsCallError("The CDS service could not be reached for discovery.") from None
    service = next((s for s in doc["services"] if isinstance(s, dict) and s.get("hook") == hook), None)
    if service is None or not isinstance(service.get("id"), str):
        raise _CdsCallError(f"The CDS service offers nothing for the {hook} hook.")
    url = f"{base}/cds-services/{service['id']}"
    patient, user_ref = sess.patient["id"], sess.user["fhirUser"]
    fhir_base = _fhir_base()
    context: dict[str, Any] = {"userId": user_ref, "patientId": patient,
                               "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                               "entry": [{"fullUrl": f"{fhir_base}/ServiceRequest/{d['id']}",
                                                          "resource": d} for d in sess.drafts]}}
    if hook == "order-select":
        context["selections"] = [f"ServiceRequest/{d['id']}" for d in sess.drafts]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context,
                            "prefetch": _prefetch(service.get("prefetch") or {}, patient, user_ref)}
    access = _fhir_access(sess)
    if access:
        body.update(access[0])
    try:
        answer = _answer(_post(url, body))
    finally:
        if access:
            access[1]()  # the service had the token for this call only
    cards = _dicts(answer, "cards")
    return HookResult(hook=hook, service_id=service["id"], service_title=service.get("title") or service["id"],
                      service_url=url, hook_instance=body["hookInstance"], cards=cards,
                      drafts_version=sess.drafts_version, fhir_access=access is not None)


def _run(sess: OrderSession, hook: str) -> HookResult:
    """Fire the hook on the current drafts; its cards replace the previous ones (stale guidance is dropped)."""
    result = _call(hook, sess)
    sess.result = result
    sess.decisions = {}
    n = len(result.cards)
    sess.log(f"{hook} sent (hookInstance {result.hook_instance}): {n} card(s)"
             + (", with FHIR access for the service" if result.fhir_access else ""))
    return result


def _feedback(sess: OrderSession, res: HookResult, item: dict[str, Any], *,
              with_fhir: bool = False) -> dict[str, Any] | None:
    """POST {service}/feedback (spec "Feedback") for one card; the service's per-card answer (our service answers
    ``{"feedback": [{"card", "status", "detectedIssue"?}]}``; the spec defines no body, so others give {})."""
    url = f"{res.service_url}/feedback"
    body: dict[str, Any] = {"feedback": [item]}
    access = _fhir_access(sess, write_detected_issue=True) if with_fhir else None
    if access:
        body.update(access[0])
    try:
        answer = _answer(_post(url, body))
    finally:
        if access:
            access[1]()
    entries = answer.get("feedback") if isinstance(answer.get("feedback"), list) else []
    return next((e for e in entries if isinstance(e, dict) and e.get("card") == item["card"]), None) or {}


def _send_feedback(sess: OrderSession, res: HookResult, item: dict[str, Any], *,
                   with_fhir: bool = False) -> dict[str, Any] | None:
    """``_feedback``, with a failed call turned into the entry the activity log and the card show."""
    try:
        return _feedback(sess, res, item, with_fhir=with_fhir)
    except _CdsCallError as exc:
        return {"status": f"not delivered ({exc})"}


def _dicts(obj: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The dict items of a JSON list (cards, suggestions, overrideReasons, links); anything else is skipped."""
    return [x for x in obj.get(key) or [] if isinstance(x, dict)]


def _nth(items: list[dict[str, Any]], n: str) -> dict[str, Any] | None:
    """The item a form or query names by its index, or None for anything that is not one of them."""
    return items[int(n)] if n.isdigit() and int(n) < len(items) else None


def _feedback_words(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "No feedback was sent: the card has no uuid (feedback names a card by its uuid)."
    status = entry.get("status")
    words = {"recorded": "recorded by the service", "unknown-card": "the service does not know this card"}
    out = "Feedback sent; the service answered: " + (words.get(str(status), str(status)) if status else "HTTP 200")
    if entry.get("detectedIssue"):
        out += f"; it wrote {entry['detectedIssue']}"
    if entry.get("detectedIssueError"):
        out += f"; its DetectedIssue write failed ({entry['detectedIssueError']})"
    return out + "."


# ---------------------------------------------------------------------------------------------------------------
# Applying a suggestion (spec "Action": create / update / delete, applied like a transaction)


def _apply(sess: OrderSession, suggestion: Mapping[str, Any]) -> list[str]:
    from fhir_massage.sandbox.access import OPEN
    from fhir_massage.sandbox.outcome import FhirProblem
    from fhir_massage.sandbox.transactions import BundleProcessor
    from fhir_massage.sandbox.validation import validate

    actions = suggestion.get("actions") or []
    if not isinstance(actions, list):
        raise _ActionError("The suggestion's actions are not a list.")
    drafts = [dict(d) for d in sess.drafts]
    ids = [d["id"] for d in drafts]
    creates: list[tuple[str, dict[str, Any]]] = []
    done: list[str] = []
    patient_ref = f"Patient/{sess.patient['id']}"
    for n, action in enumerate(actions):
        if not isinstance(action, dict):
            raise _ActionError(f"Action {n + 1} is not an object.")
        kind, what = action.get("type"), str(action.get("description") or "")
        resource = action.get("resource")
        if kind in ("create", "update"):
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise _ActionError(f"Action {n + 1} ({kind}) carries no FHIR resource.")
            try:
                resource = validate(resource, expected_type=resource["resourceType"])
            except FhirProblem as exc:
                raise _ActionError(f"Action {n + 1} ({kind}) carries an invalid {resource['resourceType']}: "
                                   f"{exc.message}") from None
        if kind == "update":
            assert isinstance(resource, dict)
            rid = resource.get("id")
            if resource["resourceType"] != "ServiceRequest" or rid not in ids:
                raise _ActionError(f"Action {n + 1} updates {resource['resourceType']}/{rid}, which is not one of "
                                   "this order's drafts; the order entry changes only its own drafts.")
            if (resource.get("subject") or {}).get("reference") != patient_ref:
                raise _ActionError(f"Action {n + 1} moves the order to another patient; not applied.")
            drafts[ids.index(rid)] = resource
            done.append(f"update: {what} (draft ServiceRequest/{rid} replaced)")
        elif kind == "delete":
            ref = action.get("resourceId")
            rtype, _, rid = str(ref or "").partition("/")
            if rtype != "ServiceRequest" or rid not in ids:
                raise _ActionError(f"Action {n + 1} deletes {ref!s:.80}, which is not one of this order's drafts; "
                                   "the order entry deletes only its own drafts.")
            drafts = [d for d in drafts if d["id"] != rid]
            ids = [d["id"] for d in drafts]
            done.append(f"delete: {what} (draft ServiceRequest/{rid} removed)")
        elif kind == "create":
            assert isinstance(resource, dict)
            if resource["resourceType"] == "ServiceRequest" and resource.get("status") == "draft":
                # a new draft order joins the order being entered, as an EHR would add it to the pending orders
                resource = {**resource, "id": resource.get("id") or str(uuid.uuid4())}
                drafts.append(resource)
                ids.append(resource["id"])
                done.append(f"create: {what} (new draft ServiceRequest/{resource['id']})")
            else:
                creates.append((what, resource))
        else:
            raise _ActionError(f"Action {n + 1} has type {str(kind)[:20]!r}; CDS Hooks knows create, update and "
                               "delete.")
    if creates:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {k: v for k, v in r.items() if k != "id"},
             "request": {"method": "POST", "url": r["resourceType"]}} for _, r in creates]}
        try:
            result = BundleProcessor(_sandbox()["service"]).process(OPEN, _fhir_base(), bundle)
        except FhirProblem as exc:
            raise _ActionError(f"The sandbox refused to create what the suggestion asks: {exc.message}") from None
        for (what, r), entry in zip(creates, (result.body or {}).get("entry") or []):
            loc = str((entry.get("response") or {}).get("location") or "")
            ref = "/".join(loc.split("/")[:2]) if loc else r["resourceType"]
            done.append(f"create: {what} ({ref} created in the sandbox)")
            sess.log(f"Created {ref} in the sandbox's FHIR store", ref)
    if drafts != sess.drafts:
        sess.drafts = drafts
        sess.drafts_version += 1
    return done


def _sign(sess: OrderSession) -> None:
    from fhir_massage.sandbox.access import OPEN
    from fhir_massage.sandbox.outcome import FhirProblem
    from fhir_massage.sandbox.transactions import BundleProcessor

    if sess.signed:
        sess.say("info", "Already signed.", "Start a new order to order again.")
        return
    if not sess.drafts:
        sess.say("error", "Nothing to sign.", "This order has no draft left (a suggestion removed it).")
        return
    res = sess.result
    fresh = res is None or res.hook != "order-sign" or res.drafts_version != sess.drafts_version
    if fresh:
        res = _run(sess, "order-sign")
    assert res is not None
    critical = [c for k, c in res.keyed() if c.get("indicator") == "critical" and k not in sess.decisions]
    if critical:
        n = len(critical)
        sess.say("blocked", f"Not signed: {n} critical card{' is' if n == 1 else 's are'} neither accepted nor "
                 "overridden.",
                 *[f"“{c.get('summary')}”" for c in critical],
                 "Accept one of a critical card's suggestions or override it with a reason, then sign again.")
        sess.log(f"Signing blocked by {n} critical card{'' if n == 1 else 's'}")
        return
    if fresh and res.cards:
        # EHRs stop on order-sign cards so the clinician sees them; the next Sign goes through.
        sess.say("info", f"Not signed yet: the CDS service returned {len(res.cards)} card(s) for this order.",
                 "Review them (accept a suggestion or override), then press Sign order again.")
        return
    entries = []
    for d in sess.drafts:
        signed = {**d, "status": "active"}
        entries.append({"fullUrl": f"{_fhir_base()}/ServiceRequest/{d['id']}", "resource": signed,
                        "request": {"method": "PUT", "url": f"ServiceRequest/{d['id']}"}})
    try:
        BundleProcessor(_sandbox()["service"]).process(
            OPEN, _fhir_base(), {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    except FhirProblem as exc:
        sess.say("error", "The sandbox refused the signed order.", exc.message)
        return
    sess.signed = [f"ServiceRequest/{d['id']}" for d in sess.drafts]
    for ref in sess.signed:
        sess.log(f"Signed: {ref} written to the sandbox (status active)", ref)
    sess.say("done", "Order signed.", *[f"{ref} is in the sandbox's FHIR store, status active." for ref in sess.signed])


# ---------------------------------------------------------------------------------------------------------------
# Views


@bp.post("")
@bp.post("/")
def send() -> Response:
    f = request.form
    form = {"patient": f.get("patient", ""), "user": f.get("user", ""), "techniques": f.getlist("technique"),
            "sites": f.getlist("site")}
    errors = []
    patient = next((p for p in _patients() if p["id"] == form["patient"]), None)
    user = next((u for u in _users() if u["id"] == form["user"]), None)
    techniques = [t for t in form["techniques"] if t in C.TECHNIQUES]
    valid_sites = dict(_site_options())
    sites = [s for s in form["sites"] if s in valid_sites]
    if patient is not None and user is not None and not _may_order(user, patient):
        # As /ehr/launch: an EHR does not open a chart outside the user's care relationships.
        return _render(403, form=form, errors=[
            f"{user['name']} may not order for this patient: they are not on the patient's care team (nor the "
            "patient's primary care provider). Choose one of their patients."])
    if patient is None:
        errors.append("Choose a patient.")
    if user is None:
        errors.append("Choose the ordering clinician.")
    if not techniques:
        errors.append("Choose at least one technique.")
    action = f.get("action")
    if action not in ("select", "sign"):
        errors.append("Use the Select or Sign button.")
    if errors:
        return _render(400, form=form, errors=errors)
    assert patient is not None and user is not None
    sess = OrderSession(id=secrets.token_urlsafe(18), patient=patient, user=user,
                        drafts=_draft_orders(patient["id"], user["fhirUser"], techniques, sites),
                        expires=time.monotonic() + SESSION_TTL)
    try:
        if action == "sign":
            _sign(sess)
        else:
            _run(sess, "order-select")
    except _CdsCallError as exc:
        return _render(502, form=form, errors=[str(exc)], patient=patient)
    _state().add_session(sess)
    return redirect(url_for("sandbox_ehr_orders.show", sid=sess.id), code=303)


def _session_or_404(sid: str) -> OrderSession | Response:
    sess = _state().session(sid)
    if sess is None:
        return _render(404, errors=["This order is unknown or has expired (orders are kept for 2 hours). Start a "
                                    "new order below."])
    return sess


def _back(sess: OrderSession) -> Response:
    return redirect(url_for("sandbox_ehr_orders.show", sid=sess.id) + "#status", code=303)


@bp.get("/s/<sid>")
def show(sid: str) -> Response:
    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    res = sess.result
    cards = []
    for key, card in (res.keyed() if res else []):
        ind = card.get("indicator") if card.get("indicator") in ("critical", "warning", "info") else "info"
        cards.append({"key": key, "card": card, "indicator": ind, "decision": sess.decisions.get(key),
                      "suggestions": _dicts(card, "suggestions"), "reasons": _dicts(card, "overrideReasons"),
                      "links": _dicts(card, "links")})
    resp = current_app.make_response(render_template(
        "ehr_orders/session.html", sess=sess, result=res, cards=cards,
        drafts=[_draft_view(d) for d in sess.drafts], render_markdown=render_markdown,
        current=bool(res and res.drafts_version == sess.drafts_version), cds_base=_state().cds_base_url))
    return _secure(resp)


def _current_card(sess: OrderSession) -> tuple[HookResult, str, dict[str, Any]]:
    res = sess.result
    if sess.signed:
        raise _ActionError("This order is signed; its cards can no longer be acted on.")
    if res is None or request.values.get("hook_instance") != res.hook_instance:
        raise _ActionError("Those cards were replaced by a newer call to the CDS service; act on the cards shown "
                           "now.")
    key = request.values.get("card", "")
    card = dict(res.keyed()).get(key)
    if card is None:
        raise _ActionError("That card is not among the cards shown now.")
    if key in sess.decisions:
        raise _ActionError(f"That card was already {sess.decisions[key].outcome}.")
    return res, key, card


@bp.post("/s/<sid>/check")
def check(sid: str) -> Response:
    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    with sess.lock:
        if sess.signed:
            sess.say("info", "Already signed.", "Start a new order to order again.")
        elif not sess.drafts:
            sess.say("error", "Nothing to check.", "This order has no draft left.")
        else:
            try:
                res = _run(sess, "order-select")
                sess.say("info", f"order-select sent again: {len(res.cards)} card(s).")
            except _CdsCallError as exc:
                sess.say("error", "The CDS service could not be asked.", str(exc))
    return _back(sess)


@bp.post("/s/<sid>/sign")
def sign(sid: str) -> Response:
    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    with sess.lock:
        try:
            _sign(sess)
        except _CdsCallError as exc:
            sess.say("error", "Not signed: the CDS service could not be asked (order-sign).", str(exc))
    return _back(sess)


@bp.post("/s/<sid>/accept")
def accept(sid: str) -> Response:
    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    with sess.lock:
        try:
            res, key, card = _current_card(sess)
            suggestions = _dicts(card, "suggestions")
            wanted = request.form.get("suggestion", "")
            suggestion = next((s for i, s in enumerate(suggestions) if wanted in (s.get("uuid"), f"#{i}")), None)
            if suggestion is None:
                raise _ActionError("That suggestion is not on the card.")
            done = _apply(sess, suggestion)
        except _ActionError as exc:
            sess.say("error", "Nothing was applied.", str(exc))
            return _back(sess)
        label = str(suggestion.get("label") or "the suggestion")
        sess.log(f"Accepted “{label}” on “{card.get('summary')}”")
        lines = [f"Applied {d}." for d in done] or ["The suggestion has no actions: nothing to apply."]
        entry: dict[str, Any] | None = None
        if key[0] != "#":
            item: dict[str, Any] = {"card": key, "outcome": "accepted", "outcomeTimestamp": _now_instant()}
            if isinstance(suggestion.get("uuid"), str):
                item["acceptedSuggestions"] = [{"id": suggestion["uuid"]}]
            entry = _send_feedback(sess, res, item)
        words = _feedback_words(entry)
        sess.log(words)
        lines.append(words)
        if not sess.drafts:
            sess.result = None
            sess.decisions = {}
            lines.append("No draft order is left, so there is nothing to check or sign.")
        elif sess.drafts_version != res.drafts_version:
            try:
                new = _run(sess, res.hook)
                lines.append(f"{res.hook} sent again with the changed order (new hookInstance): "
                             f"{len(new.cards)} card(s).")
            except _CdsCallError as exc:
                sess.result = None
                lines.append(f"The order changed but the CDS service could not be asked again: {exc} Press "
                             "“Check again”.")
        else:
            # Nothing in the order changed (a clearance Task was created, say): asking again would return the same
            # card as new, undecided; the card stays, accepted.
            sess.decisions[key] = Decision("accepted", suggestion=label, feedback=words)
        sess.say("done", f"Accepted: {label}", *lines)
    return _back(sess)


@bp.post("/s/<sid>/override")
def override(sid: str) -> Response:
    from fhir_massage.sandbox.access import OPEN
    from fhir_massage.sandbox.outcome import FhirProblem

    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    with sess.lock:
        try:
            res, key, card = _current_card(sess)
            reasons = _dicts(card, "overrideReasons")
            reason = _nth(reasons, request.form.get("reason", ""))
            if reasons and reason is None:
                raise _ActionError("Choose one of the card's override reasons.")
        except _ActionError as exc:
            sess.say("error", "Not overridden.", str(exc))
            return _back(sess)
        comment = request.form.get("comment", "").strip()[:COMMENT_MAX] or None
        reason_text = str(reason.get("display") or reason.get("code")) if reason else None
        decision = Decision("overridden", reason=reason_text, comment=comment)
        entry: dict[str, Any] | None = None
        if key[0] != "#":
            item: dict[str, Any] = {"card": key, "outcome": "overridden", "outcomeTimestamp": _now_instant()}
            over: dict[str, Any] = {}
            if reason is not None:
                over["reason"] = {k: reason[k] for k in ("system", "version", "code", "display") if k in reason}
            if comment:
                over["userComment"] = comment
            if over:
                item["overrideReason"] = over
            # FHIR access on the feedback is the fhir-massage service's documented extension; given only when the
            # hook call that produced the card had it (the EHR trusted the service with data then).
            entry = _send_feedback(sess, res, item, with_fhir=res.fhir_access)
        decision.feedback = _feedback_words(entry)
        ref = (entry or {}).get("detectedIssue")
        if isinstance(ref, str) and ref.startswith("DetectedIssue/"):
            try:
                issue = _sandbox()["service"].read(OPEN, _fhir_base(), "DetectedIssue", ref.split("/", 1)[1]).body
                mitigation = "; ".join(str((m.get("action") or {}).get("text") or "") for m in
                                       (issue or {}).get("mitigation") or [] if isinstance(m, dict))
                decision.detected_issue = {"ref": ref, "status": (issue or {}).get("status"),
                                           "mitigation": mitigation}
            except FhirProblem as exc:
                decision.detected_issue = {"ref": ref, "missing": exc.message}
        sess.decisions[key] = decision
        sess.log(f"Overrode “{card.get('summary')}”" + (f" ({reason_text})" if reason_text else ""))
        sess.log(decision.feedback, ref if isinstance(ref, str) else None)
        lines = [f"Reason: {reason_text}." if reason_text else "", f"Comment: {comment}" if comment else "",
                 decision.feedback]
        if decision.detected_issue and "missing" not in decision.detected_issue:
            lines.append(f"{ref} is in the sandbox's FHIR store (status {decision.detected_issue['status']}).")
        elif decision.detected_issue:
            lines.append(f"{ref} was not found in the sandbox: {decision.detected_issue['missing']}")
        sess.say("done", f"Overridden: {card.get('summary')}", *lines)
    return _back(sess)


@bp.get("/s/<sid>/app")
def launch_app(sid: str) -> Response:
    """A card's smart link: a real EHR launch (launch id, iss) of the registered app, appContext passed on."""
    sess = _session_or_404(sid)
    if isinstance(sess, Response):
        return sess
    res = sess.result
    card = dict(res.keyed()).get(request.args.get("card", "")) if res else None
    if res is None or request.args.get("hook_instance") != res.hook_instance or card is None:
        return _launch_error(sess, "That card is no longer shown (the CDS service was asked again); use the link "
                                   "on a current card.")
    link = _nth(_dicts(card, "links"), request.args.get("link", ""))
    if link is None or link.get("type") != "smart" or not isinstance(link.get("url"), str):
        return _launch_error(sess, "That is not a smart link of the card.")
    auth = _sandbox().get("auth")
    if auth is None:
        return _launch_error(sess, "This sandbox runs open (without its authorization server), so it cannot launch "
                                   "SMART apps. Start it with authorization to follow smart links.")
    target = _no_query(link["url"])
    client = next((c for c in auth.all_clients() if c.launch_url and _no_query(c.launch_url) == target), None)
    if client is None:
        return _launch_error(sess, f"No app registered in this EHR has the launch URL {target}; an EHR launches "
                                   "only apps registered with it.")
    app_context = link.get("appContext") if isinstance(link.get("appContext"), str) else None
    out = auth.create_launch(client.client_id, sess.user["id"], sess.patient["id"], app_context=app_context)
    sess.log(f"Opened {client.name or client.client_id} from “{card.get('summary')}” (EHR launch"
             + (", appContext passed on" if app_context else "") + ")")
    if request.args.get("embed") == "0":
        return redirect(out["launch_url"], code=303)
    origin = urlsplit(out["launch_url"])
    resp = current_app.make_response(render_template(
        "ehr_orders/app.html", sess=sess, app_url=out["launch_url"], client=client, card=card,
        app_context=app_context))
    _secure(resp)
    # the app in a frame, as EHRs embed it; 'self' too: inside the frame the app goes to our /auth/authorize
    resp.headers["Content-Security-Policy"] = resp.headers["Content-Security-Policy"].replace(
        "frame-ancestors 'none'", f"frame-src {origin.scheme}://{origin.netloc} 'self'; frame-ancestors 'none'")
    return resp


def _no_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _launch_error(sess: OrderSession, message: str) -> Response:
    sess.say("error", "The app was not opened.", message)
    return _back(sess)
