"""SMART App Launch 2.2 client protocol: discovery, authorize URL, token exchange and refresh, id_token checks,
granted-scope parsing. No Flask here; the HTTP edge is ``requests`` with timeouts and no redirects followed.

Page keys as in the project reference (smart-app-launch.md): AL = app-launch.html, CF = conformance.html,
SC = scopes-and-launch-context.html, CA = client-confidential-asymmetric.html, CS = client-confidential-symmetric.

Choices that go beyond the reference clients (fhirclient, client-js):
* discovery tries ``{iss}/.well-known/smart-configuration`` first and falls back to the CapabilityStatement's
  ``oauth-uris`` extension (CF "using-well-known"; the extension is deprecated in 2.x but v1 servers used it);
  relative endpoint URLs are resolved against the FHIR base (CF: SHOULD);
* PKCE S256 always, whether or not the server advertises it (AL "Considerations for PKCE Support"; athenahealth
  supports PKCE without saying so, client-js #174);
* the id_token is verified (signature from the issuer's JWKS, ``iss``, ``aud``, ``exp``, ``nonce``), where both
  reference clients skip it (SC "Steps for using an ID token");
* a refresh that returns no new refresh token keeps the old one (client-py #23/#112, Oracle Health).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from .errors import LaunchError

__all__ = [
    "SmartConfiguration",
    "DiscoveryCache",
    "JwksCache",
    "TokenResponse",
    "Scopes",
    "ClientAuth",
    "PublicClient",
    "ClientSecretBasic",
    "PrivateKeyJwt",
    "discover",
    "pkce_pair",
    "new_state",
    "new_nonce",
    "authorize_url",
    "exchange_code",
    "refresh_access_token",
    "verify_id_token",
    "fhir_user_reference",
    "default_scopes",
    "choose_dialect",
    "load_private_key",
]

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ID_TOKEN_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384")  # SC: servers SHALL support RS256
CLIENT_ASSERTION_ALGS = ("RS384", "ES384")  # CA: clients SHALL support both
DEFAULT_TIMEOUT = (5.0, 15.0)
# AL step 5: "Access tokens SHOULD have a valid lifetime no greater than one hour"; without expires_in and without
# a JWT exp we assume a short life (client-js uses 300 s too) so we refresh early rather than fail late.
FALLBACK_LIFETIME_S = 300


# ---------------------------------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True)
class SmartConfiguration:
    """The endpoints and capabilities of one issuer (CF "Metadata"), all URLs absolute."""

    iss: str
    authorization_endpoint: str
    token_endpoint: str
    source: str  # "well-known" or "capability-statement"
    issuer: str | None = None
    jwks_uri: str | None = None
    capabilities: frozenset[str] = frozenset()
    code_challenge_methods_supported: tuple[str, ...] = ()
    grant_types_supported: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    token_endpoint_auth_methods_supported: tuple[str, ...] = ()
    token_endpoint_auth_signing_alg_values_supported: tuple[str, ...] = ()
    introspection_endpoint: str | None = None
    revocation_endpoint: str | None = None
    management_endpoint: str | None = None
    registration_endpoint: str | None = None

    def origins(self) -> set[str]:
        """Origins we talk to for this issuer (FHIR base, authorize, token): who may also host style sheets."""
        return {o for o in (_origin(self.iss), _origin(self.authorization_endpoint), _origin(self.token_endpoint)) if o}


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    p = urlsplit(url)
    if not p.scheme or not p.netloc:
        return None
    return f"{p.scheme.lower()}://{p.netloc.lower()}"


def _base_join(iss: str, relative: str) -> str:
    """Append to the FHIR base keeping its path (reference row 2: ``/apis/fhir/.well-known/...``)."""
    return iss.rstrip("/") + "/" + relative.lstrip("/")


def _resolve(iss: str, url: Any, what: str) -> str:
    """CF "using-well-known": relative endpoint URLs (legacy servers) resolve against the FHIR base URL."""
    if not isinstance(url, str) or not url.strip():
        raise LaunchError(f"The EHR's SMART configuration has no {what}.", code="discovery")
    absolute = urljoin(iss.rstrip("/") + "/", url.strip())
    if urlsplit(absolute).scheme not in ("http", "https"):
        raise LaunchError(f"The EHR's {what} is not an http(s) URL.", code="discovery")
    return absolute


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def parse_smart_configuration(iss: str, doc: Mapping[str, Any]) -> SmartConfiguration:
    """Pure: a ``.well-known/smart-configuration`` document (tolerant of missing optional fields)."""
    if not isinstance(doc, Mapping):
        raise LaunchError("The EHR's SMART configuration is not a JSON object.", code="discovery")

    def opt(name: str) -> str | None:
        return _resolve(iss, doc[name], name) if isinstance(doc.get(name), str) and doc.get(name) else None

    return SmartConfiguration(
        iss=iss,
        authorization_endpoint=_resolve(iss, doc.get("authorization_endpoint"), "authorization_endpoint"),
        token_endpoint=_resolve(iss, doc.get("token_endpoint"), "token_endpoint"),
        source="well-known",
        issuer=doc.get("issuer") if isinstance(doc.get("issuer"), str) else None,
        jwks_uri=opt("jwks_uri"),
        capabilities=frozenset(_strings(doc.get("capabilities"))),
        code_challenge_methods_supported=_strings(doc.get("code_challenge_methods_supported")),
        grant_types_supported=_strings(doc.get("grant_types_supported")),
        scopes_supported=_strings(doc.get("scopes_supported")),
        token_endpoint_auth_methods_supported=_strings(doc.get("token_endpoint_auth_methods_supported")),
        token_endpoint_auth_signing_alg_values_supported=_strings(
            doc.get("token_endpoint_auth_signing_alg_values_supported")),
        introspection_endpoint=opt("introspection_endpoint"),
        revocation_endpoint=opt("revocation_endpoint"),
        management_endpoint=opt("management_endpoint"),
        registration_endpoint=opt("registration_endpoint"),
    )


def parse_capability_statement(iss: str, cap: Mapping[str, Any]) -> SmartConfiguration:
    """Pure: endpoints from ``rest[].security.extension[oauth-uris]`` (v1 conformance "Declaring Support for OAuth2
    Endpoints"). A CapabilityStatement says nothing about capabilities, so only what v1 implied is assumed."""
    if not isinstance(cap, Mapping) or cap.get("resourceType") != "CapabilityStatement":
        raise LaunchError("The EHR has no SMART configuration and its /metadata is not a CapabilityStatement.",
                          code="discovery")
    uris: dict[str, str] = {}
    for rest in cap.get("rest") or []:
        security = (rest or {}).get("security") or {}
        for ext in security.get("extension") or []:
            if isinstance(ext, Mapping) and ext.get("url") == OAUTH_URIS:
                for sub in ext.get("extension") or []:
                    if isinstance(sub, Mapping) and isinstance(sub.get("url"), str) and isinstance(sub.get("valueUri"), str):
                        uris.setdefault(sub["url"], sub["valueUri"])
    if "authorize" not in uris or "token" not in uris:
        raise LaunchError("The EHR publishes neither a SMART configuration nor OAuth endpoints in its "
                          "CapabilityStatement, so the app cannot sign in there.", code="discovery")
    return SmartConfiguration(
        iss=iss,
        authorization_endpoint=_resolve(iss, uris["authorize"], "authorize endpoint"),
        token_endpoint=_resolve(iss, uris["token"], "token endpoint"),
        source="capability-statement",
        introspection_endpoint=_resolve(iss, uris["introspect"], "introspect") if uris.get("introspect") else None,
        revocation_endpoint=_resolve(iss, uris["revoke"], "revoke") if uris.get("revoke") else None,
        management_endpoint=_resolve(iss, uris["manage"], "manage") if uris.get("manage") else None,
        registration_endpoint=_resolve(iss, uris["register"], "register") if uris.get("register") else None,
    )


def _get_json(session: requests.Session, url: str, *, accept: str, timeout: Any, what: str) -> tuple[int, Any]:
    try:
        response = session.get(url, headers={"Accept": accept}, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise LaunchError(f"Could not reach the EHR for {what} ({type(exc).__name__}). Try again in a moment.",
                          code="discovery-unreachable") from None
    if response.status_code != 200:
        return response.status_code, None
    try:
        return 200, response.json()
    except ValueError:
        return 200, None


def discover(iss: str, *, session: requests.Session | None = None, timeout: Any = DEFAULT_TIMEOUT) -> SmartConfiguration:
    """``.well-known/smart-configuration`` first, the CapabilityStatement second. Raises ``LaunchError``."""
    http = session or requests.Session()
    status, doc = _get_json(http, _base_join(iss, ".well-known/smart-configuration"),
                            accept="application/json", timeout=timeout, what="its SMART configuration")
    if status == 200 and isinstance(doc, Mapping):
        return parse_smart_configuration(iss, doc)
    status2, cap = _get_json(http, _base_join(iss, "metadata"), accept="application/fhir+json, application/json",
                             timeout=timeout, what="its CapabilityStatement")
    if status2 == 200 and isinstance(cap, Mapping):
        return parse_capability_statement(iss, cap)
    raise LaunchError(f"The EHR did not publish its SMART configuration (HTTP {status}) nor a CapabilityStatement "
                      f"(HTTP {status2}).", code="discovery")


class DiscoveryCache:
    """Per-issuer discovery results kept for ``ttl`` seconds (thread-safe; one process)."""

    def __init__(self, ttl: float = 3600.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, SmartConfiguration]] = {}

    def get(self, iss: str, fetch: Callable[[str], SmartConfiguration]) -> SmartConfiguration:
        now = self._clock()
        with self._lock:
            hit = self._items.get(iss)
            if hit and hit[0] > now:
                return hit[1]
        config = fetch(iss)
        with self._lock:
            self._items[iss] = (self._clock() + self.ttl, config)
        return config

    def forget(self, iss: str) -> None:
        with self._lock:
            self._items.pop(iss, None)


class JwksCache:
    """JWKS documents per URL, kept for ``ttl``; a key id we have not seen refetches once (key rotation)."""

    def __init__(self, ttl: float = 3600.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, url: str, fetch: Callable[[str], dict[str, Any]], *, kid: str | None = None) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            hit = self._items.get(url)
        if hit and hit[0] > now:
            kids = {k.get("kid") for k in hit[1].get("keys") or [] if isinstance(k, Mapping)}
            if kid is None or kid in kids:
                return hit[1]
        doc = fetch(url)
        with self._lock:
            self._items[url] = (self._clock() + self.ttl, doc)
        return doc


def fetch_json(session: requests.Session, url: str, *, timeout: Any = DEFAULT_TIMEOUT, what: str) -> dict[str, Any]:
    status, doc = _get_json(session, url, accept="application/json", timeout=timeout, what=what)
    if status != 200 or not isinstance(doc, dict):
        raise LaunchError(f"The EHR's {what} could not be read (HTTP {status}).", code="discovery")
    return doc


# ---------------------------------------------------------------------------------------------------------------
# Authorize


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 §4.1-4.2: 43 unreserved characters from 32 random bytes."""
    verifier = _b64url(secrets.token_bytes(32))
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_state() -> str:
    """AL "App protection": unpredictable, at least 122 bits; we use 256."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def choose_dialect(preference: str, capabilities: Iterable[str]) -> str:
    """Scope syntax per EHR (reference row 28: Oracle Health drops v1 scopes for v2 apps)."""
    if preference in ("v1", "v2"):
        return preference
    caps = set(capabilities)
    if "permission-v2" in caps:
        return "v2"
    if "permission-v1" in caps:
        return "v1"
    return "v1"  # a server that predates 2.0 advertises neither


# What the app reads and writes (contract "Default scopes"), by resource type → v2 letters. Least privilege (AL
# step 4): reads where we only read, create/read/update/search where we write.
APP_RESOURCE_ACCESS: tuple[tuple[str, str, str], ...] = (
    ("patient", "Patient", "rs"),
    ("patient", "Condition", "rs"),
    ("patient", "Observation", "crs"),  # c: pain scores written with each documented session (issue 7)
    ("patient", "MedicationRequest", "rs"),
    ("patient", "MedicationStatement", "rs"),
    ("patient", "MedicationAdministration", "rs"),
    ("patient", "AllergyIntolerance", "rs"),
    ("patient", "Procedure", "crus"),
    ("patient", "ServiceRequest", "crus"),
    ("patient", "DetectedIssue", "crs"),
    ("patient", "Task", "crus"),
    ("patient", "Communication", "crs"),
    ("patient", "Provenance", "crs"),
    ("patient", "CarePlan", "rs"),
    ("user", "Practitioner", "rs"),
    ("user", "PractitionerRole", "rs"),
)


def default_scopes(dialect: str, *, standalone: bool, capabilities: Iterable[str] = ()) -> str:
    """The scope string we ask for. ``launch`` for an EHR launch, ``launch/patient`` standalone (SC)."""
    caps = set(capabilities)
    parts = ["launch/patient" if standalone else "launch", "openid", "fhirUser"]
    # SC "Scopes for requesting a refresh token": online_access is tied to the user's EHR session (our case);
    # a server that only knows offline_access gets that rather than no refresh at all.
    if "permission-online" in caps or not caps:
        parts.append("online_access")
    elif "permission-offline" in caps:
        parts.append("offline_access")
    for context, rtype, letters in APP_RESOURCE_ACCESS:
        if dialect == "v2":
            parts.append(f"{context}/{rtype}.{letters}")
        else:
            parts.append(f"{context}/{rtype}.read")
            if set(letters) & set("cud"):
                parts.append(f"{context}/{rtype}.write")
    return " ".join(parts)


def standalone_scopes(scopes: str) -> str:
    """An EHR-launch scope string turned standalone: ``launch`` → ``launch/patient``."""
    out = []
    for s in scopes.split():
        if s == "launch":
            if "launch/patient" not in scopes.split():
                out.append("launch/patient")
        else:
            out.append(s)
    return " ".join(out)


def authorize_url(
    config: SmartConfiguration,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    code_challenge: str,
    aud: str,
    launch: str | None = None,
    nonce: str | None = None,
) -> str:
    """The authorize redirect (AL "Obtain authorization code"). ``aud`` is the iss string verbatim (row 11)."""
    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", scope),
        ("state", state),
        ("aud", aud),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ]
    if launch is not None:
        params.append(("launch", launch))
    if nonce is not None:
        params.append(("nonce", nonce))
    sep = "&" if urlsplit(config.authorization_endpoint).query else "?"
    return config.authorization_endpoint + sep + urlencode(params)


