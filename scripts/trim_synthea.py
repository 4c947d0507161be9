#!/usr/bin/env python3
"""Developer tool: trim the shared Synthea bundles into small demo/test fixtures for the sandbox EHR.

Run by hand only (never from `make demo` / `make test`, which must not read /work/shared):

    .venv/bin/python scripts/trim_synthea.py [--src ../shared/data/synthea] [--out fhir_massage/sandbox/demo/synthea]

What it keeps, per patient (everything else -- Encounters, Claims, EOBs, DiagnosticReports, CarePlans,
Immunizations, Practitioners, Organizations, ... -- is dropped):
- Patient (narrative dropped);
- Conditions, except Synthea's non-clinical social/administrative findings (NON_CLINICAL_CONDITIONS); every
  episode of a MANIFEST.md notable code is kept, other repeated codes keep their first and latest episode;
- MedicationRequest / MedicationStatement / MedicationAdministration: runs of the same RxNorm code are collapsed
  to the first and the last record, so the first and last dates survive (the manifest keeps the original count);
- AllergyIntolerance (all);
- Procedures that matter for massage screening (surgery, wound care, fracture care, oncology, dialysis, obstetric
  surgery: PROCEDURES_KEPT), latest REPEAT_KEEP per code plus the first;
- Observations for platelets, INR, D-dimer, blood pressure, body temperature, eGFR, pregnancy status and
  estimated delivery date (OBSERVATION_CODES): the latest REPEAT_KEEP per code.
Original ids and dates are kept. References to dropped resources (encounter, requester, performer, ...) are
removed; references to kept ones are rewritten from `urn:uuid:<id>` to `<Type>/<id>`, and entries become PUTs
with those ids so reseeding is idempotent. The manifest's notable episodes come from the curated MANIFEST.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "synthea"
DEFAULT_OUT = ROOT / "fhir_massage" / "sandbox" / "demo" / "synthea"

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

REPEAT_KEEP = 3

# Synthea's social-determinant / administrative "conditions": not problems a massage screen looks at.
NON_CLINICAL_CONDITIONS = {
    "314529007",  # Medication review due (situation)
    "224299000",  # Received higher education (finding)
    "446654005",  # Refugee (person)
    "73595000",  # Stress (finding)
    "160903007",  # Full-time employment (finding)
    "160904001",  # Part-time employment (finding)
    "741062008",  # Not in labor force (finding)
    "160968000",  # Risk activity involvement (finding)
    "423315002",  # Limited social contact (finding)
    "422650009",  # Social isolation (finding)
    "424393004",  # Reports of violence in the environment (finding)
    "706893006",  # Victim of intimate partner abuse (finding)
    "10939881000119105",  # Unhealthy alcohol drinking behavior (finding)
}

# SNOMED procedures that matter for screening: recent surgery near a site, wound closure, fracture care,
# oncology treatment, dialysis access, vascular intervention, obstetric surgery.
PROCEDURES_KEPT = {
    "288086009",  # Suture open wound
    "11466000",  # Cesarean section
    "90470006",  # Prostatectomy
    "65575008",  # Biopsy of prostate
    "43075005",  # Partial resection of colon
    "274031008",  # Rectal polypectomy
    "699253003",  # Surgical manipulation of joint of knee
    "387685009",  # Surgical manipulation of shoulder joint
    "274474001",  # Bone immobilization
    "703423002",  # Combined chemotherapy and radiation therapy
    "302497006",  # Hemodialysis
    "433112001",  # Percutaneous mechanical thrombectomy of portal vein
    "18286008",  # Catheter ablation of tissue of heart
    "180325003",  # Electrical cardioversion
    "85548006",  # Episiotomy
    "236974004",  # Instrumental delivery
    "66348005",  # Childbirth
    "714812005",  # Induced termination of pregnancy
    "312681000",  # Bone density scan
    "91251008",  # Physical therapy procedure
}

# LOINC codes of the Observations the screening rules read (reference/contraindications.md "Observation rules").
OBSERVATION_CODES = {
    # platelets
    "777-3", "26515-7", "778-1", "13056-7", "26516-5", "97995-5",
    # INR, and D-dimer (a DVT work-up marker)
    "6301-6", "34714-6", "38875-1", "46418-0", "48065-7",
    # blood pressure: panels (85354-9 current, 55284-4 older Synthea) and lone components
    "85354-9", "55284-4", "8480-6", "8462-4",
    # body temperature (8331-1 oral)
    "8310-5", "8331-1",
    # eGFR
    "33914-3", "62238-1", "98979-8", "69405-9", "48642-3", "48643-1", "50044-7", "88293-6", "88294-4",
    # pregnancy status, estimated delivery date
    "82810-3", "11778-8", "11779-6", "11780-4",
}  # fmt: skip

MED_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration")
KEPT_TYPES = ("Patient", "Condition", *MED_TYPES, "AllergyIntolerance", "Procedure", "Observation")


def first_code(concept: dict | None, system: str) -> str | None:
    for c in (concept or {}).get("coding") or []:
        if c.get("system") == system:
            return c.get("code")
    return None


def when(r: dict) -> str:
    """The clinically meaningful date of a resource, as an ISO string for sorting."""
    for key in ("effectiveDateTime", "authoredOn", "performedDateTime", "onsetDateTime", "recordedDate", "issued"):
        if isinstance(r.get(key), str):
            return r[key]
    for key in ("effectivePeriod", "performedPeriod"):
        if isinstance(r.get(key), dict) and r[key].get("start"):
            return r[key]["start"]
    return ""


def med_code(r: dict) -> str:
    return first_code(r.get("medicationCodeableConcept"), RXNORM) or json.dumps(r.get("medicationCodeableConcept"))


def collapse(resources: list[dict], key, first_last: bool, latest: int = REPEAT_KEEP) -> tuple[list[dict], dict]:
    """Group by key; keep the first and last (meds) or the first and the `latest` newest (others)."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in resources:
        groups[key(r)].append(r)
    kept, counts = [], {}
    for k, rs in groups.items():
        rs.sort(key=when)
        if first_last:
            pick = rs if len(rs) <= 2 else [rs[0], rs[-1]]
        else:
            pick = rs if len(rs) <= latest + 1 else [rs[0], *rs[-latest:]]
        kept.extend(pick)
        counts[k] = (len(rs), len(pick), when(rs[0]), when(rs[-1]))
    return kept, counts


