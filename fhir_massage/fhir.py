"""THE HTTP edge of fhir-massage: one FHIR R4 REST client that reads and writes plain dicts.

What it does, and the spec behind each choice:

* Interactions (FHIR R4 http.html): read, vread, search (GET, or POST ``[type]/_search`` with a form body when the
  URL would be too long, http.html#search "POST ... application/x-www-form-urlencoded"), paging through
  ``Bundle.link[relation=next]`` (search.html#paging), batch/transaction (http.html#transaction), create with
  ``If-None-Exist`` (http.html#ccreate), update with ``If-Match`` (http.html#concurrency), delete, capabilities.
* Every non-2xx answer becomes a typed error from ``fhir_massage.errors`` whose message is built from the
  OperationOutcome's ``diagnostics`` / ``details`` in plain words; the raw body is never put in a message.
  Error messages and ``error.url`` carry the path only, never the query string: search parameters hold patient
  identifiers and must stay out of logs.
* Retries only when asking again cannot do harm (RFC 9110 §9.2.2 idempotent methods):
    - GET/HEAD, PUT and DELETE are idempotent by HTTP. A retried ``PUT`` with ``If-Match`` whose first attempt
      did land answers 412: that surfaces as ``FhirConflict`` (never a double write); re-read and decide.
    - ``POST [type]/_search`` is a read (http.html#search), so it is safe.
    - ``POST`` create with ``If-None-Exist`` is safe: a retry after a lost answer finds the resource created by
      the first attempt and returns it (200) instead of creating a second one (http.html#ccreate).
    - A batch/transaction is safe when every entry is: GET/HEAD/PUT/DELETE, or POST with ``ifNoneExist``. One
      plain POST or a PATCH (not idempotent in general, RFC 5789 §2) in it makes the whole Bundle unsafe.
    - Any other POST/PATCH is never retried: a dropped connection may mean the server already acted.
  Retried conditions: 429, 502, 503, 504, time-outs and dropped connections. ``Retry-After`` (delta-seconds or
  HTTP-date, RFC 9110 §10.2.3) is honoured, capped at ``max_retry_wait``; otherwise exponential back-off with
  jitter, capped. A 500 is not retried: it usually means the request itself breaks the server.
* Bearer tokens come from a pluggable ``TokenSource``. A 401 (RFC 6750 §3.1 ``invalid_token``: the server did not
  act on the request) makes the client ask the source to refresh once and repeat the request once, whatever its
  method. The Authorization header only ever goes to the origin of ``base_url`` (RFC 6750 §5.3: never hand a
  bearer token to another party); URLs of another origin (a paging link, ``get_url``) are refused outright.
* Redirects are not followed: a FHIR base does not redirect in normal operation, and following one could carry
  the request (and its token) somewhere we did not choose.
"""

from __future__ import annotations

import email.utils
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import orjson
import requests

from .errors import FhirAuthError, FhirConflict, FhirError, FhirNotFound, FhirUnavailable, InvalidInput

__all__ = [
    "FHIR_JSON",
    "FhirClient",
    "FhirResult",
    "RequestEvent",
    "TokenSource",
    "StaticToken",
    "batch_bundle",
    "entry_outcomes",
    "error_for_status",
    "new_urn",
    "request_entry",
    "resources",
    "transaction_bundle",
]

FHIR_JSON = "application/fhir+json"
_ACCEPT = FHIR_JSON
_FORM = "application/x-www-form-urlencoded"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 datatypes.html#id
_SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None


class TokenSource(Protocol):
    """Where the client gets its bearer token. Return None when there is none (the request goes without)."""

    def token(self) -> str | None: ...

    def refresh(self) -> str | None: ...


class StaticToken:
    """A fixed token that cannot be refreshed (tests, the sandbox's demo tokens, backend scripts)."""

    def __init__(self, value: str | None) -> None:
        self._value = value

    def token(self) -> str | None:
        return self._value

    def refresh(self) -> str | None:
        return None

    def __repr__(self) -> str:  # never show the token itself
        return "StaticToken(***)"


