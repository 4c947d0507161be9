"""The sandbox's strict SMART on FHIR authorization server (SMART App Launch 2.2), built on authlib's OAuth 2.0 parts.

``install(app, config)`` adds, on the sandbox's Flask app (base = scheme://host:port, FHIR base = ``{base}/fhir``):

- ``/fhir/.well-known/smart-configuration`` (404 in "capability-only" discovery mode), ``/.well-known/openid-
  configuration``, ``/auth/jwks``; the CapabilityStatement's security block through
  ``app.extensions["fhir_massage.sandbox"]["capability_security"]``;
- ``/auth/authorize`` (GET and POST), ``/auth/token``, ``/auth/introspect`` (RFC 7662), ``/auth/revoke``
  (RFC 7009), the standalone login and patient picker;
- ``POST /_sandbox/launches`` (loopback callers only) and the EHR simulator under ``/ehr`` (ehr.py);
- ``app.extensions["fhir_massage.sandbox"]["authorizer"]``: bearer token -> access.Grant for the FHIR API.

Strict where real EHRs are strict: exact redirect URIs, PKCE S256 only and required, ``aud`` = FHIR base, live
single-use launch ids, single-use 60-second codes (a replay revokes what the code issued), rotating refresh tokens
(reuse revokes the family), private_key_jwt with RS384/ES384, ``jti`` replay and ``exp`` at most 5 minutes ahead.

Sandbox simplifications (said so on the pages): no passwords, consent is implied. A user may access the patients
whose active CareTeam lists them (or their PractitionerRole) as a participant, or who name them as
generalPractitioner (``SandboxAuth.accessible_patients``); user/ scopes are held to those patients, the EHR
simulator and the standalone patient picker offer only them.

``config.auth`` keys: clients (list of registrations, see auth_clients), discovery ("both" | "capability-only"),
fhir_user ("absolute" | "relative" fhirUser claim), users / patients (override demo.DEMO_USERS / DEMO_PATIENTS),
code_lifetime (s, 60), launch_lifetime (s, 600).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oidc.core import OpenIDCode
from flask import Blueprint, Flask, abort, current_app, jsonify, render_template, request
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from fhir_massage.errors import InvalidInput
from fhir_massage.loopback import is_loopback_addr
from fhir_massage.sandbox import access, scopes
from fhir_massage.sandbox.auth_clients import Client, client_from_dict
from fhir_massage.sandbox.auth_store import AuthCode, AuthStore, Launch, Token, new_secret

EXT = "fhir_massage.sandbox"
CLIENT_ASSERTION_ALGS = ["RS384", "ES384"]  # SMART 2.2 "Authenticating with asymmetric keys": SHALL support both
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
MAX_ASSERTION_LIFETIME = 300  # SMART 2.2: exp "no more than five minutes in the future"
REFRESH_LIFETIME = {"offline_access": 30 * 24 * 3600, "online_access": 8 * 3600}

# authlib logs issued tokens at DEBUG ("Issue token %r to %r"); tokens never go to a log here.
logging.getLogger("authlib.oauth2.rfc6749.grants").setLevel(logging.INFO)

bp = Blueprint("sandbox_auth", __name__, template_folder="templates", static_folder="static",
               static_url_path="/_sandbox/static")


# --- helpers ----------------------------------------------------------------------------------------------------

def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def current() -> "SandboxAuth":
    return current_app.extensions[EXT]["auth"]


def _ascii(text: str) -> str:
    # OAuth error_description allows only a restricted ASCII set (RFC 6749 §4.1.2.1).
    return "".join(ch if 0x20 <= ord(ch) <= 0x7E and ch not in '"\\' else "?" for ch in text)


# --- authlib parts --------------------------------------------------------------------------------------------

class StrictCodeChallenge(CodeChallenge):
    """PKCE: S256 required on every authorization request (SMART 2.2: "servers SHALL NOT support plain", and apps
    SHALL use PKCE, so a request without a challenge is refused rather than waved through as plain OAuth)."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256.")
        method = data.get("code_challenge_method")
        if method != "S256":
            # A missing method means "plain" (RFC 7636 §4.3), which SMART forbids.
            raise InvalidRequestError(f"code_challenge_method must be S256 (got {_ascii(method or 'none, i.e. plain')}).")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant, result):
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier': this code was issued with PKCE.")
        super().validate_code_verifier(grant, result)


