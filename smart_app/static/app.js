// fhir-massage: small helpers, loaded as a static file (the CSP allows no inline scripts).
// fmFetch(url, options): fetch with the CSRF header that every state-changing request needs (security.py).
(function () {
  "use strict";
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  window.fmFetch = function (url, options) {
    options = options || {};
    var headers = new Headers(options.headers || {});
    headers.set("X-CSRF-Token", csrfToken());
    if (!headers.has("Accept")) { headers.set("Accept", "application/json"); }
    options.headers = headers;
    options.credentials = "same-origin";
    return fetch(url, options);
  };
})();
