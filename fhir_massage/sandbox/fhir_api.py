"""HTTP glue for the sandbox's FHIR API (blueprint at /fhir): parse the request, ask the core, write JSON.

All logic lives in service.py / transactions.py. Here: content types, Prefer, If-Match / If-None-Exist, the
authorization hook (access.py contract) and the mapping of every failure to an OperationOutcome.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from fhir_massage.sandbox.access import Grant, Unauthorized
from fhir_massage.sandbox.capability import capability_statement
from fhir_massage.sandbox.outcome import FhirProblem, issue, outcome
from fhir_massage.sandbox.service import Result, check_type

EXT = "fhir_massage.sandbox"
FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")

bp = Blueprint("sandbox_fhir", __name__, url_prefix="/fhir")


def state() -> dict[str, Any]:
    return current_app.extensions[EXT]


def fhir_base() -> str:
    cfg = state()["config"]
    if cfg.public_base:
        return cfg.public_base.rstrip("/")
    return request.host_url.rstrip("/") + "/fhir"


def fhir_json(status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> Response:
    data = orjson.dumps(body) if body is not None else b""
    resp = Response(data, status=status, headers=headers or {})
    if body is not None:
        resp.headers["Content-Type"] = FHIR_JSON
    return resp


def problem_response(exc: FhirProblem) -> Response:
    return fhir_json(exc.status, exc.outcome(), exc.headers)


def prefer() -> dict[str, str]:
    """Prefer header (RFC 7240) -> {"return": ..., "handling": ...}."""
    out: dict[str, str] = {}
    for raw in request.headers.getlist("Prefer"):
        for part in raw.replace(";", ",").split(","):
            k, _, v = part.strip().partition("=")
            if k:
                out[k.strip().lower()] = v.strip().strip('"')
    return out


def grant() -> Grant:
    authorizer = state().get("authorizer")
    try:
        if authorizer is None:
            raise Unauthorized("This sandbox requires authorization, but no authorization server is installed.")
        return authorizer.grant_for(request.headers.get("Authorization"))
    except Unauthorized as exc:
        raise FhirProblem(
            401,
            exc.message,
            code="login",
            headers={
                "WWW-Authenticate": f'Bearer error="{exc.error}", error_description="{exc.message.replace(chr(34), chr(39))}"'
            },
        ) from None


def body_json() -> Any:
    ctype = (request.mimetype or "").lower()
    if ctype not in JSON_TYPES:
        raise FhirProblem(
            415,
            f"Send FHIR resources as application/fhir+json (got '{request.content_type or 'no content type'}').",
            code="not-supported",
        )
    raw = request.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is None and len(raw) >= limit:
        # A chunked body is cut at the limit by werkzeug rather than refused: refuse it here, not as "bad JSON".
        raise FhirProblem(
            413, f"The request body is larger than the {limit // (1024 * 1024)} MB this server accepts.", code="too-costly"
        )
    if not raw.strip():
        raise FhirProblem(400, "The request body is empty; a FHIR resource was expected.", code="required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FhirProblem(400, f"The body is not valid JSON ({exc.args[0]}).", code="structure") from None


def respond(result: Result, *, for_write: bool = False) -> Response:
    if for_write and result.resource is not None:
        mode = prefer().get("return", "representation")
        if mode == "minimal":
            return fhir_json(result.status, None, result.headers)
        if mode == "OperationOutcome":
            oo = outcome(issue("informational", "Done.", severity="information"))
            return fhir_json(result.status, oo, result.headers)
    return fhir_json(result.status, result.body, result.headers)


def strict() -> bool:
    return prefer().get("handling") == "strict"


# -- routes ---------------------------------------------------------------------------------------------------


@bp.get("/metadata")
def metadata() -> Response:
    hook = state().get("capability_security")
    security = hook() if callable(hook) else None
    date = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return fhir_json(200, capability_statement(fhir_base(), security, date=date))


@bp.post("")
@bp.post("/")
def system_bundle() -> Response:
    g = grant()
    bundle = body_json()
    mode = prefer().get("return", "representation")
    return respond(state()["bundles"].process(g, fhir_base(), bundle, prefer_return=mode))


@bp.get("/<rtype>")
def search_get(rtype: str) -> Response:
    g = grant()
    pairs = list(request.args.items(multi=True))
    return respond(state()["service"].search(g, fhir_base(), rtype, pairs, strict=strict(), raw=True))


@bp.post("/<rtype>/_search")
def search_post(rtype: str) -> Response:
    g = grant()
    if request.mimetype != "application/x-www-form-urlencoded":
        raise FhirProblem(
            415, "POST _search takes an application/x-www-form-urlencoded body.", code="not-supported"
        )
    pairs = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
    return respond(state()["service"].search(g, fhir_base(), rtype, pairs, strict=strict(), raw=True))


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    g = grant()
    svc = state()["service"]
    check_type(rtype)
    body = body_json()
    result = svc.create(g, fhir_base(), rtype, body, if_none_exist=request.headers.get("If-None-Exist"))
    return respond(result, for_write=True)


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    return respond(state()["service"].read(grant(), fhir_base(), rtype, rid))


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    g = grant()
    check_type(rtype)
    body = body_json()
    result = state()["service"].update(g, fhir_base(), rtype, rid, body, if_match=request.headers.get("If-Match"))
    return respond(result, for_write=True)


@bp.delete("/<rtype>/<rid>")
def delete(rtype: str, rid: str) -> Response:
    return respond(state()["service"].delete(grant(), fhir_base(), rtype, rid))


@bp.get("/<rtype>/<rid>/_history")
def history(rtype: str, rid: str) -> Response:
    return respond(state()["service"].history(grant(), fhir_base(), rtype, rid))


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    return respond(state()["service"].vread(grant(), fhir_base(), rtype, rid, vid))


@bp.errorhandler(FhirProblem)
def on_problem(exc: FhirProblem) -> Response:
    return problem_response(exc)
