"""Ordering in headless Chromium, inside the sandbox EHR's iframe: the physician fills the form by clicking
(techniques and body-diagram regions), sees the live verdict turn to contraindicated on Dana Whitfield's left lower
leg (acute DVT), overrides with a reason, signs, and the order is in the sandbox."""

from __future__ import annotations

import requests
import pytest

from fhir_massage.builders.order import ORDER_ID_SYSTEM
from tests.fixtures.app import launch_in_ehr
from tests.fixtures.smart_sandbox import get_token

pytestmark = pytest.mark.browser

SCREENSHOT = "/tmp/order-page.png"


def test_physician_orders_by_clicking_and_overrides_the_dvt_leg(smart_sandbox, make_app_server, browser):
    app = make_app_server(smart_sandbox, None, AREAS=("orders",), ORDERS_VALIDATE=True)
    context = browser.new_context(viewport={"width": 1200, "height": 1700})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        frame = launch_in_ehr(page, smart_sandbox, app, "dr-ada-grey", "demo-dana-whitfield")
        frame.get_by_role("link", name="Order massage").click()
        verdict = frame.get_by_test_id("verdict")
        verdict.wait_for()
        # before anything is chosen the whole chart counts: the DVT is there, so not "clear"
        assert verdict.get_attribute("data-verdict") in ("caution", "contraindicated")

        frame.get_by_role("checkbox", name="Swedish massage").check()
        # the lower back is on the diagram's back view; a click there ticks the same site in the list
        frame.locator('.bd-view--back .bd-region[data-key="37822005"]').click()
        assert frame.locator('input[name="site"][value="37822005"]').is_checked()
        caution = frame.locator('#screening-panel [data-verdict="caution"]')
        caution.wait_for()

        # the diagram works from the keyboard too: Space toggles a focused region on and off
        knee = frame.locator('.bd-region[data-key="72696002:right"]')
        knee.focus()
        knee.press("Space")
        assert knee.get_attribute("aria-checked") == "true" and frame.locator("#side-72696002").input_value() == "right"
        knee.press("Space")
        assert knee.get_attribute("aria-checked") == "false"
        assert not frame.get_by_role("checkbox", name="Knee", exact=True).is_checked()

        # now deep tissue on the left lower leg, chosen on the diagram
        frame.get_by_role("checkbox", name="Deep tissue massage").check()
        region = frame.locator('.bd-region[data-key="30021000:left"]')
        region.click()
        assert region.get_attribute("aria-checked") == "true"
        assert frame.locator("#side-30021000").input_value() == "left"
        frame.locator('#screening-panel [data-verdict="contraindicated"]').wait_for()
        frame.locator('.bd-region--marked[data-key="30021000:left"]').wait_for()
        assert frame.locator('.bd-region--marked[data-key="30021000:right"]').count() == 0
        live = frame.locator("#verdict-live")
        assert "Contraindicated" in live.inner_text()
        assert "blocked" in frame.get_by_test_id("sign-status").inner_text()

        frame.get_by_label("Reason in words").fill("Calf cramps and low back pain")
        frame.locator("#frequency").fill("2")
        frame.locator("#frequency").dispatch_event("change")
        frame.locator('select[name="override-dvt-acute"]').wait_for()
        frame.locator('select[name="override-dvt-acute"]').select_option("clearance-obtained")
        frame.locator('input[name="override-note-dvt-acute"]').fill("Vascular surgery cleared light work")
        for rule in ("anticoagulant", "dvt-acute-elsewhere"):
            box = frame.locator(f'input[name="ack-{rule}"]')
            if box.count():
                box.check()
        frame.locator("#sign-status", has_text="Ready to sign").wait_for()  # the change re-screened and saved
        # the same draft opened as a top-level page (same browser, same cookie) for a full-page screenshot
        app_frame = next(f for f in page.frames if f.url.startswith(app.url))
        shot = context.new_page()
        shot.goto(app_frame.url)
        assert shot.locator('select[name="override-dvt-acute"]').input_value() == "clearance-obtained"
        shot.screenshot(path=SCREENSHOT, full_page=True)
        shot.close()

        frame.get_by_role("button", name="Sign the order").click()
        try:
            frame.get_by_test_id("order-signed").wait_for()
        except Exception:
            print("PAGE:", frame.locator("main").inner_text()[:3000])
            raise
        order_ids = [t.replace("ServiceRequest/", "") for t in frame.get_by_test_id("order-id").all_inner_texts()]
        assert len(order_ids) == 2  # one order per technique
        assert "Overridden by the ordering physician" in frame.get_by_test_id("mitigation").first.inner_text()
        assert frame.get_by_test_id("schedule").inner_text().startswith("Twice a week for 6 weeks")
    finally:
        context.close()

    tok = get_token(smart_sandbox, "test-public", "dr-ada-grey", "demo-dana-whitfield",
                    scopes="launch openid fhirUser patient/*.rs")
    for oid in order_ids:
        r = requests.get(f"{smart_sandbox.fhir_base}/ServiceRequest/{oid}",
                         headers={"Authorization": f"Bearer {tok['access_token']}"}, timeout=10)
        assert r.status_code == 200
        sr = r.json()
        assert sr["identifier"][0]["system"] == ORDER_ID_SYSTEM
        assert "Left lower leg" in [b["text"] for b in sr["bodySite"]]