class SmartRequestChecks:
    """The SMART-specific checks on an authorization request, run after authlib has matched client and
    redirect_uri (so every refusal here is an error redirect that echoes ``state``)."""

    def __init__(self, auth: "SandboxAuth") -> None:
        self.auth = auth

    def __call__(self, grant) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.check)

    def check(self, grant, redirect_uri) -> None:
        data = grant.request.payload.data
        client: Client = grant.request.client
        if not data.get("state"):
            raise InvalidRequestError("Missing 'state': SMART apps SHALL send an unguessable state value.")
        aud = data.get("aud")
        if not aud:
            raise InvalidRequestError(f"Missing 'aud': it must be the FHIR base URL {self.auth.fhir_base()}.")
        if aud != self.auth.fhir_base():
            raise InvalidRequestError(
                _ascii(f"'aud' {aud} is not this server's FHIR base URL {self.auth.fhir_base()}."))
        requested = (data.get("scope") or "").split()
        if not requested:
            raise InvalidScopeError("Missing 'scope'.")
        launch_id = data.get("launch")
        if launch_id is not None:
            if "launch" not in requested:
                raise InvalidScopeError("A 'launch' parameter needs the 'launch' scope (SMART EHR launch).")
            # authlib validates twice (consent, then response); the second time the view has taken the launch.
            taken = getattr(grant.request, "sandbox", None)
            launch = taken if taken is not None else self.auth.store.peek_launch(launch_id)
            if launch is None or (taken is None and launch.client_id != client.client_id):
                raise InvalidRequestError("Unknown, expired or already used 'launch'.")
        granted = scopes.grant_scopes(requested, allowed=client.allowed_scopes, dialect=client.scope_dialect,
                                      refresh=client.refresh)
        if not any(scopes.parse_resource_scope(s) for s in granted) and not {"openid", "fhirUser"} & set(granted):
            raise InvalidScopeError(_ascii(
                "None of the requested scopes can be granted to this client "
                f"(it takes {client.scope_dialect} scope syntax)."))


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "private_key_jwt"]

    def save_authorization_code(self, code, request):
        auth = current()
        extra = request.sandbox  # set by the authorize view: user and context
        data = request.payload.data
        client: Client = request.client
        granted = auth.final_scopes(data.get("scope", "").split(), client, extra["context"])
        now = auth.store.clock()
        auth.store.add_code(AuthCode(
            code=code,
            client_id=client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=" ".join(granted),
            user=extra["user"],
            context=extra["context"],
            nonce=data.get("nonce"),
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            expires_at=now + auth.code_lifetime,
            auth_time=int(now),
        ))

    def query_authorization_code(self, code, client):
        return current().store.redeem_code(code, client.client_id)

    def delete_authorization_code(self, authorization_code):
        pass  # redeem_code marked it used: it stays known so that a replay can revoke its tokens

    def authenticate_user(self, authorization_code):
        return authorization_code.user


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "private_key_jwt"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation: every refresh returns a new refresh token, the old one dies

    def authenticate_refresh_token(self, refresh_token):
        return current().store.use_refresh_token(refresh_token, self.request.client.client_id)

    def authenticate_user(self, refresh_token):
        return refresh_token.user

    def revoke_old_credential(self, refresh_token):
        current().store.mark_refresh_used(refresh_token)


