"""The SMART launch: ``/launch`` → EHR authorize → ``/callback`` → a launch session → the landing page.

Launch sessions live in the store (``session`` namespace: context; ``tokens`` namespace: tokens), keyed by a
random launch session id (``lsid``) that travels in the URL (``/p/<lsid>/...``) and is bound to the browser
cookie (security.py). So two tabs with two patients are two sessions that never mix (SMART has no patient-change
sync, AL "Profile audience and scope": every chart opens its own launch), and a copied URL opens nothing in
another browser.

For the other areas (orders, sessions, plan, cds):

* ``require_launch`` (or ``require_launch(roles=("physician",))``) puts a ``LaunchContext`` in ``flask.g.ctx``;
* ``fhir_client()`` is a ``FhirClient`` for the session's FHIR base with a refreshing token source;
* ``url_for_launch(endpoint, **values)`` is ``url_for`` carrying the lsid (plain ``url_for`` does too, inside a
  launch request, for endpoints whose rule has ``<lsid>``);
* put launch pages under ``/p/<lsid>/...`` (e.g. ``Blueprint("orders", __name__, url_prefix="/p/<lsid>/orders")``);
  views do not take ``lsid`` as an argument (it is moved into ``g.lsid``).
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import requests
from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for

from fhir_massage import smart
from fhir_massage.chart_fetch import batch_patient
from fhir_massage.errors import FhirError, LaunchError
from fhir_massage.fhir import FhirClient, entry_outcomes, request_entry
from fhir_massage.writes import batch_or_each

from . import identity
from .security import browser_fingerprint, browser_id

log = logging.getLogger("smart_app.launch")

bp = Blueprint("launch", __name__)

NS_STATE = "state"
NS_SESSION = "session"
NS_TOKENS = "tokens"
NS_STYLE = "style"

_LSID = re.compile(r"^[A-Za-z0-9_\-]{20,64}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


# ---------------------------------------------------------------------------------------------------------------
# Per-app state


@dataclass
class AppState:
    """What create_app builds once: registrations, caches, the shared HTTP session."""

    registry: dict[str, Any]
    discovery: smart.DiscoveryCache
    jwks: smart.JwksCache
    oidc: smart.JwksCache  # openid-configuration documents, same TTL logic
    http: requests.Session
    secure_cookies: bool
    timeout: Any

    def smart_config(self, iss: str) -> smart.SmartConfiguration:
        return self.discovery.get(iss, lambda i: smart.discover(i, session=self.http, timeout=self.timeout))


def _state() -> AppState:
    return current_app.extensions["smart_app"]


def _store():
    return current_app.extensions["store"]


# ---------------------------------------------------------------------------------------------------------------
# Launch context


@dataclass(frozen=True)
class Area:
    """A user-facing area of the app and what it needs (granted scope, role)."""

    name: str  # blueprint name; the landing links to "<name>.index"
    label: str
    roles: tuple[str, ...]
    needs: tuple[tuple[str, str], ...]  # (resource type, action) the area cannot work without
    why: str  # what the area is for, one line


AREAS: tuple[Area, ...] = (
    Area("orders", "Order massage", (identity.PHYSICIAN,), (("ServiceRequest", "create"),),
         "Screen the chart for contraindications and order medical massage."),
    Area("sessions", "Document a session", (identity.THERAPIST,), (("Procedure", "create"),),
         "Record a massage session against its order."),
    Area("plan", "Plan", (identity.PHYSICIAN, identity.THERAPIST), (("ServiceRequest", "read"),),
         "Orders, sessions and progress for this patient."),
)


@dataclass(frozen=True)
class LaunchContext:
    """Everything a view needs to know about the current launch. No tokens in here."""

    sid: str
    iss: str
    fhir_base: str
    client_id: str
    patient_id: str | None
    encounter_id: str | None
    user_ref: str | None  # "Practitioner/123" (relative to fhir_base), None when unknown
    user_name: str | None
    role: str | None  # identity.PHYSICIAN | identity.THERAPIST | None (not yet asked)
    role_source: str
    scopes: smart.Scopes
    need_patient_banner: bool
    intent: str | None
    style: bool  # the EHR sent a smart_style_url
    banner: dict[str, Any] | None
    standalone: bool
    fhir_context: tuple[dict[str, Any], ...] = ()
    ehr_name: str = ""
    notes: tuple[str, ...] = field(default=())

    def can(self, resource_type: str, action: str) -> bool:
        """Whether the granted scopes allow ``action`` (create/read/update/delete/search or cruds letters)."""
        return self.scopes.can(resource_type, action)

    @property
    def role_label(self) -> str:
        return identity.ROLE_LABELS.get(self.role or "", "Role not set")

    def area_status(self, area: Area) -> tuple[bool, str | None]:
        """(available, reason when not)."""
        if self.role not in area.roles:
            who = " or ".join(identity.ROLE_LABELS[r].lower() + "s" for r in area.roles)
            return False, f"For {who}."
        for rtype, action in area.needs:
            if not self.can(rtype, action):
                verb = {"create": "create", "read": "read", "update": "update"}.get(action, action)
                return False, (f"The EHR did not grant this app permission to {verb} {rtype} resources "
                               f"(granted scopes decide what the app may do).")
        return True, None


def _context_from(sid: str, rec: Mapping[str, Any]) -> LaunchContext:
    reg = _state().registry.get(rec["iss"])
    return LaunchContext(
        sid=sid, iss=rec["iss"], fhir_base=rec["fhir_base"], client_id=rec["client_id"],
        patient_id=rec.get("patient"), encounter_id=rec.get("encounter"), user_ref=rec.get("user_ref"),
        user_name=rec.get("user_name"), role=rec.get("role"), role_source=rec.get("role_source") or "",
        scopes=smart.Scopes.parse(rec.get("scope")), need_patient_banner=rec.get("need_patient_banner", True),
        intent=rec.get("intent"), style=bool(rec.get("smart_style_url")), banner=rec.get("banner"),
        standalone=bool(rec.get("standalone")), fhir_context=tuple(rec.get("fhir_context") or ()),
        ehr_name=reg.name if reg else rec["iss"], notes=tuple(rec.get("notes") or ()),
    )


def load_context(sid: str | None) -> LaunchContext:
    if not sid or not _LSID.match(sid):
        raise LaunchError("This page needs a launch from the EHR.", code="no-session")
    rec = _store().get(NS_SESSION, sid)
    if rec is None:
        raise LaunchError("This app session has ended or expired. Open the app again from the patient's chart in "
                          "the EHR.", code="no-session")
    fp = browser_fingerprint()
    if fp is None or not secrets.compare_digest(fp, rec.get("browser") or ""):
        raise LaunchError("This app session was started in another browser or the app's cookie is missing. Open "
                          "the app again from the EHR.", code="other-browser")
    return _context_from(sid, rec)


def require_launch(view: Callable | None = None, *, roles: tuple[str, ...] | None = None,
                   need_role: bool = True) -> Callable:
    """Decorator: load the launch session named by the URL's ``<lsid>`` into ``g.ctx``.

    ``roles``: only these roles may use the view (others get a 403 page). ``need_role``: when the role is not
    known yet, send the user to the one-time role question first (GET only; other methods get a 409 page).
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sid = kwargs.pop("lsid", None) or g.get("lsid")
            ctx = load_context(sid)
            g.ctx = ctx
            g.lsid = ctx.sid
            if need_role and ctx.role is None:
                if request.method == "GET":
                    return redirect(url_for("launch.role", lsid=ctx.sid, next=request.full_path))
                raise LaunchError("Choose your role first.", code="role-missing")
            if roles is not None and ctx.role not in roles:
                abort(403, description="This part of the app is for "
                      + " or ".join(identity.ROLE_LABELS[r].lower() + "s" for r in roles) + ".")
            return fn(*args, **kwargs)

        return wrapper

    return decorate(view) if view is not None else decorate


