"""App-wide web safety: the browser cookie, CSRF, security headers (CSP with frame-ancestors), log redaction.

The browser cookie holds one opaque random id and nothing else (SMART AL "App protection": no tokens in cookies).
Launch sessions are found through the id in the URL (``/p/<lsid>/...``) and must match this cookie, so two tabs
with two patients never mix and a leaked URL alone opens nothing.

Cookie attributes:
* behind TLS (``PUBLIC_URL`` is https, or ``TRUST_PROXY_TLS``): ``__Host-`` name, ``Secure``, ``HttpOnly``,
  ``SameSite=None`` so the app keeps its session inside an EHR iframe on another site (client-js #115, launcher
  #34), and ``Partitioned`` (CHIPS) so browsers that block third-party cookies still keep one per embedding site;
* on plain http on a loopback address (development, the demo, tests): ``SameSite=Lax`` without ``Secure``
  (browsers drop ``SameSite=None`` without ``Secure``). An iframe from 127.0.0.1:EHRPORT embedding
  127.0.0.1:APPPORT is *same-site* (a site is scheme + registrable domain, ports do not count), so Lax cookies
  are sent in the iframe there.

CSRF: a token derived from the browser id with HMAC(SECRET_KEY) (the "signed double-submit" pattern), required on
every POST/PUT/PATCH/DELETE as the form field ``csrf_token`` or the header ``X-CSRF-Token``. Views that others
call server-to-server (CDS Hooks) opt out with ``csrf_exempt``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from typing import Any, Callable

from flask import Flask, current_app, g, request
from markupsafe import Markup, escape

from fhir_massage.errors import MassageError

__all__ = ["browser_id", "browser_fingerprint", "csrf_token", "csrf_field", "csrf_exempt", "init_app",
           "redact_url", "CsrfError"]

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXEMPT_ATTR = "_fhir_massage_csrf_exempt"


class CsrfError(MassageError):
    code = "csrf"


def cookie_secure(app: Flask | None = None) -> bool:
    return bool((app or current_app).extensions["smart_app"].secure_cookies)


def cookie_name(app: Flask | None = None) -> str:
    # __Host- (RFC 6265bis §4.1.3.2): Secure, Path=/, no Domain, so a sibling subdomain cannot plant it.
    return "__Host-fm_browser" if cookie_secure(app) else "fm_browser"


def browser_id(create: bool = False) -> str | None:
    """The opaque id of this browser (from the cookie), or a fresh one when ``create`` (set on the response)."""
    if "fm_browser_id" in g:
        return g.fm_browser_id
    value = request.cookies.get(cookie_name())
    if value and re.fullmatch(r"[A-Za-z0-9_\-]{32,64}", value):
        g.fm_browser_id = value
        return value
    if not create:
        return None
    value = secrets.token_urlsafe(32)
    g.fm_browser_id = value
    g.fm_set_cookie = True
    return value


def browser_fingerprint(value: str | None = None) -> str | None:
    """What the store keeps to bind a launch to the browser: a hash, so a store dump reveals no cookie."""
    value = value if value is not None else browser_id()
    if not value:
        return None
    return hashlib.sha256(value.encode()).hexdigest()


def csrf_token() -> str:
    bid = browser_id(create=True)
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, b"csrf|" + bid.encode(), hashlib.sha256).hexdigest()


def csrf_field() -> Markup:
    """``{{ csrf_field() }}`` in every form."""
    return Markup('<input type="hidden" name="csrf_token" value="%s">') % escape(csrf_token())


def csrf_exempt(view: Callable) -> Callable:
    setattr(view, _EXEMPT_ATTR, True)
    return view


def _check_csrf() -> None:
    if request.method not in _UNSAFE:
        return
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None or getattr(view, _EXEMPT_ATTR, False):
        return
    blueprint = current_app.blueprints.get(request.blueprint or "")
    if blueprint is not None and getattr(blueprint, _EXEMPT_ATTR, False):
        return
    if browser_id() is None:
        raise CsrfError("Your browser did not send the app's session cookie with this form. Reload the page, or "
                        "relaunch the app from the EHR; if it keeps happening, allow cookies for this app.")
    sent = request.headers.get("X-CSRF-Token") or (request.form.get("csrf_token") if request.form else None)
    if not sent or not hmac.compare_digest(str(sent), csrf_token()):
        raise CsrfError("This form has expired or did not come from this app. Go back, reload the page and try again.")


def _frame_ancestors() -> str:
    registry = current_app.extensions["smart_app"].registry
    origins = sorted({o for reg in registry.values() for o in reg.frame_ancestors})
    return " ".join(["'self'", *origins])


def _headers(response: Any) -> Any:
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
           f"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {_frame_ancestors()}")
    response.headers.setdefault("Content-Security-Policy", csp)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # The callback URL carries the authorization code, pages carry a launch id: never leak them in Referer.
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/static/") or request.path == "/.well-known/jwks.json":
        pass
    else:
        response.headers.setdefault("Cache-Control", "no-store")  # pages show patient data
    if cookie_secure():
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if g.get("fm_set_cookie"):
        secure = cookie_secure()
        response.set_cookie(cookie_name(), g.fm_browser_id, httponly=True, secure=secure,
                            samesite="None" if secure else "Lax", path="/", partitioned=secure)
    return response


# -- logs ----------------------------------------------------------------------------------------------------------

_QUERY = re.compile(r"\?[^\s\"']*")
# /p/<launch session id>/...: the id alone opens nothing (it is bound to the browser cookie), but it names a
# clinical session, so access logs carry only a placeholder.
_LAUNCH_PATH = re.compile(r"/p/[A-Za-z0-9_-]{8,}(?=/|\s|$)")


def redact_url(text: str) -> str:
    """Drop query strings (authorization codes, state, launch ids, FHIR search values) and launch session ids."""
    return _LAUNCH_PATH.sub("/p/…", _QUERY.sub("?…", text))


class RedactQueryFilter(logging.Filter):
    """Strips query strings from request-line logs (werkzeug's access log, urllib3's debug log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_url(record.msg)
        if record.args:
            if isinstance(record.args, tuple):
                record.args = tuple(redact_url(a) if isinstance(a, str) else a for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: redact_url(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


_FILTER = RedactQueryFilter()


def install_log_redaction() -> None:
    for name in ("werkzeug", "urllib3.connectionpool", "gunicorn.access"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def init_app(app: Flask) -> None:
    install_log_redaction()
    app.before_request(_check_csrf)
    app.after_request(_headers)
    app.jinja_env.globals["csrf_field"] = csrf_field
    app.jinja_env.globals["csrf_token"] = csrf_token
