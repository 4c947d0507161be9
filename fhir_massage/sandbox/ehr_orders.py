"""The sandbox EHR's order entry, calling CDS Hooks services the way an EHR does (CDS Hooks 2.0.1; hooks
order-select and order-sign v1.0).

The user picks a clinician, a patient, massage technique(s) and body site(s); the page builds draft
ServiceRequests (one per technique, status ``draft``) and, server-side:

1. reads the CDS service's discovery document (``GET {cds_base}/cds-services``) and picks the service for the hook;
2. fills its prefetch templates from the sandbox's own FHIR data (only ``{{context.patientId}}`` /
   ``{{context.userId}}`` tokens; a key whose query fails gets an OperationOutcome, as the spec says);
3. signs a JWT (ES384, ``kid``, ``jku``; ``iss`` = the sandbox base URL, ``aud`` = the exact service URL, ``exp`` in
   5 minutes, a fresh ``jti``) with a key made at install; its JWKS is served at ``/ehr/cds-jwks``;
4. POSTs the hook and shows the cards: summary, indicator (as text, not colour alone), the markdown detail
   rendered from an escaped subset (paragraphs, lists, **bold**, `code`, backslash escapes; no HTML, no links),
   source, suggestions and override reasons (listed, not applied: the simulator does not edit its orders).

Routes: ``GET /ehr/orders`` (form), ``POST /ehr/orders`` (send a hook; ``action`` = ``select`` | ``sign``),
``POST /ehr/orders/settings`` (loopback only, JSON ``{"cds_base_url": ...}``: tests start the app after the
sandbox), ``GET /ehr/orders/cards.css``, ``GET /ehr/cds-jwks``.

The CDS base URL comes from ``install(app, config, cds_base_url=...)``, else ``config.auth["cds_base_url"]``,
else the environment variable ``FHIR_MASSAGE_SANDBOX_CDS_URL``, else the settings endpoint.

To register the sandbox with the app's CDS service: ``{"iss": "<sandbox>/fhir", "client_id": ...,
"cds_iss": "<sandbox>", "cds_jwks_url": "<sandbox>/ehr/cds-jwks"}``.
"""

from __future__ import annotations

import html
import ipaddress
import os
import re
import secrets
import threading
import time
import uuid
from typing import Any, Mapping
from urllib.parse import parse_qsl

import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request
from joserfc import jwt
from joserfc.jwk import ECKey
from markupsafe import Markup, escape

from fhir_massage import codes as C

__all__ = ["install", "render_markdown", "EXT"]

EXT = "fhir_massage.sandbox.ehr_orders"
DISCOVERY_TTL = 60.0
TIMEOUT = (5.0, 30.0)

bp = Blueprint("sandbox_ehr_orders", __name__, template_folder="templates", url_prefix="/ehr/orders")
jwks_bp = Blueprint("sandbox_ehr_cds_jwks", __name__, url_prefix="/ehr")

# Card look: served from here (the simulator's CSP allows only same-origin styles, no inline ones).
CARDS_CSS = """
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 16px;
       color: #1d2329; background: #f5f7f9; }
.banner { background: #005f73; color: #fff; padding: 0.25rem 1rem; }
main { padding: 1rem; max-width: 72rem; }
fieldset { border: 1px solid #9aa5b1; border-radius: 4px; margin: 0 0 1rem; }
.choice { margin: 0.25rem 0; }
.note { color: #3e4c59; }
.error { color: #b00020; font-weight: bold; }
button { font-size: 1rem; padding: 0.4rem 1rem; border-radius: 4px; border: 1px solid #005f73;
         background: #005f73; color: #fff; cursor: pointer; margin-right: 0.5rem; }
:focus-visible { outline: 3px solid #ee9b00; outline-offset: 2px; }
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
"""


class _State:
    def __init__(self, cds_base_url: str | None) -> None:
        self.key = ECKey.generate_key("P-384", private=True)
        self.key.ensure_kid()
        self.cds_base_url = cds_base_url.rstrip("/") if cds_base_url else None
        self.http = requests.Session()
        self._lock = threading.Lock()
        self._discovery: dict[str, tuple[float, dict[str, Any]]] = {}

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
    app.extensions[EXT] = _State(cds_base_url)
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


