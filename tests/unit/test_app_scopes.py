"""Granted scopes → what the app may do (SC "Scopes for requesting FHIR Resources", v1 and v2; reference row 26)."""

from __future__ import annotations

import pytest

from fhir_massage import smart

CASES = [
    # (granted, resource, action, expected) -- id says why
    pytest.param("patient/ServiceRequest.crus", "ServiceRequest", "create", True, id="v2 c grants create"),
    pytest.param("patient/ServiceRequest.rs", "ServiceRequest", "create", False, id="v2 read-only: no create"),
    pytest.param("patient/ServiceRequest.rs", "ServiceRequest", "read", True, id="v2 rs grants read"),
    pytest.param("user/*.cruds", "Procedure", "create", True, id="v2 wildcard type"),
    pytest.param("patient/*.read", "Condition", "search", True, id="v1 read = rs"),
    pytest.param("patient/*.read", "Procedure", "create", False, id="v1 read: no create"),
    pytest.param("patient/Procedure.write", "Procedure", "create", True, id="v1 write = cud"),
    pytest.param("patient/Procedure.write", "Procedure", "read", False, id="v1 write alone cannot read"),
    pytest.param("patient/Procedure.*", "Procedure", "delete", True, id="v1 star = cruds"),
    pytest.param("patient/Procedure.c patient/Procedure.u", "Procedure", "cu", True, id="split grants combine"),
    pytest.param("patient/Procedure.c", "Procedure", "cu", False, id="letters all needed"),
    pytest.param("patient/Observation.rs?category=vital-signs", "Observation", "read", True, id="granular counts"),
    pytest.param("patient/Procedure.sc", "Procedure", "create", False, id="letters out of order are invalid"),
    pytest.param("launch openid fhirUser", "Patient", "read", False, id="context scopes grant no data"),
    pytest.param("", "Patient", "read", False, id="empty grant"),
    pytest.param("patient/Condition.rs", "Procedure", "read", False, id="other type"),
]


@pytest.mark.parametrize("granted,rtype,action,expected", CASES)
def test_can(granted, rtype, action, expected):
    assert smart.Scopes.parse(granted).can(rtype, action) is expected


def test_filtered_and_missing():
    s = smart.Scopes.parse("patient/Observation.rs?category=laboratory launch")
    assert s.filtered("Observation") and not s.filtered("Condition")
    assert s.missing("launch openid patient/Observation.rs") == ["openid", "patient/Observation.rs"]
    assert "launch" in s


def test_unknown_action_is_a_programming_error():
    with pytest.raises(ValueError):
        smart.Scopes.parse("patient/*.cruds").can("Patient", "frobnicate")


@pytest.mark.parametrize("caps,pref,expected", [
    ({"permission-v2"}, "auto", "v2"),
    ({"permission-v1"}, "auto", "v1"),
    ({"permission-v1", "permission-v2"}, "auto", "v2"),
    (set(), "auto", "v1"),
    ({"permission-v2"}, "v1", "v1"),
])
def test_choose_dialect(caps, pref, expected):
    assert smart.choose_dialect(pref, caps) == expected


def test_default_scopes_v1_and_v2():
    v2 = smart.default_scopes("v2", standalone=False, capabilities={"permission-online"}).split()
    assert v2[:3] == ["launch", "openid", "fhirUser"] and "online_access" in v2
    assert "patient/ServiceRequest.crus" in v2 and "user/PractitionerRole.rs" in v2
    v1 = smart.default_scopes("v1", standalone=True, capabilities={"permission-offline"}).split()
    assert v1[0] == "launch/patient" and "offline_access" in v1 and "online_access" not in v1
    assert "patient/ServiceRequest.write" in v1 and "patient/Condition.read" in v1
    assert "patient/Condition.write" not in v1  # least privilege (AL step 4)
    assert smart.standalone_scopes("launch openid launch/patient x") == "openid launch/patient x"


@pytest.mark.parametrize("value,expected", [
    ("Practitioner/123", "Practitioner/123"),
    ("https://ehr.example.org/fhir/Practitioner/123", "Practitioner/123"),
    ("https://ehr.example.org/fhir/PractitionerRole/r-1/_history/2", "PractitionerRole/r-1"),
    ("https://other.example.org/fhir/Practitioner/123", None),
    ("https://ehr.example.org/fhirx/Practitioner/123", None),
    ("Observation/1", None),
    ("", None),
    (None, None),
])
def test_fhir_user_reference(value, expected):
    assert smart.fhir_user_reference(value, "https://ehr.example.org/fhir") == expected
