"""Every row of the sandbox's search table, over real HTTP against a running sandbox on loopback (GET and POST
_search), so that URL parsing, percent-encoding and the searchset Bundle are exercised as a client sees them."""

from __future__ import annotations

from typing import Iterator

import pytest
import requests

from tests.fixtures.sandbox import SandboxHandle, start_sandbox
from tests.unit.test_sandbox_search import BASE, SEARCHES, seed_resources

pytestmark = pytest.mark.integration

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    handle = start_sandbox()
    try:
        for resource in seed_resources():
            r = requests.put(f"{handle.fhir_base}/{resource['resourceType']}/{resource['id']}", json=resource,
                             headers=FHIR_JSON, timeout=10)
            assert r.status_code in (200, 201), r.text
        yield handle
    finally:
        handle.stop()


def _matches(bundle: dict) -> list[str]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match")


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("rtype,pairs,expected", [r[1:] for r in SEARCHES], ids=[r[0] for r in SEARCHES])
def test_search_over_http(sandbox: SandboxHandle, method: str, rtype: str, pairs: list, expected: list) -> None:
    # The table's absolute references name the in-process base; here they must name this server's real base.
    pairs = [(k, v.replace(BASE, sandbox.fhir_base)) for k, v in pairs]
    if method == "GET":
        r = requests.get(f"{sandbox.fhir_base}/{rtype}", params=pairs, headers={"Accept": "application/fhir+json"},
                         timeout=10)
    else:
        r = requests.post(f"{sandbox.fhir_base}/{rtype}/_search", data=pairs,
                          headers={"Accept": "application/fhir+json"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert _matches(body) == sorted(expected)
    assert body["total"] == len(expected)
