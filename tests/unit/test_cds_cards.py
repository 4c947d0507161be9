"""CDS Hooks card building (fhir_massage/cds_cards.py), pure: requests shaped like the spec's examples, the demo
charts, and a synthetic chart per knowledge-base rule."""

from __future__ import annotations

import datetime as dt
import json
import re
from itertools import count

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task

from fhir_massage import cds_cards as cc
from fhir_massage import codes as C
from fhir_massage.chart import from_resources
from fhir_massage.knowledge import Site, load_kb
from fhir_massage.sandbox.demo import hand_made_resources
from fhir_massage.screening import Evidence, Finding, screen

TODAY = dt.date(2026, 11, 28)
NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.timezone.utc)
KB = load_kb()


def _ids():
    n = count(1)
    return lambda: f"00000000-0000-4000-8000-{next(n):012d}"


def massage_sr(sid="draft-1", techniques=("deep-tissue",), sites=(("30021000", "Lower leg", "Left lower leg"),),
               patient="demo-dana-whitfield", cpt_only=None):
    if cpt_only:
        coding = [{"system": C.CPT, "code": c} for c in cpt_only]
    else:
        coding = [{"system": C.CPT, "code": C.TECHNIQUE_CPT[t][0]} for t in techniques] + \
                 [{"system": C.TECHNIQUE_SYSTEM, "code": t, "display": C.TECHNIQUE_DISPLAY[t]} for t in techniques]
    sr = {"resourceType": "ServiceRequest", "id": sid, "status": "draft", "intent": "order",
          "code": {"coding": coding, "text": "Massage"}, "subject": {"reference": f"Patient/{patient}"}}
    if sites:
        sr["bodySite"] = [{"coding": [{"system": C.SNOMED, "code": code, "display": disp}], "text": text}
                          for code, disp, text in sites]
    return sr


def hook_body(drafts, *, hook="order-sign", patient="demo-dana-whitfield", selections=None, **extra):
    ctx = {"userId": "Practitioner/dr-ada-grey", "patientId": patient,
           "draftOrders": {"resourceType": "Bundle", "type": "collection",
                           "entry": [{"resource": d} for d in drafts]}}
    if selections is not None:
        ctx["selections"] = selections
    body = {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "context": ctx}
    body.update(extra)
    return body


def cards_for(resources, drafts, *, hook="order-sign", patient="demo-dana-whitfield", selections=None,
              launch_url="http://127.0.0.1:9/launch"):
    service = "massage-order-select" if hook == "order-select" else "massage-order-sign"
    req = cc.parse_hook_request(hook_body(drafts, hook=hook, patient=patient, selections=selections), service)
    orders = cc.massage_orders(req)
    chart = from_resources(resources)
    screenings = {i: screen(chart, techniques=o.techniques, sites=o.sites, today=TODAY) for i, o in enumerate(orders)}
    return cc.build_cards(orders, screenings, request=req, now=NOW, launch_url=launch_url, new_uuid=_ids())


def check_card_shape(card):
    """The spec's Card attributes ("Card Attributes", "Suggestion", "Action", "Link")."""
    assert set(card) <= {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior",
                         "overrideReasons", "links"}
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"] == cc.SOURCE_LABEL
    topic = card["source"]["topic"]
    assert topic["system"] == cc.CARD_TOPIC_SYSTEM and topic["code"]
    if "suggestions" in card:
        assert card["selectionBehavior"] == "at-most-one"
        for s in card["suggestions"]:
            assert s["label"] and s["uuid"] and s["actions"]
            for a in s["actions"]:
                assert a["type"] in ("create", "update", "delete") and a["description"]
                if a["type"] == "delete":
                    assert re.fullmatch(r"ServiceRequest/[A-Za-z0-9\-.]+", a["resourceId"])
                else:
                    assert a["resource"]["resourceType"] in ("ServiceRequest", "Task")
    else:
        assert "selectionBehavior" not in card
    for r in card.get("overrideReasons", []):
        assert r["system"] == cc.OVERRIDE_REASON_SYSTEM and r["code"] and r["display"]
    for link in card.get("links", []):
        assert link["type"] == "smart" and link["label"] and link["url"]
        assert isinstance(json.loads(link["appContext"]), dict)


# ---------------------------------------------------------------------------------------------------------------
# discovery and requests


def test_discovery_lists_both_order_hooks_with_prefetch_on_patient_id_only():
    doc = cc.discovery()
    services = {s["id"]: s for s in doc["services"]}
    assert services["massage-order-select"]["hook"] == "order-select"
    assert services["massage-order-sign"]["hook"] == "order-sign"
    for s in services.values():
        assert s["title"] and s["description"] and s["usageRequirements"]
        prefetch = s["prefetch"]
        for key in ("patient", "conditions", "medicationRequests", "medicationStatements",
                    "medicationAdministrations", "allergies", "procedures", "obsPlatelets", "obsInr", "obsBp",
                    "obsTemperature", "obsPregnancyStatus"):
            assert key in prefetch
        for template in prefetch.values():
            # spec: only root-level context tokens; draftOrders/selections are not prefetch tokens
            assert set(re.findall(r"\{\{([^}]+)\}\}", template)) == {"context.patientId"}
    assert "http://loinc.org|777-3" in services["massage-order-sign"]["prefetch"]["obsPlatelets"]


