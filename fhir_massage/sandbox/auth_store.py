"""In-memory, thread-safe state of the sandbox's authorization server: launches, codes, tokens, used JWT ids.

Memory, not SQLite: a sandbox restart should forget every grant (a real EHR's tokens don't outlive its test
environment either), and the threaded dev server only needs one lock. Nothing here is logged; the ``repr`` of a
record never shows a secret.

The records implement the small model interfaces authlib's grants call (``get_scope``, ``is_expired``, ...).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


@dataclass
class Launch:
    id: str = field(repr=False)
    client_id: str
    user: dict[str, Any]
    patient: str | None
    context: dict[str, Any]  # encounter, intent, need_patient_banner, smart_style_url, fhirContext
    expires_at: float
    used: bool = False


@dataclass
class AuthCode:
    code: str = field(repr=False)
    client_id: str
    redirect_uri: str
    scope: str
    user: dict[str, Any]
    context: dict[str, Any]  # patient, encounter, ... as they go into the token response
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    expires_at: float
    auth_time: int
    family: str = field(default_factory=new_secret, repr=False)
    used: bool = False

    # authlib AuthorizationCodeMixin / OIDC AuthorizationCodeMixin
    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None


@dataclass
class Token:
    client_id: str
    scope: str
    user: dict[str, Any]
    context: dict[str, Any]
    family: str = field(repr=False)
    issued_at: float
    expires_in: int
    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_at: float | None = None
    revoked: bool = False
    refresh_used: bool = False
    clock: Callable[[], float] = field(default=time.time, repr=False)

    # authlib TokenMixin
    def check_client(self, client) -> bool:
        return self.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return self.clock() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self):
        return self.user

    def get_client(self):  # pragma: no cover - authlib does not call it for our endpoints
        raise NotImplementedError


class AuthStore:
    """All mutable state; every public method takes the lock, so the threaded server can call them freely."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._launches: dict[str, Launch] = {}
        self._codes: dict[str, AuthCode] = {}
        self._access: dict[str, Token] = {}
        self._refresh: dict[str, Token] = {}
        self._jti: dict[tuple[str, str], float] = {}

    # launches -------------------------------------------------------------------------------------------------
    def add_launch(self, launch: Launch) -> None:
        with self._lock:
            self._launches[launch.id] = launch

    def take_launch(self, launch_id: str, client_id: str) -> Launch | None:
        """The live launch ``launch_id`` issued for ``client_id``, marked used; None if unknown, expired or used.

        A launch id stands for one EHR session handing one app its context: one authorization may use it.
        """
        with self._lock:
            launch = self._launches.get(launch_id)
            if launch is None or launch.used or launch.client_id != client_id or self.clock() >= launch.expires_at:
                return None
            launch.used = True
            return launch

    def peek_launch(self, launch_id: str) -> Launch | None:
        with self._lock:
            launch = self._launches.get(launch_id)
            if launch is None or launch.used or self.clock() >= launch.expires_at:
                return None
            return launch

    # codes ----------------------------------------------------------------------------------------------------
    def add_code(self, code: AuthCode) -> None:
        with self._lock:
            self._codes[code.code] = code

    def redeem_code(self, code: str, client_id: str) -> AuthCode | None:
        """The code if it is live and belongs to ``client_id``, marked used at once (two racing token requests
        cannot both win). A replayed code revokes every token issued from it (RFC 6749 §4.1.2, SMART 2.2)."""
        with self._lock:
            rec = self._codes.get(code)
            if rec is None or rec.client_id != client_id:
                return None
            if rec.used:
                self.revoke_family(rec.family)
                return None
            rec.used = True
            if self.clock() >= rec.expires_at:
                return None
            return rec

    # tokens ---------------------------------------------------------------------------------------------------
    def add_token(self, token: Token) -> None:
        with self._lock:
            self._access[token.access_token] = token
            if token.refresh_token:
                self._refresh[token.refresh_token] = token

    def access_token(self, value: str) -> Token | None:
        with self._lock:
            return self._access.get(value)

    def use_refresh_token(self, value: str, client_id: str) -> Token | None:
        """The token record for a live refresh token of ``client_id``. Reuse of a rotated refresh token revokes
        the whole family (OAuth 2.0 Security BCP, RFC 9700 §4.14.2: refresh token rotation)."""
        with self._lock:
            tok = self._refresh.get(value)
            if tok is None or tok.client_id != client_id:
                return None
            if tok.refresh_used:
                self.revoke_family(tok.family)
                return None
            if tok.revoked or (tok.refresh_expires_at is not None and self.clock() >= tok.refresh_expires_at):
                return None
            return tok

    def mark_refresh_used(self, tok: Token) -> None:
        with self._lock:
            tok.refresh_used = True

    def find_token(self, value: str, hint: str | None = None) -> tuple[Token, str] | None:
        with self._lock:
            order = ("refresh_token", "access_token") if hint == "refresh_token" else ("access_token", "refresh_token")
            for kind in order:
                tok = (self._access if kind == "access_token" else self._refresh).get(value)
                if tok is not None:
                    return tok, kind
            return None

    def revoke_family(self, family: str) -> None:
        with self._lock:
            for tok in list(self._access.values()):
                if tok.family == family:
                    tok.revoked = True

    # JWT ids of client assertions ------------------------------------------------------------------------------
    def use_jti(self, client_id: str, jti: str, exp: float) -> bool:
        """True the first time (client_id, jti) is seen while the assertion is live; False on a replay."""
        with self._lock:
            now = self.clock()
            for key in [k for k, until in self._jti.items() if until < now]:
                del self._jti[key]
            key = (client_id, jti)
            if key in self._jti:
                return False
            self._jti[key] = max(exp, now) + 60
            return True