# ---------------------------------------------------------------------------------------------------------------
# Client authentication at the token endpoint


class ClientAuth:
    """How the app proves who it is at the token endpoint (reference rows 17-19)."""

    method = "none"

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def apply(self, token_url: str, data: dict[str, str], headers: dict[str, str]) -> None:
        raise NotImplementedError

    def public_jwk(self) -> dict[str, Any] | None:
        return None

    def __repr__(self) -> str:  # never show a secret
        return f"{type(self).__name__}({self.client_id!r})"


class PublicClient(ClientAuth):
    """AL "Obtain access token": ``client_id`` in the body for public apps only."""

    method = "none"

    def apply(self, token_url: str, data: dict[str, str], headers: dict[str, str]) -> None:
        data["client_id"] = self.client_id


class ClientSecretBasic(ClientAuth):
    """CS: ``Authorization: Basic base64(client_id:client_secret)``, form-urlencoded per RFC 6749 §2.3.1."""

    method = "client_secret_basic"

    def __init__(self, client_id: str, secret: str) -> None:
        super().__init__(client_id)
        if not secret:
            raise LaunchError(f"No client secret is configured for {client_id!r}.", code="config")
        self._secret = secret

    def apply(self, token_url: str, data: dict[str, str], headers: dict[str, str]) -> None:
        from urllib.parse import quote

        pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class PrivateKeyJwt(ClientAuth):
    """CA "Authenticating to the Token endpoint": a signed assertion, ``iss``=``sub``=client_id, ``aud``=token URL,
    ``exp`` at most five minutes ahead, a fresh ``jti``; header ``alg`` RS384/ES384, ``kid``, ``typ=JWT``."""

    method = "private_key_jwt"

    def __init__(self, client_id: str, key: RSAKey | ECKey, alg: str | None = None, *,
                 lifetime: int = 240, clock: Callable[[], float] = time.time) -> None:
        super().__init__(client_id)
        if not key.is_private:
            raise LaunchError(f"The key configured for {client_id!r} is not a private key.", code="config")
        alg = alg or ("ES384" if isinstance(key, ECKey) else "RS384")
        if alg not in CLIENT_ASSERTION_ALGS:
            raise LaunchError(f"Client assertions are signed with RS384 or ES384, not {alg}.", code="config")
        if (alg == "ES384") != isinstance(key, ECKey):
            raise LaunchError(f"{alg} does not fit the configured key type.", code="config")
        if alg == "ES384" and key.get("crv") != "P-384":
            raise LaunchError("ES384 needs a P-384 key.", code="config")
        self.key = key
        self.alg = alg
        self.kid = key.kid or key.thumbprint()
        self.lifetime = min(int(lifetime), 300)
        self._clock = clock

    def assertion(self, token_url: str) -> str:
        now = int(self._clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url, "jti": str(uuid.uuid4()),
                  "iat": now, "exp": now + self.lifetime}
        return jwt.encode({"alg": self.alg, "kid": self.kid, "typ": "JWT"}, claims, self.key, algorithms=[self.alg])

    def apply(self, token_url: str, data: dict[str, str], headers: dict[str, str]) -> None:
        data["client_assertion_type"] = JWT_BEARER
        data["client_assertion"] = self.assertion(token_url)

    def public_jwk(self) -> dict[str, Any]:
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def load_private_key(value: str | Mapping[str, Any]) -> RSAKey | ECKey:
    """A private key from PEM text or a JWK (dict or JSON text)."""
    try:
        if isinstance(value, Mapping) or (isinstance(value, str) and value.lstrip().startswith("{")):
            data = json.loads(value) if isinstance(value, str) else dict(value)
            kty = data.get("kty")
            if kty == "RSA":
                return RSAKey.import_key(data)
            if kty == "EC":
                return ECKey.import_key(data)
            raise LaunchError(f"Unsupported key type {kty!r} (use RSA or EC P-384).", code="config")
        if "EC PRIVATE KEY" in value or _pem_is_ec(value):
            return ECKey.import_key(value)
        return RSAKey.import_key(value)
    except (JoseError, ValueError, TypeError) as exc:
        raise LaunchError(f"The private key could not be read ({type(exc).__name__}).", code="config") from None