def test_spec_shaped_order_sign_request_with_a_medication_draft_gives_no_massage_orders():
    # Shape of the spec's order-sign example: fhirServer + fhirAuthorization, a MedicationRequest draft.
    body = {
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "http://hooks.smarthealthit.org:9080",
        "hook": "order-sign",
        "fhirAuthorization": {"access_token": "some-opaque-fhir-access-token", "token_type": "Bearer",
                              "expires_in": 300, "scope": "user/Patient.read user/Observation.read",
                              "subject": "cds-service4"},
        "context": {
            "userId": "Practitioner/example", "patientId": "1288992", "encounterId": "89284",
            "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": {
                "resourceType": "MedicationRequest", "id": "smart-MedicationRequest-103", "status": "draft",
                "intent": "order", "subject": {"reference": "Patient/1288992"},
                "medicationCodeableConcept": {"coding": [{"system": C.RXNORM, "code": "617993",
                                                          "display": "Amoxicillin 120 MG/ML"}]}}}]},
        },
        "prefetch": {"patient": {"resourceType": "Patient", "id": "1288992"}},
    }
    req = cc.parse_hook_request(body, "massage-order-sign")
    assert req.fhir is not None and req.fhir.server == "http://hooks.smarthealthit.org:9080"
    assert "some-opaque" not in repr(req.fhir)  # the token never reaches a log through repr
    assert req.encounter_id == "89284"
    assert cc.massage_orders(req) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.update(hook="patient-view"), "order-sign"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b["context"].pop("patientId"), "patientId"),
    (lambda b: b["context"].update(patientId="a b/c"), "patientId"),
    (lambda b: b["context"].update(userId="dr-ada"), "userId"),
    (lambda b: b["context"].update(draftOrders=[]), "draftOrders"),
    (lambda b: b["context"].update(draftOrders={"resourceType": "Bundle", "entry": {}}), "entry"),
    (lambda b: b.update(context="x"), "context"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "scope": "s",
                                           "subject": "c"}), "fhirServer"),
    (lambda b: b.update(fhirServer="https://ehr.example/fhir", fhirAuthorization={"token_type": "Bearer"}),
     "access_token"),
    (lambda b: b.update(prefetch=[1]), "prefetch"),
], ids=["wrong-hook", "no-hookInstance", "no-patient", "bad-patient-id", "bad-userId", "draftOrders-not-bundle",
        "entry-not-list", "context-not-object", "auth-without-server", "auth-without-token", "prefetch-not-object"])
def test_bad_requests_are_request_errors_in_plain_words(mutate, message):
    body = hook_body([massage_sr()])
    mutate(body)
    with pytest.raises(cc.CdsRequestError) as err:
        cc.parse_hook_request(body, "massage-order-sign")
    assert message in err.value.message and err.value.status == 400


def test_non_object_body_and_unknown_service_are_request_errors():
    with pytest.raises(cc.CdsRequestError):
        cc.parse_hook_request([1, 2], "massage-order-sign")
    with pytest.raises(cc.CdsRequestError):
        cc.parse_hook_request(hook_body([massage_sr()]), "nope")


def test_order_select_requires_selections_and_screens_only_the_selected_drafts():
    body = hook_body([massage_sr()], hook="order-select")
    with pytest.raises(cc.CdsRequestError, match="selections"):
        cc.parse_hook_request(body, "massage-order-select")
    resources = hand_made_resources("demo-dana-whitfield", TODAY)
    drafts = [massage_sr("a"), massage_sr("b", techniques=("swedish",), sites=(("77568009", "Back", "Back"),))]
    cards, _ = cards_for(resources, drafts, hook="order-select", selections=["ServiceRequest/b"])
    assert cards and all(json.loads(c["links"][0]["appContext"])["serviceRequest"] == "ServiceRequest/b"
                         for c in cards)
    assert not any(c["indicator"] == "critical" for c in cards)  # the DVT leg order "a" was not selected
    cards, _ = cards_for(resources, drafts, hook="order-select", selections=["ServiceRequest/a"])
    assert any(c["indicator"] == "critical" for c in cards)


# ---------------------------------------------------------------------------------------------------------------
# the clinical cases


def test_deep_tissue_on_the_dvt_leg_is_a_critical_card_with_suggestions():
    resources = hand_made_resources("demo-dana-whitfield", TODAY)
    drafts = [massage_sr(sites=(("30021000", "Lower leg", "Left lower leg"), ("77568009", "Back", "Back")))]
    cards, records = cards_for(resources, drafts)
    for card in cards:
        check_card_shape(card)
    critical = [c for c in cards if c["indicator"] == "critical"]
    assert [c["source"]["topic"]["code"] for c in critical] == ["dvt-acute"]
    card = critical[0]
    assert cards[0] is card  # most severe first
    assert "left lower limb" in card["summary"].lower()
    assert "Condition/demo-dana-whitfield-dvt-left-leg" in card["detail"]
    assert "I82.402" in card["detail"] and "EV" in card["detail"] and "Source:" in card["detail"]
    labels = [s["label"] for s in card["suggestions"]]
    assert labels[0].startswith("Remove Left lower leg") and card["suggestions"][0]["isRecommended"] is True
    update = card["suggestions"][0]["actions"][0]
    assert update["type"] == "update" and update["resource"]["id"] == "draft-1"
    assert [b["text"] for b in update["resource"]["bodySite"]] == ["Back"]
    # the text is rebuilt from what is left: no stale "Deep tissue massage: Left lower leg; Back"
    assert update["resource"]["code"]["text"] == "Deep tissue massage: Back"
    ServiceRequest.model_validate(update["resource"])
    task = next(s for s in card["suggestions"] if s["label"] == cc.CLEARANCE_LABEL)["actions"][0]
    assert task["type"] == "create"
    Task.model_validate(task["resource"])
    assert task["resource"]["code"]["coding"][0] == {"system": C.TASK_CODE, "code": "approve",
                                                     "display": "Activate/approve the focal resource"}
    assert task["resource"]["focus"] == {"reference": "ServiceRequest/draft-1"}
    assert task["resource"]["for"] == {"reference": "Patient/demo-dana-whitfield"}
    assert {r["code"] for r in card["overrideReasons"]} >= {"clearance-obtained", "benefit-outweighs-risk",
                                                            "patient-declined-alternative", "not-applicable"}
    link = card["links"][0]
    assert link["url"] == "http://127.0.0.1:9/launch"
    assert json.loads(link["appContext"]) == {"area": "orders", "patient": "demo-dana-whitfield",
                                              "serviceRequest": "ServiceRequest/draft-1", "rule": "dvt-acute"}
    rec = records[card["uuid"]]
    assert rec["rule"] == "dvt-acute" and rec["order"] == "ServiceRequest/draft-1"
    assert rec["finding"]["rule"] == "dvt-acute"
    assert set(rec["suggestions"]) == {s["uuid"] for s in card["suggestions"]}


