"""The sandbox FHIR server over real HTTP on loopback (plain ``requests``), one test per behaviour of issue 2 §3."""

from __future__ import annotations

import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from fhir_massage.sandbox.access import INTERACTIONS, Grant, Unauthorized
from fhir_massage.sandbox.faults import FaultConfig

pytestmark = pytest.mark.integration

FJ = "application/fhir+json"
H = {"Content-Type": FJ, "Accept": FJ}


def mark() -> str:
    return uuid.uuid4().hex[:12]


def patient(m: str, **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": m}],
            "name": [{"family": f"Fam{m}"}], **extra}


def post(base: str, rtype: str, body: dict, **headers) -> requests.Response:
    return requests.post(f"{base}/{rtype}", json=body, headers={**H, **headers}, timeout=10)


def is_outcome(r: requests.Response) -> bool:
    return r.headers.get("Content-Type", "").startswith(FJ) and r.json()["resourceType"] == "OperationOutcome"


# -- CRUD, versions, headers ----------------------------------------------------------------------------------


def test_create_read_vread_update_delete_history(sandbox_open_url: str) -> None:
    base = sandbox_open_url
    r = post(base, "Patient", patient(mark()))
    assert r.status_code == 201
    pid = r.json()["id"]
    assert r.headers["Location"] == f"{base}/Patient/{pid}/_history/1"
    assert r.headers["ETag"] == 'W/"1"' and r.headers["Last-Modified"].endswith("GMT")
    assert r.json()["meta"]["versionId"] == "1" and r.json()["meta"]["lastUpdated"]

    r = requests.get(f"{base}/Patient/{pid}", timeout=10)
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"1"'
    body = r.json()
    body["gender"] = "female"
    r = requests.put(f"{base}/Patient/{pid}", json=body, headers={**H, "If-Match": 'W/"1"'}, timeout=10)
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    # A stale If-Match is refused (someone else changed it).
    r = requests.put(f"{base}/Patient/{pid}", json=body, headers={**H, "If-Match": 'W/"1"'}, timeout=10)
    assert r.status_code == 412 and is_outcome(r)
    assert requests.get(f"{base}/Patient/{pid}/_history/1", timeout=10).json().get("gender") is None
    assert requests.get(f"{base}/Patient/{pid}/_history/2", timeout=10).json()["gender"] == "female"

    assert requests.delete(f"{base}/Patient/{pid}", timeout=10).status_code == 200
    assert requests.get(f"{base}/Patient/{pid}", timeout=10).status_code == 410
    hist = requests.get(f"{base}/Patient/{pid}/_history", timeout=10).json()
    assert hist["type"] == "history" and [e["response"]["etag"] for e in hist["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert requests.get(f"{base}/Patient/{pid}/_history/9", timeout=10).status_code == 404


def test_update_as_create_with_client_id(sandbox_open_url: str) -> None:
    pid = f"client-{mark()}"
    r = requests.put(f"{sandbox_open_url}/Patient/{pid}", json={**patient(mark()), "id": pid}, headers=H, timeout=10)
    assert r.status_code == 201 and r.json()["id"] == pid and r.headers["Location"].endswith(f"{pid}/_history/1")


@pytest.mark.parametrize("prefer,check", [
    ("return=minimal", lambda r: r.content == b""),
    ("return=OperationOutcome", lambda r: r.json()["resourceType"] == "OperationOutcome"),
    ("return=representation", lambda r: r.json()["resourceType"] == "Patient"),
])
def test_prefer_return(sandbox_open_url: str, prefer: str, check) -> None:
    r = post(sandbox_open_url, "Patient", patient(mark()), Prefer=prefer)
    assert r.status_code == 201 and r.headers["Location"] and check(r)


def test_conditional_create_header(sandbox_open_url: str) -> None:
    m = mark()
    first = post(sandbox_open_url, "Patient", patient(m), **{"If-None-Exist": f"identifier=urn:test|{m}"})
    again = post(sandbox_open_url, "Patient", patient(m), **{"If-None-Exist": f"identifier=urn:test|{m}"})
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]


# -- never a 500 for bad input --------------------------------------------------------------------------------

BAD = [
    ("malformed JSON", "POST", "Patient", b'{"resourceType": "Patient",', FJ, 400),
    ("type differs from URL", "POST", "Condition", b'{"resourceType": "Patient"}', FJ, 400),
    ("PUT id differs", "PUT", "Patient/abc", b'{"resourceType": "Patient", "id": "xyz"}', FJ, 400),
    ("bad date", "POST", "Patient", b'{"resourceType": "Patient", "birthDate": "1970-02-31"}', FJ, 400),
    ("bad id in URL", "PUT", "Patient/a_b", b'{"resourceType": "Patient", "id": "a_b"}', FJ, 400),
    ("bad id in GET", "GET", "Patient/" + "x" * 65, None, None, 400),
    ("unknown type", "GET", "Spaceship/1", None, None, 404),
    ("unknown type search", "GET", "Spaceship", None, None, 404),
    ("bad _count", "GET", "Patient?_count=many", None, None, 400),
    ("wrong content type", "POST", "Patient", b"resourceType=Patient", "text/plain", 415),
    ("empty body", "POST", "Patient", b"", FJ, 400),
    ("array body", "POST", "Patient", b"[]", FJ, 400),
    ("unknown route", "GET", "Patient/1/_history/1/more", None, None, 404),
    ("method not allowed", "PATCH", "Patient/1", b"[]", "application/json-patch+json", 405),
    ("bad date search", "GET", "Patient?birthdate=ge1970-99", None, None, 400),
    ("bundle of wrong type", "POST", "", b'{"resourceType": "Bundle", "type": "searchset"}', FJ, 400),
]


@pytest.mark.parametrize("method,path,body,ctype,status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_outcome(sandbox_open_url: str, method, path, body, ctype, status) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    url = f"{sandbox_open_url}/{path}" if path else sandbox_open_url
    r = requests.request(method, url, data=body, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    assert is_outcome(r)
    assert "Traceback" not in r.text


def test_huge_body_is_413(sandbox_open_url: str) -> None:
    body = b'{"resourceType": "Patient", "name": [{"text": "' + b"x" * (11 * 1024 * 1024) + b'"}]}'
    try:
        r = requests.post(f"{sandbox_open_url}/Patient", data=body, headers=H, timeout=30)
    except requests.ConnectionError:
        pytest.fail("the server closed the connection instead of answering 413")
    assert r.status_code == 413 and is_outcome(r)


def test_huge_chunked_body_is_413(sandbox_open_url: str) -> None:
    def chunks():
        yield b'{"resourceType": "Patient", "name": [{"text": "'
        for _ in range(11):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    r = requests.post(f"{sandbox_open_url}/Patient", data=chunks(), headers=H, timeout=30)
    assert r.status_code == 413 and is_outcome(r)


def test_invalid_resource_outcome_names_the_element(sandbox_open_url: str) -> None:
    r = post(sandbox_open_url, "Condition", {"resourceType": "Condition", "subject": {"reference": "Patient/x"},
                                             "onsetDateTime": "yesterday"})
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["Condition.onsetDateTime"]


def test_unexpected_error_is_a_plain_500(make_sandbox) -> None:
    sb = make_sandbox()

    def boom(*a, **k):
        raise RuntimeError("Jane Doe's secret diagnosis")

    sb.app.extensions["fhir_massage.sandbox"]["service"].read = boom
    r = requests.get(f"{sb.fhir_base}/Patient/x", timeout=10)
    assert r.status_code == 500 and is_outcome(r)
    assert "Jane" not in r.text and "Traceback" not in r.text


# -- search over HTTP -----------------------------------------------------------------------------------------


def test_search_get_post_and_paging(sandbox_open_url: str) -> None:
    base = sandbox_open_url
    m = mark()
    created = {post(base, "Patient", patient(m, gender="other")).json()["id"] for _ in range(7)}
    by_get = requests.get(f"{base}/Patient", params={"identifier": f"urn:test|{m}", "_count": 3}, timeout=10).json()
    assert by_get["total"] == 7
    seen, page, pages = set(), by_get, 0
    while True:
        pages += 1
        seen |= {e["resource"]["id"] for e in page.get("entry", [])}
        nxt = [l["url"] for l in page["link"] if l["relation"] == "next"]
        if not nxt:
            break
        assert nxt[0].startswith(base + "/Patient?")
        page = requests.get(nxt[0], timeout=10).json()
    assert seen == created and pages == 3
    assert any(l["relation"] == "previous" for l in page["link"])
    by_post = requests.post(f"{base}/Patient/_search", data={"identifier": f"urn:test|{m}", "gender": "other"},
                            timeout=10).json()
    assert by_post["type"] == "searchset" and by_post["total"] == 7


def test_strict_handling_of_unknown_params(sandbox_open_url: str) -> None:
    url = f"{sandbox_open_url}/Patient?favourite-colour=blue&_count=1"
    lenient = requests.get(url, timeout=10)
    assert lenient.status_code == 200
    assert [e for e in lenient.json().get("entry", []) if e["search"]["mode"] == "outcome"]
    strict = requests.get(url, headers={"Prefer": "handling=strict"}, timeout=10)
    assert strict.status_code == 400 and is_outcome(strict)


def test_public_base_is_used_in_urls(make_sandbox) -> None:
    sb = make_sandbox(public_base="https://ehr.example.org/fhir")
    r = post(sb.fhir_base, "Patient", patient(mark()))
    assert r.headers["Location"].startswith("https://ehr.example.org/fhir/Patient/")
    links = requests.get(f"{sb.fhir_base}/Patient", timeout=10).json()["link"]
    assert links[0]["url"].startswith("https://ehr.example.org/fhir/Patient?")


# -- transaction / batch ---------------------------------------------------------------------------------------


def test_transaction_over_http(sandbox_open_url: str) -> None:
    m = mark()
    p_urn, sr_urn = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": sr_urn, "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                                         "code": {"text": "massage"}, "subject": {"reference": p_urn}},
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": p_urn, "resource": patient(m),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:test|{m}"}},
    ]}
    r = requests.post(sandbox_open_url, json=bundle, headers=H, timeout=10)
    assert r.status_code == 200 and r.json()["type"] == "transaction-response"
    sr, pat = (e["resource"] for e in r.json()["entry"])
    assert sr["subject"]["reference"] == f"Patient/{pat['id']}"
    found = requests.get(f"{sandbox_open_url}/ServiceRequest",
                         params={"patient": pat["id"], "_include": "ServiceRequest:patient"}, timeout=10).json()
    assert sorted(e["search"]["mode"] for e in found["entry"]) == ["include", "match"]

    bundle["entry"].append({"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}})
    r = requests.post(sandbox_open_url, json=bundle, headers=H, timeout=10)
    assert r.status_code == 400 and is_outcome(r) and "Entry 2" in r.json()["issue"][0]["diagnostics"]


def test_concurrent_writes_are_all_kept(sandbox_open_url: str) -> None:
    m = mark()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: post(sandbox_open_url, "Patient", patient(m)).status_code, range(40)))
    assert codes == [201] * 40
    total = requests.get(f"{sandbox_open_url}/Patient", params={"identifier": f"urn:test|{m}", "_summary": "count"},
                         timeout=10).json()["total"]
    assert total == 40


