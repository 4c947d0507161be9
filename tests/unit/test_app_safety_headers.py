"""App-wide safety, without servers: the CSP's frame-ancestors names exactly the registered EHR origins (and
cannot be widened or broken by a registration), and every state-changing route of the url_map refuses a request
without the CSRF token before its view runs. The live sweep is tests/integration/test_app_safety.py."""

from __future__ import annotations

import re

import pytest

from fhir_massage.errors import InvalidInput
from smart_app.config import Registration, frame_origin

ISS_A = "https://ehr-a.example.org/api/FHIR/R4"
ISS_B = "https://ehr-b.example.net:8443/fhir"


@pytest.mark.parametrize("value", [
    "https://a.org; script-src *",       # would add a directive to the policy
    "https://a.org 'unsafe-inline'",     # would add a source
    "https://*.a.org",                   # a wildcard is not a registered origin
    "*", "'self'", "https://a.org'", "https://a.org,https://b.org",
    "https://user@a.org", "https://u:p@a.org",
    "https://a.org/path", "https://a.org?x=1", "https://a.org#frag",
    "https://a.org:99999", "https://a.org:port",
    "javascript://a.org", "data:text/html,x", "//a.org", "a.org", "",
    " https://a.org", "https://a.org\n", "https://a.org\t",
    "https://a_b.org", "https://-a.org",
])
def test_frame_ancestor_entries_that_are_not_plain_origins_are_refused(value):
    with pytest.raises(InvalidInput):
        frame_origin(value)


@pytest.mark.parametrize("value, origin", [
    ("https://ehr.example.org", "https://ehr.example.org"),
    ("https://ehr.example.org/", "https://ehr.example.org"),
    ("https://EHR.Example.ORG:8443", "https://ehr.example.org:8443"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://localhost", "http://localhost"),
])
def test_plain_origins_are_kept_in_serialized_form(value, origin):
    assert frame_origin(value) == origin


def test_a_registration_refuses_a_policy_breaking_frame_ancestor():
    with pytest.raises(InvalidInput):
        Registration.from_dict({"iss": ISS_A, "client_id": "c", "frame_ancestors": ["https://a.org; script-src *"]})


def _app(app_factory):
    return app_factory(REGISTRATIONS=[
        {"iss": ISS_A, "client_id": "a"},  # default: the iss origin
        {"iss": ISS_B, "client_id": "b", "frame_ancestors": ["https://portal.example.net", "https://ehr-b.example.net"]},
    ], AREAS=("orders", "sessions", "plan", "cds"))


def _directives(csp: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in csp.split(";") if part.strip()}


def _sample(rule) -> str:
    path = rule.rule
    for arg in rule.arguments:
        path = re.sub(rf"<(?:[a-z]+:)?{arg}>", "x" * 30 if arg == "lsid" else "sample-1", path)
    return path


def test_every_route_frames_only_in_the_registered_ehrs(app_factory):
    app = _app(app_factory)
    client = app.test_client()
    # B's own iss origin (with :8443) is not listed: its explicit frame_ancestors replace the default
    want = {"'self'", "https://ehr-a.example.org", "https://portal.example.net", "https://ehr-b.example.net"}
    seen = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            r = client.open(_sample(rule), method=method)
            csp = r.headers.get("Content-Security-Policy")
            assert csp, f"{method} {rule.rule}: no CSP"
            d = _directives(csp)
            assert set(d["frame-ancestors"]) == want, (rule.rule, d["frame-ancestors"])
            assert "'unsafe-inline'" not in d.get("script-src", d.get("default-src", [])), rule.rule
            assert r.headers.get("X-Content-Type-Options") == "nosniff", rule.rule
            assert r.status_code != 500, (method, rule.rule, r.data[:300])
            seen += 1
    assert seen > 20


def test_every_state_changing_route_checks_csrf_before_its_view(app_factory):
    """With the browser cookie but no token, every POST/PUT/PATCH/DELETE outside /cds-services is refused with the
    CSRF error, whatever the view would have done (the launch session does not even exist here)."""
    from smart_app.security import cookie_name

    app = _app(app_factory)
    client = app.test_client()
    client.set_cookie(cookie_name(app), "b" * 43)
    checked = []
    for rule in app.url_map.iter_rules():
        methods = (rule.methods or set()) & {"POST", "PUT", "PATCH", "DELETE"}
        if not methods or rule.rule.startswith("/cds-services"):
            continue
        for method in methods:
            for headers in ({}, {"Accept": "application/json"}, {"X-CSRF-Token": "nope"}):
                r = client.open(_sample(rule), method=method, data={"csrf_token": "0" * 64}, headers=headers)
                assert r.status_code == 400, (method, rule.rule, r.status_code)
                body = r.get_data(as_text=True)
                assert "<code>csrf</code>" in body or r.is_json and r.get_json()["error"] == "csrf", body[:300]
                checked.append(rule.endpoint)
    assert {"orders.sign", "launch.role"} <= set(checked)


@pytest.mark.parametrize("public, secure", [("https://massage.example.org", True), ("http://127.0.0.1:5000", False)])
def test_the_browser_cookie_attributes(app_factory, public, secure):
    """SMART AL "App protection": the cookie is an opaque id, HttpOnly, SameSite; behind TLS also Secure with the
    __Host- prefix (RFC 6265bis §4.1.3.2: no Domain, Path=/) and Partitioned (CHIPS) for the EHR iframe."""
    app = app_factory(PUBLIC_URL=public, REGISTRATIONS=[{"iss": ISS_A, "client_id": "a"}])
    client = app.test_client()
    r = client.get("/", base_url=public)
    cookies = r.headers.getlist("Set-Cookie")
    assert len(cookies) == 1, cookies
    raw = cookies[0]
    attrs = [a.strip().lower() for a in raw.split(";")]
    name, value = raw.split(";", 1)[0].split("=", 1)
    assert re.fullmatch(r"[A-Za-z0-9_\-]{32,64}", value)
    assert "httponly" in attrs and "path=/" in attrs and not any(a.startswith("domain=") for a in attrs)
    if secure:
        assert name == "__Host-fm_browser"
        assert {"secure", "samesite=none", "partitioned"} <= set(attrs), attrs
        assert r.headers.get("Strict-Transport-Security", "").startswith("max-age=")
    else:
        assert "samesite=lax" in attrs and "secure" not in attrs, attrs
    assert r.headers.get("Cache-Control") == "no-store"
    assert r.headers.get("Referrer-Policy") == "no-referrer"