def test_swedish_on_the_back_of_the_dvt_patient_is_not_critical():
    resources = hand_made_resources("demo-dana-whitfield", TODAY)
    cards, _ = cards_for(resources, [massage_sr(techniques=("swedish",), sites=(("77568009", "Back", "Back"),))])
    assert cards and not [c for c in cards if c["indicator"] == "critical"]
    assert {c["source"]["topic"]["code"] for c in cards} == {"dvt-acute-elsewhere"}


def _patient(pid="p1", gender="female", birth="1950-01-01"):
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}


def _condition(pid, cid, coding, *, onset="2026-11-20", status="active", body_site=None, text=None):
    res = {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
           "clinicalStatus": {"coding": [{"system": C.CONDITION_CLINICAL, "code": status}]},
           "verificationStatus": {"coding": [{"system": C.CONDITION_VER_STATUS, "code": "confirmed"}]},
           "code": {"coding": [coding]}, "onsetDateTime": onset}
    if text:
        res["code"]["text"] = text
    if body_site:
        res["bodySite"] = [body_site]
    return res


def test_lymphatic_drainage_with_acute_heart_failure_is_critical():
    resources = [_patient(), _condition("p1", "hf", {"system": C.SNOMED, "code": "56675007",
                                                     "display": "Acute heart failure"})]
    cards, _ = cards_for(resources, [massage_sr(techniques=("lymphatic-drainage",), patient="p1",
                                                sites=(("53120007", "Upper limb", "Right upper limb"),))],
                         patient="p1")
    critical = [c for c in cards if c["indicator"] == "critical"]
    assert [c["source"]["topic"]["code"] for c in critical] == ["heart-failure-acute"]
    for c in cards:
        check_card_shape(c)


def test_tommy_friesen_chronic_heart_failure_warns_against_lymphatic_drainage():
    from fhir_massage.sandbox.demo import synthea_bundle

    bundle = synthea_bundle("Tommy Friesen")
    resources = [e["resource"] for e in bundle["entry"]]
    pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    cards, _ = cards_for(resources, [massage_sr(techniques=("lymphatic-drainage",), patient=pid, sites=())],
                         patient=pid)
    assert "heart-failure" in {c["source"]["topic"]["code"] for c in cards}


def test_a_non_massage_service_request_gives_no_cards():
    sr = {"resourceType": "ServiceRequest", "id": "xray", "status": "draft", "intent": "order",
          "code": {"coding": [{"system": C.LOINC, "code": "36554-4", "display": "XR Chest"}]},
          "subject": {"reference": "Patient/demo-dana-whitfield"}}
    cards, records = cards_for(hand_made_resources("demo-dana-whitfield", TODAY), [sr])
    assert cards == [] and records == {}


@pytest.mark.parametrize("cpt, expected", [
    ("97124", ("swedish", "deep-tissue")),
    ("97140", ("deep-tissue", "myofascial-release", "trigger-point", "lymphatic-drainage", "neuromuscular")),
    ("97112", ("neuromuscular",)),
])
def test_cpt_only_orders_infer_techniques_conservatively_and_say_so(cpt, expected):
    req = cc.parse_hook_request(hook_body([massage_sr(cpt_only=[cpt])]), "massage-order-sign")
    (order,) = cc.massage_orders(req)
    assert order.techniques == expected and order.inferred_from == (cpt,)
    cards, _ = cards_for(hand_made_resources("demo-dana-whitfield", TODAY), [massage_sr(cpt_only=[cpt])])
    assert cards and all(f"inferred from CPT {cpt}" in c["detail"] for c in cards
                         if c["source"]["topic"]["code"] != "needs-review")


def test_unknown_cpt_or_physical_therapy_cpt_is_not_a_massage_order():
    req = cc.parse_hook_request(hook_body([massage_sr(cpt_only=["97110"])]), "massage-order-sign")
    assert cc.massage_orders(req) == []


@pytest.mark.parametrize("concept, expected", [
    ({"coding": [{"system": C.SNOMED, "code": "30021000"}], "text": "Left lower leg"}, ("30021000:left",)),
    ({"coding": [{"system": C.SNOMED, "code": "30021000"}, {"system": C.SNOMED, "code": "24028007"}]},
     ("30021000:right",)),
    ({"coding": [{"system": C.SNOMED, "code": "30021000"}], "text": "Lower leg"}, ("30021000",)),
    ({"coding": [{"system": C.SNOMED, "code": "77568009"}], "text": "Left side of back"}, ("77568009",)),
    ({"coding": [{"system": C.SNOMED, "code": "999999999"}], "text": "Elbow crease"}, None),
    ({"text": "left calf"}, None),
], ids=["text-side", "qualifier-side", "no-side-both", "unsided-site", "unknown-code-whole-body", "text-only"])
def test_order_sites_from_service_request_body_site(concept, expected):
    sites, notes = cc.order_sites({"bodySite": [concept]})
    assert sites == expected
    assert bool(notes) == (expected is None)


def test_unmapped_order_site_is_screened_as_the_whole_body_and_the_card_says_so():
    drafts = [massage_sr(sites=(("999999999", "Elbow crease", "Elbow crease"),))]
    cards, _ = cards_for(hand_made_resources("demo-dana-whitfield", TODAY), drafts)
    crit = [c for c in cards if c["indicator"] == "critical"]
    assert crit and "whole body" in crit[0]["detail"] and "Elbow crease" in crit[0]["detail"]