# -- metadata, admin, faults -----------------------------------------------------------------------------------


def test_metadata_and_security_hook(make_sandbox) -> None:
    sb = make_sandbox()
    security = {"service": [{"coding": [{"code": "SMART-on-FHIR"}]}]}
    sb.app.extensions["fhir_massage.sandbox"]["capability_security"] = lambda: security
    cs = requests.get(f"{sb.fhir_base}/metadata", timeout=10).json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    assert cs["rest"][0]["security"] == security


def test_faults_at_run_time(make_sandbox) -> None:
    sb = make_sandbox()
    r = requests.post(f"{sb.url}/_sandbox/faults", timeout=10,
                      json={"fail_every_n": 2, "fail_status": 503, "retry_after": 7, "fail_methods": ["GET"]})
    assert r.status_code == 200
    got = [requests.get(f"{sb.fhir_base}/Patient", timeout=10) for _ in range(4)]
    assert [g.status_code for g in got] == [200, 503, 200, 503]
    assert got[1].headers["Retry-After"] == "7" and is_outcome(got[1])
    assert post(sb.fhir_base, "Patient", patient(mark())).status_code == 201  # POST not selected
    assert requests.get(f"{sb.url}/_sandbox/health", timeout=10).status_code == 200  # admin never faulted
    assert requests.post(f"{sb.url}/_sandbox/faults", json={"fail_status": 418}, timeout=10).status_code == 400
    requests.delete(f"{sb.url}/_sandbox/faults", timeout=10)
    assert all(requests.get(f"{sb.fhir_base}/Patient", timeout=10).status_code == 200 for _ in range(3))


