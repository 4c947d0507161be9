"""The sandbox EHR app factory: ``create_sandbox_app(SandboxConfig(...)) -> Flask``.

Mounts the FHIR API at /fhir and the admin endpoints at /_sandbox (loopback callers only):
  GET    /_sandbox/health   readiness: {"status": "ok", "resources": n}
  POST   /_sandbox/faults   set fault injection (JSON, FaultConfig fields); answers the active settings
  GET    /_sandbox/faults   the active settings
  DELETE /_sandbox/faults   clear fault injection
  POST   /_sandbox/reset    wipe all data and reseed (if the config seeds)
Unless ``open`` is set, ``fhir_massage.sandbox.auth.install(app, config)`` adds the SMART authorization server.
"""

from __future__ import annotations

import importlib.util
import logging
import traceback
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from fhir_massage.errors import MassageError
from fhir_massage.loopback import is_loopback_addr
from fhir_massage.sandbox.access import OPEN, OpenAuthorizer
from fhir_massage.sandbox.faults import FaultConfig, FaultInjector
from fhir_massage.sandbox.fhir_api import EXT, bp as fhir_bp, fhir_json, problem_response
from fhir_massage.sandbox.outcome import FhirProblem, issue, outcome
from fhir_massage.sandbox.service import FhirService
from fhir_massage.sandbox.store import Store
from fhir_massage.sandbox.transactions import BundleProcessor

log = logging.getLogger(__name__)

MAX_BODY = 10 * 1024 * 1024  # 10 MB: larger bodies get 413 (a real EHR's gateway limit is usually lower)
SEED_BASE = "http://127.0.0.1/fhir"  # base for fullUrls while seeding (no request yet); references stay relative


@dataclass
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    data_dir: Path | None = None  # None = in-memory (tests); else sandbox.sqlite3 in that directory
    seed: bool = True  # load the demo patients (fhir_massage.sandbox.demo.demo_bundles) at start and on reset
    open: bool = False  # no authorization at all (tests, public-test-server style)
    faults: FaultConfig = field(default_factory=FaultConfig)
    today: date | None = None  # the demo data's "today" (None = the real date)
    public_base: str | None = None  # FHIR base URL to advertise; None = derived from each request
    auth: dict[str, Any] = field(default_factory=dict)  # opaque options for the SMART authorization server
    # False: play an EHR without transaction support (the CapabilityStatement omits 'transaction' and a transaction
    # Bundle answers 501 not-supported); batch still works. Tests the app's one-by-one writes (fhir_massage.writes).
    transactions: bool = True
    batch: bool = True  # False: no batch either (metadata omits 'batch', a batch Bundle answers 501 not-supported)


class SandboxSetupError(MassageError):
    code = "sandbox-setup"


def _seed(app: Flask) -> int:
    st = app.extensions[EXT]
    cfg: SandboxConfig = st["config"]
    if importlib.util.find_spec("fhir_massage.sandbox.demo") is None:
        log.warning("fhir_massage.sandbox.demo is not available: the sandbox starts without demo data")
        return 0
    from fhir_massage.sandbox import demo

    today = cfg.today or datetime.now(timezone.utc).date()
    base = (cfg.public_base or SEED_BASE).rstrip("/")
    bundles = demo.demo_bundles(today)
    for i, bundle in enumerate(bundles):
        try:
            # Seeding is the sandbox's own load, not an EHR client: it may use transactions whatever the config.
            BundleProcessor(st["service"]).process(OPEN, base, bundle, prefer_return="minimal")
        except FhirProblem as exc:
            # Demo data is validated like any write; a bad bundle is a bug in the demo data, said plainly.
            raise SandboxSetupError(f"Demo bundle {i} was refused by the sandbox: {exc.message}") from None
    return len(bundles)


admin = Blueprint("sandbox_admin", __name__, url_prefix="/_sandbox")


@admin.before_request
def _loopback_only() -> Response | None:
    if not is_loopback_addr(request.remote_addr):
        return fhir_json(403, outcome(issue("forbidden", "The sandbox admin endpoints answer loopback callers only.")))
    return None


@admin.get("/health")
def health() -> Response:
    st = current_app.extensions[EXT]
    n = st["store"].query("SELECT COUNT(*) FROM resources WHERE deleted = 0")[0][0]
    return fhir_json(200, {"status": "ok", "resources": n, "faults": st["faults"].config.to_json()})


@admin.get("/faults")
def get_faults() -> Response:
    return fhir_json(200, current_app.extensions[EXT]["faults"].config.to_json())