class SmartPrivateKeyJWT(JWTBearerClientAssertion):
    """private_key_jwt client authentication (RFC 7523 §2.2, SMART 2.2 "Authenticating with asymmetric keys")."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, auth: "SandboxAuth") -> None:
        super().__init__(validate_jti=True, leeway=30)
        self.auth = auth

    def get_audiences(self):
        return [self.auth.url("/auth/token")]

    def resolve_client_public_key(self, client):
        try:
            return KeySet.import_key_set(client.public_jwks())
        except (requests.RequestException, InvalidInput, ValueError, JoseError) as exc:
            raise InvalidClientError(description=_ascii(f"Cannot get the client's public keys: {exc}")) from None

    def process_assertion_claims(self, assertion, resolve_key):
        try:
            header = jws.extract_compact(assertion.encode()).headers()
        except JoseError:
            raise InvalidClientError(description="Invalid JWT assertion.") from None
        alg = header.get("alg")
        if not header.get("kid"):
            # SMART 2.2 "Authenticating with asymmetric keys": the JWT header SHALL name its key (kid).
            raise InvalidClientError(description="Client assertion header has no 'kid'.")
        if alg not in CLIENT_ASSERTION_ALGS:
            raise InvalidClientError(description=f"Client assertions must be signed with RS384 or ES384, not {_ascii(str(alg))}.")
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=CLIENT_ASSERTION_ALGS)
        except JoseError as exc:
            raise InvalidClientError(description=_ascii(f"Client assertion rejected: {exc.description or exc.error}")) from None
        claims = token.claims
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp - self.auth.store.clock() > MAX_ASSERTION_LIFETIME:
            raise InvalidClientError(description="Client assertion 'exp' is more than 5 minutes in the future.")
        self.verify_claims(claims)
        return claims

    def validate_jti(self, claims, jti):
        return self.auth.store.use_jti(str(claims["sub"]), str(jti), float(claims["exp"]))


class SmartOpenIDCode(OpenIDCode):
    """id_token for the authorization-code grant (OIDC Core §3.1.3.6; SMART 2.2 "Scopes for requesting identity
    data": fhirUser claim), signed RS256 with the sandbox's key."""

    def __init__(self, auth: "SandboxAuth") -> None:
        super().__init__(require_nonce=False)
        self.auth = auth

    def exists_nonce(self, nonce, request):
        return False  # nonces are the client's replay defence; the server only echoes them

    def resolve_client_private_key(self, client):
        return self.auth.key

    def get_client_algorithm(self, client):
        return "RS256"

    def get_encode_header(self, client):
        return {"alg": "RS256", "kid": self.auth.key.kid, "typ": "JWT"}

    def get_client_claims(self, client):
        now = int(self.auth.store.clock())
        return {"iss": self.auth.base(), "aud": client.client_id, "iat": now, "exp": now + 3600}

    def generate_user_info(self, user, scope):
        granted = scope.split() if isinstance(scope, str) else list(scope or [])
        info = {"sub": user["id"]}
        if "fhirUser" in granted:
            info["fhirUser"] = self.auth.fhir_user_claim(user)
        if "profile" in granted or "fhirUser" in granted:
            info["name"] = user.get("name", "")
        return info


class _RefreshView:
    """A refresh token as introspection sees it: live until used, revoked or past its own expiry, whatever the
    state of the access token it came with."""

    def __init__(self, tok: Token) -> None:
        self.tok = tok
        self.client_id, self.scope, self.user, self.context = tok.client_id, tok.scope, tok.user, tok.context
        self.issued_at = tok.issued_at
        self.exp = tok.refresh_expires_at

    def is_expired(self) -> bool:
        return self.exp is not None and self.tok.clock() >= self.exp

    def is_revoked(self) -> bool:
        return self.tok.revoked or self.tok.refresh_used


class SmartIntrospection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "private_key_jwt"]

    def query_token(self, token_string, token_type_hint):
        found = current().store.find_token(token_string, token_type_hint)
        if not found:
            return None
        tok, kind = found
        return _RefreshView(tok) if kind == "refresh_token" else tok

    def check_permission(self, token, client, request):
        return client.introspect_any or token.client_id == client.client_id

    def introspect_token(self, token: Token | _RefreshView):
        auth = current()
        if isinstance(token, _RefreshView):
            exp, token_type = token.exp, "refresh_token"
        else:
            exp, token_type = token.issued_at + token.expires_in, "Bearer"
        body = {
            "active": True,
            "scope": token.scope,
            "client_id": token.client_id,
            "token_type": token_type,
            "exp": int(exp) if exp is not None else None,
            "iat": int(token.issued_at),
            "iss": auth.base(),
            "aud": auth.fhir_base(),
            "sub": token.user["id"],
        }
        if "fhirUser" in token.scope.split():
            body["fhirUser"] = auth.fhir_user_claim(token.user)
        for key in ("patient", "encounter"):
            if token.context.get(key):
                body[key] = token.context[key]
        return {k: v for k, v in body.items() if v is not None}


class SmartRevocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = ["none", "client_secret_basic", "private_key_jwt"]

    def query_token(self, token_string, token_type_hint):
        found = current().store.find_token(token_string, token_type_hint)
        return found[0] if found else None

    def revoke_token(self, token, request):
        # Revoking either token ends the whole grant (RFC 7009 §2.1: "SHOULD also invalidate ... the same grant").
        store = current().store
        store.revoke_family(token.family)
        store.mark_refresh_used(token)


# --- the server object ------------------------------------------------------------------------------------------

