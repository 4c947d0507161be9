"""The sandbox EHR's order entry in headless Chromium, acting on the app's CDS cards as an EHR would: order deep
tissue on Dana Whitfield's left lower leg (acute DVT) and back, sign, see the critical card hold the signature,
accept "remove the site", see the card gone and the draft changed, override another card with a reason, sign.
Also: every page of the flow keeps to its CSP (no scripts at all) and axe-core finds nothing serious."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.required import missing_dependency
from tests.integration.test_cds_ehr_orders import ANTICOAGULANT, DVT_CRITICAL, start_cds_pair

pytestmark = pytest.mark.browser

SCREENSHOT = "/tmp/cds-order-entry.png"
SCREENSHOT_BLOCKED = "/tmp/cds-order-entry-blocked.png"
AXE = Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"
DVT_RELATIVE = "Relative contraindication: Deep vein thrombosis, current or acute"


@pytest.fixture(scope="module")
def pair():
    p = start_cds_pair()
    yield p
    p.stop()


def _start_order(page, pair, *, sites=("30021000:left", "77568009"), button="Sign order (order-sign)"):
    page.goto(f"{pair.sandbox_url}/ehr/orders")
    page.get_by_label("Ordering clinician").select_option("dr-ada-grey")
    page.get_by_label("Patient").select_option("demo-dana-whitfield")
    page.get_by_label("Deep tissue massage").check()
    page.get_by_label("Body site(s)").select_option(list(sites))
    page.get_by_role("button", name=button).click()
    page.get_by_role("region", name="Draft order").wait_for()


def _card(page, summary):
    return page.locator("article").filter(has=page.get_by_role("heading", level=3, name=summary, exact=False))


def test_accept_remove_the_site_then_override_with_a_reason_then_sign(pair, browser):
    context = browser.new_context(viewport={"width": 1100, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    try:
        _start_order(page, pair)
        # Sign fired order-sign: the critical card holds the signature, and says so
        blocked = page.get_by_role("alert")
        assert "Not signed: 1 critical card is neither accepted nor overridden." in blocked.inner_text()
        critical = page.locator('article[data-indicator="critical"]')
        assert critical.count() == 1
        assert critical.get_by_role("heading", level=3).inner_text() == f"Critical {DVT_CRITICAL}"
        # the markdown detail is rendered (bold title, evidence list), not shown as source
        assert critical.locator(".detail strong").first.inner_text() == "Deep vein thrombosis, current or acute"
        assert critical.locator(".detail li").filter(has_text="Condition/demo-dana-whitfield-dvt-left-leg").count() == 1
        assert page.locator("article").first.get_attribute("data-indicator") == "critical"  # most severe first
        assert sorted(page.locator(".draft-sites").inner_text().split("; ")) == ["Back", "Left lower leg"]

        page.screenshot(path=SCREENSHOT_BLOCKED)  # the top: notice, draft, critical card
        # accept "remove the site": the draft loses the leg, order-sign runs again, the critical card is gone
        critical.get_by_role("button", name="Accept: Remove Left lower leg from the order").click()
        status = page.get_by_role("status").filter(has_text="Accepted: Remove Left lower leg from the order")
        status.wait_for()
        assert "order-sign sent again with the changed order (new hookInstance)" in status.inner_text()
        assert page.locator(".draft-sites").inner_text() == "Back"
        assert page.locator('article[data-indicator="critical"]').count() == 0
        assert _card(page, DVT_CRITICAL).count() == 0

        # override the remaining DVT warning with a reason and a comment: the service records it and writes the
        # DetectedIssue into the sandbox, which the page shows
        card = _card(page, DVT_RELATIVE)
        card.locator("summary").filter(has_text="Override this card").click()  # warnings keep it folded
        card.get_by_role("radio", name="Physician clearance obtained and documented").check()
        card.get_by_label("Comment (optional)").fill("Cleared by hematology, 2 weeks of anticoagulation")
        card.get_by_role("button", name="Override this card").click()
        done = page.get_by_role("status").filter(has_text=f"Overridden: {DVT_RELATIVE}")
        done.wait_for()
        assert "Feedback sent; the service answered: recorded by the service; it wrote DetectedIssue/" \
            in done.inner_text()
        card = _card(page, DVT_RELATIVE)
        issue = card.locator("code.detected-issue").inner_text()
        assert issue.startswith("DetectedIssue/")
        assert pair.fhir("DetectedIssue", _id=issue.split("/")[1])[0]["mitigation"]
        assert card.get_by_role("button", name="Override this card").count() == 0  # decided: no second override

        # warnings do not hold the signature once the cards were shown: Sign writes the active order
        page.get_by_role("button", name="Sign order").click()
        signed = page.get_by_role("status").filter(has_text="Order signed.")
        signed.wait_for()
        ref = signed.inner_text().split("ServiceRequest/")[1].split(" ")[0]
        (sr,) = pair.fhir("ServiceRequest", _id=ref)
        assert sr["status"] == "active" and [b["text"] for b in sr["bodySite"]] == ["Back"]

        page.screenshot(path=SCREENSHOT, full_page=True)
        assert problems == []  # no script errors, no CSP violation reported
    finally:
        context.close()


def test_accept_light_swedish_on_the_anticoagulant_card(pair, browser):
    page = browser.new_page()
    try:
        _start_order(page, pair, sites=("30021000:left",), button="Select order (order-select)")
        card = _card(page, ANTICOAGULANT)
        card.get_by_role("button", name="Accept: Change to light-pressure Swedish massage").click()
        page.get_by_role("status").filter(has_text="Accepted: Change to light-pressure Swedish massage").wait_for()
        assert page.locator(".draft-techniques").inner_text().startswith("Swedish massage")
        assert page.locator(".draft-details").inner_text() == "Light pressure"
        assert _card(page, ANTICOAGULANT).count() == 0
        assert "order-select" in page.get_by_role("region", name="order-select").get_by_role("heading", level=2) \
            .inner_text()
    finally:
        page.close()


def test_the_order_pages_have_no_serious_accessibility_violation(pair, browser):
    if not AXE.exists():
        missing_dependency(f"axe-core ({AXE})", "run `make node-deps` (npm ci in tests/browser)")
    context = browser.new_context(bypass_csp=True)  # only to inject axe; the pages themselves run no script
    page = context.new_page()
    try:
        found = {}
        page.goto(f"{pair.sandbox_url}/ehr/orders")
        page.add_script_tag(path=str(AXE))
        found["form"] = _serious(page)
        _start_order(page, pair)
        page.add_script_tag(path=str(AXE))
        found["cards"] = _serious(page)
        assert found == {"form": [], "cards": []}
    finally:
        context.close()


def _serious(page) -> list[str]:
    return page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.filter(v => ['serious', 'critical'].includes(v.impact))
            .map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '));
    }""")


def test_the_cards_smart_link_opens_the_app_in_the_ehr_frame(pair, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(20_000)
    try:
        _start_order(page, pair, sites=("30021000:left",))
        _card(page, DVT_CRITICAL).get_by_role("link", name="Open the massage screen (fhir-massage)").click()
        page.get_by_role("link", name="Back to the order").wait_for()
        # the app ran the whole SMART EHR launch inside the frame (launch id -> authorize -> token) and shows the
        # patient from the launch context
        frame = page.frame_locator("iframe.app-frame")
        frame.get_by_text("Dana Whitfield").first.wait_for()
        page.screenshot(path="/tmp/cds-app-launch.png")
        page.get_by_role("link", name="Back to the order").click()
        assert "Opened fhir-massage (test)" in page.locator(".activity").inner_text()
    finally:
        page.close()
