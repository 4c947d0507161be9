"""Configuration of the SMART app: defaults, the EHR registrations, and how they are read from TOML.

``create_app(config)`` takes a dict with these keys (all optional; the environment variable in brackets is read
by ``from_env`` for the ``fhir-massage app`` command):

=====================  ==========================================================================================
SECRET_KEY             signs the CSRF tokens. Random per process when absent (fine for one process; several
                       instances behind a load balancer must share one) [FHIR_MASSAGE_SECRET_KEY].
PUBLIC_URL             the app's external URL (scheme://host[:port][/prefix]); the redirect URI is
                       ``PUBLIC_URL + "/callback"`` and must be registered with the EHR exactly. Absent: taken from
                       each request (only sensible for local development) [FHIR_MASSAGE_PUBLIC_URL].
REGISTRATIONS          list of dicts, one per EHR, same keys as a TOML ``[[ehr]]`` table (see ``Registration``).
STORE_URL              ``sqlite:///path.db`` (default ``sqlite:///:memory:``, one process only) or
                       ``postgresql://...`` for several instances (see smart_app/store.py) [FHIR_MASSAGE_STORE_URL].
TRUST_PROXY_TLS        True when a TLS-terminating proxy stands in front: the app then trusts one hop of
                       X-Forwarded-Proto/Host/Prefix and sets Secure cookies even though it itself speaks http.
                       (A PUBLIC_URL with a path prefix needs the proxy to send X-Forwarded-Prefix.)
                       Without it the app refuses plain http on any non-loopback address.
DISCOVERY_TTL          seconds a SMART discovery result is reused per issuer (default 3600).
JWKS_TTL               seconds an issuer's JWKS is reused (default 3600; an unknown kid refetches once).
STATE_TTL              seconds between the authorize redirect and the callback (default 600).
SESSION_TTL            seconds a launch session lives without use (default 8 h, a clinical shift).
DRAFT_TTL              seconds a draft (session notes, later issues) is kept (default 7 days).
REFRESH_SKEW           refresh this many seconds before the access token expires (default 60; shortened to a
                       quarter of the token's lifetime for very short-lived tokens).
HTTP_TIMEOUT           (connect, read) seconds for every call to an EHR (default (5, 20)).
STYLE_TTL              seconds a fetched smart_style_url document is reused within a launch (default 3600).
AREAS                  names of the area modules to load (default orders, sessions, plan, cds: each
                       ``smart_app/<name>.py`` exposing ``bp``; missing modules are skipped).
BLUEPRINTS             extra Flask blueprints to register (embedding, tests).
STORE                  an already built Store object; wins over STORE_URL (tests, the demo).
=====================  ==========================================================================================

A registration (TOML ``[[ehr]]`` table or dict):

    iss               = "https://ehr.example.org/fhir"   # exact string the EHR sends; also the aud
    client_id         = "fhir-massage"
    name              = "Example EHR"                    # optional, shown on pages
    auth              = "public" | "client_secret_basic" | "private_key_jwt"    (default "public")
    client_secret_env = "EXAMPLE_EHR_SECRET"             # client_secret_basic: env var holding the secret, or
    client_secret     = "..."                            #   the secret itself (keep such files private)
    private_key_file  = "keys/example.pem"               # private_key_jwt: PEM or JWK JSON file (RSA or EC P-384);
    private_key       = {...} | "-----BEGIN ..."         #   or the key inline (dicts only: JWK or PEM text)
    private_key_alg   = "RS384" | "ES384"                # default from the key type
    next_public_key_file = "keys/next.pem"               # optional: the next key, published in our JWKS ahead of
                                                         #   a rotation (CA "Registering a client": SHOULD)
    scope_dialect     = "auto" | "v1" | "v2"             # auto: from the server's capabilities
    scopes            = "launch openid ..."              # optional override of the requested scopes
    frame_ancestors   = ["https://ehr.example.org"]      # origins allowed to embed the app (default: iss origin)

Relative ``private_key_file`` paths are relative to the TOML file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from fhir_massage import smart
from fhir_massage.errors import InvalidInput
from fhir_massage.loopback import is_loopback_host  # noqa: F401  (re-exported: create_app and the commands ask config)

DEFAULTS: dict[str, Any] = {
    "SECRET_KEY": None,
    "PUBLIC_URL": None,
    "REGISTRATIONS": [],
    "STORE_URL": "sqlite:///:memory:",
    "TRUST_PROXY_TLS": False,
    "DISCOVERY_TTL": 3600,
    "JWKS_TTL": 3600,
    "STATE_TTL": 600,
    "SESSION_TTL": 8 * 3600,
    "DRAFT_TTL": 7 * 24 * 3600,
    "REFRESH_SKEW": 60,
    "HTTP_TIMEOUT": (5.0, 20.0),
    "STYLE_TTL": 3600,
}

AUTH_METHODS = ("public", "client_secret_basic", "private_key_jwt")
_REG_KEYS = {"iss", "client_id", "name", "auth", "client_secret_env", "client_secret", "private_key_file",
             "private_key", "private_key_alg", "scope_dialect", "scopes", "frame_ancestors",
             "next_public_key_file", "next_public_key",
             "cds_iss", "cds_jwks_url", "cds_jwks"}  # CDS Hooks caller keys: read by smart_app/cds.py (docs/cds-hooks.md)


@dataclass(frozen=True)
class Registration:
    iss: str
    client_id: str
    client_auth: smart.ClientAuth = field(repr=False)
    name: str = ""
    scope_dialect: str = "auto"
    scopes: str | None = None
    frame_ancestors: tuple[str, ...] = ()
    next_public_jwk: dict[str, Any] | None = None  # published in /.well-known/jwks.json next to the current key

    @property
    def auth_method(self) -> str:
        return self.client_auth.method

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Registration:
        env = os.environ if environ is None else environ
        unknown = set(data) - _REG_KEYS
        if unknown:
            raise InvalidInput(unknown_keys_text(data, unknown))
        iss = data.get("iss")
        client_id = data.get("client_id")
        if not isinstance(iss, str) or urlsplit(iss).scheme not in ("http", "https") or not urlsplit(iss).netloc:
            raise InvalidInput(f"An EHR registration needs an absolute http(s) iss, not {iss!r}.")
        if not isinstance(client_id, str) or not client_id:
            raise InvalidInput(f"The registration for {iss} needs a client_id.")
        method = data.get("auth", "public")
        if method not in AUTH_METHODS:
            raise InvalidInput(f"auth for {iss} must be one of {', '.join(AUTH_METHODS)}, not {method!r}.")
        auth: smart.ClientAuth
        if method == "public":
            auth = smart.PublicClient(client_id)
        elif method == "client_secret_basic":
            secret = None
            if data.get("client_secret_env"):
                secret = env.get(str(data["client_secret_env"]))
                if not secret:
                    raise InvalidInput(f"The environment variable {data['client_secret_env']} (client secret for "
                                       f"{iss}) is not set.")
            elif data.get("client_secret"):
                secret = str(data["client_secret"])
            if not secret:
                raise InvalidInput(f"{iss} uses client_secret_basic but no client_secret or client_secret_env is set.")
            auth = smart.ClientSecretBasic(client_id, secret)
        else:
            if data.get("private_key") is not None:
                key_src: Any = data["private_key"]
            elif data.get("private_key_file"):
                key_src = _read_key_file(data["private_key_file"], base_dir, f"the private key file for {iss}")
            else:
                raise InvalidInput(f"{iss} uses private_key_jwt but no private_key_file is set.")
            try:
                key = smart.load_private_key(key_src)
                auth = smart.PrivateKeyJwt(client_id, key, data.get("private_key_alg"))
            except Exception as exc:  # LaunchError from smart: re-raise as a config problem, in words
                where = f" ({data['private_key_file']})" if data.get("private_key") is None else " (private_key)"
                raise InvalidInput(f"The private key for {iss}{where} cannot be used: "
                                   f"{key_problem(key_src, exc, private=True)}") from None
        next_jwk = None
        if data.get("next_public_key") is not None or data.get("next_public_key_file"):
            if method != "private_key_jwt":
                raise InvalidInput(f"next_public_key_file for {iss} only makes sense with private_key_jwt.")
            src = data.get("next_public_key")
            if src is None:
                src = _read_key_file(data["next_public_key_file"], base_dir, f"the next public key file for {iss}")
            try:
                next_jwk = smart.public_jwk(src, alg=data.get("private_key_alg"))
            except Exception as exc:
                where = f" ({data['next_public_key_file']})" if data.get("next_public_key") is None else ""
                raise InvalidInput(f"The next public key for {iss}{where} cannot be used: "
                                   f"{key_problem(src, exc, private=False)}") from None
        dialect = data.get("scope_dialect", "auto")
        if dialect not in ("auto", "v1", "v2"):
            raise InvalidInput(f"scope_dialect for {iss} must be auto, v1 or v2.")
        scopes = data.get("scopes")
        if isinstance(scopes, list):
            scopes = " ".join(str(s) for s in scopes)
        ancestors = data.get("frame_ancestors")
        if ancestors is None:
            p = urlsplit(iss)
            ancestors = [f"{p.scheme}://{p.netloc}"]
        if isinstance(ancestors, str):
            ancestors = [ancestors]
        checked = [frame_origin(origin) for origin in ancestors]
        return cls(iss=iss, client_id=client_id, client_auth=auth, name=str(data.get("name") or urlsplit(iss).netloc),
                   scope_dialect=dialect, scopes=scopes or None, frame_ancestors=tuple(checked),
                   next_public_jwk=next_jwk)


def unknown_keys_text(data: Mapping[str, Any], unknown: set[str]) -> str:
    """"The registration for https://ehr/fhir has an unknown key: client-id (did you mean client_id?)": names the
    EHR (its iss) so that a file of several registrations points at the right table, and suggests the key meant
    when the unknown one is a near miss (a hyphen for an underscore, a typo, a different case)."""
    import difflib

    iss = data.get("iss")
    who = f"The registration for {iss}" if isinstance(iss, str) and iss else "An EHR registration (without an iss)"
    normal = {k.replace("_", "").lower(): k for k in _REG_KEYS}
    parts = []
    for key in sorted(unknown, key=str):
        text = str(key)
        guess = normal.get(re.sub(r"[\-_\s]", "", text).lower()) or next(
            iter(difflib.get_close_matches(text, sorted(_REG_KEYS), n=1, cutoff=0.75)), None)
        parts.append(f"{text} (did you mean {guess}?)" if guess else text)
    noun = "an unknown key" if len(parts) == 1 else "unknown keys"
    return (f"{who} has {noun}: {', '.join(parts)}. The keys a registration takes: "
            f"{', '.join(sorted(_REG_KEYS))}.")


def key_problem(src: Any, exc: BaseException | None = None, *, private: bool = True) -> str:
    """What is wrong with a key (PEM text or JWK), in words an operator can act on, never the key itself nor an
    exception class name."""
    if isinstance(src, str) and not src.strip():
        return "the key is empty."
    if isinstance(src, Mapping) or (isinstance(src, str) and src.lstrip().startswith("{")):
        if isinstance(src, str):
            try:
                jwk = json.loads(src)
            except ValueError:
                return "it looks like a JWK (JSON) but is not valid JSON."
        else:
            jwk = dict(src)
        if not isinstance(jwk, dict):
            return "a JWK must be a JSON object."
        if "keys" in jwk and "kty" not in jwk:
            return "this is a JWK Set (\"keys\": [...]); give the one key (a single JWK object) instead."
        kty = jwk.get("kty")
        if kty not in ("RSA", "EC"):
            return (f"the key type (kty) {kty!r} is not supported; use an RSA key or an EC key on the P-384 curve."
                    if kty else "the JWK has no key type (kty); use an RSA key or an EC key on the P-384 curve.")
        if kty == "EC" and jwk.get("crv") not in (None, "P-384"):
            return f"the EC curve {jwk.get('crv')!r} is not supported; SMART asks for ES384, which uses P-384."
        if private and "d" not in jwk:
            return "the JWK holds a public key only (no \"d\"); the app signs with the private key."
        own = _own_words(exc)
        if own:
            return own
        members = ("n, e" if kty == "RSA" else "crv, x, y") + (" and d" if private else "")
        return f"the JWK's {kty} values do not form a valid key (check {members})."
    if not isinstance(src, str):
        return "give a file name (private_key_file), PEM text or a JWK object."
    if "-----BEGIN" not in src:
        return "it is neither PEM text (-----BEGIN ... KEY-----) nor a JWK (JSON)."
    if "ENCRYPTED" in src:
        return "the PEM key is protected with a passphrase; export it without one (and keep the file private)."
    if private and re.search(r"-----BEGIN (?:RSA )?PUBLIC KEY-----|-----BEGIN CERTIFICATE-----", src):
        return "it holds a public key or a certificate, not the private key the app signs with."
    if "-----END" not in src:
        return "the PEM text is cut off (no -----END line)."
    own = _own_words(exc)
    if own:
        return own
    kind = "private" if private else "public or private"
    return (f"the PEM text could not be read as an RSA or EC (P-384) {kind} key; check that the whole key was "
            "copied, with its BEGIN and END lines.")


def _own_words(exc: BaseException | None) -> str | None:
    """The message of our own error (e.g. a key algorithm that does not fit the key), unless it only names an
    exception class ("could not be read (ValueError).")."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str) or not message or re.search(r"\(\w+\)\.?$", message):
        return None
    return message[:1].lower() + message[1:] if message[1:2].islower() else message  # "ES384 needs ..." stays


