"""The contraindication knowledge base: load the data files (README.md here) into fast lookups.

Everything clinical lives in the JSON files next to this module; this code only indexes them. Lookups are built
once per KnowledgeBase (dicts keyed by code, ICD-10-CM prefixes keyed without the dot), so screening a chart is a
handful of dict probes per resource. ``load_kb()`` without overrides is cached.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import orjson

from fhir_massage.codes import TECHNIQUES
from fhir_massage.errors import InvalidInput

__all__ = ["KnowledgeBase", "Rule", "Site", "CodeMatch", "load_kb", "parse_site", "norm_icd", "CLASSES"]

_DIR = Path(__file__).parent
CLASSES = ("absolute", "relative", "local")
LATERALITIES = ("left", "right", "bilateral")
_ALL_TECHNIQUES = frozenset(TECHNIQUES)


def norm_icd(code: str) -> str:
    """ICD-10-CM compared without the dot and in upper case: EHRs send both 'I82.402' and 'I82402'."""
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True, slots=True, order=True)
class Site:
    """A SNOMED CT body structure, optionally with a side. ``laterality`` None = side unknown (= both)."""

    code: str
    laterality: str | None = None

    def __str__(self) -> str:
        return f"{self.code}:{self.laterality}" if self.laterality else self.code


@dataclass(frozen=True, slots=True)
class CodeMatch:
    """One code entry of a rule that matched: what the UI shows as 'why'."""

    system: str
    code: str
    display: str
    tag: str
    verified: bool
    site: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule, or one of its companion findings (``parent`` is then the rule whose codes it shares)."""

    id: str
    title: str
    kind: str
    cls: str
    techniques: frozenset[str]
    scope: str
    sites: tuple[Site, ...]
    margin: str
    status: str
    history_of: tuple[str, ...]
    time: Mapping[str, str]
    observation: Mapping[str, Any] | None
    evidence_class: str
    tag: str
    source: str
    reference: str | None
    act_code: str
    message: str
    informational: bool
    value_sets: tuple[Mapping[str, Any], ...]
    parent: str | None = None
    companions: tuple[str, ...] = ()
    when: str | None = None  # companions only: "first-trimester" | "early-post-op"


@dataclass(frozen=True)
class SiteInfo:
    code: str
    display: str
    parents: tuple[str, ...]
    lateralizable: bool
    ancestors: frozenset[str]  # including itself


