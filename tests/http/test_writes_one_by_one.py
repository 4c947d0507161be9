"""fhir_massage.writes.write_bundle against a `responses` EHR without transactions: entries in a safe order,
urn:uuid references resolved to the ids the server gave, the order/findings cycle written as order -> findings ->
order update (If-Match), conditional creates kept (a retry duplicates nothing), partial failure reported."""

from __future__ import annotations

import re
from urllib.parse import parse_qs

import orjson
import pytest
import responses

from fhir_massage.errors import FhirConflict, FhirUnavailable
from fhir_massage.fhir import FhirClient, request_entry, transaction_bundle
from fhir_massage.writes import CapabilityCache, EntryNotWritten, write_bundle

BASE = "https://ehr.example.org/fhir"
SR, TASK, DI1, DI2 = (f"urn:uuid:0000000{i}-0000-4000-8000-000000000000" for i in range(1, 5))


def ident(value: str) -> list[dict]:
    return [{"system": "https://app.example/id", "value": value}]


def order_bundle() -> dict:
    """The shape of builders.order.order_transaction: SR <-> DetectedIssues cycle, Task -> SR, Provenance PUT."""
    return transaction_bundle([
        request_entry("POST", "ServiceRequest", {"resourceType": "ServiceRequest", "identifier": ident("sr"),
                                                 "status": "active", "supportingInfo": [{"reference": DI1},
                                                                                        {"reference": DI2}]},
                      full_url=SR, if_none_exist=[("identifier", "https://app.example/id|sr")]),
        request_entry("POST", "Task", {"resourceType": "Task", "identifier": ident("task"), "focus": {"reference": SR}},
                      full_url=TASK, if_none_exist=[("identifier", "https://app.example/id|task")]),
        request_entry("POST", "DetectedIssue", {"resourceType": "DetectedIssue", "identifier": ident("di1"),
                                                "implicated": [{"reference": SR}]},
                      full_url=DI1, if_none_exist=[("identifier", "https://app.example/id|di1")]),
        request_entry("POST", "DetectedIssue", {"resourceType": "DetectedIssue", "identifier": ident("di2"),
                                                "implicated": [{"reference": SR}]},
                      full_url=DI2, if_none_exist=[("identifier", "https://app.example/id|di2")]),
        request_entry("PUT", "Provenance/prov-1", {"resourceType": "Provenance", "target": [
            {"reference": u} for u in (SR, TASK, DI1, DI2)]}),
    ])


