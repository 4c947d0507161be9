"""Check FHIR resources against the R4 structure and the fhir-massage profiles, in Python (no Node.js needed).

Two layers:

* structure: the ``fhir.resources.R4B`` models (datatypes, primitives' formats, unknown elements), plus the R4
  element lists of our profiles' snapshots (R4B added a few elements R4 4.0.1 does not have);
* profiles: a walk over the committed StructureDefinition snapshots in profiles/package/ (built by SUSHI):
  cardinality, allowed choice types, fixed and pattern values, required bindings (our value sets and the R4 core
  value sets they use, extracted at build time into profiles/validator/), slices on ``code.coding`` and ``category``
  (discriminators ``value`` and ``pattern``), reference target types, and our own invariants (mpr-*, mps-*, msr-*),
  implemented here in Python because they are few and a general FHIRPath engine is not worth the dependency.

Core FHIRPath invariants (ele-1, dom-*, ...) are not evaluated; the R4B models cover the structural part of them.
Parsed snapshots and value sets are cached for the life of the process: validating a resource costs a model
parse plus one walk.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from fhir_massage.codes import CANONICAL_BASE

def _profiles_root() -> Path:
    # A source checkout (make demo / make test) has profiles/ beside the package; an installed wheel carries the
    # compiled package under <prefix>/share/fhir-massage/profiles (pyproject's data-files).
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    if (checkout / "package").is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "fhir-massage" / "profiles"


ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = _profiles_root() / "package"
CORE_VALUESETS = _profiles_root() / "validator" / "core-valuesets.json"

PROFILE_PREFIX = f"{CANONICAL_BASE}/StructureDefinition/"


@dataclass(frozen=True)
class Issue:
    severity: str  # "error" | "warning" | "information" (OperationOutcome.issue.severity)
    path: str  # FHIRPath-like location, e.g. "ServiceRequest.code.coding[1].code"
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def errors(issues: Iterable[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity in ("error", "fatal")]


# --------------------------------------------------------------------------------------------------------------
# The package: StructureDefinitions, ValueSets, CodeSystems (loaded once)


@dataclass(frozen=True)
class _Profile:
    url: str
    name: str
    type: str
    elements: dict[str, dict[str, Any]]  # by element id
    children: dict[str, list[str]]  # element id -> ids of child elements (not slices)
    slices: dict[str, list[str]]  # element id -> ids of its slices


class _Package:
    def __init__(self, package_dir: Path, core_valuesets: Path) -> None:
        self.profiles: dict[str, _Profile] = {}
        self.valuesets: dict[str, dict[str, Any]] = {}
        self.codesystems: dict[str, dict[str, Any]] = {}
        for path in sorted(package_dir.glob("*.json")):
            if path.name == "package.json":
                continue
            res = json.loads(path.read_text(encoding="utf-8"))
            rtype = res.get("resourceType")
            if rtype == "StructureDefinition":
                self.profiles[res["url"]] = _parse_profile(res)
            elif rtype == "ValueSet":
                self.valuesets[res["url"]] = res
            elif rtype == "CodeSystem":
                self.codesystems[res["url"]] = res
        self.core: dict[str, set[tuple[str, str]]] = {}
        if core_valuesets.is_file():
            for url, pairs in json.loads(core_valuesets.read_text(encoding="utf-8")).items():
                self.core[url] = {(s, c) for s, c in pairs}
        self.by_type: dict[str, list[str]] = {}
        for url, prof in self.profiles.items():
            self.by_type.setdefault(prof.type, []).append(url)
        self._members: dict[str, Callable[[str | None, str], bool | None]] = {}

    def cs_codes(self, system: str) -> set[str] | None:
        cs = self.codesystems.get(system)
        if cs is None:
            return None
        out: set[str] = set()
        stack = list(cs.get("concept") or [])
        while stack:
            c = stack.pop()
            out.add(c["code"])
            stack.extend(c.get("concept") or [])
        return out

    def member(self, vs_url: str) -> Callable[[str | None, str], bool | None] | None:
        """A membership test for a value set: (system, code) -> True/False, None when it cannot tell."""
        url = vs_url.split("|", 1)[0]
        if url in self._members:
            return self._members[url]
        fn: Callable[[str | None, str], bool | None] | None = None
        if url in self.valuesets:
            fn = self._compose_member(self.valuesets[url])
        elif url in self.core:
            pairs = self.core[url]
            codes = {c for _, c in pairs}

            def fn(system: str | None, code: str, pairs=pairs, codes=codes) -> bool | None:
                return (system, code) in pairs if system is not None else code in codes

        if fn is not None:
            self._members[url] = fn
        return fn

    def _compose_member(self, vs: dict[str, Any]) -> Callable[[str | None, str], bool | None]:
        includes = [self._include_member(inc) for inc in (vs.get("compose") or {}).get("include") or []]
        excludes = [self._include_member(inc) for inc in (vs.get("compose") or {}).get("exclude") or []]

        def fn(system: str | None, code: str) -> bool | None:
            if any(ex(system, code) for ex in excludes):
                return False
            answers = [inc(system, code) for inc in includes]
            if any(a is True for a in answers):
                return True
            if any(a is None for a in answers):
                return None
            return False

        return fn

    def _include_member(self, inc: dict[str, Any]) -> Callable[[str | None, str], bool | None]:
        system = inc.get("system")
        nested = [self.member(u) for u in inc.get("valueSet") or []]
        concepts = {c["code"] for c in inc.get("concept") or []}
        filters = inc.get("filter") or []
        known = self.cs_codes(system) if system else None

        def in_system(sys_: str | None, code: str) -> bool | None:
            if system is None:
                return True
            if sys_ is not None and sys_ != system:
                return False
            if concepts:
                return code in concepts
            if filters:
                return all(_filter_match(f, code) for f in filters)
            if known is not None:
                return code in known
            return True  # the whole of an external code system (e.g. all of ICD-10-CM)

        def fn(sys_: str | None, code: str) -> bool | None:
            answer = in_system(sys_, code)
            for sub in nested:
                if answer is False:
                    break
                sub_answer = sub(sys_, code) if sub else None
                answer = False if sub_answer is False else (None if sub_answer is None else answer)
            return answer

        return fn


def _filter_match(flt: dict[str, Any], code: str) -> bool:
    """ValueSet.compose.include.filter for the knowledge-base value sets.

    ``concept is-a X`` / ``descendent-of`` on ICD-10-CM: the ICD-10-CM hierarchy is positional (a code's parents
    are its prefixes, the dot being notation only), so subsumption is a prefix test. ``regex`` is matched whole.
    """
    op, value = flt.get("op"), str(flt.get("value", ""))
    norm = code.replace(".", "").upper()
    target = value.replace(".", "").upper()
    if flt.get("property") == "concept" and op == "is-a":
        return norm.startswith(target)
    if flt.get("property") == "concept" and op == "descendent-of":
        return norm.startswith(target) and norm != target
    if op == "regex":
        # Our regexes are written on the classification's form (ICD-10-CM with the dot); EHRs also send it without.
        dotted = f"{norm[:3]}.{norm[3:]}" if "." not in code and len(norm) > 3 else code
        return re.fullmatch(value, code) is not None or re.fullmatch(value, dotted) is not None
    if op == "=":
        return code == value
    return False


def _parse_profile(sd: dict[str, Any]) -> _Profile:
    elements: dict[str, dict[str, Any]] = {}
    children: dict[str, list[str]] = {}
    slices: dict[str, list[str]] = {}
    for el in sd["snapshot"]["element"]:
        eid = el["id"]
        elements[eid] = el
        if "." not in eid:
            continue
        parent, last = eid.rsplit(".", 1)
        if ":" in last:
            base, _ = last.split(":", 1)
            slices.setdefault(f"{parent}.{base}", []).append(eid)
        else:
            children.setdefault(parent, []).append(eid)
    return _Profile(sd["url"], sd["name"], sd["type"], elements, children, slices)


@functools.lru_cache(maxsize=4)
def _load(package_dir: Path = PACKAGE_DIR, core_valuesets: Path = CORE_VALUESETS) -> _Package:
    return _Package(package_dir, core_valuesets)


def profile_urls() -> dict[str, list[str]]:
    """Our profiles' canonical URLs by resource type."""
    return {t: sorted(urls) for t, urls in _load().by_type.items()}


