"""Writing a request Bundle to an EHR whether or not it takes transactions: ``write_bundle``.

The app builds every write as a transaction Bundle (builders/order.py, builders/session.py, smart_app/plan.py):
conditional creates (``ifNoneExist`` on an identifier derived from the draft id), PUTs with ``ifMatch``, and
``urn:uuid:`` fullUrls that the entries reference. Where the server declares ``transaction`` in its
CapabilityStatement (R4 capabilitystatement.html ``rest.interaction``, http.html#transaction) the Bundle is POSTed as
it is: all or nothing. Where it does not, or the server answers the transaction "not supported" (501, 405, or an
OperationOutcome with issue code ``not-supported``; such an answer means nothing was processed), the entries are
written one by one:

* Order: entries go in Bundle order, except that an entry waits until every entry it references has landed
  (references to ``urn:uuid:`` fullUrls are replaced by the ``Type/id`` the server assigned, as http.html#trules
  asks a server to do inside a transaction). The builders put the order (ServiceRequest) or the session (Procedure)
  first, so that is what lands first.
* Circular references (the order's ``supportingInfo`` -> its DetectedIssues, each DetectedIssue's ``implicated`` ->
  the order): the first entry of the cycle in Bundle order is written without the references that cannot be
  resolved yet, and as soon as their targets have landed it is updated (PUT with If-Match = the version just
  written) to add them. So the order is saved, then its findings, then the order again with its links.
* Every POST keeps its ``ifNoneExist`` (conditional create, http.html#ccreate): sending the same Bundle again after
  a partial failure matches what landed the first time (200, nothing new) and writes only what is missing. PUTs keep
  their ``ifMatch`` (http.html#concurrency).
* The first failure stops the run: the entries after it are reported as not sent. Nothing is rolled back (there is
  no rollback without a transaction); the caller tells the user what was saved and keeps the draft for a retry.

``write_bundle`` raises the ``FhirError`` when nothing was saved at all (the transaction was refused, or the first
write failed), exactly as ``FhirClient.transaction`` does; otherwise it returns a ``WriteOutcome`` that says what
landed and what did not.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import FhirError, InvalidInput
from .fhir import FhirClient, FhirResult, entry_outcomes

__all__ = ["CapabilityCache", "EntryNotWritten", "PartialWrite", "WriteOutcome", "batch_or_each", "raise_conflict",
           "saved_words", "supports_transactions", "write_bundle"]

# What a server says when it does not do transactions at all (R4 http.html#transaction: a server that does not
# support them answers the POST with an error; 501 Not Implemented and 405 are the usual ones).
_NOT_SUPPORTED_STATUSES = frozenset({405, 501})


class EntryNotWritten(FhirError):
    """An entry of a one-by-one write that was not sent (an earlier one failed) or landed incomplete."""

    code = "fhir-entry-not-written"


@dataclass(frozen=True)
class WriteOutcome:
    """What ``write_bundle`` did.

    ``atomic``: True when the server took the Bundle as one transaction (all or nothing), False when the entries
    were written one by one. ``written``: the results of every write that landed, in the order they were made
    (one by one, that includes the update that links an order to its findings).
    ``failed``: (request entry, error) for every entry that did not land or landed incomplete (an order saved but
    whose update adding its findings failed), in Bundle order; empty when everything was saved.
    ``results``: one item per request entry, in Bundle order: its ``FhirResult`` if it landed complete, else its
    error. ``ids``: each entry's fullUrl (or request url) -> the ``Type/id`` it landed as.
    """

    atomic: bool
    written: list[FhirResult]
    failed: list[tuple[dict[str, Any], FhirError]]
    entries: tuple[dict[str, Any], ...] = ()
    results: tuple[FhirResult | FhirError, ...] = ()
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed

    def saved_refs(self) -> list[str]:
        """``Type/id`` of every resource that is in the EHR now (including one saved incomplete), Bundle order."""
        out = []
        for entry in self.entries:
            key = _entry_key(entry)
            if key and key in self.ids and self.ids[key] not in out:
                out.append(self.ids[key])
        return out

    def by_type(self) -> dict[str, list[str]]:
        """{resourceType: [ids]} of what is in the EHR now."""
        out: dict[str, list[str]] = {}
        for ref in self.saved_refs():
            rtype, _, rid = ref.partition("/")
            out.setdefault(rtype, []).append(rid)
        return out

    def missing_types(self) -> list[str]:
        """The resource types of the entries that did not land (or landed incomplete), Bundle order, no repeats."""
        out: list[str] = []
        for entry, _ in self.failed:
            rtype = _entry_type(entry)
            if rtype and rtype not in out:
                out.append(rtype)
        return out


# Plain words for what an entry is, for "saved / not saved" messages.
WHAT = {"ServiceRequest": "the order", "Task": "the task", "DetectedIssue": "the screening findings",
        "Provenance": "the authorship record (Provenance)", "BodyStructure": "the body sites",
        "Procedure": "the session note (Procedure)", "Observation": "the pain scores",
        "Communication": "the message"}


def saved_words(outcome: WriteOutcome, *, what: Mapping[str, str] | None = None) -> str:
    """'Saved in the chart: X. Not saved: Y (the EHR said: ...).' for a partial write."""
    names = {**WHAT, **(what or {})}
    saved = ", ".join(outcome.saved_refs()) or "nothing"
    missing = ", ".join(names.get(t, t) for t in outcome.missing_types()) or "nothing"
    first = outcome.failed[0][1].message[:300] if outcome.failed else ""
    return f"Saved in the chart: {saved}. Not saved: {missing}" + (f" (the EHR said: {first})" if first else ".")


class PartialWrite(FhirError):
    """A one-by-one write that saved some entries but not all (``outcome`` says which). Retrying the same Bundle
    is safe: its conditional creates match what landed."""

    code = "fhir-partial-write"

    def __init__(self, outcome: WriteOutcome, what: Mapping[str, str] | None = None) -> None:
        first = outcome.failed[0][1] if outcome.failed else None
        super().__init__("This EHR does not accept all-or-nothing writes, so it was saved piece by piece, and not "
                         f"all of it was saved. {saved_words(outcome, what=what)}",
                         status=502, outcome=first.outcome if first else None)
        self.outcome_ = outcome


def raise_conflict(outcome: WriteOutcome) -> None:
    """Raise the first 409/412 of a partial write (an If-Match that lost), so a caller handles it like the 412 of a
    refused transaction: re-read and send again (what landed is matched, not written twice)."""
    from .errors import FhirConflict

    for _, error in outcome.failed:
        if isinstance(error, FhirConflict):
            raise error


def supports_transactions(capability: Any) -> bool | None:
    """Does the CapabilityStatement list the system interaction ``transaction`` (``rest[mode=server].interaction``)?
    None when it is not a CapabilityStatement with a server REST part (we cannot tell)."""
    if not isinstance(capability, Mapping) or capability.get("resourceType") != "CapabilityStatement":
        return None
    for rest in capability.get("rest") or []:
        if isinstance(rest, Mapping) and rest.get("mode") == "server":
            return any(isinstance(i, Mapping) and i.get("code") == "transaction"
                       for i in rest.get("interaction") or [])
    return None


class CapabilityCache:
    """Per FHIR base: does the server take transactions? Read once from ``GET [base]/metadata`` and kept for ``ttl``
    seconds (thread-safe; one process). A failed read is not kept: None ("unknown") is returned and asked again
    next time."""

    def __init__(self, ttl: float = 3600.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, bool | None]] = {}

    def transactions(self, client: FhirClient) -> bool | None:
        key = client.base_url
        with self._lock:
            hit = self._items.get(key)
            if hit and hit[0] > self._clock():
                return hit[1]
        try:
            value = supports_transactions(client.capabilities())
        except FhirError:
            return None
        with self._lock:
            self._items[key] = (self._clock() + self.ttl, value)
        return value

    def known(self, base_url: str) -> bool | None:
        """What is known about ``base_url`` without asking (None: nothing yet, or expired)."""
        with self._lock:
            hit = self._items.get(base_url.rstrip("/"))
            return hit[1] if hit and hit[0] > self._clock() else None

    def learn(self, base_url: str, value: bool | None) -> None:
        """Remember what a write showed: a transaction that went through (True) or was refused as not supported
        (False). The app uses this so that no write waits for an extra ``GET /metadata`` round trip."""
        if value is None:
            return
        with self._lock:
            self._items[base_url.rstrip("/")] = (self._clock() + self.ttl, value)

    def forget(self, base_url: str) -> None:
        with self._lock:
            self._items.pop(base_url.rstrip("/"), None)


def write_bundle(client: FhirClient, bundle: Mapping[str, Any], *, transactions: bool | None) -> WriteOutcome:
    """Write a transaction Bundle: as one transaction when ``transactions`` is True or None (unknown), entry by entry
    when it is False or when the server answers the transaction "not supported". See the module doc."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise InvalidInput("write_bundle takes a transaction Bundle.")
    entries = tuple(dict(e) for e in bundle.get("entry") or [])
    if transactions is not False:
        try:
            answer = client.transaction(bundle)
        except FhirError as exc:
            if not _not_supported(exc):
                exc.atomic = True  # type: ignore[attr-defined]  # a transaction server refused: nothing was saved
                raise
        else:
            return _atomic_outcome(entries, answer)
    return _one_by_one(client, entries)


