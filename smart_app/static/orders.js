// The order page: body diagram <-> site list, live re-screen (POST .../orders/screen), one-click signing.
// Works as progressive enhancement: without this script the checkbox list + side selects and the Sign button
// do everything (the server checks and screens on submit).
(function () {
  "use strict";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function init() {
    var form = $("#order-form");
    if (!form) { return; }
    var panel = $("#screening-panel");
    var live = $("#verdict-live");
    var status = $("#sign-status");
    var screenUrl = form.getAttribute("data-screen-url");
    var lastVerdict = panel ? panel.getAttribute("data-verdict") : null;
    var touched = {};
    var touchedActions = {};  // override / acknowledgement inputs the physician has used (names)
    var timer = null;
    var seq = 0;

    // --- sites: list state <-> diagram ---------------------------------------------------------------------
    function siteBox(code) { return form.querySelector('input[name="site"][value="' + code + '"]'); }
    function sideSelect(code) { return form.querySelector('select[name="side-' + code + '"]'); }

    function sidesOf(code) {
      var box = siteBox(code), sel = sideSelect(code);
      if (!box || !box.checked) { return []; }
      if (!sel) { return ["*"]; }
      if (sel.value === "bilateral") { return ["left", "right"]; }
      return sel.value ? [sel.value] : [];
    }

    function syncDiagram() {
      $all(".bd-region").forEach(function (region) {
        var code = region.getAttribute("data-site");
        var side = region.getAttribute("data-side");
        var sides = sidesOf(code);
        var on = side ? sides.indexOf(side) >= 0 : sides.length > 0;
        region.classList.toggle("bd-region--selected", on);
        region.setAttribute("aria-checked", on ? "true" : "false");
      });
    }

    function toggleRegion(region) {
      var code = region.getAttribute("data-site");
      var side = region.getAttribute("data-side");
      var box = siteBox(code), sel = sideSelect(code);
      if (!box) { return; }
      if (!side || !sel) {
        box.checked = !box.checked;
      } else {
        var sides = sidesOf(code).filter(function (s) { return s !== "*"; });
        var i = sides.indexOf(side);
        if (i >= 0) { sides.splice(i, 1); } else { sides.push(side); }
        if (sides.length === 0) { box.checked = false; sel.value = ""; }
        else { box.checked = true; sel.value = sides.length === 2 ? "bilateral" : sides[0]; }
      }
      touched.sites = true;
      syncDiagram();
      schedule(0);
    }

    $all(".body-diagram--interactive .bd-region").forEach(function (region) {
      region.addEventListener("click", function () { toggleRegion(region); });
      region.addEventListener("keydown", function (ev) {
        if (ev.key === " " || ev.key === "Enter") { ev.preventDefault(); toggleRegion(region); }
      });
    });

    // --- live re-screen ------------------------------------------------------------------------------------
    function fieldKey(el) {
      var n = el.name || "";
      if (n === "technique") { return "techniques"; }
      if (n === "site" || n.indexOf("side-") === 0) { return "sites"; }
      if (n === "reason_ref") { return "reason_refs"; }
      return n;
    }

    function showProblems(problems) {
      $all("[data-error-for]").forEach(function (p) {
        var key = p.getAttribute("data-error-for");
        var reasonKey = key === "reason_text" || key === "reason_refs";
        var show = problems[key] && (touched[key] || (reasonKey && (touched.reason_text || touched.reason_refs)));
        p.textContent = show ? problems[key] : "";
        p.hidden = !show;
        var input = form.querySelector('[name="' + key + '"]');
        if (input && input.tagName !== "FIELDSET") {
          if (show) { input.setAttribute("aria-invalid", "true"); } else { input.removeAttribute("aria-invalid"); }
        }
      });
    }

    function markSites(keys) {
      // the back view's outline parts (limbs, head) are hatched with their site; they are not choosable there
      $all("[data-outline-key]").forEach(function (part) {
        part.classList.toggle("bd-region--marked", keys.indexOf(part.getAttribute("data-outline-key")) >= 0);
      });
      $all(".bd-region").forEach(function (region) {
        var key = region.getAttribute("data-key");
        var label = region.getAttribute("data-label");
        var marked = keys.indexOf(key) >= 0;
        region.classList.toggle("bd-region--marked", marked);
        region.setAttribute("aria-label", label + (marked ? ", contraindicated here" : ""));
        var title = region.querySelector("title");
        if (title) { title.textContent = label + (marked ? " (contraindicated here)" : ""); }
      });
    }

    // Replace the summary but keep what the physician is typing in it (an override reason chosen while the request
    // was in flight) and keep the focus where it was.
    function swapPanel(html) {
      var kept = {};
      $all("input, select, textarea", panel).forEach(function (el) {
        kept[el.name] = el.type === "checkbox" ? el.checked : el.value;
      });
      var focused = document.activeElement && panel.contains(document.activeElement) ? document.activeElement.name : null;
      var shown = {};
      $all(".finding__action .field-error", panel).forEach(function (p) { shown[p.id] = true; });
      panel.innerHTML = html;
      // An override or acknowledgement message appears once the physician has used that input, or after a refused
      // sign (the server renders it then): a live re-screen after a click on the diagram must not greet them with
      // red errors for boxes they have not reached yet. The sign status line already says what is missing.
      $all(".finding__action .field-error", panel).forEach(function (p) {
        var name = p.id.replace(/^err-/, "");
        if (shown[p.id] || touchedActions[name]) { return; }
        var input = panel.querySelector('[aria-describedby="' + p.id + '"]');
        if (input) { input.removeAttribute("aria-invalid"); input.removeAttribute("aria-describedby"); }
        p.parentNode.removeChild(p);
      });
      $all("input, select, textarea", panel).forEach(function (el) {
        if (!Object.prototype.hasOwnProperty.call(kept, el.name)) { return; }
        if (el.type === "checkbox") { el.checked = kept[el.name]; } else { el.value = kept[el.name]; }
      });
      if (focused) {
        var again = panel.querySelector('[name="' + focused + '"]');
        if (again) { again.focus(); }
      }
    }

    function rescreen() {
      var mine = ++seq;
      var body = new URLSearchParams(new FormData(form));
      body.delete("csrf_token");
      window.fmFetch(screenUrl, {
        method: "POST", body: body,
        headers: { "Content-Type": "application/x-www-form-urlencoded" }
      }).then(function (resp) {
        if (!resp.ok) { throw new Error("screen " + resp.status); }
        return resp.json();
      }).then(function (data) {
        if (mine !== seq) { return; }  // a newer request is on its way
        swapPanel(data.html);
        panel.setAttribute("data-verdict", data.verdict);
        markSites(data.markedSites || []);
        showProblems(data.problems || {});
        if (status) { status.textContent = data.signStatus; }
        if (data.verdict !== lastVerdict) {
          lastVerdict = data.verdict;
          live.textContent = "Screening verdict: " + data.verdictText;
        }
      }).catch(function () {
        if (mine === seq && status) {
          status.textContent = "The screening could not be refreshed; it runs again when you sign.";
        }
      });
    }

    function schedule(delay) {
      if (timer) { clearTimeout(timer); }
      timer = setTimeout(rescreen, delay);
    }

    function onEdit(ev) {
      var el = ev.target;
      if (!el || !el.name) { return; }
      // override/ack inputs: re-screen on change only (the sign status follows), never while typing
      if (panel && panel.contains(el)) { touchedActions[el.name] = true; if (ev.type === "change") { schedule(0); } return; }
      touched[fieldKey(el)] = true;
      if (el.name === "site" || el.name.indexOf("side-") === 0) { syncDiagram(); }
      schedule(ev.type === "input" && el.type !== "checkbox" ? 300 : 0);
    }
    form.addEventListener("change", onEdit);
    form.addEventListener("input", onEdit);

    // --- signing: one click is one submit (the server is idempotent anyway) --------------------------------
    form.addEventListener("submit", function (ev) {
      var button = $("#sign-button");
      if (form.getAttribute("data-submitting")) { ev.preventDefault(); return; }
      form.setAttribute("data-submitting", "1");
      if (button) {
        // disable after this tick so the submit itself still carries the button
        setTimeout(function () { button.disabled = true; button.textContent = "Signing…"; }, 0);
      }
    });

    syncDiagram();
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); }
  else { init(); }
})();
