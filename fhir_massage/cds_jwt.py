"""Authenticating a CDS Client (an EHR) that calls our CDS Hooks service (CDS Hooks 2.0.1 "Trusting CDS Clients").

Every call carries ``Authorization: Bearer <JWT>`` signed by the EHR. This module checks such a JWT against the
EHRs we were told to trust, and nothing else: no Flask, no clock reads, no HTTP (the caller passes ``now``, a
``get_jwks(url, kid)`` callable and a ``remember_jti(iss, jti, ttl) -> bool`` callable).

What is checked, in an order chosen so that a bad token costs nothing and triggers no outbound request:

1. three base64url parts, JSON header and claims; ``alg`` on our list (spec: never ``none``, never a symmetric
   HMAC algorithm; ES384 and RS384 recommended - the only two accepted by default); ``typ`` absent or ``JWT``;
2. ``iss`` is a CDS issuer of one of the registered EHRs (spec: "CDS Services SHOULD allow-list the iss");
3. ``aud`` (string or array) contains the exact URL of the endpoint that was called;
4. ``exp`` in the future (small leeway), not further away than ``max_lifetime`` (this bounds how long a ``jti``
   must be remembered), ``iat`` not in the future;
5. ``jti`` present;
6. the key: from the ``jku`` header only if that URL is on the EHR's allow-list (spec: "SHOULD allow-list jku"),
   else from the EHR's configured ``jwks_urls`` or inline ``jwks``; the signature is verified with joserfc;
7. only then ``jti`` is remembered; a ``jti`` seen before is a replay (so a forged token cannot burn real jtis).

Any failure raises ``CdsAuthError`` whose message says what was wrong in plain words (never the token).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .errors import MassageError
from .loopback import is_loopback_host

__all__ = ["CdsAuthError", "CdsIssuer", "CdsCaller", "issuers_from_registrations", "verify_cds_jwt",
           "DEFAULT_ALGORITHMS"]

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS384", "ES384")
_FORBIDDEN = {"none", "HS256", "HS384", "HS512"}


class CdsAuthError(MassageError):
    """The caller could not be authenticated as a registered CDS Client (the service answers 401)."""

    code = "cds-auth"


@dataclass(frozen=True)
class CdsIssuer:
    """One EHR allowed to call the CDS service, from its registration.

    ``issuers``: the JWT ``iss`` values it signs with. ``jwks_urls``: where its keys are; a ``jku`` header is
    honoured only when it is one of them. ``jwks``: keys exchanged out of band (inline JWKS). ``fhir_servers``:
    the FHIR base URL(s) it may send as ``fhirServer`` (our access token would otherwise go to a host the EHR
    chose freely).
    """

    name: str
    issuers: tuple[str, ...]
    jwks_urls: tuple[str, ...] = ()
    jwks: Mapping[str, Any] | None = field(default=None, repr=False)
    fhir_servers: tuple[str, ...] = ()

    @property
    def has_keys(self) -> bool:
        return bool(self.jwks_urls) or bool(self.jwks)


@dataclass(frozen=True)
class CdsCaller:
    issuer: CdsIssuer
    iss: str
    jti: str
    claims: Mapping[str, Any]


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if isinstance(v, str) and v)
    return ()


def issuers_from_registrations(registrations: Iterable[Mapping[str, Any]]) -> dict[str, CdsIssuer]:
    """``{jwt iss: CdsIssuer}`` from EHR registration dicts (smart_app config ``REGISTRATIONS``).

    Registration keys read here (see docs/cds-hooks.md):
    ``cds_iss`` (string or list; the JWT ``iss`` the EHR's CDS client uses; default: the registration's ``iss``),
    ``cds_jwks_url`` (string or list; the EHR's JWKS URL(s), also the ``jku`` allow-list),
    ``cds_jwks`` (an inline JWKS dict). A registration with neither key source cannot call the CDS service.
    """
    out: dict[str, CdsIssuer] = {}
    for reg in registrations:
        if not isinstance(reg, Mapping):
            continue
        urls = _strings(reg.get("cds_jwks_url"))
        jwks = reg.get("cds_jwks") if isinstance(reg.get("cds_jwks"), Mapping) else None
        if not urls and not jwks:
            continue
        issuers = _strings(reg.get("cds_iss")) or _strings(reg.get("iss"))
        fhir = _strings(reg.get("iss"))
        entry = CdsIssuer(name=str(reg.get("name") or (issuers[0] if issuers else "EHR")), issuers=issuers,
                          jwks_urls=urls, jwks=jwks, fhir_servers=tuple(u.rstrip("/") for u in fhir))
        for iss in issuers:
            out[iss] = entry
    return out


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = token.split(".")
    if len(parts) != 3:
        raise CdsAuthError("The Authorization bearer token is not a signed JWT.")
    try:
        header, claims = _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, TypeError):
        raise CdsAuthError("The Authorization bearer token could not be decoded.") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise CdsAuthError("The Authorization bearer token could not be decoded.")
    return header, claims


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def verify_cds_jwt(
    token: str,
    *,
    expected_aud: str | Iterable[str],
    issuers: Mapping[str, CdsIssuer],
    get_jwks: Callable[[str, str | None], Mapping[str, Any]],
    remember_jti: Callable[[str, str, float], bool],
    now: float,
    leeway: float = 30.0,
    max_lifetime: float = 600.0,
    algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
) -> CdsCaller:
    """Verify the CDS Client's JWT (see the module docstring); returns who called. Raises ``CdsAuthError``.

    ``expected_aud``: the exact URL the EHR called (or several spellings of it, e.g. the public URL and the URL
    seen behind a proxy). ``get_jwks(url, kid)`` fetches (and may cache) a JWKS; it may raise ``CdsAuthError``.
    ``remember_jti(iss, jti, ttl)`` stores the jti for ``ttl`` seconds and returns False when it was already there.
    """
    allowed = tuple(a for a in algorithms if a not in _FORBIDDEN)
    if not isinstance(token, str) or not token:
        raise CdsAuthError("The call has no bearer JWT (Authorization: Bearer ...).")
    header, claims = _unverified(token)
    alg = header.get("alg")
    if alg not in allowed:
        raise CdsAuthError(f"The JWT algorithm is not accepted (allowed: {', '.join(allowed)}).")
    typ = header.get("typ")
    if typ is not None and str(typ).upper() != "JWT":
        raise CdsAuthError("The JWT header typ must be JWT.")

    iss = claims.get("iss")
    issuer = issuers.get(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise CdsAuthError("The JWT issuer (iss) is not a registered CDS client of this service.")

    wanted = {expected_aud} if isinstance(expected_aud, str) else set(expected_aud)
    aud = claims.get("aud")
    auds = _strings(aud)
    if not auds or not wanted.intersection(auds):
        raise CdsAuthError("The JWT audience (aud) is not the URL of this CDS service endpoint.")

    exp = _number(claims.get("exp"))
    if exp is None:
        raise CdsAuthError("The JWT has no expiry (exp).")
    if exp + leeway < now:
        raise CdsAuthError("The JWT has expired.")
    if exp - now > max_lifetime + leeway:
        raise CdsAuthError(f"The JWT lives too long (exp more than {int(max_lifetime)} s ahead).")
    iat = _number(claims.get("iat"))
    if iat is not None and iat - leeway > now:
        raise CdsAuthError("The JWT was issued in the future (iat); check the clocks.")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise CdsAuthError("The JWT has no usable jti (nonce).")

    kid = header.get("kid") if isinstance(header.get("kid"), str) else None
    jku = header.get("jku")
    if jku is not None:
        if not isinstance(jku, str) or jku not in issuer.jwks_urls:
            raise CdsAuthError("The JWT's jku (key set URL) is not on this EHR's allow-list.")
        sources: list[Mapping[str, Any]] = [get_jwks(jku, kid)]
    else:
        sources = []
        if issuer.jwks:
            sources.append(issuer.jwks)
        for url in issuer.jwks_urls:
            sources.append(get_jwks(url, kid))
    keys = [k for src in sources for k in (src.get("keys") or []) if isinstance(k, Mapping)
            and k.get("kty") in ("RSA", "EC") and (kid is None or k.get("kid") in (None, kid))]
    if not keys:
        raise CdsAuthError("None of the EHR's signing keys matches the JWT's key id (kid).")
    try:
        key_set = KeySet.import_key_set({"keys": [dict(k) for k in keys]})
    except (JoseError, ValueError, TypeError):
        raise CdsAuthError("The EHR's signing keys (JWKS) could not be read.") from None
    try:
        jwt.decode(token, key_set, algorithms=list(allowed))
    except (JoseError, ValueError, TypeError) as exc:
        raise CdsAuthError(f"The JWT signature does not verify ({type(exc).__name__}).") from None

    ttl = max(exp - now, 0.0) + leeway
    if not remember_jti(iss, jti, ttl):
        raise CdsAuthError("The JWT was already used (jti replayed).")
    return CdsCaller(issuer=issuer, iss=iss, jti=jti, claims=dict(claims))


def is_https_or_loopback(url: str) -> bool:
    """JWKS and FHIR URLs must be https, except on a loopback host (development, the sandbox, tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.netloc:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    return is_loopback_host(parts.hostname)
