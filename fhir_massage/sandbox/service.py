"""The sandbox's FHIR core: the RESTful interactions (R4 §3.1.0) over the store, with access enforcement.

No Flask here: every method takes the caller's ``Grant`` and the public FHIR base URL and returns a ``Result``
(status, body, headers) or raises ``FhirProblem``. fhir_api.py is the HTTP glue; transactions.py reuses these
methods per Bundle entry.

Access rules (the contract in access.py):
- the interaction on the type must be granted, else 403;
- with ``grant.patient`` set (patient/ scopes), or ``grant.patients`` (user/ scopes: the patients the user may
  access, see ``accessible_patients``), types in the Patient compartment (searchparams.PATIENT_COMPARTMENT) are
  limited to those patients' compartments: a search naming another patient (patient=/subject=) is 403, any other
  search is silently narrowed to them; reading another patient's resource is 403 (not 404: the sandbox does not
  hide that the id exists, it only refuses its data); creating/updating/deleting outside them is 403.
  Types outside the compartment (Practitioner, Organization, Location, Device, Medication, ...) follow the type
  permission only. _include/_revinclude results the grant may not read are left out.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fhir_massage.sandbox.access import Grant
from fhir_massage.sandbox.outcome import FhirProblem, bad_request, forbidden, issue, not_found, outcome
from fhir_massage.sandbox.search import COMPARTMENT, Search, compartment_patients, narrows, parse, parse_reference
from fhir_massage.sandbox.searchparams import PATIENT_COMPARTMENT, RESOURCE_TYPES
from fhir_massage.sandbox.store import Record, Store
from fhir_massage.sandbox.validation import valid_id, validate


@dataclass
class Result:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    resource: dict[str, Any] | None = None  # the stored resource, for Prefer handling / bundle entries


def http_date(instant: str) -> str:
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")), usegmt=True)


def version_headers(base: str, resource: dict[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    vid = meta.get("versionId", "1")
    return {
        "ETag": f'W/"{vid}"',
        "Last-Modified": http_date(meta["lastUpdated"]),
        "Location": f"{base}/{resource['resourceType']}/{resource['id']}/_history/{vid}",
    }


def parse_etag(value: str) -> int | None:
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    return int(v) if v.isdigit() else None


# Reference targets that must exist when written (see FhirService.check_references).
INTEGRITY_TYPES = frozenset(
    {"Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Device", "Medication"}
)


def _references(value: Any, path: str) -> list[tuple[str, str]]:
    """(FHIRPath-like location, reference string) of every Reference.reference in a resource."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            out.append((f"{path}.reference", ref))
        for k, v in value.items():
            if k != "contained":  # contained resources point at each other with '#'
                out.extend(_references(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_references(v, f"{path}[{i}]"))
    return out


def check_type(rtype: str) -> None:
    if rtype not in RESOURCE_TYPES:
        raise FhirProblem(404, f"The resource type '{rtype}' is not supported by this server.", code="not-supported")


def check_id(rid: str) -> None:
    if not valid_id(rid):
        raise bad_request(f"'{rid[:80]}' is not a valid FHIR id (1-64 letters, digits, '-' or '.').", code="value")


# Paging a search re-runs it for every page. The sorted ids of a search with further pages are kept (keyed by its
# SQL and arguments, so by the grant's restriction too) until the next write, for its next pages and the total.
ID_CACHE_SEARCHES = 32
ID_CACHE_MAX_IDS = 10_000  # a bigger result is paged with LIMIT/OFFSET and counted, uncached
ACCESS_CACHE_USERS = 64  # users whose accessible patients are kept until the next write


class FhirService:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._ids: OrderedDict[tuple[Any, ...], tuple[int, list[str]]] = OrderedDict()  # guarded by the store lock
        self._access: OrderedDict[tuple[Any, ...], tuple[int, frozenset[str]]] = OrderedDict()  # same lock

    # -- access --------------------------------------------------------------------------------------------------

    @staticmethod
    def require(grant: Grant, rtype: str, interaction: str) -> None:
        if not grant.allows(rtype, interaction):
            raise forbidden(f"This access token does not allow '{interaction}' on {rtype}.")

    def compartment_of(self, resource: dict[str, Any]) -> set[str]:
        """Patients whose compartment holds ``resource``.

        R4 puts a Provenance in a patient's compartment only when a target IS the Patient. An app that records
        the provenance of an order (target = ServiceRequest, DetectedIssue) with patient scopes would then be
        refused its own write, so the sandbox also follows local targets one step to the patients of the stored
        resources they name (documented deviation; targets must exist first - transactions create Provenance last).
        """
        out = compartment_patients(resource)
        if resource.get("resourceType") == "Provenance":
            for target in resource.get("target") or []:
                ref = target.get("reference") if isinstance(target, dict) else None
                if not isinstance(ref, str):
                    continue
                _, t, rid = parse_reference(ref)
                if t and rid and t != "Patient" and t in PATIENT_COMPARTMENT and "://" not in ref:
                    rec = self.store.get(t, rid)
                    if rec and rec.body:
                        out |= compartment_patients(rec.body)
        return out

    def accessible_patients(self, base: str, user_refs: list[str] | tuple[str, ...]) -> frozenset[str]:
        """Ids of the patients a user may access, from the data (what a real EHR keeps as care relationships):
        the patients of every active CareTeam that has one of ``user_refs`` (e.g. "Practitioner/x",
        "PractitionerRole/x-role") as a participant member, and the patients naming one as generalPractitioner.
        A ``Patient/x`` user ref (a patient or proxy signed in) gives that patient. References may be relative or
        absolute on this server (``base``).

        Two indexed lookups (search_index, ix_si_ref2 / ix_si_code2), kept until the next write: the FHIR API asks
        on every request of a user/ grant. CareTeam.period is not read: status is what says a team is active."""
        refs = sorted({r for r in user_refs if isinstance(r, str) and r})
        key = (base, tuple(refs))
        with self.store.snapshot():
            hit = self._access.get(key)
            if hit is not None and hit[0] == self.store.generation and not self.store.in_transaction:
                self._access.move_to_end(key)
                return hit[1]
            out: set[str] = set()
            wanted: list[str] = []
            for ref in refs:
                _, t, rid = parse_reference(ref)
                if t is None or rid is None:
                    continue
                if t == "Patient":
                    out.add(rid)
                wanted += [f"{t}/{rid}", f"{base}/{t}/{rid}"]
            if wanted:
                marks = ",".join("?" * len(wanted))
                out.update(rid for (rid,) in self.store.query(
                    "SELECT p.rtid FROM search_index p WHERE p.rtype = 'CareTeam' AND p.param = 'patient'"
                    " AND p.rtid IS NOT NULL AND p.rtarget = 'Patient'"
                    " AND p.rid IN (SELECT m.rid FROM search_index m WHERE m.rtype = 'CareTeam'"
                    f" AND m.param = 'participant' AND m.rref IS NOT NULL AND m.rref IN ({marks}))"
                    " AND p.rid IN (SELECT st.rid FROM search_index st WHERE st.rtype = 'CareTeam'"
                    " AND st.param = 'status' AND st.code IS NOT NULL AND st.code = 'active')",
                    wanted,
                ))
                out.update(rid for (rid,) in self.store.query(
                    "SELECT g.rid FROM search_index g WHERE g.rtype = 'Patient' AND g.param = 'general-practitioner'"
                    f" AND g.rref IS NOT NULL AND g.rref IN ({marks})",
                    wanted,
                ))
            result = frozenset(out)
            if not self.store.in_transaction:  # uncommitted data must not outlive a rollback in the cache
                self._access[key] = (self.store.generation, result)
                self._access.move_to_end(key)
                while len(self._access) > ACCESS_CACHE_USERS:
                    self._access.popitem(last=False)
            return result

    def may_see(self, grant: Grant, resource: dict[str, Any]) -> bool:
        limit = grant.compartments()
        if limit is None or resource.get("resourceType") not in PATIENT_COMPARTMENT:
            return True
        return not limit.isdisjoint(self.compartment_of(resource))

    def require_compartment(self, grant: Grant, resource: dict[str, Any], verb: str) -> None:
        if not self.may_see(grant, resource):
            whose = "that patient's record" if grant.patient is not None else "those patients' records"
            raise forbidden(
                f"{grant.limit_text()}; it may not {verb} a {resource.get('resourceType')} outside {whose}."
            )

    # -- referential integrity ------------------------------------------------------------------------------------

    def check_references(self, base: str, resource: dict[str, Any]) -> None:
        """References to the record's anchors (INTEGRITY_TYPES: the patient, practitioners, organizations, ...)
        must point at a resource that exists, as strict servers insist: a dangling Patient/123 in a new order is
        a bug the app should meet here, not in production. References to clinical resources are only checked
        for form, because CDS Hooks legitimately writes DetectedIssues that implicate draft orders the EHR has
        not stored yet (order-sign ``draftOrders``).

        Contained (#id) and other servers' absolute references are not checked; ``urn:`` references outside a
        transaction point at nothing and are refused."""
        prefix = base.rstrip("/") + "/"
        for path, ref in _references(resource, resource.get("resourceType", "")):
            if ref.startswith("#"):
                continue
            if ref.startswith(("urn:uuid:", "urn:oid:")):
                raise bad_request(
                    f"{path} is '{ref}', which only means something inside a transaction Bundle.", expression=path
                )
            local = ref[len(prefix):] if ref.startswith(prefix) else ref
            if "://" in local:
                continue  # another server's resource
            _, t, rid = parse_reference(local)
            if t is None or rid is None:
                raise bad_request(
                    f"{path} '{ref[:100]}' is not a reference of the form Type/id.", code="value", expression=path
                )
            if t not in RESOURCE_TYPES:
                raise bad_request(f"{path} refers to {t}, a type this server does not hold.", expression=path)
            if t not in INTEGRITY_TYPES:
                continue
            rec = self.store.get(t, rid)
            if rec is None or rec.deleted:
                raise bad_request(
                    f"{path} refers to {t}/{rid}, which does not exist on this server.",
                    code="not-found",
                    expression=path,
                )

    # -- instance interactions -----------------------------------------------------------------------------------

    def read(self, grant: Grant, base: str, rtype: str, rid: str) -> Result:
        check_type(rtype)
        self.require(grant, rtype, "read")
        check_id(rid)
        rec = self._current(rtype, rid)
        self.require_compartment(grant, rec.body or {}, "read")
        return self._found(base, rec.body or {}, 200)

    def vread(self, grant: Grant, base: str, rtype: str, rid: str, vid: str) -> Result:
        check_type(rtype)
        self.require(grant, rtype, "vread")
        check_id(rid)
        if not vid.isdigit():
            raise not_found(f"{rtype}/{rid} has no version '{vid[:40]}'.")
        rec = self.store.get_version(rtype, rid, int(vid))
        if rec is None:
            raise not_found(f"{rtype}/{rid} has no version {vid}.")
        if rec.deleted:
            raise FhirProblem(410, f"Version {vid} of {rtype}/{rid} is a deletion.", code="deleted")
        self.require_compartment(grant, rec.body or {}, "read")
        return self._found(base, rec.body or {}, 200)

    def _current(self, rtype: str, rid: str) -> Record:
        rec = self.store.get(rtype, rid)
        if rec is None:
            raise not_found(f"{rtype}/{rid} does not exist.")
        if rec.deleted:
            raise FhirProblem(410, f"{rtype}/{rid} was deleted.", code="deleted")
        return rec

    @staticmethod
    def _found(base: str, resource: dict[str, Any], status: int) -> Result:
        headers = version_headers(base, resource)
        if status == 200:
            headers.pop("Location")
        return Result(status, resource, headers, resource)

    def create(
        self,
        grant: Grant,
        base: str,
        rtype: str,
        body: Any,
        *,
        if_none_exist: str | None = None,
        new_id: str | None = None,
        check_refs: bool = True,
    ) -> Result:
        check_type(rtype)
        self.require(grant, rtype, "create")
        resource = validate(body, expected_type=rtype)
        resource = {**resource}
        if if_none_exist:
            existing = self.conditional_matches(grant, base, rtype, if_none_exist)
            if len(existing) > 1:
                raise FhirProblem(
                    412,
                    f"The condition '{if_none_exist}' matches {len(existing)} {rtype} resources; a conditional create"
                    " needs at most one match.",
                    code="multiple-matches",
                )
            if existing:
                return self._found(base, existing[0], 200)
        # R4 §3.1.0.7: on create the server assigns the id and ignores any id in the body.
        resource["id"] = new_id or str(uuid.uuid4())
        self.require_compartment(grant, resource, "create")
        if check_refs:
            self.check_references(base, resource)
        with self.store.transaction():
            stored = self.store.put(resource, "POST", self.compartment_of(resource))
        return Result(201, stored, version_headers(base, stored), stored)

    def conditional_matches(self, grant: Grant, base: str, rtype: str, query: str) -> list[dict[str, Any]]:
        check_type(rtype)
        if not isinstance(query, str):
            raise bad_request("A conditional create's condition must be a query string like 'identifier=sys|value'.")
        pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not pairs:
            raise bad_request("A conditional create needs search parameters (If-None-Exist / ifNoneExist).")
        q = parse(rtype, pairs, base, strict=True)
        self._restrict(grant, q)
        sql, args = self._where(q)
        rows = self.store.query(f"SELECT r.rid FROM {self._source(q)} WHERE {sql} LIMIT 2", args)
        return self.store.get_many([(rtype, r[0]) for r in rows])

    def update(
        self,
        grant: Grant,
        base: str,
        rtype: str,
        rid: str,
        body: Any,
        *,
        if_match: str | None = None,
        check_refs: bool = True,
    ) -> Result:
        check_type(rtype)
        check_id(rid)
        resource = validate(body, expected_type=rtype)
        if "id" not in resource:
            raise bad_request("An update (PUT) body must carry the id.", code="required", expression=f"{rtype}.id")
        if resource["id"] != rid:
            raise bad_request(
                f"The id in the body ({resource['id']}) differs from the id in the URL ({rid}).",
                expression=f"{rtype}.id",
            )
        with self.store.transaction():
            current = self.store.get(rtype, rid)
            exists = current is not None and not current.deleted
            self.require(grant, rtype, "update" if exists else "create")
            if if_match is not None:
                wanted = parse_etag(if_match)
                if wanted is None:
                    raise bad_request(f"If-Match must be a version ETag like W/\"3\", not '{if_match[:40]}'.")
                if not exists or current is None or current.version != wanted:
                    have = f"version {current.version}" if exists and current else "no current version"
                    raise FhirProblem(
                        412,
                        f"{rtype}/{rid} has {have}, not version {wanted}: someone else changed it. Read it again and"
                        " re-apply your change.",
                        code="conflict",
                    )
            if exists and current is not None and current.body:
                self.require_compartment(grant, current.body, "update")
            self.require_compartment(grant, resource, "write")
            if check_refs:
                self.check_references(base, resource)
            stored = self.store.put(dict(resource), "PUT", self.compartment_of(resource))
        status = 200 if exists else 201
        headers = version_headers(base, stored)
        return Result(status, stored, headers, stored)

    def delete(self, grant: Grant, base: str, rtype: str, rid: str) -> Result:
        check_type(rtype)
        self.require(grant, rtype, "delete")
        check_id(rid)
        with self.store.transaction():
            current = self.store.get(rtype, rid)
            if current is not None and current.body:
                self.require_compartment(grant, current.body, "delete")
            rec = self.store.delete(rtype, rid)
        # R4 §3.1.0.8: deleting something absent or already deleted is a success too (idempotent).
        headers = {"ETag": f'W/"{rec.version}"'} if rec else {}
        return Result(
            200, outcome(issue("informational", f"{rtype}/{rid} deleted.", severity="information")), headers
        )

    def history(self, grant: Grant, base: str, rtype: str, rid: str) -> Result:
        check_type(rtype)
        self.require(grant, rtype, "history")
        check_id(rid)
        versions = self.store.history(rtype, rid)
        if not versions:
            raise not_found(f"{rtype}/{rid} does not exist.")
        for rec, _ in versions:
            if rec.body:
                self.require_compartment(grant, rec.body, "read")
        entries = []
        for rec, method in versions:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{rtype}/{rid}"}
            if rec.body:
                entry["resource"] = rec.body
            entry["request"] = {"method": method, "url": rtype if method == "POST" else f"{rtype}/{rid}"}
            entry["response"] = {
                "status": {"POST": "201 Created", "PUT": "200 OK", "DELETE": "200 OK"}.get(method, "200 OK"),
                "etag": f'W/"{rec.version}"',
                "lastModified": rec.last_updated,
            }
            entries.append(entry)
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "history",
            "total": len(entries),
            "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
            "entry": entries,
        }
        return Result(200, bundle)

    # -- search --------------------------------------------------------------------------------------------------

    def _restrict(self, grant: Grant, q: Search) -> None:
        limit = grant.compartments()
        if limit is None or q.resource_type not in PATIENT_COMPARTMENT:
            return
        others = sorted(p for p in q.named_patients if p not in limit)
        if others:
            raise forbidden(
                f"{grant.limit_text()}; it may not search the {q.resource_type} resources of Patient/{others[0]}."
            )
        if not limit:
            q.where.append("0")  # a user with no patients: nothing in any compartment
            return
        # One IN list: the compartment index (ix_si_rtid2) is probed once per patient. SQLite binds up to 32,766
        # values, far beyond a care-team panel.
        marks = ",".join("?" * len(limit))
        q.where.append(
            f"r.rid IN (SELECT s.rid FROM search_index s WHERE s.rtype = ? AND s.param = '{COMPARTMENT}'"
            f" AND s.rtid IS NOT NULL AND s.rtid IN ({marks}))"
        )
        q.args.extend([q.resource_type, *sorted(limit)])

    @staticmethod
    def _where(q: Search) -> tuple[str, list[Any]]:
        where = ["r.rtype = ?", "r.deleted = 0", *q.where]
        return " AND ".join(where), [q.resource_type, *q.args]

    @staticmethod
    def _source(q: Search) -> str:
        """FROM clause. A search narrowed by a parameter starts from the ids the parameter lists (ix_res_keys) and
        sorts only them; left alone, SQLite prefers walking the whole type in _lastUpdated order (ix_res_order) to
        skip the sort, which reads every Condition on the server to find a patient's ten."""
        return "resources r INDEXED BY ix_res_keys" if any(narrows(c) for c in q.where) else "resources r"

    def search(
        self,
        grant: Grant,
        base: str,
        rtype: str,
        pairs: list[tuple[str, str]],
        *,
        strict: bool = False,
        raw: bool = False,
    ) -> Result:
        """A searchset Bundle. With ``raw`` the entries' resources are the stored JSON as ``orjson.Fragment``s,
        for a caller that only serialises the Bundle (the HTTP API): a page of 100 resources is then never parsed
        and re-serialised. The bytes sent are the same either way."""
        check_type(rtype)
        self.require(grant, rtype, "search")
        q = parse(rtype, pairs, base, strict=strict)
        self._restrict(grant, q)
        where, args = self._where(q)
        source = self._source(q)
        total: int | None = None
        page: list[str] = []
        bodies: dict[str, bytes] = {}
        with self.store.snapshot():  # the page and the total from the same data
            if not q.summary_count:
                order = ", ".join([*q.order, "r.lu ASC", "r.rid ASC"])
                ids = self._sorted_ids(q, f"SELECT r.rid FROM {source} WHERE {where} ORDER BY {order}", args)
                if ids is not None:
                    total = len(ids)
                    page = ids[q.offset : q.offset + q.count]
                else:
                    page = [
                        rid
                        for (rid,) in self.store.query(
                            f"SELECT r.rid FROM {source} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                            [*args, *q.order_args, q.count, q.offset],
                        )
                    ]
                # Ids were sorted alone (no bodies through the sorter); the page's bodies are read by key.
                bodies = dict(self.store.bodies(rtype, page))
            if total is None:
                total = self.store.query(f"SELECT COUNT(*) FROM {source} WHERE {where}", args)[0][0]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": total,
            "link": [],
        }
        entries: list[dict[str, Any]] = []
        if not q.summary_count:
            load = orjson.Fragment if raw else orjson.loads
            seen = {(rtype, rid) for rid in page}
            for rid in page:
                entries.append(
                    {"fullUrl": f"{base}/{rtype}/{rid}", "resource": load(bodies[rid]), "search": {"mode": "match"}}
                )
            for (itype, iid), res in self._included(grant, base, q, page, seen, raw):
                entries.append({"fullUrl": f"{base}/{itype}/{iid}", "resource": res, "search": {"mode": "include"}})
        if q.ignored:
            entries.append({"resource": outcome(*q.ignored), "search": {"mode": "outcome"}})
        bundle["link"] = self._links(base, q, total)
        if entries:
            bundle["entry"] = entries
        return Result(200, bundle)

    def _sorted_ids(self, q: Search, sql: str, args: list[Any]) -> list[str] | None:
        """All matching ids in order (``sql`` selects them sorted); for a later page, from the cache while no write
        came between (a first page is always run afresh). None when there are more than ID_CACHE_MAX_IDS. Call under
        store.snapshot()."""
        key = (sql, tuple(args), tuple(q.order_args))
        cacheable = not self.store.in_transaction  # uncommitted data must not outlive a rollback in the cache
        if cacheable and q.offset > 0:
            hit = self._ids.get(key)
            if hit is not None and hit[0] == self.store.generation:
                self._ids.move_to_end(key)
                return hit[1]
        rows = self.store.query(f"{sql} LIMIT ?", [*args, *q.order_args, ID_CACHE_MAX_IDS + 1])
        if len(rows) > ID_CACHE_MAX_IDS:
            return None
        ids = [rid for (rid,) in rows]
        if cacheable and len(ids) > q.offset + q.count:  # only searches with a next page are paged again
            self._ids[key] = (self.store.generation, ids)
            self._ids.move_to_end(key)
            while len(self._ids) > ID_CACHE_SEARCHES:
                self._ids.popitem(last=False)
        return ids

    def _included(
        self, grant: Grant, base: str, q: Search, ids: list[str], seen: set[tuple[str, str]], raw: bool = False
    ) -> list[tuple[tuple[str, str], Any]]:
        """((type, id), resource) of the _include/_revinclude results the grant may read; resources as dicts, or
        as orjson.Fragments with ``raw`` (parsed only where the compartment check needs the content)."""
        if not ids or not (q.includes or q.revincludes):
            return []
        marks = ",".join("?" * len(ids))
        keys: list[tuple[str, str]] = []
        for src, pname, target in q.includes:
            sql = (
                f"SELECT rtarget, rtid FROM search_index WHERE rtype = ? AND rid IN ({marks}) AND param = ?"
                " AND rtarget IS NOT NULL AND (rref NOT LIKE 'http%' OR rref LIKE ?)"
            )
            args: list[Any] = [src, *ids, pname, f"{base}/%"]
            if target:
                sql += " AND rtarget = ?"
                args.append(target)
            keys.extend((t, i) for t, i in self.store.query(sql, args))
        for src, pname, target in q.revincludes:
            if target and target != q.resource_type:
                continue
            refs = [f"{q.resource_type}/{i}" for i in ids]
            refs += [f"{base}/{r}" for r in refs]
            rows = self.store.query(
                f"SELECT DISTINCT rid FROM search_index WHERE rtype = ? AND param = ? AND rref IN ({','.join('?' * len(refs))})",
                [src, pname, *refs],
            )
            keys.extend((src, r[0]) for r in rows)
        wanted = []
        for key in keys:
            if key in seen or key[0] not in RESOURCE_TYPES or not grant.allows(key[0], "read"):
                continue
            seen.add(key)
            wanted.append(key)
        # One read per type for all of them, not one per resource (a page of orders pulls in hundreds).
        out: list[tuple[tuple[str, str], Any]] = []
        for key, body in self.store.get_many_raw(wanted):
            unchecked = grant.compartments() is None or key[0] not in PATIENT_COMPARTMENT  # may_see needs no content
            if raw and unchecked:
                out.append((key, orjson.Fragment(body)))
                continue
            res = orjson.loads(body)
            if unchecked or self.may_see(grant, res):
                out.append((key, orjson.Fragment(body) if raw else res))
        return out

    @staticmethod
    def _links(base: str, q: Search, total: int) -> list[dict[str, str]]:
        def url(offset: int) -> str:
            params = [*q.echo, ("_count", str(q.count))]
            if offset:
                params.append(("_offset", str(offset)))
            return f"{base}/{q.resource_type}?{urlencode(params)}"

        links = [{"relation": "self", "url": url(q.offset)}]
        if q.summary_count:
            return links
        if q.offset + q.count < total and q.count > 0:
            links.append({"relation": "next", "url": url(q.offset + q.count)})
        if q.offset > 0:
            links.append({"relation": "previous", "url": url(max(0, q.offset - q.count))})
        return links
