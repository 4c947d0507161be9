"""`fhir-massage check`: is this FHIR server (and its SMART setup) ready for the app? See fhir_massage/readiness.py."""

from __future__ import annotations

import argparse
import json
import os
import sys

ORDER = 50

HELP = "probe a FHIR server and its SMART configuration and print a readiness report for the app"
DESCRIPTION = """\
Probe a FHIR R4 server and its SMART App Launch configuration and say, line by line, what works for fhir-massage
(✓), what works with a limit (⚠) and what does not (✗), what that means for the app, and what to ask the EHR
vendor. It only reads, unless --write-probe is given.

Examples:
  fhir-massage check --fhir-base https://ehr.example.org/fhir
  fhir-massage check --fhir-base https://ehr.example.org/fhir --client-id my-app --app-url https://massage.example.org
  FHIR_MASSAGE_TOKEN=eyJ... fhir-massage check --fhir-base https://ehr.example.org/fhir --patient 123
  fhir-massage check --fhir-base http://127.0.0.1:8080/fhir --format json

Exit status: 0 when nothing is ✗, 1 when something is ✗, 2 when the input is unusable (a bad URL, nothing
answering). The JSON output (--format json) is stable for scripts: see docs/check-json.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-base", required=True, metavar="URL", help="the FHIR base URL (the iss the EHR sends)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--token", metavar="TOKEN", default=None,
                     help="an access token for live read probes (or set FHIR_MASSAGE_TOKEN, which keeps it out of "
                          "the shell history and the process list)")
    who.add_argument("--client-id", metavar="ID", default=None,
                     help="the app's client id at this EHR: print the registration facts (no token can be obtained "
                          "without a browser)")
    p.add_argument("--app-url", metavar="URL", default=None,
                   help="the app's public URL, for the registration facts (launch URL, redirect URI, JWKS URL)")
    p.add_argument("--patient", metavar="ID", default=None, help="a (test) patient id for the live probes")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--write-probe", action="store_true",
                   help="also write one marked test Communication (entered-in-error, tag "
                        "fhir-massage-readiness-probe) for --patient and delete it again")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fhir_massage.errors import InvalidInput
    from fhir_massage.readiness import build_report, gather, render_text, report_json

    token = args.token or (os.environ.get("FHIR_MASSAGE_TOKEN") if not args.client_id else None) or None
    if args.write_probe and not (token and args.patient):
        raise InvalidInput("--write-probe needs a token (--token or FHIR_MASSAGE_TOKEN) and --patient.")
    observations = gather(args.fhir_base, token=token, patient=args.patient, client_id=args.client_id,
                          app_url=args.app_url, write_probe=args.write_probe)
    report = build_report(observations)
    if args.format == "json":
        sys.stdout.write(json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_text(report) + "\n")
    return report.exit_code