# ---------------------------------------------------------------------------------------------------------------


def _not_supported(exc: FhirError) -> bool:
    if exc.status in _NOT_SUPPORTED_STATUSES:
        return True
    return exc.status in (400, 422) and any(i.get("code") == "not-supported" for i in exc.issues()
                                            if isinstance(i, Mapping))


def _atomic_outcome(entries: tuple[dict[str, Any], ...], answer: Mapping[str, Any]) -> WriteOutcome:
    results = entry_outcomes(answer)
    written: list[FhirResult] = []
    failed: list[tuple[dict[str, Any], FhirError]] = []
    ids: dict[str, str] = {}
    for entry, result in zip(entries, results):
        if isinstance(result, FhirError):  # a transaction-response should not hold one; report it, do not hide it
            failed.append((entry, result))
            continue
        written.append(result)
        ref = _landed_ref(entry, result)
        if ref:
            ids[_entry_key(entry)] = ref
    return WriteOutcome(True, written, failed, entries, tuple(results), ids)


def _entry_key(entry: Mapping[str, Any]) -> str:
    return str(entry.get("fullUrl") or (entry.get("request") or {}).get("url") or "")


def _entry_type(entry: Mapping[str, Any]) -> str | None:
    resource = entry.get("resource")
    if isinstance(resource, Mapping) and resource.get("resourceType"):
        return str(resource["resourceType"])
    url = str((entry.get("request") or {}).get("url") or "")
    return url.split("/", 1)[0].split("?", 1)[0] or None


