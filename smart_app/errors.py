"""The ONE place where errors become pages (or JSON for fetch requests).

Every ``fhir_massage.errors`` class maps to a status and a plain-words page; nothing shows a stack trace, and a
user's mistake (a stale link, a tampered state, an unknown EHR) is a 4xx, never a 500. Unexpected exceptions are
logged with their class only (their message might quote patient data) and become a generic 500 page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, g, render_template, request
from werkzeug.exceptions import HTTPException

from fhir_massage.errors import (FhirAuthError, FhirConflict, FhirError, FhirNotFound, FhirUnavailable, InvalidInput,
                                 InvalidResource, LaunchError, MassageError)

from .security import CsrfError
from .store import LockTimeout, StoreError

log = logging.getLogger("smart_app")


@dataclass(frozen=True)
class ErrorPage:
    status: int
    title: str
    relaunch: bool = False  # show "launch the app again from the EHR"


# LaunchError codes that need another status or title than the default.
_LAUNCH_CODES: dict[str, ErrorPage] = {
    "unknown-iss": ErrorPage(400, "This EHR is not set up for the app"),
    "missing-iss": ErrorPage(400, "The app was opened without an EHR"),
    "state": ErrorPage(400, "This sign-in link is not valid", relaunch=True),
    "authorize-error": ErrorPage(400, "The EHR did not sign you in", relaunch=True),
    "session-ended": ErrorPage(401, "Your session has ended", relaunch=True),
    "no-session": ErrorPage(401, "Your session has ended", relaunch=True),
    "other-browser": ErrorPage(403, "This page belongs to another browser session", relaunch=True),
    "discovery": ErrorPage(502, "The EHR's sign-in settings could not be read"),
    "discovery-unreachable": ErrorPage(503, "The EHR could not be reached"),
    "token-unreachable": ErrorPage(503, "The EHR could not be reached", relaunch=True),
    "config": ErrorPage(500, "The app is not configured correctly"),
}


def page_for(exc: BaseException) -> ErrorPage:
    if isinstance(exc, LaunchError):
        return _LAUNCH_CODES.get(exc.code, ErrorPage(400, "The app could not start", relaunch=True))
    if isinstance(exc, CsrfError):
        return ErrorPage(400, "This form could not be accepted")
    if isinstance(exc, FhirAuthError):
        if exc.status == 401:
            return ErrorPage(401, "Your session has ended", relaunch=True)
        return ErrorPage(403, "The EHR did not allow this")
    if isinstance(exc, FhirNotFound):
        return ErrorPage(404, "Not found in the EHR")
    if isinstance(exc, FhirConflict):
        return ErrorPage(409, "Someone else changed this record")
    if isinstance(exc, FhirUnavailable):
        return ErrorPage(503, "The EHR is busy or unreachable")
    if isinstance(exc, FhirError):
        return ErrorPage(502, "The EHR answered with an error")
    if isinstance(exc, (InvalidInput, InvalidResource)):
        return ErrorPage(400, "That could not be used")
    if isinstance(exc, LockTimeout):
        return ErrorPage(503, "Still busy")
    if isinstance(exc, StoreError):
        return ErrorPage(503, "The app's storage is unavailable")
    return ErrorPage(500, "Something went wrong in the app")


def _wants_json() -> bool:
    if request.headers.get("X-CSRF-Token") and not request.accept_mimetypes.accept_html:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json", "application/fhir+json"])
    return best in ("application/json", "application/fhir+json")


def _render(status: int, title: str, message: str, code: str, relaunch: bool):
    if _wants_json():
        return {"error": code, "title": title, "message": message}, status
    return render_template("error.html", status=status, title=title, message=message, code=code,
                           relaunch=relaunch), status


def handle_massage_error(exc: MassageError):
    page = page_for(exc)
    # Messages from our own code are written for people and carry no tokens or patient data; log the code only.
    log.info("request ended with %s (%s) on %s", page.status, exc.code, request.endpoint)
    return _render(page.status, page.title, exc.message, exc.code, page.relaunch)


def handle_http_error(exc: HTTPException):
    status = exc.code or 500
    titles = {404: "Page not found", 405: "Not allowed here", 400: "Bad request", 413: "Too large"}
    message = {404: "There is no page at this address.",
               405: "This page cannot be used that way."}.get(status, exc.description or "")
    return _render(status, titles.get(status, exc.name), message, f"http-{status}", False)


def handle_unexpected(exc: Exception):
    if isinstance(exc, HTTPException):
        return handle_http_error(exc)
    if isinstance(exc, MassageError):
        return handle_massage_error(exc)
    # Class name only: an exception message or traceback locals could quote a token or patient data.
    log.error("unexpected %s on %s", type(exc).__name__, request.endpoint)
    return _render(500, "Something went wrong in the app",
                   "The app hit an unexpected problem. Try again; if it keeps happening, relaunch the app from the "
                   "EHR.", "internal", True)


def init_app(app: Flask) -> None:
    app.register_error_handler(MassageError, handle_massage_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
    app.jinja_env.globals.setdefault("g", g)
