"""Pure helpers: who the signed-in user is (role), and the patient banner, from plain FHIR dicts.

Tolerant by design (house style): odd data gives ``None`` or an empty value, never an exception.

Role rules (issue 3 §3):
* massage therapist: NUCC Health Care Provider Taxonomy ``225700000X`` ("Massage Therapist") in
  PractitionerRole.code or PractitionerRole.specialty (or, failing a role, in Practitioner.qualification.code);
* physician: a NUCC code of the "Allopathic & Osteopathic Physicians" grouping (codes 207*/208*) in
  PractitionerRole.code/.specialty, the HL7 practitioner-role code ``doctor``, SNOMED 309343006 "Physician" /
  158965000 "Medical practitioner", or a Practitioner.qualification MD or DO (HL7 v2 table 0360, Degree/License);
* anything else, or both at once: unknown, and the app asks the user once per launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from fhir_massage.codes import NUCC, NUCC_MASSAGE_THERAPIST, SNOMED, codings

PHYSICIAN = "physician"
THERAPIST = "therapist"
ROLES = (PHYSICIAN, THERAPIST)
ROLE_LABELS = {PHYSICIAN: "Physician", THERAPIST: "Massage therapist"}

PRACTITIONER_ROLE_CS = "http://terminology.hl7.org/CodeSystem/practitioner-role"
V2_0360 = "http://terminology.hl7.org/CodeSystem/v2-0360"  # also seen with a "|2.7" version suffix
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_PHYSICIAN_SNOMED = {"309343006", "158965000"}


@dataclass(frozen=True)
class RoleGuess:
    role: str | None  # PHYSICIAN, THERAPIST or None (ask)
    source: str  # what it was decided from, shown to the user ("PractitionerRole code", ...)


def _concepts(resource: Mapping[str, Any] | None, *fields: str) -> Iterable[Any]:
    for name in fields:
        value = (resource or {}).get(name)
        if isinstance(value, list):
            yield from value
        elif isinstance(value, dict):
            yield value


def _roles_in(concepts: Iterable[Any]) -> set[str]:
    found: set[str] = set()
    for concept in concepts:
        for c in codings(concept):
            system = str(c.get("system") or "").split("|")[0]
            code = str(c.get("code") or "")
            if system == NUCC and code == NUCC_MASSAGE_THERAPIST:
                found.add(THERAPIST)
            elif system == NUCC and code.startswith(("207", "208")):
                found.add(PHYSICIAN)
            elif system == PRACTITIONER_ROLE_CS and code == "doctor":
                found.add(PHYSICIAN)
            elif system == SNOMED and code in _PHYSICIAN_SNOMED:
                found.add(PHYSICIAN)
            elif system == V2_0360 and code in ("MD", "DO"):
                found.add(PHYSICIAN)
    return found


def guess_role(user_ref: str | None, practitioner: Mapping[str, Any] | None,
               roles: Iterable[Mapping[str, Any]] = ()) -> RoleGuess:
    if not user_ref or not user_ref.startswith(("Practitioner/", "PractitionerRole/")):
        return RoleGuess(None, "the EHR did not name a practitioner")
    from_roles: set[str] = set()
    for role in roles:
        if isinstance(role, Mapping) and role.get("active", True) is not False:
            from_roles |= _roles_in(_concepts(role, "code", "specialty"))
    if len(from_roles) == 1:
        return RoleGuess(next(iter(from_roles)), "PractitionerRole")
    if len(from_roles) > 1:
        return RoleGuess(None, "the EHR lists more than one role")
    quals = [q.get("code") for q in (practitioner or {}).get("qualification") or [] if isinstance(q, Mapping)]
    from_quals = _roles_in(quals)
    if len(from_quals) == 1:
        return RoleGuess(next(iter(from_quals)), "Practitioner qualification")
    return RoleGuess(None, "the EHR gave no role for this user")


def human_name(resource: Mapping[str, Any] | None) -> str | None:
    """The ``official`` (else ``usual``, else first) HumanName as display text."""
    names = [n for n in (resource or {}).get("name") or [] if isinstance(n, Mapping)]
    if not names:
        return None
    chosen = next((n for n in names if n.get("use") == "official"), None) or \
        next((n for n in names if n.get("use") == "usual"), None) or names[0]
    if isinstance(chosen.get("text"), str) and chosen["text"].strip():
        return chosen["text"].strip()
    given = " ".join(str(x) for x in chosen.get("given") or [] if isinstance(x, str))
    family = chosen.get("family") if isinstance(chosen.get("family"), str) else ""
    prefix = " ".join(str(x) for x in chosen.get("prefix") or [] if isinstance(x, str))
    text = " ".join(p for p in (prefix, given, family) if p)
    return text or None


def mrn(patient: Mapping[str, Any] | None) -> str | None:
    """The medical record number: identifier with type v2-0203 ``MR`` (US Core Patient convention)."""
    for ident in (patient or {}).get("identifier") or []:
        if not isinstance(ident, Mapping) or not isinstance(ident.get("value"), str):
            continue
        for c in codings(ident.get("type")):
            if str(c.get("system") or "").split("|")[0] == V2_0203 and c.get("code") == "MR":
                return ident["value"]
    return None


_GENDER = {"male": "Male", "female": "Female", "other": "Other", "unknown": "Unknown"}


def banner(patient: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The patient banner facts (SC need_patient_banner): name, birth date, sex, MRN. Plain strings; the template
    escapes them (a name is EHR text, never markup)."""
    if not isinstance(patient, Mapping) or patient.get("resourceType") != "Patient":
        return None
    birth = patient.get("birthDate") if isinstance(patient.get("birthDate"), str) else None
    return {
        "id": patient.get("id") if isinstance(patient.get("id"), str) else None,
        "name": human_name(patient) or "Name not recorded",
        "birth_date": birth,
        "gender": _GENDER.get(str(patient.get("gender") or ""), "Not recorded"),
        "mrn": mrn(patient),
    }