def strip_refs(node: Any, kept_ids: dict[str, str]) -> Any:
    """Rewrite references to kept resources; return None for a Reference to a dropped one (caller removes it)."""
    if isinstance(node, dict):
        if "reference" in node and isinstance(node["reference"], str):
            ref = node["reference"]
            rid = ref[len("urn:uuid:") :] if ref.startswith("urn:uuid:") else None
            if rid is None or rid not in kept_ids:
                return None
            return {**node, "reference": f"{kept_ids[rid]}/{rid}"}
        out = {}
        for k, v in node.items():
            nv = strip_refs(v, kept_ids)
            if nv is None or nv == [] or nv == {}:
                continue
            out[k] = nv
        # A MedicationAdministration.performer without its actor is invalid: drop the element whole.
        if "function" in out and "actor" not in out and set(out) <= {"function", "id", "extension"}:
            return None
        return out
    if isinstance(node, list):
        items = [strip_refs(v, kept_ids) for v in node]
        return [v for v in items if v is not None and v != {}]
    return node


def parse_manifest(text: str) -> dict[str, list[dict]]:
    """MANIFEST.md -> {relative file: [notable item lines parsed]}."""
    out: dict[str, list[dict]] = {}
    current = None
    head = re.compile(r"^### (\S+\.json) ")
    cond = re.compile(r'^- Condition (\d+) "(.*)" onset (\S+)(?: abated (\S+))? \[(\w+)\]')
    med = re.compile(r'^- (Medication\w+) RxNorm (\d+) "(.*)" (\S+?)(?:\.\.(\S+))?(?: x(\d+))? \[(\w+)\]')
    proc = re.compile(r'^- Procedure (\d+) "(.*)" (\S+)')
    for line in text.splitlines():
        if m := head.match(line):
            current = m.group(1)
            out[current] = []
        elif current and (m := cond.match(line)):
            out[current].append({"kind": "Condition", "code": m[1], "display": m[2], "onset": m[3],
                                 "abatement": m[4], "clinicalStatus": m[5]})  # fmt: skip
        elif current and (m := med.match(line)):
            out[current].append({"kind": m[1], "code": m[2], "display": m[3], "first": m[4],
                                 "last": m[5] or m[4], "count": int(m[6] or 1), "status": m[7]})  # fmt: skip
        elif current and (m := proc.match(line)):
            out[current].append({"kind": "Procedure", "code": m[1], "display": m[2], "date": m[3]})
    return out


def slug(path: Path) -> str:
    """`Clarine_O'Keefe_e8c2...json` -> `Clarine_OKeefe.json` (first and last name only, file-system safe)."""
    parts = path.stem.split("_")
    name_parts = [p for p in parts if not re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f-]+)?", p)]
    return re.sub(r"[^A-Za-z0-9_]", "", "_".join(name_parts)) + ".json"


