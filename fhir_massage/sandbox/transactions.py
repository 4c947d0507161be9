"""batch and transaction Bundles (R4 §3.1.0.11 "Batch/Transaction").

A transaction is all or nothing: every entry runs inside one SQLite transaction, in the order the spec requires
(DELETE, then POST, then PUT/PATCH, then GET; §3.1.0.11.2), ``urn:uuid:`` fullUrls are replaced by the ids the
server assigns wherever they occur in the Bundle's resources, ``ifNoneExist`` makes a conditional create (an
existing match answers 200 and is what references resolve to; more than one match is 412), and ``ifMatch`` guards
updates. The first failing entry fails the whole Bundle with its status and an OperationOutcome naming the entry.

A batch runs each entry on its own (a SAVEPOINT each): failures become that entry's response with an
``outcome``; the others still happen. Batch entries may not depend on each other, so no urn resolution there.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from fhir_massage.sandbox.access import Grant
from fhir_massage.sandbox.outcome import FhirProblem, bad_request, issue, outcome
from fhir_massage.sandbox.service import FhirService, Result, check_type

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _split(url: str, base: str) -> tuple[list[str], str]:
    """Entry request.url (relative, or absolute on this server) -> (path segments, query)."""
    if url.startswith(("http://", "https://")):
        if not url.startswith(base.rstrip("/") + "/"):
            raise bad_request(f"request.url '{url[:120]}' is not on this server.")
        url = url[len(base.rstrip("/")) + 1 :]
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    if not segs:
        raise bad_request("request.url is empty.")
    return segs, parts.query


def _replace_refs(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _replace_refs(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_refs(v, mapping) for v in value]
    if isinstance(value, str) and value in mapping:
        return mapping[value]
    return value


def _dangling_urns(value: Any, path: str = "") -> str | None:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith(("urn:uuid:", "urn:oid:")):
            return ref
        for k, v in value.items():
            found = _dangling_urns(v)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _dangling_urns(v)
            if found:
                return found
    return None


class BundleProcessor:
    def __init__(self, service: FhirService, *, transactions: bool = True, batch: bool = True) -> None:
        self.service = service
        self.batch = batch  # False: an EHR without batch support (SandboxConfig.batch), refused like transactions
        # False plays an EHR without transaction support (SandboxConfig.transactions): a transaction Bundle is
        # refused before anything runs, as such servers do (R4 http.html#transaction is optional).
        self.transactions = transactions

    def process(self, grant: Grant, base: str, bundle: Any, *, prefer_return: str = "representation") -> Result:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise bad_request("POST to the base URL takes a Bundle of type batch or transaction.", code="structure")
        btype = bundle.get("type")
        if btype not in ("batch", "transaction"):
            raise bad_request(
                f"Bundle.type must be 'batch' or 'transaction' to be processed, not '{btype}'.",
                expression="Bundle.type",
            )
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise bad_request("Bundle.entry must be a list.", expression="Bundle.entry")
        for i, e in enumerate(entries):
            self._check_entry(i, e)
            if e["request"]["method"] == "PATCH":
                raise FhirProblem(
                    400, f"Entry {i}: PATCH is not supported by this server.", code="not-supported",
                    expression=f"Bundle.entry[{i}].request.method",
                )
        if btype == "transaction":
            if not self.transactions:
                raise FhirProblem(
                    501, "This server does not support transaction Bundles (its CapabilityStatement does not list "
                    "'transaction'); send the entries one by one or as a batch.", code="not-supported",
                    expression="Bundle.type",
                )
            return self._transaction(grant, base, entries, prefer_return)
        if not self.batch:
            raise FhirProblem(
                501, "This server does not support batch Bundles (its CapabilityStatement does not list 'batch'); "
                "send the requests one by one.", code="not-supported", expression="Bundle.type",
            )
        return self._batch(grant, base, entries, prefer_return)

    @staticmethod
    def _check_entry(i: int, e: Any) -> None:
        """The shape of one entry, before anything runs (so later steps can trust it)."""
        where = f"Bundle.entry[{i}]"
        if not isinstance(e, dict):
            raise bad_request(f"Entry {i} is not a JSON object.", expression=where)
        req = e.get("request")
        if not isinstance(req, dict) or req.get("method") not in ORDER or not isinstance(req.get("url"), str):
            raise bad_request(
                f"Entry {i}: request.method (GET, POST, PUT, DELETE) and request.url are required.",
                expression=f"{where}.request",
            )
        for key in ("ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince"):
            if key in req and not isinstance(req[key], str):
                raise bad_request(f"Entry {i}: request.{key} must be a string.", expression=f"{where}.request.{key}")
        if "fullUrl" in e and not isinstance(e["fullUrl"], str):
            raise bad_request(f"Entry {i}: fullUrl must be a string (a URI).", expression=f"{where}.fullUrl")
        if req["method"] in ("POST", "PUT") and not isinstance(e.get("resource"), dict):
            raise bad_request(f"Entry {i}: a {req['method']} entry needs a resource.", expression=f"{where}.resource")
        if req["method"] == "POST":
            segs = [s for s in urlsplit(req["url"]).path.split("/") if s]
            if len(segs) != 1 and not req["url"].startswith(("http://", "https://")):
                raise bad_request(
                    f"Entry {i}: a POST entry's request.url must be the resource type (e.g. 'Patient').",
                    expression=f"{where}.request.url",
                )

    # -- one entry --------------------------------------------------------------------------------------------

    def _run(
        self, grant: Grant, base: str, entry: dict[str, Any], *, new_id: str | None = None, check_refs: bool = True
    ) -> Result:
        req = entry["request"]
        method = req["method"]
        segs, query = _split(req["url"], base)
        rtype = segs[0]
        check_type(rtype)
        svc = self.service
        if method == "GET" or method == "HEAD":
            if len(segs) == 1:
                return svc.search(grant, base, rtype, parse_qsl(query, keep_blank_values=True))
            if len(segs) == 2:
                return svc.read(grant, base, rtype, segs[1])
            if len(segs) == 4 and segs[2] == "_history":
                return svc.vread(grant, base, rtype, segs[1], segs[3])
            if len(segs) == 3 and segs[2] == "_history":
                return svc.history(grant, base, rtype, segs[1])
            raise bad_request(f"request.url '{req['url'][:120]}' is not a read, vread or search.")
        if method == "POST":
            if len(segs) != 1:
                raise bad_request("A POST entry's request.url must be the resource type (e.g. 'Patient').")
            return svc.create(
                grant,
                base,
                rtype,
                entry.get("resource"),
                if_none_exist=req.get("ifNoneExist"),
                new_id=new_id,
                check_refs=check_refs,
            )
        if method == "PUT":
            if len(segs) != 2 or query:
                raise FhirProblem(
                    400, "A PUT entry's request.url must be 'Type/id' (conditional update is not supported).",
                    code="not-supported",
                )
            return svc.update(
                grant, base, rtype, segs[1], entry.get("resource"), if_match=req.get("ifMatch"), check_refs=check_refs
            )
        if method == "DELETE":
            if len(segs) != 2 or query:
                raise FhirProblem(
                    400, "A DELETE entry's request.url must be 'Type/id' (conditional delete is not supported).",
                    code="not-supported",
                )
            return svc.delete(grant, base, rtype, segs[1])
        raise bad_request(f"Unsupported method {method}.")  # pragma: no cover

    @staticmethod
    def _response_entry(base: str, result: Result, prefer_return: str) -> dict[str, Any]:
        resp: dict[str, Any] = {"status": status_line(result.status)}
        if result.resource is not None:
            res = result.resource
            meta = res.get("meta") or {}
            resp["location"] = f"{res['resourceType']}/{res['id']}/_history/{meta.get('versionId', '1')}"
            resp["etag"] = f'W/"{meta.get("versionId", "1")}"'
            if meta.get("lastUpdated"):
                resp["lastModified"] = meta["lastUpdated"]
        elif "ETag" in result.headers:
            resp["etag"] = result.headers["ETag"]
        out: dict[str, Any] = {}
        if result.resource is not None:
            out["fullUrl"] = f"{base}/{result.resource['resourceType']}/{result.resource['id']}"
        body = result.body
        if prefer_return == "minimal":
            body = None if result.resource is not None else body
        elif prefer_return == "OperationOutcome" and result.resource is not None:
            body = None
            resp["outcome"] = outcome(issue("informational", "Done.", severity="information"))
        if body is not None:
            out["resource"] = body
        out["response"] = resp
        return out

    # -- transaction ------------------------------------------------------------------------------------------

    @staticmethod
    def _rank(entry: dict[str, Any]) -> tuple[int, int]:
        # Within one method the spec leaves the order open; Provenance goes last so that its targets exist when
        # its compartment is worked out (service.compartment_of).
        res = entry.get("resource")
        last = 1 if isinstance(res, dict) and res.get("resourceType") == "Provenance" else 0
        return ORDER[entry["request"]["method"]], last

    def _transaction(self, grant: Grant, base: str, entries: list[dict[str, Any]], prefer_return: str) -> Result:
        order = sorted(range(len(entries)), key=lambda i: self._rank(entries[i]))
        results: dict[int, Result] = {}
        fulls = [e.get("fullUrl") for e in entries]
        seen_full = set()
        for i, f in enumerate(fulls):
            if isinstance(f, str) and f.startswith("urn:"):
                if f in seen_full:
                    raise bad_request(f"Entry {i}: fullUrl {f} appears twice in the transaction.")
                seen_full.add(f)

        def fail(i: int, exc: FhirProblem) -> FhirProblem:
            req = entries[i]["request"]
            where = f"Entry {i} ({req['method']} {req['url'][:80]})"
            issues = [
                {**iss, "diagnostics": f"{where}: {iss.get('diagnostics', '')}",
                 "details": {"text": f"{where}: {iss.get('diagnostics', '')}"},
                 "expression": [f"Bundle.entry[{i}]", *iss.get("expression", [])]}
                for iss in exc.issues
            ]
            return FhirProblem(exc.status, f"{where}: {exc.message}", issues=issues)

        with self.service.store.transaction():
            # 1. DELETEs.
            for i in order:
                if entries[i]["request"]["method"] == "DELETE":
                    results[i] = self._guard(i, fail, lambda i=i: self._run(grant, base, entries[i]))
            # 2. Decide every urn's target before writing anything that points to it: conditional creates that
            # match resolve to the existing resource; the rest get fresh ids.
            mapping: dict[str, str] = {}
            new_ids: dict[int, str] = {}
            for i in order:
                e = entries[i]
                req = e["request"]
                full = e.get("fullUrl")
                if req["method"] == "POST":
                    rtype = self._guard(i, fail, lambda req=req: _split(req["url"], base))[0][0]
                    new_ids[i] = str(uuid.uuid4())
                    if isinstance(full, str) and full.startswith("urn:"):
                        mapping[full] = f"{rtype}/{new_ids[i]}"
                elif req["method"] == "PUT" and isinstance(full, str) and full.startswith("urn:"):
                    segs, _ = self._guard(i, fail, lambda req=req: _split(req["url"], base))
                    mapping[full] = "/".join(segs[:2])
            for i in order:
                e = entries[i]
                if e["request"]["method"] == "POST" and e["request"].get("ifNoneExist"):
                    rtype = self._guard(i, fail, lambda e=e: _split(e["request"]["url"], base))[0][0]
                    query = _replace_refs(e["request"]["ifNoneExist"], mapping)
                    found = self._guard(
                        i, fail, lambda rtype=rtype, query=query: self.service.conditional_matches(grant, base, rtype, query)
                    )
                    if len(found) > 1:
                        raise fail(i, FhirProblem(
                            412, f"ifNoneExist '{query}' matches {len(found)} resources.", code="multiple-matches"
                        ))
                    if found and isinstance(e.get("fullUrl"), str) and e["fullUrl"].startswith("urn:"):
                        mapping[e["fullUrl"]] = f"{rtype}/{found[0]['id']}"
            resolved = []
            for i, e in enumerate(entries):
                e = dict(e)
                if "resource" in e:
                    e["resource"] = _replace_refs(e["resource"], mapping)
                    dangling = _dangling_urns(e["resource"])
                    if dangling:
                        raise fail(i, bad_request(
                            f"The reference '{dangling}' points to no entry's fullUrl in this transaction."
                        ))
                if e["request"].get("ifNoneExist"):
                    e["request"] = {**e["request"], "ifNoneExist": _replace_refs(e["request"]["ifNoneExist"], mapping)}
                resolved.append(e)
            # 3. POST, PUT, GET in that order.
            for i in order:
                method = resolved[i]["request"]["method"]
                if method == "DELETE":
                    continue
                # References are checked once everything is written: entries may point at later entries.
                results[i] = self._guard(
                    i, fail, lambda i=i: self._run(grant, base, resolved[i], new_id=new_ids.get(i), check_refs=False)
                )
            for i in order:
                method, res = resolved[i]["request"]["method"], results[i].resource
                written = method == "PUT" or (method == "POST" and results[i].status == 201)  # 200 = ifNoneExist match
                if written and res is not None:
                    self._guard(i, fail, lambda res=res: self.service.check_references(base, res))
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "transaction-response",
            "entry": [self._response_entry(base, results[i], prefer_return) for i in range(len(entries))],
        }
        return Result(200, bundle)

    @staticmethod
    def _guard(i: int, fail: Callable[[int, FhirProblem], FhirProblem], fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except FhirProblem as exc:
            raise fail(i, exc) from None

    # -- batch ------------------------------------------------------------------------------------------------

    def _batch(self, grant: Grant, base: str, entries: list[dict[str, Any]], prefer_return: str) -> Result:
        out: list[dict[str, Any] | None] = [None] * len(entries)
        order = sorted(range(len(entries)), key=lambda i: ORDER[entries[i]["request"]["method"]])
        for i in order:
            try:
                with self.service.store.transaction():
                    result = self._run(grant, base, entries[i])
                out[i] = self._response_entry(base, result, prefer_return)
            except FhirProblem as exc:
                out[i] = {"response": {"status": status_line(exc.status), "outcome": exc.outcome()}}
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "batch-response", "entry": out}
        return Result(200, bundle)


__all__ = ["BundleProcessor", "status_line"]