def test_text_only_problem_gives_a_needs_review_warning_card():
    cards, records = cards_for(hand_made_resources("demo-helen-brooks", TODAY),
                               [massage_sr(techniques=("swedish",), patient="demo-helen-brooks",
                                           sites=(("77568009", "Back", "Back"),))], patient="demo-helen-brooks")
    review = [c for c in cards if c["source"]["topic"]["code"] == "needs-review"]
    assert len(review) == 1 and review[0]["indicator"] == "warning"
    assert "blood clot" in review[0]["detail"]
    check_card_shape(review[0])
    assert records[review[0]["uuid"]]["rule"] == "needs-review"


# ---------------------------------------------------------------------------------------------------------------
# every rule: summary < 140 characters


def _raw_rules():
    from fhir_massage.knowledge import _read

    raw = _read("rules.json")["rules"]
    out = {}
    for r in raw:
        out[r["id"]] = r
        for a in r.get("also", []):
            out[a["id"]] = {**r, **a}
    return out


RAW = _raw_rules()
LONG_SITE = {"system": C.SNOMED, "code": "30021000", "display": "Lower leg"}


def _synthetic(rule_id):
    r = RAW[rule_id]
    pid = "p1"
    patient = _patient(pid, gender="female", birth="1990-01-01")
    res = [patient]
    codes = r.get("codes") or {}
    body_site = {"coding": [LONG_SITE], "text": "Left lower leg"}
    if r["kind"] in ("condition", "pregnancy", "medication") and (codes.get("snomed") or codes.get("icd10cm")):
        if codes.get("icd10cm"):
            code = codes["icd10cm"][0]["prefix"]
            if code.endswith("."):
                code = code[:-1]
            coding = {"system": C.ICD10CM, "code": code}
        else:
            coding = {"system": C.SNOMED, "code": codes["snomed"][0]["code"]}
        status = "resolved" if r["status"] == "history" else "active"
        cond = _condition(pid, "c1", coding, onset=(TODAY - dt.timedelta(days=5)).isoformat(), status=status,
                          body_site=body_site)
        if status == "resolved":
            cond["abatementDateTime"] = (TODAY - dt.timedelta(days=2)).isoformat()
        res.append(cond)
    if r["kind"] == "medication" and codes.get("rxnorm"):
        res.append({"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
                    "subject": {"reference": f"Patient/{pid}"}, "authoredOn": (TODAY - dt.timedelta(days=3)).isoformat(),
                    "medicationCodeableConcept": {"coding": [{"system": C.RXNORM, "code": codes["rxnorm"][0]["code"]}]}})
    if r["kind"] == "procedure":
        code = (codes.get("snomed") or [{"code": "387713003"}])[0]["code"]
        res.append({"resourceType": "Procedure", "id": "pr1", "status": "completed",
                    "subject": {"reference": f"Patient/{pid}"},
                    "code": {"coding": [{"system": C.SNOMED, "code": code}]},
                    "performedDateTime": (TODAY - dt.timedelta(days=3)).isoformat(), "bodySite": [body_site]})
    if r["kind"] == "allergy":
        res.append({"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": f"Patient/{pid}"},
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                                   "code": "active"}]},
                    "code": {"coding": [{"system": C.SNOMED, "code": codes["snomed"][0]["code"]}]}})
    obs = r.get("observation")
    if r["kind"] == "observation" and obs:
        kind = KB.obs_kinds[obs["kind"]]
        unit = kind.get("unit")
        base = {"resourceType": "Observation", "id": "o1", "status": "final",
                "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": (TODAY - dt.timedelta(days=1)).isoformat()}
        if obs["op"] in ("bp>=", "sys<"):
            keys = obs["threshold"] if isinstance(obs["threshold"], list) else [obs["threshold"]]
            sys_v = KB.threshold(keys[0]) * (0.8 if obs["op"] == "sys<" else 1.1)
            dia_v = KB.threshold(keys[1]) * 1.1 if len(keys) > 1 else 60
            base["code"] = {"coding": [{"system": C.LOINC, "code": "85354-9"}]}
            base["component"] = [
                {"code": {"coding": [{"system": C.LOINC, "code": "8480-6"}]},
                 "valueQuantity": {"value": round(sys_v), "unit": "mm[Hg]", "system": C.UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": C.LOINC, "code": "8462-4"}]},
                 "valueQuantity": {"value": round(dia_v), "unit": "mm[Hg]", "system": C.UCUM, "code": "mm[Hg]"}}]
        else:
            t = KB.threshold(obs["threshold"])
            value = t * 0.5 if obs["op"] == "<" else t * 1.2 + 1
            base["code"] = {"coding": [{"system": C.LOINC, "code": kind["codes"][0]}]}
            base["valueQuantity"] = {"value": round(value, 1), "unit": unit, "system": C.UCUM, "code": unit}
        res.append(base)
    return res


ALL_RULES = sorted(KB.rules)


@pytest.mark.parametrize("rule_id", ALL_RULES)
def test_every_rule_gives_a_summary_under_140_characters(rule_id):
    resources = _synthetic(rule_id)
    chart = from_resources(resources)
    screening = screen(chart, today=TODAY)
    findings = [f for f in screening.findings if f.rule == rule_id]
    if not findings:
        # Rules the generic synthetic chart cannot trigger (windows, thresholds with special units, pregnancy
        # observations): the worst case for the summary is built from the rule itself with the longest site text.
        rule = KB.rules[rule_id]
        findings = [Finding(rule=rule.id, cls=rule.cls, techniques=tuple(sorted(rule.techniques)),
                            sites=(Site("61685007", "bilateral"), Site("53120007", "bilateral")),
                            evidence=("Condition/x",), message=rule.message, evidence_class=rule.evidence_class,
                            source=rule.source, verified=True, details=(Evidence("Condition/x", "x"),),
                            title=rule.title)]
    for f in findings:
        summary = cc.summary_for(f)
        assert 0 < len(summary) < 140, summary
        assert summary.startswith(("Absolute", "Relative", "Local"))
    # every finding of the synthetic chart (companions included) builds a well-formed card
    drafts = [massage_sr(techniques=tuple(C.TECHNIQUES), patient="p1", sites=())]
    req = cc.parse_hook_request(hook_body(drafts, patient="p1"), "massage-order-sign")
    orders = cc.massage_orders(req)
    s = screen(chart, techniques=orders[0].techniques, sites=None, today=TODAY)
    cards, _ = cc.build_cards(orders, {0: s}, request=req, now=NOW, new_uuid=_ids())
    for card in cards:
        check_card_shape(card)


def test_the_synthetic_charts_do_trigger_most_rules():
    # Guard for the parametrized test above: if the synthetic charts stopped firing rules, the summary test would
    # fall back to hand-built findings for everything.
    fired = 0
    for rule_id in ALL_RULES:
        s = screen(from_resources(_synthetic(rule_id)), today=TODAY)
        fired += any(f.rule == rule_id for f in s.findings)
    assert fired >= 0.7 * len(ALL_RULES), f"only {fired} of {len(ALL_RULES)} rules fired"


# ---------------------------------------------------------------------------------------------------------------
# markdown escaping


_UNESCAPED = r"(?<!\\)"  # not preceded by a backslash


@pytest.mark.parametrize("text, forbidden", [
    ("**bold** and _it_", [_UNESCAPED + r"\*", _UNESCAPED + r"_"]),
    ("[click](javascript:alert(1))", [_UNESCAPED + r"\[", _UNESCAPED + r"\]"]),
    ("<script>alert(1)</script>", [r"<"]),
    ("<img src=x onerror=alert(1)>", [r"<"]),
    ("&lt;b&gt;", [r"&lt;b"]),
    ("line one\n# Heading\n- item", [r"\n", _UNESCAPED + "#"]),
    ("| a | b |", [_UNESCAPED + r"\|"]),
    ("`code`", [_UNESCAPED + "`"]),
    ("![img](http://evil/x.png)", [_UNESCAPED + "!", _UNESCAPED + r"\["]),
    ("~~gone~~", [_UNESCAPED + "~"]),
], ids=["emphasis", "link", "script", "img-tag", "entity", "newline-blocks", "table", "code", "image", "strike"])
def test_md_escape_makes_ehr_text_inert(text, forbidden):
    out = cc.md_escape(text)
    for pattern in forbidden:
        assert not re.search(pattern, out), (pattern, out)


@pytest.mark.parametrize("text", ["- starts a list", "+ plus", "1. numbered", "> quote", "= setext"])
def test_md_escape_neutralises_a_leading_block_marker(text):
    out = cc.md_escape(text)
    assert out.startswith("\\" + text[0]) or out.startswith("1\\.")


def test_ehr_text_in_a_card_detail_is_escaped():
    hostile = "**DVT** <script>alert(1)</script> [x](javascript:alert(1))\n# big"
    resources = [_patient(), _condition("p1", "dvt", {"system": C.ICD10CM, "code": "I82.402"}, text=hostile,
                                        body_site={"coding": [LONG_SITE], "text": "Left lower leg"})]
    cards, _ = cards_for(resources, [massage_sr(patient="p1")], patient="p1")
    detail = next(c for c in cards if c["indicator"] == "critical")["detail"]
    assert "<script" not in detail and "**DVT**" not in detail and "[x](" not in detail and "\n# big" not in detail
    assert "\\*\\*DVT\\*\\*" in detail


def test_code_span_cannot_be_broken_out_of():
    assert cc.code_span("Condition/a`b\nc") == "`Condition/a'b c`"


# ---------------------------------------------------------------------------------------------------------------
# prefetch and feedback


def test_prefetch_resources_counts_absent_and_error_keys_as_missing_and_null_as_nothing():
    keys = list(cc.prefetch_templates())
    prefetch = {k: {"resourceType": "Bundle", "type": "searchset", "entry": []} for k in keys}
    prefetch["patient"] = _patient()
    prefetch["allergies"] = None  # found nothing
    prefetch["procedures"] = {"resourceType": "OperationOutcome", "issue": []}
    del prefetch["obsInr"]
    prefetch["conditions"] = {"resourceType": "Bundle", "type": "searchset",
                              "link": [{"relation": "next", "url": "http://ehr/fhir?page=2"}],
                              "entry": [{"resource": _condition("p1", "c", {"system": C.SNOMED, "code": "1"})}]}
    out = cc.prefetch_resources(prefetch)
    assert set(out.missing) == {"procedures", "obsInr"}
    assert out.paged == {"conditions": "http://ehr/fhir?page=2"}
    assert [r["resourceType"] for r in out.resources] == ["Patient", "Condition"]
    assert "patient" in cc.prefetch_resources({**prefetch, "patient": None}).missing


def test_prefetch_queries_fill_in_the_patient():
    q = cc.prefetch_queries("abc")
    assert q["patient"] == "Patient/abc" and q["conditions"] == "Condition?patient=abc"


def test_spec_shaped_feedback_parses_and_override_becomes_a_mitigation():
    body = {"feedback": [
        {"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "accepted",
         "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
         "outcomeTimestamp": "2020-12-11T00:00:00Z"},
        {"card": "f5e9e0e5-4c43-4e53-aa55-3c36f69bb3c6", "outcome": "overridden",
         "overrideReason": {"reason": {"code": "clearance-obtained", "system": cc.OVERRIDE_REASON_SYSTEM,
                                       "display": "Physician clearance obtained and documented"},
                            "userComment": "Cleared by vascular surgery today"},
         "outcomeTimestamp": "2020-12-11T00:00:00Z"},
    ]}
    accepted, overridden = cc.parse_feedback(body)
    assert accepted.accepted_suggestions == ("e56e1945-20b3-4393-8503-a1a20fd73152",)
    m = cc.override_mitigation(overridden, author_ref="Practitioner/dr-ada-grey")
    assert m["action"]["coding"][0]["code"] == "clearance-obtained"
    assert "Cleared by vascular surgery today" in m["action"]["text"]
    assert m["date"] == "2020-12-11T00:00:00Z" and m["author"] == {"reference": "Practitioner/dr-ada-grey"}


@pytest.mark.parametrize("body", [
    {}, {"feedback": []}, {"feedback": [{"outcome": "accepted", "outcomeTimestamp": "2020-12-11T00:00:00Z"}]},
    {"feedback": [{"card": "x", "outcome": "ignored", "outcomeTimestamp": "2020-12-11T00:00:00Z"}]},
    {"feedback": [{"card": "x", "outcome": "accepted", "outcomeTimestamp": "yesterday"}]},
    {"feedback": [{"card": "x", "outcome": "overridden", "outcomeTimestamp": "2020-12-11T00:00:00Z",
                   "overrideReason": {"reason": "because"}}]},
], ids=["no-feedback", "empty", "no-card", "bad-outcome", "bad-timestamp", "reason-not-coding"])
def test_bad_feedback_is_a_request_error(body):
    with pytest.raises(cc.CdsRequestError):
        cc.parse_feedback(body)


def test_finding_round_trips_through_the_card_record_for_the_detected_issue():
    from fhir.resources.R4B.detectedissue import DetectedIssue

    from fhir_massage.builders.detected_issue import detected_issue

    _, records = cards_for(hand_made_resources("demo-dana-whitfield", TODAY), [massage_sr()])
    rec = next(r for r in records.values() if r["rule"] == "dvt-acute")
    finding = cc.finding_from_json(json.loads(json.dumps(rec["finding"])))
    assert finding.to_json() == {**rec["finding"], "details": [
        {k: v for k, v in d.items() if k != "code"} for d in rec["finding"]["details"]]}
    item = cc.parse_feedback({"feedback": [{"card": "c1", "outcome": "overridden",
                                            "outcomeTimestamp": "2026-11-28T10:00:00Z",
                                            "overrideReason": {"reason": {"system": cc.OVERRIDE_REASON_SYSTEM,
                                                                          "code": "benefit-outweighs-risk"}}}]})[0]
    issue = detected_issue(finding, patient_ref="Patient/demo-dana-whitfield", now=NOW,
                           order_ref="ServiceRequest/draft-1",
                           mitigation=cc.override_mitigation(item, author_ref="Practitioner/dr-ada-grey"))
    DetectedIssue.model_validate(issue)
    assert issue["severity"] == "high"
    assert issue["mitigation"][0]["action"]["coding"][0]["display"] == "Benefit outweighs risk (e.g. palliative care)"


# ---------------------------------------------------------------------------------------------------------------
# odd input never raises anything but CdsRequestError

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=12)
_sr_like = st.fixed_dictionaries({"resourceType": st.just("ServiceRequest")}, optional={
    "id": _json | st.just("x1"),
    "code": _json | st.just({"coding": [{"system": C.TECHNIQUE_SYSTEM, "code": "swedish"}]})
    | st.just({"coding": [{"system": C.CPT, "code": "97140"}, "junk", None]}),
    "bodySite": _json | st.just([{"coding": [{"system": C.SNOMED, "code": "30021000"}, 5], "text": 7}]),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.one_of(_json, st.fixed_dictionaries({"resource": _sr_like}),
                                  st.fixed_dictionaries({"resource": _sr_like, "fullUrl": _json})), max_size=4),
       selections=st.none() | st.lists(st.text(max_size=12) | st.just("ServiceRequest/x1"), max_size=3))
