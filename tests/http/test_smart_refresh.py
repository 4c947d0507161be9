"""Token refresh through the launch session's token source: before expiry, once on a 401, single-flight, keep the
old refresh token when none comes back (client-py #112), a clear 'session ended' page when refresh fails."""

from __future__ import annotations

import re
import threading
from urllib.parse import urlsplit

import pytest
from flask import Blueprint, g

from smart_app.launch import NS_TOKENS, SessionTokenSource, fhir_client, require_launch
from tests.fixtures.app import smart_launch


def _probe_blueprint() -> Blueprint:
    bp = Blueprint("probe", __name__, url_prefix="/p/<lsid>/probe")

    @bp.get("/")
    @require_launch
    def index():
        patient = fhir_client().read("Patient", g.ctx.patient_id)
        return patient["name"][0]["family"]

    return bp


@pytest.fixture
def launched(fake_ehr, app_factory):
    """(ehr, app, client, lsid, probe_url) after one EHR launch. Switches on ``ehr`` can still be flipped."""
    ehr, rsps = fake_ehr
    ehr.install(rsps)

    def go(**switches):
        for k, v in switches.items():
            setattr(ehr, k, v)
        app = app_factory(ehr)
        app.register_blueprint(_probe_blueprint())
        client = app.test_client()
        location = smart_launch(client, ehr).headers["Location"]
        lsid = re.match(r"^/p/([^/]+)/$", urlsplit(location).path).group(1)
        return ehr, app, client, lsid, f"/p/{lsid}/probe/"

    return go


def _expire(app, lsid, *, revoke=True, ehr=None):
    store = app.extensions["store"]
    rec = store.get(NS_TOKENS, lsid)
    if revoke and ehr is not None:
        ehr.access_tokens.discard(rec["access_token"])
    return rec


def test_refresh_before_expiry(launched):
    ehr, app, client, lsid, probe = launched()
    store = app.extensions["store"]
    rec = store.get(NS_TOKENS, lsid)
    rec["expires_at"] = __import__("time").time() + 5  # inside the refresh skew
    store.put(NS_TOKENS, lsid, rec, 600)
    ehr.token_requests.clear()
    assert client.get(probe).get_data(as_text=True) == "Quirk"
    assert [t["body"]["grant_type"] for t in ehr.token_requests] == ["refresh_token"]
    assert store.get(NS_TOKENS, lsid)["access_token"] != rec["access_token"]
    # the refresh was authenticated like the code exchange (public: client_id in the body)
    assert ehr.token_requests[0]["body"]["client_id"] == ehr.client_id


def test_refresh_once_on_401(launched):
    ehr, app, client, lsid, probe = launched()
    _expire(app, lsid, ehr=ehr)  # the EHR revoked it early; the app still thinks it is valid
    ehr.token_requests.clear()
    assert client.get(probe).get_data(as_text=True) == "Quirk"
    assert len(ehr.token_requests) == 1
    statuses = [f["auth"] for f in ehr.fhir_requests[-2:]]
    assert statuses[0] != statuses[1]


def test_keeps_old_refresh_token_when_none_comes_back(launched):
    ehr, app, client, lsid, probe = launched(refresh_rotation=False)
    store = app.extensions["store"]
    old_rt = store.get(NS_TOKENS, lsid)["refresh_token"]
    for _ in range(2):
        _expire(app, lsid, ehr=ehr)
        assert client.get(probe).status_code == 200
    assert store.get(NS_TOKENS, lsid)["refresh_token"] == old_rt
    assert [t["body"]["refresh_token"] for t in ehr.token_requests[1:]] == [old_rt, old_rt]


def test_rotated_refresh_token_replaces_the_old_one(launched):
    ehr, app, client, lsid, probe = launched()
    store = app.extensions["store"]
    old_rt = store.get(NS_TOKENS, lsid)["refresh_token"]
    _expire(app, lsid, ehr=ehr)
    assert client.get(probe).status_code == 200
    assert store.get(NS_TOKENS, lsid)["refresh_token"] not in (None, old_rt)


def test_failed_refresh_shows_session_ended(launched):
    ehr, app, client, lsid, probe = launched()
    ehr.fail_refresh = True
    _expire(app, lsid, ehr=ehr)
    r = client.get(probe)
    html = r.get_data(as_text=True)
    assert r.status_code == 401
    assert "session has ended" in html and "open fhir-massage again" in html
    assert "Traceback" not in html


def test_no_refresh_token_shows_session_ended(launched):
    ehr, app, client, lsid, probe = launched(issue_refresh=False)
    _expire(app, lsid, ehr=ehr)
    r = client.get(probe)
    assert r.status_code == 401 and "session has ended" in r.get_data(as_text=True)


def test_token_goes_only_to_its_issuer(launched):
    ehr, app, client, lsid, probe = launched()
    with app.test_request_context(f"/p/{lsid}/"):
        from smart_app.launch import load_context
        from fhir_massage.errors import FhirError

        g.fm_browser_id = client.get_cookie("fm_browser").value
        g.ctx = load_context(lsid)
        with pytest.raises(FhirError, match="another server"):
            fhir_client().get_url("https://elsewhere.example.org/fhir/Patient/1")


class _Store:
    """A dict store with a real lock, to race refreshes without Flask."""

    def __init__(self):
        from smart_app.store import SQLiteStore

        self.inner = SQLiteStore(":memory:")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_single_flight_refresh_across_threads():
    from fhir_massage.smart import TokenResponse

    store = _Store()
    now = __import__("time").time()
    store.put(NS_TOKENS, "sid", {"access_token": "old", "refresh_token": "rt1", "expires_at": now - 1,
                                 "lifetime": 600, "scope": "x"}, 600)
    calls = []
    gate = threading.Event()

    def refresh_fn(rt, scope):
        calls.append(rt)
        gate.wait(2)
        return TokenResponse(access_token=f"new{len(calls)}", token_type="Bearer", scope=scope,
                             expires_at=__import__("time").time() + 600, lifetime_known=True)

    results = []

    def worker():
        results.append(SessionTokenSource(store, "sid", refresh_fn).token())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["rt1"]  # the refresh token was spent once
    assert results == ["new1"] * 6
    assert store.get(NS_TOKENS, "sid")["refresh_token"] == "rt1"  # none came back: the old one is kept