@dataclass(frozen=True)
class RequestEvent:
    """One round trip, for a logging hook. Deliberately no query string, headers, token or body."""

    method: str
    path: str
    status: int | None  # None: no HTTP answer (time-out, dropped connection)
    ms: float
    attempt: int  # 1 for the first try of a call, 2 for its first retry, ...
    error: str | None = None  # exception class name when there was no HTTP answer


@dataclass(frozen=True)
class FhirResult:
    """The answer to a write (or one Bundle response entry): HTTP status, resource if any, Location and ETag."""

    status: int
    resource: dict[str, Any] | None = None
    location: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    outcome: dict[str, Any] | None = None  # an OperationOutcome with warnings/information, if one came back

    @property
    def created(self) -> bool:
        return self.status == 201

    @property
    def id(self) -> str | None:
        if self.resource and self.resource.get("id"):
            return self.resource["id"]
        parts = _location_parts(self.location)
        return parts[1] if parts else None

    @property
    def version_id(self) -> str | None:
        meta = (self.resource or {}).get("meta") or {}
        if meta.get("versionId"):
            return str(meta["versionId"])
        if self.etag:
            return _etag_version(self.etag)
        parts = _location_parts(self.location)
        return parts[2] if parts else None


# ---------------------------------------------------------------------------------------------------------------
# Bundle helpers (pure)


def new_urn() -> str:
    """A fresh ``urn:uuid:`` for Bundle.entry.fullUrl, so entries can reference each other (bundle.html#references)."""
    return f"urn:uuid:{uuid.uuid4()}"


def resources(bundle: Mapping[str, Any], resource_type: str | None = None) -> list[dict[str, Any]]:
    """The entry resources of a Bundle, minus ``search.mode = outcome`` entries (warnings, search.html#errors).

    ``resource_type`` keeps only that type (e.g. drop ``_include``d Patients).
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise FhirError("Expected a FHIR Bundle but got something else.", code="fhir-bad-body")
    out = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, Mapping):
            continue
        res = entry.get("resource")
        if not isinstance(res, dict):
            continue
        if (entry.get("search") or {}).get("mode") == "outcome":
            continue
        if resource_type and res.get("resourceType") != resource_type:
            continue
        out.append(res)
    return out


def request_entry(
    method: str,
    url: str,
    resource: Mapping[str, Any] | None = None,
    *,
    full_url: str | None = None,
    if_none_exist: str | Params = None,
    if_match: str | None = None,
) -> dict[str, Any]:
    """One Bundle.entry with a ``request`` for a batch or transaction.

    ``url`` is relative to the base (``Patient``, ``Patient/1``, ``Patient?identifier=...``).
    ``if_none_exist`` may be a query string or params; ``if_match`` a version id or an ETag.
    """
    method = method.upper()
    if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        raise InvalidInput(f"{method} is not a FHIR Bundle request method.")
    if url.startswith(("http://", "https://", "/")):
        raise InvalidInput("Bundle request URLs are relative to the FHIR base, e.g. 'Patient/123'.")
    if method in ("POST", "PUT", "PATCH") and resource is None:
        raise InvalidInput(f"A {method} entry needs a resource.")
    entry: dict[str, Any] = {}
    if full_url:
        entry["fullUrl"] = full_url
    if resource is not None:
        entry["resource"] = dict(resource)
    request: dict[str, Any] = {"method": method, "url": url}
    if if_none_exist is not None:
        if method != "POST":
            raise InvalidInput("ifNoneExist only applies to a create (POST).")
        request["ifNoneExist"] = _query_string(if_none_exist)
    if if_match is not None:
        request["ifMatch"] = _as_etag(if_match)
    entry["request"] = request
    return entry


def transaction_bundle(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``transaction`` Bundle from request entries (see ``request_entry``)."""
    return _request_bundle("transaction", entries)


