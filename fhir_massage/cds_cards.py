"""CDS Hooks 2.0.1 for the contraindication screen, as pure functions (no Flask, no HTTP, no clock reads).

The web glue (smart_app/cds.py) calls, in this order:

* ``discovery()`` -> the ``GET /cds-services`` document (two services: order-select and order-sign);
* ``parse_hook_request(body, service_id)`` -> ``HookRequest`` (raises ``CdsRequestError`` -> 400);
* ``massage_orders(request)`` -> the draft ServiceRequests that are massage orders (order-select: only the
  ``selections``);
* ``prefetch_resources(request)`` -> ``PrefetchResult`` (resources found, keys missing, keys paged); missing keys
  are fetched with ``prefetch_queries(patient_id)`` through the FHIR server when the EHR gave access, otherwise
  the service answers 412 (spec "Prefetch": a service that cannot get the data it needs answers 412);
* ``build_cards(orders, screenings, ...)`` -> ``(cards, records)``: one card per finding that applies to the
  order's techniques and sites, and what the store keeps per card for the feedback endpoint. Every ``update``
  suggestion passes ``resolves(finding, updated_order)``: applied by the EHR and screened again, the card's finding
  no longer applies (the screen reads techniques and sites, not pressure);
* ``app_context(...)`` / ``parse_app_context(raw, patient_id=...)``: the smart link's ``appContext`` (format in
  docs/cds-hooks.md), written on every card and read by the app after the launch (smart_app/launch.py);
* ``parse_feedback(body)`` -> ``FeedbackItem`` list; ``override_mitigation(item, reason_display)`` -> the
  ``DetectedIssue.mitigation`` entry an override becomes.

Massage orders are recognised by our technique CodeSystem (``codes.TECHNIQUE_SYSTEM``) or, for EHRs that order by
billing code only, by CPT. CPT-only orders get their techniques *inferred*, conservatively (the screen then assumes
every technique that code commonly bills, so it warns about more, never less); see ``CPT_INFERRED``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import uuid as _uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import codes as C
from .errors import MassageError
from .knowledge import KnowledgeBase, Site, load_kb
from .units import quantity_text, unit_text

__all__ = [
    "SERVICES", "SOURCE_LABEL", "OVERRIDE_REASON_SYSTEM", "OVERRIDE_REASONS", "CPT_INFERRED", "CARD_TOPIC_SYSTEM",
    "CdsRequestError", "CdsPreconditionFailed", "FhirAccess", "HookRequest", "MassageOrder", "PrefetchResult",
    "FeedbackItem", "discovery", "prefetch_templates", "prefetch_queries", "parse_hook_request", "massage_orders",
    "prefetch_resources", "build_cards", "needs_review_card", "parse_feedback", "override_mitigation", "md_escape",
    "code_span", "parse_fhir_access", "finding_from_json", "information_card",
    "summary_for", "order_sites", "resolves", "CLEARANCE_LABEL", "AppContext", "app_context", "parse_app_context",
]

SOURCE_LABEL = "fhir-massage contraindication screen"
CARD_TOPIC_SYSTEM = f"{C.CANONICAL_BASE}/CodeSystem/massage-contraindication-rule"
OVERRIDE_REASON_SYSTEM = f"{C.CANONICAL_BASE}/CodeSystem/cds-override-reason"
SUMMARY_MAX = 139  # spec: summary "<140 characters"

# Override reasons offered on every card (spec "Card": overrideReasons, Coding with display). Our own CodeSystem.
OVERRIDE_REASONS: tuple[tuple[str, str], ...] = (
    ("clearance-obtained", "Physician clearance obtained and documented"),
    ("benefit-outweighs-risk", "Benefit outweighs risk (e.g. palliative care)"),
    ("patient-declined-alternative", "Patient declined the suggested alternative"),
    ("not-applicable", "Not applicable: chart data outdated or incorrect"),
)

# CPT -> techniques assumed for an order coded by CPT only. [B] throughout: CPT describes billing categories, not
# techniques, and massage therapists bill several techniques under one code (codes.TECHNIQUE_CPT has the other
# direction with its own tags). Conservative = every technique the code plausibly covers, so a contraindication
# of any of them is shown; the card says that the techniques were inferred.
#   97124 "Massage therapy" (effleurage, petrissage, tapotement): Swedish [V2]; deep tissue by billing convention [B]
#   97140 "Manual therapy techniques": myofascial release and MLD [V2]; trigger point, neuromuscular [B]; deep
#         tissue [B] (some payers accept deep tissue work as 97140)
#   97112 "Neuromuscular re-education": neuromuscular therapy [B] (a PT code; NMT massage is sometimes billed so)
CPT_INFERRED: dict[str, tuple[tuple[str, ...], str]] = {
    "97124": (("swedish", "deep-tissue"), "[B]"),
    "97140": (("myofascial-release", "trigger-point", "lymphatic-drainage", "neuromuscular", "deep-tissue"), "[B]"),
    "97112": (("neuromuscular",), "[B]"),
}

CLASS_INDICATOR = {"absolute": "critical", "relative": "warning", "local": "info"}
CLASS_LABEL = {
    "absolute": "Absolute contraindication",
    "relative": "Relative contraindication",
    "local": "Local contraindication",
}
CLASS_MEANING = {
    "absolute": "withhold this treatment until resolved; a physician override is not expected",
    "relative": "may proceed with documented physician clearance and/or a modified technique",
    "local": "skip the affected region (with a margin) and treat elsewhere",
}
EVIDENCE_LABEL = {
    "EV": "EV: supported by published clinical evidence",
    "CONS": "CONS: consensus or professional convention, no outcome data",
    "MECH": "MECH: mechanistic or theoretical only",
}

# Services (spec "Discovery"): one per hook. ``id`` is the path segment under /cds-services.
SERVICES: dict[str, dict[str, str]] = {
    "massage-order-select": {
        "hook": "order-select",
        "title": "Massage contraindication screen (order selection)",
        "description": "Screens newly selected medical massage orders (ServiceRequest with a massage technique or "
                       "CPT 97124/97140/97112) against the patient's chart: conditions, medications, allergies, "
                       "recent procedures and the latest platelets, INR, blood pressure, temperature, eGFR and "
                       "pregnancy status. Returns one card per contraindication with its evidence class and source.",
    },
    "massage-order-sign": {
        "hook": "order-sign",
        "title": "Massage contraindication screen (order signing)",
        "description": "Screens the massage orders about to be signed (same screen as order-select, on the complete "
                       "orders) and offers to modify the order, request physician clearance, or override with a "
                       "reason.",
    },
}

_USAGE = ("Requires an EHR registered with the service (JWT iss and JWKS). Send the prefetch, or fhirServer + "
          "fhirAuthorization with patient/*.rs read access (Patient, Condition, MedicationRequest, "
          "MedicationStatement, MedicationAdministration, AllergyIntolerance, Procedure, Observation); without "
          "either the service answers 412. For overrides written back as DetectedIssue, send fhirServer + "
          "fhirAuthorization (with DetectedIssue create) on the feedback call as well.")

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_REF = re.compile(r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}$")


class CdsRequestError(MassageError):
    """The hook request is not usable (bad JSON, wrong shape): the service answers 400."""

    code = "cds-request"
    status = 400


class CdsPreconditionFailed(MassageError):
    """Data the screen needs is neither prefetched nor reachable (spec: 412 Precondition Failed)."""

    code = "cds-prefetch"
    status = 412


# ---------------------------------------------------------------------------------------------------------------
# Discovery and prefetch


@functools.lru_cache(maxsize=1)
def _default_kb() -> KnowledgeBase:
    return load_kb()


def prefetch_templates(kb: KnowledgeBase | None = None) -> dict[str, str]:
    """Prefetch templates (spec "Prefetch Template"): only instance reads and ``patient={{context.patientId}}``
    searches with token codes, ``_sort`` and ``_count`` (the restricted subset every client should support).

    Conditions are fetched whatever their clinical status: history rules (DVT history, cancer treatment history)
    read resolved conditions too. Procedures are not date-filtered (relative dates are a 3.0-ballot feature; the
    engine applies the windows). Observations: the latest few of each kind in knowledge/observations.json (a
    few, not one, so an entered-in-error or unit-less latest value does not hide the previous valid one)."""
    kb = kb or _default_kb()
    pid = "{{context.patientId}}"
    out = {
        "patient": f"Patient/{pid}",
        "conditions": f"Condition?patient={pid}",
        "medicationRequests": f"MedicationRequest?patient={pid}",
        "medicationStatements": f"MedicationStatement?patient={pid}",
        "medicationAdministrations": f"MedicationAdministration?patient={pid}",
        "allergies": f"AllergyIntolerance?patient={pid}",
        "procedures": f"Procedure?patient={pid}",
    }
    for kind, spec in kb.obs_kinds.items():
        loincs: list[str] = []
        for key in ("codes", "systolic", "diastolic"):
            for code in spec.get(key) or []:
                if code not in loincs:
                    loincs.append(code)
        if not loincs:
            continue
        key = "obs" + "".join(part.capitalize() for part in kind.split("-"))
        codes = ",".join(f"{C.LOINC}|{c}" for c in loincs)
        count = 6 if kind == "bp" else 3  # separate systolic/diastolic Observations come in pairs
        out[key] = f"Observation?patient={pid}&code={codes}&_sort=-date&_count={count}"
    return out


def prefetch_queries(patient_id: str, kb: KnowledgeBase | None = None) -> dict[str, str]:
    """The templates with the patient id filled in (what the service itself runs for missing keys)."""
    return {k: v.replace("{{context.patientId}}", patient_id) for k, v in prefetch_templates(kb).items()}


def discovery(kb: KnowledgeBase | None = None) -> dict[str, Any]:
    prefetch = prefetch_templates(kb)
    services = []
    for sid, svc in SERVICES.items():
        services.append({"hook": svc["hook"], "title": svc["title"], "description": svc["description"], "id": sid,
                         "prefetch": dict(prefetch), "usageRequirements": _USAGE})
    return {"services": services}


# ---------------------------------------------------------------------------------------------------------------
# The hook request


@dataclass(frozen=True)
class FhirAccess:
    """``fhirServer`` + ``fhirAuthorization``. The token is used for the calls of this one request and never
    stored or logged (spec "Trusting CDS Clients": tokens are transient)."""

    server: str
    access_token: str = field(repr=False)
    scope: str
    subject: str
    patient: str | None = None


@dataclass(frozen=True)
class HookRequest:
    service_id: str
    hook: str
    hook_instance: str
    patient_id: str
    user_id: str
    encounter_id: str | None
    draft_orders: Mapping[str, Any]
    selections: tuple[str, ...] | None
    prefetch: Mapping[str, Any]
    fhir: FhirAccess | None


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise CdsRequestError(message)


def parse_fhir_access(body: Mapping[str, Any]) -> FhirAccess | None:
    server = body.get("fhirServer")
    auth = body.get("fhirAuthorization")
    if auth is None:
        _need(server is None or isinstance(server, str), "fhirServer must be a URL string.")
        return None
    _need(isinstance(server, str) and bool(server), "fhirAuthorization was sent without fhirServer.")
    _need(isinstance(auth, dict), "fhirAuthorization must be an object.")
    token = auth.get("access_token")
    _need(isinstance(token, str) and bool(token), "fhirAuthorization.access_token is missing.")
    token_type = auth.get("token_type", "Bearer")
    _need(isinstance(token_type, str) and token_type.lower() == "bearer", "fhirAuthorization.token_type must be Bearer.")
    scope = auth.get("scope")
    _need(isinstance(scope, str), "fhirAuthorization.scope is missing.")
    subject = auth.get("subject")
    _need(isinstance(subject, str), "fhirAuthorization.subject is missing.")
    patient = auth.get("patient")
    _need(patient is None or isinstance(patient, str), "fhirAuthorization.patient must be a string.")
    return FhirAccess(server=server.rstrip("/"), access_token=token, scope=scope, subject=subject, patient=patient)


def parse_hook_request(body: Any, service_id: str) -> HookRequest:
    """Check a hook call (spec "HTTP Request" and the order-select / order-sign context tables)."""
    svc = SERVICES.get(service_id)
    if svc is None:
        raise CdsRequestError(f"There is no CDS service {service_id[:60]!r} here.", code="cds-unknown-service")
    _need(isinstance(body, dict), "The request body must be a JSON object.")
    hook = body.get("hook")
    _need(hook == svc["hook"], f"This service answers the {svc['hook']} hook, not {str(hook)[:40]!r}.")
    instance = body.get("hookInstance")
    _need(isinstance(instance, str) and 0 < len(instance) <= 128, "hookInstance (a UUID) is missing.")
    ctx = body.get("context")
    _need(isinstance(ctx, dict), "context is missing or not an object.")
    patient_id = ctx.get("patientId")
    _need(isinstance(patient_id, str) and bool(_FHIR_ID.match(patient_id)), "context.patientId is missing or not a "
          "FHIR id.")
    user_id = ctx.get("userId")
    _need(isinstance(user_id, str) and bool(_REF.match(user_id)),
          "context.userId must be a reference like Practitioner/123 or PractitionerRole/123.")
    encounter = ctx.get("encounterId")
    _need(encounter is None or (isinstance(encounter, str) and bool(_FHIR_ID.match(encounter))),
          "context.encounterId must be a FHIR id.")
    drafts = ctx.get("draftOrders")
    _need(isinstance(drafts, dict) and drafts.get("resourceType") == "Bundle",
          "context.draftOrders must be a FHIR Bundle.")
    entries = drafts.get("entry", [])
    _need(isinstance(entries, list), "context.draftOrders.entry must be a list.")
    selections = None
    if hook == "order-select":
        sel = ctx.get("selections")
        _need(isinstance(sel, list) and all(isinstance(s, str) for s in sel),
              "context.selections (a list of references like ServiceRequest/123) is required for order-select.")
        selections = tuple(sel)
    prefetch = body.get("prefetch", {})
    _need(prefetch is None or isinstance(prefetch, dict), "prefetch must be an object.")
    return HookRequest(service_id=service_id, hook=hook, hook_instance=instance, patient_id=patient_id,
                       user_id=user_id, encounter_id=encounter, draft_orders=drafts, selections=selections,
                       prefetch=prefetch or {}, fhir=parse_fhir_access(body))


# ---------------------------------------------------------------------------------------------------------------
# Which drafts are massage orders


@dataclass(frozen=True)
class MassageOrder:
    resource: Mapping[str, Any]
    ref: str | None  # "ServiceRequest/<id>" when the draft has an id
    techniques: tuple[str, ...]
    inferred_from: tuple[str, ...]  # CPT codes the techniques were inferred from ([] = coded techniques)
    sites: tuple[str, ...] | None  # SITE strings ("30021000:left"); None = no usable site = whole body
    site_notes: tuple[str, ...] = ()  # sites we could not map (the screen then assumed the whole body)


def order_sites(resource: Mapping[str, Any], kb: KnowledgeBase | None = None) -> tuple[tuple[str, ...] | None,
                                                                                         tuple[str, ...]]:
    """ServiceRequest.bodySite -> (SITE strings, notes). Laterality: a SNOMED laterality qualifier coding in the
    same concept, else a side word in its text/display (our builder writes "Left lower leg"), else unknown (both
    sides, the worst case). A site outside our list makes the whole order "whole body" (never a silent clear)."""
    kb = kb or _default_kb()
    concepts = resource.get("bodySite")
    if not isinstance(concepts, list) or not concepts:
        return None, ()
    out: list[str] = []
    notes: list[str] = []
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        laterality = None
        site_code = None
        words: list[str] = [str(concept.get("text") or "")]
        for c in C.codings(concept):
            code = c.get("code")
            if c.get("system") != C.SNOMED or not isinstance(code, str):
                continue
            if code in kb.laterality_codes:
                laterality = kb.laterality_codes[code]
            elif code in kb.sites and site_code is None:
                site_code = code
            words.append(str(c.get("display") or ""))
        if site_code is None:
            notes.append(str(concept.get("text") or next((c.get("display") or c.get("code") for c in
                                                           C.codings(concept)), "a body site")))
            continue
        if laterality is None:
            for text in words:
                for word in re.findall(r"[a-z]+", text.lower()):
                    if word in kb.text_laterality:
                        laterality = kb.text_laterality[word]
                        break
                if laterality:
                    break
        if not kb.sites[site_code].lateralizable:
            laterality = None
        out.append(str(Site(site_code, laterality)))
    if notes or not out:
        return None, tuple(notes)
    return tuple(dict.fromkeys(out)), ()


def _order_techniques(resource: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    code = resource.get("code")
    techniques = [c["code"] for c in C.codings(code) if c.get("system") == C.TECHNIQUE_SYSTEM
                  and c.get("code") in C.TECHNIQUES]
    if techniques:
        return tuple(dict.fromkeys(techniques)), ()
    cpts = [c["code"] for c in C.codings(code) if c.get("system") == C.CPT and c.get("code") in CPT_INFERRED]
    inferred: list[str] = []
    for cpt in cpts:
        inferred.extend(CPT_INFERRED[cpt][0])
    # keep the canonical technique order so card text is stable
    return tuple(t for t in C.TECHNIQUES if t in inferred), tuple(dict.fromkeys(cpts))


def massage_orders(request: HookRequest, kb: KnowledgeBase | None = None) -> list[MassageOrder]:
    """The draft ServiceRequests that are massage orders. order-select: only those named in ``selections``
    (spec: selections are the newly selected orders; the rest of draftOrders is context)."""
    out: list[MassageOrder] = []
    selected = set(request.selections) if request.selections is not None else None
    for entry in request.draft_orders.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "ServiceRequest":
            continue
        rid = res.get("id") if isinstance(res.get("id"), str) else None
        ref = f"ServiceRequest/{rid}" if rid else None
        if selected is not None:
            full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
            if not ((ref and ref in selected) or (full_url and full_url in selected)):
                continue
        techniques, inferred = _order_techniques(res)
        if not techniques:
            continue
        sites, notes = order_sites(res, kb)
        out.append(MassageOrder(resource=res, ref=ref, techniques=techniques, inferred_from=inferred, sites=sites,
                                site_notes=notes))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Prefetch -> resources


@dataclass(frozen=True)
class PrefetchResult:
    resources: list[dict[str, Any]]
    missing: tuple[str, ...]  # keys not prefetched (absent, or an OperationOutcome in their place)
    paged: dict[str, str]  # key -> next-page URL of a prefetched searchset that has more pages


def prefetch_resources(prefetch: Mapping[str, Any], kb: KnowledgeBase | None = None) -> PrefetchResult:
    """Split the prefetch into usable resources and the keys still to fetch.

    Spec "Prefetch": a key the client did not satisfy is omitted; ``null`` means the query found nothing (a read
    of a missing resource); an error is sent as an OperationOutcome. Absent and OperationOutcome both count as
    missing (never read as "nothing there" - a false all-clear is the one outcome a screen must not give)."""
    resources: list[dict[str, Any]] = []
    missing: list[str] = []
    paged: dict[str, str] = {}
    for key in prefetch_templates(kb):
        if key not in prefetch:
            missing.append(key)
            continue
        value = prefetch[key]
        if value is None:
            if key == "patient":
                missing.append(key)  # the chart cannot be built without the patient
            continue
        if not isinstance(value, dict) or value.get("resourceType") == "OperationOutcome":
            missing.append(key)
            continue
        if value.get("resourceType") == "Bundle":
            entries, links = value.get("entry"), value.get("link")
            for entry in entries if isinstance(entries, list) else []:
                res = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(res, dict) and res.get("resourceType") not in (None, "OperationOutcome"):
                    resources.append(res)
            for link in links if isinstance(links, list) else []:
                if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
                    paged[key] = link["url"]
        else:
            resources.append(value)
    return PrefetchResult(resources=resources, missing=tuple(missing), paged=paged)


# ---------------------------------------------------------------------------------------------------------------
# Cards

# GFM inline punctuation that can start emphasis, code, links/images, tables or strikethrough. Other ASCII
# punctuation (. - + ( ) >) only matters at the start of a line, handled below, so ordinary text stays readable in
# EHRs that show the markdown source instead of rendering it.
_MD_SPECIAL = set("\\`*_[]|~!#")
_LINE_START = re.compile(r"^(\s*)([-+>=]|\d+[.)])")


def md_escape(text: Any) -> str:
    """Text from the EHR (problem names, notes) made inert in GitHub-flavoured markdown: markdown punctuation is
    backslash-escaped (CommonMark "Backslash escapes"), ``<`` and ``&`` become entities so no HTML tag, comment,
    entity or autolink can form, line breaks become spaces (no headings, lists or tables from inside the text),
    and a leading list / quote / heading marker is escaped."""
    s = str(text)
    out = []
    for ch in s:
        if ch == "<":
            out.append("&lt;")
        elif ch == "&":
            out.append("&amp;")
        elif ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch in "\r\n\t\v\f" or ord(ch) < 32 or ord(ch) == 127:
            out.append(" ")
        else:
            out.append(ch)
    result = "".join(out)
    m = _LINE_START.match(result)
    if m:
        marker = m.group(2)
        result = m.group(1) + marker[:-1] + "\\" + marker[-1] + result[m.end():]
    return result


def code_span(text: Any) -> str:
    """An inline code span (nothing inside is interpreted; backslash escapes do not work there, so backticks and
    line breaks are replaced instead)."""
    s = re.sub(r"[\r\n\t`]", lambda m: "'" if m.group() == "`" else " ", str(text))
    return f"`{s}`"


def _title(finding: Any, kb: KnowledgeBase) -> str:
    return getattr(finding, "title", None) or _rule_title(kb, str(getattr(finding, "rule", "")))


def _rule_title(kb: KnowledgeBase, rule_id: str) -> str:
    rule = kb.rules.get(rule_id)
    if rule is None:
        return rule_id
    if rule.title:
        return rule.title
    parent = kb.rules.get(rule.parent) if rule.parent else None
    return parent.title if parent else rule_id


def _site_text(kb: KnowledgeBase, site: str) -> str:
    code, _, lat = site.partition(":")
    info = kb.sites.get(code)
    name = (info.display if info else f"body site {code}").lower()
    if not lat:
        return name
    if lat == "bilateral":
        return f"{name}, both sides"
    return f"{lat} {name}"


def _techniques_text(techniques: Iterable[str]) -> str:
    wanted = set(techniques)
    ts = [t for t in C.TECHNIQUES if t in wanted]
    if len(ts) == len(C.TECHNIQUES):
        return "all techniques"
    return ", ".join(C.TECHNIQUE_DISPLAY[t].lower() if i else C.TECHNIQUE_DISPLAY[t] for i, t in enumerate(ts))


def _as_site(value: Any) -> Site:
    if isinstance(value, Site):
        return value
    code, _, lat = str(value).partition(":")
    return Site(code, lat or None)


def _finding_sites(finding: Any) -> tuple[str, ...]:
    return tuple(str(s) for s in (getattr(finding, "sites", None) or ()))


def _finding_techniques(finding: Any) -> frozenset[str]:
    t = getattr(finding, "techniques", None)
    if t in (None, "*"):
        return frozenset(C.TECHNIQUES)
    return frozenset(t)


def _applies(finding: Any, order: MassageOrder) -> bool:
    fn = getattr(finding, "applies_to", None)
    if callable(fn):
        return bool(fn(order.techniques, order.sites))
    return bool(_finding_techniques(finding).intersection(order.techniques))


def summary_for(finding: Any, kb: KnowledgeBase | None = None) -> str:
    """``"<class>: <rule title> (<sites>)"``, cut to the spec's < 140 characters."""
    kb = kb or _default_kb()
    cls = getattr(finding, "cls", "relative")
    title = _title(finding, kb)
    text = f"{CLASS_LABEL.get(cls, 'Contraindication')}: {title}"
    sites = [s for s in _finding_sites(finding) if s.split(":")[0] != kb.root_site]
    if sites:
        text += " (" + "; ".join(_site_text(kb, s) for s in sites[:2]) + ")"
    if len(text) > SUMMARY_MAX:
        text = text[: SUMMARY_MAX - 1].rstrip() + "…"
    return text


