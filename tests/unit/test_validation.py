"""fhir_massage.validation against the committed package: examples pass, broken resources fail with precise paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from fhir_massage import codes
from fhir_massage.validation import (
    INVARIANTS,
    Issue,
    PACKAGE_DIR,
    errors,
    is_valid,
    profile_urls,
    validate_against_profiles,
    validate_resource,
    valueset_contains,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "profiles" / "examples"
P = f"{codes.CANONICAL_BASE}/StructureDefinition/"


def load(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def package_resource(name: str) -> dict[str, Any]:
    return json.loads((PACKAGE_DIR / name).read_text(encoding="utf-8"))


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_example_is_valid(name: str) -> None:
    issues = validate_resource(load(name))
    assert errors(issues) == []
    assert [i for i in issues if i.severity == "warning"] == []


@pytest.mark.parametrize("name", [n for n in EXAMPLE_FILES if not n.startswith("Bundle-")])
def test_every_example_declares_one_of_our_profiles(name: str) -> None:
    res = load(name)
    declared = res["meta"]["profile"]
    assert any(u in profile_urls()[res["resourceType"]] for u in declared)


def test_every_profile_has_an_example() -> None:
    declared = {u for n in EXAMPLE_FILES for u in (load(n).get("meta") or {}).get("profile", [])}
    ours = {u for urls in profile_urls().values() for u in urls}
    assert ours == declared
    assert len(ours) == 7


def test_the_examples_in_the_package_are_the_hand_written_ones() -> None:
    for name in EXAMPLE_FILES:
        assert json.loads((PACKAGE_DIR / "example" / name).read_text()) == load(name)


def _drop(*keys: str) -> Callable[[dict], None]:
    def fn(r: dict) -> None:
        target = r
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return fn


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def fn(r: dict) -> None:
        target = r
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value

    return fn


# (id, example, mutation, path of the expected error, words the message must contain)
MUTATIONS = [
    ("order-without-subject", "ServiceRequest-massage-order-mld.json", _drop("subject"),
     "ServiceRequest.subject", "missing"),
    ("order-for-a-group-not-a-patient", "ServiceRequest-massage-order-mld.json",
     _set(("subject",), {"reference": "Group/g1"}), "ServiceRequest.subject.reference", "Patient"),
    ("unknown-technique-code", "ServiceRequest-massage-order-mld.json",
     _set(("code", "coding", 1, "code"), "reiki"), "ServiceRequest.code.coding[1]", "massage-technique#reiki"),
    ("technique-coding-missing", "ServiceRequest-massage-order-mld.json",
     lambda r: r["code"]["coding"].pop(1), "ServiceRequest.code.coding", "slice 'technique'"),
    ("cpt-coding-missing", "ServiceRequest-massage-order-mld.json",
     lambda r: r["code"]["coding"].pop(0), "ServiceRequest.code.coding", "slice 'cpt'"),
    ("cpt-code-not-a-massage-code", "ServiceRequest-massage-order-mld.json",
     _set(("code", "coding", 0, "code"), "99213"), "ServiceRequest.code.coding[0]", "massage-cpt"),
    ("order-status-not-a-request-status", "ServiceRequest-massage-order-mld.json",
     _set(("status",), "done"), "ServiceRequest.status", "request-status"),
    ("order-without-code-text", "ServiceRequest-massage-order-mld.json", _drop("code", "text"),
     "ServiceRequest.code.text", "missing"),
    ("order-category-not-physical-therapy", "ServiceRequest-massage-order-mld.json",
     _set(("category",), [{"text": "massage"}]), "ServiceRequest.category", "91251008"),
    ("sessions-counted-in-minutes", "ServiceRequest-massage-order-mld.json",
     _set(("quantityQuantity",), {"value": 12, "system": "http://unitsofmeasure.org", "code": "min"}),
     "ServiceRequest.quantityQuantity", "msr-1"),
    ("occurrence-as-a-single-date", "ServiceRequest-massage-order-mld.json",
     lambda r: (r.pop("occurrenceTiming"), r.update(occurrenceDateTime="2025-07-01")),
     "ServiceRequest.occurrenceDateTime", "not allowed"),
    ("element-from-another-fhir-version", "ServiceRequest-massage-order-mld.json",
     _set(("bodyStructure",), {"reference": "BodyStructure/b1"}), "ServiceRequest.bodyStructure", "unknown"),
    ("order-detail-code-not-in-our-code-system", "ServiceRequest-massage-order-mld.json",
     _set(("orderDetail",), [{"coding": [{"system": f"{codes.CANONICAL_BASE}/CodeSystem/massage-order-detail",
                                          "code": "pressure-hard"}]}]),
     "ServiceRequest.orderDetail[0].coding[0].code", "not a code of"),
    ("session-without-order", "Procedure-massage-session-1.json", _drop("basedOn"),
     "Procedure.basedOn", "missing"),
    ("session-status-unknown", "Procedure-massage-session-1.json", _set(("status",), "done"),
     "Procedure.status", "massage-procedure-status"),
    ("session-not-done-without-reason", "Procedure-massage-session-2-not-done.json", _drop("statusReason"),
     "Procedure.statusReason", "mpr-1"),
    ("completed-session-without-end", "Procedure-massage-session-1.json", _drop("performedPeriod", "end"),
     "Procedure.performedPeriod", "mpr-2"),
    ("session-time-as-datetime", "Procedure-massage-session-1.json",
     lambda r: (r.pop("performedPeriod"), r.update(performedDateTime="2025-07-01T09:00:00Z")),
     "Procedure.performedDateTime", "not allowed"),
    ("finding-severity-missing", "DetectedIssue-contraindication-anticoagulant.json", _drop("severity"),
     "DetectedIssue.severity", "missing"),
    ("finding-severity-unknown", "DetectedIssue-contraindication-anticoagulant.json",
     _set(("severity",), "critical"), "DetectedIssue.severity", "detectedissue-severity"),
    ("finding-category-not-a-detected-issue-code", "DetectedIssue-contraindication-anticoagulant.json",
     _set(("code", "coding", 0, "code"), "DRG"), "DetectedIssue.code", "massage-detected-issue-category"),
    ("finding-without-detail", "DetectedIssue-contraindication-anticoagulant.json", _drop("detail"),
     "DetectedIssue.detail", "missing"),
    ("pain-score-wrong-loinc", "Observation-pain-score-session-1-after.json",
     _set(("code", "coding", 0, "code"), "38208-5"), "Observation.code", "72514-3"),
    ("pain-score-above-ten", "Observation-pain-score-session-1-after.json", _set(("valueInteger",), 11),
     "Observation.value[x]", "mps-1"),
    ("pain-score-as-text", "Observation-pain-score-session-1-after.json",
     lambda r: (r.pop("valueInteger"), r.update(valueString="3")), "Observation.valueString", "not allowed"),
    ("plan-without-assess-plan-category", "CarePlan-massage-plan-lymphedema.json", _drop("category"),
     "CarePlan.category", "missing"),
    ("plan-without-narrative", "CarePlan-massage-plan-lymphedema.json", _drop("text"), "CarePlan.text", "missing"),
    ("task-with-a-proposal-intent", "Task-massage-fulfillment-mld.json", _set(("intent",), "proposal"),
     "Task.intent", "must match \"order\""),
    ("task-code-not-fulfil-or-approve", "Task-massage-fulfillment-mld.json",
     _set(("code", "coding", 0, "code"), "abort"), "Task.code", "massage-task-code"),
    ("task-without-patient", "Task-massage-fulfillment-mld.json", _drop("for"), "Task.for", "missing"),
    ("message-without-payload", "Communication-massage-feedback-progress-1.json", _drop("payload"),
     "Communication.payload", "missing"),
    ("message-status-unknown", "Communication-massage-feedback-progress-1.json", _set(("status",), "sent"),
     "Communication.status", "event-status"),
]


@pytest.mark.parametrize(
    "example,mutate,path,words", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_a_broken_resource_fails_at_the_right_path(example: str, mutate, path: str, words: str) -> None:
    res = load(example)
    mutate(res)
    found = errors(validate_resource(res))
    assert any(i.path == path and words in i.message for i in found), found
    assert not is_valid(res)


def test_bundle_entries_are_checked_with_their_own_path() -> None:
    bundle = load("Bundle-massage-order-transaction.json")
    bundle["entry"][0]["resource"]["code"]["coding"][1]["code"] = "reiki"
    del bundle["entry"][2]["request"]
    found = errors(validate_resource(bundle))
    paths = {i.path for i in found}
    assert "Bundle.entry[0].resource.code.coding[1]" in paths
    assert "Bundle.entry[2].request" in paths


def test_urn_uuid_links_inside_a_transaction_are_type_checked() -> None:
    bundle = load("Bundle-massage-order-transaction.json")
    task = bundle["entry"][2]["resource"]
    task["for"] = {"reference": bundle["entry"][1]["fullUrl"]}  # the DetectedIssue, not a Patient
    found = errors(validate_resource(bundle))
    assert any(i.path == "Bundle.entry[2].resource.for.reference" and "not DetectedIssue" in i.message for i in found)


def test_a_structural_error_inside_a_bundle_is_reported_once() -> None:
    bundle = load("Bundle-massage-care-loop.json")
    del bundle["entry"][0]["resource"]["subject"]
    found = [i for i in errors(validate_resource(bundle)) if i.path.endswith(".subject")]
    assert [i.path for i in found] == ["Bundle.entry[0].resource.subject"]


def test_a_resource_without_meta_profile_is_still_held_to_our_profile() -> None:
    res = load("Procedure-massage-session-1.json")
    del res["meta"]
    del res["basedOn"]
    issues = validate_resource(res)
    assert any(i.severity == "warning" and i.path == "Procedure.meta.profile" for i in issues)
    assert any(i.path == "Procedure.basedOn" for i in errors(issues))


def test_explicit_profile_argument_wins_and_wrong_type_is_an_error() -> None:
    res = load("Procedure-massage-session-1.json")
    found = errors(validate_resource(res, P + "massage-service-request"))
    assert any("is for ServiceRequest, not Procedure" in i.message for i in found)
    assert errors(validate_resource(res, P + "nope")) != []


def test_validate_against_profiles_only_looks_at_meta_profile() -> None:
    res = load("ServiceRequest-massage-order-mld.json")
    res["meta"]["profile"].append("http://hl7.org/fhir/us/core/StructureDefinition/us-core-servicerequest")
    issues = validate_against_profiles(res)
    assert errors(issues) == []
    assert [i.severity for i in issues] == ["information"]
    res["meta"]["profile"] = [P + "massage-nonexistent"]
    assert errors(validate_against_profiles(res))


@pytest.mark.parametrize(
    "value,message",
    [([], "JSON object"), ({"id": "x"}, "resourceType"), ({"resourceType": "Massage"}, "unknown resourceType")],
    ids=["a-list", "no-resourceType", "not-a-fhir-type"],
)
def test_garbage_is_reported_not_raised(value: Any, message: str) -> None:
    found = validate_resource(value)
    assert found and message in found[0].message and found[0].severity == "error"


def test_issue_is_plain_data() -> None:
    issue = Issue("error", "Procedure.status", "bad")
    assert issue.as_dict() == {"severity": "error", "path": "Procedure.status", "message": "bad"}
    assert str(issue) == "error: Procedure.status: bad"


# --- one source of truth ---------------------------------------------------------------------------------------


def test_technique_code_system_has_exactly_the_product_technique_keys() -> None:
    cs = package_resource("CodeSystem-massage-technique.json")
    assert cs["url"] == codes.TECHNIQUE_SYSTEM
    assert [c["code"] for c in cs["concept"]] == list(codes.TECHNIQUES)
    assert {c["code"]: c["display"] for c in cs["concept"]} == codes.TECHNIQUE_DISPLAY
    assert all(c.get("definition") for c in cs["concept"])


def test_concept_map_default_cpt_agrees_with_codes_technique_cpt() -> None:
    cm = package_resource("ConceptMap-massage-technique-to-cpt.json")
    (group,) = cm["group"]
    assert group["source"] == codes.TECHNIQUE_SYSTEM and group["target"] == codes.CPT
    first = {e["code"]: e["target"][0]["code"] for e in group["element"]}
    assert first == {t: cpt for t, (cpt, _evidence) in codes.TECHNIQUE_CPT.items()}
    cpt_vs = {c["code"] for inc in package_resource("ValueSet-massage-cpt.json")["compose"]["include"]
              for c in inc["concept"]}
    assert {t["code"] for e in group["element"] for t in e["target"]} <= cpt_vs


def test_package_canonical_matches_codes() -> None:
    manifest = json.loads((PACKAGE_DIR / "package.json").read_text())
    assert manifest["canonical"] == codes.CANONICAL_BASE
    config = (ROOT / "profiles" / "sushi-config.yaml").read_text()
    assert f"canonical: {codes.CANONICAL_BASE}\n" in config
    for path in PACKAGE_DIR.glob("*.json"):
        res = json.loads(path.read_text())
        if "url" in res and path.name != "package.json":
            assert res["url"].startswith(codes.CANONICAL_BASE + "/"), path.name


def test_every_invariant_of_our_profiles_is_implemented() -> None:
    keys = set()
    for path in PACKAGE_DIR.glob("StructureDefinition-*.json"):
        for el in json.loads(path.read_text())["snapshot"]["element"]:
            keys |= {c["key"] for c in el.get("constraint", []) if c.get("source", "").startswith(codes.CANONICAL_BASE)}
    assert keys and keys == set(INVARIANTS)


def test_valueset_contains_answers_for_our_value_sets() -> None:
    vs = f"{codes.CANONICAL_BASE}/ValueSet/massage-technique"
    assert valueset_contains(vs, codes.TECHNIQUE_SYSTEM, "swedish") is True
    assert valueset_contains(vs, codes.TECHNIQUE_SYSTEM, "reiki") is False
    assert valueset_contains(vs, codes.CPT, "swedish") is False
    assert valueset_contains("https://example.org/unknown", None, "x") is None


def test_readme_lists_every_artifact() -> None:
    readme = (ROOT / "profiles" / "README.md").read_text()
    for path in PACKAGE_DIR.glob("*.json"):
        res = json.loads(path.read_text())
        if path.name in ("package.json", ".index.json") or res["id"].startswith("contraindication-"):
            continue
        assert f"`{res['url']}`" in readme, res["url"]
    assert "ValueSet/contraindication-<rule id>" in readme
