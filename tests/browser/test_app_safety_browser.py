"""App-wide safety in headless Chromium: every page a physician and a therapist reach in a real launch, with markup
planted in the EHR's data (a Condition, the physician's name, a message).

* no JavaScript dialog ever fires: the planted ``<script>`` / ``onerror`` would call alert(); the pages are loaded
  with the CSP *bypassed*, so the check proves the escaping itself, not only the policy behind it;
* with the CSP enforced, the app's own pages cause no CSP violation (inline script or style the policy blocks would
  silently break the page);
* the app opens inside the EHR's iframe (frame-ancestors allows the registered EHR) and nowhere else;
* axe-core (tests/browser/package.json; ``npm ci`` there) finds no serious or critical violation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.fixtures.app import start_app_server
from tests.fixtures.required import missing_dependency
from tests.fixtures.smart_sandbox import create_launch, register_client, start_smart_sandbox
from tests.integration.test_app_safety import (FEIL, PHYSICIAN, THERAPIST, do_launch, plant_hostile_text,
                                               plant_message, sign_with_overrides)

pytestmark = pytest.mark.browser

AXE = Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    sb = start_smart_sandbox()
    app = None
    try:
        app = start_app_server(lambda url: [{"iss": sb.fhir_base, "client_id": "safety-browser", "name": "Sandbox EHR",
                                             "frame_ancestors": [sb.url]}])
        register_client(sb, {"client_id": "safety-browser", "auth_method": "none", "name": "safety (browser)",
                             "redirect_uris": [app.redirect_uri], "launch_url": app.launch_url})
        plant_hostile_text(sb)
        physician = do_launch(sb, app, "safety-browser", PHYSICIAN, FEIL)
        draft_id, order_id, _pages = sign_with_overrides(physician)
        plant_message(sb, order_id)
        yield {"sandbox": sb, "app": app, "order_id": order_id, "draft_id": draft_id}
    finally:
        if app is not None:
            app.stop()
        sb.stop()


def _pages(world: dict[str, Any], user: str) -> list[str]:
    if user == PHYSICIAN:
        return ["", "orders/", "plan/", "plan/panel"]
    return ["", "sessions/", f"sessions/{world['order_id']}", "plan/"]


def _open_launch(page: Any, world: dict[str, Any], user: str) -> str:
    out = create_launch(world["sandbox"], "safety-browser", user, FEIL)
    page.goto(out["launch_url"])
    page.wait_for_load_state("load")
    assert "/p/" in page.url, page.url
    return page.url.split("/p/")[0] + "/p/" + page.url.split("/p/")[1].split("/")[0] + "/"


@pytest.mark.parametrize("user", [PHYSICIAN, THERAPIST])
def test_no_dialog_fires_and_axe_finds_nothing_serious(browser, world, user):
    context = browser.new_context(bypass_csp=True)  # the escaping alone must hold; also lets axe be injected
    dialogs: list[str] = []
    problems: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("dialog", lambda d: (dialogs.append(f"{page.url}: {d.message}"), d.dismiss()))
        if AXE.exists():  # control: axe as injected here does report a page that is wrong
            page.goto("data:text/html,<html><body><img src='data:,'><input></body></html>")
            page.add_script_tag(path=str(AXE))
            control = page.evaluate("async () => (await axe.run(document)).violations.map(v => v.id)")
            assert "image-alt" in control, control
        landing = _open_launch(page, world, user)
        visited = []
        for path in _pages(world, user):
            resp = page.goto(landing + path)
            page.wait_for_load_state("load")
            if resp is None or resp.status != 200:
                problems.append(f"{path or 'landing'}: answered {resp.status if resp else None}, not the page")
            visited.append(page.url)  # "load" waits for images, so a planted onerror would have run by now
            if "&lt;script&gt;" in page.inner_text("body"):
                problems.append(f"{page.url}: double-escaped text (the user sees &lt;)")
            if AXE.exists():
                page.add_script_tag(path=str(AXE))
                result = page.evaluate("""async () => {
                    const r = await axe.run(document, {resultTypes: ['violations']});
                    return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
                        .map(v => v.impact + ' ' + v.id + ': ' + v.help + ' -> ' +
                             v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '));
                }""")
                problems += [f"{page.url}: {v}" for v in result]
        # the order form with its blocked sign (the finding's evidence shows the planted Condition)
        page.goto(landing + "orders/")
        page.wait_for_load_state("load")
        body = page.content()
        if user == PHYSICIAN:
            assert "onerror=alert(2)" in page.inner_text("body"), "the planted Condition is not on the order page"
            # the live re-screen swaps the summary in with innerHTML: a change of technique makes it run
            with page.expect_response(lambda r: r.url.endswith("/orders/screen")) as screened:
                page.locator('input[name="technique"][value="swedish"]').check()
            assert screened.value.status == 200
            page.wait_for_function("() => !document.querySelector('[aria-busy=\"true\"]')")
            assert "onerror=alert(2)" in page.inner_text("body"), "the re-screened summary lost the Condition"
        assert "<img src=\"x\" onerror" not in body
    finally:
        context.close()
    assert not dialogs, dialogs
    assert not problems, "\n".join(problems)
    if not AXE.exists():
        missing_dependency(f"axe-core ({AXE}; the dialog check passed)", "run `make node-deps` (npm ci in tests/browser)")


@pytest.mark.parametrize("user", [PHYSICIAN, THERAPIST])
def test_the_apps_own_pages_keep_to_their_csp(browser, world, user):
    context = browser.new_context()
    violations: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m: violations.append(f"{page.url}: {m.text}")
                if "Content Security Policy" in m.text else None)
        page.add_init_script("document.addEventListener('securitypolicyviolation', e => console.error("
                             "'Content Security Policy violation: ' + e.violatedDirective + ' ' + e.blockedURI));")
        landing = _open_launch(page, world, user)
        for path in _pages(world, user):
            resp = page.goto(landing + path)
            page.wait_for_load_state("networkidle")
            assert resp is not None and resp.status == 200, (path, resp.status if resp else None)
    finally:
        context.close()
    assert not violations, "\n".join(dict.fromkeys(violations))


def test_the_app_frames_in_its_ehr_and_nowhere_else(browser, world):
    sb = world["sandbox"]
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{sb.url}/ehr/launch?client_id=safety-browser&user={PHYSICIAN}&patient={FEIL}&embed=1")
        frame = page.frame_locator("iframe")
        frame.locator("h1").first.wait_for()
        assert frame.locator("h1").count() == 1

        # a data: document has an opaque origin, certainly not a registered EHR: Chromium must refuse the frame
        app_url = world["app"].url
        page.goto(f'data:text/html,<iframe src="{app_url}/"></iframe>')
        page.wait_for_load_state("load")
        child = page.frames[1]
        # Chromium replaces a frame refused by frame-ancestors with its error page
        assert not child.url.startswith(app_url), f"an unregistered origin framed the app: {child.url}"
        assert child.url.startswith("chrome-error://"), child.url
    finally:
        context.close()


TAG_FOCUSABLES = """() => {
    const all = [...document.querySelectorAll('a[href], button, input, select, textarea, summary, [tabindex]')];
    const visible = all.filter(el => {
        if (el.disabled || el.type === 'hidden' || el.closest('[hidden], [inert]')) return false;
        if (el.getAttribute('tabindex') === '-1') return false;
        // inside a closed <details> only its own summary is a Tab stop (the rest opens with it)
        const closed = el.closest('details:not([open])');
        if (closed && !(el.tagName === 'SUMMARY' && el.parentElement === closed)) return false;
        if (el.tagName === 'SUMMARY' && el.parentElement.closest('details:not([open])') !== el.parentElement
            && el.parentElement.parentElement && el.parentElement.parentElement.closest('details:not([open])'))
            return false;
        const r = el.getBoundingClientRect();
        const cs = getComputedStyle(el);
        return r.width > 0 && r.height > 0 && cs.visibility !== 'hidden' && cs.display !== 'none';
    });
    // radio groups: one Tab stop per group (arrow keys move inside it)
    const seenGroups = new Set();
    const out = [];
    visible.forEach((el, i) => {
        el.dataset.kb = String(i);
        if (el.type === 'radio') {
            const g = (el.form ? el.form.id : '') + '|' + el.name;
            if (seenGroups.has(g)) return;
            seenGroups.add(g);
            document.querySelectorAll('input[type=radio][name="' + CSS.escape(el.name) + '"]')
                .forEach(r => r.dataset.kbGroup = g);
        }
        out.push(el.type === 'radio' ? 'group:' + (el.form ? el.form.id : '') + '|' + el.name : String(i));
    });
    return out;
}"""

ACTIVE = """() => { const el = document.activeElement; if (!el || el === document.body) return null;
    return el.dataset.kbGroup ? 'group:' + el.dataset.kbGroup : (el.dataset.kb || 'untracked:' + el.tagName); }"""


@pytest.mark.parametrize("user", [PHYSICIAN, THERAPIST])
def test_every_page_is_usable_from_the_keyboard(browser, world, user):
    """The first Tab lands on the skip link and Enter moves past the navigation; every visible control is reached
    with Tab alone (no mouse-only control)."""
    context = browser.new_context()
    problems: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        landing = _open_launch(page, world, user)
        for path in _pages(world, user):
            resp = page.goto(landing + path)
            page.wait_for_load_state("load")
            if resp is None or resp.status != 200:
                problems.append(f"{path or 'landing'}: answered {resp.status if resp else None}, not the page")
            page.keyboard.press("Tab")
            first = page.evaluate("() => [document.activeElement.tagName, document.activeElement.textContent.trim(),"
                                  " document.activeElement.getAttribute('href')]")
            if first[0] != "A" or not (first[2] or "").startswith("#") or "skip" not in first[1].lower():
                problems.append(f"{path or 'landing'}: the first Tab stop is {first}, not a skip link")
            else:
                page.keyboard.press("Enter")
                target = page.evaluate("(id) => { const t = document.getElementById(id); return !!t; }", first[2][1:])
                if not target:
                    problems.append(f"{path or 'landing'}: the skip link points at #{first[2][1:]}, which is missing")
            wanted = page.evaluate(TAG_FOCUSABLES)
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            reached: set[str] = set()
            for _ in range(len(wanted) + 40):
                page.keyboard.press("Tab")
                now = page.evaluate(ACTIVE)
                if now is not None:
                    reached.add(now)
                if set(wanted) <= reached:
                    break
            missing = [w for w in wanted if w not in reached]
            if missing:
                names = page.evaluate("""(ids) => ids.map(id => { const el = id.startsWith('group:') ?
                    document.querySelector('[data-kb-group="' + id.slice(6) + '"]') :
                    document.querySelector('[data-kb="' + id + '"]');
                    return el ? el.outerHTML.slice(0, 120) : id; })""", missing[:5])
                problems.append(f"{path or 'landing'}: {len(missing)} control(s) not reachable with Tab: {names}")
    finally:
        context.close()
    assert not problems, "\n".join(problems)