def trim(bundle: dict, notable_codes: set[str]) -> tuple[dict, dict]:
    by_type: dict[str, list[dict]] = defaultdict(list)
    for e in bundle["entry"]:
        r = e["resource"]
        by_type[r["resourceType"]].append(r)
    (patient,) = by_type["Patient"]
    conditions = [r for r in by_type["Condition"] if first_code(r.get("code"), SNOMED) not in NON_CLINICAL_CONDITIONS]
    # Synthea repeats minor episodes (viral sinusitis 25 times): keep the first and latest few of each code,
    # except the MANIFEST's notable conditions, whose every episode is kept (tests pick dates inside them).
    repeated = [r for r in conditions if first_code(r.get("code"), SNOMED) not in notable_codes]
    conditions = [r for r in conditions if first_code(r.get("code"), SNOMED) in notable_codes]
    conditions += collapse(repeated, lambda r: first_code(r.get("code"), SNOMED), first_last=False, latest=1)[0]
    meds, med_counts = [], {}
    for t in MED_TYPES:
        kept, counts = collapse(by_type[t], med_code, first_last=True)
        meds.extend(kept)
        med_counts.update({(t, k): v for k, v in counts.items()})
    procs = [r for r in by_type["Procedure"] if first_code(r.get("code"), SNOMED) in PROCEDURES_KEPT]
    procs, _ = collapse(procs, lambda r: first_code(r.get("code"), SNOMED), first_last=False)
    obs_groups: dict[str, list[dict]] = defaultdict(list)
    for r in by_type["Observation"]:
        code = first_code(r.get("code"), LOINC)
        if code in OBSERVATION_CODES:
            obs_groups[code].append(r)
    if obs_groups.get("85354-9") or obs_groups.get("55284-4"):
        # Synthea writes each BP twice: a panel with components and lone systolic/diastolic; keep the panel.
        obs_groups.pop("8480-6", None)
        obs_groups.pop("8462-4", None)
    obs = []
    for rs in obs_groups.values():
        obs.extend(sorted(rs, key=when)[-REPEAT_KEEP:])
    allergies = by_type["AllergyIntolerance"]

    ordered = [patient]
    for group in (conditions, meds, allergies, procs, obs):
        ordered.extend(sorted(group, key=lambda r: (r["resourceType"], when(r), r["id"])))
    kept_ids = {r["id"]: r["resourceType"] for r in ordered}
    for r in ordered:
        if r.get("medicationReference"):
            raise SystemExit(f"{r['resourceType']}/{r['id']} uses medicationReference; extend the trimmer")
    entries = []
    for r in ordered:
        r = {k: v for k, v in r.items() if k != "text"}  # generated narrative: large, derivable
        r = strip_refs(r, kept_ids)
        entries.append({
            "fullUrl": f"urn:uuid:{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
        })  # fmt: skip
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, med_counts


def display_name(patient: dict) -> str:
    name = (patient.get("name") or [{}])[0]
    given = " ".join(name.get("given") or [])
    # Synthea appends digits to names ("Ali918"); the display name drops them.
    return re.sub(r"\d+", "", f"{given} {name.get('family', '')}").strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    notable = parse_manifest((args.src / "MANIFEST.md").read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for src in sorted(args.src.glob("*/*.json")):
        rel = f"{src.parent.name}/{src.name}"
        bundle = json.loads(src.read_text(encoding="utf-8"))
        codes = {i["code"] for i in notable.get(rel, []) if i["kind"] == "Condition"}
        trimmed, med_counts = trim(bundle, codes)
        name = slug(src)
        text = json.dumps(trimmed, ensure_ascii=False, separators=(",", ":"))
        (args.out / name).write_text(text + "\n", encoding="utf-8")
        patient = trimmed["entry"][0]["resource"]
        resources = [e["resource"] for e in trimmed["entry"]]
        episodes = []
        for item in notable.get(rel, []):
            if item["kind"] == "Condition":
                match = [r for r in resources if r["resourceType"] == "Condition"
                         and first_code(r.get("code"), SNOMED) == item["code"]
                         and r.get("onsetDateTime", "")[:10] == item["onset"]]  # fmt: skip
                if len(match) < 1:
                    raise SystemExit(f"{rel}: manifest condition {item} not found after trimming")
                item = {**item, "resourceId": match[0]["id"], "system": SNOMED}
            elif item["kind"] in MED_TYPES:
                total, kept, _, _ = med_counts[(item["kind"], item["code"])]
                item = {**item, "system": RXNORM, "keptRecords": kept}
            else:
                item = {**item, "system": SNOMED}
            episodes.append(item)
        manifest.append({
            "file": name,
            "source": rel,
            "sourceSize": src.stat().st_size,
            "patientId": patient["id"],
            "name": display_name(patient),
            "gender": patient.get("gender"),
            "birthDate": patient.get("birthDate"),
            "resourceCounts": {t: sum(1 for r in resources if r["resourceType"] == t) for t in KEPT_TYPES
                               if any(r["resourceType"] == t for r in resources)},
            "episodes": episodes,
        })  # fmt: skip
        print(f"{name:28} {len(text) / 1024:7.1f} KB  {len(resources):4} resources", file=sys.stderr)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", "utf-8")
    for lic in sorted(args.src.glob("*/LICENSE*")) + sorted(args.src.glob("*/NOTICE*")):
        shutil.copyfile(lic, args.out / f"{lic.parent.name}--{lic.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
