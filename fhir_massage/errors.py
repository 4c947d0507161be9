"""The one exception tree of fhir-massage.

Every error carries a machine ``code`` (stable, for logs and JSON bodies) and a ``message`` a person can read.
Screening outcomes are values, never exceptions. The web layer maps each class to one page or JSON body in one
place (see smart_app). ``retryable`` tells a caller whether trying the same thing again can help.
"""

from __future__ import annotations

from typing import Any


class MassageError(Exception):
    code = "error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class LaunchError(MassageError):
    """A SMART launch could not go on: unknown iss, state mismatch, missing context, a refused authorization."""

    code = "launch"


class InvalidInput(MassageError):
    """Input from a person or a file that we cannot use (not JSON, not a Bundle, ...)."""

    code = "invalid-input"


class InvalidResource(MassageError):
    """A FHIR resource that breaks the FHIR structure or one of our profiles."""

    code = "invalid-resource"

    def __init__(self, message: str, *, issues: list[dict[str, Any]] | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.issues = issues or []


class FhirError(MassageError):
    """A FHIR server answered with an error status (or could not be reached)."""

    code = "fhir"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        url: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.outcome = outcome
        self.url = url

    def issues(self) -> list[dict[str, Any]]:
        return list((self.outcome or {}).get("issue") or [])


class FhirAuthError(FhirError):
    """401/403: the token is missing, expired, or lacks a scope."""

    code = "fhir-auth"


class FhirNotFound(FhirError):
    code = "fhir-not-found"


class FhirConflict(FhirError):
    """409/412: someone else changed the resource (version conflict) or a conditional write matched ambiguously."""

    code = "fhir-conflict"


class FhirUnavailable(FhirError):
    """429/5xx, time-outs and dropped connections: the server may answer if asked again later."""

    code = "fhir-unavailable"
    retryable = True
