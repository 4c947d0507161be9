"""FhirClient edge cases a real server can't easily produce: paging loops, Retry-After, dropped connections,
401 refresh, foreign paging links, broken bodies. HTTP is faked with ``responses``; sleeps are injected."""

from __future__ import annotations

import email.utils
from urllib.parse import parse_qs

import orjson
import pytest
import requests
import responses
from responses import matchers

from fhir_massage.errors import (FhirAuthError, FhirConflict, FhirError, FhirNotFound, FhirUnavailable,
                                 InvalidInput)
from fhir_massage.fhir import (FhirClient, FhirResult, StaticToken, batch_bundle, entry_outcomes, new_urn,
                               request_entry, resources, transaction_bundle)

BASE = "https://ehr.example.org/fhir"
NOW = 1_800_000_000.0  # the injected clock


def outcome(*diagnostics: str, code: str = "processing") -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": d} for d in diagnostics]}


def searchset(ids: list[str], next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": {"resourceType": "Patient", "id": i}, "search": {"mode": "match"}} for i in ids]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class Tokens:
    def __init__(self, first: str | None, refreshed: str | None) -> None:
        self.current, self.next, self.refreshes = first, refreshed, 0

    def token(self) -> str | None:
        return self.current

    def refresh(self) -> str | None:
        self.refreshes += 1
        self.current = self.next
        return self.next


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps) -> FhirClient:
    return FhirClient(BASE, sleep=sleeps, clock=lambda: NOW, jitter=lambda: 0.5)


def auth_headers(call) -> str | None:
    return call.request.headers.get("Authorization")


# --- reads and typed errors ------------------------------------------------------------------------------------


@responses.activate
def test_read_sends_fhir_accept_and_returns_plain_dict(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"},
                  match=[matchers.header_matcher({"Accept": "application/fhir+json"})])
    assert client.read("Patient", "p1") == {"resourceType": "Patient", "id": "p1"}
    assert client.request_count == 1


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, FhirError), (401, FhirAuthError), (403, FhirAuthError), (404, FhirNotFound), (410, FhirNotFound),
     (409, FhirConflict), (412, FhirConflict), (422, FhirError), (429, FhirUnavailable), (500, FhirUnavailable),
     (503, FhirUnavailable)],
    ids=lambda v: str(v) if isinstance(v, int) else v.__name__,
)
@responses.activate
def test_status_becomes_typed_error_with_outcome_words(status: int, cls: type, sleeps: Sleeps) -> None:
    client = FhirClient(BASE, max_retries=0, sleep=sleeps)
    responses.get(f"{BASE}/Patient/p1", status=status, json=outcome("Patient p1 is locked by a merge"))
    with pytest.raises(cls) as info:
        client.read("Patient", "p1")
    err = info.value
    assert type(err) is cls
    assert err.status == status
    assert err.outcome["issue"][0]["diagnostics"] == "Patient p1 is locked by a merge"
    assert "Patient p1 is locked by a merge" in err.message
    assert str(status) in err.message
    assert err.url == f"{BASE}/Patient/p1"


@responses.activate
def test_error_message_uses_details_text_and_coding_not_raw_body(client: FhirClient) -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "details": {"text": "Birth date is in the future"},
         "expression": ["Patient.birthDate"]},
        {"severity": "error", "code": "invalid", "details": {"coding": [{"code": "MSG_X", "display": "Bad gender"}]}},
    ]}
    responses.post(f"{BASE}/Patient", status=422, json=body)
    with pytest.raises(FhirError) as info:
        client.create({"resourceType": "Patient"})
    message = info.value.message
    assert "Birth date is in the future (at Patient.birthDate)" in message
    assert "Bad gender" in message
    assert "resourceType" not in message and "{" not in message


@responses.activate
def test_error_message_does_not_repeat_a_path_already_in_diagnostics(client: FhirClient) -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "structure", "diagnostics": "Extra inputs (Patient.foo)",
         "expression": ["Patient.foo"]}]}
    responses.post(f"{BASE}/Patient", status=400, json=body)
    with pytest.raises(FhirError) as info:
        client.create({"resourceType": "Patient"})
    assert info.value.message.count("Patient.foo") == 1


