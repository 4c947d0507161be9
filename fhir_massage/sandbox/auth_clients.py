"""Client registrations of the sandbox's authorization server: from config dicts, a TOML file or a quick CLI flag.

A registration is what an EHR's app gallery would hold: exact redirect URIs, a launch URL, how the client
authenticates, and the sandbox's knobs for testing clients (narrowed scopes, short token lifetimes, a v1-only or
v2-only scope dialect).
"""

from __future__ import annotations

import hmac
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from fhir_massage.errors import InvalidInput
from fhir_massage.loopback import is_loopback_host

AUTH_METHODS = ("none", "client_secret_basic", "private_key_jwt")
DIALECTS = ("v1", "v2", "both")
_KEYS = {
    "client_id", "redirect_uris", "launch_url", "auth_method", "client_secret", "jwks", "jwks_uri", "jwks_file",
    "allowed_scopes", "access_token_lifetime", "refresh", "scope_dialect", "name", "introspect_any",
}


@dataclass
class Client:
    client_id: str
    redirect_uris: list[str]
    launch_url: str | None = None
    auth_method: str = "none"
    client_secret: str | None = field(default=None, repr=False)
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    allowed_scopes: list[str] | None = None
    access_token_lifetime: int = 3600
    refresh: bool = True
    scope_dialect: str = "both"
    name: str = ""
    introspect_any: bool = False  # may introspect other clients' tokens (a resource server's registration)

    # authlib ClientMixin -------------------------------------------------------------------------------------
    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        # SMART apps always send redirect_uri; no default keeps a missing one an error (AL "authorize" table).
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        # Narrowing happens with the launch context in auth.py; authlib only needs a string here.
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string match (RFC 9700 §4.1.3): no prefix, no port or path leniency.
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.client_secret) and hmac.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "refresh_token":
            return self.refresh
        return grant_type == "authorization_code"

    # keys -----------------------------------------------------------------------------------------------------
    def public_jwks(self) -> dict[str, Any]:
        """The client's public keys: the registered JWKS, or the one at jwks_uri, fetched at each use so a key
        rotation on the client's side is seen at once (SMART 2.2 "Authenticating with asymmetric keys")."""
        if self.jwks is not None:
            return self.jwks
        if not self.jwks_uri:
            raise InvalidInput(f"client {self.client_id} has neither jwks nor jwks_uri")
        resp = requests.get(self.jwks_uri, timeout=10, headers={"Accept": "application/json"})
        resp.raise_for_status()
        data = resp.json()
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise InvalidInput(f"{self.jwks_uri} is not a JWK Set")
        return data


def client_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> Client:
    """Check one registration and build a Client; raises InvalidInput with a plain message on any mistake."""
    unknown = set(data) - _KEYS
    cid = data.get("client_id")
    if not isinstance(cid, str) or not cid:
        raise InvalidInput("a client registration needs a client_id")
    if unknown:
        raise InvalidInput(f"client {cid}: unknown keys {', '.join(sorted(unknown))}")
    uris = data.get("redirect_uris")
    if isinstance(uris, str):
        uris = [uris]
    if not uris or not all(isinstance(u, str) and urlsplit(u).scheme in ("http", "https") for u in uris):
        raise InvalidInput(f"client {cid}: redirect_uris must be a list of absolute http(s) URLs")
    method = data.get("auth_method", "none")
    if method not in AUTH_METHODS:
        raise InvalidInput(f"client {cid}: auth_method must be one of {', '.join(AUTH_METHODS)}")
    jwks = data.get("jwks")
    if data.get("jwks_file"):
        path = Path(data["jwks_file"])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            jwks = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"client {cid}: cannot read jwks_file {path}: {exc}") from None
    jwks_uri = data.get("jwks_uri")
    if jwks_uri:
        parts = urlsplit(jwks_uri)
        # SMART 2.2: jwks_uri over TLS; loopback http is allowed for local testing only.
        if not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))):
            raise InvalidInput(f"client {cid}: jwks_uri must be https (or http on a loopback address)")
    if method == "client_secret_basic" and not data.get("client_secret"):
        raise InvalidInput(f"client {cid}: client_secret_basic needs a client_secret")
    if method == "private_key_jwt" and not (jwks or jwks_uri):
        raise InvalidInput(f"client {cid}: private_key_jwt needs jwks, jwks_file or jwks_uri")
    dialect = data.get("scope_dialect", "both")
    if dialect not in DIALECTS:
        raise InvalidInput(f"client {cid}: scope_dialect must be v1, v2 or both")
    lifetime = data.get("access_token_lifetime", 3600)
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime < 1:
        raise InvalidInput(f"client {cid}: access_token_lifetime must be a positive number of seconds")
    allowed = data.get("allowed_scopes")
    if isinstance(allowed, str):
        allowed = allowed.split()
    return Client(
        client_id=cid,
        redirect_uris=list(uris),
        launch_url=data.get("launch_url"),
        auth_method=method,
        client_secret=data.get("client_secret"),
        jwks=jwks,
        jwks_uri=jwks_uri,
        allowed_scopes=list(allowed) if allowed is not None else None,
        access_token_lifetime=lifetime,
        refresh=bool(data.get("refresh", True)),
        scope_dialect=dialect,
        name=data.get("name") or cid,
        introspect_any=bool(data.get("introspect_any", False)),
    )