@dataclass(frozen=True)
class KnowledgeBase:
    version: str
    rules: Mapping[str, Rule]  # every id, companions included
    thresholds: Mapping[str, float]
    threshold_meta: Mapping[str, Mapping[str, Any]]
    sites: Mapping[str, SiteInfo]
    root_site: str
    limb_level: frozenset[str]
    laterality_codes: Mapping[str, str]
    lateralized: Mapping[str, Site]  # pre-coordinated lateralized concept -> (site, side)
    text_laterality: Mapping[str, str]
    obs_kinds: Mapping[str, Mapping[str, Any]]
    obs_code_kind: Mapping[str, str]  # LOINC -> kind (panels and components included)
    # lookups: code -> ((rule id, CodeMatch), ...)
    snomed: Mapping[str, tuple[tuple[str, CodeMatch], ...]]
    rxnorm: Mapping[str, tuple[tuple[str, CodeMatch], ...]]
    icd_prefixes: Mapping[str, tuple[tuple[str, CodeMatch, frozenset[str], tuple[str, ...]], ...]]
    icd_max_len: int
    icd_sites: Mapping[str, Mapping[str, Any]]
    icd_site_max_len: int
    keyword_re: Mapping[str, re.Pattern[str] | None]  # condition | condition-history | medication | allergy | surgery
    allergy_codes: frozenset[str]
    history_rules: Mapping[str, tuple[str, ...]]  # rule id -> the rules whose historyOf names it
    text_sites: Mapping[str, str]  # word -> site code, for problems/procedures with no coded site
    text_site_re: re.Pattern[str] | None
    _raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    # -- code lookups ------------------------------------------------------------------------------------------

    def match_icd(self, code: str) -> list[tuple[str, CodeMatch]]:
        """Every rule whose ICD-10-CM prefix covers ``code`` (a rule may match at several prefix lengths)."""
        c = norm_icd(code)
        out: list[tuple[str, CodeMatch]] = []
        for n in range(min(len(c), self.icd_max_len), 0, -1):
            hits = self.icd_prefixes.get(c[:n])
            if not hits:
                continue
            for rule_id, match, seventh, exclude in hits:
                if exclude and any(c.startswith(x) for x in exclude):
                    continue
                if seventh and len(c) >= 7 and c[6] not in seventh:
                    continue
                out.append((rule_id, CodeMatch(match.system, code, match.display, match.tag, match.verified, match.site)))
        return out

    def icd_site(self, code: str) -> tuple[Site, str] | None:
        """Body site (with laterality) implied by an ICD-10-CM code, and the mapping's tag; None when unmapped."""
        c = norm_icd(code)
        for n in range(min(len(c), self.icd_site_max_len), 0, -1):
            m = self.icd_sites.get(c[:n])
            if m is None:
                continue
            lat = m.get("laterality")
            pos = m.get("lateralityPosition")
            if pos and len(c) >= pos:
                lat = (m.get("lateralityMap") or {}).get(c[pos - 1])
            if lat in ("unknown", None):
                lat = None
            return Site(m["site"], lat if self.sites[m["site"]].lateralizable else None), m.get("tag", "[B]")
        return None

    # -- sites -------------------------------------------------------------------------------------------------

    def overlaps(self, a: Site, b: Site) -> bool:
        """Two sites overlap when one contains the other and their sides are compatible (unknown side = both)."""
        sa, sb = self.sites.get(a.code), self.sites.get(b.code)
        if sa is None or sb is None:
            return True  # an unmapped site cannot be ruled out: assume the worst
        if a.code not in sb.ancestors and b.code not in sa.ancestors:
            return False
        la, lb = a.laterality, b.laterality
        return la is None or lb is None or la == "bilateral" or lb == "bilateral" or la == lb

    def widen(self, site: Site, margin: str) -> Site:
        info = self.sites.get(site.code)
        if info is None or margin in ("self", ""):
            return site
        code = site.code
        if margin == "parent":
            # a limb (or head and neck, trunk) widens no further: "the limb segment", never the whole body
            if site.code not in self.limb_level and info.parents:
                code = info.parents[0]
        elif margin == "limb":
            cur = info
            while cur.code not in self.limb_level and cur.parents:
                cur = self.sites[cur.parents[0]]
            code = cur.code if cur.code in self.limb_level else site.code
        lat = site.laterality if self.sites[code].lateralizable else None
        return Site(code, lat)

    def threshold(self, key: str) -> float:
        return self.thresholds[key]

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> KnowledgeBase:
        if not overrides:
            return self
        values = dict(self.thresholds)
        for key, value in overrides.items():
            if key not in values:
                raise InvalidInput(f"Unknown threshold {key!r}; known: {', '.join(sorted(values))}.")
            if isinstance(value, Mapping):
                value = value.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"Threshold {key!r} must be a number, not {value!r}.")
            values[key] = float(value)
        return _replace_thresholds(self, values)


def _replace_thresholds(kb: KnowledgeBase, values: dict[str, float]) -> KnowledgeBase:
    import dataclasses

    return dataclasses.replace(kb, thresholds=MappingProxyType(values))


def parse_site(text: str, kb: KnowledgeBase | None = None) -> Site:
    """``CODE`` or ``CODE:left|right|bilateral`` -> Site; InvalidInput for anything else or an unknown code."""
    kb = kb or load_kb()
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("A body site must be a SNOMED CT code, optionally with ':left', ':right' or ':bilateral'.")
    code, sep, lat = text.strip().partition(":")
    if not code.isdigit() or (sep and not lat):
        raise InvalidInput(f"Malformed body site {text!r}: expected a SNOMED CT code such as 30021000 or 30021000:left.")
    info = kb.sites.get(code)
    if info is None:
        raise InvalidInput(f"Unknown body site {code!r}: not one of the body structures in the knowledge base "
                           "(see fhir_massage/knowledge/body_sites.json).")
    if lat:
        if lat not in LATERALITIES:
            raise InvalidInput(f"Malformed body site {text!r}: the side must be left, right or bilateral.")
        if not info.lateralizable:
            raise InvalidInput(f"Body site {code} ({info.display}) has no sides; drop ':{lat}'.")
    return Site(code, lat or None)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _read(name: str) -> Any:
    return orjson.loads((_DIR / name).read_bytes())


def _techniques(value: Any, where: str) -> frozenset[str]:
    if value == "*":
        return _ALL_TECHNIQUES
    out = frozenset(value)
    unknown = out - _ALL_TECHNIQUES
    if unknown:
        raise ValueError(f"{where}: unknown technique keys {sorted(unknown)}")
    return out


