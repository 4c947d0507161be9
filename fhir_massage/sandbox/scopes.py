"""SMART scopes: parse v1 and v2 syntax, narrow a request to what a client may have, turn a grant into permissions.

Pure functions, no I/O. References: SMART App Launch 2.2 "Scopes and Launch Context" (SC): v2 clinical scopes are
``(patient|user|system)/(Type|*).[c][r][u][d][s]`` with the letters in that order; v1 scopes ``.read``, ``.write``
and ``.*`` map to ``.rs``, ``.cud`` and ``.cruds`` ("SC: Scope equivalence").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Non-resource scopes the sandbox understands; everything else a client asks for is dropped from the grant, as
# real EHRs do (they do not fail the authorization for an unknown scope, they just do not grant it).
CONTEXT_SCOPES = (
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
)

V2_LETTERS = "cruds"
_V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
_V1_FROM_LETTERS = {v: k for k, v in _V1_LETTERS.items()}

_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]+|\*)\.([a-z*]+)(\?.*)?$")

# SMART letter -> FHIR interactions (access.INTERACTIONS). "r" covers read and vread and instance history,
# "s" search and type history: SC "Scope requirements" ties history to read/search access.
_INTERACTIONS = {
    "c": ("create",),
    "r": ("read", "vread", "history"),
    "u": ("update",),
    "d": ("delete",),
    "s": ("search", "history"),
}


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient | user | system
    resource_type: str  # a FHIR type or "*"
    letters: str  # v2 letters in canonical order, e.g. "rs"
    dialect: str  # "v1" or "v2": how the client wrote it
    query: str = ""  # granular v2 scopes (?category=...): parsed, but the sandbox cannot enforce them

    def render(self) -> str:
        if self.dialect == "v1":
            return f"{self.context}/{self.resource_type}.{_V1_FROM_LETTERS[self.letters]}"
        return f"{self.context}/{self.resource_type}.{self.letters}{self.query}"


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """A clinical-data scope, or None when ``scope`` is not one (or is malformed: letters out of order, unknown)."""
    m = _RESOURCE_SCOPE.match(scope)
    if not m:
        return None
    context, rtype, perm, query = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    if perm in _V1_LETTERS:
        if query:
            return None
        return ResourceScope(context, rtype, _V1_LETTERS[perm], "v1")
    # v2: a non-empty subsequence of "cruds" in that order (SC: "the permissions SHALL be ... in the order cruds").
    it = iter(V2_LETTERS)
    if not perm or not all(ch in it for ch in perm):
        return None
    return ResourceScope(context, rtype, perm, "v2", query)


def _narrow_letters(a: str, b: str) -> str:
    return "".join(ch for ch in V2_LETTERS if ch in a and ch in b)


def grant_scopes(
    requested: list[str],
    *,
    allowed: list[str] | None = None,
    dialect: str = "both",
    refresh: bool = True,
) -> list[str]:
    """The scopes the server grants for ``requested``, in request order, without duplicates.

    - ``dialect`` "v2" drops v1 scopes (as Oracle Health does for apps registered as v2), "v1" drops v2 scopes.
    - ``allowed`` (the client registration's allowed_scopes) narrows: context scopes must appear in it verbatim;
      a resource scope keeps the letters it shares with an allowed scope of the same context and a matching type
      (``*`` on either side matches; the narrower type wins). A v1 scope whose narrowed letters v1 cannot spell is
      dropped.
    - ``refresh`` False drops offline_access/online_access (the client gets no refresh token).
    - system/ scopes (backend services) and granular v2 scopes (``?category=``) are not granted: the sandbox does
      not run backend services and cannot enforce query-limited scopes, and granting what it cannot enforce would
      be a lie.
    """
    allowed_ctx: set[str] | None = None
    allowed_res: list[ResourceScope] = []
    if allowed is not None:
        allowed_ctx = {s for s in allowed if s in CONTEXT_SCOPES}
        allowed_res = [r for r in (parse_resource_scope(s) for s in allowed) if r is not None]

    out: list[str] = []
    for scope in requested:
        if scope in CONTEXT_SCOPES:
            if not refresh and scope in ("offline_access", "online_access"):
                continue
            if allowed_ctx is not None and scope not in allowed_ctx:
                continue
            candidates = [scope]
        else:
            rs = parse_resource_scope(scope)
            if rs is None or rs.context == "system" or rs.query:
                continue
            if dialect in ("v1", "v2") and rs.dialect != dialect:
                continue
            if allowed is None:
                candidates = [rs.render()]
            else:
                candidates = []
                for al in allowed_res:
                    if al.context != rs.context or al.query:
                        continue
                    if al.resource_type == "*":
                        rtype = rs.resource_type
                    elif rs.resource_type in ("*", al.resource_type):
                        rtype = al.resource_type
                    else:
                        continue
                    letters = _narrow_letters(rs.letters, al.letters)
                    if not letters:
                        continue
                    if rs.dialect == "v1" and letters not in _V1_FROM_LETTERS:
                        continue
                    candidates.append(ResourceScope(rs.context, rtype, letters, rs.dialect).render())
        for c in candidates:
            if c not in out:
                out.append(c)
    return out


def permissions(scopes: list[str]) -> tuple[dict[str, frozenset[str]], bool, bool]:
    """(permissions per resource type, has patient/ scopes, has user/ scopes) for granted ``scopes``.

    Patient- and user-context scopes are merged into one permission map: access.Grant has one map, and the FHIR
    API limits the whole grant to the patient compartment when a patient is set (see Authorizer).
    """
    perms: dict[str, set[str]] = {}
    has_patient = has_user = False
    for scope in scopes:
        rs = parse_resource_scope(scope)
        if rs is None or rs.context == "system" or rs.query:
            continue
        has_patient |= rs.context == "patient"
        has_user |= rs.context == "user"
        bucket = perms.setdefault(rs.resource_type, set())
        for letter in rs.letters:
            bucket.update(_INTERACTIONS[letter])
    return {k: frozenset(v) for k, v in perms.items()}, has_patient, has_user