def _read_key_file(name: Any, base_dir: Path | None, what: str) -> str:
    """A key file named in a registration; a relative name is read beside the registrations file."""
    path = Path(str(name))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InvalidInput(f"Cannot read {what}: there is no file {path}.") from None
    except IsADirectoryError:
        raise InvalidInput(f"Cannot read {what}: {path} is a directory, not a key file.") from None
    except PermissionError:
        raise InvalidInput(f"Cannot read {what}: this process may not read {path} (permissions).") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"Cannot read {what}: {path} is not text (a key file is PEM text or a JWK in JSON; "
                           "convert a DER or PKCS#12 file to PEM).") from None
    except OSError as exc:
        raise InvalidInput(f"Cannot read {what}: {path} ({exc.strerror or 'the system refused'}).") from None


# A host is DNS labels or a bracketed IPv6 literal; anything else (";", spaces, quotes, "*") would change the
# meaning of the Content-Security-Policy the origin is pasted into (CSP3 §2.3.1 host-source; frame-ancestors).
_HOST_LABELS = re.compile(r"^[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?)*$")


def frame_origin(value: Any) -> str:
    """A frame_ancestors entry as a plain serialized origin (scheme://host[:port]), or InvalidInput."""
    text = str(value)
    p = urlsplit(text)
    try:
        port = p.port
    except ValueError:
        port = -1
    host = p.hostname or ""
    ipv6 = ":" in host
    if (text != text.strip() or p.scheme not in ("http", "https") or not host or p.username is not None
            or p.password is not None or p.path not in ("", "/") or p.query or p.fragment or port == -1
            or not (_HOST_LABELS.match(host) or (ipv6 and re.fullmatch(r"[0-9a-f:.]+", host)))):
        raise InvalidInput(f"frame_ancestors entries are origins like https://ehr.example.org, not {text!r}.")
    host = f"[{host}]" if ipv6 else host
    return f"{p.scheme}://{host}" + (f":{port}" if port is not None else "")