def test_odd_draft_orders_never_crash(entries, selections):
    body = hook_body([], hook="order-select" if selections is not None else "order-sign",
                     selections=selections)
    body["context"]["draftOrders"]["entry"] = entries
    service = "massage-order-select" if selections is not None else "massage-order-sign"
    try:
        req = cc.parse_hook_request(body, service)
    except cc.CdsRequestError:
        return
    orders = cc.massage_orders(req)
    chart = from_resources([_patient("demo-dana-whitfield")])
    screenings = {i: screen(chart, techniques=o.techniques, sites=o.sites, today=TODAY) for i, o in enumerate(orders)}
    cards, _ = cc.build_cards(orders, screenings, request=req, now=NOW, new_uuid=_ids())
    for card in cards:
        check_card_shape(card)


@settings(max_examples=150, deadline=None)
@given(prefetch=st.dictionaries(st.sampled_from(list(cc.prefetch_templates())) | st.text(max_size=5),
                                _json | st.fixed_dictionaries({"resourceType": st.just("Bundle")},
                                                              optional={"entry": _json, "link": _json}), max_size=6))
def test_odd_prefetch_never_crashes_and_never_drops_a_key_silently(prefetch):
    out = cc.prefetch_resources(prefetch)
    for key in cc.prefetch_templates():
        value = prefetch.get(key, "absent")
        if value == "absent" or (value is not None and not isinstance(value, dict)):
            assert key in out.missing