def test_drop_connection_fault_from_config(make_sandbox) -> None:
    sb = make_sandbox(faults=FaultConfig(drop_every_n=1, fail_paths=("/fhir/Patient",)))
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{sb.fhir_base}/Patient", timeout=10)
    assert requests.get(f"{sb.fhir_base}/metadata", timeout=10).status_code == 200


def test_reset_wipes_and_reseeds(make_sandbox) -> None:
    sb = make_sandbox(seed=True)
    seeded = requests.get(f"{sb.fhir_base}/Patient?_summary=count", timeout=10).json()["total"]
    assert seeded > 0
    post(sb.fhir_base, "Patient", patient(mark()))
    assert requests.post(f"{sb.url}/_sandbox/reset", timeout=30).status_code == 200
    assert requests.get(f"{sb.fhir_base}/Patient?_summary=count", timeout=10).json()["total"] == seeded


def test_data_dir_persists(make_sandbox, tmp_path) -> None:
    first = make_sandbox(data_dir=tmp_path)
    pid = post(first.fhir_base, "Patient", patient(mark())).json()["id"]
    first.stop()
    second = make_sandbox(data_dir=tmp_path)
    assert requests.get(f"{second.fhir_base}/Patient/{pid}", timeout=10).status_code == 200


# -- authorization contract -------------------------------------------------------------------------------------