@responses.activate
def test_error_without_outcome_says_so_and_hides_query(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", status=400, body="<html>nope</html>", content_type="text/html")
    with pytest.raises(FhirError) as info:
        client.search("Patient", {"name": "Secretname"})
    assert "no explanation" in info.value.message
    assert "Secretname" not in info.value.message and "Secretname" not in (info.value.url or "")
    assert "<html>" not in info.value.message


@responses.activate
def test_non_json_success_body_is_a_clear_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", body="<Patient/>", content_type="application/fhir+xml")
    with pytest.raises(FhirError, match=r"not JSON \(application/fhir\+xml\)") as info:
        client.read("Patient", "p1")
    assert info.value.code == "fhir-bad-body"


@responses.activate
def test_wrong_resource_type_is_a_clear_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Observation", "id": "p1"})
    with pytest.raises(FhirError, match="Expected a Patient .* got Observation"):
        client.read("Patient", "p1")


@responses.activate
def test_search_answer_that_is_not_a_searchset_is_an_error(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=[1, 2])
    with pytest.raises(FhirError, match="searchset"):
        client.search("Patient")


def test_bad_ids_and_types_are_refused_before_any_request(client: FhirClient) -> None:
    with pytest.raises(InvalidInput):
        client.read("Patient", "../metadata")
    with pytest.raises(InvalidInput):
        client.read("patient", "1")
    assert client.request_count == 0


def test_base_url_must_be_absolute() -> None:
    with pytest.raises(InvalidInput):
        FhirClient("ehr.example.org/fhir")


# --- paging ----------------------------------------------------------------------------------------------------


@responses.activate
def test_paging_follows_next_links_relative_and_absolute(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=searchset(["a", "b"], f"{BASE}/Patient?page=2"),
                  match=[matchers.query_param_matcher({"family": "Smith"})])
    responses.get(f"{BASE}/Patient", json=searchset(["c"], "Patient?page=3"),
                  match=[matchers.query_param_matcher({"page": "2"})])
    responses.get(f"{BASE}/Patient", json=searchset(["d"]), match=[matchers.query_param_matcher({"page": "3"})])
    assert [r["id"] for r in client.search_all("Patient", {"family": "Smith"})] == ["a", "b", "c", "d"]
    assert client.request_count == 3


@responses.activate
def test_paging_loop_is_detected(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=searchset(["a"], f"{BASE}/Patient?page=2"),
                  match=[matchers.query_param_matcher({})])
    responses.get(f"{BASE}/Patient", json=searchset(["b"], f"{BASE}/Patient?page=2"),
                  match=[matchers.query_param_matcher({"page": "2"})])
    with pytest.raises(FhirError, match="paging loops") as info:
        client.search_all("Patient")
    assert info.value.code == "fhir-paging"
    assert client.request_count == 2


@responses.activate
def test_next_link_back_to_the_first_page_is_a_loop(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=searchset(["a"], f"{BASE}/Patient?family=X"))
    with pytest.raises(FhirError, match="paging loops"):
        client.search_all("Patient", {"family": "X"})
    assert client.request_count == 1


@responses.activate
def test_page_cap_stops_an_endless_search(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, page_cap=3, sleep=sleeps)
    for n in range(1, 6):
        query = {} if n == 1 else {"page": str(n)}
        responses.get(f"{BASE}/Patient", json=searchset([f"p{n}"], f"{BASE}/Patient?page={n + 1}"),
                      match=[matchers.query_param_matcher(query)])
    pages = client.iter_pages("Patient")
    got = [next(pages), next(pages), next(pages)]
    assert [resources(p)[0]["id"] for p in got] == ["p1", "p2", "p3"]
    with pytest.raises(FhirError, match="more than 3 pages"):
        next(pages)
    assert client.request_count == 3


@responses.activate
def test_page_cap_per_call_overrides_client_default(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=searchset(["a"], f"{BASE}/Patient?page=2"),
                  match=[matchers.query_param_matcher({})])
    with pytest.raises(FhirError, match="more than 1 pages"):
        client.search_all("Patient", page_cap=1)


@responses.activate
def test_next_link_to_another_origin_is_refused_without_sending_the_token(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, token_source=StaticToken("secret-token"), sleep=sleeps)
    responses.get(f"{BASE}/Patient", json=searchset(["a"], "https://evil.example.com/fhir/Patient?page=2"))
    with pytest.raises(FhirError, match="another server") as info:
        client.search_all("Patient")
    assert info.value.code == "fhir-other-origin"
    assert len(responses.calls) == 1
    assert auth_headers(responses.calls[0]) == "Bearer secret-token"


@responses.activate
def test_same_host_other_port_is_another_origin(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient", json=searchset(["a"], "https://ehr.example.org:8443/fhir/Patient?page=2"))
    with pytest.raises(FhirError, match="another server"):
        client.search_all("Patient")


def test_get_url_refuses_other_origin(client: FhirClient) -> None:
    with pytest.raises(FhirError, match="another server"):
        client.get_url("http://ehr.example.org/.well-known/smart-configuration")  # http vs https
    assert client.request_count == 0


@responses.activate
def test_get_url_on_same_server_carries_token(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, token_source=StaticToken("t1"), sleep=sleeps)
    responses.get("https://ehr.example.org/.well-known/smart-configuration", json={"issuer": "x"})
    assert client.get_url("https://ehr.example.org/.well-known/smart-configuration") == {"issuer": "x"}
    assert auth_headers(responses.calls[0]) == "Bearer t1"


@responses.activate
def test_redirect_is_not_followed(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", status=302, headers={"Location": "https://elsewhere.example/Patient/p1"})
    with pytest.raises(FhirError, match="redirects are not followed"):
        client.read("Patient", "p1")
    assert len(responses.calls) == 1


# --- long searches -----------------------------------------------------------------------------------------------


@responses.activate
def test_long_search_switches_to_post_search(client: FhirClient) -> None:
    codes = ",".join(f"http://snomed.info/sct|{100000 + i}" for i in range(80))
    responses.post(f"{BASE}/Condition/_search", json=searchset([]),
                   match=[matchers.header_matcher({"Content-Type": "application/x-www-form-urlencoded"})])
    client.search("Condition", {"patient": "p1", "code": codes})
    sent = parse_qs(responses.calls[0].request.body.decode())
    assert sent["code"] == [codes] and sent["patient"] == ["p1"]


@responses.activate
def test_short_search_uses_get_and_post_on_request(client: FhirClient) -> None:
    responses.get(f"{BASE}/Condition", json=searchset([]),
                  match=[matchers.query_param_matcher({"patient": "p1"})])
    responses.post(f"{BASE}/Condition/_search", json=searchset([]))
    client.search("Condition", {"patient": "p1"})
    client.search("Condition", {"patient": "p1"}, method="post")
    assert [c.request.method for c in responses.calls] == ["GET", "POST"]


@responses.activate
def test_repeated_parameters_from_a_list(client: FhirClient) -> None:
    responses.get(f"{BASE}/Observation", json=searchset([]))
    client.search("Observation", {"date": ["ge2024-01-01", "le2024-12-31"]})
    assert parse_qs(responses.calls[0].request.url.split("?", 1)[1])["date"] == ["ge2024-01-01", "le2024-12-31"]


# --- retries ---------------------------------------------------------------------------------------------------


@responses.activate
def test_get_is_retried_on_503_with_backoff(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", status=503)
    responses.get(f"{BASE}/Patient/p1", status=503)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    assert client.read("Patient", "p1")["id"] == "p1"
    assert client.request_count == 3
    # jitter 0.5 -> 3/4 of the exponential delay (0.5 s, then 1 s)
    assert sleeps == [pytest.approx(0.375), pytest.approx(0.75)]


@responses.activate
def test_get_is_retried_on_dropped_connection(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", body=requests.ConnectionError("connection reset"))
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    assert client.read("Patient", "p1")["id"] == "p1"
    assert client.request_count == 2 and len(sleeps) == 1


@responses.activate
def test_retries_give_up_after_max_retries(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, max_retries=2, sleep=sleeps, jitter=lambda: 1.0, backoff_base=1, backoff_cap=1.5)
    responses.get(f"{BASE}/Patient/p1", status=504, json=outcome("upstream timed out"))
    with pytest.raises(FhirUnavailable, match="upstream timed out") as info:
        client.read("Patient", "p1")
    assert info.value.retryable
    assert client.request_count == 3
    assert sleeps == [1.0, 1.5]  # capped


@responses.activate
def test_timeout_becomes_unavailable(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, max_retries=1, sleep=sleeps)
    responses.get(f"{BASE}/Patient/p1", body=requests.ReadTimeout("slow"))
    with pytest.raises(FhirUnavailable, match="timed out on GET /fhir/Patient/p1 after 2 attempts"):
        client.read("Patient", "p1")


@responses.activate
def test_retry_after_seconds_is_honoured(client: FhirClient, sleeps: Sleeps) -> None:
    responses.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert sleeps == [7.0]


@responses.activate
def test_retry_after_http_date_is_honoured(client: FhirClient, sleeps: Sleeps) -> None:
    when = email.utils.formatdate(NOW + 12, usegmt=True)
    responses.get(f"{BASE}/Patient/p1", status=503, headers={"Retry-After": when})
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert sleeps == [pytest.approx(12.0)]


@responses.activate
def test_retry_after_is_capped(sleeps: Sleeps) -> None:
    client = FhirClient(BASE, max_retry_wait=5, sleep=sleeps, clock=lambda: NOW)
    responses.get(f"{BASE}/Patient/p1", status=503, headers={"Retry-After": "3600"})
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    client.read("Patient", "p1")
    assert sleeps == [5.0]


@responses.activate
def test_plain_post_is_never_retried(client: FhirClient, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Patient", status=503, headers={"Retry-After": "1"})
    with pytest.raises(FhirUnavailable) as info:
        client.create({"resourceType": "Patient"})
    assert client.request_count == 1 and sleeps == []
    assert info.value.retry_after == 1.0


@responses.activate
def test_plain_post_is_not_retried_on_dropped_connection(client: FhirClient, sleeps: Sleeps) -> None:
    responses.post(f"{BASE}/Patient", body=requests.ConnectionError("reset after send"))
    with pytest.raises(FhirUnavailable, match="dropped the connection"):
        client.create({"resourceType": "Patient"})
    assert client.request_count == 1 and sleeps == []


@responses.activate
def test_conditional_create_is_retried(client: FhirClient) -> None:
    responses.post(f"{BASE}/Patient", body=requests.ConnectionError("reset"))
    responses.post(f"{BASE}/Patient", status=200, json={"resourceType": "Patient", "id": "existing"})
    result = client.create({"resourceType": "Patient"}, if_none_exist={"identifier": "urn:mrn|1"})
    assert result.status == 200 and not result.created and result.id == "existing"
    assert client.request_count == 2


@responses.activate
def test_transaction_of_conditional_entries_is_retried_but_not_with_a_plain_post(client: FhirClient) -> None:
    safe = [request_entry("POST", "Patient", {"resourceType": "Patient"}, if_none_exist="identifier=urn:mrn|1"),
            request_entry("PUT", "Patient/p1", {"resourceType": "Patient", "id": "p1"}, if_match="3"),
            request_entry("DELETE", "Flag/f1")]
    unsafe = [*safe, request_entry("POST", "Observation", {"resourceType": "Observation"})]
    ok = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    responses.post(BASE, status=503)
    responses.post(BASE, json=ok)
    client.transaction(safe)
    assert client.request_count == 2
    responses.replace(responses.POST, BASE, status=503)
    with pytest.raises(FhirUnavailable):
        client.transaction(unsafe)
    assert client.request_count == 3


@responses.activate
def test_put_is_retried(client: FhirClient) -> None:
    responses.put(f"{BASE}/Patient/p1", status=502)
    responses.put(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1", "meta": {"versionId": "4"}})
    assert client.update({"resourceType": "Patient", "id": "p1"}).version_id == "4"
    assert client.request_count == 2


@responses.activate
def test_500_is_not_retried(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", status=500, json=outcome("NullPointerException"))
    with pytest.raises(FhirUnavailable):
        client.read("Patient", "p1")
    assert client.request_count == 1


# --- tokens ----------------------------------------------------------------------------------------------------


@responses.activate
def test_401_refreshes_once_and_retries_once(sleeps: Sleeps) -> None:
    tokens = Tokens("old", "new")
    client = FhirClient(BASE, token_source=tokens, sleep=sleeps)
    responses.post(f"{BASE}/Patient", status=401, json=outcome("token expired", code="login"))
    responses.post(f"{BASE}/Patient", status=201, json={"resourceType": "Patient", "id": "p9"})
    result = client.create({"resourceType": "Patient"})  # a 401 means nothing was done, so even POST repeats
    assert result.created and tokens.refreshes == 1
    assert [auth_headers(c) for c in responses.calls] == ["Bearer old", "Bearer new"]


@responses.activate
def test_401_twice_is_an_auth_error_after_one_refresh(sleeps: Sleeps) -> None:
    tokens = Tokens("old", "new")
    client = FhirClient(BASE, token_source=tokens, sleep=sleeps)
    responses.get(f"{BASE}/Patient/p1", status=401, json=outcome("token expired", code="login"))
    with pytest.raises(FhirAuthError, match="refreshing it did not help"):
        client.read("Patient", "p1")
    assert tokens.refreshes == 1 and client.request_count == 2


@responses.activate
def test_401_without_a_refreshed_token_is_not_repeated(sleeps: Sleeps) -> None:
    tokens = Tokens("old", None)
    client = FhirClient(BASE, token_source=tokens, sleep=sleeps)
    responses.get(f"{BASE}/Patient/p1", status=401)
    with pytest.raises(FhirAuthError):
        client.read("Patient", "p1")
    assert tokens.refreshes == 1 and client.request_count == 1


@responses.activate
def test_401_without_outcome_uses_the_bearer_challenge(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", status=401,
                  headers={"WWW-Authenticate": 'Bearer error="invalid_token", error_description="The token expired"'})
    with pytest.raises(FhirAuthError, match="401 Unauthorized: The token expired") as info:
        client.read("Patient", "p1")
    assert info.value.retry_after is None


def test_none_parameters_are_left_out(client: FhirClient) -> None:
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Observation", json=searchset([]),
                 match=[matchers.query_param_matcher({"patient": "p1"})])
        client.search("Observation", {"patient": "p1", "date": None})


@responses.activate
def test_403_does_not_refresh(sleeps: Sleeps) -> None:
    tokens = Tokens("old", "new")
    client = FhirClient(BASE, token_source=tokens, sleep=sleeps)
    responses.get(f"{BASE}/Patient/p1", status=403, json=outcome("scope patient/Patient.r missing"))
    with pytest.raises(FhirAuthError, match="scope patient/Patient.r missing"):
        client.read("Patient", "p1")
    assert tokens.refreshes == 0


@responses.activate
def test_no_token_source_sends_no_authorization(client: FhirClient) -> None:
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    client.capabilities()
    assert auth_headers(responses.calls[0]) is None


def test_static_token_repr_hides_token() -> None:
    assert "abc" not in repr(StaticToken("abc"))


# --- writes ----------------------------------------------------------------------------------------------------


@responses.activate
def test_create_sends_content_type_prefer_and_if_none_exist(client: FhirClient) -> None:
    responses.post(
        f"{BASE}/Patient", status=201, json={"resourceType": "Patient", "id": "n1", "meta": {"versionId": "1"}},
        headers={"Location": f"{BASE}/Patient/n1/_history/1", "ETag": 'W/"1"'},
        match=[matchers.header_matcher({"Content-Type": "application/fhir+json", "Prefer": "return=representation",
                                        "If-None-Exist": "identifier=urn%3Amrn%7C42"})])
    result = client.create({"resourceType": "Patient"}, if_none_exist={"identifier": "urn:mrn|42"})
    assert result == FhirResult(status=201, resource={"resourceType": "Patient", "id": "n1",
                                                      "meta": {"versionId": "1"}},
                                location=f"{BASE}/Patient/n1/_history/1", etag='W/"1"')
    assert result.created and result.id == "n1" and result.version_id == "1"
    assert orjson.loads(responses.calls[0].request.body) == {"resourceType": "Patient"}


@responses.activate
def test_create_with_minimal_return_reads_id_from_location(client: FhirClient) -> None:
    responses.post(f"{BASE}/Patient", status=201, body=b"",
                   headers={"Location": f"{BASE}/Patient/n2/_history/3"},
                   match=[matchers.header_matcher({"Prefer": "return=minimal"})])
    result = client.create({"resourceType": "Patient"}, prefer="return=minimal")
    assert result.resource is None and result.id == "n2" and result.version_id == "3"


@pytest.mark.parametrize(("if_match", "header"), [("3", 'W/"3"'), ('W/"3"', 'W/"3"'), (True, 'W/"7"')])
@responses.activate
def test_update_sends_if_match(client: FhirClient, if_match, header: str) -> None:
    responses.put(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"},
                  match=[matchers.header_matcher({"If-Match": header, "Content-Type": "application/fhir+json"})])
    client.update({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "7"}}, if_match=if_match)


@responses.activate
def test_stale_update_is_a_conflict(client: FhirClient) -> None:
    responses.put(f"{BASE}/Patient/p1", status=412, json=outcome("Version 3 is not the current version 4"))
    with pytest.raises(FhirConflict, match="not the current version"):
        client.update({"resourceType": "Patient", "id": "p1"}, if_match="3")


def test_update_needs_an_id(client: FhirClient) -> None:
    with pytest.raises(InvalidInput):
        client.update({"resourceType": "Patient"})


@responses.activate
def test_delete_accepts_204_and_an_informational_outcome(client: FhirClient) -> None:
    responses.delete(f"{BASE}/Flag/f1", status=204)
    responses.delete(f"{BASE}/Flag/f2", status=200, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "information", "code": "informational", "diagnostics": "Deleted"}]})
    assert client.delete("Flag", "f1").status == 204
    second = client.delete("Flag", "f2")
    assert second.resource is None and second.outcome["issue"][0]["diagnostics"] == "Deleted"


# --- Bundles ---------------------------------------------------------------------------------------------------


def test_builders_make_request_bundles() -> None:
    urn = new_urn()
    entries = [request_entry("POST", "Patient", {"resourceType": "Patient"}, full_url=urn,
                             if_none_exist={"identifier": "urn:mrn|1"}),
               request_entry("PUT", "Patient/p2", {"resourceType": "Patient", "id": "p2"}, if_match="2"),
               request_entry("GET", "Observation?patient=p2")]
    tx = transaction_bundle(entries)
    assert tx["type"] == "transaction" and batch_bundle(entries)["type"] == "batch"
    assert tx["entry"][0] == {"fullUrl": urn, "resource": {"resourceType": "Patient"},
                              "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn%3Amrn%7C1"}}
    assert tx["entry"][1]["request"]["ifMatch"] == 'W/"2"'
    assert urn.startswith("urn:uuid:") and len(urn) == 45


@pytest.mark.parametrize("bad", [
    lambda: request_entry("POST", "Patient"),
    lambda: request_entry("FETCH", "Patient/1"),
    lambda: request_entry("GET", "https://ehr.example.org/fhir/Patient/1"),
    lambda: request_entry("PUT", "Patient/1", {"resourceType": "Patient"}, if_none_exist="x=y"),
    lambda: transaction_bundle([{"fullUrl": "urn:uuid:1", "request": {"method": "GET", "url": "A"}},
                                {"fullUrl": "urn:uuid:1", "request": {"method": "GET", "url": "B"}}]),
    lambda: transaction_bundle([{"resource": {"resourceType": "Patient"}}]),
], ids=["post-without-resource", "unknown-method", "absolute-url", "ifnoneexist-on-put", "duplicate-fullurl",
        "no-request"])
def test_builders_refuse_malformed_entries(bad) -> None:
    with pytest.raises(InvalidInput):
        bad()


@responses.activate
def test_transaction_response_parsing(client: FhirClient) -> None:
    answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}},
         "response": {"status": "201 Created", "location": "Patient/p1/_history/1", "etag": 'W/"1"'}},
        {"response": {"status": "200", "location": "Observation/o1/_history/2"}},
    ]}
    responses.post(BASE, json=answer, match=[matchers.header_matcher({"Content-Type": "application/fhir+json"})])
    tx = client.transaction([request_entry("POST", "Patient", {"resourceType": "Patient"}, full_url=new_urn())])
    first, second = entry_outcomes(tx)
    assert first.created and first.id == "p1" and first.etag == 'W/"1"'
    assert second.status == 200 and second.resource is None and second.id == "o1" and second.version_id == "2"
    assert orjson.loads(responses.calls[0].request.body)["type"] == "transaction"