def load_registrations_toml(path: str | Path) -> list[dict[str, Any]]:
    """``[[ehr]]`` tables from a TOML file, as dicts (relative key paths made absolute)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"Cannot read the registrations file: there is no file {path}.") from None
    except IsADirectoryError:
        raise InvalidInput(f"Cannot read the registrations file: {path} is a directory.") from None
    except PermissionError:
        raise InvalidInput(f"Cannot read the registrations file {path}: this process may not read it "
                           "(permissions).") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"The registrations file {path} is not UTF-8 text (TOML files are).") from None
    except OSError as exc:
        raise InvalidInput(f"Cannot read the registrations file {path} ({exc.strerror or 'the system refused'}).") \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path} is not valid TOML: {exc}.") from None
    tables = data.get("ehr")
    if not isinstance(tables, list) or not tables:
        raise InvalidInput(f"{path} has no [[ehr]] tables.")
    if not all(isinstance(t, dict) for t in tables):
        raise InvalidInput(f"In {path}, ehr must be a list of [[ehr]] tables (each with iss, client_id, ...), not "
                           "plain values.")
    out = []
    for t in tables:
        t = dict(t)
        for k in ("private_key_file", "next_public_key_file"):
            if t.get(k) and not Path(t[k]).is_absolute():
                t[k] = str((path.parent / t[k]).resolve())
        out.append(t)
    return out


def build_registry(items: list[Mapping[str, Any]]) -> dict[str, Registration]:
    registry: dict[str, Registration] = {}
    for item in items:
        reg = item if isinstance(item, Registration) else Registration.from_dict(item)
        if reg.iss in registry:
            raise InvalidInput(f"{reg.iss} is registered twice.")
        registry[reg.iss] = reg
    return registry


# Lifetimes an operator may tune from the environment (seconds, whole numbers): FHIR_MASSAGE_<KEY>.
_ENV_SECONDS = ("DISCOVERY_TTL", "JWKS_TTL", "STATE_TTL", "SESSION_TTL", "DRAFT_TTL", "REFRESH_SKEW", "STYLE_TTL")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The create_app keys found in the environment (FHIR_MASSAGE_*); a malformed value is an InvalidInput naming it.

    FHIR_MASSAGE_REGISTRATIONS names the registrations file (TOML) and becomes REGISTRATIONS;
    FHIR_MASSAGE_TRUST_PROXY_TLS is a yes/no switch; the lifetimes in ``_ENV_SECONDS`` are whole seconds.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in ("SECRET_KEY", "PUBLIC_URL", "STORE_URL"):
        if env.get(f"FHIR_MASSAGE_{key}"):
            out[key] = env[f"FHIR_MASSAGE_{key}"]
    if env.get("FHIR_MASSAGE_REGISTRATIONS"):
        out["REGISTRATIONS"] = load_registrations_toml(env["FHIR_MASSAGE_REGISTRATIONS"])
    if "FHIR_MASSAGE_TRUST_PROXY_TLS" in env:
        raw = env["FHIR_MASSAGE_TRUST_PROXY_TLS"].strip().lower()
        if raw not in _TRUE | _FALSE:
            raise InvalidInput(f"FHIR_MASSAGE_TRUST_PROXY_TLS must be yes or no (1/0), not {raw!r}.")
        out["TRUST_PROXY_TLS"] = raw in _TRUE
    for key in _ENV_SECONDS:
        raw = env.get(f"FHIR_MASSAGE_{key}")
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            value = -1
        if value <= 0 and not (key == "REFRESH_SKEW" and value == 0):
            raise InvalidInput(f"FHIR_MASSAGE_{key} must be a whole number of seconds above 0, not {raw!r}.")
        out[key] = value
    return out