class SandboxAuth:
    """One per app: clients, users, keys, state, and the authlib server."""

    def __init__(self, config: Any) -> None:
        self.config = config
        opts: dict[str, Any] = dict(_cfg(config, "auth") or {})
        self.opts = opts
        self.public_base = (_cfg(config, "public_base") or "").rstrip("/") or None
        self.discovery = opts.get("discovery", "both")
        if self.discovery not in ("both", "capability-only"):
            raise InvalidInput("auth.discovery must be 'both' or 'capability-only'")
        self.fhir_user_style = opts.get("fhir_user", "absolute")
        self.code_lifetime = int(opts.get("code_lifetime", 60))
        self.launch_lifetime = int(opts.get("launch_lifetime", 600))
        self.store = AuthStore()
        self._clients_lock = threading.Lock()
        self.clients: dict[str, Client] = {}
        for c in opts.get("clients") or []:
            self.register_client(c)
        self.key = self._load_key(_cfg(config, "data_dir"))
        self._tickets: dict[str, tuple[float, dict[str, Any]]] = {}
        self._tickets_lock = threading.Lock()

        self.server = AuthorizationServer(query_client=self.query_client, save_token=self.save_token)
        self.server.register_token_generator("default", self.generate_token)
        self.server.register_client_auth_method("private_key_jwt", SmartPrivateKeyJWT(self))
        self.server.register_grant(
            AuthorizationCodeGrant, [StrictCodeChallenge(required=True), SmartRequestChecks(self), SmartOpenIDCode(self)]
        )
        self.server.register_grant(RefreshTokenGrant)
        self.server.register_endpoint(SmartIntrospection)
        self.server.register_endpoint(SmartRevocation)

    # clients, users, patients ---------------------------------------------------------------------------------
    def register_client(self, data: dict[str, Any] | Client) -> Client:
        client = data if isinstance(data, Client) else client_from_dict(data)
        with self._clients_lock:
            if client.client_id in self.clients:
                # Registrations are fixed once made: tests share the sandbox, and a silent overwrite would
                # change another test's client under it.
                raise InvalidInput(f"client_id {client.client_id!r} is already registered")
            self.clients[client.client_id] = client
        return client

    def all_clients(self) -> list[Client]:
        with self._clients_lock:
            return list(self.clients.values())

    def query_client(self, client_id: str) -> Client | None:
        with self._clients_lock:
            return self.clients.get(client_id)

    def users(self) -> list[dict[str, Any]]:
        if "users" in self.opts:
            return list(self.opts["users"])
        from fhir_massage.sandbox import demo  # another engineer's module; imported late so auth loads without it

        return list(demo.DEMO_USERS)

    def patients(self) -> list[dict[str, Any]]:
        if "patients" in self.opts:
            return list(self.opts["patients"])
        from fhir_massage.sandbox import demo

        return list(demo.DEMO_PATIENTS)

    def accessible_patients(self, user: dict[str, Any]) -> frozenset[str]:
        """The patients ``user`` may access, read from the FHIR data (CareTeam / generalPractitioner): see
        service.FhirService.accessible_patients. Call inside a request (the FHIR base is the request's)."""
        refs = [user.get("fhirUser"), user.get("practitionerRole")]
        service = current_app.extensions[EXT]["service"]
        return service.accessible_patients(self.fhir_base(), [r for r in refs if isinstance(r, str)])

    def find_user(self, key: str | None) -> dict[str, Any] | None:
        for u in self.users():
            if key and key in (u.get("id"), u.get("fhirUser")):
                return u
        return None

    # URLs -----------------------------------------------------------------------------------------------------
    def base(self) -> str:
        """The server's root URL (issuer); the FHIR base is ``{base}/fhir`` unless public_base says otherwise."""
        if self.public_base:
            if self.public_base.endswith("/fhir"):
                return self.public_base[: -len("/fhir")]
            parts = urlsplit(self.public_base)
            return f"{parts.scheme}://{parts.netloc}"
        return request.host_url.rstrip("/")

    def fhir_base(self) -> str:
        # SandboxConfig.public_base is the FHIR base URL to advertise (server.py); aud must equal it verbatim.
        if self.public_base:
            return self.public_base
        return self.base() + "/fhir"

    def url(self, path: str) -> str:
        return self.base() + path

    def fhir_user_claim(self, user: dict[str, Any]) -> str:
        ref = user["fhirUser"]
        # Epic puts an absolute URL in fhirUser, others a relative reference; SMART allows both.
        return ref if self.fhir_user_style == "relative" else f"{self.fhir_base()}/{ref}"

    # keys -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_key(data_dir: Any) -> RSAKey:
        path = Path(data_dir) / "auth-signing-key.json" if data_dir else None
        if path and path.exists():
            key = RSAKey.import_key(json.loads(path.read_text()))
        else:
            key = RSAKey.generate_key(2048, private=True)
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(key.as_dict(private=True)))
                path.chmod(0o600)
        key.ensure_kid()
        return key

    def jwks(self) -> dict[str, Any]:
        pub = self.key.as_dict(private=False)
        pub.update({"use": "sig", "alg": "RS256", "kid": self.key.kid})
        return {"keys": [pub]}

    # scopes and context --------------------------------------------------------------------------------------
    def final_scopes(self, requested: list[str], client: Client, context: dict[str, Any]) -> list[str]:
        granted = scopes.grant_scopes(requested, allowed=client.allowed_scopes, dialect=client.scope_dialect,
                                      refresh=client.refresh)
        if not context.get("patient"):
            # No patient in context: patient/ scopes would grant access without a compartment to limit it.
            granted = [s for s in granted if not s.startswith("patient/") and s != "launch/patient"]
        if not context.get("encounter"):
            granted = [s for s in granted if s != "launch/encounter"]
        if not context.get("launch"):
            granted = [s for s in granted if s != "launch"]
        return granted

    # tokens ---------------------------------------------------------------------------------------------------
    def generate_token(self, grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=True):
        granted = (scope or "").split()
        token = {
            "access_token": new_secret(32),
            "token_type": "Bearer",
            "expires_in": client.access_token_lifetime,
            "scope": " ".join(granted),
        }
        if include_refresh_token and client.refresh and {"offline_access", "online_access"} & set(granted):
            token["refresh_token"] = new_secret(32)
        return token

    def save_token(self, token: dict[str, Any], req) -> None:
        if getattr(req, "authorization_code", None) is not None:
            origin = req.authorization_code
        else:
            origin = req.refresh_token
        granted = token["scope"].split()
        refresh_expires = None
        if token.get("refresh_token"):
            kind = "offline_access" if "offline_access" in granted else "online_access"
            refresh_expires = self.store.clock() + REFRESH_LIFETIME[kind]
        rec = Token(
            client_id=req.client.client_id,
            scope=token["scope"],
            user=origin.user,
            context=dict(origin.context),
            family=origin.family,
            issued_at=self.store.clock(),
            expires_in=token["expires_in"],
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            refresh_expires_at=refresh_expires,
            clock=lambda: self.store.clock(),  # late-bound: tests move the store's clock
        )
        self.store.add_token(rec)
        # SMART launch context rides in the token response (SMART 2.2 "Launch context arrives with your
        # access_token"); authlib returns this same dict as the body.
        token.update(self.context_response(rec))

    def context_response(self, rec: Token) -> dict[str, Any]:
        ctx = rec.context
        out: dict[str, Any] = {}
        if ctx.get("patient"):
            out["patient"] = ctx["patient"]
        if ctx.get("encounter"):
            out["encounter"] = ctx["encounter"]
        out["need_patient_banner"] = bool(ctx.get("need_patient_banner", True))
        out["smart_style_url"] = ctx.get("smart_style_url") or self.url("/ehr/smart-style.json")
        if ctx.get("fhirContext"):
            out["fhirContext"] = ctx["fhirContext"]
        if ctx.get("intent"):
            out["intent"] = ctx["intent"]
        if ctx.get("appContext"):  # CDS Hooks 2.0 Link.appContext: passed to the app in the token response
            out["appContext"] = ctx["appContext"]
        return out

    # launches -------------------------------------------------------------------------------------------------
    def create_launch(self, client_id: str, user: str, patient: str | None, *, encounter: str | None = None,
                      intent: str | None = None, need_patient_banner: bool = True, smart_style_url: str | None = None,
                      fhir_context: list[dict[str, Any]] | None = None,
                      app_context: str | None = None) -> dict[str, Any]:
        client = self.query_client(client_id)
        if client is None:
            raise InvalidInput(f"unknown client_id {client_id!r}")
        u = self.find_user(user)
        if u is None:
            raise InvalidInput(f"unknown user {user!r}")
        if patient is not None and not _valid_id(patient):
            raise InvalidInput(f"{patient!r} is not a FHIR id")
        if encounter is not None and not _valid_id(encounter):
            raise InvalidInput(f"{encounter!r} is not a FHIR id")
        if fhir_context is not None and not (
            isinstance(fhir_context, list) and all(isinstance(x, dict) for x in fhir_context)
        ):
            raise InvalidInput("fhir_context must be a list of objects (SMART fhirContext)")
        launch_id = new_secret(16)
        context = {
            "launch": True,
            "patient": patient,
            "encounter": encounter,
            "intent": intent,
            "need_patient_banner": bool(need_patient_banner),
            "smart_style_url": smart_style_url,
            "fhirContext": fhir_context,
            "appContext": app_context if isinstance(app_context, str) and app_context else None,
        }
        self.store.add_launch(Launch(id=launch_id, client_id=client_id, user=u, patient=patient, context=context,
                                     expires_at=self.store.clock() + self.launch_lifetime))
        out = {"launch": launch_id, "iss": self.fhir_base(), "launch_url": None}
        if client.launch_url:
            sep = "&" if urlsplit(client.launch_url).query else "?"
            out["launch_url"] = f"{client.launch_url}{sep}{urlencode({'iss': self.fhir_base(), 'launch': launch_id})}"
        return out

    # login tickets (standalone launch) -------------------------------------------------------------------------
    def new_ticket(self, data: dict[str, Any]) -> str:
        ticket = new_secret(16)
        with self._tickets_lock:
            now = self.store.clock()
            for k in [k for k, (until, _) in self._tickets.items() if until < now]:
                del self._tickets[k]
            self._tickets[ticket] = (now + 600, data)
        return ticket

    def take_ticket(self, ticket: str | None) -> dict[str, Any] | None:
        if not ticket:
            return None
        with self._tickets_lock:
            item = self._tickets.pop(ticket, None)
        if item is None or item[0] < self.store.clock():
            return None
        return item[1]

    # discovery ------------------------------------------------------------------------------------------------
    def dialects(self) -> set[str]:
        ds = {c.scope_dialect for c in self.all_clients()} or {"both"}
        out = set()
        for d in ds:
            out |= {"v1", "v2"} if d == "both" else {d}
        return out

    def smart_configuration(self) -> dict[str, Any]:
        caps = [
            "launch-ehr", "launch-standalone", "authorize-post",
            "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient",
            "context-banner", "context-style", "sso-openid-connect",
            "permission-offline", "permission-online", "permission-patient", "permission-user",
        ]
        caps += [f"permission-{d}" for d in sorted(self.dialects())]
        return {
            "issuer": self.base(),
            "jwks_uri": self.url("/auth/jwks"),
            "authorization_endpoint": self.url("/auth/authorize"),
            "token_endpoint": self.url("/auth/token"),
            "introspection_endpoint": self.url("/auth/introspect"),
            "revocation_endpoint": self.url("/auth/revoke"),
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": CLIENT_ASSERTION_ALGS,
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "scopes_supported": list(scopes.CONTEXT_SCOPES) + ["patient/*.rs", "user/*.rs", "patient/*.cruds",
                                                               "user/*.cruds", "patient/*.read", "user/*.read"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": caps,
        }

    def openid_configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.base(),
            "authorization_endpoint": self.url("/auth/authorize"),
            "token_endpoint": self.url("/auth/token"),
            "jwks_uri": self.url("/auth/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "fhirUser", "profile"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "name"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt", "none"],
            "code_challenge_methods_supported": ["S256"],
        }

    def capability_security(self, base: str | None = None) -> dict[str, Any]:
        """rest[0].security for the CapabilityStatement (SMART v1 "Declaring support for OAuth2 endpoints"; kept in
        2.x for clients such as fhirclient that discover only this way)."""
        b = (base or self.base()).rstrip("/")
        return {
            "service": [{
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
            }],
            "extension": [{
                "url": OAUTH_URIS,
                "extension": [
                    {"url": "authorize", "valueUri": f"{b}/auth/authorize"},
                    {"url": "token", "valueUri": f"{b}/auth/token"},
                    {"url": "introspect", "valueUri": f"{b}/auth/introspect"},
                    {"url": "revoke", "valueUri": f"{b}/auth/revoke"},
                ],
            }],
        }


