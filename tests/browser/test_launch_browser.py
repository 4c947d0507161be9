"""The app inside the sandbox EHR's iframe, in headless Chromium.

Cookies: the EHR (127.0.0.1:SANDBOXPORT) and the app (127.0.0.1:APPPORT) differ only by port, and a *site* is
scheme + registrable domain without the port, so the iframe is same-site: the app's SameSite=Lax cookie (plain http
on loopback cannot be Secure, so SameSite=None is not available) is sent inside the iframe. In production the EHR
is another site and the app, behind https, sets SameSite=None; Secure; Partitioned (smart_app/security.py).
"""

from __future__ import annotations

import re

import pytest
from flask import Blueprint, g, render_template_string

from smart_app.launch import fhir_client, require_launch
from tests.fixtures.app import launch_in_ehr

pytestmark = pytest.mark.browser

PAGE = ('{% extends "base.html" %}{% block title %}Plan{% endblock %}{% block content %}'
        '<h1>Plan (stand-in)</h1><p id="read">Read from the EHR: <span data-testid="fhir-family">{{ family }}</span>'
        '</p>{% endblock %}')


def plan_stand_in() -> Blueprint:
    """Stands in for the plan area (built later): a link on the landing page whose view reads FHIR."""
    bp = Blueprint("plan", __name__, url_prefix="/p/<lsid>/plan")

    @bp.get("/")
    @require_launch
    def index():
        family = fhir_client().read("Patient", g.ctx.patient_id)["name"][0]["family"]
        return render_template_string(PAGE, family=family)

    return bp


def test_app_runs_inside_the_ehr_iframe_and_keeps_its_session(make_smart_sandbox, make_app_server, browser):
    sandbox = make_smart_sandbox(clients=[])
    app = make_app_server(sandbox, None, BLUEPRINTS=[plan_stand_in()], AREAS=())
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        frame = launch_in_ehr(page, sandbox, app, "dr-ada-grey", "demo-dana-whitfield")
        name = frame.get_by_test_id("patient-name")
        name.wait_for()
        assert name.inner_text() == "Dana Whitfield"
        assert frame.locator(".role-badge").inner_text() == "Physician"

        frame.get_by_role("link", name="Plan").click()
        frame.get_by_test_id("fhir-family").wait_for()
        assert frame.get_by_test_id("fhir-family").inner_text() == "Whitfield"
        assert frame.get_by_test_id("patient-name").inner_text() == "Dana Whitfield"

        # the cookie is the only thing the browser holds, and it is an opaque id
        cookies = [c for c in context.cookies() if c["name"] == "fm_browser"]
        assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Lax"
        app_frame = next(f for f in page.frames if f.url.startswith(app.url))
        assert re.match(rf"^{re.escape(app.url)}/p/[^/]+/plan/$", app_frame.url)
    finally:
        context.close()


def test_two_tabs_with_two_patients_keep_apart(make_smart_sandbox, make_app_server, browser):
    """One browser (one cookie), two EHR tabs with two charts open: each iframe keeps its own launch session."""
    sandbox = make_smart_sandbox(clients=[])
    app = make_app_server(sandbox, None, BLUEPRINTS=[plan_stand_in()], AREAS=())
    context = browser.new_context()
    try:
        tabs = {}
        for patient, name in (("demo-tom-becker", "Tom Becker"), ("demo-maria-santos", "Maria Santos")):
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{sandbox.url}/ehr/launch?client_id={app.client_id}&user=dr-ada-grey&patient={patient}")
            page.frame_locator("iframe.app").get_by_test_id("patient-name").wait_for()
            tabs[name] = page
        for name, page in tabs.items():  # navigate in both tabs after both launches happened
            frame = page.frame_locator("iframe.app")
            frame.get_by_role("link", name="Plan").click()
            frame.get_by_test_id("fhir-family").wait_for()
            assert frame.get_by_test_id("fhir-family").inner_text() == name.split()[-1]
            assert frame.get_by_test_id("patient-name").inner_text() == name
    finally:
        context.close()