def _detail_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_detail_value(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_detail_value(v)}" for k, v in value.items())
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _evidence_md(ev: Any) -> str:
    """One screening.Evidence: reference, what it is, dates, value, status, the matched code and its tag."""
    if isinstance(ev, Mapping):
        ref, display = ev.get("ref"), ev.get("display")
        dates, value, unit = ev.get("dates") or {}, ev.get("value"), ev.get("unit")
        status, note, code = ev.get("status"), ev.get("note"), ev.get("code")
    else:
        ref, display = getattr(ev, "ref", None), getattr(ev, "display", None)
        dates, value, unit = getattr(ev, "dates", None) or {}, getattr(ev, "value", None), getattr(ev, "unit", None)
        status, note, code = getattr(ev, "status", None), getattr(ev, "note", None), getattr(ev, "code", None)
    parts = []
    if ref:
        parts.append(code_span(ref))
    if display:
        parts.append(md_escape(display))
    bits = []
    if value is not None:
        # the unit as a clinician reads it ("38.9 °C", not UCUM's "38.9 Cel"): fhir_massage.units
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        shown = quantity_text(value, unit) if number else f"{_detail_value(value)} {unit_text(unit)}".strip()
        bits.append(f"value {shown}")
    for k, v in (dates.items() if isinstance(dates, Mapping) else ()):
        bits.append(f"{k} {_detail_value(v)}")
    if status:
        bits.append(str(status))
    if bits:
        parts.append("(" + md_escape(", ".join(bits)) + ")")
    if code is not None:
        c = code if isinstance(code, Mapping) else {"system": getattr(code, "system", ""), "code": getattr(
            code, "code", ""), "tag": getattr(code, "tag", ""), "verified": getattr(code, "verified", True)}
        system = {C.SNOMED: "SNOMED CT", C.ICD10CM: "ICD-10-CM", C.RXNORM: "RxNorm", C.LOINC: "LOINC"}.get(
            str(c.get("system")), str(c.get("system") or ""))
        text = f"matched {system} {c.get('code')} {c.get('tag') or ''}".strip()
        if c.get("verified") is False:
            text += ", code not verified"
        parts.append("- " + md_escape(text))
    if note:
        parts.append("- " + md_escape(note))
    return " ".join(parts) or "(no details)"


