"""CDS Hooks 2.0.1 service: the contraindication screen inside the EHR's own order entry (order-select, order-sign).

Routes (spec "Discovery", "Calling a CDS Service", "Feedback"):

* ``GET  /cds-services``                 discovery. Open (no JWT needed): it holds no patient data, and the spec
                                         lets a service answer discovery without authentication.
* ``POST /cds-services/<id>``            a hook call -> ``{"cards": [...]}``.
* ``POST /cds-services/<id>/feedback``   accepted / overridden cards -> recorded in the app's store; an override
                                         becomes a DetectedIssue with ``mitigation`` when the call carries
                                         ``fhirServer`` + ``fhirAuthorization`` (our extension of the feedback body).

Every POST must carry ``Authorization: Bearer <JWT>`` from a registered EHR (fhir_massage/cds_jwt.py); anything
else is a 401 before the body is read, and no outbound request is made for it. Server-to-server only: no CORS
headers (browser-based CDS clients would need them; none are supported) and no CSRF token (the JWT is the proof).

Errors are JSON ``{"error": code, "message": text}`` with 400 / 401 / 404 / 412 / 413 / 502, never a stack trace.
Tokens from ``fhirAuthorization`` are used for the FHIR calls of that one request and then dropped: never stored,
never logged (spec "Trusting CDS Clients").

Registration keys (``REGISTRATIONS`` entries, see docs/cds-hooks.md): ``cds_iss``, ``cds_jwks_url``, ``cds_jwks``.
Config keys: ``CDS_CARD_TTL`` (seconds a card is remembered for feedback, default 30 days), ``CDS_JWT_MAX_LIFETIME``
(default 600 s), ``CDS_JWT_ALGORITHMS`` (default RS384, ES384), ``CDS_TODAY`` (a fixed screening date, tests only).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Mapping
from urllib.parse import parse_qsl

import orjson
import requests
from flask import Blueprint, Response, current_app, request, url_for
from werkzeug.exceptions import HTTPException

from fhir_massage import cds_cards as cards
from fhir_massage import smart
from fhir_massage.cds_jwt import CdsAuthError, CdsCaller, is_https_or_loopback, issuers_from_registrations, \
    verify_cds_jwt
from fhir_massage.errors import FhirAuthError, FhirError, FhirNotFound, InvalidInput, MassageError
from fhir_massage.fhir import FhirClient, StaticToken

from .security import csrf_exempt

log = logging.getLogger("smart_app.cds")

bp = Blueprint("cds", __name__)
csrf_exempt(bp)  # type: ignore[arg-type]  # server-to-server, authenticated by the EHR's JWT instead

NS_JTI = "cds-jti"
NS_CARD = "cds-card"
NS_FEEDBACK = "cds-feedback"
MAX_BODY = 5 * 1024 * 1024


@dataclass
class CdsState:
    issuers: dict[str, Any]
    jwks: smart.JwksCache
    http: requests.Session


@bp.record_once
def _init(setup: Any) -> None:
    app = setup.app
    app.extensions["cds"] = CdsState(issuers=issuers_from_registrations(app.config.get("REGISTRATIONS") or []),
                                     jwks=smart.JwksCache(float(app.config.get("JWKS_TTL", 3600))),
                                     http=requests.Session())


def _state() -> CdsState:
    return current_app.extensions["cds"]


def _store() -> Any:
    return current_app.extensions["store"]


def _timeout() -> Any:
    t = current_app.config.get("HTTP_TIMEOUT", (5.0, 20.0))
    return tuple(t) if isinstance(t, (list, tuple)) else float(t)


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    resp = current_app.response_class(orjson.dumps({"error": code, "message": message}), status=status,
                                      mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _json(data: Any, status: int = 200) -> Response:
    return current_app.response_class(orjson.dumps(data), status=status, mimetype="application/json")


# ---------------------------------------------------------------------------------------------------------------
# Authentication


def _endpoint_url() -> str:
    """The exact URL the EHR called (the JWT's ``aud``): the public URL when configured (behind a proxy the
    request's own URL is the internal one), else the request URL without its query."""
    public = current_app.config.get("PUBLIC_URL")
    if public:
        return public.rstrip("/") + request.path
    return request.base_url


def _fetch_jwks(url: str) -> dict[str, Any]:
    if not is_https_or_loopback(url):
        raise CdsAuthError("The EHR's JWKS URL must be https.")
    try:
        resp = _state().http.get(url, timeout=_timeout(), headers={"Accept": "application/json"},
                                 allow_redirects=False)
        doc = resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise CdsAuthError("The EHR's signing keys (JWKS) could not be fetched.")
    return doc


def _authenticate() -> CdsCaller:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CdsAuthError("The call has no bearer JWT (Authorization: Bearer ...).")
    state = _state()
    cfg = current_app.config
    return verify_cds_jwt(
        token.strip(),
        expected_aud=_endpoint_url(),
        issuers=state.issuers,
        get_jwks=lambda url, kid: state.jwks.get(url, _fetch_jwks, kid=kid),
        remember_jti=lambda iss, jti, ttl: _store().add(NS_JTI, f"{iss}\x1f{jti}", 1, ttl),
        now=time.time(),
        max_lifetime=float(cfg.get("CDS_JWT_MAX_LIFETIME", 600)),
        algorithms=tuple(cfg.get("CDS_JWT_ALGORITHMS") or ("RS384", "ES384")),
    )


def _unauthorized(exc: CdsAuthError) -> Response:
    log.info("cds: refused a call to %s (%s)", request.path, exc.message)
    return _error(401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _caller(service_id: str) -> CdsCaller | Response:
    """The EHR calling a service of ours (its JWT checked), or the 404/401 answer."""
    if service_id not in cards.SERVICES:
        return _error(404, "cds-unknown-service", "There is no CDS service with that id here.")
    try:
        return _authenticate()
    except CdsAuthError as exc:
        return _unauthorized(exc)


def _request_error(exc: cards.CdsRequestError) -> Response:
    return _error(413 if exc.code == "cds-too-large" else 400, exc.code, exc.message)

def _body() -> Any:
    if (request.content_length or 0) > MAX_BODY:
        raise cards.CdsRequestError("The request body is too large.", code="cds-too-large")
    data = request.get_data(cache=False)
    if len(data) > MAX_BODY:
        raise cards.CdsRequestError("The request body is too large.", code="cds-too-large")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise cards.CdsRequestError("The request body is not valid JSON.") from None


def _check_fhir_server(access: cards.FhirAccess | None, caller: CdsCaller) -> None:
    # The token must only go to the EHR's own FHIR server: a fhirServer we do not know could be anyone's.
    if access is None:
        return
    if access.server not in caller.issuer.fhir_servers or not is_https_or_loopback(access.server):
        raise cards.CdsRequestError("fhirServer is not the FHIR server registered for this EHR.",
                                    code="cds-fhir-server")


# ---------------------------------------------------------------------------------------------------------------
# Routes


@bp.get("/cds-services")
def discovery() -> Response:
    return _json(cards.discovery())


@bp.post("/cds-services/<service_id>")
def hook(service_id: str) -> Response:
    caller = _caller(service_id)
    if isinstance(caller, Response):
        return caller
    try:
        req = cards.parse_hook_request(_body(), service_id)
        _check_fhir_server(req.fhir, caller)
        orders = cards.massage_orders(req)
        if not orders:
            return _json({"cards": []})
        resources, note = _chart_resources(req)
        return _json({"cards": _screen_cards(req, orders, resources, caller, note)})
    except cards.CdsRequestError as exc:
        return _request_error(exc)
    except cards.CdsPreconditionFailed as exc:
        return _error(412, exc.code, exc.message)
    except FhirError as exc:
        status = 412 if isinstance(exc, (FhirAuthError, FhirNotFound)) else 502
        log.info("cds: FHIR fetch failed (%s, HTTP %s)", exc.code, exc.status)
        return _error(status, exc.code, "The EHR's FHIR server did not give the data the screen needs "
                                        f"({exc.code}, HTTP {exc.status}).")
    except InvalidInput as exc:  # the chart cannot be built (no Patient, several patients)
        return _error(400, "cds-chart", exc.message)


def _chart_resources(req: cards.HookRequest) -> tuple[list[dict[str, Any]], str | None]:
    pre = cards.prefetch_resources(req.prefetch)
    resources = list(pre.resources)
    todo = list(pre.missing) + [k for k in pre.paged if k not in pre.missing]
    if todo and req.fhir is None:
        raise cards.CdsPreconditionFailed(
            "The screen needs data that was not prefetched (" + ", ".join(todo) + ") and no fhirServer + "
            "fhirAuthorization was sent to fetch it.")
    note = None
    if todo:
        assert req.fhir is not None
        queries = cards.prefetch_queries(req.patient_id)
        client = FhirClient(req.fhir.server, token_source=StaticToken(req.fhir.access_token), timeout=_timeout(),
                            max_retries=1)
        try:
            for key in pre.missing:
                resources.extend(_run_query(client, queries[key], key))
            for key, url in pre.paged.items():
                if key in pre.missing:
                    continue
                page = client.get_url(url)
                while isinstance(page, dict):
                    resources.extend(e["resource"] for e in page.get("entry") or []
                                     if isinstance(e, dict) and isinstance(e.get("resource"), dict))
                    page = client.next_page(page)
        finally:
            client.close()
        note = "Part of the chart was read from the EHR's FHIR server (not prefetched): " + ", ".join(todo) + "."
    mismatched = [r for r in resources if r.get("resourceType") == "Patient" and r.get("id") != req.patient_id]
    if mismatched:
        raise cards.CdsRequestError("The prefetched Patient is not context.patientId.")
    return resources, note


def _run_query(client: FhirClient, query: str, key: str) -> list[dict[str, Any]]:
    path, _, qs = query.partition("?")
    if not qs:
        rtype, _, rid = path.partition("/")
        return [client.read(rtype, rid)]
    params = parse_qsl(qs, keep_blank_values=True)
    if key.startswith("obs"):
        # the latest few only (_sort/_count in the template): one page, like the prefetch would have been
        bundle = client.search(path, params)
        return [e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict)
                and isinstance(e.get("resource"), dict) and e.get("search", {}).get("mode", "match") == "match"]
    out = client.search_all(path, params)
    return [r for r in out if isinstance(r, dict)] if isinstance(out, list) else []


def _today() -> date:
    fixed = current_app.config.get("CDS_TODAY")
    if isinstance(fixed, date):
        return fixed
    return datetime.now(timezone.utc).date()


def _launch_url() -> str:
    public = current_app.config.get("PUBLIC_URL")
    if public:
        return public.rstrip("/") + "/launch"
    return url_for("launch.launch", _external=True)


def _screen_cards(req: cards.HookRequest, orders: list[cards.MassageOrder], resources: list[dict[str, Any]],
                  caller: CdsCaller, note: str | None) -> list[dict[str, Any]]:
    from fhir_massage.chart import from_resources
    from fhir_massage.screening import screen

    chart = from_resources(resources)
    today = _today()
    screenings = {i: screen(chart, techniques=list(o.techniques), sites=list(o.sites) if o.sites else None,
                            today=today) for i, o in enumerate(orders)}
    built, records = cards.build_cards(orders, screenings, request=req, now=datetime.now(timezone.utc),
                                       launch_url=_launch_url(), fetched_note=note)
    ttl = float(current_app.config.get("CDS_CARD_TTL", 30 * 24 * 3600))
    store = _store()
    for card_id, record in records.items():
        record["iss"] = caller.iss
        store.put(NS_CARD, card_id, record, ttl)
    log.info("cds: %s answered %d card(s) for %d massage order(s)", req.service_id, len(built), len(orders))
    return built


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    caller = _caller(service_id)
    if isinstance(caller, Response):
        return caller
    try:
        body = _body()
        items = cards.parse_feedback(body)
        access = cards.parse_fhir_access(body)
        _check_fhir_server(access, caller)
    except cards.CdsRequestError as exc:
        return _request_error(exc)
    store = _store()
    ttl = float(current_app.config.get("CDS_CARD_TTL", 30 * 24 * 3600))
    results = []
    client = FhirClient(access.server, token_source=StaticToken(access.access_token), timeout=_timeout(),
                        max_retries=1) if access else None
    try:
        for item in items:
            record = store.get(NS_CARD, item.card)
            if not record or record.get("iss") != caller.iss or record.get("service") != service_id:
                results.append({"card": item.card, "status": "unknown-card"})
                continue
            entry = {
                "card": item.card, "service": service_id, "iss": caller.iss, "outcome": item.outcome,
                "outcomeTimestamp": item.timestamp, "patientId": record.get("patientId"),
                "userId": record.get("userId"), "order": record.get("order"), "rule": record.get("rule"),
                "acceptedSuggestions": [{"id": s, "label": (record.get("suggestions") or {}).get(s)}
                                        for s in item.accepted_suggestions],
                "overrideReason": dict(item.reason) if item.reason else None, "userComment": item.comment,
                "received": datetime.now(timezone.utc).isoformat(),
            }
            result: dict[str, Any] = {"card": item.card, "status": "recorded"}
            if item.outcome == "overridden" and client is not None and record.get("finding") is not None:
                try:
                    ref = _write_override(client, record, item)
                    entry["detectedIssue"] = ref
                    result["detectedIssue"] = ref
                except FhirError as exc:
                    log.info("cds: DetectedIssue write failed (%s, HTTP %s)", exc.code, exc.status)
                    result["detectedIssueError"] = exc.code
            store.put(NS_FEEDBACK, item.card, entry, ttl)
            results.append(result)
    finally:
        if client is not None:
            client.close()
    return _json({"feedback": results})


OVERRIDE_ID_SYSTEM = "https://fhir-massage.dev/fhir/identifier/cds-card"


def _write_override(client: FhirClient, record: Mapping[str, Any], item: cards.FeedbackItem) -> str | None:
    from fhir_massage.builders.detected_issue import detected_issue

    finding = cards.finding_from_json(record["finding"])
    identifier = {"system": OVERRIDE_ID_SYSTEM, "value": item.card}
    issue = detected_issue(finding, patient_ref=f"Patient/{record['patientId']}", now=datetime.now(timezone.utc),
                           order_ref=record.get("order"), identifier=identifier,
                           mitigation=cards.override_mitigation(item, author_ref=record.get("userId")),
                           author_ref=record.get("userId"))
    result = client.create(issue, if_none_exist=f"identifier={OVERRIDE_ID_SYSTEM}|{item.card}")
    return f"DetectedIssue/{result.id}" if result.id else None


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    # JSON for the EHR, never an HTML page or a stack trace; class name only in the log (messages may quote data).
    if isinstance(exc, HTTPException):
        return _error(exc.code or 500, f"http-{exc.code}", exc.description or exc.name)
    if isinstance(exc, MassageError) and exc.retryable:
        log.warning("cds: %s on %s", exc.code, request.endpoint)
        return _error(503, exc.code, "The service is busy; try again.")
    log.error("cds: unexpected %s on %s", type(exc).__name__, request.endpoint)
    return _error(500, "internal", "The CDS service hit an unexpected problem.")
