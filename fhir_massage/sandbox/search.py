"""FHIR search: index entries extracted on write, and search parameters turned into SQL over that index.

Everything is driven by the table in searchparams.py. Index rows (one per value found at a parameter's paths):

    search_index(rtype, rid, param, sys, code, sval, raw, lo, hi, rref, rtarget, rtid, num)

token -> sys/code; string -> sval (case- and accent-folded) / raw; date -> lo/hi (epoch seconds, half-open range);
reference -> rref (normalised "Type/id" for local references, the URL otherwise) / rtarget / rtid; quantity -> num
plus sys/code. The special parameter ``_compartment`` lists the patients whose compartment holds the resource.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from fhir_massage.sandbox import dates
from fhir_massage.sandbox.outcome import FhirProblem, bad_request, issue
from fhir_massage.sandbox.searchparams import (
    PATIENT_COMPARTMENT,
    SORTABLE_KINDS,
    SearchParam,
    params_for,
)

COMPARTMENT = "_compartment"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LOCAL_REF_RE = re.compile(r"^(?:(?P<base>.*)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")

# Result-shaping parameters (R4 §3.1.1.5 - §3.1.1.6); recognised, so never reported as unknown.
CONTROL_PARAMS = {"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_format", "_pretty"}
# Date prefixes served (R4 §3.1.1.4.2); "ap" (approximately) is refused rather than guessed.
DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb")

Row = tuple[str, str | None, str | None, str | None, str | None, float | None, float | None, str | None, str | None, str | None, float | None]


def fold(text: str) -> str:
    """Case- and accent-insensitive form for string search (R4 §3.1.1.4.9: "ignore accents and case")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# -- extraction ------------------------------------------------------------------------------------------------


def walk(value: Any, path: str) -> list[Any]:
    """Values at a dotted path; lists anywhere along the way are flattened."""
    current = [value]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and part in item:
                got = item[part]
                nxt.extend(got if isinstance(got, list) else [got])
        current = nxt
    return [v for v in current if v is not None]


def parse_reference(ref: str) -> tuple[str, str | None, str | None]:
    """"Patient/1", "http://x/fhir/Patient/1/_history/2" -> (normalised ref, type, id)."""
    m = _LOCAL_REF_RE.match(ref)
    if not m:
        return ref, None, None
    if m["base"]:
        # Absolute: keep the URL (without the version) so another server's Patient/1 is not ours.
        return f"{m['base']}/{m['type']}/{m['id']}", m["type"], m["id"]
    return f"{m['type']}/{m['id']}", m["type"], m["id"]