def test_batch_response_errors_become_typed_errors_not_raised() -> None:
    answer = {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "404 Not Found", "outcome": outcome("Patient/zz not found")}},
        {"response": {"status": "412 Precondition Failed"},
         "resource": outcome("If-Match W/\"1\" but current is 2")},
        {"response": {"status": "garbage"}},
        {"resource": {"resourceType": "Bundle", "type": "searchset"}, "response": {"status": "200 OK"}},
    ]}
    missing, stale, garbage, found = entry_outcomes(answer)
    assert isinstance(missing, FhirNotFound) and "Patient/zz not found" in missing.message
    assert isinstance(stale, FhirConflict) and "current is 2" in stale.message
    assert type(garbage) is FhirError and garbage.code == "fhir-bad-body"
    assert isinstance(found, FhirResult) and found.resource["type"] == "searchset"


@responses.activate
def test_transaction_answered_with_wrong_bundle_type_is_an_error(client: FhirClient) -> None:
    responses.post(BASE, json={"resourceType": "Bundle", "type": "batch-response"})
    with pytest.raises(FhirError, match="transaction-response"):
        client.transaction([request_entry("GET", "Patient/p1")])


@responses.activate
def test_failed_transaction_raises_with_outcome(client: FhirClient) -> None:
    responses.post(BASE, status=400, json=outcome("Entry 2: Observation.status is required"))
    with pytest.raises(FhirError, match="Observation.status is required"):
        client.transaction([request_entry("POST", "Observation", {"resourceType": "Observation"})])
    assert client.request_count == 1