def batch_bundle(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``batch`` Bundle from request entries (see ``request_entry``)."""
    return _request_bundle("batch", entries)


def _request_bundle(kind: str, entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, Mapping) else None
        if not isinstance(request, Mapping) or not request.get("method") or not request.get("url"):
            raise InvalidInput(f"Entry {i} of the {kind} has no request.method and request.url.")
        full_url = entry.get("fullUrl")
        if full_url:
            # bundle.html#bundle-unique: fullUrl must be unique within a Bundle (except history versions)
            if full_url in seen:
                raise InvalidInput(f"Entry {i} of the {kind} repeats fullUrl {full_url}.")
            seen.add(full_url)
        out.append(dict(entry))
    return {"resourceType": "Bundle", "type": kind, "entry": out}


def entry_outcomes(response_bundle: Mapping[str, Any]) -> list[FhirResult | FhirError]:
    """Each response entry of a batch/transaction-response as a ``FhirResult`` (2xx/3xx) or a typed ``FhirError``.

    Errors are returned, not raised, so a caller can handle a partly failed batch entry by entry.
    """
    if not isinstance(response_bundle, Mapping) or response_bundle.get("resourceType") != "Bundle":
        raise FhirError("Expected a batch or transaction response Bundle but got something else.",
                        code="fhir-bad-body")
    out: list[FhirResult | FhirError] = []
    for i, entry in enumerate(response_bundle.get("entry") or []):
        response = entry.get("response") if isinstance(entry, Mapping) else None
        status = _status_code((response or {}).get("status"))
        if status is None:
            out.append(FhirError(f"Response entry {i} has no readable response.status.", code="fhir-bad-body"))
            continue
        outcome = response.get("outcome")
        if not (isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome"):
            outcome = None
        resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
        if resource is not None and resource.get("resourceType") == "OperationOutcome" and outcome is None:
            outcome, resource = resource, None
        if status >= 400:
            out.append(error_for_status(status, outcome, None, what=f"Entry {i}"))
        else:
            out.append(FhirResult(status=status, resource=resource, location=response.get("location"),
                                  etag=response.get("etag"), last_modified=response.get("lastModified"),
                                  outcome=outcome))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Errors


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            406: "Not Acceptable", 409: "Conflict", 410: "Gone", 412: "Precondition Failed", 415: "Unsupported Media Type",
            422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def outcome_text(outcome: Mapping[str, Any] | None, *, limit: int = 3) -> str:
    """Plain words from an OperationOutcome: each issue's diagnostics, else details.text, else a coding display."""
    parts: list[str] = []
    for issue in (outcome or {}).get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), Mapping) else {}
        text = issue.get("diagnostics") or details.get("text")
        if not text:
            text = next((c.get("display") or c.get("code") for c in details.get("coding") or []
                         if isinstance(c, Mapping) and (c.get("display") or c.get("code"))), None)
        if not text and issue.get("code"):
            text = f"issue type '{issue['code']}'"
        if text:
            where = issue.get("expression") or issue.get("location")
            if isinstance(where, list) and where and not any(str(w) in str(text) for w in where[:2]):
                text = f"{text} (at {', '.join(str(w) for w in where[:2])})"
            parts.append(" ".join(str(text).split()))
    more = len(parts) - limit
    words = "; ".join(parts[:limit]) + (f"; and {more} more issue{'s' if more > 1 else ''}" if more > 0 else "")
    return words[:600]


def error_for_status(status: int, outcome: Mapping[str, Any] | None, url: str | None, *,
                     what: str | None = None) -> FhirError:
    """The typed error for an HTTP status, with a message in plain words from the OperationOutcome."""
    cls: type[FhirError]
    if status in (401, 403):
        cls = FhirAuthError
    elif status in (404, 410):
        cls = FhirNotFound
    elif status in (409, 412):
        cls = FhirConflict
    elif status == 429 or status >= 500:
        cls = FhirUnavailable
    else:
        cls = FhirError
    head = f"{what or 'The FHIR server'} answered {status} {_REASONS.get(status, '')}".rstrip()
    words = outcome_text(outcome)
    message = f"{head}: {words}" if words else f"{head} (no explanation was given)."
    if not message.endswith("."):
        message += "."
    return cls(message, status=status, outcome=dict(outcome) if outcome else None, url=url)


