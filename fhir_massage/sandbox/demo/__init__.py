"""Demo patients and users of the sandbox EHR (issue 2 §4).

Two sources, both shipped as package data / code (nothing here reads /work/shared at run time):
- hand-made patients, built in Python relative to a given ``today`` (an "active" burn is always three days old),
  for what Synthea lacks: ICD-10-CM codings, a DVT of a named limb, a high-risk pregnancy with status and EDD
  Observations, an anticoagulant ordered as an RxNorm product, low platelets, fever, text-only, refuted and
  entered-in-error conditions, and a "clear" patient;
- 15 trimmed Synthea bundles in ``synthea/`` (made by ``scripts/trim_synthea.py``; licences and README beside
  them), with their original ids and dates: tests pick a "today" inside an episode from ``synthea_manifest()``.

Every bundle is a FHIR R4 ``transaction`` of PUTs with fixed ids, so seeding twice leaves the same data.
Code provenance: ICD-10-CM codes and displays were checked against published code lists (CMS/VSAC extracts seen
in public repositories); SNOMED CT and LOINC codes come from /work/shared/reference (contraindications.md,
fhir-modelling.md, tags [V]/[V2]) or from the Synthea data itself; RxNorm 1364445 "apixaban 5 MG Oral Tablet" is
cited in reference/contraindications.md. Nothing below is marked unverified because nothing is.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import uuid
from importlib import resources
from typing import Any, Callable

from fhir_massage import codes as C

__all__ = [
    "DEMO_USERS", "DEMO_PATIENTS", "HAND_MADE", "CARE_TEAMS", "care_team", "demo_bundles", "hand_made_resources",
    "synthea_bundle", "synthea_manifest",
]  # fmt: skip

# Namespace for the entries' urn:uuid fullUrls of hand-made resources (ids are readable slugs, fullUrls must be
# URIs: a uuid5 of "Type/id" keeps them stable across runs).
_NS = uuid.UUID("6f0f3c2e-3d4b-5b7e-9a51-0d1c3a7e2b10")

NPI = "http://hl7.org/fhir/sid/us-npi"
UCUM = "http://unitsofmeasure.org"
MRN_SYSTEM = "https://fhir-massage.dev/sandbox/mrn"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"

ORG_ID = "org-harbor-family-health"


# --------------------------------------------------------------------------------------------- users


def _user_resources() -> list[dict]:
    org = {
        "resourceType": "Organization",
        "id": ORG_ID,
        "meta": {"profile": [US_CORE + "us-core-organization"]},
        "identifier": [{"system": NPI, "value": "1543219871"}],  # fictitious NPI with a valid Luhn check digit
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov",
                              "display": "Healthcare Provider"}]}],  # fmt: skip
        "name": "Harbor Family Health (sandbox)",
        "telecom": [{"system": "phone", "value": "555-0100", "use": "work"}],
        "address": [{"line": ["1 Harbor Way"], "city": "Boston", "state": "MA", "postalCode": "02110", "country": "US"}],
    }
    out: list[dict] = [org]
    for user in DEMO_USERS:
        pid = user["fhirUser"].split("/")[1]
        role_id = user["practitionerRole"].split("/")[1]
        out.append({
            "resourceType": "Practitioner",
            "id": pid,
            "meta": {"profile": [US_CORE + "us-core-practitioner"]},
            "identifier": [{"system": NPI, "value": user["npi"]}],
            "active": True,
            "name": [{"use": "official", "family": user["family"], "given": [user["given"]],
                      **({"suffix": [user["suffix"]]} if user.get("suffix") else {})}],
            "telecom": [{"system": "email", "value": f"{user['id']}@sandbox.fhir-massage.dev", "use": "work"}],
        })  # fmt: skip
        taxonomy = C.coding(C.NUCC, user["taxonomy"], user["taxonomyDisplay"])
        out.append({
            "resourceType": "PractitionerRole",
            "id": role_id,
            "meta": {"profile": [US_CORE + "us-core-practitionerrole"]},
            "active": True,
            "practitioner": {"reference": user["fhirUser"], "display": user["name"]},
            "organization": {"reference": f"Organization/{ORG_ID}"},
            # US Core binds PractitionerRole.code and .specialty to NUCC provider taxonomy.
            "code": [{"coding": [taxonomy], "text": user["roleText"]}],
            "specialty": [{"coding": [taxonomy]}],
            "telecom": [{"system": "phone", "value": "555-0100", "use": "work"}],
        })  # fmt: skip
    return out


# Fictitious NPIs (valid Luhn check digit with the 80840 prefix, per the CMS NPI check-digit rule).
DEMO_USERS: list[dict] = [
    {
        "id": "dr-ada-grey",
        "name": "Dr. Ada Grey, MD",
        "role": "physician",
        "fhirUser": "Practitioner/dr-ada-grey",
        "practitionerRole": "PractitionerRole/dr-ada-grey-role",
        "npi": "1928374655",
        "given": "Ada",
        "family": "Grey",
        "suffix": "MD",
        "taxonomy": "207Q00000X",
        "taxonomyDisplay": "Family Medicine Physician",
        "roleText": "Family medicine physician",
    },
    {
        "id": "lmt-sam-reyes",
        "name": "Sam Reyes, LMT",
        "role": "therapist",
        "fhirUser": "Practitioner/lmt-sam-reyes",
        "practitionerRole": "PractitionerRole/lmt-sam-reyes-role",
        "npi": "1765432103",
        "given": "Sam",
        "family": "Reyes",
        "suffix": "LMT",
        "taxonomy": C.NUCC_MASSAGE_THERAPIST,
        "taxonomyDisplay": "Massage Therapist",
        "roleText": "Licensed massage therapist",
    },
    # A physician with a small panel (CARE_TEAMS): user/ scopes show only these patients, so the limit of a real
    # EHR (a clinician sees the patients they have a care relationship with) is visible and testable.
    {
        "id": "dr-lee-chen",
        "name": "Dr. Lee Chen, MD",
        "role": "physician",
        "fhirUser": "Practitioner/dr-lee-chen",
        "practitionerRole": "PractitionerRole/dr-lee-chen-role",
        "npi": "1647382914",
        "given": "Lee",
        "family": "Chen",
        "suffix": "MD",
        "taxonomy": "207R00000X",
        "taxonomyDisplay": "Internal Medicine Physician",
        "roleText": "Internal medicine physician",
    },
]

# Who may access which patient, as data: one active CareTeam per patient (built by ``care_team``) listing these
# users as participants. The sandbox's FHIR API holds user/ scopes to the patients whose active CareTeam names the
# user (or their PractitionerRole), or whose generalPractitioner the user is (fhir_massage/sandbox/service.py
# FhirService.accessible_patients). Dr. Grey and Sam Reyes are on every demo patient's team, so the demo keeps
# working for them; Dr. Chen only on two hand-made patients'. Keys are patient ids; "*" is every other patient.
CARE_TEAMS: dict[str, tuple[str, ...]] = {
    "demo-tom-becker": ("dr-ada-grey", "lmt-sam-reyes", "dr-lee-chen"),
    "demo-dana-whitfield": ("dr-ada-grey", "lmt-sam-reyes", "dr-lee-chen"),
    "*": ("dr-ada-grey", "lmt-sam-reyes"),
}

DR = "Practitioner/dr-ada-grey"


def care_team(patient_id: str, patient_name: str) -> dict:
    """The patient's CareTeam (FHIR R4 CareTeam, US Core CareTeam): status active, the users of CARE_TEAMS as
    participants, each with their PractitionerRole's NUCC taxonomy as role (US Core binds participant.role to
    Care Team Member Function, which includes the NUCC provider taxonomy)."""
    users = {u["id"]: u for u in DEMO_USERS}
    members = CARE_TEAMS.get(patient_id, CARE_TEAMS["*"])
    return {
        "resourceType": "CareTeam",
        "id": f"{patient_id}-care-team",
        "meta": {"profile": [US_CORE + "us-core-careteam"]},
        "status": "active",
        "name": f"Care team of {patient_name}",
        "subject": {"reference": f"Patient/{patient_id}", "display": patient_name},
        "participant": [{
            "role": [{"coding": [C.coding(C.NUCC, users[uid]["taxonomy"], users[uid]["taxonomyDisplay"])]}],
            "member": {"reference": users[uid]["fhirUser"], "display": users[uid]["name"]},
            "onBehalfOf": {"reference": f"Organization/{ORG_ID}"},
        } for uid in members],
        "managingOrganization": [{"reference": f"Organization/{ORG_ID}"}],
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- helpers


class _Dates:
    """Dates relative to ``today``: ``d(-3)`` is three days ago, as FHIR date strings."""

    def __init__(self, today: _dt.date):
        self.today = today

    def __call__(self, days: int) -> str:
        return (self.today + _dt.timedelta(days=days)).isoformat()


def _cc(*codings: dict, text: str | None = None) -> dict:
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = list(codings)
    if text:
        out["text"] = text
    return out


def _icd(code: str, display: str) -> dict:
    return C.coding(C.ICD10CM, code, display)


def _sct(code: str, display: str) -> dict:
    return C.coding(C.SNOMED, code, display)


def _loinc(code: str, display: str) -> dict:
    return C.coding(C.LOINC, code, display)


def _patient(pid: str, given: str, family: str, gender: str, birth: str, mrn: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"profile": [US_CORE + "us-core-patient"]},
        "identifier": [{
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                                 "display": "Medical record number"}]},
            "system": MRN_SYSTEM,
            "value": mrn,
        }],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": "555-0142", "use": "mobile"}],
        "gender": gender,
        "birthDate": birth,
        "address": [{"use": "home", "city": "Boston", "state": "MA", "postalCode": "02118", "country": "US"}],
        "generalPractitioner": [{"reference": DR, "display": "Dr. Ada Grey, MD"}],
        "managingOrganization": {"reference": f"Organization/{ORG_ID}"},
    }  # fmt: skip


def _condition(pid: str, rid: str, code: dict, onset: str, *, clinical: str | None = "active",
               verification: str = "confirmed", body_site: dict | None = None, abatement: str | None = None,
               recorded: str | None = None, note: str | None = None) -> dict:  # fmt: skip
    """A US Core problem-list Condition. ``clinical=None`` omits clinicalStatus (required for entered-in-error:
    R4 invariant con-5 forbids clinicalStatus when verificationStatus is entered-in-error)."""
    r: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"{pid}-{rid}",
        "meta": {"profile": [US_CORE + "us-core-condition-problems-health-concerns"]},
    }
    if clinical:
        r["clinicalStatus"] = _cc(C.coding(C.CONDITION_CLINICAL, clinical))
    r["verificationStatus"] = _cc(C.coding(C.CONDITION_VER_STATUS, verification))
    r["category"] = [_cc(C.coding(C.CONDITION_CATEGORY, "problem-list-item", "Problem List Item"))]
    r["code"] = code
    if body_site:
        r["bodySite"] = [body_site]
    r["subject"] = {"reference": f"Patient/{pid}"}
    r["onsetDateTime"] = onset
    if abatement:
        r["abatementDateTime"] = abatement
    r["recordedDate"] = recorded or onset
    r["recorder"] = {"reference": DR}
    if note:
        r["note"] = [{"text": note}]
    return r


def _obs(pid: str, rid: str, code: dict, when: str, category: str, **value: Any) -> dict:
    cat_display = {"vital-signs": "Vital Signs", "laboratory": "Laboratory", "social-history": "Social History"}
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"{pid}-{rid}",
        "status": "final",
        "category": [_cc(C.coding(C.OBSERVATION_CATEGORY, category, cat_display[category]))],
        "code": code,
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
    }
    r.update(value)
    return r


def _qty(value: float, unit: str, ucum: str | None = None) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": ucum or unit}


def _temp(pid: str, rid: str, when: str, celsius: float) -> dict:
    r = _obs(pid, rid, _cc(_loinc("8310-5", "Body temperature"), text="Temperature"), when, "vital-signs",
             valueQuantity=_qty(celsius, "Cel"))  # fmt: skip
    r["meta"] = {"profile": ["http://hl7.org/fhir/StructureDefinition/bodytemp"]}
    return r


def _bp(pid: str, rid: str, when: str, systolic: int, diastolic: int) -> dict:
    r = _obs(pid, rid, _cc(_loinc("85354-9", "Blood pressure panel with all children optional"),
                           text="Blood pressure"), when, "vital-signs")  # fmt: skip
    r["meta"] = {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]}
    r["component"] = [
        {"code": _cc(_loinc("8480-6", "Systolic blood pressure")), "valueQuantity": _qty(systolic, "mm[Hg]")},
        {"code": _cc(_loinc("8462-4", "Diastolic blood pressure")), "valueQuantity": _qty(diastolic, "mm[Hg]")},
    ]
    return r


def _platelets(pid: str, rid: str, when: str, thousands_per_ul: float) -> dict:
    r = _obs(pid, rid, _cc(_loinc("777-3", "Platelets [#/volume] in Blood by Automated count"), text="Platelets"),
             when, "laboratory", valueQuantity=_qty(thousands_per_ul, "10*3/uL"))  # fmt: skip
    r["referenceRange"] = [{"low": _qty(150, "10*3/uL"), "high": _qty(400, "10*3/uL")}]
    if thousands_per_ul < 150:
        r["interpretation"] = [_cc(C.coding("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                            "L", "Low"))]  # fmt: skip
    return r


def _med_request(pid: str, rid: str, rxnorm: str, display: str, authored: str, *, reason: str | None = None,
                 dosage: str, status: str = "active") -> dict:  # fmt: skip
    r: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": f"{pid}-{rid}",
        "meta": {"profile": [US_CORE + "us-core-medicationrequest"]},
        "status": status,
        "intent": "order",
        "category": [_cc(C.coding("http://terminology.hl7.org/CodeSystem/medicationrequest-category", "outpatient",
                                  "Outpatient"))],  # fmt: skip
        "medicationCodeableConcept": _cc(C.coding(C.RXNORM, rxnorm, display), text=display),
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": authored,
        "requester": {"reference": DR, "display": "Dr. Ada Grey, MD"},
        "dosageInstruction": [{"text": dosage}],
    }
    if reason:
        r["reasonReference"] = [{"reference": f"Condition/{pid}-{reason}"}]
    return r


# --------------------------------------------------------------------------------------------- hand-made patients
# Each builder returns the patient's resources for a given today. Body sites: SNOMED lateralized structures
# (48979004 "Structure of left lower leg", 64262003 "Structure of right forearm": DICOM/SNOMED body-site lists
# seen in several public FHIR IGs) or the reference's body-site table (fhir-modelling.md) plus laterality text.


def _dana(d: _Dates) -> list[dict]:
    pid = "demo-dana-whitfield"
    return [
        _patient(pid, "Dana", "Whitfield", "female", "1968-04-22", "SBX-1001"),
        _condition(pid, "dvt-left-leg", _cc(
            _icd("I82.402", "Acute embolism and thrombosis of unspecified deep veins of left lower extremity"),
            _sct("132281000119108", "Acute deep venous thrombosis (disorder)"),
            text="Acute DVT, left lower leg"),
            d(-10), body_site=_cc(_sct("48979004", "Structure of left lower leg"), text="Left lower leg")),
        _med_request(pid, "apixaban", "1364445", "apixaban 5 MG Oral Tablet", d(-10), reason="dvt-left-leg",
                     dosage="Take 2 tablets (10 mg) by mouth twice daily for 7 days, then 1 tablet twice daily"),
        _platelets(pid, "plt", d(-10), 231),
        _bp(pid, "bp", d(-10), 128, 82),
    ]  # fmt: skip


def _maria(d: _Dates) -> list[dict]:
    pid = "demo-maria-santos"
    edd = d(16 * 7)  # 24 weeks pregnant today: second trimester, matching O09.92
    preg_status = _obs(pid, "pregnancy-status", _cc(_loinc("82810-3", "Pregnancy status"), text="Pregnancy status"),
                       d(-7), "social-history",
                       valueCodeableConcept=_cc(_sct("77386006", "Pregnant"), text="Pregnant"))  # fmt: skip
    preg_status["meta"] = {"profile": [US_CORE + "us-core-observation-pregnancystatus"]}
    return [
        _patient(pid, "Maria", "Santos", "female", "1985-09-03", "SBX-1002"),
        _condition(pid, "high-risk-pregnancy", _cc(
            _icd("O09.92", "Supervision of high risk pregnancy, unspecified, second trimester"),
            _sct("47200007", "High risk pregnancy (finding)"),
            text="High-risk pregnancy, 2nd trimester"), d(-154), recorded=d(-120)),
        preg_status,
        _obs(pid, "edd", _cc(_loinc("11778-8", "Delivery date Estimated"), text="Estimated due date"), d(-7),
             "social-history", valueDateTime=edd),
        _bp(pid, "bp", d(-7), 124, 78),
    ]  # fmt: skip


def _ray(d: _Dates) -> list[dict]:
    pid = "demo-ray-okafor"
    return [
        _patient(pid, "Ray", "Okafor", "male", "1990-01-15", "SBX-1003"),
        # ICD-10-CM only, as many EHR problem lists send it.
        _condition(pid, "laceration-right-forearm", _cc(
            _icd("S51.811A", "Laceration without foreign body of right forearm, initial encounter"),
            text="Laceration of right forearm"),
            d(-2), body_site=_cc(_sct("64262003", "Structure of right forearm"), text="Right forearm")),
        # SNOMED only; the 2nd-degree burn code and display as they appear in the Synthea data.
        _condition(pid, "burn-left-hand", _cc(_sct("403191005", "Second degree burn"),
                                              text="Second-degree burn, back of left hand"),
                   d(-3), body_site=_cc(_sct("85562004", "Hand"), text="Left hand")),
        _temp(pid, "temp", d(-2), 36.9),
        # For information only (it never changes the verdict): the therapist uses latex-free gloves.
        {"resourceType": "AllergyIntolerance", "id": f"{pid}-latex-allergy",
         "clinicalStatus": _cc(C.coding("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                        "active")),
         "verificationStatus": _cc(C.coding(
             "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed")),
         "type": "allergy", "category": ["environment"],
         "code": _cc(_sct("111088007", "Latex (substance)"), text="Latex"),
         "patient": {"reference": f"Patient/{pid}"}, "recordedDate": d(-400),
         "reaction": [{"manifestation": [_cc(text="Hives")]}]},
    ]  # fmt: skip


def _eleanor(d: _Dates) -> list[dict]:
    pid = "demo-eleanor-price"
    return [
        _patient(pid, "Eleanor", "Price", "female", "1944-11-30", "SBX-1004"),
        # ICD-10-CM written without the dot, as some EHR interfaces send it.
        _condition(pid, "osteoporosis-vertebral-fracture", _cc(
            _icd("M8008XA", "Age-related osteoporosis with current pathological fracture, vertebra(e), "
                            "initial encounter for fracture"),
            _sct("443165006", "Pathological fracture due to osteoporosis (disorder)"),
            text="Osteoporotic compression fracture, T12"),
            d(-45), body_site=_cc(_sct("122495006", "Thoracic spine"), text="Thoracic spine (T12)")),
        _condition(pid, "osteoporosis", _cc(_sct("64859006", "Osteoporosis (disorder)"), text="Osteoporosis"),
                   d(-3650)),
        _bp(pid, "bp", d(-14), 136, 80),
    ]  # fmt: skip


def _frank(d: _Dates) -> list[dict]:
    pid = "demo-frank-delgado"
    return [
        _patient(pid, "Frank", "Delgado", "male", "1957-06-08", "SBX-1005"),
        _condition(pid, "thrombocytopenia", _cc(
            _icd("D69.6", "Thrombocytopenia, unspecified"),
            _sct("302215000", "Thrombocytopenic disorder (disorder)"),
            text="Thrombocytopenia"), d(-20)),
        _platelets(pid, "plt-old", d(-60), 142),
        _platelets(pid, "plt", d(-1), 38),
        _temp(pid, "temp-old", d(-30), 36.7),
        _temp(pid, "temp", d(0), 38.9),
        _bp(pid, "bp", d(0), 122, 74),
    ]  # fmt: skip


def _helen(d: _Dates) -> list[dict]:
    pid = "demo-helen-brooks"
    return [
        _patient(pid, "Helen", "Brooks", "female", "1961-02-17", "SBX-1006"),
        # Free text only, as typed into a problem list: nothing to match, so screening must ask for review.
        _condition(pid, "text-only-clot", _cc(text="hx of blood clot in leg"), d(-400)),
        # Charted on the wrong patient and retracted: clinicalStatus absent (R4 con-5).
        _condition(pid, "dvt-entered-in-error", _cc(
            _icd("I82.402", "Acute embolism and thrombosis of unspecified deep veins of left lower extremity"),
            _sct("132281000119108", "Acute deep venous thrombosis (disorder)"),
            text="Acute DVT, left lower leg"),
            d(-30), clinical=None, verification="entered-in-error",
            body_site=_cc(_sct("48979004", "Structure of left lower leg"), text="Left lower leg"),
            note="Entered on the wrong chart; see the correct patient's record."),
        # Suspected PE ruled out by CT pulmonary angiogram. clinicalStatus is left "active", as many EHRs leave it:
        # the verificationStatus is what says it never was.
        _condition(pid, "pe-refuted", _cc(
            _icd("I26.99", "Other pulmonary embolism without acute cor pulmonale"),
            _sct("59282003", "Pulmonary embolism (disorder)"), text="Pulmonary embolism"),
            d(-21), verification="refuted", note="CT pulmonary angiogram negative."),
        _condition(pid, "seasonal-allergy", _cc(
            _icd("J30.2", "Other seasonal allergic rhinitis"),
            _sct("367498001", "Seasonal allergic rhinitis"), text="Seasonal allergies"), d(-2000)),
        _bp(pid, "bp", d(-21), 118, 76),
        _temp(pid, "temp", d(-21), 36.8),
    ]  # fmt: skip


def _tom(d: _Dates) -> list[dict]:
    pid = "demo-tom-becker"
    return [
        _patient(pid, "Tom", "Becker", "male", "1979-07-04", "SBX-1007"),
        _condition(pid, "seasonal-allergy", _cc(
            _icd("J30.2", "Other seasonal allergic rhinitis"),
            _sct("367498001", "Seasonal allergic rhinitis"), text="Seasonal allergic rhinitis"), d(-3000)),
        # The reason for the massage referral: an indication, not a contraindication.
        _condition(pid, "low-back-pain", _cc(
            _icd("M54.50", "Low back pain, unspecified"),
            _sct("278860009", "Chronic low back pain (finding)"), text="Chronic low back pain"), d(-200),
            body_site=_cc(_sct("37822005", "Lower back structure"), text="Lower back")),
        _bp(pid, "bp", d(-5), 118, 76),
        _temp(pid, "temp", d(-5), 36.8),
        _platelets(pid, "plt", d(-90), 250),
    ]  # fmt: skip


# (patient id, name, birthDate, gender, builder, story) in display order. The stories are what the screen should
# show; they are the picker's one-liners and the tests' checklist.
HAND_MADE: list[tuple[str, str, str, str, Callable[[_Dates], list[dict]], str]] = [
    ("demo-tom-becker", "Tom Becker", "1979-07-04", "male", _tom,
     "Clear: seasonal allergies and chronic low back pain (the indication), normal vitals and platelets."),
    ("demo-dana-whitfield", "Dana Whitfield", "1968-04-22", "female", _dana,
     "Acute DVT of the left lower leg (I82.402 + SNOMED, 10 days) on apixaban 5 mg (RxNorm product): "
     "no massage of the left leg, anticoagulant limits elsewhere."),
    ("demo-maria-santos", "Maria Santos", "1985-09-03", "female", _maria,
     "High-risk pregnancy (O09.92), pregnancy status 'Pregnant', EDD in 16 weeks (24 weeks, 2nd trimester): "
     "defer until obstetric clearance."),
    ("demo-ray-okafor", "Ray Okafor", "1990-01-15", "male", _ray,
     "Laceration of the right forearm 2 days ago (ICD-10-CM only) and a 3-day-old second-degree burn of the "
     "left hand: avoid both sites, treat elsewhere; a latex allergy shows as information (latex-free gloves)."),
    ("demo-eleanor-price", "Eleanor Price", "1944-11-30", "female", _eleanor,
     "Severe osteoporosis with a current vertebral fracture (M8008XA, no dot): no deep pressure on spine, ribs "
     "or hips, no joint mobilization."),
    ("demo-frank-delgado", "Frank Delgado", "1957-06-08", "male", _frank,
     "Fever 38.9 °C today and platelets 38 ×10³/µL yesterday (thrombocytopenia D69.6): defer massage today."),
    ("demo-helen-brooks", "Helen Brooks", "1961-02-17", "female", _helen,
     "Needs review: text-only 'hx of blood clot in leg'; a DVT entered in error and a refuted PE must not count."),
]  # fmt: skip


# --------------------------------------------------------------------------------------------- Synthea


@functools.lru_cache(maxsize=1)
def _manifest_text() -> str:
    return resources.files(__package__).joinpath("synthea/manifest.json").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _synthea_text(file: str) -> str:
    return resources.files(__package__).joinpath(f"synthea/{file}").read_text(encoding="utf-8")


def synthea_manifest() -> list[dict]:
    """The trimmed Synthea files: file, source, patientId, name, gender, birthDate, resourceCounts and the
    notable episodes (kind, code, system, display, onset/abatement or first/last dates, resourceId)."""
    return json.loads(_manifest_text())


def synthea_bundle(name_or_id: str) -> dict:
    """One trimmed Synthea transaction Bundle (a fresh copy), by display name ("Sana Keeling"), file name
    ("Sana_Keeling.json" or "Sana_Keeling") or Patient id. Raises KeyError for an unknown patient."""
    key = name_or_id.strip().lower()
    for item in synthea_manifest():
        if key in {item["name"].lower(), item["file"].lower(), item["file"][:-5].lower(), item["patientId"]}:
            return json.loads(_synthea_text(item["file"]))
    raise KeyError(f"no Synthea demo patient named {name_or_id!r}")


# What each Synthea patient shows today (records end 2017-2026; most acute episodes are over: a test that needs
# one active chooses a "today" inside it from synthea_manifest()).
_SYNTHEA_STORIES: dict[str, str] = {
    "Leonor Lucio": "History of acute pulmonary embolism (May 2021, enoxaparin); chronic neck and low-back pain.",
    "Sana Keeling": "History of acute DVT (Nov-Dec 2020, limb not recorded, enoxaparin); past lacerations.",
    "Ali Herman": "Active prostate carcinoma in situ, prostatectomy 2020: oncology precautions.",
    "Catina Sawayn": "Active osteoporosis (since 2021): pressure caution over spine, ribs and hips.",
    "Clarine O'Keefe": "Active warfarin 5 MG Oral Tablet (RxNorm 855332, a product code): anticoagulant limits.",
    "Dirk Kuhlman": "Rotator cuff injury 2020-21, resolved: nothing to avoid today.",
    "Jacki Feil": "Chronic pain (an indication): nothing to avoid.",
    "Karla Kessler": "Ankle sprain still 'active' since 2021 (never closed): local caution, stale-data warning.",
    "Lonnie Von": "Osteoporosis with an active pathological fracture: severe-osteoporosis caution.",
    "Luis Miguel Delarosa": "Active colon cancer, partial colectomy March 2021: oncology precautions.",
    "Marc Corkery": "Second-degree burn Jan-Feb 2021, resolved: clear today; active if today is inside the episode.",
    "Nereida Rogahn": "Normal pregnancy recorded active since 2021-03-21 (never closed): pregnancy, stale data.",
    "Stephen McLaughlin": "Ankle sprain Feb-Mar 2021, resolved: clear today.",
    "Suzi Bechtelar": "Primary fibromyalgia (an indication); four past pregnancies: clear today.",
    "Tommy Friesen": "Chronic congestive heart failure: no lymphatic drainage, upright positioning.",
}


def _synthea_patients() -> list[dict]:
    out = []
    for item in synthea_manifest():
        out.append({
            "id": item["patientId"],
            "name": item["name"],
            "birthDate": item["birthDate"],
            "gender": item["gender"],
            "story": _SYNTHEA_STORIES.get(item["name"], "Synthea patient."),
            "source": "synthea",
        })  # fmt: skip
    return out


DEMO_PATIENTS: list[dict] = [
    {"id": pid, "name": name, "birthDate": birth, "gender": gender, "story": story, "source": "hand-made"}
    for pid, name, birth, gender, _builder, story in HAND_MADE
] + _synthea_patients()


# --------------------------------------------------------------------------------------------- bundles


def _transaction(resources_: list[dict]) -> dict:
    entries = []
    for r in resources_:
        rid = r["id"]
        try:
            full_url = f"urn:uuid:{uuid.UUID(rid)}"
        except ValueError:
            full_url = "urn:uuid:" + str(uuid.uuid5(_NS, r["resourceType"] + "/" + rid))
        entries.append({"fullUrl": full_url, "resource": r,
                        "request": {"method": "PUT", "url": f"{r['resourceType']}/{rid}"}})  # fmt: skip
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def hand_made_resources(patient_id: str, today: _dt.date) -> list[dict]:
    """The clinical resources of one hand-made patient for ``today`` (for tests that want plain lists; the
    CareTeam, who may access the patient, is ``care_team``)."""
    for pid, _name, _birth, _gender, builder, _story in HAND_MADE:
        if pid == patient_id:
            return builder(_Dates(today))
    raise KeyError(f"no hand-made demo patient {patient_id!r}")


def _with_care_team(bundle: dict, patient_id: str, name: str) -> dict:
    team = care_team(patient_id, name)
    bundle["entry"].append({
        "fullUrl": "urn:uuid:" + str(uuid.uuid5(_NS, "CareTeam/" + team["id"])),
        "resource": team,
        "request": {"method": "PUT", "url": f"CareTeam/{team['id']}"},
    })  # fmt: skip
    return bundle


def demo_bundles(today: _dt.date) -> list[dict]:
    """All demo data as FHIR R4 transaction Bundles of PUTs with fixed ids: the organization and users first
    (patients reference them), then one Bundle per hand-made patient, then one per Synthea patient; each patient's
    Bundle ends with its CareTeam (CARE_TEAMS: who may access the patient)."""
    if not isinstance(today, _dt.date):
        raise TypeError("today must be a datetime.date")
    if isinstance(today, _dt.datetime):
        today = today.date()
    d = _Dates(today)
    bundles = [_transaction(_user_resources())]
    bundles += [_transaction(builder(d) + [care_team(pid, name)]) for pid, name, _b, _g, builder, _s in HAND_MADE]
    # The Synthea files stay as trimmed; each patient's CareTeam (who may access it) is added here.
    bundles += [_with_care_team(json.loads(_synthea_text(item["file"])), item["patientId"], item["name"])
                for item in synthea_manifest()]
    return bundles  # fresh objects on every call: callers may mutate them