class MiniEhr:
    """Creates (honouring If-None-Exist on identifier), reads and If-Match updates; no transaction (501)."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.store: dict[str, dict] = {}
        self.log: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.fail: dict[tuple[str, str], int] = {}  # (method, type) -> status, once
        self.counter = 0
        rsps.add_callback(responses.POST, re.compile(rf"{BASE}/?$"), self.transaction)
        rsps.add_callback(responses.POST, re.compile(rf"{BASE}/[A-Za-z]+$"), self.create)
        rsps.add_callback(responses.PUT, re.compile(rf"{BASE}/[A-Za-z]+/[\w.-]+$"), self.update)
        rsps.add_callback(responses.GET, re.compile(rf"{BASE}/[A-Za-z]+/[\w.-]+$"), self.read)

    def _json(self, status: int, body: dict, headers: dict | None = None):
        return status, {"Content-Type": "application/fhir+json", **(headers or {})}, orjson.dumps(body)

    def _failure(self, method: str, rtype: str):
        status = self.fail.pop((method, rtype), None)
        if status:
            return self._json(status, {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "transient", "diagnostics": f"{rtype} refused for the test"}]})
        return None

    def transaction(self, request):
        self.log.append(("POST", "/", dict(request.headers)))
        return self._json(501, {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-supported", "diagnostics": "no transactions here"}]})

    def create(self, request):
        rtype = request.path_url.rsplit("/", 1)[1]
        self.log.append(("POST", rtype, dict(request.headers)))
        failure = self._failure("POST", rtype)
        if failure:
            return failure
        body = orjson.loads(request.body)
        cond = request.headers.get("If-None-Exist")
        if cond:
            value = parse_qs(cond)["identifier"][0].split("|", 1)[1]
            for key, res in self.store.items():
                if key.startswith(f"{rtype}/") and res["identifier"][0]["value"] == value:
                    return self._json(200, res, {"ETag": f'W/"{res["meta"]["versionId"]}"'})
        self.counter += 1
        body["id"] = f"{rtype.lower()}-{self.counter}"
        body["meta"] = {"versionId": "1"}
        self.store[f"{rtype}/{body['id']}"] = body
        return self._json(201, body, {"Location": f"{BASE}/{rtype}/{body['id']}/_history/1", "ETag": 'W/"1"'})

    def update(self, request):
        rtype, rid = request.path_url.split("/")[-2:]
        self.log.append(("PUT", f"{rtype}/{rid}", dict(request.headers)))
        failure = self._failure("PUT", rtype)
        if failure:
            return failure
        body = orjson.loads(request.body)
        current = self.store.get(f"{rtype}/{rid}")
        match = request.headers.get("If-Match")
        if match and (current is None or match != f'W/"{current["meta"]["versionId"]}"'):
            return self._json(412, {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "conflict", "diagnostics": "version conflict"}]})
        version = str(int(current["meta"]["versionId"]) + 1) if current else "1"
        body["meta"] = {"versionId": version}
        self.store[f"{rtype}/{rid}"] = body
        return self._json(200 if current else 201, body, {"ETag": f'W/"{version}"'})

    def read(self, request):
        rtype, rid = request.path_url.split("/")[-2:]
        res = self.store.get(f"{rtype}/{rid}")
        return self._json(200, res) if res else self._json(404, {"resourceType": "OperationOutcome", "issue": []})

    def by_type(self, rtype: str) -> list[dict]:
        return [r for k, r in self.store.items() if k.startswith(f"{rtype}/")]


@pytest.fixture
def ehr():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield MiniEhr(rsps)


@pytest.fixture
def client():
    with FhirClient(BASE, max_retries=0, sleep=lambda s: None) as c:
        yield c


def test_without_transaction_the_order_lands_first_then_findings_then_the_link(ehr, client):
    outcome = write_bundle(client, order_bundle(), transactions=False)
    assert not outcome.atomic and outcome.complete and outcome.failed == []
    steps = [(m, p) for m, p, _ in ehr.log]
    # No transaction was tried (the capability said no); the order first, the Provenance last.
    assert steps == [("POST", "ServiceRequest"), ("POST", "Task"), ("POST", "DetectedIssue"),
                     ("POST", "DetectedIssue"), ("PUT", "ServiceRequest/servicerequest-1"),
                     ("PUT", "Provenance/prov-1")]
    creates = [h for m, p, h in ehr.log if m == "POST"]
    assert all(h.get("If-None-Exist", "").startswith("identifier=") for h in creates)
    # urn:uuid references resolved to the server's ids.
    (sr,) = ehr.by_type("ServiceRequest")
    (task,) = ehr.by_type("Task")
    dis = ehr.by_type("DetectedIssue")
    assert task["focus"] == {"reference": f"ServiceRequest/{sr['id']}"}
    assert all(d["implicated"] == [{"reference": f"ServiceRequest/{sr['id']}"}] for d in dis)
    assert sr["supportingInfo"] == [{"reference": f"DetectedIssue/{d['id']}"} for d in dis]
    assert sr["meta"]["versionId"] == "2"  # created without supportingInfo, then updated with it
    link_put = next(h for m, p, h in ehr.log if m == "PUT" and p.startswith("ServiceRequest"))
    assert link_put["If-Match"] == 'W/"1"'
    (prov,) = ehr.by_type("Provenance")
    assert [t["reference"] for t in prov["target"]] == [f"ServiceRequest/{sr['id']}", f"Task/{task['id']}"] + [
        f"DetectedIssue/{d['id']}" for d in dis]
    assert outcome.by_type() == {"ServiceRequest": [sr["id"]], "Task": [task["id"]],
                                 "DetectedIssue": [d["id"] for d in dis], "Provenance": ["prov-1"]}
    assert len(outcome.written) == 6  # five entries plus the link update


def test_unknown_support_tries_the_transaction_and_falls_back_on_501(ehr, client):
    outcome = write_bundle(client, order_bundle(), transactions=None)
    assert [p for _, p, _ in ehr.log][:2] == ["/", "ServiceRequest"]
    assert not outcome.atomic and outcome.complete


def test_partial_failure_says_what_landed_and_a_retry_finishes_only_what_is_missing(ehr, client):
    ehr.fail[("POST", "DetectedIssue")] = 503
    outcome = write_bundle(client, order_bundle(), transactions=False)
    assert not outcome.atomic and not outcome.complete
    assert outcome.by_type() == {"ServiceRequest": ["servicerequest-1"], "Task": ["task-2"]}
    failed = [(e.get("resource") or {}).get("resourceType") or e["request"]["url"] for e, _ in outcome.failed]
    assert failed == ["ServiceRequest", "DetectedIssue", "DetectedIssue", "Provenance"]
    errors = dict(zip(failed[1:], [err for _, err in outcome.failed[1:]]))
    assert isinstance(outcome.failed[1][1], FhirUnavailable) and outcome.failed[1][1].status == 503
    assert isinstance(outcome.failed[0][1], EntryNotWritten)  # saved, but without its links to the findings
    assert isinstance(errors["Provenance"], EntryNotWritten) and "Not sent" in errors["Provenance"].message
    assert outcome.missing_types() == ["ServiceRequest", "DetectedIssue", "Provenance"]
    assert ehr.by_type("DetectedIssue") == [] and ehr.by_type("Provenance") == []

    ehr.log.clear()
    again = write_bundle(client, order_bundle(), transactions=False)
    assert again.complete
    assert len(ehr.by_type("ServiceRequest")) == 1 and len(ehr.by_type("Task")) == 1  # matched, not duplicated
    assert len(ehr.by_type("DetectedIssue")) == 2 and len(ehr.by_type("Provenance")) == 1
    (sr,) = ehr.by_type("ServiceRequest")
    assert len(sr["supportingInfo"]) == 2


def test_a_complete_retry_writes_nothing_new(ehr, client):
    write_bundle(client, order_bundle(), transactions=False)
    before = {k: v["meta"]["versionId"] for k, v in ehr.store.items()}
    ehr.log.clear()
    again = write_bundle(client, order_bundle(), transactions=False)
    assert again.complete
    assert not any(m == "PUT" and p.startswith("ServiceRequest") for m, p, _ in ehr.log)  # link already there
    after = {k: v["meta"]["versionId"] for k, v in ehr.store.items()}
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if not k.startswith("Provenance")} == {
        k: v for k, v in before.items() if not k.startswith("Provenance")}


def test_nothing_saved_raises_like_a_refused_transaction(ehr, client):
    ehr.fail[("POST", "ServiceRequest")] = 503
    with pytest.raises(FhirUnavailable):
        write_bundle(client, order_bundle(), transactions=False)
    assert ehr.store == {}


def test_put_keeps_if_match_and_a_conflict_stops_the_run(ehr, client):
    ehr.store["Task/t1"] = {"resourceType": "Task", "id": "t1", "meta": {"versionId": "3"}}
    bundle = transaction_bundle([
        request_entry("POST", "Procedure", {"resourceType": "Procedure", "identifier": ident("p")},
                      full_url=SR, if_none_exist=[("identifier", "https://app.example/id|p")]),
        request_entry("PUT", "Task/t1", {"resourceType": "Task", "output": [{"valueReference": {"reference": SR}}]},
                      if_match="2"),
        request_entry("PUT", "Provenance/p1", {"resourceType": "Provenance", "target": [{"reference": SR}]}),
    ])
    outcome = write_bundle(client, bundle, transactions=False)
    put = next(h for m, p, h in ehr.log if p == "Task/t1")
    assert put["If-Match"] == 'W/"2"'
    assert outcome.by_type() == {"Procedure": ["procedure-1"]}
    assert isinstance(outcome.failed[0][1], FhirConflict)
    assert outcome.missing_types() == ["Task", "Provenance"]


def test_transaction_supported_posts_one_bundle(client):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, BASE, json={"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": f"ServiceRequest/{i}/_history/1"}} for i in
            ("s", "t", "d1", "d2")] + [{"response": {"status": "200 OK", "location": "Provenance/prov-1/_history/1"}}]})
        outcome = write_bundle(client, order_bundle(), transactions=True)
    assert outcome.atomic and outcome.complete and len(outcome.written) == 5
    assert outcome.ids[SR] == "ServiceRequest/s"


def test_capability_cache_reads_metadata_once_per_base(client):
    cache = CapabilityCache(ttl=60, clock=lambda: 0.0)
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", json={
            "resourceType": "CapabilityStatement", "rest": [{"mode": "server", "interaction": [{"code": "batch"}]}]})
        assert cache.transactions(client) is False
        assert cache.transactions(client) is False
        assert len(rsps.calls) == 1


def test_the_app_learns_once_per_ehr_that_it_takes_no_transaction(ehr, client):
    from flask import Flask

    from smart_app import writes as app_writes

    with Flask("t").app_context():
        first = app_writes.write(client, order_bundle())
        assert not first.atomic and not app_writes.atomic(client)
        assert [p for _, p, _ in ehr.log].count("/") == 1  # tried the transaction once, answered 501
        ehr.log.clear()
        again = app_writes.write(client, order_bundle())
        assert again.complete and "/" not in [p for _, p, _ in ehr.log]  # straight to one by one