def url_for_launch(endpoint: str, **values: Any) -> str:
    ctx = g.get("ctx")
    if ctx is None:
        raise RuntimeError("url_for_launch is only for requests inside a launch (use require_launch).")
    values.setdefault("lsid", ctx.sid)
    return url_for(endpoint, **values)


# ---------------------------------------------------------------------------------------------------------------
# Tokens


class SessionTokenSource:
    """The FhirClient's token source for one launch session (fhir.TokenSource protocol).

    ``token()`` refreshes shortly before expiry; ``refresh()`` (the client calls it once on a 401) refreshes now.
    One refresh at a time per session across threads and processes (store lock), and a caller that waited for
    someone else's refresh takes that result instead of spending the refresh token again (reference row 33).
    """

    def __init__(self, store: Any, sid: str, refresh_fn: Callable[[str, str], smart.TokenResponse], *,
                 skew: float = 60.0, ttl: float = 8 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.sid = sid
        self._refresh_fn = refresh_fn
        self.skew = skew
        self.ttl = ttl
        self._clock = clock
        self._last: str | None = None
        self.refreshes = 0

    def __repr__(self) -> str:
        return "SessionTokenSource(***)"

    def _due(self, rec: Mapping[str, Any]) -> bool:
        lifetime = float(rec.get("lifetime") or 0) or smart.FALLBACK_LIFETIME_S
        skew = min(self.skew, lifetime / 4)  # a 1-second token is not "due" before it is issued
        return float(rec["expires_at"]) - skew <= self._clock()

    def token(self) -> str | None:
        rec = self.store.get(NS_TOKENS, self.sid)
        if rec is None:
            raise LaunchError("Your session with the EHR has ended.", code="session-ended")
        if self._due(rec):
            fresh = self._refresh(rec["access_token"])
            if fresh is None:
                raise LaunchError("Your session with the EHR has ended (the access token expired and could not be "
                                  "renewed).", code="session-ended")
            return fresh
        self._last = rec["access_token"]
        return self._last

    def refresh(self) -> str | None:
        return self._refresh(self._last)

    def _refresh(self, seen: str | None) -> str | None:
        with self.store.lock("refresh", self.sid, lease=30.0, wait=30.0):
            rec = self.store.get(NS_TOKENS, self.sid)
            if rec is None:
                return None
            if seen is not None and rec["access_token"] != seen and not self._due(rec):
                self._last = rec["access_token"]  # another request refreshed while we waited
                return self._last
            if not rec.get("refresh_token"):
                return None
            try:
                answer = self._refresh_fn(rec["refresh_token"], rec.get("scope") or "")
            except LaunchError as exc:
                log.info("token refresh refused (%s); the session ends", exc.code)
                self.store.delete(NS_TOKENS, self.sid)
                return None
            now = self._clock()
            new = {
                "access_token": answer.access_token,
                # AL "Refresh access token": replace the refresh token only when a new one comes back
                "refresh_token": answer.refresh_token or rec["refresh_token"],
                "expires_at": answer.expires_at,
                "lifetime": max(1.0, answer.expires_at - now),
                "scope": answer.scope or rec.get("scope"),
            }
            self.store.put(NS_TOKENS, self.sid, new, self.ttl)
            self.refreshes += 1
            self._last = answer.access_token
            return self._last


def _refresher(iss: str) -> Callable[[str, str], smart.TokenResponse]:
    state = _state()
    reg = state.registry.get(iss)

    def refresh(refresh_token: str, scope: str) -> smart.TokenResponse:
        if reg is None:
            raise LaunchError("This EHR is no longer registered with the app.", code="unknown-iss")
        config = state.smart_config(iss)
        return smart.refresh_access_token(config, reg.client_auth, refresh_token=refresh_token, current_scope=scope,
                                          session=state.http, timeout=state.timeout)

    return refresh


def token_source(sid: str, iss: str) -> SessionTokenSource:
    cfg = current_app.config
    return SessionTokenSource(_store(), sid, _refresher(iss), skew=float(cfg["REFRESH_SKEW"]),
                              ttl=float(cfg["SESSION_TTL"]))


def fhir_client() -> FhirClient:
    """A FhirClient for the current launch (inside ``require_launch``). Tokens go only to this launch's FHIR base
    (FhirClient refuses other origins, RFC 6750 §5.3 / AL "Access FHIR API")."""
    ctx = g.get("ctx")
    if ctx is None:
        raise RuntimeError("fhir_client() is only for requests inside a launch (use require_launch).")
    client = g.get("fm_fhir_client")
    if client is None:
        client = FhirClient(ctx.fhir_base, token_source=token_source(ctx.sid, ctx.iss),
                            timeout=_state().timeout, session=_state().http)
        g.fm_fhir_client = client
    return client


# ---------------------------------------------------------------------------------------------------------------
# Routes


def _redirect_uri() -> str:
    public = current_app.config.get("PUBLIC_URL")
    if public:
        return public.rstrip("/") + "/callback"
    return url_for("launch.callback", _external=True)


@bp.get("/launch")
def launch() -> Response:
    """AL "Launch App: EHR Launch" (iss + launch) and "Standalone Launch" (iss alone)."""
    iss = request.args.get("iss")
    launch_id = request.args.get("launch")
    state = _state()
    if not iss:
        return render_template("launch/start.html", registrations=list(state.registry.values())), 400
    reg = state.registry.get(iss)
    if reg is None:
        # AL "App protection": validate iss before any request to it (no open redirect, no SSRF).
        raise LaunchError("The app was opened from an EHR it is not set up for, so it did not contact it. Ask the "
                          "app's administrator to register this EHR.", code="unknown-iss")
    if launch_id is not None and not launch_id.strip():
        raise LaunchError("The EHR sent an empty launch parameter; open the app again from the EHR.", code="launch")
    config = state.smart_config(iss)
    if secrets.randbelow(64) == 0:
        _store().purge_expired()  # now and then, so abandoned launches do not pile up in the store
    standalone = launch_id is None
    dialect = smart.choose_dialect(reg.scope_dialect, config.capabilities)
    if reg.scopes:
        scope = smart.standalone_scopes(reg.scopes) if standalone else reg.scopes
    else:
        scope = smart.default_scopes(dialect, standalone=standalone, capabilities=config.capabilities)
    verifier, challenge = smart.pkce_pair()
    state_value = smart.new_state()
    nonce = smart.new_nonce()
    redirect_uri = _redirect_uri()
    _store().put(NS_STATE, state_value, {
        "browser": browser_fingerprint(browser_id(create=True)),
        "iss": iss, "launch": launch_id, "verifier": verifier, "nonce": nonce, "scope": scope,
        "redirect_uri": redirect_uri, "standalone": standalone,
    }, float(current_app.config["STATE_TTL"]))
    target = smart.authorize_url(config, client_id=reg.client_id, redirect_uri=redirect_uri, scope=scope,
                                 state=state_value, code_challenge=challenge, aud=iss, launch=launch_id, nonce=nonce)
    log.info("launch: redirecting to the authorization endpoint of %s (%s launch)", urlsplit(iss).netloc,
             "standalone" if standalone else "EHR")
    return redirect(target, code=302)


@bp.get("/callback")
def callback() -> Response:
    """AL "Obtain authorization code / Response", then the token exchange and the launch session."""
    args = request.args
    state_value = args.get("state")
    rec = _store().take(NS_STATE, state_value) if state_value and len(state_value) <= 200 else None
    if args.get("error"):
        # An OAuth error redirect (RFC 6749 §4.1.2.1): show the EHR's words (escaped by the template).
        desc = " ".join((args.get("error_description") or "").split())[:300]
        words = {"access_denied": "You (or the EHR) declined to let the app in.",
                 "invalid_scope": "The EHR refused the permissions the app asked for."}.get(args["error"], "")
        raise LaunchError(f"The EHR answered '{args['error'][:60]}'{': ' + desc if desc else ''}. {words}".strip(),
                          code="authorize-error")
    if rec is None:
        raise LaunchError("This sign-in link is not valid: it was already used, has expired (after "
                          f"{int(current_app.config['STATE_TTL']) // 60} minutes) or was altered. Open the app "
                          "again from the EHR.", code="state")
    if not secrets.compare_digest(rec["browser"] or "", browser_fingerprint() or ""):
        raise LaunchError("This sign-in was started in another browser (or the app's cookie was blocked). Open the "
                          "app again from the EHR in this browser.", code="state")
    code = args.get("code")
    if not code:
        raise LaunchError("The EHR sent no authorization code.", code="state")
    state = _state()
    iss = rec["iss"]
    reg = state.registry.get(iss)
    if reg is None:
        raise LaunchError("This EHR is no longer registered with the app.", code="unknown-iss")
    config = state.smart_config(iss)
    tokens = smart.exchange_code(config, reg.client_auth, code=code, redirect_uri=rec["redirect_uri"],
                                 code_verifier=rec["verifier"], requested_scope=rec["scope"], session=state.http,
                                 timeout=state.timeout)
    notes: list[str] = []
    user_ref = None
    claims: dict[str, Any] = {}
    if tokens.id_token:
        claims = _verify_id_token(config, reg, tokens.id_token, rec["nonce"]).claims
        fhir_user = claims.get("fhirUser") or claims.get("profile")
        user_ref = smart.fhir_user_reference(fhir_user if isinstance(fhir_user, str) else None, iss)
        if fhir_user and user_ref is None:
            notes.append("The EHR named a user on another server; the app does not look it up there.")
    elif "openid" in rec["scope"].split():
        notes.append("The EHR did not say who is signed in (no id_token).")
    patient_id, encounter_id = tokens.patient, tokens.encounter
    if patient_id is not None and not _FHIR_ID.match(patient_id):
        # an id is [A-Za-z0-9-.]{1,64} (FHIR R4 datatypes "id"); anything else could steer our requests elsewhere
        notes.append("The EHR sent a patient id that is not a valid FHIR id, so the app ignored it.")
        patient_id = None
    if encounter_id is not None and not _FHIR_ID.match(encounter_id):
        encounter_id = None
    granted = smart.Scopes.parse(tokens.scope)
    sid = secrets.token_urlsafe(24)
    cfg = current_app.config
    ttl = float(cfg["SESSION_TTL"])
    now = time.time()
    _store().put(NS_TOKENS, sid, {
        "access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
        "expires_at": tokens.expires_at, "lifetime": max(1.0, tokens.expires_at - now), "scope": tokens.scope,
    }, ttl)
    session = {
        "browser": rec["browser"], "iss": iss, "fhir_base": iss, "client_id": reg.client_id,
        "patient": patient_id, "encounter": encounter_id, "user_ref": user_ref,
        "need_patient_banner": tokens.need_patient_banner, "intent": tokens.intent,
        "smart_style_url": tokens.smart_style_url, "fhir_context": list(tokens.fhir_context),
        "scope": tokens.scope, "requested_scope": rec["scope"], "standalone": rec["standalone"],
        "tenant": tokens.tenant, "created": now, "role": None, "role_source": "", "banner": None,
        "user_name": claims.get("name") if isinstance(claims.get("name"), str) else None,
    }
    if not patient_id and tokens.patient is None:
        notes.append("The EHR did not give a patient for this launch.")
    trimmed = granted.missing(rec["scope"])
    if trimmed:
        notes.append(f"The EHR granted fewer permissions than asked ({len(trimmed)} not granted).")
    # One batch for the landing page: the patient and the user's Practitioner/PractitionerRole (benchmark target).
    client = FhirClient(iss, token_source=token_source(sid, iss), timeout=state.timeout, session=state.http)
    try:
        patient, practitioner, roles = _landing_reads(client, patient_id, user_ref, notes)
    except FhirError:
        _store().delete(NS_TOKENS, sid)  # no session is made: nothing will use these tokens
        raise
    session["banner"] = identity.banner(patient)
    if practitioner is not None:
        session["user_name"] = identity.human_name(practitioner) or session["user_name"]
    elif user_ref and user_ref.startswith(("Patient/", "RelatedPerson/")):
        session["user_name"] = session["user_name"] or user_ref.split("/")[0]
    guess = identity.guess_role(user_ref, practitioner, roles)
    session["role"], session["role_source"] = guess.role, guess.source
    session["notes"] = notes
    _store().put(NS_SESSION, sid, session, ttl)
    log.info("launch session started (%s launch, role %s)", "standalone" if rec["standalone"] else "EHR",
             guess.role or "to ask")
    return redirect(_landing_target(sid, session, tokens.extras.get("appContext")), code=303)


def _landing_target(sid: str, session: Mapping[str, Any], app_context: Any) -> str:
    """Where a new launch lands. A launch from a CDS card's smart link carries the link's ``appContext`` in the token
    response (CDS Hooks 2.0 "Link"; our format: docs/cds-hooks.md): the orders area, the card's finding highlighted
    (``#finding-<rule>``), when it is about this launch's patient and the user may order. Anything else (absent,
    not ours, another patient, no orders area for this user) lands as usual: never an error."""
    from fhir_massage.cds_cards import parse_app_context

    landing = url_for("launch.landing", lsid=sid)
    wanted = parse_app_context(app_context, patient_id=session.get("patient")) if app_context else None
    area = next((a for a in AREAS if wanted and a.name == wanted.area), None)
    if wanted is None or area is None or f"{area.name}.index" not in current_app.view_functions:
        return landing
    if not _context_from(sid, session).area_status(area)[0]:
        return landing
    log.info("launch: appContext opens the %s area", area.name)
    return url_for(f"{area.name}.index", lsid=sid) + (f"#finding-{wanted.rule}" if wanted.rule else "")


def _verify_id_token(config: smart.SmartConfiguration, reg: Any, token: str, nonce: str) -> smart.IdToken:
    """SC "Steps for using an ID token": the issuer's keys from its openid-configuration (or the SMART
    configuration's jwks_uri), then OIDC checks. The discovery documents are cached per issuer."""
    state = _state()
    _header, unverified = smart.unverified_header_and_claims(token)
    issuer = config.issuer or unverified.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise LaunchError("The EHR's id_token names no issuer.", code="id-token")
    jwks_uri = config.jwks_uri if config.issuer else None
    if jwks_uri is None:
        origin = smart._origin(issuer)
        if origin not in config.origins():
            # do not fetch keys from a server the id_token itself names (it is not verified yet)
            raise LaunchError("The EHR's id_token names an issuer on another server.", code="id-token")
        oidc = state.oidc.get(issuer.rstrip("/") + "/.well-known/openid-configuration",
                              lambda url: smart.fetch_json(state.http, url, timeout=state.timeout,
                                                           what="OpenID configuration"))
        if oidc.get("issuer") != issuer or not isinstance(oidc.get("jwks_uri"), str):
            raise LaunchError("The EHR's OpenID configuration does not match its id_token issuer.", code="id-token")
        jwks_uri = oidc["jwks_uri"]
    kid = _header.get("kid") if isinstance(_header.get("kid"), str) else None
    jwks = state.jwks.get(jwks_uri, lambda url: smart.fetch_json(state.http, url, timeout=state.timeout,
                                                                 what="signing keys"), kid=kid)
    return smart.verify_id_token(token, jwks=jwks, issuer=issuer, client_id=reg.client_id, nonce=nonce)


def _landing_reads(client: FhirClient, patient_id: str | None, user_ref: str | None, notes: list[str]
                   ) -> tuple[dict | None, dict | None, list[dict]]:
    entries = []
    if patient_id:
        entries.append(("patient", request_entry("GET", f"Patient/{patient_id}")))
    if user_ref and user_ref.startswith("Practitioner/"):
        entries.append(("practitioner", request_entry("GET", user_ref)))
        entries.append(("roles", request_entry("GET", f"PractitionerRole?practitioner={user_ref}")))
    elif user_ref and user_ref.startswith("PractitionerRole/"):
        rid = user_ref.split("/", 1)[1]
        entries.append(("roles", request_entry("GET", f"PractitionerRole?_id={rid}"
                                                      "&_include=PractitionerRole:practitioner")))
    if not entries:
        return None, None, []
    try:
        answer = batch_or_each(client, [e for _, e in entries])  # an EHR without batch: one GET each
        results = entry_outcomes(answer)
        bodies = [a.get("resource") for a in answer.get("entry") or []]
    except FhirError as exc:
        if getattr(exc, "status", None) == 401:
            raise
        notes.append("The EHR could not answer the app's first request; some details are missing.")
        return None, None, []
    patient = practitioner = None
    roles: list[dict] = []
    for (kind, _), result, body in zip(entries, results, bodies):
        if kind == "patient":
            batch_patient(result)  # the EHR refused this launch's patient (FhirAuthError): say so, not "no details"
        if isinstance(result, FhirError):
            notes.append({"patient": "The patient's record could not be read.",
                          "practitioner": "Your user record could not be read.",
                          "roles": "Your roles could not be read."}[kind])
            continue
        resource = body if isinstance(body, dict) else result.resource
        if kind == "patient" and isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            patient = resource
        elif kind == "practitioner" and isinstance(resource, dict):
            practitioner = resource
        elif kind == "roles" and isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            for e in resource.get("entry") or []:
                res = (e or {}).get("resource") or {}
                if res.get("resourceType") == "PractitionerRole":
                    roles.append(res)
                elif res.get("resourceType") == "Practitioner" and practitioner is None:
                    practitioner = res
    return patient, practitioner, roles


def registered_areas() -> list[tuple[Area, bool, str | None, str | None]]:
    """(area, available, reason, url) for the landing page; url None when the area is not installed."""
    ctx: LaunchContext = g.ctx
    out = []
    for area in AREAS:
        endpoint = f"{area.name}.index"
        installed = endpoint in current_app.view_functions
        ok, reason = ctx.area_status(area)
        if not installed:
            ok, reason = False, "Not installed in this version of the app."
        url = url_for_launch(endpoint) if installed and ok else None
        out.append((area, ok, reason, url))
    return out


@bp.get("/p/<lsid>/")
@require_launch
def landing() -> str:
    return render_template("launch/landing.html", areas=registered_areas())


@bp.route("/p/<lsid>/role", methods=["GET", "POST"])
@require_launch(need_role=False)
def role() -> Any:
    """Asked once per launch when the EHR gives no way to tell the role."""
    ctx: LaunchContext = g.ctx
    nxt = request.values.get("next") or ""
    if not nxt.startswith(f"/p/{ctx.sid}/") or "//" in nxt or "\\" in nxt:  # no open redirect
        nxt = url_for("launch.landing", lsid=ctx.sid)
    if request.method == "POST":
        chosen = request.form.get("role")
        if chosen not in identity.ROLES:
            return render_template("launch/role.html", next=nxt, error="Choose one of the roles."), 400
        store = _store()
        with store.lock("session-update", ctx.sid, lease=10.0, wait=10.0):
            rec = store.get(NS_SESSION, ctx.sid)
            if rec is None:
                raise LaunchError("This app session has ended.", code="no-session")
            if rec.get("role") is None:  # once per launch: a known role is not overwritten
                rec["role"], rec["role_source"] = chosen, "you chose it"
                store.put(NS_SESSION, ctx.sid, rec, float(current_app.config["SESSION_TTL"]))
        return redirect(nxt, code=303)
    if ctx.role is not None:
        return redirect(nxt, code=303)
    return render_template("launch/role.html", next=nxt, error=None)


@bp.get("/p/<lsid>/style.css")
@require_launch(need_role=False)
def style_css() -> Response:
    """SC "SMART App Styling": the EHR's style values, validated, as CSS custom properties (never inline)."""
    from .style import fetch_style, style_css as render_css

    ctx: LaunchContext = g.ctx
    store = _store()
    values = store.get(NS_STYLE, ctx.sid)
    if values is None:
        rec = store.get(NS_SESSION, ctx.sid) or {}
        url = rec.get("smart_style_url")
        values = {}
        if url:
            state = _state()
            values = fetch_style(url, state.smart_config(ctx.iss).origins(), state.http, state.timeout)
        store.put(NS_STYLE, ctx.sid, values, float(current_app.config["STYLE_TTL"]))
    return Response(render_css(values), mimetype="text/css", headers={"Cache-Control": "private, max-age=300"})


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """CA "Registering a client": our public keys, no auth, with Cache-Control (reference row 40)."""
    keys = []
    seen = set()
    for reg in _state().registry.values():
        for jwk in (reg.client_auth.public_jwk(), reg.next_public_jwk):  # current key, then the next one
            if jwk and jwk["kid"] not in seen:
                seen.add(jwk["kid"])
                keys.append(jwk)
    if not keys:
        abort(404)
    return Response(__import__("orjson").dumps({"keys": keys}), mimetype="application/json",
                    headers={"Cache-Control": "public, max-age=3600"})
