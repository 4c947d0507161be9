"""Each degradation `fhir-massage check` states (fhir_massage/readiness.py) shown as app behaviour, against a
`responses` EHR that lacks the capability: no batch, ignored _revinclude, If-None-Exist ignored, If-Match ignored,
no fhirUser, no refresh token. (No transaction: tests/http/test_writes_one_by_one.py and
tests/integration/test_no_transaction.py; no batch end to end: tests/integration/test_no_batch.py.)"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import responses

from fhir_massage import readiness
from fhir_massage.chart_fetch import chart_searches, fetch_chart_resources
from fhir_massage.errors import FhirNotFound, FhirUnavailable, LaunchError
from fhir_massage.fhir import FhirClient, batch_bundle, entry_outcomes, request_entry
from fhir_massage.writes import batch_or_each

BASE = "https://ehr.example.org/fhir"
NOT_SUPPORTED = {"resourceType": "OperationOutcome",
                 "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "no batch here"}]}


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


@pytest.fixture
def client():
    with FhirClient(BASE, max_retries=1, sleep=lambda s: None) as c:
        yield c


def degradation(report: readiness.Report, id_: str) -> str:
    return next(d.effect for d in report.degradations if d.id == id_)


# -- no-batch: "every page reads with one request per search instead of one batch: the same content" --------------


@responses.activate
def test_no_batch_chart_fetch_reads_search_by_search_and_the_screen_is_complete(client):
    responses.post(BASE, status=501, json=NOT_SUPPORTED)
    patient = {"resourceType": "Patient", "id": "p1"}
    responses.get(f"{BASE}/Patient/p1", json=patient)
    types = [rtype for rtype, _ in chart_searches("p1")]
    for rtype in set(types):
        responses.get(re.compile(rf"{BASE}/{rtype}\?.*"),
                      json=searchset({"resourceType": rtype, "id": f"{rtype.lower()}-1",
                                      "subject": {"reference": "Patient/p1"}}))
    found = fetch_chart_resources(client, "p1")
    assert found[0] == patient
    assert {r["resourceType"] for r in found[1:]} == set(types)  # every part of the chart, none an OperationOutcome
    gets = [c for c in responses.calls if c.request.method == "GET"]
    assert len(gets) == 1 + len(types)  # one request per search, plus the Patient


@responses.activate
def test_batch_or_each_repeats_the_gets_and_keeps_per_entry_errors(client):
    responses.post(BASE, status=501, json=NOT_SUPPORTED)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    responses.get(f"{BASE}/Practitioner/gone", status=404,
                  json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
    answer = batch_or_each(client, batch_bundle([request_entry("GET", "Patient/p1"),
                                                 request_entry("GET", "Practitioner/gone")]))
    first, second = entry_outcomes(answer)
    assert first.resource == {"resourceType": "Patient", "id": "p1"}
    assert isinstance(second, FhirNotFound)


@responses.activate
def test_batch_or_each_does_not_hammer_a_busy_server(client):
    responses.post(BASE, status=503, json={"resourceType": "OperationOutcome", "issue": []})
    with pytest.raises(FhirUnavailable):
        batch_or_each(client, batch_bundle([request_entry("GET", "Patient/p1")]))
    assert all(c.request.method == "POST" for c in responses.calls)  # no GET one by one


def test_no_batch_text():
    o = _obs()
    o.capability["rest"][0]["interaction"] = [{"code": "transaction"}]
    assert "one request per search instead of one batch: the same content" in degradation(
        readiness.build_report(o), "no-batch")


# -- no-include: "the orders' Tasks are found with one more search" ---------------------------------------------


@responses.activate
def test_ignored_revinclude_costs_one_more_task_search(client):
    from smart_app.plan import _missing_tasks

    orders = [{"resourceType": "ServiceRequest", "id": "a"}, {"resourceType": "ServiceRequest", "id": "b"},
              {"resourceType": "Task", "id": "t-b", "focus": {"reference": "ServiceRequest/b"}}]
    task_a = {"resourceType": "Task", "id": "t-a", "focus": {"reference": "ServiceRequest/a"}}
    responses.get(re.compile(rf"{BASE}/Task\?.*"), json=searchset(task_a))
    assert _missing_tasks(client, orders) == [task_a]
    (call,) = responses.calls
    assert parse_qs(urlsplit(call.request.url).query)["focus"] == ["ServiceRequest/a"]
    assert _missing_tasks(client, orders + [task_a]) == []  # nothing missing: no request
    assert len(responses.calls) == 1


def test_no_include_text_names_what_each_ignored_include_costs():
    o = _obs()
    for r in o.capability["rest"][0]["resource"]:
        r["searchInclude"], r["searchRevInclude"] = [], []
    text = degradation(readiness.build_report(o), "no-include")
    assert "_revinclude=Task:focus: the orders' Tasks are found with one more search" in text
    assert "_include=ServiceRequest:subject: the physician's panel lists patients by reference" in text


# -- no-conditional-create: "a repeated write may be saved twice" ------------------------------------------------


@responses.activate
def test_a_server_ignoring_if_none_exist_gets_a_second_copy_on_retry(client):
    saved = []

    def create(request):
        saved.append(orjson.loads(request.body))
        assert request.headers["If-None-Exist"] == "identifier=https%3A%2F%2Fapp%7Cx"  # the app marks it
        if len(saved) == 1:  # saved, but the gateway answers 503: the client repeats the create
            return 503, {}, b""
        return 201, {"Location": f"{BASE}/Communication/{len(saved)}"}, b""

    responses.add_callback(responses.POST, f"{BASE}/Communication", create)
    client.create({"resourceType": "Communication", "status": "completed"},
                  if_none_exist=[("identifier", "https://app|x")])
    assert len(saved) == 2  # what readiness warns about: the server ignored If-None-Exist, so two copies


def test_no_conditional_create_text():
    o = _obs()
    for r in o.capability["rest"][0]["resource"]:
        r.pop("conditionalCreate", None)
    assert "A repeated write may be saved twice" in degradation(readiness.build_report(o), "no-conditional-create")


# -- no-if-match: "the app still sends If-Match, but a server that ignores it lets the later save overwrite" -------


@responses.activate
def test_if_match_is_sent_and_a_server_ignoring_it_lets_the_later_save_win(client):
    responses.put(f"{BASE}/Task/t1", json={"resourceType": "Task", "id": "t1", "meta": {"versionId": "9"}})
    result = client.update({"resourceType": "Task", "id": "t1", "status": "on-hold"}, if_match="3")
    assert responses.calls[0].request.headers["If-Match"] == 'W/"3"'
    assert result.version_id == "9"  # no 412: the stale edit went through


# -- no openid / fhirUser: "it never writes an order or a session note without its author" ------------------------


def test_without_fhir_user_ordering_is_refused_in_plain_words():
    from smart_app import identity
    from smart_app.launch import LaunchContext
    from smart_app.orders import unavailable_reason
    from fhir_massage.smart import Scopes

    ctx = LaunchContext(sid="s", iss=BASE, fhir_base=BASE, client_id="c", patient_id="p1", encounter_id=None,
                        user_ref=None, user_name=None, role=identity.PHYSICIAN, role_source="asked",
                        scopes=Scopes.parse("launch patient/*.cruds"), need_patient_banner=False, intent=None,
                        style=False, banner=None, standalone=False)
    title, words, _ = unavailable_reason(ctx)
    assert title == "Ordering is unavailable" and "no fhirUser" in words


def test_no_openid_text_matches_that_behaviour():
    from tests.http.test_readiness import _without_cap

    text = degradation(readiness.build_report(_without_cap("sso-openid-connect")), "openid")
    assert "never writes an order or a session note without its author" in text


# -- no refresh: "sessions end when the access token expires (the app says so)" ------------------------------------


def test_without_a_refresh_token_the_session_ends_when_the_token_expires():
    from smart_app.launch import NS_TOKENS, SessionTokenSource
    from smart_app.store import SQLiteStore

    store = SQLiteStore(":memory:")
    store.put(NS_TOKENS, "sid", {"access_token": "at", "expires_at": time.time() - 1, "lifetime": 600}, 600)
    called = []
    source = SessionTokenSource(store, "sid", lambda rt, scope: called.append(rt))
    with pytest.raises(LaunchError) as caught:
        source.token()
    assert caught.value.code == "session-ended" and called == []
    assert "Your session with the EHR has ended" in caught.value.message  # what the page says


def test_no_refresh_text_matches_that_behaviour():
    from tests.http.test_readiness import _without_cap

    o = _without_cap("permission-online")
    o.smart_doc["capabilities"] = [c for c in o.smart_doc["capabilities"] if c != "permission-offline"]
    text = degradation(readiness.build_report(o), "refresh")
    assert "Sessions end when the access token expires (the app says so)" in text
    assert "kept as a draft" in text  # tests/integration/test_documentation.py: refresh refused keeps the draft


# ---------------------------------------------------------------------------------------------------------------


def _obs() -> readiness.Observations:
    """A fully capable server (every need, every include, transaction and batch), to take things away from."""
    resources = []
    for need in readiness.RESOURCE_NEEDS:
        resources.append({
            "type": need.type, "interaction": [{"code": c} for c in ("read", "search-type", "create", "update")],
            "versioning": "versioned-update", "conditionalCreate": True,
            "searchParam": [{"name": n, "type": "token"} for n in ("patient", "category", "status", "based-on",
                                                                    "focus", "target")],
            "searchInclude": [v for t, k, v in readiness.INCLUDES if k == "_include" and t == need.type],
            "searchRevInclude": [v for t, k, v in readiness.INCLUDES if k == "_revinclude" and t == need.type]})
    cap = {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "format": ["json"],
           "rest": [{"mode": "server", "resource": resources,
                     "interaction": [{"code": "transaction"}, {"code": "batch"}]}]}
    return readiness.Observations(BASE, metadata_status=200, capability=cap)