def _valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", value))  # FHIR id datatype


# --- the Authorizer the FHIR API calls ------------------------------------------------------------------------

class TokenAuthorizer:
    """Bearer token -> access.Grant. patient/ scopes confine the grant to the launch patient (a mixed user/ +
    patient/ grant too: the patient in context wins, as the whole grant has one compartment); user/ scopes without
    a patient confine it to the patients the user may access, looked up per request (cached until the next write),
    so a CareTeam change shows at once, as in an EHR."""

    def __init__(self, auth: SandboxAuth) -> None:
        self.auth = auth

    def grant_for(self, authorization_header: str | None) -> access.Grant:
        if not authorization_header:
            raise access.Unauthorized("This FHIR server needs a bearer token (SMART on FHIR).", error="invalid_request")
        scheme, _, value = authorization_header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise access.Unauthorized("The Authorization header must be 'Bearer <token>'.", error="invalid_request")
        tok = self.auth.store.access_token(value)
        if tok is None:
            raise access.Unauthorized("Unknown access token.")
        if tok.is_revoked():
            raise access.Unauthorized("The access token was revoked.")
        if tok.is_expired():
            raise access.Unauthorized("The access token has expired.")
        granted = tok.scope.split()
        perms, has_patient, _has_user = scopes.permissions(granted)
        patient = tok.context.get("patient") if has_patient else None
        # Every clinical grant without a patient is held to the user's patients (a token without user/ scopes
        # has no compartment types in its permissions, so the set changes nothing for it).
        patients = self.auth.accessible_patients(tok.user) if patient is None else None
        return access.Grant(
            permissions=perms,
            patient=patient,
            user=tok.user.get("fhirUser"),
            client_id=tok.client_id,
            patients=patients,
        )