class FakeAuthorizer:
    """Bearer "p1" -> patient grant for p1; "user" -> everything; anything else -> Unauthorized."""

    def grant_for(self, header):
        everything = {"*": frozenset(INTERACTIONS)}
        if header == "Bearer p1":
            return Grant(permissions=everything, patient="p1")
        if header == "Bearer user":
            return Grant(permissions=everything, user="Practitioner/dr")
        raise Unauthorized("The access token is missing or unknown.")


def test_authorization_contract(make_sandbox) -> None:
    sb = make_sandbox()
    sb.app.extensions["fhir_massage.sandbox"]["authorizer"] = FakeAuthorizer()
    user = {**H, "Authorization": "Bearer user"}
    for pid in ("p1", "p2"):
        requests.put(f"{sb.fhir_base}/Patient/{pid}", json={"resourceType": "Patient", "id": pid}, headers=user,
                     timeout=10)
    r = requests.get(f"{sb.fhir_base}/Patient/p1", timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert is_outcome(r)
    assert requests.get(f"{sb.fhir_base}/metadata", timeout=10).status_code == 200  # discovery stays public
    p1 = {"Authorization": "Bearer p1"}
    assert requests.get(f"{sb.fhir_base}/Patient/p1", headers=p1, timeout=10).status_code == 200
    r = requests.get(f"{sb.fhir_base}/Patient/p2", headers=p1, timeout=10)
    assert r.status_code == 403 and is_outcome(r) and "p2" not in r.text.replace("Patient/p1", "")
    assert requests.get(f"{sb.fhir_base}/Condition?patient=p2", headers=p1, timeout=10).status_code == 403
    ids = [e["resource"]["id"] for e in requests.get(f"{sb.fhir_base}/Patient", headers=p1, timeout=10).json()["entry"]]
    assert ids == ["p1"]


# -- the command -----------------------------------------------------------------------------------------------


def test_command_prints_base_url_when_ready() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_massage.cli", "sandbox", "--open", "--no-seed", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:") and line.endswith("/fhir"), proc.stderr.read()
        assert requests.get(f"{line}/metadata", timeout=10).json()["fhirVersion"] == "4.0.1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_command_can_turn_transactions_and_batch_off() -> None:
    """`fhir-massage sandbox --no-transactions --no-batch`: a less capable EHR for trying the app's fallbacks."""
    proc = subprocess.Popen([sys.executable, "-m", "fhir_massage.cli", "sandbox", "--port", "0", "--open",
                             "--no-seed", "--no-transactions", "--no-batch"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base = proc.stdout.readline().strip()
        assert base.endswith("/fhir")
        interactions = [i["code"] for i in requests.get(f"{base}/metadata", timeout=10).json()["rest"][0].get(
            "interaction", [])]
        assert "transaction" not in interactions and "batch" not in interactions
        for kind in ("transaction", "batch"):
            r = requests.post(base, json={"resourceType": "Bundle", "type": kind, "entry": []},
                              headers={"Content-Type": "application/fhir+json"}, timeout=10)
            assert r.status_code == 501 and r.json()["issue"][0]["code"] == "not-supported"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
