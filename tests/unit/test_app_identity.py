"""Role and banner from FHIR dicts (smart_app/identity.py)."""

from __future__ import annotations

import pytest

from smart_app import identity

NUCC = "http://nucc.org/provider-taxonomy"


def role(*codings, field="code"):
    return {"resourceType": "PractitionerRole", field: [{"coding": list(codings)}]}


@pytest.mark.parametrize("user,practitioner,roles,expected", [
    pytest.param("Practitioner/1", None, [role({"system": NUCC, "code": "225700000X"})], "therapist",
                 id="NUCC massage therapist in code"),
    pytest.param("Practitioner/1", None, [role({"system": NUCC, "code": "225700000X"}, field="specialty")],
                 "therapist", id="NUCC massage therapist in specialty"),
    pytest.param("Practitioner/1", None, [role({"system": NUCC, "code": "207Q00000X"})], "physician",
                 id="NUCC family medicine physician"),
    pytest.param("Practitioner/1", None, [role({"system": "http://terminology.hl7.org/CodeSystem/practitioner-role",
                                                "code": "doctor"})], "physician", id="HL7 practitioner-role doctor"),
    pytest.param("Practitioner/1", {"qualification": [{"code": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0360|2.7", "code": "DO"}]}}]}, [], "physician",
                 id="qualification DO with versioned system"),
    pytest.param("Practitioner/1", {"qualification": [{"code": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0360", "code": "RN"}]}}]}, [], None,
                 id="nurse qualification: ask"),
    pytest.param("Practitioner/1", None, [role({"system": NUCC, "code": "225700000X"}),
                                          role({"system": NUCC, "code": "207Q00000X"})], None,
                 id="both roles: ask"),
    pytest.param("Practitioner/1", None, [dict(role({"system": NUCC, "code": "225700000X"}), active=False)], None,
                 id="inactive role ignored"),
    pytest.param("Practitioner/1", {}, [], None, id="bare practitioner: ask"),
    pytest.param("Patient/1", None, [], None, id="patient user: ask"),
    pytest.param(None, None, [], None, id="no user: ask"),
    pytest.param("Practitioner/1", None, [{"code": "garbage"}, "junk"], None, id="malformed data tolerated"),
])
def test_guess_role(user, practitioner, roles, expected):
    assert identity.guess_role(user, practitioner, roles).role == expected


def test_banner():
    b = identity.banner({"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1960",
                         "name": [{"use": "old", "family": "Old"}, {"use": "official", "family": "Smith",
                                                                     "given": ["Jo", "Ann"]}],
                         "identifier": [{"value": "x"}, {"type": {"coding": [
                             {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                             "value": "MRN1"}]})
    assert b == {"id": "p", "name": "Jo Ann Smith", "birth_date": "1960", "gender": "Female", "mrn": "MRN1"}
    assert identity.banner({"resourceType": "Patient"})["name"] == "Name not recorded"
    assert identity.banner({"resourceType": "Practitioner"}) is None
    assert identity.banner(None) is None
