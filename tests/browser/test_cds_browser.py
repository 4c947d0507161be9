"""The sandbox EHR's order entry in headless Chromium: order deep tissue on Dana Whitfield's left lower leg (acute
DVT) and see the app's critical CDS card, rendered and accessible."""

from __future__ import annotations

import pytest

from tests.integration.test_cds_ehr_orders import start_cds_pair

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def pair():
    p = start_cds_pair()
    yield p
    p.stop()


def test_deep_tissue_on_the_dvt_leg_shows_the_critical_card(pair, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{pair.sandbox_url}/ehr/orders")
        page.get_by_label("Ordering clinician").select_option("dr-ada-grey")
        page.get_by_label("Patient").select_option("demo-dana-whitfield")
        page.get_by_label("Deep tissue massage").check()
        page.get_by_label("Body site(s)").select_option(["30021000:left"])
        page.get_by_role("button", name="Sign order (order-sign)").click()

        region = page.get_by_role("region", name="order-sign")
        region.wait_for()
        critical = page.locator('article[data-indicator="critical"]')
        assert critical.count() == 1
        heading = critical.get_by_role("heading", level=3)
        assert heading.inner_text() == ("Critical Absolute contraindication: Deep vein thrombosis, current or acute "
                                        "(left lower limb)")
        # the markdown detail is rendered (bold title, list of evidence), not shown as source
        assert critical.locator(".detail strong").first.inner_text() == "Deep vein thrombosis, current or acute"
        assert critical.locator(".detail li").filter(has_text="Condition/demo-dana-whitfield-dvt-left-leg").count() == 1
        assert "\\[" not in critical.inner_text() and "**" not in critical.inner_text()
        assert critical.get_by_text("Request physician clearance").count() == 1
        # the card is the first one (most severe first) and the form kept the order's choices
        assert page.locator("article").first.get_attribute("data-indicator") == "critical"
        assert page.get_by_label("Deep tissue massage").is_checked()
        assert errors == []
    finally:
        page.close()


def test_swedish_on_the_back_is_not_critical(pair, browser):
    page = browser.new_page()
    try:
        page.goto(f"{pair.sandbox_url}/ehr/orders?patient=demo-dana-whitfield")
        assert page.get_by_label("Patient").input_value() == "demo-dana-whitfield"
        page.get_by_label("Swedish massage").check()
        page.get_by_label("Body site(s)").select_option(["77568009"])
        page.get_by_role("button", name="Select order (order-select)").click()
        page.get_by_role("region", name="order-select").wait_for()
        assert page.locator('article[data-indicator="critical"]').count() == 0
        assert page.locator('article[data-indicator="warning"]').count() >= 1
    finally:
        page.close()