# ---------------------------------------------------------------------------------------------------------------
# every suggestion does what it says: applied to the draft and screened again, its card's finding is gone

_RANK = {"info": 0, "warning": 1, "critical": 2}
LEG = ("30021000", "Lower leg", "Left lower leg")
BACK = ("77568009", "Back", "Back")
_TECHNIQUE_SETS = [(t,) for t in C.TECHNIQUES] + [("deep-tissue", "swedish"), ("deep-tissue", "lymphatic-drainage"),
                                                  tuple(C.TECHNIQUES)]
_DRAFT_SHAPES = [dict(techniques=t, sites=s) for t in _TECHNIQUE_SETS for s in ((), (LEG,), (LEG, BACK))] + \
                [dict(cpt_only=[cpt], sites=s) for cpt in ("97124", "97140") for s in ((), (LEG, BACK))]
_SEEN_LABELS: set[str] = set()


def _screen_one(chart, draft):
    req = cc.parse_hook_request(hook_body([draft], patient="p1"), "massage-order-sign")
    orders = cc.massage_orders(req)
    screenings = {i: screen(chart, techniques=o.techniques, sites=o.sites, today=TODAY) for i, o in enumerate(orders)}
    cards, _ = cc.build_cards(orders, screenings, request=req, now=NOW, new_uuid=_ids())
    return cards


