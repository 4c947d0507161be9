"""The fhir-massage SMART app (Flask glue only). ``create_app(config)``; keys are documented in smart_app/config.py.

Areas other than the launch are blueprints in ``smart_app/<area>.py`` exposing ``bp`` (orders, sessions, plan,
cds); create_app registers whichever of them exist (config ``AREAS`` narrows the list).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask, g, render_template, request
from werkzeug.exceptions import BadRequest
from werkzeug.middleware.proxy_fix import ProxyFix

from fhir_massage import smart
from fhir_massage.errors import InvalidInput

from . import errors, security
from .config import DEFAULTS, build_registry, is_loopback_host
from .store import open_store

__all__ = ["create_app"]

log = logging.getLogger("smart_app")

AREA_MODULES = ("orders", "sessions", "plan", "cds")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config["AREAS"] = AREA_MODULES
    app.config.update(config or {})
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        log.info("no SECRET_KEY configured: using a random one (fine for one process; several instances must share "
                 "one)")

    public = app.config.get("PUBLIC_URL")
    trust_tls = bool(app.config.get("TRUST_PROXY_TLS"))
    if public:
        p = urlsplit(public)
        if p.scheme not in ("http", "https") or not p.netloc or p.query or p.fragment:
            raise InvalidInput(f"PUBLIC_URL must be an absolute http(s) URL, not {public!r}.")
        if p.scheme == "http" and not trust_tls and not is_loopback_host(p.hostname):
            raise InvalidInput("The app refuses to serve plain http on a non-loopback address: cookies could not be "
                               "Secure and tokens would cross the network in clear. Use https, or set "
                               "TRUST_PROXY_TLS when a TLS proxy stands in front.")
        secure = p.scheme == "https" or trust_tls
    else:
        secure = trust_tls
    if not secure:
        log.warning("serving plain http on loopback: the browser cookie cannot be Secure (SameSite=Lax); EHR iframes "
                    "on the same host work, EHRs on another site need https")

    from . import launch

    registry = build_registry(app.config["REGISTRATIONS"])
    http = requests.Session()
    app.extensions["smart_app"] = launch.AppState(
        registry=registry,
        discovery=smart.DiscoveryCache(float(app.config["DISCOVERY_TTL"])),
        jwks=smart.JwksCache(float(app.config["JWKS_TTL"])),
        oidc=smart.JwksCache(float(app.config["DISCOVERY_TTL"])),
        http=http,
        secure_cookies=secure,
        timeout=tuple(app.config["HTTP_TIMEOUT"]) if isinstance(app.config["HTTP_TIMEOUT"], (list, tuple))
        else float(app.config["HTTP_TIMEOUT"]),
    )
    store = app.config.get("STORE")  # an already built Store (tests, the demo) wins over STORE_URL
    app.extensions["store"] = store if store is not None else open_store(app.config["STORE_URL"])
    if trust_tls:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1, x_prefix=1)  # type: ignore[method-assign]

    security.init_app(app)
    errors.init_app(app)

    @app.url_value_preprocessor
    def _pop_lsid(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values and "lsid" in values:
            g.lsid = values.pop("lsid")

    @app.url_defaults
    def _add_lsid(endpoint: str, values: dict[str, Any]) -> None:
        if "lsid" not in values and g.get("lsid") and app.url_map.is_endpoint_expecting(endpoint, "lsid"):
            values["lsid"] = g.lsid

    if not public and not secure:
        @app.before_request
        def _loopback_only() -> None:
            if not is_loopback_host(urlsplit(f"//{request.host}").hostname):
                raise BadRequest("This app serves plain http only on a loopback address.")

    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        return {"ctx": g.get("ctx"), "url_for_launch": launch.url_for_launch}

    app.register_blueprint(launch.bp)

    @app.get("/")
    def index() -> str:
        return render_template("launch/index.html", registrations=list(registry.values()))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (load balancers restart it when this fails)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> tuple[dict[str, str], int]:
        """Readiness: the shared store answers a write and a read, so a launch started here can finish anywhere."""
        store = app.extensions["store"]
        probe = secrets.token_hex(8)
        try:
            store.put("health", "readyz", probe, 30)
            ok = store.get("health", "readyz") is not None
        except Exception as exc:  # any store failure means "not ready", never a 500 page
            log.warning("readiness: the store did not answer (%s)", type(exc).__name__)
            return {"status": "unavailable", "reason": "the session store did not answer"}, 503
        if not ok:
            return {"status": "unavailable", "reason": "the session store lost a write"}, 503
        return {"status": "ready"}, 200

    for name in app.config["AREAS"]:
        module_name = f"{__name__}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
            app.register_blueprint(module.bp)
        except Exception as exc:  # one broken area must not take the launch down; its own tests will fail
            log.error("area %s could not be loaded (%s: %s)", name, type(exc).__name__, exc)
    for extra in app.config.get("BLUEPRINTS") or ():  # embedding and tests: more blueprints, registered last
        app.register_blueprint(extra)
    return app