def _detail(finding: Any, order: MassageOrder, kb: KnowledgeBase, fetched_note: str | None) -> str:
    rule_id = getattr(finding, "rule", "")
    cls = getattr(finding, "cls", "relative")
    lines = [f"**{md_escape(_title(finding, kb))}**: {CLASS_LABEL.get(cls, cls).lower()} "
             f"({md_escape(CLASS_MEANING.get(cls, ''))}).", ""]
    message = getattr(finding, "message", "") or ""
    if message:
        lines += [md_escape(message), ""]
    hit = sorted(_finding_techniques(finding).intersection(order.techniques), key=C.TECHNIQUES.index)
    ordered = f"{md_escape(_techniques_text(hit))}"
    if order.inferred_from:
        ordered += (f" (inferred from CPT {', '.join(order.inferred_from)}: the order names no technique, so every "
                    "technique that code commonly bills was screened; mapping uncertain \\[B\\])")
    lines.append(f"- Ordered technique(s) affected: {ordered}")
    fsites = [s for s in _finding_sites(finding) if s.split(":")[0] != kb.root_site]
    if fsites:
        lines.append("- Where: " + md_escape("; ".join(_site_text(kb, s) for s in fsites)))
    if order.sites is None:
        note = "- Order site: none given, screened as the whole body"
        if order.site_notes:
            note += " (not recognised: " + md_escape("; ".join(order.site_notes)) + ")"
        lines.append(note)
        if fsites:
            # no suggestion can leave out a site of an order that names none: say what would clear the card
            lines.append("- To treat elsewhere, name the body sites in the order (without the affected area); "
                         "the screen then checks them")
    details = getattr(finding, "details", None) or ()
    shown: set[str] = set()
    if isinstance(details, Mapping):
        for key, value in details.items():
            if value in (None, "", [], {}):
                continue
            label = str(key).replace("_", " ")
            lines.append(f"- {md_escape(label.capitalize())}: {md_escape(_detail_value(value))}")
    else:
        for ev in details:
            lines.append("- Chart evidence: " + _evidence_md(ev))
            shown.add(str(getattr(ev, "ref", "")))
    for ref in getattr(finding, "evidence", None) or ():
        if str(ref) not in shown:
            lines.append(f"- Chart evidence: {code_span(ref)}")
    if getattr(finding, "unconfirmed", False):
        lines.append("- The chart entry is unconfirmed (provisional or differential diagnosis)")
    lines += _rule_lines(finding, rule_id, kb, fetched_note)
    return "\n".join(lines)


