"""SMART scope parsing, narrowing and permissions (fhir_massage.sandbox.scopes), one row per rule of SMART 2.2 SC."""

import pytest

from fhir_massage.sandbox.scopes import grant_scopes, parse_resource_scope, permissions


@pytest.mark.parametrize(
    "scope, expected",
    [
        pytest.param("patient/Condition.rs", ("patient", "Condition", "rs", "v2"), id="v2 read+search"),
        pytest.param("user/*.cruds", ("user", "*", "cruds", "v2"), id="v2 wildcard all letters"),
        pytest.param("patient/*.read", ("patient", "*", "rs", "v1"), id="v1 read is rs"),
        pytest.param("patient/ServiceRequest.write", ("patient", "ServiceRequest", "cud", "v1"), id="v1 write is cud"),
        pytest.param("user/*.*", ("user", "*", "cruds", "v1"), id="v1 star is cruds"),
        pytest.param("patient/Condition.sr", None, id="letters out of order are malformed"),
        pytest.param("patient/Condition.rr", None, id="repeated letter is malformed"),
        pytest.param("patient/Condition.x", None, id="unknown letter"),
        pytest.param("patient/condition.rs", None, id="type must be capitalised"),
        pytest.param("openid", None, id="not a resource scope"),
        pytest.param("patient/Condition.", None, id="no permission"),
    ],
)
def test_parse_resource_scope(scope, expected):
    got = parse_resource_scope(scope)
    if expected is None:
        assert got is None
    else:
        assert (got.context, got.resource_type, got.letters, got.dialect) == expected


@pytest.mark.parametrize(
    "requested, kwargs, expected",
    [
        pytest.param("launch openid patient/Condition.rs", {}, "launch openid patient/Condition.rs", id="all granted"),
        pytest.param("patient/*.read patient/Condition.rs", {"dialect": "v2"}, "patient/Condition.rs",
                     id="v2-only server drops v1 scopes (Oracle Health)"),
        pytest.param("patient/*.read patient/Condition.rs", {"dialect": "v1"}, "patient/*.read",
                     id="v1-only server drops v2 scopes"),
        pytest.param("patient/Condition.cruds", {"allowed": ["patient/*.rs"]}, "patient/Condition.rs",
                     id="letters narrowed to the allowed ones"),
        pytest.param("patient/*.rs", {"allowed": ["patient/Condition.rs", "patient/Patient.r"]},
                     "patient/Condition.rs patient/Patient.r", id="wildcard narrowed to allowed types"),
        pytest.param("patient/*.read", {"allowed": ["patient/Condition.r"]}, "",
                     id="v1 cannot spell r alone: dropped"),
        pytest.param("user/Condition.rs", {"allowed": ["patient/*.rs"]}, "", id="context must match"),
        pytest.param("openid fhirUser launch", {"allowed": ["openid", "launch"]}, "openid launch",
                     id="context scopes must be allowed verbatim"),
        pytest.param("offline_access online_access openid", {"refresh": False}, "openid",
                     id="no refresh tokens: access scopes dropped"),
        pytest.param("system/*.rs patient/Observation.rs?category=laboratory unknown", {}, "",
                     id="system, granular and unknown scopes are not granted"),
        pytest.param("patient/Condition.rs patient/Condition.rs", {}, "patient/Condition.rs", id="no duplicates"),
    ],
)
def test_grant_scopes(requested, kwargs, expected):
    assert " ".join(grant_scopes(requested.split(), **kwargs)) == expected


def test_permissions_map_letters_to_interactions():
    perms, has_patient, has_user = permissions(["patient/Condition.rs", "patient/Procedure.cu", "user/*.read",
                                                "openid"])
    assert perms["Condition"] == {"read", "vread", "history", "search"}
    assert perms["Procedure"] == {"create", "update"}
    assert perms["*"] == {"read", "vread", "history", "search"}
    assert "delete" not in perms["Procedure"]
    assert has_patient and has_user


def test_permissions_without_resource_scopes_are_empty():
    assert permissions(["openid", "fhirUser", "launch"]) == ({}, False, False)