@admin.post("/faults")
def set_faults() -> Response:
    try:
        data = request.get_json(force=True, silent=False)
        cfg = FaultConfig.from_json(data)
    except HTTPException:
        return fhir_json(400, outcome(issue("structure", "The body must be a JSON object with fault settings.")))
    except ValueError as exc:
        return fhir_json(400, outcome(issue("value", str(exc))))
    current_app.extensions[EXT]["faults"].set(cfg)
    return fhir_json(200, cfg.to_json())


@admin.delete("/faults")
def clear_faults() -> Response:
    current_app.extensions[EXT]["faults"].set(FaultConfig())
    return fhir_json(200, FaultConfig().to_json())


@admin.post("/reset")
def reset() -> Response:
    st = current_app.extensions[EXT]
    st["store"].wipe()
    seeded = _seed(current_app) if st["config"].seed else 0
    return fhir_json(200, {"status": "reset", "bundles_loaded": seeded})


def create_sandbox_app(config: SandboxConfig | None = None) -> Flask:
    config = config or SandboxConfig()
    app = Flask("fhir_massage.sandbox")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    path = None
    if config.data_dir is not None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        path = Path(config.data_dir) / "sandbox.sqlite3"
    store = Store(path)
    service = FhirService(store)
    app.extensions[EXT] = {
        "config": config,
        "store": store,
        "service": service,
        "bundles": BundleProcessor(service, transactions=config.transactions, batch=config.batch),
        "faults": FaultInjector(config.faults),
        # Fail closed: without --open, nothing is allowed until auth.install() sets the real authorizer.
        "authorizer": OpenAuthorizer() if config.open else None,
        "capability_security": lambda: None,  # the SMART authorization server replaces this (auth.install)
    }
    app.register_blueprint(fhir_bp)
    app.register_blueprint(admin)
    # The EHR's own order-entry screen that calls CDS Hooks services (order-select / order-sign): integrators see
    # the cards in a browser. The service URL comes from config.auth["cds_base_url"] (the demo points it at the app).
    from fhir_massage.sandbox import ehr_orders

    ehr_orders.install(app, config)

    @app.before_request
    def _faults() -> Response | None:
        injector: FaultInjector = app.extensions[EXT]["faults"]
        decision = injector.decide(request.method, request.path)
        injector.wait(decision)
        if decision.drop and injector.drop_connection(request.environ):
            return Response(b"", status=200)  # never reaches the client: its socket is already closed
        if decision.fail_status:
            headers = {}
            if decision.retry_after is not None and decision.fail_status in (429, 503):
                headers["Retry-After"] = str(decision.retry_after)
            msg = f"Injected fault: the sandbox answers {decision.fail_status} (fault injection is on)."
            return fhir_json(decision.fail_status, outcome(issue("transient", msg)), headers)
        return None

    dropped = [code for code, on in (("transaction", config.transactions), ("batch", config.batch)) if not on]
    if dropped:
        from fhir_massage.sandbox.capability import without_system_interaction

        @app.after_request
        def _no_bundle_capability(response: Response) -> Response:
            # The metadata view (fhir_api.py) builds the full statement; drop what this config turned off here.
            if request.path.rstrip("/").endswith("/fhir/metadata") and response.status_code == 200:
                cap = orjson.loads(response.get_data())
                for code in dropped:
                    cap = without_system_interaction(cap, code)
                response.set_data(orjson.dumps(cap))
            return response

    @app.errorhandler(FhirProblem)
    def _problem(exc: FhirProblem) -> Response:
        return problem_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        if not request.path.startswith(("/fhir", "/_sandbox")):
            return exc
        code = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}.get(
            exc.code or 400, "invalid"
        )
        messages = {
            404: f"There is nothing at {request.path[:120]} on this FHIR server.",
            405: f"{request.method} is not allowed on {request.path[:120]}.",
            413: f"The request body is larger than the {MAX_BODY // (1024 * 1024)} MB this server accepts.",
        }
        msg = messages.get(exc.code or 400, exc.description or "The request could not be handled.")
        return fhir_json(exc.code or 400, outcome(issue(code, msg)))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return _http(exc)
        # Log the failure's type and where it happened, not its message (which may quote patient data).
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("sandbox: unexpected %s on %s %s\n%s", type(exc).__name__, request.method, request.url_rule, frames)
        return fhir_json(500, outcome(issue("exception", "The sandbox failed unexpectedly; the error was logged.")))

    if not config.open:
        if importlib.util.find_spec("fhir_massage.sandbox.auth") is None:
            raise SandboxSetupError(
                "The SMART authorization server (fhir_massage.sandbox.auth) is not installed yet; start the"
                " sandbox with --open (no authorization) instead."
            )
        from fhir_massage.sandbox import auth

        auth.install(app, config)

    if config.seed:
        _seed(app)
    return app