def _technique_code(resource: Mapping[str, Any], techniques: Sequence[str]) -> dict[str, Any]:
    """``code`` for ``techniques``: CPT codings (codes.TECHNIQUE_CPT), our technique codings, other codings kept.
    The text is rebuilt afterwards (``_retext``) from the whole updated resource."""
    cpts: list[str] = []
    for t in techniques:
        cpt = C.TECHNIQUE_CPT[t][0]
        if cpt not in cpts:
            cpts.append(cpt)
    old = resource.get("code") if isinstance(resource.get("code"), dict) else {}
    other = [c for c in C.codings(old) if c.get("system") not in (C.CPT, C.TECHNIQUE_SYSTEM)]
    return {"coding": [C.coding(C.CPT, c, C.CPT_DISPLAY.get(c)) for c in cpts]
            + [C.coding(C.TECHNIQUE_SYSTEM, t, C.TECHNIQUE_DISPLAY[t]) for t in techniques] + other}


def _rule_lines(item: Any, rule_id: str, kb: KnowledgeBase, fetched_note: str | None) -> list[str]:
    """The closing lines of a card's detail, for a finding and an information item alike: the evidence class,
    the rule's evidence tag, the clinical source, the rule id with the knowledge base version, the fetch note."""
    lines: list[str] = []
    ev_class = getattr(item, "evidence_class", None)
    if ev_class:
        lines.append(f"- Evidence class: {md_escape(EVIDENCE_LABEL.get(ev_class, ev_class))}")
    rule = kb.rules.get(rule_id)
    if rule is not None and rule.tag:
        lines.append(f"- Rule evidence tag: {md_escape(rule.tag)}")
    source = getattr(item, "source", None)
    if source:
        lines.append(f"- Source: {md_escape(source)}")
    lines.append(f"- Rule: {code_span(rule_id)} (knowledge base {md_escape(kb.version)})")
    if fetched_note:
        lines.append(f"- {md_escape(fetched_note)}")
    return lines

