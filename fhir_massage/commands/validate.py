"""`fhir-massage validate FILE...`: check FHIR JSON against the R4 structure and the fhir-massage profiles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fhir_massage.errors import InvalidInput

ORDER = 40

HELP = "check FHIR resources (or Bundles) against FHIR R4 and the fhir-massage profiles"
DESCRIPTION = """\
Check FHIR R4 JSON files: the FHIR structure (datatypes, unknown elements) and the fhir-massage profiles
(cardinality, fixed codes, required value sets, the CPT + technique codings). A resource is checked against the
fhir-massage profiles in its meta.profile, or --profile; a Bundle's entries are checked one by one.

Prints one line per problem: FILE: severity: path: message. Exit status: 0 all valid (warnings allowed),
1 at least one error, 2 a file that cannot be read or is not JSON.

Examples:
  fhir-massage validate profiles/examples/*.json
  fhir-massage validate --profile https://fhir-massage.dev/fhir/StructureDefinition/massage-procedure session.json
  fhir-massage validate --quiet order-bundle.json   (errors only)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="FHIR JSON file (a resource or a Bundle)")
    p.add_argument("--profile", default=None, help="canonical URL of the profile to check against")
    p.add_argument("--quiet", action="store_true", help="print errors only (no warnings, no OK lines)")
    p.set_defaults(func=run)


def _read(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{path}: not JSON ({exc})") from None


def run(args: argparse.Namespace) -> int:
    from fhir_massage.validation import errors, validate_resource

    # Read every file first: an unreadable input is a usage problem (exit 2), reported before any verdict.
    docs = [(path, _read(path)) for path in args.files]
    if args.profile and not args.profile.startswith("https://fhir-massage.dev/fhir/StructureDefinition/"):
        raise InvalidInput(f"--profile {args.profile} is not a fhir-massage profile URL")
    invalid = 0
    for path, doc in docs:
        issues = validate_resource(doc, args.profile)
        bad = errors(issues)
        shown = bad if args.quiet else [i for i in issues if i.severity != "information"]
        for issue in shown:
            print(f"{path}: {issue.severity}: {issue.path}: {issue.message}")
        if bad:
            invalid += 1
        elif not args.quiet:
            print(f"{path}: OK")
    if invalid:
        print(f"{invalid} of {len(docs)} file(s) invalid", file=sys.stderr)
        return 1
    return 0
