"""`fhir-massage demo`: the sandbox EHR with demo patients and the app, wired together, on this machine."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import threading
from datetime import date
from pathlib import Path
from typing import Any

from fhir_massage.errors import InvalidInput

ORDER = 10

DESCRIPTION = """\
Start the sandbox EHR (FHIR R4 server, SMART authorization server, EHR simulator, demo patients) and the
fhir-massage app on 127.0.0.1, registered with each other (the app is a confidential client of the sandbox),
then print the URL to open. Stop with Ctrl-C.

Open the printed EHR simulator URL, pick a user (Dr Ada Grey, physician; Sam Reyes, massage therapist) and a
patient: the app opens inside the simulated chart exactly as an EHR embeds it.

Examples:
  fhir-massage demo                                   sandbox on 8080, app on 8081, data in memory
  fhir-massage demo --data-dir var/demo               keep orders and notes across restarts
  fhir-massage demo --sandbox-port 0 --app-port 0     any free ports
"""

CLIENT_ID = "fhir-massage-demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="sandbox EHR with demo patients + the app, ready to click through",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind both servers (default 127.0.0.1)")
    p.add_argument("--sandbox-port", type=int, default=8080, help="sandbox EHR port (default 8080; 0 = any free)")
    p.add_argument("--app-port", type=int, default=8081, help="app port (default 8081; 0 = any free)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="keep the sandbox's data and the app's sessions and drafts in DIR (default: memory)")
    p.add_argument("--today", type=date.fromisoformat, default=None, help="the demo data's today (YYYY-MM-DD)")
    p.set_defaults(func=run)


def _bind(host: str, port: int, what: str, flag: str) -> Any:
    from fhir_massage.serving import make_threaded_server

    try:
        return make_threaded_server(host, port, _NotYet())
    except OSError as exc:
        raise InvalidInput(f"Cannot listen on {host}:{port} for the {what} ({exc.strerror}). Is another demo "
                           f"running? Pick another port with {flag} N (0 = any free port).") from None


def run(args: argparse.Namespace) -> int:
    from smart_app.config import is_loopback_host

    if not is_loopback_host(args.host):
        raise InvalidInput("The demo serves plain http without real logins: it only binds a loopback address "
                       "(127.0.0.1, ::1). Use `fhir-massage app` behind TLS for anything else.")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)

    # Bind both ports first: each side's URL must be known before the other is configured.
    sandbox_srv = _bind(args.host, args.sandbox_port, "sandbox EHR", "--sandbox-port")
    app_srv = _bind(args.host, args.app_port, "app", "--app-port")
    host = f"[{args.host}]" if ":" in args.host else args.host
    ehr_base = f"http://{host}:{sandbox_srv.port}"
    app_base = f"http://{host}:{app_srv.port}"
    secret = secrets.token_urlsafe(32)

    from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
    from smart_app import create_app

    print("Loading the demo patients into the sandbox EHR ...", flush=True)
    sandbox_cfg = SandboxConfig(
        host=args.host, port=sandbox_srv.port, data_dir=args.data_dir, seed=True, today=args.today,
        public_base=f"{ehr_base}/fhir",
        auth={"clients": [{
            "client_id": CLIENT_ID, "name": "fhir-massage (demo)", "auth_method": "client_secret_basic",
            "client_secret": secret, "redirect_uris": [f"{app_base}/callback"], "launch_url": f"{app_base}/launch",
            "refresh": True,
        }], "cds_base_url": app_base},  # the CDS base: the order entry calls {base}/cds-services (discovery)
    )
    sandbox_srv.app = create_sandbox_app(sandbox_cfg)
    store_url = f"sqlite:///{(args.data_dir / 'app.sqlite3').resolve()}" if args.data_dir else "sqlite:///:memory:"
    app_srv.app = create_app({
        "PUBLIC_URL": app_base,
        "STORE_URL": store_url,
        "REGISTRATIONS": [{
            "iss": f"{ehr_base}/fhir", "client_id": CLIENT_ID, "name": "fhir-massage sandbox EHR",
            "auth": "client_secret_basic", "client_secret": secret, "scope_dialect": "v2",
            "frame_ancestors": [ehr_base],
            "cds_iss": ehr_base, "cds_jwks_url": f"{ehr_base}/ehr/cds-jwks",
        }],
    })

    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (sandbox_srv, app_srv)]
    for t in threads:
        t.start()
    print(f"""
fhir-massage demo is running.

  Open this URL:     {ehr_base}/ehr        (the EHR simulator: pick a user and a patient)

  Sandbox FHIR base: {ehr_base}/fhir        (SMART authorization required; `fhir-massage sandbox --open` for tools)
  App:               {app_base}/launch      (launched by the EHR; not meant to be opened directly)
  Data:              {args.data_dir or 'in memory (gone when you stop)'}

Stop with Ctrl-C.""", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("\nStopping.", file=sys.stderr)
    finally:
        for s in (app_srv, sandbox_srv):
            s.shutdown()
            s.server_close()
    return 0


class _NotYet:
    """Answers 503 for the instant between binding a port and building the app behind it."""

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
        return [b"starting"]