def load_clients_toml(path: str | Path) -> list[dict[str, Any]]:
    """``[[client]]`` tables of a TOML file, as dicts; ``jwks_file`` is resolved against the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read client registrations from {path}: {exc}") from None
    clients = data.get("client", [])
    if not isinstance(clients, list):
        raise InvalidInput(f"{path}: expected [[client]] tables")
    out = []
    for c in clients:
        c = dict(c)
        if c.get("jwks_file") and not Path(c["jwks_file"]).is_absolute():
            c["jwks_file"] = str(path.parent / c["jwks_file"])
        out.append(c)
    return out


def parse_client_flag(value: str) -> dict[str, Any]:
    """``CLIENT_ID=REDIRECT_URI[,LAUNCH_URL]`` (the --client flag) -> a public client registration."""
    cid, sep, rest = value.partition("=")
    if not sep or not cid or not rest:
        raise InvalidInput(f"--client {value!r}: expected CLIENT_ID=REDIRECT_URI[,LAUNCH_URL]")
    redirect, _, launch = rest.partition(",")
    return {"client_id": cid, "redirect_uris": [redirect], "launch_url": launch or None, "auth_method": "none"}


# --- command-line options of `fhir-massage sandbox` ---------------------------------------------------------------

def add_cli_options(parser) -> None:
    """The SMART authorization server's options on the `fhir-massage sandbox` parser."""
    g = parser.add_argument_group("SMART authorization server")
    g.add_argument("--clients", type=Path, default=None, metavar="FILE",
                   help="client registrations: a TOML file of [[client]] tables (client_id, redirect_uris, launch_url,"
                        " auth_method, client_secret, jwks_file or jwks_uri, allowed_scopes, access_token_lifetime,"
                        " refresh, scope_dialect, name)")
    g.add_argument("--client", action="append", default=[], metavar="ID=REDIRECT[,LAUNCH]",
                   help="register a public client quickly (repeatable)")
    g.add_argument("--discovery", choices=("both", "capability-only"), default="both",
                   help="capability-only: no .well-known/smart-configuration, only the CapabilityStatement (v1 style)")


def auth_options_from_args(args) -> dict[str, Any]:
    """SandboxConfig.auth from the parsed options; every registration is checked now, so mistakes stop the start."""
    clients: list[dict[str, Any]] = []
    if getattr(args, "clients", None):
        clients += load_clients_toml(args.clients)
    clients += [parse_client_flag(v) for v in getattr(args, "client", None) or []]
    for c in clients:
        client_from_dict(c)
    return {"clients": clients, "discovery": getattr(args, "discovery", "both")}
