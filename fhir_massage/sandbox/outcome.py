"""OperationOutcome building and the one exception the sandbox's FHIR core raises for a refused request."""

from __future__ import annotations

from typing import Any


def issue(
    code: str, message: str, *, severity: str = "error", expression: list[str] | str | None = None
) -> dict[str, Any]:
    """One OperationOutcome.issue (R4 §OperationOutcome): ``code`` from http://hl7.org/fhir/issue-type."""
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    out["details"] = {"text": message}
    if expression:
        exprs = [expression] if isinstance(expression, str) else list(expression)
        out["expression"] = exprs
        # R4 still carries the deprecated 'location' (XPath-ish); clients that only read it get the same element.
        out["location"] = exprs
    return out


def outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


class FhirProblem(Exception):
    """A request the sandbox refuses: an HTTP status and the OperationOutcome issues that say why."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "invalid",
        expression: list[str] | str | None = None,
        issues: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.issues = issues or [issue(code, message, expression=expression)]
        self.headers = headers or {}

    def outcome(self) -> dict[str, Any]:
        return outcome(*self.issues)


def bad_request(message: str, *, expression: list[str] | str | None = None, code: str = "invalid") -> FhirProblem:
    return FhirProblem(400, message, code=code, expression=expression)


def not_found(message: str) -> FhirProblem:
    return FhirProblem(404, message, code="not-found")


def forbidden(message: str) -> FhirProblem:
    return FhirProblem(403, message, code="forbidden")