def _tokens(v: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(v, bool):
        yield None, "true" if v else "false"
    elif isinstance(v, (str, int, float)):
        yield None, str(v)
    elif isinstance(v, dict):
        if "coding" in v:
            for c in v.get("coding") or []:
                if isinstance(c, dict) and c.get("code") is not None:
                    yield c.get("system"), str(c["code"])
        elif "code" in v:
            yield v.get("system"), str(v["code"])
        elif "value" in v:  # Identifier, ContactPoint
            yield v.get("system"), str(v["value"])


def _strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country"):
            got = v.get(key)
            for s in got if isinstance(got, list) else [got]:
                if isinstance(s, str):
                    yield s


def index_rows(resource: dict[str, Any], compartment: set[str] | None = None) -> list[Row]:
    """All index rows for one resource (parameter table + the patient compartment, computed unless given)."""
    rtype = resource["resourceType"]
    rows: list[Row] = []
    for name, sp in params_for(rtype).items():
        for path in sp.paths:
            for v in walk(resource, path):
                rows.extend(_rows_for(name, sp, v))
    for pid in sorted(compartment if compartment is not None else compartment_patients(resource)):
        rows.append((COMPARTMENT, None, None, None, None, None, None, f"Patient/{pid}", "Patient", pid, None))
    return rows


def _rows_for(name: str, sp: SearchParam, v: Any) -> Iterator[Row]:
    if sp.kind == "token":
        for system, code in _tokens(v):
            yield (name, system, code, None, None, None, None, None, None, None, None)
    elif sp.kind == "string":
        for s in _strings(v):
            yield (name, None, None, fold(s), s, None, None, None, None, None, None)
    elif sp.kind == "date":
        try:
            lo, hi = dates.period_range(v) if isinstance(v, dict) else dates.date_range(str(v))
        except dates.BadDate:
            return  # validation rejects bad dates before indexing; never index garbage
        yield (name, None, None, None, None, lo, hi, None, None, None, None)
    elif sp.kind == "reference":
        ref = v.get("reference") if isinstance(v, dict) else None
        if isinstance(ref, str):
            norm, rtype, rid = parse_reference(ref)
            if sp.targets and rtype not in sp.targets:
                return
            yield (name, None, None, None, None, None, None, norm, rtype, rid, None)
    elif sp.kind == "quantity" and isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
        yield (name, v.get("system"), v.get("code") or v.get("unit"), None, None, None, None, None, None, None, float(v["value"]))


def compartment_patients(resource: dict[str, Any]) -> set[str]:
    rtype = resource.get("resourceType")
    out: set[str] = set()
    if rtype == "Patient" and resource.get("id"):
        out.add(resource["id"])
    for path in PATIENT_COMPARTMENT.get(rtype, ()):
        for v in walk(resource, path):
            ref = v.get("reference") if isinstance(v, dict) else None
            if isinstance(ref, str):
                _, t, rid = parse_reference(ref)
                if t == "Patient" and rid:
                    out.add(rid)
    return out


# -- parsing a search ------------------------------------------------------------------------------------------


@dataclass
class Search:
    resource_type: str
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    order: list[str] = field(default_factory=list)
    order_args: list[Any] = field(default_factory=list)
    includes: list[tuple[str, str, str | None]] = field(default_factory=list)  # (source type, param, target type)
    revincludes: list[tuple[str, str, str | None]] = field(default_factory=list)
    summary_count: bool = False
    ignored: list[dict[str, Any]] = field(default_factory=list)  # OperationOutcome issues for ignored params
    echo: list[tuple[str, str]] = field(default_factory=list)  # params that define the result set, for links
    named_patients: set[str] = field(default_factory=set)  # patient ids named by patient/subject params


# The column every index row of a kind fills. store.py's partial indexes hold only the rows where it is set, and
# SQLite uses a partial index only when the query's own top-level terms imply "col IS NOT NULL" (a term inside an
# OR does not count), so each parameter condition is prefixed with a term on its column (_prefilter).
GUARD = {"token": "s.code", "reference": "s.rref", "date": "s.lo", "string": "s.sval", "quantity": "s.num"}


def _prefilter(col: str, pins: list[Any] | None) -> tuple[str, list[Any]]:
    """A term every index row that can match satisfies, so it changes no result: ``col IN (pins)`` when each
    alternative of the condition fixes ``col`` to one of ``pins`` (SQLite then probes the index once per value),
    else ``col IS NOT NULL`` (it walks the parameter's rows in the index, never the rows of other parameters)."""
    if pins:
        return f"{col} IN ({','.join('?' * len(pins))})", list(pins)
    return f"{col} IS NOT NULL", []


def _exists(rtype: str, param: str, cond: str, negate: bool = False, pre: str = "") -> str:
    """``r.rid [NOT] IN (ids whose index rows for param match [pre AND] cond)``.

    An uncorrelated IN lets SQLite drive the search from the index (ix_si_code2, ix_si_ref2, ...) instead of probing
    every resource of the type. ``pre`` comes from _prefilter (its arguments go before cond's). rtype and param are
    names from the parameter table, never user text."""
    assert rtype.isalnum() and re.fullmatch(r"[A-Za-z_\-]+", param), (rtype, param)
    return (
        f"r.rid {'NOT ' if negate else ''}IN (SELECT s.rid FROM search_index s WHERE s.rtype = '{rtype}'"
        f" AND s.param = '{param}'{' AND ' + pre if pre else ''} AND ({cond}))"
    )


def narrows(cond: str) -> bool:
    """True for a condition that lists the matching ids (``r.rid IN (...)``): the search can start from them."""
    return cond.startswith("r.rid IN (")


def parse(resource_type: str, pairs: Iterable[tuple[str, str]], base: str, *, strict: bool = False) -> Search:
    """Turn query pairs into a ``Search``. Bad values are 400s; unknown names are ignored (or 400 if ``strict``)."""
    q = Search(resource_type)
    table = params_for(resource_type)
    for raw_name, value in pairs:
        name, _, modifier = raw_name.partition(":")
        if name in CONTROL_PARAMS:
            _control(q, name, modifier, value, strict)
            continue
        if name == "_id":
            ids = [v for v in value.split(",") if v]
            q.where.append(f"r.rid {'NOT ' if modifier == 'not' else ''}IN ({','.join('?' * len(ids))})")
            q.args.extend(ids)
            q.echo.append((raw_name, value))
            continue
        if name == "_lastUpdated":
            conds, args = [], []
            for one in value.split(","):
                c, a = _date_cond(one, "r.lu", "r.lu + 0.001", raw_name)
                conds.append(c)
                args.extend(a)
            q.where.append("(" + " OR ".join(conds) + ")")
            q.args.extend(args)
            q.echo.append((raw_name, value))
            continue
        sp = table.get(name)
        if sp is None:
            msg = f"The search parameter '{name}' is not supported for {resource_type}; it was ignored."
            if strict:
                raise bad_request(msg.replace("; it was ignored", ""), code="not-supported", expression=raw_name)
            q.ignored.append(issue("not-supported", msg, severity="warning", expression=raw_name))
            continue
        where, args = _param_cond(resource_type, name, sp, modifier, value, base, raw_name)
        q.where.append(where)
        q.args.extend(args)
        q.echo.append((raw_name, value))
        if name in ("patient", "subject") and sp.kind == "reference" and modifier not in ("missing", "not"):
            for v in value.split(","):
                norm = _ref_value(v, base)
                _, t, rid = parse_reference(norm)
                if t == "Patient" or (t is None and "/" not in v and (modifier in ("", "Patient"))):
                    q.named_patients.add(rid or v)
    return q


def _control(q: Search, name: str, modifier: str, value: str, strict: bool) -> None:
    if name == "_count":
        try:
            n = int(value)
        except ValueError:
            raise bad_request(f"_count must be a whole number, not '{value}'.", expression="_count") from None
        if n < 0:
            raise bad_request("_count must not be negative.", expression="_count")
        q.count = min(n, MAX_COUNT)
        if n == 0:
            q.summary_count = True
    elif name == "_offset":
        try:
            q.offset = max(0, int(value))
        except ValueError:
            raise bad_request(f"_offset must be a whole number, not '{value}'.", expression="_offset") from None
    elif name == "_summary":
        if value == "count":
            q.summary_count = True
            q.echo.append((name, value))
        elif value != "false":
            msg = f"_summary={value} is not supported (only 'count' and 'false'); the full resources are returned."
            if strict:
                raise bad_request(msg, code="not-supported", expression="_summary")
            q.ignored.append(issue("not-supported", msg, severity="warning", expression="_summary"))
    elif name == "_sort":
        for key in [k for k in value.split(",") if k]:
            desc = key.startswith("-")
            pname = key.lstrip("-")
            direction = "DESC" if desc else "ASC"
            if pname == "_lastUpdated":
                q.order.append(f"r.lu {direction}")
            elif pname == "_id":
                q.order.append(f"r.rid {direction}")
            else:
                sp = params_for(q.resource_type).get(pname)
                if sp is None or sp.kind not in SORTABLE_KINDS:
                    raise bad_request(
                        f"Cannot sort {q.resource_type} by '{pname}': sorting is offered on date parameters,"
                        " _lastUpdated and _id.",
                        code="not-supported",
                        expression="_sort",
                    )
                agg = "MAX(s.lo)" if desc else "MIN(s.lo)"
                q.order.append(
                    f"(SELECT {agg} FROM search_index s WHERE s.rtype = r.rtype AND s.rid = r.rid AND s.param = ?)"
                    f" {direction}"
                )
                q.order_args.append(pname)
        q.echo.append((name, value))
    elif name in ("_include", "_revinclude"):
        if modifier and modifier != "iterate":
            raise bad_request(f"{name}:{modifier} is not a known modifier.", expression=name)
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise bad_request(
                f"{name} must look like 'Type:parameter' (e.g. ServiceRequest:patient), not '{value}'.",
                expression=name,
            )
        src, pname = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        sp = params_for(src).get(pname)
        if sp is None or sp.kind != "reference":
            raise bad_request(f"{name}={value}: {src} has no reference search parameter '{pname}'.", expression=name)
        if name == "_include" and src != q.resource_type:
            raise bad_request(f"_include={value} must start with the searched type {q.resource_type}.", expression=name)
        (q.includes if name == "_include" else q.revincludes).append((src, pname, target))
        if modifier == "iterate":
            q.ignored.append(
                issue("not-supported", f"{name}:iterate is applied once (not iterated).", severity="information")
            )
        q.echo.append((f"{name}{':' + modifier if modifier else ''}", value))
    elif name == "_total":
        q.echo.append((name, value))  # the total is always given (accurate), whatever was asked
    elif name == "_format":
        if value not in ("json", "application/fhir+json", "application/json"):
            raise FhirProblem(406, f"Only JSON is served (_format={value} asked).", code="not-supported")


def _ref_value(v: str, base: str) -> str:
    if base and v.startswith(base.rstrip("/") + "/"):
        return v[len(base.rstrip("/")) + 1 :]
    return v


def _param_cond(
    rtype: str, name: str, sp: SearchParam, modifier: str, value: str, base: str, raw_name: str
) -> tuple[str, list[Any]]:
    if modifier == "missing":
        if value not in ("true", "false"):
            raise bad_request(f"{raw_name} takes true or false, not '{value}'.", expression=raw_name)
        pre, pre_args = _prefilter(GUARD[sp.kind], None) if sp.kind in GUARD else ("", [])
        return _exists(rtype, name, "1", negate=value == "true", pre=pre), pre_args
    values = value.split(",")
    if any(v == "" for v in values):
        raise bad_request(f"{raw_name} has an empty value.", expression=raw_name)
    conds: list[str] = []
    args: list[Any] = []
    if sp.kind == "token":
        if modifier not in ("", "not"):
            raise bad_request(f"The modifier ':{modifier}' is not supported on token parameter {name}.", expression=raw_name)
        pins: list[Any] | None = []
        for v in values:
            if "|" in v:
                system, _, code = v.partition("|")
                if system and code:
                    conds.append("(s.sys = ? AND s.code = ?)")
                    args += [system, code]
                elif code:
                    conds.append("(s.sys IS NULL AND s.code = ?)")
                    args.append(code)
                else:
                    conds.append("(s.sys = ?)")
                    args.append(system)
                    pins = None  # any code of that system
                if code and pins is not None:
                    pins.append(code)
            else:
                conds.append("(s.code = ?)")
                args.append(v)
                if pins is not None:
                    pins.append(v)
        pre, pre_args = _prefilter(GUARD["token"], pins)
        return _exists(rtype, name, " OR ".join(conds), negate=modifier == "not", pre=pre), pre_args + args
    if sp.kind == "string":
        if modifier not in ("", "exact", "contains"):
            raise bad_request(f"The modifier ':{modifier}' is not supported on string parameter {name}.", expression=raw_name)
        for v in values:
            if modifier == "exact":
                conds.append("s.raw = ?")
                args.append(v)
            elif modifier == "contains":
                conds.append("instr(s.sval, ?) > 0")
                args.append(fold(v))
            else:
                conds.append("substr(s.sval, 1, ?) = ?")
                f = fold(v)
                args += [len(f), f]
        pre, pre_args = _prefilter(GUARD["string"], None)
        return _exists(rtype, name, " OR ".join(conds), pre=pre), pre_args + args
    if sp.kind == "date":
        if modifier:
            raise bad_request(f"The modifier ':{modifier}' is not supported on date parameter {name}.", expression=raw_name)
        for v in values:
            c, a = _date_cond(v, "s.lo", "s.hi", raw_name)
            conds.append(c)
            args += a
        pre, pre_args = _prefilter(GUARD["date"], None)
        return _exists(rtype, name, " OR ".join(conds), pre=pre), pre_args + args
    if sp.kind == "reference":
        type_mod = modifier if modifier and modifier[0].isupper() else ""
        if modifier and not type_mod:
            raise bad_request(f"The modifier ':{modifier}' is not supported on reference parameter {name}.", expression=raw_name)
        rrefs: list[Any] = []  # alternatives that fix rref (ix_si_ref2)
        rtids: list[Any] = []  # alternatives by bare id (ix_si_rtid2); all share one target test
        target_cond, target_args = "", []
        for v in values:
            v = _ref_value(v, base)
            norm, t, rid = parse_reference(v)
            if t is not None and not v.startswith(("http:", "https:")):
                local = f"{t}/{rid}"
                rrefs += [local, f"{base.rstrip('/')}/{local}"]
            elif t is None and ID_RE.match(v):
                rtids.append(v)
                targets = (type_mod,) if type_mod else sp.targets
                if targets:
                    target_cond, target_args = f"s.rtarget IN ({','.join('?' * len(targets))})", list(targets)
                else:
                    target_cond, target_args = "s.rref NOT LIKE 'http%'", []
            else:
                rrefs.append(norm)
        # One IN list per column, so SQLite probes the index once per value (an OR of the same tests may make it
        # walk the parameter's rows instead).
        by_ref = f"s.rref IN ({','.join('?' * len(rrefs))})"
        by_id = f"(s.rtid IN ({','.join('?' * len(rtids))}) AND {target_cond})"
        if not rtids:
            return _exists(rtype, name, by_ref), rrefs
        if not rrefs:
            return _exists(rtype, name, by_id), rtids + target_args
        pre, pre_args = _prefilter(GUARD["reference"], None)
        return _exists(rtype, name, f"{by_ref} OR {by_id}", pre=pre), pre_args + rrefs + rtids + target_args
    if sp.kind == "quantity":
        for v in values:
            num, _, rest = v.partition("|")
            prefix = num[:2] if num[:2] in ("eq", "ne", "lt", "gt", "le", "ge") else "eq"
            digits = num[2:] if num[:2] == prefix else num
            try:
                x = float(digits)
            except ValueError:
                raise bad_request(f"{raw_name}: '{v}' is not a number[|system|code].", expression=raw_name) from None
            decimals = len(digits.partition(".")[2])
            half = 0.5 * 10 ** -decimals
            op = {
                "eq": "(s.num >= ? AND s.num < ?)",
                "ne": "NOT (s.num >= ? AND s.num < ?)",
                "lt": "(s.num < ? AND ? IS NOT NULL)",
                "gt": "(s.num > ? AND ? IS NOT NULL)",
                "le": "(s.num <= ? AND ? IS NOT NULL)",
                "ge": "(s.num >= ? AND ? IS NOT NULL)",
            }[prefix]
            cond = op
            qargs: list[Any] = [x - half, x + half] if prefix in ("eq", "ne") else [x, x]
            system, _, code = rest.partition("|")
            if system:
                cond += " AND s.sys = ?"
                qargs.append(system)
            if code:
                cond += " AND s.code = ?"
                qargs.append(code)
            conds.append(f"({cond})")
            args += qargs
        pre, pre_args = _prefilter(GUARD["quantity"], None)
        return _exists(rtype, name, " OR ".join(conds), pre=pre), pre_args + args
    raise bad_request(f"Parameter {name} cannot be searched.", expression=raw_name)  # pragma: no cover


def _date_cond(v: str, lo_col: str, hi_col: str, raw_name: str) -> tuple[str, list[Any]]:
    prefix = v[:2] if v[:2] in DATE_PREFIXES else "eq"
    text = v[2:] if v[:2] == prefix else v
    if v[:2].isalpha() and v[:2] not in DATE_PREFIXES:
        raise bad_request(
            f"{raw_name}: unknown prefix '{v[:2]}' (use eq, ne, lt, gt, le, ge, sa or eb).", expression=raw_name
        )
    try:
        plo, phi = dates.date_range(text)
    except dates.BadDate as exc:
        raise bad_request(f"{raw_name}: {exc}", expression=raw_name) from None
    # R4 §3.1.1.4.2: comparisons between the target's range and the search value's range.
    sql = {
        "eq": f"({lo_col} >= ? AND {hi_col} <= ?)",
        "ne": f"NOT ({lo_col} >= ? AND {hi_col} <= ?)",
        "gt": f"({hi_col} > ? AND ? IS NOT NULL)",
        "lt": f"({lo_col} < ? AND ? IS NOT NULL)",
        "ge": f"({hi_col} > ? AND ? IS NOT NULL)",
        "le": f"({lo_col} < ? AND ? IS NOT NULL)",
        "sa": f"({lo_col} >= ? AND ? IS NOT NULL)",
        "eb": f"({hi_col} <= ? AND ? IS NOT NULL)",
    }[prefix]
    arg = {"eq": [plo, phi], "ne": [plo, phi], "gt": [phi, 1], "lt": [plo, 1], "ge": [plo, 1], "le": [phi, 1], "sa": [phi, 1], "eb": [plo, 1]}[prefix]
    return sql, arg
