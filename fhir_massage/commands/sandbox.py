"""`fhir-massage sandbox`: run only the sandbox EHR (FHIR R4 server + SMART authorization server)."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import date
from pathlib import Path

from fhir_massage.errors import InvalidInput

ORDER = 20

HELP = "run the sandbox EHR (FHIR R4 server, SMART authorization server) on this machine"
DESCRIPTION = """\
Run the sandbox EHR: a strict FHIR R4 (4.0.1) server at <url>/fhir, with demo patients, plus its SMART
authorization server. It prints the FHIR base URL once it is ready, then serves until Ctrl-C.

Examples:
  fhir-massage sandbox --port 8080                         demo patients, SMART authorization required
  fhir-massage sandbox --port 8080 --open --no-seed        empty server, no authorization (client testing)
  fhir-massage sandbox --open --latency-ms 300 --fail-every-n 5 --fail-status 503 --retry-after 2
                                                           a slow, flaky EHR

Data is kept in memory unless --data-dir is given. Fault injection can also be changed while it runs:
  curl -X POST <url>/_sandbox/faults -d '{"fail_every_n": 3, "fail_status": 429}'
  curl -X DELETE <url>/_sandbox/faults
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sandbox", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--data-dir", type=Path, default=None, help="keep data in DIR/sandbox.sqlite3 (default: memory)")
    p.add_argument("--seed", action=argparse.BooleanOptionalAction, default=True, help="load the demo patients (default: on)")
    p.add_argument("--open", action="store_true", help="no authorization: every request may do everything")
    p.add_argument("--today", type=date.fromisoformat, default=None, help="the demo data's today (YYYY-MM-DD)")
    p.add_argument("--public-base", default=None, help="FHIR base URL to advertise (behind a proxy)")
    c = p.add_argument_group("capabilities (to see how the app degrades on a less capable EHR)")
    c.add_argument("--no-transactions", dest="transactions", action="store_false",
                   help="refuse transaction Bundles (501) and leave 'transaction' out of /metadata")
    c.add_argument("--no-batch", dest="batch", action="store_false",
                   help="refuse batch Bundles (501) and leave 'batch' out of /metadata")
    f = p.add_argument_group("fault injection (off by default)")
    f.add_argument("--latency-ms", type=int, default=0, help="delay every FHIR request by N ms")
    f.add_argument("--fail-every-n", type=int, default=0, help="every N-th FHIR request fails")
    f.add_argument("--fail-status", type=int, choices=(429, 500, 503), default=503, help="status of injected failures")
    f.add_argument("--fail-methods", default="", help="comma-separated methods to fail, e.g. POST,PUT (default all)")
    f.add_argument("--drop-every-n", type=int, default=0, help="every N-th FHIR request: close without answering")
    f.add_argument("--retry-after", type=int, default=None, help="Retry-After seconds on injected 429/503")
    from fhir_massage.sandbox.auth_clients import add_cli_options

    add_cli_options(p)  # --clients FILE, --client ID=REDIRECT[,LAUNCH], --discovery (SMART server's options)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fhir_massage.sandbox.auth_clients import auth_options_from_args
    from fhir_massage.sandbox.faults import FaultConfig
    from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
    from fhir_massage.serving import serve_in_thread, wait_ready

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be between 0 and 65535, not {args.port}.")
    for name in ("latency_ms", "fail_every_n", "drop_every_n"):
        if getattr(args, name) < 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must not be negative.")
    faults = FaultConfig(
        latency_ms=args.latency_ms,
        fail_every_n=args.fail_every_n,
        fail_status=args.fail_status,
        fail_methods=tuple(m.strip().upper() for m in args.fail_methods.split(",") if m.strip()),
        drop_every_n=args.drop_every_n,
        retry_after=args.retry_after,
    )
    config = SandboxConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        seed=args.seed,
        open=args.open,
        faults=faults,
        today=args.today,
        public_base=args.public_base,
        auth=auth_options_from_args(args),
        transactions=args.transactions,
        batch=args.batch,
    )
    # werkzeug's access log prints query strings (name=, identifier=...): patient data stays out of logs.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_sandbox_app(config)
    try:
        server = serve_in_thread(app, config.host, config.port)
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}).") from None
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    root = f"http://{host}:{server.port}"
    wait_ready(f"{root}/_sandbox/health", deadline_s=30, ok=lambda r: r.status_code == 200)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}; the sandbox is for testing, not for real patient data",
              file=sys.stderr)
    if config.open:
        print("WARNING: --open: NO AUTHORIZATION. Anyone who can reach this port may read and change every record.",
              file=sys.stderr)
    else:
        print(f"EHR simulator: {root}/ehr  (SMART discovery: {root}/fhir/.well-known/smart-configuration)",
              file=sys.stderr)
    print(config.public_base or f"{root}/fhir", flush=True)
    try:
        while server.thread.is_alive():
            server.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