def public_jwk(value: str | Mapping[str, Any], *, alg: str | None = None) -> dict[str, Any]:
    """The public JWK (with kid, alg, use=sig) of a PEM or JWK, private or public: for publishing a next key."""
    try:
        if isinstance(value, Mapping) or (isinstance(value, str) and value.lstrip().startswith("{")):
            data = json.loads(value) if isinstance(value, str) else dict(value)
            key: RSAKey | ECKey = ECKey.import_key(data) if data.get("kty") == "EC" else RSAKey.import_key(data)
        elif "EC " in value or _pem_is_ec(value) or "BEGIN PUBLIC KEY" in value and _pem_public_is_ec(value):
            key = ECKey.import_key(value)
        else:
            key = RSAKey.import_key(value)
    except (JoseError, ValueError, TypeError) as exc:
        raise LaunchError(f"The public key could not be read ({type(exc).__name__}).", code="config") from None
    jwk = dict(key.as_dict(private=False))
    jwk.update({"kid": key.kid or key.thumbprint(), "alg": alg or ("ES384" if isinstance(key, ECKey) else "RS384"),
                "use": "sig"})
    return jwk


def _pem_public_is_ec(pem: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return isinstance(load_pem_public_key(pem.encode()), ec.EllipticCurvePublicKey)
    except (ValueError, TypeError):
        return False


def _pem_is_ec(pem: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return isinstance(load_pem_private_key(pem.encode(), password=None), ec.EllipticCurvePrivateKey)
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Token endpoint


@dataclass(frozen=True)
class TokenResponse:
    """AL "Obtain access token / Response" and SC launch context. Everything but access_token may be absent."""

    access_token: str
    token_type: str
    scope: str
    expires_at: float  # epoch seconds: from expires_in, else a JWT exp, else FALLBACK_LIFETIME_S
    lifetime_known: bool
    refresh_token: str | None = None
    id_token: str | None = None
    patient: str | None = None
    encounter: str | None = None
    need_patient_banner: bool = True  # SC gives no default; absent → show our banner
    smart_style_url: str | None = None
    intent: str | None = None
    tenant: str | None = None
    fhir_context: tuple[dict[str, Any], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # tokens never reach a log through repr
        return f"TokenResponse(scope={self.scope!r}, patient={'set' if self.patient else None})"


_KNOWN_TOKEN_FIELDS = {"access_token", "token_type", "expires_in", "scope", "refresh_token", "id_token", "patient",
                       "encounter", "need_patient_banner", "smart_style_url", "intent", "tenant", "fhirContext"}


def _jwt_exp(token: str) -> float | None:
    """``exp`` of an access token that happens to be a JWT (unverified: only used to schedule a refresh).
    Epic's tokens are opaque (reference vendor table), so this is a best effort."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def parse_token_response(body: Any, *, requested_scope: str, now: float) -> TokenResponse:
    """Pure: validate and read a token response body."""
    if not isinstance(body, Mapping):
        raise LaunchError("The EHR's token response is not a JSON object.", code="token")
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise LaunchError("The EHR's token response has no access token.", code="token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise LaunchError(f"The EHR issued a {token_type!r} token; the app only uses Bearer tokens.", code="token")
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)  # seen in the wild as a string
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        expires_at, known = now + float(expires_in), True
    else:
        exp = _jwt_exp(access)
        expires_at, known = (exp, True) if exp else (now + FALLBACK_LIFETIME_S, False)
    scope = body.get("scope")
    # RFC 6749 §5.1: scope may be omitted when identical to the request (SMART says required; tolerate).
    scope = scope if isinstance(scope, str) else requested_scope
    banner = body.get("need_patient_banner")
    ctx = body.get("fhirContext")
    return TokenResponse(
        access_token=access,
        token_type="Bearer",
        scope=" ".join(scope.split()),
        expires_at=expires_at,
        lifetime_known=known,
        refresh_token=body.get("refresh_token") if isinstance(body.get("refresh_token"), str) and body.get("refresh_token") else None,
        id_token=body.get("id_token") if isinstance(body.get("id_token"), str) and body.get("id_token") else None,
        patient=body.get("patient") if isinstance(body.get("patient"), str) and body.get("patient") else None,
        encounter=body.get("encounter") if isinstance(body.get("encounter"), str) and body.get("encounter") else None,
        need_patient_banner=banner is not False and str(banner).lower() != "false",
        smart_style_url=body.get("smart_style_url") if isinstance(body.get("smart_style_url"), str) else None,
        intent=body.get("intent") if isinstance(body.get("intent"), str) else None,
        tenant=body.get("tenant") if isinstance(body.get("tenant"), str) else None,
        fhir_context=tuple(c for c in ctx if isinstance(c, dict)) if isinstance(ctx, list) else (),
        extras={k: v for k, v in body.items() if k not in _KNOWN_TOKEN_FIELDS},
    )


def _token_post(session: requests.Session, config: SmartConfiguration, auth: ClientAuth, data: dict[str, str], *,
                timeout: Any, what: str) -> Any:
    headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
    auth.apply(config.token_endpoint, data, headers)
    try:
        response = session.post(config.token_endpoint, data=data, headers=headers, timeout=timeout,
                                allow_redirects=False)
    except requests.RequestException as exc:
        raise LaunchError(f"Could not reach the EHR's token endpoint for the {what} ({type(exc).__name__}).",
                          code="token-unreachable") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        # RFC 6749 §5.2: error + error_description. The description is the server's words; it never holds a token.
        err = body.get("error") if isinstance(body, Mapping) else None
        desc = body.get("error_description") if isinstance(body, Mapping) else None
        detail = f"{err}: {desc}" if err and desc else (err or f"HTTP {response.status_code}")
        raise LaunchError(f"The EHR refused the {what} ({_clip(detail)}).",
                          code="token-refused" if err != "invalid_grant" else "invalid-grant")
    return body


def _clip(text: Any, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def exchange_code(
    config: SmartConfiguration,
    auth: ClientAuth,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    requested_scope: str,
    session: requests.Session | None = None,
    timeout: Any = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> TokenResponse:
    """AL "Obtain access token" (reference row 17)."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": code_verifier}
    body = _token_post(session or requests.Session(), config, auth, data, timeout=timeout, what="sign-in")
    return parse_token_response(body, requested_scope=requested_scope, now=clock())


def refresh_access_token(
    config: SmartConfiguration,
    auth: ClientAuth,
    *,
    refresh_token: str,
    current_scope: str,
    session: requests.Session | None = None,
    timeout: Any = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> TokenResponse:
    """AL "Refresh access token". Confidential clients authenticate as at the code exchange (client-js #82).
    The caller keeps the old refresh token when the answer has none (client-py #112)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    body = _token_post(session or requests.Session(), config, auth, data, timeout=timeout, what="token refresh")
    return parse_token_response(body, requested_scope=current_scope, now=clock())


# ---------------------------------------------------------------------------------------------------------------
# id_token


@dataclass(frozen=True)
class IdToken:
    claims: dict[str, Any]

    @property
    def fhir_user(self) -> str | None:
        value = self.claims.get("fhirUser") or self.claims.get("profile")  # v1 used `profile`
        return value if isinstance(value, str) else None

    @property
    def subject(self) -> str | None:
        return self.claims.get("sub") if isinstance(self.claims.get("sub"), str) else None


def unverified_header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = token.split(".")
    if len(parts) != 3:
        raise LaunchError("The EHR's id_token is not a signed JWT.", code="id-token")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        raise LaunchError("The EHR's id_token could not be decoded.", code="id-token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise LaunchError("The EHR's id_token could not be decoded.", code="id-token")
    return header, claims


def verify_id_token(
    token: str,
    *,
    jwks: Mapping[str, Any],
    issuer: str,
    client_id: str,
    nonce: str | None,
    now: float | None = None,
    leeway: int = 60,
) -> IdToken:
    """SC "Steps for using an ID token" / OIDC Core §3.1.3.7: signature against the issuer's JWKS, ``iss``,
    ``aud`` (= client_id; with several audiences ``azp`` must be ours), ``exp``, and ``nonce`` when we sent one."""
    header, _ = unverified_header_and_claims(token)
    alg = header.get("alg")
    if alg not in ID_TOKEN_ALGS:  # never "none", never HMAC with a public key
        raise LaunchError(f"The EHR's id_token uses an algorithm the app does not accept ({_clip(alg, 20)}).",
                          code="id-token")
    try:
        keys = KeySet.import_key_set({"keys": [k for k in jwks.get("keys") or [] if isinstance(k, Mapping)
                                               and k.get("kty") in ("RSA", "EC")]})
    except (JoseError, ValueError, TypeError):
        raise LaunchError("The EHR's signing keys (JWKS) could not be read.", code="id-token") from None
    try:
        decoded = jwt.decode(token, keys, algorithms=list(ID_TOKEN_ALGS))
    except JoseError as exc:
        raise LaunchError(f"The EHR's id_token signature does not verify ({type(exc).__name__}).",
                          code="id-token") from None
    claims = dict(decoded.claims)
    when = int(now if now is not None else time.time())
    if claims.get("iss") != issuer:
        raise LaunchError("The EHR's id_token was issued by someone else than the EHR's identity issuer.",
                          code="id-token")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if client_id not in auds:
        raise LaunchError("The EHR's id_token was issued to another app (aud).", code="id-token")
    if len(auds) > 1 and claims.get("azp") != client_id:
        raise LaunchError("The EHR's id_token names several audiences but not this app as the authorized party.",
                          code="id-token")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise LaunchError("The EHR's id_token has no expiry.", code="id-token")
    if exp + leeway < when:
        raise LaunchError("The EHR's id_token has expired; launch the app again.", code="id-token")
    iat = claims.get("iat")
    if isinstance(iat, (int, float)) and iat - leeway > when:
        raise LaunchError("The EHR's id_token was issued in the future; check the clocks.", code="id-token")
    if nonce is not None and not secrets.compare_digest(str(claims.get("nonce") or ""), nonce):
        raise LaunchError("The EHR's id_token does not belong to this sign-in (nonce mismatch).", code="id-token")
    return IdToken(claims=claims)


def fhir_user_reference(fhir_user: str | None, fhir_base: str) -> str | None:
    """``Type/id`` from an absolute (Epic, client-js #105) or relative ``fhirUser`` (SC "fhirUser"). An absolute URL
    on another server than our FHIR base is not followed (our token must not go there), so it gives None."""
    if not fhir_user or not isinstance(fhir_user, str):
        return None
    value = fhir_user.strip()
    if value.startswith(("http://", "https://")):
        base = fhir_base.rstrip("/") + "/"
        if not value.startswith(base):
            return None
        value = value[len(base):]
    value = value.strip("/")
    m = re.match(r"^(Patient|Practitioner|PractitionerRole|RelatedPerson|Person)/([A-Za-z0-9\-.]{1,64})"
                 r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$", value)
    return f"{m.group(1)}/{m.group(2)}" if m else None


# ---------------------------------------------------------------------------------------------------------------
# Granted scopes → what the app may do


_V2 = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]+|\*)\.(c?r?u?d?s?)(\?.*)?$")
_V1 = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]+|\*)\.(read|write|\*)$")
_V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
_ACTION_LETTER = {"create": "c", "read": "r", "vread": "r", "update": "u", "delete": "d", "search": "s",
                  "c": "c", "r": "r", "u": "u", "d": "d", "s": "s"}


@dataclass(frozen=True)
class Scopes:
    """What a granted scope string allows (SC "Scopes for requesting FHIR Resources", v1 and v2). A granular v2
    scope (``patient/Observation.rs?category=...``) counts as access with a filter: ``can`` says yes, and
    ``filtered(type)`` tells the page that results may be partial."""

    raw: tuple[str, ...]
    grants: tuple[tuple[str, str, frozenset[str], str], ...]  # (context, type, letters, query)

    @classmethod
    def parse(cls, scope: str | None) -> Scopes:
        raw = tuple(dict.fromkeys((scope or "").split()))
        grants = []
        for s in raw:
            m = _V2.match(s)
            if m and m.group(3):
                grants.append((m.group(1), m.group(2), frozenset(m.group(3)), m.group(4) or ""))
                continue
            m = _V1.match(s)
            if m:
                grants.append((m.group(1), m.group(2), frozenset(_V1_LETTERS[m.group(3)]), ""))
        return cls(raw=raw, grants=tuple(grants))

    def __contains__(self, scope: str) -> bool:
        return scope in self.raw

    def can(self, resource_type: str, action: str) -> bool:
        letters = {_ACTION_LETTER[a] for a in _expand(action)}
        for _ctx, rtype, granted, _q in self.grants:
            if rtype in (resource_type, "*") and letters <= granted:
                return True
        # an action spelled as several letters ("cu") needs every letter, possibly across scopes
        if len(letters) > 1:
            return all(self.can(resource_type, letter) for letter in letters)
        return False

    def filtered(self, resource_type: str) -> bool:
        return any(rtype in (resource_type, "*") and q for _c, rtype, _l, q in self.grants) and not any(
            rtype in (resource_type, "*") and not q for _c, rtype, _l, q in self.grants)

    def missing(self, requested: str) -> list[str]:
        """Requested scopes that were not granted verbatim (for a 'what the EHR trimmed' note)."""
        return [s for s in requested.split() if s not in self.raw]

    def __str__(self) -> str:
        return " ".join(self.raw)


def _expand(action: str) -> list[str]:
    if action in _ACTION_LETTER and len(action) > 1:
        return [action]
    if action and all(ch in "cruds" for ch in action):
        return list(action)
    raise ValueError(f"unknown FHIR action {action!r} (use create/read/update/delete/search or cruds letters)")