def _techniques_of(resource):
    return [c["code"] for c in resource["code"]["coding"] if c["system"] == C.TECHNIQUE_SYSTEM]


@pytest.mark.parametrize("rule_id", ALL_RULES)
def test_every_update_suggestion_resolves_its_card_when_applied_and_screened_again(rule_id):
    chart = from_resources(_synthetic(rule_id))
    for shape in _DRAFT_SHAPES:
        draft = massage_sr(sid="d1", patient="p1", **shape)
        for card in _screen_one(chart, draft):
            rule = card["source"]["topic"]["code"]
            for s in card.get("suggestions", []):
                (action,) = s["actions"]
                case = f"{rule_id}: {shape} card {rule} suggestion {s['label']!r}"
                if action["type"] == "create":
                    # the clearance Task changes nothing in the order, and says so
                    assert action["resource"]["resourceType"] == "Task", case
                    assert s["label"] == cc.CLEARANCE_LABEL and "not changed" in s["label"], case
                    assert "not changed" in action["description"], case
                    continue
                if action["type"] == "delete":
                    assert action["resourceId"] == "ServiceRequest/d1", case
                    continue
                updated = action["resource"]
                _SEEN_LABELS.add(s["label"].split(" ")[0])
                ServiceRequest.model_validate(updated)
                assert updated["id"] == "d1" and updated["subject"] == draft["subject"], case
                after = [c for c in _screen_one(chart, updated) if c["source"]["topic"]["code"] == rule]
                assert all(_RANK[c["indicator"]] < _RANK[card["indicator"]] for c in after), case
                # the human-readable text is rebuilt from the new content
                sites = [b["text"] for b in updated.get("bodySite", [])]
                names = " + ".join(C.TECHNIQUE_DISPLAY[t] for t in _techniques_of(updated))
                if names:
                    assert updated["code"]["text"] == (f"{names}: {'; '.join(sites)}" if sites else names), case
                for gone in {b["text"] for b in draft.get("bodySite", [])} - set(sites):
                    assert gone not in updated["code"]["text"], case
                if "light" in s["label"].lower():
                    assert _techniques_of(updated) and "swedish" in _techniques_of(updated), case
                    assert any(d["text"] == "Light pressure" for d in updated["orderDetail"]), case
                    cpts = [c["code"] for c in updated["code"]["coding"] if c["system"] == C.CPT]
                    assert cpts == list(dict.fromkeys(C.TECHNIQUE_CPT[t][0] for t in _techniques_of(updated))), case


def test_the_property_test_saw_every_kind_of_update():
    # guard for the parametrized test above (it runs first in file order): each kind of update was checked
    assert {"Remove", "Change", "Replace"} <= _SEEN_LABELS, _SEEN_LABELS


def test_light_pressure_alone_is_never_offered_and_light_swedish_is():
    chart = from_resources(_synthetic("anticoagulant"))
    cards = _screen_one(chart, massage_sr(sid="d1", patient="p1", sites=(LEG,)))
    card = next(c for c in cards if c["source"]["topic"]["code"] == "anticoagulant")
    labels = [s["label"] for s in card["suggestions"]]
    assert labels == ["Change to light-pressure Swedish massage", cc.CLEARANCE_LABEL]
    updated = card["suggestions"][0]["actions"][0]["resource"]
    assert updated["code"] == {"coding": [
        {"system": C.CPT, "code": "97124", "display": "Massage therapy"},
        {"system": C.TECHNIQUE_SYSTEM, "code": "swedish", "display": "Swedish massage"}],
        "text": "Swedish massage: Left lower leg"}
    assert updated["orderDetail"] == [{"coding": [{"system": C.ORDER_DETAIL_SYSTEM, "code": "pressure-light",
                                                   "display": "Light pressure"}], "text": "Light pressure"}]
    # a rule that concerns Swedish massage too (low platelets) gets no light-Swedish suggestion at all
    cards = _screen_one(from_resources(_synthetic("platelets-low")), massage_sr(sid="d1", patient="p1", sites=(LEG,)))
    card = next(c for c in cards if c["source"]["topic"]["code"] == "platelets-low")
    assert [s["label"] for s in card["suggestions"]] == [cc.CLEARANCE_LABEL]


def test_a_site_finding_on_an_order_without_sites_offers_no_site_restriction_but_says_what_would_clear_it():
    chart = from_resources(_synthetic("dvt-acute"))
    cards = _screen_one(chart, massage_sr(sid="d1", patient="p1", sites=()))
    card = next(c for c in cards if c["source"]["topic"]["code"] == "dvt-acute")
    assert [s["actions"][0]["type"] for s in card["suggestions"]] == ["create", "delete"]
    assert "name the body sites in the order" in card["detail"]


