"""`fhir-massage screen`: screen one patient's chart for massage contraindications (a stable, scripted interface)."""

from __future__ import annotations

import argparse
import sys

ORDER = 30

HELP = "screen one patient's chart (a FHIR Bundle file, or a live FHIR server) for massage contraindications"
DESCRIPTION = """\
Screen one patient's chart for massage contraindications and print the verdict (contraindicated, caution or
clear), each finding with the rule id, the techniques and body sites it concerns, the chart resources behind it,
its evidence class and source, and anything that needs a clinician's review.

Allergies to massage products (nut or plant oils, latex, fragrance, lanolin) are information for the therapist,
not contraindications: they are listed under "For your information" (json: "information") and never change the
verdict; a chart whose only concern is a latex allergy is clear.

Input: a FHIR R4 Bundle (searchset, collection, batch or transaction) holding exactly one Patient, or a live
server (--fhir-base URL --patient ID; the token from --token or the FHIR_MASSAGE_TOKEN environment variable).

Techniques (--technique, repeatable; default: all): swedish, deep-tissue, myofascial-release, trigger-point,
lymphatic-drainage, neuromuscular, stretching.
Sites (--site, repeatable; default: whole body): a SNOMED CT body-structure code, optionally with a side:
30021000:left (left lower leg), 61685007 (lower limb, both sides), 77568009 (back). See
fhir_massage/knowledge/body_sites.json for the list.

Output: --format text (a report for a person; the default when stdout is a terminal) or --format json (the
stable shape scripts read; the default when stdout is a pipe or file):
  {"verdict", "findings": [{"rule", "class", "techniques", "sites", "evidence", "message", "evidenceClass",
  "source", ...}], "information": [{"rule", "techniques", "sites", "evidence", "message", "evidenceClass",
  "source", ...}], "needsReview": [{"evidence", "reason"}], "warnings": [...]}
  findings[].class is absolute, relative or local; information items have the keys of a finding but no class.
  Keys may be added to this shape, never removed or renamed. Values keep their UCUM unit codes in "unit"
  (Cel, 10*9/L, mm[Hg]); human text (messages, the text report) prints them for people (°C, ×10⁹/L, mmHg).

Exit status: 0 when the chart was screened, whatever the verdict; 2 with one line on stderr when the input cannot
be used (not JSON, not a Bundle, no or several patients, unknown technique, malformed site).

Examples:
  fhir-massage screen --bundle chart.json --technique deep-tissue --site 30021000:left --today 2024-05-01
  fhir-massage screen --bundle chart.json --format json | jq .verdict
  FHIR_MASSAGE_TOKEN=... fhir-massage screen --fhir-base https://ehr.example.org/fhir --patient 123

A chart to try: run the sandbox without authorization (`fhir-massage sandbox --open --port 8090`, in another
terminal) and screen a demo patient live, or save the chart as a Bundle file first:
  fhir-massage screen --fhir-base http://127.0.0.1:8090/fhir --patient demo-dana-whitfield --technique deep-tissue
  curl -s 'http://127.0.0.1:8090/fhir/Patient?_id=demo-dana-whitfield&_revinclude=Condition:patient&_revinclude=MedicationRequest:patient&_revinclude=Observation:patient' > chart.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("screen", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", metavar="FILE", help="a FHIR Bundle JSON file ('-' reads stdin)")
    src.add_argument("--fhir-base", metavar="URL", help="screen live data from this FHIR R4 server (needs --patient)")
    p.add_argument("--patient", metavar="ID", help="the Patient id on the live server")
    p.add_argument("--token", metavar="TOKEN", default=None,
                   help="bearer token for the live server (or FHIR_MASSAGE_TOKEN, which keeps it out of the process list)")
    p.add_argument("--technique", action="append", default=[], metavar="KEY", help="a proposed technique (repeatable)")
    p.add_argument("--site", action="append", default=[], metavar="SITE", help="a proposed body site (repeatable)")
    p.add_argument("--today", metavar="YYYY-MM-DD", help="screen as of this date (default: today's date)")
    p.add_argument("--format", choices=("json", "text"), default=None,
                   help="json or text (default: text on a terminal, json otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imports stay inside: `fhir-massage screen` must start fast (no pydantic/fhir.resources on this path).
    from datetime import date

    import orjson

    from fhir_massage.errors import InvalidInput
    from fhir_massage.knowledge import load_kb, parse_site
    from fhir_massage.screening import normalize_techniques, screen

    kb = load_kb()
    techniques = normalize_techniques(args.technique) if args.technique else None
    sites = [parse_site(s, kb) for s in args.site] or None
    if args.today:
        try:
            today = date.fromisoformat(args.today)
        except ValueError:
            raise InvalidInput(f"--today must be a date like 2024-05-01, not {args.today!r}.") from None
    else:
        today = date.today()  # the one clock read, at the edge

    if args.bundle is not None:
        chart = _chart_from_file(args.bundle, kb)
    else:
        chart = _chart_from_server(args, kb)
    result = screen(chart, techniques=techniques, sites=sites, today=today, kb=kb)

    fmt = args.format or ("text" if sys.stdout.isatty() else "json")
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(render_text(result, kb))
    sys.stdout.flush()
    return 0


def _chart_from_file(path: str, kb):
    import orjson

    from fhir_massage.chart import from_bundle
    from fhir_massage.errors import InvalidInput

    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as exc:
        raise InvalidInput(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        bundle = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidInput(f"{path} is not JSON.") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        what = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise InvalidInput(f"{path} is not a FHIR Bundle (found {what!r}).")
    return from_bundle(bundle, kb=kb)


def _chart_from_server(args: argparse.Namespace, kb):
    import os

    from fhir_massage.chart import from_resources
    from fhir_massage.chart_fetch import fetch_chart_resources
    from fhir_massage.errors import InvalidInput
    from fhir_massage.fhir import FhirClient, StaticToken

    if not args.patient:
        raise InvalidInput("--fhir-base needs --patient ID.")
    token = args.token or os.environ.get("FHIR_MASSAGE_TOKEN")
    with FhirClient(args.fhir_base, token_source=StaticToken(token) if token else None) as client:
        resources = fetch_chart_resources(client, args.patient)
    return from_resources(resources, kb=kb)


def render_text(result, kb) -> str:
    """A report for a person: verdict first, then why, then what needs review."""
    from fhir_massage.codes import TECHNIQUE_DISPLAY

    def site_name(s) -> str:
        info = kb.sites.get(s.code)
        name = info.display if info else s.code
        return f"{s.laterality} {name.lower()}" if s.laterality else name

    lines = []
    head = {"contraindicated": "CONTRAINDICATED", "caution": "CAUTION", "clear": "CLEAR"}[result.verdict]
    techs = ", ".join(TECHNIQUE_DISPLAY.get(t, t) for t in result.techniques)
    sites = ", ".join(site_name(s) for s in result.sites)
    lines.append(f"Verdict: {head}   ({result.patient}, as of {result.today.isoformat()})")
    lines.append(f"Proposed: {techs} — {sites}")
    applicable = set(result.applicable)
    if result.findings:
        lines.append("")
        lines.append("Findings:")
    for f in result.findings:
        mark = "applies" if f.rule in applicable else "elsewhere / other techniques"
        lines.append(f"  [{f.cls.upper()}] {f.rule} — {f.title} ({mark})")
        lines.append(f"      techniques: {', '.join(f.techniques)}")
        lines.append(f"      sites: {', '.join(site_name(s) for s in f.sites)}")
        lines.append(f"      why: {f.message}")
        lines.extend(_evidence_lines(f))
    if result.information:
        lines.append("")
        lines.append("For your information (does not change the verdict):")
    for f in result.information:
        lines.append(f"  {f.rule} — {f.title}")
        lines.append(f"      {f.message}")
        lines.extend(_evidence_lines(f))
    if result.needs_review:
        lines.append("")
        lines.append("Needs a clinician's review:")
        for n in result.needs_review:
            lines.append(f"  {n['evidence']}: {n['reason']}")
    if result.warnings:
        lines.append("")
        lines.append("Warnings about the data:")
        for w in result.warnings:
            lines.append(f"  {w}")
    if not result.findings and not result.needs_review:
        lines.append("No contraindication found in the chart for this proposal.")
    return "\n".join(lines) + "\n"


def _evidence_lines(f) -> list[str]:
    """What a finding or an information item rests on: the chart entries, the evidence class, the source."""
    unverified = "" if f.verified else "  (includes codes not verified)"
    return [f"      evidence: {', '.join(f.evidence)}",
            f"      evidence class: {f.evidence_class}{unverified}",
            f"      source: {f.source or 'none recorded'}"]
