"""Validate a resource on write against the FHIR structure, as a strict EHR would.

The structural check is ``fhir.resources.R4B`` (the closest the library ships to R4 4.0.1; ``fhir.resources``
alone is R5). Its pydantic errors are turned into OperationOutcome issues that name the element
(``expression``, FHIRPath-like, e.g. ``Condition.code.coding[0].system``) and say what is wrong in plain words.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_massage.sandbox import dates
from fhir_massage.sandbox.outcome import FhirProblem, issue
from fhir_massage.sandbox.searchparams import RESOURCE_TYPES

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # R4 §2.24.0.1 id


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value))


def _expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("__root__",) or not isinstance(part, str):
            continue
        else:
            out += f".{part}"
    return out


def _plain(err: dict[str, Any]) -> tuple[str, str]:
    """(issue code, plain message) for one pydantic error."""
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return "structure", "is not an element of this resource type in FHIR R4 (unknown or misspelt element)"
    if kind == "missing":
        return "required", "is required but missing"
    if kind.endswith("_type") or kind in ("list_type", "dict_type", "model_type"):
        return "structure", f"has the wrong JSON type ({msg})"
    return "value", msg


def validate(resource: Any, *, expected_type: str | None = None) -> dict[str, Any]:
    """Return the resource unchanged if it is valid FHIR R4 of a type the sandbox serves; raise 400 otherwise."""
    if not isinstance(resource, dict):
        raise FhirProblem(400, "The body must be a JSON object (a FHIR resource).", code="structure")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirProblem(400, "The resource has no resourceType.", code="required", expression="resourceType")
    if expected_type is not None and rtype != expected_type:
        raise FhirProblem(
            400,
            f"The body is a {rtype} but the URL is for {expected_type}.",
            code="invalid",
            expression=f"{rtype}.resourceType",
        )
    if rtype not in RESOURCE_TYPES:
        raise FhirProblem(
            400 if expected_type is None else 404,
            f"The resource type '{rtype}' is not supported by this server.",
            code="not-supported",
            expression="resourceType",
        )
    if "id" in resource and not valid_id(resource["id"]):
        raise FhirProblem(
            400,
            f"{rtype}.id must be 1 to 64 characters of letters, digits, '-' and '.'.",
            code="value",
            expression=f"{rtype}.id",
        )
    try:
        model = get_fhir_model_class(rtype)
    except Exception:  # unknown to the model library: treated as unsupported
        raise FhirProblem(400, f"The resource type '{rtype}' is not known.", code="not-supported") from None
    try:
        model.model_validate(resource)
    except Exception as exc:  # pydantic.ValidationError, or a model's own ValueError
        errors = getattr(exc, "errors", None)
        issues = []
        if callable(errors):
            for err in errors()[:20]:
                expr = _expression(rtype, tuple(err.get("loc") or ()))
                code, text = _plain(err)
                issues.append(issue(code, f"{expr} {text.rstrip('.')}.", expression=expr))
        if not issues:
            issues.append(issue("structure", f"The {rtype} is not valid FHIR R4: {exc}".split("\n")[0]))
        first = issues[0]["diagnostics"]
        more = f" (and {len(issues) - 1} more problem(s))" if len(issues) > 1 else ""
        raise FhirProblem(400, f"Invalid {rtype}: {first}{more}", issues=issues) from None
    _check_dates(resource, rtype, ())
    _check_codes(resource, rtype)
    _check_narrative(resource, rtype)
    return resource


_XHTML_DIV = re.compile(r'^\s*<div\b[^>]*\bxmlns\s*=\s*["\']http://www\.w3\.org/1999/xhtml["\']', re.S)


def _check_narrative(resource: dict[str, Any], rtype: str) -> None:
    """R4 §2.23 Narrative: ``div`` is an XHTML <div> in the XHTML namespace (constraint txt-1 and the type's
    definition); strict servers refuse plain text or HTML without the namespace."""
    text = resource.get("text")
    if isinstance(text, dict) and "div" in text:
        div = text["div"]
        if not isinstance(div, str) or not _XHTML_DIV.match(div):
            raise FhirProblem(
                400,
                f"{rtype}.text.div must be an XHTML <div xmlns=\"http://www.w3.org/1999/xhtml\">...</div>.",
                code="value",
                expression=f"{rtype}.text.div",
            )


# Required bindings on the status-like codes the app reads and writes (R4 resource pages, binding strength
# "required"). The model library checks structure only, so a strict EHR's "unknown code" answer is reproduced here.
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Observation", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    ("ServiceRequest", "status"): frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
    ("ServiceRequest", "intent"): frozenset(
        {"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"}
    ),
    ("Procedure", "status"): frozenset(
        {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"}
    ),
    ("Task", "status"): frozenset(
        {"draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress", "on-hold",
         "failed", "completed", "entered-in-error"}
    ),
    ("Task", "intent"): frozenset(
        {"unknown", "proposal", "plan", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"}
    ),
    ("Communication", "status"): frozenset(
        {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"}
    ),
    ("DetectedIssue", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    ("DetectedIssue", "severity"): frozenset({"high", "moderate", "low"}),
    ("MedicationRequest", "status"): frozenset(
        {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"}
    ),
    ("Encounter", "status"): frozenset(
        {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
    ),
}


def _check_codes(resource: dict[str, Any], rtype: str) -> None:
    for (t, element), allowed in REQUIRED_CODES.items():
        if t == rtype and element in resource and resource[element] not in allowed:
            expr = f"{rtype}.{element}"
            raise FhirProblem(
                400,
                f"{expr} '{resource[element]}' is not one of the allowed codes: {', '.join(sorted(allowed))}.",
                code="code-invalid",
                expression=expr,
            )


_DATE_KEYS = re.compile(r"(Date|DateTime|Instant|^date|^recorded|^issued|^sent|^received|^authoredOn|^lastModified|^start|^end|^birthDate)$")


def _check_dates(value: Any, rtype: str, loc: tuple[Any, ...]) -> None:
    """Belt and braces: the model checks date syntax; this also rejects impossible days like 2021-02-30."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str) and _DATE_KEYS.search(k) and v[:4].isdigit() and len(v) >= 10 and v[4:5] == "-":
                if not dates.is_valid(v):
                    expr = _expression(rtype, (*loc, k))
                    raise FhirProblem(400, f"{expr} '{v}' is not a valid date.", code="value", expression=expr)
            elif isinstance(v, (dict, list)):
                _check_dates(v, rtype, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_dates(v, rtype, (*loc, i))
