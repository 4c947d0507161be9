// Session note page (issue 7): live minutes and CPT units, the browser's time zone, the not-done reason, and the
// server-side autosave. Loaded as a static file (the CSP allows no inline script); uses fmFetch from app.js (CSRF).
//
// Autosave: the whole form is posted to data-autosave-url about 1 s after typing stops, at once when a field loses
// focus, and with fetch keepalive when the page is hidden or unloaded (visibilitychange / pagehide), so closing
// the tab does not lose the last words. The status line (role=status, aria-live=polite) says when the draft was
// last saved, or plainly that it was not.
(function () {
  "use strict";
  var form = document.getElementById("note");
  if (!form) { return; }
  var statusEl = form.querySelector(".draft-status");
  var url = form.getAttribute("data-autosave-url");
  var timer = null;
  var dirty = false;
  var inflight = false;
  var again = false;
  var stopped = false; // the draft was written or replaced: no more autosaves from this page

  function two(n) { return (n < 10 ? "0" : "") + n; }

  function setStatus(text, isError) {
    if (!statusEl) { return; }
    statusEl.textContent = text;
    statusEl.classList.toggle("draft-status--error", !!isError);
  }

  // --- time zone: the server reads times in the browser's offset (minutes east of UTC) -----------------------
  var tzInput = form.querySelector("[data-tz]");
  var tzLabel = form.querySelector("[data-tz-label]");
  var offset = -new Date().getTimezoneOffset();
  if (tzInput) { tzInput.value = String(offset); }
  if (tzLabel) {
    var name = "";
    try { name = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { name = ""; }
    var sign = offset >= 0 ? "+" : "-";
    var abs = Math.abs(offset);
    if (name === "UTC" || name === "Etc/UTC") { name = ""; }
    var utc = "UTC" + sign + two(Math.floor(abs / 60)) + ":" + two(abs % 60);
    tzLabel.textContent = name ? name + " (" + utc + ")" : utc;
  }

  // A new note: the server proposed today's date in UTC; the therapist's "today" is the browser's.
  if (form.hasAttribute("data-fresh") && form.elements.date) {
    var now = new Date();
    form.elements.date.value = now.getFullYear() + "-" + two(now.getMonth() + 1) + "-" + two(now.getDate());
  }

  // --- live minutes and CPT units (CMS 8-minute rule on the visit's TOTAL minutes, shared between the codes by
  // their minutes: the same as builders.session.cpt_units / visit_cpt_minutes / units_by_code) ------------------
  var out = form.querySelector("[data-minutes]");
  function minutesOf(value) {
    var m = /^(\d{2}):(\d{2})/.exec(value || "");
    return m ? parseInt(m[1], 10) * 60 + parseInt(m[2], 10) : null;
  }
  function units(minutes) { return minutes < 8 ? 0 : Math.floor((minutes + 7) / 15); }
  function perCode(total) {
    // {code: minutes} of the ticked techniques, or null when several codes cannot be told apart
    var codes = {}, order = [];
    form.querySelectorAll('input[name="techniques"]:checked').forEach(function (box) {
      var code = box.getAttribute("data-cpt");
      if (!code) { return; }
      if (!codes[code]) { codes[code] = { given: false, minutes: 0 }; order.push(code); }
      var field = form.querySelector('[data-minutes-for="' + box.value + '"]');
      var v = field && /^\d+$/.test(field.value) ? parseInt(field.value, 10) : null;
      if (v !== null) { codes[code].given = true; codes[code].minutes += v; }
    });
    if (order.length === 1) { var one = {}; one[order[0]] = total; return { codes: order, minutes: one }; }
    var unknown = order.filter(function (c) { return !codes[c].given; });
    if (unknown.length > 1) { return { codes: order, minutes: null }; }
    var known = 0, out = {};
    order.forEach(function (c) { if (codes[c].given) { out[c] = codes[c].minutes; known += codes[c].minutes; } });
    if (unknown.length) { out[unknown[0]] = Math.max(0, total - known); }
    return { codes: order, minutes: out };
  }
  function split(minutes) {
    var codes = Object.keys(minutes).filter(function (c) { return minutes[c] > 0; });
    var total = 0;
    codes.forEach(function (c) { total += minutes[c]; });
    var u = {}, used = 0;
    codes.forEach(function (c) { u[c] = Math.floor(minutes[c] / 15); used += u[c]; });
    codes.sort(function (a, b) {
      return (minutes[b] % 15) - (minutes[a] % 15) || minutes[b] - minutes[a] || (a < b ? -1 : a > b ? 1 : 0);
    });
    codes.slice(0, Math.max(0, units(total) - used)).forEach(function (c) { u[c] += 1; });
    return Object.keys(u).sort().filter(function (c) { return u[c] > 0; }).map(function (c) {
      return c + " \u00d7 " + u[c];
    });
  }
  function updateMinutes() {
    if (!out) { return; }
    var s = minutesOf(form.elements.start.value);
    var e = minutesOf(form.elements.end.value);
    if (s === null || e === null) { out.textContent = "\u2014 min"; return; }
    var m = e - s;
    if (m <= 0) { out.textContent = "The end is not after the start"; return; }
    var u = units(m);
    var text = m + " min \u00b7 " + u + " CPT unit" + (u === 1 ? "" : "s");
    var pc = perCode(m);
    if (pc.minutes === null) {
      text += " (" + pc.codes.join(" + ") + ": give the minutes per technique to split them)";
    } else if (pc.codes.length > 1) {
      var parts = split(pc.minutes);
      if (parts.length) { text += ": " + parts.join(", "); }
    } else if (pc.codes.length === 1) {
      text += " (" + pc.codes[0] + ")";
    }
    out.textContent = text;
  }

  // --- not done: show the reason field only then -------------------------------------------------------------
  function updateStatus() {
    var notDone = form.querySelector('input[name="status"][value="not-done"]').checked;
    form.querySelectorAll('[data-show-when="not-done"]').forEach(function (el) { el.hidden = !notDone; });
  }
  document.querySelectorAll('[data-action="not-done"]').forEach(function (btn) {
    btn.addEventListener("click", function () {
      form.querySelector('input[name="status"][value="not-done"]').checked = true;
      var reason = form.elements.status_reason;
      if (reason && !reason.value) { reason.value = btn.getAttribute("data-reason") || ""; }
      updateStatus();
      schedule(0);
      if (reason) { setTimeout(function () { reason.focus(); }, 0); }
    });
  });

  // --- body diagram (smart_app/templates/_body_diagram.html) <-> the site checkboxes (values CODE[:side]) -------
  function siteBox(key) { return form.querySelector('input[name="sites"][value="' + key + '"]'); }
  function sidesOf(code) {
    var both = siteBox(code + ":bilateral"), l = siteBox(code + ":left"), r = siteBox(code + ":right");
    var out = [];
    if (both && both.checked) { return ["left", "right"]; }
    if (l && l.checked) { out.push("left"); }
    if (r && r.checked) { out.push("right"); }
    return out;
  }
  function syncDiagram() {
    form.querySelectorAll(".bd-region").forEach(function (region) {
      var code = region.getAttribute("data-site"), side = region.getAttribute("data-side");
      var box = siteBox(code);
      var on = side ? sidesOf(code).indexOf(side) >= 0 : !!(box && box.checked);
      region.classList.toggle("bd-region--selected", on);
      region.setAttribute("aria-checked", on ? "true" : "false");
    });
  }
  function toggleRegion(region) {
    var code = region.getAttribute("data-site"), side = region.getAttribute("data-side");
    if (!side) {
      var box = siteBox(code);
      if (box) { box.checked = !box.checked; }
    } else {
      var sides = sidesOf(code);
      var i = sides.indexOf(side);
      if (i >= 0) { sides.splice(i, 1); } else { sides.push(side); }
      ["left", "right", "bilateral"].forEach(function (s) {
        var b = siteBox(code + ":" + s);
        if (!b) { return; }
        b.checked = sides.length === 2 ? s === "bilateral" : (sides.length === 1 && sides[0] === s);
      });
      var other = form.querySelector(".other-sites");
      var shown = siteBox(code + ":" + (sides.length === 2 ? "bilateral" : (sides[0] || side)));
      if (other && shown && shown.checked && other.contains(shown)) { other.open = true; }
    }
    syncDiagram();
    schedule(1000);
  }
  form.querySelectorAll(".body-diagram--interactive .bd-region").forEach(function (region) {
    region.addEventListener("click", function () { toggleRegion(region); });
    region.addEventListener("keydown", function (ev) {
      if (ev.key === " " || ev.key === "Enter") { ev.preventDefault(); toggleRegion(region); }
    });
  });

  // --- autosave -----------------------------------------------------------------------------------------------
  function body() {
    var data = new URLSearchParams();
    new FormData(form).forEach(function (value, key) {
      if (key !== "action" && key !== "csrf_token") { data.append(key, value); }
    });
    return data;
  }

  function save(keepalive) {
    if (stopped || !url) { return; }
    if (inflight && !keepalive) { again = true; return; }
    dirty = false;
    inflight = true;
    var failed = false;
    setStatus("Saving draft…", false);
    var p = window.fmFetch(url, { method: "POST", body: body(), keepalive: !!keepalive,
                                  headers: { "Content-Type": "application/x-www-form-urlencoded" } });
    p.then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (data) { return [resp, data]; });
    }).then(function (pair) {
      var resp = pair[0], data = pair[1];
      if (resp.ok && data.saved) {
        var d = new Date(data.saved_at);
        setStatus(dirty ? "Unsaved changes (saving automatically)"
                        : "Draft saved " + two(d.getHours()) + ":" + two(d.getMinutes()), false);
      } else if (resp.status === 409) {
        stopped = true;
        setStatus("Not saved: " + (data.message || "this draft was replaced. Reload the page."), true);
      } else if (resp.status === 401 || resp.status === 403) {
        // The app session ended (or this browser lost its cookie): retrying cannot help. The draft as last saved
        // is kept on the server; what was typed since is only in this page.
        stopped = true;
        setStatus("Not saved: " + (data.message || "your session has ended.") + " What you typed since the last " +
                  "save is only in this page: copy it, then open the patient again from the EHR.", true);
      } else {
        failed = true;
        setStatus("Not saved: " + (data.message || ("the app answered " + resp.status + ".")) +
                  " Keep this page open; it will try again, or use Save draft.", true);
      }
    }).catch(function () {
      failed = true;
      setStatus("Not saved: the app could not be reached. Keep this page open; it will try again.", true);
    }).then(function () {
      inflight = false;
      if (stopped) { return; }
      if (failed || again || dirty) {
        again = false;
        dirty = true;
        if (timer) { clearTimeout(timer); }
        timer = setTimeout(function () { timer = null; save(false); }, failed ? 5000 : 0);
      }
    });
  }

  function schedule(ms) {
    if (!dirty && !stopped && !inflight) { setStatus("Unsaved changes (saving automatically)", false); }
    dirty = true;
    if (timer) { clearTimeout(timer); }
    timer = setTimeout(function () { timer = null; save(false); }, ms === undefined ? 1000 : ms);
  }

  form.addEventListener("input", function (ev) {
    if (ev.target.name === "start" || ev.target.name === "end" || ev.target.hasAttribute("data-minutes-for")) {
      updateMinutes();
    }
    schedule(1000);
  });
  form.addEventListener("change", function (ev) {
    if (ev.target.name === "sites") { syncDiagram(); }
    updateMinutes();
    updateStatus();
    schedule(1000);
  });
  form.addEventListener("focusout", function () {
    if (dirty) { if (timer) { clearTimeout(timer); timer = null; } save(false); }
  });
  function flush() {
    if (dirty) { if (timer) { clearTimeout(timer); timer = null; } save(true); }
  }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") { flush(); }
  });
  window.addEventListener("pagehide", flush);
  form.addEventListener("submit", function () {
    // The submit itself keeps the draft on the server first; no autosave may race it.
    stopped = true;
    if (timer) { clearTimeout(timer); timer = null; }
  });

  window.addEventListener("pageshow", function (ev) {
    if (ev.persisted) { stopped = false; } // back from a failed submit (bfcache): autosave again
  });

  updateMinutes();
  updateStatus();
  syncDiagram();
})();
