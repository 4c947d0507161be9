"""`fhir-massage app`: run the SMART app: the pages an EHR opens inside its chart, and the CDS Hooks service.

It serves only the EHRs it is told about (--ehr for a quick public client, --registrations for a file). Each EHR
opens it at <public URL>/launch and must have <public URL>/callback registered as the redirect URI.

Examples:
  fhir-massage sandbox --port 8080 --client fhir-massage=http://127.0.0.1:8081/callback,http://127.0.0.1:8081/launch
  fhir-massage app --port 8081 --ehr http://127.0.0.1:8080/fhir=fhir-massage
        the app for that sandbox (a public client); open http://127.0.0.1:8080/ehr to launch it
  fhir-massage app --registrations ehrs.toml --public-url https://massage.example.org --trust-proxy-tls
        several EHRs, confidential clients, behind a TLS proxy

The registrations file: docs/registrations-file.md. Production (gunicorn, PostgreSQL, proxy): docs/deployment.md.
"""

from __future__ import annotations

import argparse

ORDER = 15


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="run the SMART app (Flask) for one or more registered EHRs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8081, help="port (0 picks a free one; default 8081)")
    p.add_argument("--ehr", action="append", default=[], metavar="ISS=CLIENT_ID",
                   help="register a public client for one EHR (repeatable)")
    p.add_argument("--registrations", metavar="FILE.toml", help="EHR registrations ([[ehr]] tables)")
    p.add_argument("--public-url", help="the app's external URL (default http://HOST:PORT)")
    p.add_argument("--store", dest="store_url", help="sqlite:///file.db (default: in memory) or postgresql://...")
    p.add_argument("--trust-proxy-tls", action="store_true",
                   help="a TLS-terminating proxy stands in front (needed to listen on a non-loopback address)")
    p.set_defaults(func=run)


def _parse_ehr(value: str) -> dict[str, str]:
    from fhir_massage.errors import InvalidInput

    # rsplit: the issuer URL may itself hold "=" in a query-less path segment, the client id never does
    iss, sep, client_id = value.rpartition("=")
    if not sep or not iss or not client_id:
        raise InvalidInput(f"--ehr takes ISS=CLIENT_ID, not {value!r}.")
    return {"iss": iss, "client_id": client_id, "auth": "public"}


def run(args: argparse.Namespace) -> int:
    from fhir_massage.serving import make_threaded_server

    from fhir_massage.errors import InvalidInput
    from smart_app import create_app
    from smart_app.config import from_env, is_loopback_host, load_registrations_toml

    import os

    from smart_app import logs

    logs.configure(os.environ.get("FHIR_MASSAGE_LOG_FORMAT", "plain"))
    registrations = [_parse_ehr(v) for v in args.ehr]
    if args.registrations:
        registrations += load_registrations_toml(args.registrations)
    if not registrations:
        raise InvalidInput("Register at least one EHR: --ehr ISS=CLIENT_ID or --registrations FILE.toml.")
    if not is_loopback_host(args.host) and not args.trust_proxy_tls:
        raise InvalidInput(f"Refusing to serve plain http on {args.host}: use a loopback address, or put a TLS proxy "
                           "in front and pass --trust-proxy-tls.")
    config = from_env()
    config["REGISTRATIONS"] = registrations
    config["TRUST_PROXY_TLS"] = bool(args.trust_proxy_tls or config.get("TRUST_PROXY_TLS"))
    if args.store_url:
        config["STORE_URL"] = args.store_url
    try:
        server = make_threaded_server(args.host, args.port, _LazyApp())
    except OSError as exc:
        raise InvalidInput(f"Cannot listen on {args.host}:{args.port} ({exc.strerror}). Is the app already "
                           "running? Pick another port with --port N (0 = any free port).") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    config["PUBLIC_URL"] = args.public_url or config.get("PUBLIC_URL") or f"http://{host}:{server.port}"
    app = create_app(config)
    server.app = app
    public = config["PUBLIC_URL"].rstrip("/")
    print(f"fhir-massage app listening on http://{host}:{server.port}", flush=True)
    print(f"  launch URL:   {public}/launch", flush=True)
    print(f"  redirect URI: {public}/callback", flush=True)
    for reg in app.extensions["smart_app"].registry.values():
        print(f"  EHR: {reg.iss} (client {reg.client_id}, {reg.auth_method})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


class _LazyApp:
    """Placeholder until create_app ran (the port must be known first to build PUBLIC_URL for --port 0)."""

    def __call__(self, environ, start_response):  # pragma: no cover - replaced before serving
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"starting"]