def valueset_contains(vs_url: str, system: str | None, code: str) -> bool | None:
    """Is (system, code) in one of our value sets? None when the value set is unknown or cannot be decided."""
    fn = _load().member(vs_url)
    return fn(system, code) if fn else None


# --------------------------------------------------------------------------------------------------------------
# Structure (fhir.resources R4B)


def _structure_issues(resource: dict[str, Any], path: str) -> list[Issue]:
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    rtype = resource.get("resourceType")
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError, TypeError, AttributeError):
        return [Issue("error", path, f"unknown resourceType {rtype!r} (not a FHIR R4 resource)")]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = _loc_path(path, err.get("loc") or ())
            msg = err.get("msg") or "invalid"
            if err.get("type") == "extra_forbidden":
                msg = "unknown element (not part of FHIR R4 " + str(rtype) + ")"
            elif err.get("type") == "missing":
                msg = "required element is missing"
            out.append(Issue("error", loc, msg))
        return out
    except (ValueError, TypeError) as exc:  # the models raise plain errors for a few malformed inputs
        return [Issue("error", path, f"not a valid {rtype}: {exc}")]
    return []


def _loc_path(base: str, loc: Iterable[Any]) -> str:
    out = base
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("__root__",):
            out += f".{part}"
    return out


# --------------------------------------------------------------------------------------------------------------
# Profile walk