def test_updates_rebuild_the_precautions_note_and_drop_the_removed_sites_body_structure():
    target = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"
    draft = massage_sr(sid="d1", patient="p1", sites=(LEG, BACK))
    draft["extension"] = [{"url": target, "valueReference": {"reference": "BodyStructure/bs1",
                                                              "display": "Left lower leg"}}]
    draft["orderDetail"] = [
        {"coding": [{"system": C.ORDER_DETAIL_SYSTEM, "code": "schedule"}], "text": "1x/week for 4 weeks"},
        {"coding": [{"system": C.ORDER_DETAIL_SYSTEM, "code": "pressure-firm"}], "text": "Firm pressure: not on shins"}]
    draft["note"] = [{"text": "Precautions: Firm pressure: not on shins."}, {"text": "Patient prefers mornings"}]
    cards = _screen_one(from_resources(_synthetic("dvt-acute")), draft)
    card = next(c for c in cards if c["source"]["topic"]["code"] == "dvt-acute")
    updated = card["suggestions"][0]["actions"][0]["resource"]
    assert card["suggestions"][0]["label"] == "Remove Left lower leg from the order"
    assert "extension" not in updated and updated["code"]["text"] == "Deep tissue massage: Back"
    cards = _screen_one(from_resources(_synthetic("anticoagulant")), draft)
    card = next(c for c in cards if c["source"]["topic"]["code"] == "anticoagulant")
    updated = card["suggestions"][0]["actions"][0]["resource"]
    assert updated["orderDetail"][0]["text"] == "1x/week for 4 weeks"
    assert updated["orderDetail"][1]["text"] == "Light pressure: not on shins"
    assert updated["note"] == [{"text": "Precautions: Light pressure: not on shins."},
                               {"text": "Patient prefers mornings"}]
    assert updated["extension"] == draft["extension"]  # no site removed: the BodyStructure stays


def test_body_sites_are_matched_one_by_one_even_when_two_name_the_same_site():
    # order.sites is de-duplicated; pairing it with bodySite by position dropped the wrong concept
    draft = massage_sr(sid="d1", patient="p1", sites=(LEG, LEG, BACK))
    cards = _screen_one(from_resources(_synthetic("dvt-acute")), draft)
    card = next(c for c in cards if c["source"]["topic"]["code"] == "dvt-acute")
    updated = card["suggestions"][0]["actions"][0]["resource"]
    assert [b["text"] for b in updated["bodySite"]] == ["Back"]


# ---------------------------------------------------------------------------------------------------------------
# appContext of the smart link


def test_app_context_round_trips_for_the_launch_patient():
    raw = cc.app_context(patient_id="p1", order_ref="ServiceRequest/d1", rule_id="dvt-acute")
    assert json.loads(raw) == {"area": "orders", "patient": "p1", "rule": "dvt-acute", "serviceRequest":
                               "ServiceRequest/d1"}
    assert cc.parse_app_context(raw, patient_id="p1") == cc.AppContext("orders", "dvt-acute", "ServiceRequest/d1")


@pytest.mark.parametrize("raw, expected", [
    (None, None), (42, None), ("", None), ("orders", None), ("{not json", None), ("[1]", None),
    ('{"area": "plan", "patient": "p1"}', None),
    ('{"patient": "p1", "rule": "dvt-acute"}', None),
    ('{"area": "orders", "patient": "p2", "rule": "dvt-acute"}', None),
    ('{"area": "orders", "rule": "dvt-acute"}', None),
    ('{"area": "orders", "patient": "p1", "rule": "no-such-rule", "serviceRequest": "x/../y"}',
     cc.AppContext("orders", None, None)),
    ('{"area": "orders", "patient": "p1", "rule": ["dvt-acute"]}', cc.AppContext("orders", None, None)),
    ('{"area": "orders", "patient": "p1", "pad": "' + "x" * 3000 + '"}', None),
], ids=["none", "number", "empty", "plain-string", "bad-json", "json-list", "other-area", "no-area",
        "other-patient", "no-patient", "unknown-rule-and-bad-ref", "rule-not-string", "too-long"])
def test_app_context_that_is_not_ours_or_not_this_patients_is_ignored(raw, expected):
    assert cc.parse_app_context(raw, patient_id="p1") == expected
    assert cc.parse_app_context(raw, patient_id=None) is None


# ---------------------------------------------------------------------------------------------------------------
# information items (allergy to a massage product): an info card, never a contraindication card


def _latex(pid="p1", rid="a1"):
    return {"resourceType": "AllergyIntolerance", "id": rid, "patient": {"reference": f"Patient/{pid}"},
            "clinicalStatus": {"coding": [{"code": "active", "system":
                                           "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"}]},
            "code": {"coding": [{"system": C.SNOMED, "code": "300916003", "display": "Latex allergy"}],
                     "text": "Latex allergy"}}


def test_product_allergy_gives_one_info_card_without_suggestions():
    resources = [{"resourceType": "Patient", "id": "p1"}, _latex()]
    # two orders in one request: the allergy concerns the patient, so one card, not one per order
    drafts = [massage_sr(sid="d1", techniques=("swedish",), patient="p1"),
              massage_sr(sid="d2", techniques=("deep-tissue",), sites=(("77568009", "Back", "Back"),), patient="p1")]
    cards, records = cards_for(resources, drafts, patient="p1")
    assert len(cards) == 1
    card = cards[0]
    check_card_shape(card)
    assert card["indicator"] == "info" and card["summary"].startswith("For your information")
    assert card["source"]["topic"]["code"] == "allergy-massage-product"
    assert "suggestions" not in card and "overrideReasons" not in card and "links" not in card
    assert "AllergyIntolerance/a1" in card["detail"] and "latex-free" in card["detail"]
    assert "not a contraindication" in card["detail"] and "Evidence class" in card["detail"]
    rec = records[card["uuid"]]
    assert rec["rule"] == "allergy-massage-product" and rec["finding"] is None and rec["cls"] == "information"


def test_product_allergy_with_a_dvt_info_card_comes_after_the_critical_one():
    resources = hand_made_resources("demo-dana-whitfield", TODAY) + [_latex("demo-dana-whitfield")]
    cards, _ = cards_for(resources, [massage_sr()])
    topics = [c["source"]["topic"]["code"] for c in cards]
    assert topics[0] == "dvt-acute" and cards[0]["indicator"] == "critical"
    assert topics[-1] == "allergy-massage-product" and cards[-1]["indicator"] == "info"
    assert topics.count("allergy-massage-product") == 1
    for card in cards:
        check_card_shape(card)