def _is_detail(d: Any, code_prefix: str) -> bool:
    return isinstance(d, dict) and any(c.get("system") == C.ORDER_DETAIL_SYSTEM
                                       and str(c.get("code", "")).startswith(code_prefix) for c in C.codings(d))


def _with_pressure(resource: dict[str, Any], pressure: str) -> dict[str, Any]:
    """Replace the order's pressure detail (builders.order.order_details: ``pressure-<level>``, text "<Level>
    pressure[: note]"); the physician's note after the colon is kept."""
    label = f"{pressure.capitalize()} pressure"
    text = label
    details = []
    for d in resource.get("orderDetail") or []:
        if _is_detail(d, "pressure-"):
            old = str(d.get("text") or "")
            if ":" in old and old.split(":", 1)[1].strip():
                text = f"{label}: {old.split(':', 1)[1].strip()}"
            continue
        details.append(d)
    details.append({"coding": [C.coding(C.ORDER_DETAIL_SYSTEM, f"pressure-{pressure}", label)], "text": text})
    resource["orderDetail"] = details
    return resource


def _order_sites_text(resource: Mapping[str, Any]) -> str | None:
    texts = [str(bs.get("text") or next((c.get("display") for c in C.codings(bs) if c.get("display")), ""))
             for bs in resource.get("bodySite") or [] if isinstance(bs, dict)]
    texts = [t for t in texts if t]
    return "; ".join(texts) or None


PRECAUTIONS_PREFIX = "Precautions: "  # builders.order.precautions_text: the order details other than the schedule