def _values(container: dict[str, Any], name: str) -> list[tuple[str, Any]]:
    """(json key, value) pairs for an element name; ``name`` may be a choice ``value[x]``."""
    if name.endswith("[x]"):
        stem = name[:-3]
        out = []
        for key, val in container.items():
            if key.startswith(stem) and len(key) > len(stem) and key[len(stem)].isupper():
                out.append((key, val))
        return out
    return [(name, container[name])] if name in container else []


def _matches_pattern(value: Any, pattern: Any) -> bool:
    """FHIR pattern[x] semantics: every element of the pattern is present in the value (arrays: each pattern item
    matched by some value item)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _matches_pattern(value[k], v) for k, v in pattern.items()
        )
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(_matches_pattern(i, p) for i in items) for p in pattern)
    return value == pattern


def _fixed_or_pattern(el: dict[str, Any]) -> tuple[str, Any] | None:
    for key, val in el.items():
        if key.startswith("fixed") or key.startswith("pattern"):
            return key, val
    return None


def _describe(val: Any) -> str:
    if isinstance(val, dict) and "coding" in val:
        return ", ".join(f"{c.get('system')}#{c.get('code')}" for c in val["coding"])
    if isinstance(val, dict) and "code" in val:
        return f"{val.get('system')}#{val.get('code')}"
    return json.dumps(val, ensure_ascii=False)


_REF_TYPE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$")


class _Walker:
    def __init__(self, pkg: _Package, profile: _Profile, bundle_types: dict[str, str] | None = None) -> None:
        self.pkg = pkg
        self.p = profile
        self.bundle_types = bundle_types or {}  # fullUrl -> resourceType of the enclosing Bundle's entries
        self.issues: list[Issue] = []
        self.short = profile.url.rsplit("/", 1)[-1]

    def err(self, path: str, msg: str, severity: str = "error") -> None:
        self.issues.append(Issue(severity, path, f"{msg} (profile {self.short})"))

    def walk(self, resource: dict[str, Any], path: str) -> None:
        root = self.p.type
        self.invariants(self.p.elements[root], path, resource)
        self.node(root, resource, path)

    def node(self, eid: str, obj: Any, path: str) -> None:
        """Check the children of element ``eid`` inside ``obj`` (a JSON object)."""
        if not isinstance(obj, dict):
            return
        kids = self.p.children.get(eid, [])
        if not kids:
            return  # not unfolded in the snapshot: the R4B model checked its structure
        known: set[str] = {"resourceType", "fhir_comments"}
        for cid in kids:
            el = self.p.elements[cid]
            name = cid.rsplit(".", 1)[1]
            known.add(name)
            pairs = _values(obj, name)
            if name.endswith("[x]"):
                stem = name[:-3]
                allowed = {t["code"] for t in el.get("type") or []}
                for key, _ in pairs:
                    tname = key[len(stem):]
                    if not any(t.lower() == tname.lower() for t in allowed):
                        self.err(
                            f"{path}.{key}",
                            f"type {tname} is not allowed here; allowed: {', '.join(sorted(allowed))}",
                        )
                known.update(k for k, _ in pairs)
            items: list[tuple[str, Any]] = []
            for key, val in pairs:
                if isinstance(val, list):
                    items.extend((f"{path}.{key}[{i}]", v) for i, v in enumerate(val))
                else:
                    items.append((f"{path}.{key}", val))
            self.element(cid, el, items, f"{path}.{pairs[0][0] if pairs else name}")
        for key in obj:
            bare = key[1:] if key.startswith("_") else key
            if bare not in known:
                self.err(f"{path}.{key}", "element is not part of FHIR R4 4.0.1 here")

    def element(self, eid: str, el: dict[str, Any], items: list[tuple[str, Any]], path: str) -> None:
        self.cardinality(el, len(items), path)
        if eid in self.p.slices and el.get("slicing"):
            self.sliced(eid, el, items, path)
            return
        for ipath, val in items:
            self.value(eid, el, ipath, val)

    def cardinality(self, el: dict[str, Any], count: int, path: str, what: str = "") -> None:
        lo, hi = int(el.get("min") or 0), el.get("max", "*")
        label = f"{what}: " if what else ""
        if count < lo:
            if lo == 1 and not what:
                self.err(path, "is required but missing")
            else:
                self.err(path, f"{label}at least {lo} required, found {count}")
        if hi != "*" and count > int(hi):
            self.err(path, f"{label}at most {hi} allowed, found {count}")

    def value(self, eid: str, el: dict[str, Any], path: str, val: Any) -> None:
        fp = _fixed_or_pattern(el)
        if fp:
            key, want = fp
            ok = val == want if key.startswith("fixed") else _matches_pattern(val, want)
            if not ok:
                kind = "must be exactly" if key.startswith("fixed") else "must match"
                self.err(path, f"{kind} {_describe(want)}, found {_describe(val)}")
        self.binding(el, path, val)
        self.reference(el, path, val)
        self.invariants(el, path, val)
        self.node(eid, val, path)

    def binding(self, el: dict[str, Any], path: str, val: Any) -> None:
        b = el.get("binding") or {}
        strength, vs = b.get("strength"), b.get("valueSet")
        if strength not in ("required", "extensible") or not vs:
            return
        member = self.pkg.member(vs)
        vs_label = vs.split("|", 1)[0]
        if member is None:
            if strength == "required":
                self.err(path, f"cannot check the required binding to {vs_label} (value set not available)", "warning")
            return
        if isinstance(val, str):
            candidates: list[tuple[str | None, str]] = [(None, val)]
        elif isinstance(val, dict) and ("coding" in val or "text" in val) and "code" not in val:  # CodeableConcept
            candidates = [(c.get("system"), c.get("code")) for c in val.get("coding") or [] if isinstance(c, dict)]
            if not candidates:
                if strength == "required":
                    self.err(path, f"has no coding; a code from {vs_label} is required")
                return
        elif isinstance(val, dict):
            candidates = [(val.get("system"), val.get("code"))]
        else:
            return
        answers = [member(s, c) for s, c in candidates if isinstance(c, str)]
        if any(a is True for a in answers) or (answers and any(a is None for a in answers)):
            return
        shown = ", ".join(f"{s}#{c}" if s else str(c) for s, c in candidates)
        if strength == "required":
            self.err(path, f"{shown} is not in the required value set {vs_label}")
        else:
            self.err(path, f"{shown} is not in the extensible value set {vs_label}", "warning")

    def reference(self, el: dict[str, Any], path: str, val: Any) -> None:
        targets: list[str] = []
        for t in el.get("type") or []:
            if t.get("code") == "Reference":
                targets.extend(t.get("targetProfile") or [])
        if not targets or not isinstance(val, dict):
            return
        ref = val.get("reference")
        allowed = {self._target_type(t) for t in targets}
        if "Resource" in allowed:
            return
        rtype = None
        if isinstance(ref, str) and ref in self.bundle_types:
            rtype = self.bundle_types[ref]  # a urn:uuid link inside a transaction (bundle.html#references)
        elif isinstance(ref, str) and not ref.startswith(("urn:", "#")):
            m = _REF_TYPE.search(ref)
            rtype = m.group(1) if m else None
        elif isinstance(val.get("type"), str):
            rtype = val["type"]
        if rtype and rtype not in allowed:
            self.err(f"{path}.reference", f"must refer to {' or '.join(sorted(allowed))}, not {rtype}")

    def _target_type(self, url: str) -> str:
        prof = self.pkg.profiles.get(url)
        if prof:
            return prof.type
        return url.rsplit("/", 1)[-1]

    def invariants(self, el: dict[str, Any], path: str, val: Any) -> None:
        for c in el.get("constraint") or []:
            if not str(c.get("source", "")).startswith(CANONICAL_BASE):
                continue
            check = INVARIANTS.get(c["key"])
            if check is None:
                self.err(path, f"invariant {c['key']} has no implementation in fhir_massage.validation", "warning")
            elif not check(val):
                where = INVARIANT_FOCUS.get(c["key"])
                self.err(f"{path}.{where}" if where else path, f"{c['key']}: {c.get('human')}")

    def sliced(self, eid: str, el: dict[str, Any], items: list[tuple[str, Any]], path: str) -> None:
        slicing = el["slicing"]
        slice_ids = self.p.slices[eid]
        counts = {sid: 0 for sid in slice_ids}
        for ipath, val in items:
            hit = next((sid for sid in slice_ids if self._in_slice(sid, slicing, val)), None)
            if hit is None:
                if slicing.get("rules") == "closed":
                    self.err(ipath, "matches none of the allowed slices")
                self.value(eid, el, ipath, val)
                continue
            counts[hit] += 1
            self.value(hit, self.p.elements[hit], ipath, val)
        for sid, n in counts.items():
            sel = self.p.elements[sid]
            name = sid.rsplit(":", 1)[1]
            self.cardinality(sel, n, path, what=f"slice '{name}' ({self._slice_label(sid, slicing)})")

    def _discriminator_value(self, sid: str, disc_path: str) -> tuple[str, Any] | None:
        if disc_path == "$this":
            return _fixed_or_pattern(self.p.elements[sid])
        el = self.p.elements.get(f"{sid}.{disc_path}")
        return _fixed_or_pattern(el) if el else None

    def _in_slice(self, sid: str, slicing: dict[str, Any], val: Any) -> bool:
        for disc in slicing.get("discriminator") or []:
            want = self._discriminator_value(sid, disc["path"])
            if want is None:
                return False
            got = val if disc["path"] == "$this" else (val.get(disc["path"]) if isinstance(val, dict) else None)
            key, wanted = want
            if key.startswith("fixed") and disc["type"] == "value":
                if got != wanted:
                    return False
            elif not _matches_pattern(got, wanted):
                return False
        return True

    def _slice_label(self, sid: str, slicing: dict[str, Any]) -> str:
        parts = []
        for disc in slicing.get("discriminator") or []:
            want = self._discriminator_value(sid, disc["path"])
            if want:
                label = "" if disc["path"] == "$this" else f"{disc['path']} "
                parts.append(label + _describe(want[1]))
        return "; ".join(parts)


# Our invariants, by key (FHIRPath text in profiles/input/fsh/profiles.fsh). Each takes the element's JSON value.


def _performed_period(res: dict[str, Any]) -> dict[str, Any]:
    p = res.get("performedPeriod")
    return p if isinstance(p, dict) else {}


def _score(res: dict[str, Any]) -> Any:
    if "valueInteger" in res:
        return res["valueInteger"]
    q = res.get("valueQuantity")
    return q.get("value") if isinstance(q, dict) else None


def _ucum(q: Any, code: str) -> bool:
    return isinstance(q, dict) and q.get("system") == "http://unitsofmeasure.org" and q.get("code") == code


INVARIANTS: dict[str, Callable[[Any], bool]] = {
    "mpr-1": lambda r: r.get("status") != "not-done" or bool(r.get("statusReason")),
    "mpr-2": lambda r: r.get("status") != "completed"
    or bool(_performed_period(r).get("start") and _performed_period(r).get("end")),
    "mps-1": lambda r: _score(r) is None
    or (isinstance(_score(r), (int, float)) and not isinstance(_score(r), bool) and 0 <= _score(r) <= 10),
    "mps-2": lambda r: "valueQuantity" not in r or _ucum(r.get("valueQuantity"), "{score}"),
    "msr-1": lambda r: "quantityQuantity" not in r or _ucum(r.get("quantityQuantity"), "{session}"),
}


# The element each root-level invariant is about, so the message points there.
INVARIANT_FOCUS: dict[str, str] = {
    "mpr-1": "statusReason",
    "mpr-2": "performedPeriod",
    "mps-1": "value[x]",
    "mps-2": "valueQuantity",
    "msr-1": "quantityQuantity",
}


# --------------------------------------------------------------------------------------------------------------
# Public API


def validate_against_profiles(
    resource: dict[str, Any], *, path: str | None = None, _bundle_types: dict[str, str] | None = None
) -> list[Issue]:
    """Check a resource against every fhir-massage profile in its ``meta.profile`` (ours only; others noted)."""
    pkg = _load()
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    path = path or str(rtype)
    declared = ((resource.get("meta") or {}).get("profile") or []) if isinstance(resource, dict) else []
    issues: list[Issue] = []
    for url in declared:
        if not isinstance(url, str):
            continue
        base = url.split("|", 1)[0]
        if base in pkg.profiles:
            issues.extend(_walk(pkg, pkg.profiles[base], resource, path, _bundle_types))
        elif base.startswith(PROFILE_PREFIX):
            issues.append(Issue("error", f"{path}.meta.profile", f"{base} is not a fhir-massage profile"))
        else:
            issues.append(Issue("information", f"{path}.meta.profile", f"{base} is not checked here"))
    return issues


def _walk(pkg: _Package, prof: _Profile, resource: dict[str, Any], path: str,
          bundle_types: dict[str, str] | None = None) -> list[Issue]:
    if resource.get("resourceType") != prof.type:
        return [Issue("error", path, f"profile {prof.url} is for {prof.type}, not {resource.get('resourceType')}")]
    walker = _Walker(pkg, prof, bundle_types)
    walker.walk(resource, path)
    return walker.issues


def validate_resource(
    resource: Any, profile_url: str | None = None, *, path: str | None = None,
    _bundle_types: dict[str, str] | None = None,
) -> list[Issue]:
    """All problems of one resource (or of a Bundle and every resource in it): FHIR R4 structure + our profiles.

    The profile is ``profile_url`` when given, else the fhir-massage profiles in ``meta.profile``; a resource that
    declares none of ours but has a type we profile is checked against that profile anyway (with a warning about
    the missing ``meta.profile``), so that a builder that forgets to declare it is still held to the profile.
    Returns an empty list when the resource is valid; severities follow OperationOutcome (error | warning |
    information); only errors make a resource invalid.
    """
    if not isinstance(resource, dict):
        return [Issue("error", path or "$", "a FHIR resource is a JSON object")]
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        return [Issue("error", path or "$", "resourceType is missing")]
    path = path or rtype
    if rtype == "Bundle":
        # Entries are checked one by one below (with their own profiles); checking them here too would report
        # every structural problem twice.
        shell = dict(resource)
        shell["entry"] = [
            {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
            for e in resource.get("entry") or []
        ]
        if not shell["entry"]:
            del shell["entry"]
        issues = _structure_issues(shell, path)
    else:
        issues = _structure_issues(resource, path)
    pkg = _load()
    if profile_url:
        prof = pkg.profiles.get(profile_url.split("|", 1)[0])
        if prof is None:
            return issues + [Issue("error", path, f"unknown profile {profile_url}")]
        issues.extend(_walk(pkg, prof, resource, path, _bundle_types))
    else:
        declared = [u for u in (resource.get("meta") or {}).get("profile") or [] if isinstance(u, str)]
        ours = [u for u in declared if u.split("|", 1)[0].startswith(PROFILE_PREFIX)]
        issues.extend(validate_against_profiles(resource, path=path, _bundle_types=_bundle_types))
        if not ours and len(pkg.by_type.get(rtype, [])) == 1:
            url = pkg.by_type[rtype][0]
            issues.append(Issue("warning", f"{path}.meta.profile", f"does not declare {url}; checked against it"))
            issues.extend(_walk(pkg, pkg.profiles[url], resource, path, _bundle_types))
    flagged = {i.path for i in issues if i.severity == "error"}
    issues.extend(
        i for i in _our_code_issues(resource, path, pkg) if i.path.removesuffix(".code") not in flagged
    )
    issues = _drop_repeats(issues)
    if rtype == "Bundle":
        issues.extend(_bundle_issues(resource, path))
    return issues


def _our_code_issues(resource: Any, path: str, pkg: _Package) -> list[Issue]:
    """Every Coding (anywhere) whose system is one of our code systems must use a code defined there."""
    out: list[Issue] = []
    prefix = f"{CANONICAL_BASE}/CodeSystem/"

    def visit(node: Any, at: str) -> None:
        if isinstance(node, dict):
            system, code = node.get("system"), node.get("code")
            if isinstance(system, str) and system.startswith(prefix) and isinstance(code, str):
                known = pkg.cs_codes(system)
                if known is None:
                    out.append(Issue("error", at, f"{system} is not a fhir-massage code system"))
                elif code not in known:
                    out.append(Issue("error", f"{at}.code", f"{code!r} is not a code of {system}"))
            for key, val in node.items():
                if node.get("resourceType") == "Bundle" and key == "entry":
                    continue  # entries are checked one by one
                visit(val, f"{at}.{key}")
        elif isinstance(node, list):
            for i, val in enumerate(node):
                visit(val, f"{at}[{i}]")

    visit(resource, path)
    return out


def _drop_repeats(issues: list[Issue]) -> list[Issue]:
    """A missing or unknown element is found by both layers: keep the first (structure) report of a path."""
    seen_error_paths: set[str] = set()
    out = []
    for issue in issues:
        if issue.severity == "error" and issue.path in seen_error_paths and (
            "missing" in issue.message or "not part of FHIR" in issue.message
        ):
            continue
        if issue.severity == "error":
            seen_error_paths.add(issue.path)
        out.append(issue)
    return out


def _bundle_issues(bundle: dict[str, Any], path: str) -> list[Issue]:
    issues: list[Issue] = []
    btype = bundle.get("type")
    full_urls: set[str] = set()
    types = {
        e["fullUrl"]: e["resource"]["resourceType"]
        for e in bundle.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("fullUrl"), str) and isinstance(e.get("resource"), dict)
        and isinstance(e["resource"].get("resourceType"), str)
    }
    for i, entry in enumerate(bundle.get("entry") or []):
        epath = f"{path}.entry[{i}]"
        if not isinstance(entry, dict):
            continue
        fu = entry.get("fullUrl")
        if isinstance(fu, str):
            if fu in full_urls:
                issues.append(Issue("error", f"{epath}.fullUrl", f"{fu} appears twice in the Bundle (bdl-7)"))
            full_urls.add(fu)
        if btype in ("transaction", "batch"):
            req = entry.get("request")
            if not isinstance(req, dict) or not req.get("method") or not req.get("url"):
                issues.append(Issue("error", f"{epath}.request", f"a {btype} entry needs request.method and request.url (bdl-3)"))
        res = entry.get("resource")
        if isinstance(res, dict):
            issues.extend(validate_resource(res, path=f"{epath}.resource", _bundle_types=types))
    return issues


def is_valid(resource: Any, profile_url: str | None = None) -> bool:
    return not errors(validate_resource(resource, profile_url))
