"""The contract between the sandbox's FHIR API and whoever decides what a request may do.

The FHIR API asks its ``Authorizer`` for a ``Grant`` per request and enforces it: the interaction on the resource
type (403 otherwise, with an OperationOutcome), and the patient compartment: when ``patient`` is set (patient/
scopes: the launch patient), or ``patients`` is (user/ scopes: the patients the user may access, e.g. the patients
on whose active CareTeam the user is), searches are limited to those patients' data and reading or writing another
patient's resource is a 403 with no data. The SMART authorization server (auth.py) turns bearer tokens into grants;
``--open`` mode uses ``OPEN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# FHIR interactions as the API names them; SMART v2 scope letters map onto them (c r u d s).
INTERACTIONS = ("create", "read", "vread", "update", "delete", "search", "history", "transaction", "batch")


@dataclass(frozen=True)
class Grant:
    """What one request may do. ``permissions`` maps a resource type (or "*") to the set of interactions."""

    permissions: dict[str, frozenset[str]] = field(default_factory=dict)
    patient: str | None = None  # set for patient/ scopes: only this patient's compartment
    user: str | None = None  # e.g. "Practitioner/123" for user/ scopes
    client_id: str | None = None
    # user/ scopes without a patient in context: only these patients' compartments (None = no limit, e.g. OPEN).
    patients: frozenset[str] | None = None

    def compartments(self) -> frozenset[str] | None:
        """The patients whose compartments this grant may reach, or None for no limit. A patient in context wins
        (patient/ scopes, and mixed user/ + patient/ grants, are held to the launch patient)."""
        if self.patient is not None:
            return frozenset((self.patient,))
        return self.patients

    def may_access_patient(self, patient_id: str) -> bool:
        limit = self.compartments()
        return limit is None or patient_id in limit

    def limit_text(self) -> str:
        """How the grant is limited, for a 403's words (no patient data: ids only)."""
        if self.patient is not None:
            return f"This access token is limited to Patient/{self.patient}"
        who = self.user or "this user"
        return f"This access token is limited to the patients {who} may access (their care teams)"

    def allows(self, resource_type: str, interaction: str) -> bool:
        for key in (resource_type, "*"):
            if interaction in self.permissions.get(key, frozenset()):
                return True
        return False


OPEN = Grant(permissions={"*": frozenset(INTERACTIONS)})


class Unauthorized(Exception):
    """No usable credentials (missing, unknown, expired or revoked token): the API answers 401."""

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.message = message
        self.error = error


class Authorizer(Protocol):
    def grant_for(self, authorization_header: str | None) -> Grant:
        """Return the grant for this request, or raise ``Unauthorized``."""
        ...


class OpenAuthorizer:
    """``--open`` mode (and the Foundation tests): every request may do everything, as on public test servers."""

    def grant_for(self, authorization_header: str | None) -> Grant:
        return OPEN