def _retext(resource: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the human-readable text of an updated order from its content, so that no text still names a site
    or technique that was taken out: ``code.text`` ("<techniques>: <sites>", as builders.order.code_text and the
    sandbox's order entry write it; CPT displays when the order names no technique) and the app's
    "Precautions: ..." note (builders.order.precautions_text, from the order details). The schedule texts
    (``occurrenceTiming.code.text``, the schedule orderDetail) and each ``bodySite.text`` describe content a
    suggestion never changes, so they stay as they are."""
    code = resource.get("code")
    if isinstance(code, dict):
        techs = [str(c["code"]) for c in C.codings(code) if c.get("system") == C.TECHNIQUE_SYSTEM
                 and c.get("code") in C.TECHNIQUE_DISPLAY]
        if techs:
            what = " + ".join(C.TECHNIQUE_DISPLAY[t] for t in dict.fromkeys(techs))
        else:
            what = " + ".join(dict.fromkeys(
                str(C.CPT_DISPLAY.get(str(c.get("code"))) or c.get("display") or f"CPT {c.get('code')}")
                for c in C.codings(code) if c.get("system") == C.CPT))
        if what:
            where = _order_sites_text(resource)
            code["text"] = f"{what}: {where}" if where else what
    notes = resource.get("note")
    if isinstance(notes, list):
        parts = [str(d["text"]) for d in resource.get("orderDetail") or []
                 if isinstance(d, dict) and d.get("text") and not _is_detail(d, "schedule")]
        out = []
        for n in notes:
            if isinstance(n, dict) and str(n.get("text") or "").startswith(PRECAUTIONS_PREFIX):
                if not parts:
                    continue  # nothing left to take care of: the note would be empty
                n = {**n, "text": PRECAUTIONS_PREFIX + "; ".join(parts) + "."}
            out.append(n)
        if out:
            resource["note"] = out
        else:
            resource.pop("note", None)
    return resource


def _concept_site(concept: Mapping[str, Any], kb: KnowledgeBase) -> str | None:
    sites, _notes = order_sites({"bodySite": [concept]}, kb)
    return sites[0] if sites else None


def _drop_body_structures(resource: dict[str, Any], dropped_texts: set[str]) -> None:
    # builders.order.target_body_structures: one extension per lateral site, its display = the site's text. A
    # site taken out of bodySite must not stay targeted through its BodyStructure.
    ext = resource.get("extension")
    if not isinstance(ext, list):
        return
    keep = [e for e in ext if not (isinstance(e, dict) and e.get("url") == TARGET_BODY_STRUCTURE
                                   and str((e.get("valueReference") or {}).get("display") or "") in dropped_texts)]
    if keep:
        resource["extension"] = keep
    else:
        resource.pop("extension", None)


TARGET_BODY_STRUCTURE = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"  # builders.order


def resolves(finding: Any, resource: Mapping[str, Any], kb: KnowledgeBase | None = None) -> bool:
    """Would ``finding`` no longer apply to the order ``resource`` once it is screened again? The screen's
    findings come from the chart alone (screening.screen: the proposal only decides which findings apply), so a
    re-screen of the same chart gives the same finding and this test is exactly the re-screen's."""
    kb = kb or _default_kb()
    techniques, _inferred = _order_techniques(resource)
    if not techniques:
        return True  # no longer a massage order at all
    sites, _notes = order_sites(resource, kb)
    fn = getattr(finding, "applies_to", None)
    if callable(fn):
        return not fn(techniques, sites)
    return not _finding_techniques(finding).intersection(techniques)


def _suggestions(finding: Any, order: MassageOrder, request: HookRequest, kb: KnowledgeBase, now: datetime,
                 new_uuid: Callable[[], str]) -> list[dict[str, Any]]:
    """Suggestions for one card. Every ``update`` is checked with ``resolves``: applied and screened again, the
    order no longer meets the card's finding (a suggestion that leaves the finding in place is never offered:
    the screen reads techniques and sites, not pressure, so "lighter pressure" alone would bring the same card
    back). The clearance Task does not change the order and says so in its label."""
    if order.ref is None:
        return []  # nothing to update or focus: the draft has no id
    cls = getattr(finding, "cls", "relative")
    ftech = _finding_techniques(finding)
    fsites = [s for s in _finding_sites(finding)]
    site_scoped = bool(fsites) and any(s.split(":")[0] != kb.root_site for s in fsites)
    out: list[dict[str, Any]] = []
    offered: list[dict[str, Any]] = []
    base = dict(order.resource)

    def update(label: str, resource: dict[str, Any], description: str) -> None:
        resource = _retext(resource)
        if resource in offered or not resolves(finding, resource, kb):
            return
        offered.append(resource)
        out.append({"label": label, "uuid": new_uuid(), "actions": [
            {"type": "update", "description": description, "resource": resource}]})

    # 1. exclude the site(s) (site-scoped findings). Each bodySite is matched on its own: order.sites is
    #    de-duplicated, so it does not line up with the bodySite list.
    if site_scoped and order.sites:
        fs = [_as_site(s) for s in fsites]
        keep, drop = [], []
        for concept in (bs for bs in base.get("bodySite") or [] if isinstance(bs, dict)):
            site = _concept_site(concept, kb)
            (drop if site is None or any(kb.overlaps(_as_site(site), f) for f in fs) else keep).append(concept)
        if drop and keep:
            res = copy.deepcopy(base)
            res["bodySite"] = keep
            texts = [str(c.get("text") or "") for c in drop]
            _drop_body_structures(res, {t for t in texts if t})
            where = "; ".join(t for t in texts if t) or "the affected site"
            update(f"Remove {where} from the order", res, f"Update the draft order without {where}.")

    affected = [t for t in order.techniques if t in ftech]
    remaining = [t for t in order.techniques if t not in ftech]
    # 2. drop the affected technique(s) when others remain
    if affected and remaining:
        res = copy.deepcopy(base)
        res["code"] = _technique_code(res, remaining)
        update(f"Remove {_techniques_text(affected).lower()} from the order", res,
               f"Update the draft order to {_techniques_text(remaining).lower()} only.")
    # 3. light Swedish massage in place of the affected techniques, when the rule does not concern Swedish
    #    massage. That is the rules' own modification (knowledge/rules.json messages, e.g. anticoagulant: "light
    #    to moderate Swedish ... acceptable", NCCIH/Mayo [V2], CONS; bleeding disorder: "light pressure only");
    #    the rule's techniques list is the data that says Swedish is spared. The light-pressure detail tells the
    #    therapist; the technique change is what the screen sees.
    if affected and "swedish" not in ftech:
        techniques = list(dict.fromkeys("swedish" if t in ftech else t for t in order.techniques))
        res = _with_pressure(copy.deepcopy(base), "light")
        res["code"] = _technique_code(res, techniques)
        if techniques == ["swedish"]:
            label = "Change to light-pressure Swedish massage"
        elif "swedish" in order.techniques:
            label = f"Remove {_techniques_text(affected).lower()}, Swedish massage at light pressure"
        else:
            label = f"Replace {_techniques_text(affected).lower()} with light-pressure Swedish massage"
        update(label, res, f"Update the draft order to {_techniques_text(techniques).lower()} at light pressure.")

    # 4. physician clearance (task-code "approve", focus = the draft order). It changes nothing in the order, so
    #    the card stays until it is overridden with the clearance as its reason; the label says so.
    if cls in ("absolute", "relative"):
        title = _title(finding, kb)
        task = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {"coding": [C.coding(C.TASK_CODE, "approve", "Activate/approve the focal resource")]},
            "description": f"Physician clearance requested before this massage order: {title}.",
            "focus": {"reference": order.ref},
            "for": {"reference": f"Patient/{request.patient_id}"},
            "authoredOn": now.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "requester": {"reference": request.user_id},
        }
        if request.encounter_id:
            task["encounter"] = {"reference": f"Encounter/{request.encounter_id}"}
        out.append({"label": CLEARANCE_LABEL, "uuid": new_uuid(), "actions": [
            {"type": "create", "description": "Create a clearance request (Task) for this order. The order itself "
                                              "is not changed, so this card stays until it is overridden.",
             "resource": task}]})

    # 5. remove the order (absolute findings)
    if cls == "absolute":
        out.append({"label": "Remove this massage order", "uuid": new_uuid(), "actions": [
            {"type": "delete", "description": "Delete the draft massage order.", "resourceId": order.ref}]})
    if out and cls == "absolute":
        out[0]["isRecommended"] = True
    return out


CLEARANCE_LABEL = "Request physician clearance (the order is not changed)"
APP_CONTEXT_AREAS = ("orders",)
APP_CONTEXT_MAX = 2048


def app_context(*, patient_id: str, order_ref: str | None, rule_id: str | None) -> str:
    """The ``appContext`` of a card's smart link (CDS Hooks 2.0 "Link": a string the EHR hands to the app with
    its access token). Our format, documented in docs/cds-hooks.md: a JSON object ``{"area": "orders",
    "patient": <id>, "rule": <rule id>, "serviceRequest": "ServiceRequest/<id>"}`` (``rule`` and
    ``serviceRequest`` only when known)."""
    ctx: dict[str, Any] = {"area": "orders", "patient": patient_id}
    if rule_id:
        ctx["rule"] = rule_id
    if order_ref:
        ctx["serviceRequest"] = order_ref
    return json.dumps(ctx, separators=(",", ":"))


@dataclass(frozen=True)
class AppContext:
    area: str
    rule: str | None  # a rule id of the knowledge base (to highlight), None when absent or unknown
    service_request: str | None


def parse_app_context(raw: Any, *, patient_id: str | None, kb: KnowledgeBase | None = None) -> AppContext | None:
    """Read an appContext from a launch. ``None`` (so the app lands as usual) for anything that is not ours or
    does not fit this launch: not a JSON object, too long, an unknown area, or a ``patient`` that is not the
    launch's patient (a card about another patient must never steer this chart). Never raises."""
    kb = kb or _default_kb()
    if not isinstance(raw, str) or not raw or len(raw) > APP_CONTEXT_MAX:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("area") not in APP_CONTEXT_AREAS:
        return None
    if not patient_id or data.get("patient") != patient_id:
        return None
    rule = data.get("rule")
    rule = rule if isinstance(rule, str) and rule in kb.rules else None
    sr = data.get("serviceRequest")
    sr = sr if isinstance(sr, str) and re.fullmatch(r"ServiceRequest/[A-Za-z0-9\-.]{1,64}", sr) else None
    return AppContext(area=data["area"], rule=rule, service_request=sr)


def _link(launch_url: str | None, request: HookRequest, order: MassageOrder | None,
          rule_id: str | None) -> list[dict[str, Any]]:
    if not launch_url:
        return []
    return [{"label": "Open the massage screen (fhir-massage)", "url": launch_url, "type": "smart",
             "appContext": app_context(patient_id=request.patient_id, order_ref=order.ref if order else None,
                                       rule_id=rule_id)}]


def _override_reasons() -> list[dict[str, str]]:
    return [C.coding(OVERRIDE_REASON_SYSTEM, code, display) for code, display in OVERRIDE_REASONS]


def _finding_json(finding: Any) -> Any:
    fn = getattr(finding, "to_json", None)
    if callable(fn):
        try:
            return fn()
        except Exception:  # a finding that cannot serialise still gets its card
            return None
    return None


def build_cards(
    orders: Sequence[MassageOrder],
    screenings: Mapping[int, Any],
    *,
    request: HookRequest,
    now: datetime,
    launch_url: str | None = None,
    source_url: str | None = None,
    new_uuid: Callable[[], str] = lambda: str(_uuid.uuid4()),
    fetched_note: str | None = None,
    kb: KnowledgeBase | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Cards for the screenings (``screenings[i]`` is the Screening of ``orders[i]``), most severe first, and the
    per-card records the feedback endpoint needs (``{card uuid: record}``).

    One card per finding that applies to the order's techniques and sites (``Finding.applies_to``). A screening
    that could not decide (``needs_review``) adds one warning card per order: unreadable chart items must be
    looked at by a person, never read as "clear". Each information item (``Screening.information``: an allergy
    to a massage product) adds one ``info`` card for the request, after the others: it concerns the patient, not
    one order, and asks for nothing (no suggestions, no override reasons)."""
    kb = kb or _default_kb()
    cards: list[tuple[int, dict[str, Any]]] = []
    records: dict[str, dict[str, Any]] = {}
    rank = {"absolute": 0, "relative": 1, "local": 2}
    informed: set[str] = set()
    for i, order in enumerate(orders):
        screening = screenings.get(i)
        if screening is None:
            continue
        for item in getattr(screening, "information", None) or ():
            rule_id = str(getattr(item, "rule", ""))
            if rule_id in informed or not _applies(item, order):
                continue
            informed.add(rule_id)
            card = information_card(item, order, kb=kb, new_uuid=new_uuid, fetched_note=fetched_note)
            cards.append((3, card))
            records[card["uuid"]] = {
                "service": request.service_id, "hookInstance": request.hook_instance,
                "patientId": request.patient_id, "userId": request.user_id, "order": order.ref, "rule": rule_id,
                # no finding: feedback on an information card is recorded, never written as a DetectedIssue
                "cls": "information", "summary": card["summary"], "finding": None, "suggestions": {},
            }
        for finding in getattr(screening, "findings", None) or ():
            if not _applies(finding, order):
                continue
            cls = getattr(finding, "cls", "relative")
            rule_id = str(getattr(finding, "rule", ""))
            card_id = new_uuid()
            card: dict[str, Any] = {
                "uuid": card_id,
                "summary": summary_for(finding, kb),
                "indicator": CLASS_INDICATOR.get(cls, "warning"),
                "detail": _detail(finding, order, kb, fetched_note),
                "source": {"label": SOURCE_LABEL,
                           "topic": C.coding(CARD_TOPIC_SYSTEM, rule_id, _title(finding, kb))},
            }
            url = source_url or getattr(finding, "reference", None) or (
                kb.rules[rule_id].reference if rule_id in kb.rules else None)
            if url:
                card["source"]["url"] = url
            suggestions = _suggestions(finding, order, request, kb, now, new_uuid)
            if suggestions:
                card["suggestions"] = suggestions
                card["selectionBehavior"] = "at-most-one"
            card["overrideReasons"] = _override_reasons()
            links = _link(launch_url, request, order, rule_id)
            if links:
                card["links"] = links
            cards.append((rank.get(cls, 1), card))
            records[card_id] = {
                "service": request.service_id, "hookInstance": request.hook_instance,
                "patientId": request.patient_id, "userId": request.user_id, "order": order.ref, "rule": rule_id,
                "cls": cls, "summary": card["summary"], "finding": _finding_json(finding),
                "suggestions": {s["uuid"]: s["label"] for s in suggestions},
            }
        review = needs_review_card(screening, order, request=request, launch_url=launch_url, new_uuid=new_uuid)
        if review is not None:
            cards.append((1, review))
            records[review["uuid"]] = {
                "service": request.service_id, "hookInstance": request.hook_instance,
                "patientId": request.patient_id, "userId": request.user_id, "order": order.ref,
                "rule": "needs-review", "cls": "review", "summary": review["summary"], "finding": None,
                "suggestions": {},
            }
    cards.sort(key=lambda rc: rc[0])
    return [c for _, c in cards], records


def information_card(item: Any, order: MassageOrder, *, kb: KnowledgeBase | None = None,
                     new_uuid: Callable[[], str] = lambda: str(_uuid.uuid4()),
                     fetched_note: str | None = None) -> dict[str, Any]:
    """The ``info`` card for one information item of a screening (screening.Screening.information): what the
    therapist must know (e.g. a latex allergy), with its chart evidence, evidence class and source."""
    kb = kb or _default_kb()
    rule_id = str(getattr(item, "rule", ""))
    title = _title(item, kb)
    summary = f"For your information: {title}"
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1].rstrip() + "…"
    lines = [f"**{md_escape(title)}**: for your information, not a contraindication (it does not change the "
             "screening verdict and needs no acknowledgement).", ""]
    message = getattr(item, "message", "") or ""
    if message:
        lines += [md_escape(message), ""]
    shown: set[str] = set()
    for ev in getattr(item, "details", None) or ():
        lines.append("- Chart evidence: " + _evidence_md(ev))
        shown.add(str(getattr(ev, "ref", "")))
    for ref in getattr(item, "evidence", None) or ():
        if str(ref) not in shown:
            lines.append(f"- Chart evidence: {code_span(ref)}")
    if getattr(item, "unconfirmed", False):
        lines.append("- The chart entry is unconfirmed")
    lines += _rule_lines(item, rule_id, kb, fetched_note)
    card: dict[str, Any] = {
        "uuid": new_uuid(),
        "summary": summary,
        "indicator": "info",
        "detail": "\n".join(lines),
        "source": {"label": SOURCE_LABEL, "topic": C.coding(CARD_TOPIC_SYSTEM, rule_id, title)},
    }
    rule = kb.rules.get(rule_id)
    url = getattr(item, "reference", None) or (rule.reference if rule is not None else None)
    if url:
        card["source"]["url"] = url
    return card


def _review_items(screening: Any) -> list[str]:
    items = getattr(screening, "needs_review", None) or ()
    if isinstance(items, bool):
        return ["The chart holds items the screen could not read."] if items else []
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            what = item.get("evidence") or item.get("ref")
            why = item.get("reason") or item.get("message") or item.get("text")
            out.append(f"{what}: {why}" if what and why else str(why or what or "a chart item"))
        else:
            out.append(str(getattr(item, "message", None) or getattr(item, "text", None) or item))
    return out


def needs_review_card(screening: Any, order: MassageOrder, *, request: HookRequest, launch_url: str | None,
                      new_uuid: Callable[[], str]) -> dict[str, Any] | None:
    items = _review_items(screening)
    if not items:
        return None
    lines = ["The screen found chart entries it could not classify (free text, unknown codes). They may hide a "
             "contraindication; review them before signing.", ""]
    lines += [f"- {md_escape(t)}" for t in items[:20]]
    if len(items) > 20:
        lines.append(f"- … and {len(items) - 20} more")
    card = {
        "uuid": new_uuid(),
        "summary": f"Review needed: {len(items)} chart item(s) could not be screened automatically"[:SUMMARY_MAX],
        "indicator": "warning",
        "detail": "\n".join(lines),
        "source": {"label": SOURCE_LABEL, "topic": C.coding(CARD_TOPIC_SYSTEM, "needs-review", "Needs review")},
        "overrideReasons": _override_reasons(),
    }
    links = _link(launch_url, request, order, None)
    if links:
        card["links"] = links
    return card


# ---------------------------------------------------------------------------------------------------------------
# Feedback


@dataclass(frozen=True)
class FeedbackItem:
    card: str
    outcome: str  # accepted | overridden
    accepted_suggestions: tuple[str, ...]
    reason: Mapping[str, Any] | None  # overrideReason.reason (a Coding)
    comment: str | None
    timestamp: str


_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def parse_feedback(body: Any) -> list[FeedbackItem]:
    """Spec "Feedback": ``{"feedback": [{card, outcome, acceptedSuggestions?, overrideReason?,
    outcomeTimestamp}]}``."""
    _need(isinstance(body, dict), "The feedback body must be a JSON object.")
    items = body.get("feedback")
    _need(isinstance(items, list) and bool(items), "feedback must be a non-empty list.")
    out = []
    for n, item in enumerate(items[:100]):
        _need(isinstance(item, dict), f"feedback[{n}] must be an object.")
        card = item.get("card")
        _need(isinstance(card, str) and 0 < len(card) <= 128, f"feedback[{n}].card (the card's uuid) is missing.")
        outcome = item.get("outcome")
        _need(outcome in ("accepted", "overridden"), f"feedback[{n}].outcome must be accepted or overridden.")
        ts = item.get("outcomeTimestamp")
        _need(isinstance(ts, str) and bool(_INSTANT.match(ts)), f"feedback[{n}].outcomeTimestamp must be an instant "
              "like 2026-11-28T10:00:00Z.")
        accepted = item.get("acceptedSuggestions") or []
        _need(isinstance(accepted, list) and all(isinstance(a, dict) and isinstance(a.get("id"), str)
                                                 for a in accepted),
              f"feedback[{n}].acceptedSuggestions must be a list of {{\"id\": ...}}.")
        reason = comment = None
        override = item.get("overrideReason")
        if override is not None:
            _need(isinstance(override, dict), f"feedback[{n}].overrideReason must be an object.")
            reason = override.get("reason")
            _need(reason is None or (isinstance(reason, dict) and isinstance(reason.get("code"), str)),
                  f"feedback[{n}].overrideReason.reason must be a Coding.")
            comment = override.get("userComment")
            _need(comment is None or isinstance(comment, str), f"feedback[{n}].overrideReason.userComment must be "
                  "text.")
        out.append(FeedbackItem(card=card, outcome=outcome, accepted_suggestions=tuple(a["id"] for a in accepted),
                                reason=reason, comment=(comment or "")[:1000] or None, timestamp=ts))
    return out


def finding_from_json(data: Mapping[str, Any]) -> Any:
    """A ``screening.Finding`` back from ``Finding.to_json()`` (what the card record keeps), for the DetectedIssue
    an override becomes. Matched-code details are not restored (the DetectedIssue does not carry them)."""
    from .screening import Evidence, Finding

    details = []
    for d in data.get("details") or []:
        if isinstance(d, Mapping):
            details.append(Evidence(ref=str(d.get("ref", "")), display=str(d.get("display", "")),
                                    status=d.get("status"), dates=dict(d.get("dates") or {}), value=d.get("value"),
                                    unit=d.get("unit"), note=d.get("note"), unconfirmed=bool(d.get("unconfirmed"))))
    return Finding(
        rule=str(data["rule"]), cls=str(data.get("class", "relative")),
        techniques=tuple(data.get("techniques") or ()), sites=tuple(_as_site(s) for s in data.get("sites") or ()),
        evidence=tuple(data.get("evidence") or ()), message=str(data.get("message", "")),
        evidence_class=str(data.get("evidenceClass", "")), source=str(data.get("source", "")),
        verified=bool(data.get("verified", False)), details=tuple(details), title=str(data.get("title", "")),
        act_code=str(data.get("actCode", "COND")), reference=data.get("reference"), tag=str(data.get("tag", "")),
        unconfirmed=bool(data.get("unconfirmed")), informational=bool(data.get("informational")),
    )


def override_mitigation(item: FeedbackItem, *, author_ref: str | None) -> dict[str, Any]:
    """The DetectedIssue.mitigation entry for an overridden card: the reason as a Coding of our override-reason
    CodeSystem (the v3 ActDetectedIssueManagementCode codes do not say "overridden with clearance"), the comment
    in the text, the EHR's outcome time as ``date``."""
    reason = item.reason or {}
    display = reason.get("display") or dict(OVERRIDE_REASONS).get(str(reason.get("code")), "")
    text = "Overridden in the EHR's order entry"
    if display:
        text += f": {display}"
    if item.comment:
        text += f". Comment: {item.comment}"
    action: dict[str, Any] = {"text": text}
    if reason.get("code"):
        action["coding"] = [{k: v for k, v in (("system", reason.get("system")), ("code", reason.get("code")),
                                               ("display", display or None)) if v}]
    out: dict[str, Any] = {"action": action, "date": item.timestamp}
    if author_ref:
        out["author"] = {"reference": author_ref}
    return out