def _keyword_re(words: Iterable[str], *, anchored: bool = True, whole_word: bool = False) -> re.Pattern[str] | None:
    words = sorted({w.lower() for w in words if w}, key=len, reverse=True)
    if not words:
        return None
    # Word-start anchored so 'clot' does not fire inside another word; prefixes like 'pregnan' still work.
    # Surgery words are suffixes ('-ectomy' in 'prostatectomy'), so that list is matched anywhere.
    body = "(?:" + "|".join(re.escape(w) for w in words) + ")"
    if whole_word:
        return re.compile(r"\b" + body + r"\b", re.IGNORECASE)
    return re.compile((r"\b" if anchored else "") + body, re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _default_kb() -> KnowledgeBase:
    raw_rules = _read("rules.json")
    raw_th = _read("thresholds.json")["thresholds"]
    raw_sites = _read("body_sites.json")
    raw_obs = _read("observations.json")["kinds"]
    raw_icd_sites = _read("icd_sites.json")["mappings"]

    thresholds = {k: float(v["value"]) for k, v in raw_th.items()}

    # sites and their ancestor sets
    parents = {s["code"]: tuple(s["parents"]) for s in raw_sites["sites"]}

    def ancestors(code: str) -> frozenset[str]:
        seen = {code}
        todo = list(parents.get(code, ()))
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(parents.get(p, ()))
        return frozenset(seen)

    sites = {s["code"]: SiteInfo(s["code"], s["display"], tuple(s["parents"]), bool(s["lateralizable"]), ancestors(s["code"]))
             for s in raw_sites["sites"]}

    def site_list(values: Iterable[str], where: str) -> tuple[Site, ...]:
        out = []
        for v in values:
            code, _, lat = v.partition(":")
            if code not in sites:
                raise ValueError(f"{where}: site {code} is not in body_sites.json")
            out.append(Site(code, lat or None))
        return tuple(out)

    rules: dict[str, Rule] = {}
    snomed: dict[str, list] = {}
    rxnorm: dict[str, list] = {}
    icd: dict[str, list] = {}
    kw: dict[str, list[str]] = {"condition": [], "condition-history": [], "medication": [], "allergy": [], "surgery": []}
    allergy_codes: set[str] = set()
    raw_by_id = {}
    for r in raw_rules["rules"]:
        rid = r["id"]
        raw_by_id[rid] = r
        for key in ("time",):
            for tkey in (r.get(key) or {}).values():
                if tkey not in thresholds:
                    raise ValueError(f"rule {rid}: unknown threshold key {tkey}")
        obs = r.get("observation")
        if obs:
            for tkey in obs["threshold"] if isinstance(obs["threshold"], list) else [obs["threshold"]]:
                if tkey not in thresholds:
                    raise ValueError(f"rule {rid}: unknown threshold key {tkey}")
        if r["class"] not in CLASSES:
            raise ValueError(f"rule {rid}: class {r['class']}")
        companions = tuple(a["id"] for a in r.get("also") or ())
        common = dict(kind=r["kind"], status=r["status"], history_of=tuple(r.get("historyOf") or ()),
                      time=MappingProxyType(dict(r.get("time") or {})), observation=obs, act_code=r["actCode"],
                      informational=bool(r.get("informational")), value_sets=tuple(r.get("valueSets") or ()),
                      tag=r["tag"], reference=r.get("reference"))
        rules[rid] = Rule(id=rid, title=r["title"], cls=r["class"], techniques=_techniques(r["techniques"], rid),
                          scope=r["scope"], sites=site_list(r.get("sites") or (), rid), margin=r.get("margin") or "self",
                          evidence_class=r["evidenceClass"], source=r["source"], message=r["message"],
                          companions=companions, **common)
        for a in r.get("also") or ():
            if a["class"] not in CLASSES:
                raise ValueError(f"rule {a['id']}: class {a['class']}")
            rules[a["id"]] = Rule(id=a["id"], title=r["title"], cls=a["class"], techniques=_techniques(a["techniques"], a["id"]),
                                  scope=a.get("scope", "systemic"), sites=site_list(a.get("sites") or (), a["id"]),
                                  margin=a.get("margin") or r.get("margin") or "self",
                                  evidence_class=a.get("evidenceClass") or r["evidenceClass"],
                                  source=a.get("source") or r["source"], message=a["message"], parent=rid,
                                  when=a.get("when"), **common)
            if a.get("when") not in (None, "first-trimester", "early-post-op"):
                raise ValueError(f"rule {a['id']}: unknown 'when' {a['when']}")
        codes = r.get("codes") or {}
        for c in codes.get("snomed") or ():
            m = CodeMatch("http://snomed.info/sct", c["code"], c["display"], c["tag"], bool(c["verified"]), c.get("site"))
            snomed.setdefault(c["code"], []).append((rid, m))
            if r["kind"] == "allergy":
                allergy_codes.add(c["code"])
        for c in codes.get("rxnorm") or ():
            m = CodeMatch("http://www.nlm.nih.gov/research/umls/rxnorm", c["code"], c["display"], c["tag"], bool(c["verified"]))
            rxnorm.setdefault(c["code"], []).append((rid, m))
        for c in codes.get("icd10cm") or ():
            m = CodeMatch("http://hl7.org/fhir/sid/icd-10-cm", c["prefix"], c["display"], c["tag"], bool(c["verified"]))
            icd.setdefault(norm_icd(c["prefix"]), []).append(
                (rid, m, frozenset(c.get("seventh") or ()), tuple(norm_icd(x) for x in c.get("exclude") or ())))
        target = {"medication": "medication", "allergy": "allergy", "procedure": "surgery"}.get(r["kind"], "condition")
        kw[target].extend(r.get("keywords") or ())
        if r["kind"] == "medication":
            # a medication rule's words also describe problems ("long-term warfarin use")
            kw["condition"].extend(r.get("keywords") or ())
    history_rules: dict[str, list[str]] = {}
    for rid, r in rules.items():
        if r.parent:
            continue
        for h in r.history_of:
            if h not in rules:
                raise ValueError(f"rule {rid}: historyOf unknown rule {h}")
            history_rules.setdefault(h, []).append(rid)
            # a resolved problem that only mentions these words is still worth a look (history rules)
            kw["condition-history"].extend(raw_by_id[h].get("keywords") or ())

    obs_code_kind: dict[str, str] = {}
    for kind, info in raw_obs.items():
        for c in info.get("codes") or ():
            obs_code_kind[c] = kind
        for c in info.get("systolic") or ():
            obs_code_kind[c] = kind
        for c in info.get("diastolic") or ():
            obs_code_kind[c] = kind

    text_sites = {k.lower(): v for k, v in (raw_sites.get("textSites") or {}).items()}
    for v in text_sites.values():
        if v not in sites:
            raise ValueError(f"body_sites textSites: unknown site {v}")
    icd_sites = {norm_icd(m["prefix"]): m for m in raw_icd_sites}
    for m in raw_icd_sites:
        if m["site"] not in sites:
            raise ValueError(f"icd_sites: unknown site {m['site']}")

    return KnowledgeBase(
        version=raw_rules.get("kbVersion", "?"),
        rules=MappingProxyType(rules),
        thresholds=MappingProxyType(thresholds),
        threshold_meta=MappingProxyType(raw_th),
        sites=MappingProxyType(sites),
        root_site=raw_sites["root"],
        limb_level=frozenset(raw_sites["limbLevel"]),
        laterality_codes=MappingProxyType(dict(raw_sites["laterality"])),
        lateralized=MappingProxyType({c["code"]: Site(c["site"], c["laterality"]) for c in raw_sites.get("lateralizedConcepts") or ()}),
        text_laterality=MappingProxyType(dict(raw_sites.get("textLaterality") or {})),
        obs_kinds=MappingProxyType(raw_obs),
        obs_code_kind=MappingProxyType(obs_code_kind),
        snomed=MappingProxyType({k: tuple(v) for k, v in snomed.items()}),
        rxnorm=MappingProxyType({k: tuple(v) for k, v in rxnorm.items()}),
        icd_prefixes=MappingProxyType({k: tuple(v) for k, v in icd.items()}),
        icd_max_len=max(len(k) for k in icd),
        icd_sites=MappingProxyType(icd_sites),
        icd_site_max_len=max(len(k) for k in icd_sites),
        keyword_re=MappingProxyType({k: _keyword_re(v, anchored=(k != "surgery")) for k, v in kw.items()}),
        allergy_codes=frozenset(allergy_codes),
        history_rules=MappingProxyType({k: tuple(v) for k, v in history_rules.items()}),
        text_sites=MappingProxyType(text_sites),
        text_site_re=_keyword_re(text_sites, whole_word=True),
        _raw=MappingProxyType({"rules": raw_by_id}),
    )


def load_kb(overrides: Mapping[str, Any] | None = None) -> KnowledgeBase:
    """The knowledge base; ``overrides`` replaces thresholds by key (``{"platelets_relative_below": 40}``).

    Unknown keys or non-numbers raise ``InvalidInput``. Without overrides the same cached object is returned.
    """
    return _default_kb().with_overrides(overrides)