def _patients() -> list[dict[str, Any]]:
    from fhir_massage.sandbox import demo

    return list(demo.DEMO_PATIENTS)


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
    form = ctx.pop("form", {})
    resp = current_app.make_response((render_template(
        "ehr_orders/index.html", users=_users(), patients=_patients(), techniques=C.TECHNIQUES,
        technique_display=C.TECHNIQUE_DISPLAY, sites=_site_options(), form=form, cds_base=_state().cds_base_url,
        render_markdown=render_markdown, **ctx), status))
    return _secure(resp)


@bp.get("")
@bp.get("/")
def index() -> Response:
    return _render(form={"patient": request.args.get("patient", ""), "user": request.args.get("user", "")})


@bp.get("/cards.css")
def cards_css() -> Response:
    return Response(CARDS_CSS, mimetype="text/css")


@jwks_bp.get("/cds-jwks")
def cds_jwks() -> Response:
    return jsonify(_state().public_jwks())


def _is_loopback(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


@bp.post("/settings")
def settings() -> Response:
    if not _is_loopback(request.remote_addr):
        return jsonify({"error": "forbidden", "message": "Settings answer loopback callers only."}), 403
    data = request.get_json(silent=True)
    url = data.get("cds_base_url") if isinstance(data, dict) else None
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        return jsonify({"error": "invalid", "message": "cds_base_url must be an http(s) URL."}), 400
    _state().cds_base_url = url.rstrip("/")
    return jsonify({"cds_base_url": _state().cds_base_url})


# ---------------------------------------------------------------------------------------------------------------
# Sending a hook


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
            "id": f"draft-{secrets.token_hex(6)}",
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


def _prefetch(templates: Mapping[str, Any], patient: str, user_ref: str) -> dict[str, Any]:
    """Fill the service's prefetch templates from the sandbox's own data (the EHR reads its own database; no
    token involved). Keys with tokens we do not have are left out (spec: the client may satisfy some keys)."""
    from fhir_massage.sandbox.access import OPEN
    from fhir_massage.sandbox.fhir_api import EXT as FHIR_EXT
    from fhir_massage.sandbox.outcome import FhirProblem

    service = current_app.extensions[FHIR_EXT]["service"]
    base = f"{_base()}/fhir"
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


def _call(hook: str, patient: str, user_ref: str, drafts: list[dict[str, Any]]) -> dict[str, Any]:
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
    context: dict[str, Any] = {"userId": user_ref, "patientId": patient,
                               "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                               "entry": [{"fullUrl": f"{_base()}/fhir/ServiceRequest/{d['id']}",
                                                          "resource": d} for d in drafts]}}
    if hook == "order-select":
        context["selections"] = [f"ServiceRequest/{d['id']}" for d in drafts]
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context,
            "prefetch": _prefetch(service.get("prefetch") or {}, patient, user_ref)}
    try:
        resp = state.http.post(url, json=body, timeout=TIMEOUT,
                               headers={"Authorization": f"Bearer {_token(url)}", "Accept": "application/json"})
    except requests.RequestException:
        raise _CdsCallError("The CDS service could not be reached.") from None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code != 200 or not isinstance(answer, dict):
        message = answer.get("message") if isinstance(answer, dict) else None
        raise _CdsCallError(f"The CDS service answered HTTP {resp.status_code}"
                            + (f": {message}" if isinstance(message, str) else "."))
    cards = [c for c in answer.get("cards") or [] if isinstance(c, dict)]
    return {"service": service.get("title") or service["id"], "hook": hook, "cards": cards}


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
    hook = "order-select" if action == "select" else "order-sign"
    drafts = _draft_orders(patient["id"], user["fhirUser"], techniques, sites)
    try:
        result = _call(hook, patient["id"], user["fhirUser"], drafts)
    except _CdsCallError as exc:
        return _render(502, form=form, errors=[str(exc)], patient=patient)
    return _render(form=form, result=result, patient=patient)