# ---------------------------------------------------------------------------------------------------------------
# The client


class FhirClient:
    """A FHIR R4 REST client for one server (``base_url``). Thread-safe as far as ``requests.Session`` is.

    ``timeout`` is ``(connect, read)`` seconds or one number for both. ``max_retries`` counts retries after the
    first attempt. ``sleep``/``clock``/``jitter`` are injectable so tests never really wait.
    ``on_request`` is called once per round trip with a ``RequestEvent`` (no query, token or body in it).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token_source: TokenSource | None = None,
        timeout: float | tuple[float, float] = (5.0, 30.0),
        max_retries: int = 3,
        page_cap: int = 100,
        session: requests.Session | None = None,
        max_url_length: int = 1800,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        max_retry_wait: float = 30.0,
        on_request: Callable[[RequestEvent], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInput(f"The FHIR base URL must be an absolute http(s) URL, not {base_url!r}.")
        if parts.query or parts.fragment:
            raise InvalidInput("The FHIR base URL must not have a query or fragment.")
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self.token_source = token_source
        self.timeout = timeout if isinstance(timeout, tuple) else (float(timeout), float(timeout))
        self.max_retries = max(0, int(max_retries))
        self.page_cap = int(page_cap)
        self.max_url_length = int(max_url_length)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_retry_wait = max_retry_wait
        self.on_request = on_request
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._own_session = session is None
        self.session = session or requests.Session()
        self._count_lock = threading.Lock()
        self._request_count = 0

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- counting (benchmarks) -------------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """HTTP round trips attempted by this client so far, retries and 401 refresh repeats included."""
        return self._request_count

    def reset_request_count(self) -> int:
        """Set the counter back to 0 and return what it was (handy around one benchmarked step)."""
        with self._count_lock:
            before, self._request_count = self._request_count, 0
        return before

    # -- interactions ------------------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """``GET [base]/metadata`` (http.html#capabilities)."""
        url = self._url("metadata")
        return self._expect_type(self._json("GET", url, idempotent=True), "CapabilityStatement", url)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/[type]/[id]``; ``FhirNotFound`` for 404 and for 410 (deleted)."""
        url = self._url(_rtype(resource_type), _rid(resource_id))
        return self._expect_type(self._json("GET", url, idempotent=True), resource_type, url)

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """``GET [base]/[type]/[id]/_history/[vid]``."""
        url = self._url(_rtype(resource_type), _rid(resource_id), "_history", _rid(str(version_id)))
        return self._expect_type(self._json("GET", url, idempotent=True), resource_type, url)

    def search(self, resource_type: str | None, params: Params = None, *, method: str = "auto") -> dict[str, Any]:
        """One page of a search: the searchset Bundle. ``resource_type=None`` searches the whole system.

        ``method``: "get", "post" (``_search`` with a form body), or "auto" (POST when the GET URL would be
        longer than ``max_url_length``; many proxies and servers cut URLs near 2,000 characters).
        """
        return self._search(resource_type, params, method)[0]

    def _search(self, resource_type: str | None, params: Params, method: str) -> tuple[dict[str, Any], str | None]:
        """The first page, and the GET URL it came from (None when it was a POST)."""
        pieces = (_rtype(resource_type),) if resource_type else ()
        query = _query_string(params)
        get_url = self._url(*pieces) + (f"?{query}" if query else "")
        method = method.lower()
        if method not in ("auto", "get", "post"):
            raise InvalidInput("search method must be 'auto', 'get' or 'post'.")
        if method == "post" or (method == "auto" and len(get_url) > self.max_url_length):
            response = self._request("POST", self._url(*pieces, "_search"), body=query.encode(),
                                     content_type=_FORM, idempotent=True)
            fetched = None
        else:
            response = self._request("GET", get_url, idempotent=True)
            fetched = get_url
        return self._searchset(self._body(response, required=True), response.url), fetched

    def iter_pages(self, resource_type: str | None, params: Params = None, *, method: str = "auto",
                   page_cap: int | None = None) -> Iterator[dict[str, Any]]:
        """Every page of a search, following ``link[next]``. Raises ``FhirError`` (code ``fhir-paging``) when a
        next link repeats a URL already fetched (a server paging loop) or the page cap is reached with more left.
        """
        cap = self.page_cap if page_cap is None else page_cap
        page, fetched = self._search(resource_type, params, method)
        yield page
        yield from self._follow(page, cap, {fetched} if fetched else set())

    def search_all(self, resource_type: str | None, params: Params = None, *, method: str = "auto",
                   page_cap: int | None = None, only_type: bool = False) -> list[dict[str, Any]]:
        """The resources of every page. ``only_type`` drops ``_include``d resources of other types."""
        keep = resource_type if only_type else None
        out: list[dict[str, Any]] = []
        for page in self.iter_pages(resource_type, params, method=method, page_cap=page_cap):
            out.extend(resources(page, keep))
        return out

    def next_page(self, bundle: Mapping[str, Any]) -> dict[str, Any] | None:
        """The page after ``bundle`` (None on the last page). Same-origin links only."""
        url = _link(bundle, "next")
        if url is None:
            return None
        url = self._same_origin(urljoin(self.base_url + "/", url), "paging link")
        response = self._request("GET", url, idempotent=True)
        return self._searchset(self._body(response, required=True), url)

    def _follow(self, page: Mapping[str, Any], cap: int, seen: set[str]) -> Iterator[dict[str, Any]]:
        pages = 1
        while True:
            url = _link(page, "next")
            if url is None:
                return
            url = self._same_origin(urljoin(self.base_url + "/", url), "paging link")
            if url in seen:
                raise FhirError(f"The FHIR server's paging loops: page {pages + 1} links back to a page already "
                                "fetched, so the search was stopped.", code="fhir-paging", url=_no_query(url))
            if pages >= cap:
                raise FhirError(f"The search has more than {cap} pages; stopped at the page cap. Narrow the search "
                                "or raise page_cap.", code="fhir-paging", url=_no_query(url))
            seen.add(url)
            response = self._request("GET", url, idempotent=True)
            page = self._searchset(self._body(response, required=True), url)
            pages += 1
            yield page

    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | Params = None,
               prefer: str | None = "return=representation") -> FhirResult:
        """``POST [base]/[type]``. With ``if_none_exist`` (a query string or params) it is a conditional create:
        an existing match comes back with status 200 and nothing new is made (and the call may be retried)."""
        rtype = _rtype(_resource_type_of(resource))
        headers = {"Prefer": prefer} if prefer else {}
        if if_none_exist is not None:
            headers["If-None-Exist"] = _query_string(if_none_exist)
        response = self._request("POST", self._url(rtype), body=orjson.dumps(resource), headers=headers,
                                 idempotent=if_none_exist is not None)
        return self._write_result(response)

    def update(self, resource: Mapping[str, Any], *, if_match: str | bool | None = None,
               prefer: str | None = "return=representation") -> FhirResult:
        """``PUT [base]/[type]/[id]``. ``if_match``: a version id, an ETag, or True for the resource's own
        ``meta.versionId``; a stale version raises ``FhirConflict`` (412, http.html#concurrency)."""
        rtype = _rtype(_resource_type_of(resource))
        rid = _rid(str(resource.get("id") or ""))
        headers = {"Prefer": prefer} if prefer else {}
        if if_match is True:
            version = (resource.get("meta") or {}).get("versionId")
            if not version:
                raise InvalidInput("if_match=True needs the resource's meta.versionId.")
            headers["If-Match"] = _as_etag(str(version))
        elif if_match:
            headers["If-Match"] = _as_etag(str(if_match))
        response = self._request("PUT", self._url(rtype, rid), body=orjson.dumps(resource), headers=headers,
                                 idempotent=True)
        return self._write_result(response)

    def delete(self, resource_type: str, resource_id: str) -> FhirResult:
        """``DELETE [base]/[type]/[id]`` (http.html#delete)."""
        response = self._request("DELETE", self._url(_rtype(resource_type), _rid(resource_id)), idempotent=True)
        return self._write_result(response)

    def transaction(self, bundle_or_entries: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """POST a transaction Bundle (or request entries); returns the transaction-response Bundle.

        All or nothing (http.html#transaction): a failure is one raised error. Use ``entry_outcomes`` on the
        answer for per-entry status, Location and ETag.
        """
        return self._bundle_call("transaction", bundle_or_entries)

    def batch(self, bundle_or_entries: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """POST a batch Bundle; returns the batch-response Bundle. Entries fail one by one: see ``entry_outcomes``."""
        return self._bundle_call("batch", bundle_or_entries)

    def get_url(self, url: str, params: Params = None) -> Any:
        """GET any JSON URL on this server's origin (e.g. the sandbox's ``/.well-known/smart-configuration``), or a
        path relative to the FHIR base. Another origin is refused: the token must not leave this server."""
        absolute = self._same_origin(urljoin(self.base_url + "/", url), "URL")
        query = _query_string(params)
        if query:
            absolute += ("&" if urlsplit(absolute).query else "?") + query
        response = self._request("GET", absolute, idempotent=True, accept=f"{FHIR_JSON}, application/json")
        return self._body(response, required=True)

    # -- internals ---------------------------------------------------------------------------------------------

    def _bundle_call(self, kind: str, bundle_or_entries: Mapping[str, Any] | Iterable[Mapping[str, Any]]
                     ) -> dict[str, Any]:
        if isinstance(bundle_or_entries, Mapping):
            bundle = dict(bundle_or_entries)
            if bundle.get("resourceType") != "Bundle" or bundle.get("type") != kind:
                raise InvalidInput(f"Expected a Bundle of type {kind}.")
        else:
            bundle = _request_bundle(kind, bundle_or_entries)
        response = self._request("POST", self.base_url, body=orjson.dumps(bundle),
                                 idempotent=_bundle_is_idempotent(bundle))
        answer = self._body(response, required=True)
        if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle" \
                or answer.get("type") != f"{kind}-response":
            raise FhirError(f"The FHIR server answered the {kind} with something other than a {kind}-response "
                            "Bundle.", status=response.status_code, code="fhir-bad-body", url=_no_query(response.url))
        return answer

    def _url(self, *pieces: str) -> str:
        return "/".join((self.base_url, *pieces))

    def _same_origin(self, url: str, what: str) -> str:
        if _origin(url) != self._origin:
            # RFC 6750 §5.3: bearer tokens go only to the server they were issued for; a link elsewhere is a
            # misconfigured or hostile server, so say so instead of following it.
            raise FhirError(f"Refused to follow a {what} to another server ({_origin(url)}); this client only talks "
                            f"to {self._origin}.", code="fhir-other-origin", url=_no_query(url))
        return url

    def _json(self, method: str, url: str, *, idempotent: bool) -> Any:
        return self._body(self._request(method, url, idempotent=idempotent), required=True)

    def _expect_type(self, body: Any, resource_type: str, url: str) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("resourceType") != resource_type:
            got = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise FhirError(f"Expected a {resource_type} from the FHIR server but got {got or 'no resourceType'}.",
                            code="fhir-bad-body", url=url)
        return body

    def _searchset(self, body: Any, url: str) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or body.get("type") != "searchset":
            raise FhirError("The FHIR server answered a search with something other than a searchset Bundle.",
                            code="fhir-bad-body", url=_no_query(url))
        return body

    def _write_result(self, response: requests.Response) -> FhirResult:
        body = self._body(response, required=False)
        if body is not None and not isinstance(body, dict):
            raise FhirError("The FHIR server's answer is JSON but not a FHIR resource.", status=response.status_code,
                            code="fhir-bad-body", url=_no_query(response.url))
        outcome = None
        if body is not None and body.get("resourceType") == "OperationOutcome":
            outcome, body = body, None  # Prefer: return=OperationOutcome, or a delete's informational outcome
        h = response.headers
        return FhirResult(status=response.status_code, resource=body, location=h.get("Location"),
                          etag=h.get("ETag"), last_modified=h.get("Last-Modified"), outcome=outcome)

    def _body(self, response: requests.Response, *, required: bool) -> Any:
        content = response.content
        if not content.strip():
            if required:
                raise FhirError(f"The FHIR server answered {response.status_code} with an empty body where a "
                                "resource was expected.", status=response.status_code, code="fhir-bad-body",
                                url=_no_query(response.url))
            return None
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            ctype = response.headers.get("Content-Type") or "no Content-Type"
            raise FhirError(f"The FHIR server's answer is not JSON ({ctype.split(';')[0]}).",
                            status=response.status_code, code="fhir-bad-body", url=_no_query(response.url)) from None

    def _request(self, method: str, url: str, *, body: bytes | None = None, content_type: str = FHIR_JSON,
                 headers: Mapping[str, str] | None = None, idempotent: bool, accept: str = _ACCEPT
                 ) -> requests.Response:
        """One logical call: retries, 401 refresh-once, typed errors. Returns a 2xx/3xx response."""
        self._same_origin(url, "URL")
        base_headers = {"Accept": accept, **(headers or {})}
        if body is not None:
            base_headers["Content-Type"] = content_type
        token = self.token_source.token() if self.token_source else None
        refreshed = False
        retries = 0
        attempt = 0
        path = urlsplit(url).path
        while True:
            attempt += 1
            send_headers = dict(base_headers)
            if token:
                send_headers["Authorization"] = f"Bearer {token}"
            self._bump()
            started = time.perf_counter()
            try:
                response = self.session.request(method, url, data=body, headers=send_headers, timeout=self.timeout,
                                                allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as exc:
                self._event(method, path, None, started, attempt, type(exc).__name__)
                kind = "timed out" if isinstance(exc, requests.Timeout) else "dropped the connection"
                if idempotent and retries < self.max_retries:
                    retries += 1
                    self._sleep(self._backoff(retries))
                    continue
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise FhirUnavailable(f"The FHIR server {kind} on {method} {path}{tries}.",
                                      url=_no_query(url)) from exc
            self._event(method, path, response.status_code, started, attempt, None)
            status = response.status_code
            if status < 300:
                return response
            if status == 401 and self.token_source is not None and not refreshed:
                refreshed = True
                new_token = self.token_source.refresh()
                if new_token:
                    token = new_token
                    continue
            if status in RETRY_STATUSES and idempotent and retries < self.max_retries:
                retries += 1
                wait = self._retry_after(response.headers.get("Retry-After"))
                self._sleep(self._backoff(retries) if wait is None else wait)
                continue
            raise self._error(response, method, path)

    def _error(self, response: requests.Response, method: str, path: str) -> FhirError:
        status = response.status_code
        outcome = None
        try:
            parsed = orjson.loads(response.content) if response.content.strip() else None
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("resourceType") == "OperationOutcome":
            outcome = parsed
        if 300 <= status < 400:
            return FhirError(f"The FHIR server redirected {method} {path} ({status}); redirects are not followed. "
                             "Check the FHIR base URL.", status=status, url=_no_query(response.url))
        error = error_for_status(status, outcome, _no_query(response.url), what=f"The FHIR server ({method} {path})")
        challenge = _bearer_error_description(response.headers.get("WWW-Authenticate"))
        if status in (401, 403) and outcome is None and challenge:
            error.message = error.message.split(" (no explanation")[0] + f": {challenge}."
            error.args = (error.message,)
        if status == 401 and self.token_source is not None:
            error.message = error.message.rstrip(".") + "; the token was refused and refreshing it did not help."
            error.args = (error.message,)
        # Seconds the server asked us to wait (None if it did not say): lets a caller tell the user when to retry.
        error.retry_after = self._retry_after(response.headers.get("Retry-After"))  # type: ignore[attr-defined]
        return error

    def _retry_after(self, value: str | None) -> float | None:
        """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3), capped at ``max_retry_wait``."""
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            seconds = float(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when is None or when.tzinfo is None:
                return None
            seconds = when.timestamp() - self._clock()
        return max(0.0, min(seconds, self.max_retry_wait))

    def _backoff(self, retry: int) -> float:
        # "Equal jitter": half the exponential delay fixed, half random, so retries from many clients spread out
        # but never collapse to zero.
        delay = min(self.backoff_cap, self.backoff_base * (2 ** (retry - 1)))
        return delay / 2 + self._jitter() * delay / 2

    def _bump(self) -> None:
        with self._count_lock:
            self._request_count += 1

    def _event(self, method: str, path: str, status: int | None, started: float, attempt: int,
               error: str | None) -> None:
        if self.on_request is not None:
            ms = (time.perf_counter() - started) * 1000.0
            self.on_request(RequestEvent(method=method, path=path, status=status, ms=ms, attempt=attempt,
                                         error=error))


# ---------------------------------------------------------------------------------------------------------------
# small pure helpers


def _bundle_is_idempotent(bundle: Mapping[str, Any]) -> bool:
    for entry in bundle.get("entry") or []:
        request = (entry or {}).get("request") or {}
        method = str(request.get("method") or "").upper()
        if method in _SAFE_METHODS:
            continue
        if method == "POST" and request.get("ifNoneExist"):
            continue
        return False
    return True


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return (scheme, (parts.hostname or "").lower(), port)


def _no_query(url: str | None) -> str | None:
    if not url:
        return url
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path, "", ""))


def _link(bundle: Mapping[str, Any], relation: str) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == relation and link.get("url"):
            return str(link["url"])
    return None


def _query_string(params: str | Params) -> str:
    if params is None:
        return ""
    if isinstance(params, str):
        return params.lstrip("?")
    items = params.items() if isinstance(params, Mapping) else params
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        # None means "not given": sending the text "None" would be a search for that string.
        pairs.extend((key, str(v)) for v in values if v is not None)  # a list repeats the parameter (AND, search.html#combining)
    return urlencode(pairs)


def _rtype(resource_type: str) -> str:
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.match(resource_type):
        raise InvalidInput(f"{resource_type!r} is not a FHIR resource type name.")
    return resource_type


def _rid(resource_id: str) -> str:
    if not isinstance(resource_id, str) or not _ID.match(resource_id):
        raise InvalidInput(f"{resource_id!r} is not a valid FHIR id (1-64 letters, digits, '-' or '.').")
    return resource_id


def _resource_type_of(resource: Mapping[str, Any]) -> str:
    if not isinstance(resource, Mapping) or not resource.get("resourceType"):
        raise InvalidInput("A resource to write needs a resourceType.")
    return str(resource["resourceType"])


def _as_etag(version: str) -> str:
    """A version id as the weak ETag FHIR uses (http.html#versioning: ``W/"3"``); ETags pass through."""
    version = version.strip()
    if version.startswith('W/"') or version.startswith('"'):
        return version
    return f'W/"{version}"'


def _etag_version(etag: str) -> str | None:
    m = re.match(r'^(?:W/)?"([^"]*)"$', etag.strip())
    return m.group(1) if m else None


def _bearer_error_description(header: str | None) -> str | None:
    """``error_description`` from a ``WWW-Authenticate: Bearer ...`` challenge (RFC 6750 §3), if any."""
    if not header:
        return None
    m = re.search(r'error_description="([^"]{1,300})"', header)
    return " ".join(m.group(1).split()) if m else None


def _status_code(status: Any) -> int | None:
    m = re.match(r"^\s*(\d{3})\b", str(status or ""))
    return int(m.group(1)) if m else None


def _location_parts(location: str | None) -> tuple[str, str, str | None] | None:
    """(type, id, version) from a Location like ``.../Patient/1/_history/2``."""
    if not location:
        return None
    path = urlsplit(location).path.rstrip("/").split("/")
    if len(path) >= 4 and path[-2] == "_history":
        return path[-4], path[-3], path[-1]
    if len(path) >= 2:
        return path[-2], path[-1], None
    return None