# --- views --------------------------------------------------------------------------------------------------------

def _csp(resp, *, form_targets: list[str] | None = None, frame_ancestors: str = "'self'"):
    form = " ".join(["'self'"] + (form_targets or []))
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action {form}; "
        f"frame-ancestors {frame_ancestors}; base-uri 'none'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _error_page(title: str, message: str, status: int = 400):
    resp = current_app.make_response((render_template("auth/error.html", title=title, message=message), status))
    return _csp(resp)


def _oauth_error(err: OAuth2Error):
    auth = current()
    if err.redirect_uri:
        # A valid client and redirect_uri: the refusal goes back to the app (RFC 6749 §4.1.2.1), with state.
        if not err.state:
            err.state = request.values.get("state")
        return auth.server.handle_error_response(None, err)
    # Never redirect to an unchecked URI: tell the person instead.
    return _error_page("The app's sign-in request was refused",
                       f"{err.error}: {err.description or 'invalid request'}. "
                       "Nothing was sent back to the app, because its client_id or redirect_uri is not registered.")


_OWN_FIELDS = ("login_ticket", "sandbox_user", "sandbox_patient", "sandbox_action")


@bp.route("/auth/authorize", methods=["GET", "POST"])
def authorize():
    auth = current()
    launch_id = request.values.get("launch")
    client_id = request.values.get("client_id")
    launch = auth.store.peek_launch(launch_id) if launch_id else None
    if launch is not None and launch.client_id != client_id:
        launch = None
    try:
        grant = auth.server.get_consent_grant(end_user=launch.user if launch else None)
    except OAuth2Error as err:
        return _oauth_error(err)
    redirect_uri = grant.redirect_uri
    requested = (request.values.get("scope") or "").split()

    if launch is not None:
        # EHR launch: the EHR session's user, no login page; the launch id is used up by this authorization.
        taken = auth.store.take_launch(launch_id, client_id)
        if taken is None:
            return _oauth_error(InvalidRequestError("Unknown, expired or already used 'launch'.",
                                                    redirect_uri=redirect_uri, state=request.values.get("state")))
        grant.request.sandbox = {"user": taken.user, "context": dict(taken.context)}
        return auth.server.create_authorization_response(grant=grant, grant_user=taken.user)

    # Standalone launch: login (pick a demo user), then a patient picker when a patient is needed.
    params = [(k, v) for k in request.values for v in request.values.getlist(k) if k not in _OWN_FIELDS]
    origin = urlsplit(redirect_uri)
    form_targets = [f"{origin.scheme}://{origin.netloc}"]
    if request.method == "POST" and request.form.get("sandbox_action") == "deny":
        auth.take_ticket(request.form.get("login_ticket"))
        return auth.server.create_authorization_response(grant=grant, grant_user=None)
    ticket = auth.take_ticket(request.form.get("login_ticket")) if request.method == "POST" else None
    needs_patient = "launch/patient" in requested or any(s.startswith("patient/") for s in requested)
    user = None
    if ticket is not None:
        user = auth.find_user(ticket.get("user") or request.form.get("sandbox_user"))
    if user is None:
        t = auth.new_ticket({"step": "login"})
        resp = current_app.make_response(render_template(
            "auth/login.html", users=auth.users(), params=params, ticket=t,
            client=grant.request.client, error=None))
        return _csp(resp, form_targets=form_targets)
    patient = None
    if needs_patient:
        patient = request.form.get("sandbox_patient") if ticket.get("step") == "patient" else None
        # Only the user's patients are offered (and accepted): an EHR's patient search shows a clinician the
        # patients they may open.
        mine = auth.accessible_patients(user)
        offered = [p for p in auth.patients() if p["id"] in mine]
        if patient not in {p["id"] for p in offered}:
            t = auth.new_ticket({"step": "patient", "user": user["id"]})
            resp = current_app.make_response(render_template(
                "auth/patient.html", patients=offered, params=params, ticket=t, user=user,
                client=grant.request.client))
            return _csp(resp, form_targets=form_targets)
    context = {"launch": False, "patient": patient, "need_patient_banner": True, "smart_style_url": None}
    grant.request.sandbox = {"user": user, "context": context}
    return auth.server.create_authorization_response(grant=grant, grant_user=user)