def test_resources_skips_outcome_entries_and_filters_by_type() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Condition", "id": "c1"}, "search": {"mode": "match"}},
        {"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "include"}},
        {"resource": outcome("partial results"), "search": {"mode": "outcome"}},
        {"fullUrl": "no-resource"},
    ]}
    assert [r["id"] for r in resources(bundle)] == ["c1", "p1"]
    assert [r["id"] for r in resources(bundle, "Condition")] == ["c1"]
    with pytest.raises(FhirError):
        resources({"resourceType": "Patient"})


# --- hook and counting -----------------------------------------------------------------------------------------


@responses.activate
def test_hook_sees_method_path_status_but_no_query_token_or_body(sleeps: Sleeps) -> None:
    events = []
    client = FhirClient(BASE, token_source=StaticToken("tok-123"), on_request=events.append, sleep=sleeps)
    responses.get(f"{BASE}/Patient", status=503)
    responses.get(f"{BASE}/Patient", json=searchset(["a"]))
    client.search("Patient", {"name": "Secretname"})
    assert [(e.method, e.path, e.status, e.attempt) for e in events] == [
        ("GET", "/fhir/Patient", 503, 1), ("GET", "/fhir/Patient", 200, 2)]
    assert all(e.ms >= 0 for e in events)
    text = repr(events)
    assert "Secretname" not in text and "tok-123" not in text


@responses.activate
def test_request_count_counts_round_trips_and_resets(client: FhirClient) -> None:
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    client.capabilities()
    client.capabilities()
    assert client.reset_request_count() == 2
    assert client.request_count == 0
