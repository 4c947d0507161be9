"""The `fhir-massage` command.

Subcommands live in fhir_massage/commands/ (one module each) so that areas of the product add their command
without touching this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fhir_massage import __version__, commands
from fhir_massage.errors import MassageError

DESCRIPTION = """\
fhir-massage screens a patient's chart for massage contraindications, orders medical massage as a FHIR
ServiceRequest, documents sessions as Procedures, and ships a strict sandbox EHR to try it all on.

Start here:
  fhir-massage demo                 sandbox EHR with demo patients + the app, prints the URL to open
  fhir-massage sandbox --port 8080  only the sandbox EHR (FHIR R4 server, SMART authorization server)
  fhir-massage screen --bundle chart.json --technique deep-tissue
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-massage",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fhir-massage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MassageError as exc:
        # A known failure: one plain line, never a stack trace.
        print(f"fhir-massage {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