def _form_only():
    """Token-type endpoints take form bodies only (RFC 6749 §3.2, §4.1.3): parameters in the query string could end up
    in logs and proxies, so a strict server refuses them instead of reading them."""
    if request.args:
        return jsonify(error="invalid_request",
                       error_description="Send the parameters in an application/x-www-form-urlencoded body, "
                                         "not in the URL."), 400
    if request.mimetype != "application/x-www-form-urlencoded":
        return jsonify(error="invalid_request",
                       error_description="The body must be application/x-www-form-urlencoded."), 400
    return None


@bp.post("/auth/token")
def token():
    refused = _form_only()
    if refused is not None:
        return refused
    resp = current().server.create_token_response()
    # No cookies are involved, so any origin may call it (SMART 2.2 "Considerations for CORS").
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


@bp.post("/auth/introspect")
def introspect():
    refused = _form_only()
    if refused is not None:
        return refused
    return current().server.create_endpoint_response(SmartIntrospection.ENDPOINT_NAME)


@bp.post("/auth/revoke")
def revoke():
    refused = _form_only()
    if refused is not None:
        return refused
    return current().server.create_endpoint_response(SmartRevocation.ENDPOINT_NAME)


@bp.get("/auth/jwks")
def jwks():
    return jsonify(current().jwks())