def _landed_ref(entry: Mapping[str, Any], result: FhirResult) -> str | None:
    rtype = _entry_type(entry)
    if result.id and rtype:
        return f"{rtype}/{result.id}"
    url = str((entry.get("request") or {}).get("url") or "")
    if "/" in url and "?" not in url:
        return url
    return None


def _references(value: Any, urns: set[str], out: set[str]) -> None:
    if isinstance(value, Mapping):
        ref = value.get("reference")
        if isinstance(ref, str) and ref in urns:
            out.add(ref)
        for v in value.values():
            _references(v, urns, out)
    elif isinstance(value, list):
        for v in value:
            _references(v, urns, out)


def _resolve(value: Any, ids: Mapping[str, str]) -> Any:
    """A copy with every Reference to a landed fullUrl pointing at its ``Type/id``."""
    if isinstance(value, Mapping):
        out = {k: _resolve(v, ids) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in ids:
            out["reference"] = ids[ref]
        return out
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    return value


def _strip(value: Any, pending: set[str]) -> Any:
    """A copy without the References to ``pending`` fullUrls (list items dropped, single values removed)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, Mapping) and v.get("reference") in pending:
                continue
            stripped = _strip(v, pending)
            if isinstance(v, list) and not stripped:
                continue  # FHIR forbids empty arrays (json.html)
            out[k] = stripped
        return out
    if isinstance(value, list):
        return [_strip(v, pending) for v in value if not (isinstance(v, Mapping) and v.get("reference") in pending)]
    return value


def _top_keys_with(resource: Mapping[str, Any], pending: set[str]) -> list[str]:
    keys = []
    for k, v in resource.items():
        found: set[str] = set()
        _references(v, pending, found)
        if found:
            keys.append(k)
    return keys


def _one_by_one(client: FhirClient, entries: tuple[dict[str, Any], ...]) -> WriteOutcome:
    for i, entry in enumerate(entries):
        method = str((entry.get("request") or {}).get("method") or "").upper()
        if method not in ("POST", "PUT", "DELETE"):
            raise InvalidInput(f"Entry {i}: only POST, PUT and DELETE entries can be written one by one, not "
                               f"{method or 'nothing'}.")
    urns = {str(e["fullUrl"]) for e in entries if str(e.get("fullUrl") or "").startswith("urn:")}
    deps: list[set[str]] = []
    for entry in entries:
        found: set[str] = set()
        _references(entry.get("resource"), urns, found)
        found.discard(str(entry.get("fullUrl") or ""))
        deps.append(found)
    ids: dict[str, str] = {}  # fullUrl -> Type/id of what landed
    results: list[FhirResult | FhirError | None] = [None] * len(entries)
    written: list[FhirResult] = []
    # entry index -> (top-level keys written without some references, the landed resource's id and version)
    deferred: dict[int, tuple[list[str], set[str]]] = {}
    landed: dict[int, FhirResult] = {}
    todo = list(range(len(entries)))
    first_error: FhirError | None = None

    def landed_urn(u: str) -> bool:
        return u in ids

    while todo and first_error is None:
        ready = next((i for i in todo if all(landed_urn(u) for u in deps[i])), None)
        cut: set[str] = set()
        if ready is None:  # a cycle: write the first entry without what cannot be resolved yet, link it later
            ready = todo[0]
            cut = {u for u in deps[ready] if not landed_urn(u)}
        todo.remove(ready)
        entry = entries[ready]
        resource = entry.get("resource")
        if cut and isinstance(resource, Mapping):
            deferred[ready] = (_top_keys_with(resource, cut), cut)
            resource = _strip(resource, cut)
        try:
            result = _send(client, entry, _resolve(resource, ids) if resource is not None else None, ids)
        except FhirError as exc:
            first_error = exc
            results[ready] = exc
            break
        ref = _landed_ref(entry, result)
        if ref is None and entry.get("fullUrl") and entry["fullUrl"] in urns:
            first_error = EntryNotWritten(f"Entry {ready}: the EHR saved the {_entry_type(entry)} but did not say "
                                          "which id it gave it, so the entries that refer to it were not sent.")
            results[ready] = result
            written.append(result)
            break
        if ref:
            ids[_entry_key(entry)] = ref
        landed[ready] = result
        results[ready] = result
        written.append(result)
        # Finish every entry written without some references whose targets have all landed now.
        for idx in [k for k, (_, cut_) in deferred.items() if all(landed_urn(u) for u in cut_)]:
            keys, _ = deferred.pop(idx)
            try:
                linked = _link(client, entries[idx], landed[idx], keys, ids)
                if linked is not landed[idx]:
                    written.append(linked)
                results[idx] = linked
            except FhirError as exc:
                first_error = exc
                results[idx] = EntryNotWritten(
                    f"The {_entry_type(entries[idx])} was saved, but adding its links to what was saved after it "
                    f"failed: {exc.message}", status=exc.status, outcome=exc.outcome, url=exc.url)
                break
    if first_error is not None and not written:
        first_error.atomic = False  # type: ignore[attr-defined]  # tells the caller the server is not atomic
        raise first_error
    skipped_note = ("Not sent: an earlier write failed" + (f" ({first_error.message})" if first_error else "") + ".")
    failed: list[tuple[dict[str, Any], FhirError]] = []
    final: list[FhirResult | FhirError] = []
    for i, entry in enumerate(entries):
        r = results[i]
        if r is None or i in deferred:
            if i in deferred and i in landed:
                r = EntryNotWritten(f"The {_entry_type(entry)} was saved without its links to entries that were not "
                                    "saved.")
            else:
                r = EntryNotWritten(skipped_note[:600])
        if isinstance(r, FhirError):
            failed.append((entry, r))
        final.append(r)
    return WriteOutcome(False, written, failed, entries, tuple(final), ids)


def _send(client: FhirClient, entry: Mapping[str, Any], resource: Any, ids: Mapping[str, str]) -> FhirResult:
    request = entry.get("request") or {}
    method = str(request.get("method")).upper()
    url = str(request.get("url") or "")
    if method == "POST":
        cond = request.get("ifNoneExist")
        if isinstance(cond, str):
            for u, ref in ids.items():  # a condition may name a reference by its fullUrl (rare; resolve it too)
                cond = cond.replace(u, ref)
        return client.create(resource, if_none_exist=cond or None)
    rtype, _, rid = url.partition("/")
    if not rid or "?" in url or "/" in rid:
        raise InvalidInput(f"Only 'Type/id' URLs can be written one by one, not {url!r} (no conditional "
                           "update or delete without a transaction).")
    if method == "PUT":
        return client.update({**resource, "id": rid}, if_match=request.get("ifMatch") or None)
    return client.delete(rtype, rid)


def _link(client: FhirClient, entry: Mapping[str, Any], result: FhirResult, keys: list[str],
          ids: Mapping[str, str]) -> FhirResult:
    """Update a resource written without some references so it has them: the stored version (as the server
    returned it, or read) with those top-level elements set to the Bundle's, resolved; PUT with If-Match."""
    original = _resolve(entry.get("resource") or {}, ids)
    stored = copy.deepcopy(result.resource) if result.resource else None
    rtype = _entry_type(entry)
    if stored is None:
        stored = client.read(str(rtype), str(result.id))
    if all(stored.get(k) == original.get(k) for k in keys):
        return result  # a retry: an earlier run linked it already
    for k in keys:
        stored[k] = original[k]
    version = (stored.get("meta") or {}).get("versionId") or result.version_id
    return client.update(stored, if_match=str(version) if version else None)


# ---------------------------------------------------------------------------------------------------------------
# Reads: a batch of GETs, or the same GETs one by one where the EHR takes no batch


def batch_or_each(client: FhirClient, bundle_or_entries: Any) -> dict[str, Any]:
    """``client.batch`` for a batch of GET entries; where the server refuses the batch itself (batch is optional,
    http.html#transaction: 400/404/405/415/422/501/500, anything but an auth refusal or a busy/unreachable server),
    the same GETs one by one. Either way the answer is a batch-response Bundle, so ``entry_outcomes`` reads it the
    same: a failed GET is an entry with its status and OperationOutcome. 401/403 are raised as the batch's."""
    from .fhir import batch_bundle

    bundle = dict(bundle_or_entries) if isinstance(bundle_or_entries, Mapping) else batch_bundle(bundle_or_entries)
    try:
        return client.batch(bundle)
    except FhirError as exc:
        # 501 counts as "no batch here", not as a busy server (fhir.py files every 5xx under FhirUnavailable).
        if exc.status is None or exc.status in (401, 403, 429, 502, 503, 504):
            raise
    out = []
    for entry in bundle.get("entry") or []:
        request = entry.get("request") or {}
        if str(request.get("method") or "").upper() != "GET":
            raise InvalidInput("batch_or_each only repeats GET entries one by one.")
        try:
            body = client.get_url(str(request.get("url") or ""))
        except FhirError as exc:
            if exc.status in (401, 403):
                raise
            answer: dict[str, Any] = {"status": str(exc.status or 502)}
            outcome = exc.outcome or {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "exception", "diagnostics": exc.message}]}
            out.append({"response": {**answer, "outcome": outcome}})
            continue
        out.append({"resource": body, "response": {"status": "200 OK"}})
    return {"resourceType": "Bundle", "type": "batch-response", "entry": out}
