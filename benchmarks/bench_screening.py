"""Screening speed: chart + screen vs orjson.loads on the same bytes, and the whole `fhir-massage screen` process.

The synthetic chart is generated deterministically (random.Random(7)) in the shapes Synthea and US Core EHRs send:
vital-sign and lab Observations (mostly codes screening does not read, some it does), Conditions repeated across
encounters, MedicationRequests with RxNorm SCDs, Procedures and AllergyIntolerances, each with meta, category,
encounter and subject references like real exports. Times are medians of several runs.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import orjson

PATIENT_ID = "8f0e5b7a-1c2d-4e5f-9a8b-7c6d5e4f3a2b"
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
RXN = "http://www.nlm.nih.gov/research/umls/rxnorm"

# (code, display, unit, low, high): the first ones are vitals/labs screening skips, the last ones it reads
_OBS = [
    ("8302-2", "Body Height", "cm", 150, 190), ("29463-7", "Body Weight", "kg", 50, 110),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 18, 35), ("8867-4", "Heart rate", "/min", 55, 100),
    ("9279-1", "Respiratory rate", "/min", 12, 20), ("72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported", "{score}", 0, 10),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70, 140), ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7, 20),
    ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 0.6, 1.3), ("2947-0", "Sodium [Moles/volume] in Blood", "mmol/L", 135, 145),
    ("6298-4", "Potassium [Moles/volume] in Blood", "mmol/L", 3.5, 5.1), ("2069-3", "Chloride [Moles/volume] in Blood", "mmol/L", 98, 107),
    ("20565-8", "Carbon dioxide, total [Moles/volume] in Blood", "mmol/L", 22, 29), ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 8.5, 10.2),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 150, 240), ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5, 9),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 4, 11), ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 11, 17),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 150, 400),
    ("6301-6", "INR in Platelet poor plasma by Coagulation assay", "{INR}", 0.9, 1.2),
    ("8310-5", "Body temperature", "Cel", 36.2, 37.4),
    ("33914-3", "Glomerular filtration rate/1.73 sq M.predicted", "mL/min/{1.73_m2}", 60, 110),
]
_COND = [
    ("444814009", "Viral sinusitis (disorder)"), ("195662009", "Acute viral pharyngitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"), ("15777000", "Prediabetes"), ("271737000", "Anemia (disorder)"),
    ("59621000", "Hypertension"), ("55822004", "Hyperlipidemia"), ("40055000", "Chronic sinusitis (disorder)"),
    ("44465007", "Sprain of ankle"), ("278860009", "Chronic low back pain (finding)"), ("82423001", "Chronic pain"),
    ("64859006", "Osteoporosis (disorder)"), ("128053003", "Deep venous thrombosis (disorder)"),
]
_MEDS = [
    ("313782", "Acetaminophen 325 MG Oral Tablet"), ("849574", "Naproxen sodium 220 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"), ("197361", "Amlodipine 5 MG Oral Tablet"),
    ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"), ("855332", "Warfarin Sodium 5 MG Oral Tablet"),
]
_PROC = [("430193006", "Medication Reconciliation (procedure)"), ("171207006", "Depression screening (procedure)"),
         ("710824005", "Assessment of health and social care needs (procedure)"), ("90470006", "Prostatectomy")]


def make_resources(n: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    start = date(2010, 1, 1)
    out: list[dict] = [{
        "resourceType": "Patient", "id": PATIENT_ID,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "identifier": [{"system": "https://github.com/synthetichealth/synthea", "value": PATIENT_ID}],
        "name": [{"use": "official", "family": "Bench", "given": ["Mark"]}], "gender": "female", "birthDate": "1961-04-02",
        "address": [{"line": ["1 Main St"], "city": "Boston", "state": "MA", "postalCode": "02110", "country": "US"}],
    }]
    subj = {"reference": f"urn:uuid:{PATIENT_ID}"}
    for i in range(n - 1):
        day = start + timedelta(days=rnd.randrange(0, 5000))
        when = f"{day.isoformat()}T{rnd.randrange(8, 18):02d}:{rnd.randrange(60):02d}:00-05:00"
        enc = {"reference": f"urn:uuid:enc-{rnd.randrange(400):04d}"}
        rid = f"{seed}-{i:06d}-{rnd.getrandbits(32):08x}"
        roll = rnd.random()
        if roll < 0.62:
            code, disp, unit, lo, hi = _OBS[rnd.randrange(len(_OBS))]
            if rnd.random() < 0.08:
                out.append({"resourceType": "Observation", "id": rid, "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]},
                            "status": "final",
                            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "vital-signs"}]}],
                            "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood Pressure"}], "text": "Blood Pressure"},
                            "subject": subj, "encounter": enc, "effectiveDateTime": when, "issued": when,
                            "component": [
                                {"code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic Blood Pressure"}]},
                                 "valueQuantity": {"value": round(rnd.uniform(65, 95), 1), "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                                {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic Blood Pressure"}]},
                                 "valueQuantity": {"value": round(rnd.uniform(105, 150), 1), "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]})
                continue
            out.append({"resourceType": "Observation", "id": rid, "status": "final",
                        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory", "display": "laboratory"}]}],
                        "code": {"coding": [{"system": LOINC, "code": code, "display": disp}], "text": disp},
                        "subject": subj, "encounter": enc, "effectiveDateTime": when, "issued": when,
                        "valueQuantity": {"value": round(rnd.uniform(lo, hi), 2), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
        elif roll < 0.80:
            code, disp = _COND[rnd.randrange(len(_COND))]
            resolved = rnd.random() < 0.6
            res = {"resourceType": "Condition", "id": rid,
                   "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"]},
                   "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved" if resolved else "active"}]},
                   "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                   "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
                   "code": {"coding": [{"system": SCT, "code": code, "display": disp}], "text": disp},
                   "subject": subj, "encounter": enc, "onsetDateTime": when, "recordedDate": when}
            if resolved:
                res["abatementDateTime"] = (day + timedelta(days=rnd.randrange(7, 60))).isoformat() + "T00:00:00-05:00"
            out.append(res)
        elif roll < 0.93:
            code, disp = _MEDS[rnd.randrange(len(_MEDS))]
            out.append({"resourceType": "MedicationRequest", "id": rid,
                        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest"]},
                        "status": rnd.choice(["stopped", "stopped", "active", "completed"]), "intent": "order",
                        "medicationCodeableConcept": {"coding": [{"system": RXN, "code": code, "display": disp}], "text": disp},
                        "subject": subj, "encounter": enc, "authoredOn": when,
                        "requester": {"reference": "urn:uuid:prac-0001", "display": "Dr. Bench"},
                        "dosageInstruction": [{"sequence": 1, "timing": {"repeat": {"frequency": 1, "period": 1.0, "periodUnit": "d"}},
                                               "asNeededBoolean": False, "doseAndRate": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/dose-rate-type", "code": "ordered", "display": "Ordered"}]},
                                                                                        "doseQuantity": {"value": 1.0}}]}]})
        elif roll < 0.99:
            code, disp = _PROC[rnd.randrange(len(_PROC))]
            out.append({"resourceType": "Procedure", "id": rid, "status": "completed",
                        "code": {"coding": [{"system": SCT, "code": code, "display": disp}], "text": disp},
                        "subject": subj, "encounter": enc, "performedPeriod": {"start": when, "end": when}})
        else:
            out.append({"resourceType": "AllergyIntolerance", "id": rid,
                        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
                        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
                        "type": "allergy", "category": ["food"], "criticality": "low",
                        "code": {"coding": [{"system": SCT, "code": "91935009", "display": "Allergy to peanuts"}], "text": "Allergy to peanuts"},
                        "patient": subj, "recordedDate": when})
    return out


def make_bundle(n: int, seed: int = 7) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in make_resources(n, seed)]}


def _median(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(report) -> None:
    from fhir_massage.chart import from_bundle
    from fhir_massage.knowledge import load_kb
    from fhir_massage.screening import screen

    kb = load_kb()
    today = date(2024, 1, 1)
    data = orjson.dumps(make_bundle(5000))
    bundle = orjson.loads(data)
    report("chart size", len(bundle["entry"]), "res", f"{len(data) / 1e6:.2f} MB of JSON")

    def engine():
        screen(from_bundle(bundle, kb=kb), today=today, kb=kb)

    engine()  # warm caches (KB load, regex compile) outside the timing
    t_parse = _median(lambda: orjson.loads(data), 15)
    t_engine = _median(engine, 15)
    report("orjson.loads (5,000 resources), median", t_parse * 1000, "ms")
    report("chart + screen (5,000 resources), median", t_engine * 1000, "ms")
    report("engine / orjson.loads", t_engine / t_parse, "x", "target <= 1.0")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chart-1000.json"
        path.write_bytes(orjson.dumps(make_bundle(1000, seed=11)))
        exe = Path(sys.executable).with_name("fhir-massage")
        cmd = [str(exe), "screen", "--bundle", str(path), "--today", "2024-01-01", "--format", "json"] if exe.exists() \
            else [sys.executable, "-m", "fhir_massage.cli", "screen", "--bundle", str(path), "--today", "2024-01-01", "--format", "json"]
        env = dict(os.environ)

        def proc():
            r = subprocess.run(cmd, capture_output=True, env=env)
            if r.returncode != 0:
                raise RuntimeError(r.stderr.decode()[:300])

        proc()
        t_proc = _median(proc, 7)
        report("`fhir-massage screen` process, 1,000 resources, median", t_proc * 1000, "ms", "target < 1000 ms")