@bp.get("/fhir/.well-known/smart-configuration")
def smart_configuration():
    auth = current()
    if auth.discovery == "capability-only":
        # Older servers published only the CapabilityStatement (SMART v1): clients must fall back to it.
        abort(404)
    resp = jsonify(auth.smart_configuration())
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


@bp.get("/.well-known/openid-configuration")
def openid_configuration():
    resp = jsonify(current().openid_configuration())
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


@bp.post("/_sandbox/launches")
def create_launch():
    if not is_loopback_addr(request.remote_addr):
        abort(403)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="invalid_request", error_description="Send a JSON object."), 400
    try:
        out = current().create_launch(
            body.get("client_id", ""), body.get("user", ""), body.get("patient"),
            encounter=body.get("encounter"), intent=body.get("intent"),
            need_patient_banner=body.get("need_patient_banner", True),
            smart_style_url=body.get("smart_style_url"), fhir_context=body.get("fhir_context"),
            app_context=body.get("app_context"),
        )
    except InvalidInput as exc:
        return jsonify(error="invalid_request", error_description=exc.message), 400
    return jsonify(out), 201


@bp.post("/_sandbox/clients")
def add_client():
    """Register a client at run time (loopback only): tests and demos that start their app after the sandbox."""
    if not is_loopback_addr(request.remote_addr):
        abort(403)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="invalid_request", error_description="Send a JSON object."), 400
    try:
        client = current().register_client(body)
    except InvalidInput as exc:
        status = 409 if "already registered" in exc.message else 400
        return jsonify(error="invalid_request", error_description=exc.message), status
    return jsonify({"client_id": client.client_id}), 201


# --- install ------------------------------------------------------------------------------------------------------

def install(app: Flask, config: Any) -> SandboxAuth:
    """Put the authorization server and the EHR simulator on ``app`` (see the module docstring)."""
    from fhir_massage.sandbox import ehr

    auth = SandboxAuth(config)
    ext = app.extensions.setdefault(EXT, {})
    ext["auth"] = auth
    ext["authorizer"] = TokenAuthorizer(auth)
    ext["capability_security"] = auth.capability_security
    app.register_blueprint(bp)
    app.register_blueprint(ehr.bp)
    return auth
