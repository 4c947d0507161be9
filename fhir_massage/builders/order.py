"""The order: OrderDraft -> ServiceRequest + fulfilment Task + Provenance (+ the screening's DetectedIssues), as one
idempotent transaction Bundle.

Shapes follow reference/fhir-modelling.md ("The order", "Workflow: Task", "Authorship: Provenance"):

* Idempotency: every entry is a conditional create (http.html#ccreate, ``ifNoneExist: identifier=system|value``)
  with identifiers derived from the app's ``draft_id``, so re-sending the same Bundle after a lost answer creates
  nothing new; fullUrls are urn:uuids derived from the draft id too, so the same draft gives the same Bundle.
  Inside a transaction, references to the fullUrl of a conditional create that matched an existing resource are
  rewritten to that resource (http.html#trules), so the links stay right on a retry.
* Provenance has no ``identifier`` element in R4, so it cannot be a conditional create on identifier; it is
  written with ``PUT Provenance/<id derived from the draft id>`` (update as create), see ``provenance_entry``
  for the other modes.
* Laterality (a left knee): the SNOMED site goes in ``bodySite`` with ``text`` "Left knee" (the minimum the
  reference asks for), and a ``BodyStructure`` (location + locationQualifier) is linked with the
  ``procedure-targetBodyStructure`` extension [V] when the server takes BodyStructure writes
  (``body_structures=True``) - one BodyStructure per patient and site, shared by the order and every session.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from ..codes import (
    CANONICAL_BASE,
    CPT,
    CPT_DISPLAY,
    IDENTIFIER_BASE,
    NUCC,
    NUCC_MASSAGE_THERAPIST,
    ORDER_DETAIL_SYSTEM,
    PROVENANCE_PARTICIPANT_TYPE,
    SNOMED,
    TASK_CODE,
    TASK_IO_SYSTEM,
    TECHNIQUE_CPT,
    TECHNIQUE_DISPLAY,
    TECHNIQUE_SYSTEM,
    DATA_OPERATION,
    UCUM,
    US_CORE_PROVENANCE_PARTICIPANT_TYPE,
    coding,
)
from ..errors import InvalidInput
from ..fhir import request_entry, transaction_bundle
from ..orders_model import LATERALITIES, OrderDraft, Schedule, Site, order_problems

ORDER_ID_SYSTEM = f"{IDENTIFIER_BASE}/order-draft"
REQUISITION_ID_SYSTEM = f"{IDENTIFIER_BASE}/order-requisition"
TASK_ID_SYSTEM = f"{IDENTIFIER_BASE}/order-task"
FINDING_ID_SYSTEM = f"{IDENTIFIER_BASE}/order-finding"
BODY_STRUCTURE_ID_SYSTEM = f"{IDENTIFIER_BASE}/body-structure"
APP_ID_SYSTEM = f"{IDENTIFIER_BASE}/app"
TARGET_BODY_STRUCTURE = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"  # [V] R4 extension
CATEGORY_PT = coding(SNOMED, "91251008", "Physical therapy procedure (regime/therapy)")  # [V] reference
APP_NAME = "fhir-massage"
_PROFILE = f"{CANONICAL_BASE}/StructureDefinition/"
PROFILES = {  # our profiles (profiles/input/fsh/profiles.fsh), declared in meta.profile of what we write
    "ServiceRequest": _PROFILE + "massage-service-request",
    "Procedure": _PROFILE + "massage-procedure",
    "DetectedIssue": _PROFILE + "massage-contraindication",
    "Observation": _PROFILE + "massage-pain-score",
    "CarePlan": _PROFILE + "massage-plan",
    "Task": _PROFILE + "massage-fulfillment",
    "Communication": _PROFILE + "massage-feedback",
}


def meta(resource_type: str) -> dict[str, Any]:
    return {"profile": [PROFILES[resource_type]]}

# A fixed namespace so urn:uuid fullUrls are a pure function of the draft id (same draft -> same Bundle).
_URN_NS = uuid.UUID("6f1b0c52-3c1e-5d0a-9a55-2f0e2c4b7a10")

# Task.output / businessStatus codes (our CodeSystem TASK_IO_SYSTEM).
OUTPUT_SESSION = "session"  # a completed session: valueReference -> Procedure
OUTPUT_SESSION_NOT_DONE = "session-not-done"  # a cancelled session: valueReference -> Procedure (not-done)


# --- small helpers shared by the builders --------------------------------------------------------------------


def instant(dt: datetime) -> str:
    """A FHIR dateTime with seconds and a zone (datatypes.html#dateTime: a time needs a time zone)."""
    if not isinstance(dt, datetime) or dt.tzinfo is None or dt.utcoffset() is None:
        raise InvalidInput("Times written to the EHR need a time zone.")
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_URN_NS, '/'.join(parts))}"


def identifier(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def ref(value: str, *, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": value}
    if display:
        out["display"] = display
    return out


def conditional_create(resource: Mapping[str, Any], full_url: str) -> dict[str, Any]:
    """A transaction entry that POSTs ``resource`` unless one with its first identifier already exists."""
    ident = (resource.get("identifier") or [None])[0]
    if not ident:
        raise InvalidInput(f"A {resource.get('resourceType')} needs an identifier for an idempotent create.")
    return request_entry("POST", str(resource["resourceType"]), resource, full_url=full_url,
                         if_none_exist=[("identifier", f"{ident['system']}|{ident['value']}")])


def technique_codings(technique: str) -> list[dict[str, str]]:
    """CPT coding first (what billing and EHRs read, reference "The order": code), then our technique code.
    Exactly one of each: the MassageCode rule set of our profiles slices code.coding into cpt 1..1, technique 1..1."""
    cpt = TECHNIQUE_CPT[technique][0]
    return [coding(CPT, cpt, CPT_DISPLAY.get(cpt)), coding(TECHNIQUE_SYSTEM, technique, TECHNIQUE_DISPLAY[technique])]


def code_text(technique: str, sites: Sequence[Site]) -> str:
    where = "; ".join(s.text for s in sites)
    return f"{TECHNIQUE_DISPLAY[technique]}: {where}" if where else TECHNIQUE_DISPLAY[technique]


def body_site(site: Site) -> dict[str, Any]:
    return {"coding": [coding(SNOMED, site.code, site.display)], "text": site.text}


def body_structure_id(patient_ref: str, site: Site) -> dict[str, str]:
    return identifier(BODY_STRUCTURE_ID_SYSTEM, f"{patient_ref}/{site.key}")


def body_structure(site: Site, *, patient_ref: str) -> dict[str, Any]:
    """BodyStructure for a lateralized site: location = SNOMED site, locationQualifier = SNOMED side [V]."""
    if not site.laterality:
        raise InvalidInput(f"The {site.display.lower()} has no side; no BodyStructure is needed.")
    side_code, side_display = LATERALITIES[site.laterality]
    return {
        "resourceType": "BodyStructure",
        "identifier": [body_structure_id(patient_ref, site)],
        "active": True,
        "location": {"coding": [coding(SNOMED, site.code, site.display)], "text": site.display},
        "locationQualifier": [{"coding": [coding(SNOMED, side_code, side_display)], "text": site.laterality}],
        "description": site.text,
        "patient": ref(patient_ref),
    }


def body_structure_entries(sites: Iterable[Site], patient_ref: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(transaction entries, {site.key: fullUrl}) for the lateralized sites; the urn is per patient and site."""
    entries, refs = [], {}
    for site in sites:
        if site.laterality and site.key not in refs:
            full_url = urn("body-structure", patient_ref, site.key)
            refs[site.key] = full_url
            entries.append(conditional_create(body_structure(site, patient_ref=patient_ref), full_url))
    return entries, refs


def target_body_structures(sites: Iterable[Site], refs: Mapping[str, str] | None) -> list[dict[str, Any]]:
    return [{"url": TARGET_BODY_STRUCTURE, "valueReference": ref(refs[s.key], display=s.text)}
            for s in sites if refs and s.key in refs]


def annotation(text: str, *, author_ref: str | None = None, time: datetime | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"text": text}
    if author_ref:
        out["authorReference"] = ref(author_ref)
    if time is not None:
        out["time"] = instant(time)
    return out


# --- the order ---------------------------------------------------------------------------------------------------


def _require_valid(draft: OrderDraft) -> None:
    problems = order_problems(draft)
    if problems:
        raise InvalidInput("The order is not complete: " + " ".join(problems.values()))


def timing(schedule: Schedule) -> dict[str, Any]:
    """Frequency x duration as Timing (reference "occurrenceTiming"), with the same schedule in words in code.text:
    US Core only requires servers to keep occurrencePeriod, so the words must survive an EHR that drops repeat."""
    return {
        "repeat": {
            # boundsDuration, not boundsPeriod: the series starts at the first session, which is not known when the
            # physician signs; the plan start used for adherence is authoredOn (see coordination).
            "boundsDuration": {"value": schedule.duration_weeks, "unit": "wk", "system": UCUM, "code": "wk"},
            "count": schedule.total_sessions,
            "frequency": schedule.frequency,
            "period": 1,
            "periodUnit": "wk",
            "duration": schedule.session_minutes,
            "durationUnit": "min",
        },
        "code": {"text": schedule.text},
    }


def sessions_quantity(n: int) -> dict[str, Any]:
    # UCUM curly-brace annotation is a valid unity unit (reference: quantityQuantity) [B]
    return {"value": n, "unit": "session", "system": UCUM, "code": "{session}"}


def order_details(draft: OrderDraft, schedule: Schedule) -> list[dict[str, Any]]:
    out = [{"coding": [coding(ORDER_DETAIL_SYSTEM, "schedule", "Schedule")], "text": schedule.text}]
    if draft.pressure:
        text = f"{draft.pressure.capitalize()} pressure"
        if draft.pressure_note.strip():
            text += f": {draft.pressure_note.strip()}"
        out.append({"coding": [coding(ORDER_DETAIL_SYSTEM, f"pressure-{draft.pressure}",
                                      f"{draft.pressure.capitalize()} pressure")], "text": text})
    for p in draft.positioning:
        if p.strip():
            out.append({"coding": [coding(ORDER_DETAIL_SYSTEM, "positioning", "Positioning")], "text": p.strip()})
    return out


def precautions_text(draft: OrderDraft) -> str:
    parts = [d["text"] for d in order_details(draft, draft.schedule)[1:]]
    return "Precautions: " + "; ".join(parts) + "." if parts else ""


def _technique(draft: OrderDraft, technique: str | None) -> str:
    if technique is None:
        if len(draft.techniques) != 1:
            raise InvalidInput("This draft has several techniques: say which one this order is for.")
        return draft.techniques[0]
    if technique not in draft.techniques:
        raise InvalidInput(f"'{technique}' is not one of the draft's techniques.")
    return technique


def order_identifier(draft_id: str, technique: str) -> dict[str, str]:
    """One order per technique (profiles: cpt 1..1, technique 1..1; reference "The order": one ServiceRequest per
    technique family), so the order's identifier is the draft id plus the technique; ``requisition`` holds the bare
    draft id and groups the orders signed together (R4 ServiceRequest.requisition, "composite request")."""
    return identifier(ORDER_ID_SYSTEM, f"{draft_id}:{technique}")


def service_request(draft: OrderDraft, *, findings_refs: Sequence[str], now: datetime, technique: str | None = None,
                    body_structure_refs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The signed order for one technique of the draft (MassageServiceRequest); ``technique`` may be left out when
    the draft has only one. ``findings_refs`` -> supportingInfo (the DetectedIssues); ``body_structure_refs`` maps
    ``Site.key`` -> reference of its BodyStructure (see ``body_structure_entries``).
    Raises InvalidInput if ``order_problems(draft)`` is not empty (the form should have shown them first)."""
    _require_valid(draft)
    technique = _technique(draft, technique)
    sites = draft.parsed_sites()
    schedule = draft.schedule
    sr: dict[str, Any] = {"resourceType": "ServiceRequest", "meta": meta("ServiceRequest")}
    extensions = target_body_structures(sites, body_structure_refs)
    if extensions:
        sr["extension"] = extensions
    sr.update({
        "identifier": [order_identifier(draft.draft_id, technique)],
        "requisition": identifier(REQUISITION_ID_SYSTEM, draft.draft_id),
        "status": "active",
        "intent": "order",
        "category": [{"coding": [CATEGORY_PT], "text": "Medical massage"}],
        "code": {"coding": technique_codings(technique), "text": code_text(technique, sites)},
        "orderDetail": order_details(draft, schedule),
        "quantityQuantity": sessions_quantity(schedule.total_sessions),
        "subject": ref(draft.patient_ref),
    })
    if draft.encounter_ref:
        sr["encounter"] = ref(draft.encounter_ref)
    sr["occurrenceTiming"] = timing(schedule)
    sr["authoredOn"] = instant(draft.authored)
    sr["requester"] = ref(draft.requester_ref)
    sr["performerType"] = {"coding": [coding(NUCC, NUCC_MASSAGE_THERAPIST, "Massage Therapist")]}
    if draft.reason_text.strip():
        sr["reasonCode"] = [{"text": draft.reason_text.strip()}]
    if draft.reason_refs:
        sr["reasonReference"] = [ref(r) for r in draft.reason_refs]
    if findings_refs:
        sr["supportingInfo"] = [ref(r) for r in findings_refs]
    sr["bodySite"] = [body_site(s) for s in sites]
    notes = [annotation(t, author_ref=draft.requester_ref, time=draft.authored)
             for t in (draft.notes.strip(), precautions_text(draft)) if t]
    if notes:
        sr["note"] = notes
    if draft.patient_instruction.strip():
        sr["patientInstruction"] = draft.patient_instruction.strip()
    return sr


def fulfillment_task(draft: OrderDraft, *, order_ref: str, now: datetime, technique: str | None = None,
                     owner_ref: str | None = None) -> dict[str, Any]:
    """The request-fulfilment Task of one order (workflow pattern, reference "Workflow: Task"): code ``fulfill``,
    focus and basedOn = the order, ``restriction.repetitions`` = sessions authorized.

    Sessions done are tracked without extensions: one ``output`` per documented session (type ``session`` ->
    the Procedure, the Reference also carrying the Procedure's identifier), counted by ``sessions_done(task)``;
    ``businessStatus.text`` repeats the count in words. Status: ``ready`` when a therapist owns it already,
    ``requested`` while it waits for one."""
    _require_valid(draft)
    technique = _technique(draft, technique)
    total = draft.schedule.total_sessions
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": meta("Task"),
        "identifier": [identifier(TASK_ID_SYSTEM, f"{draft.draft_id}:{technique}")],
        "basedOn": [ref(order_ref)],
        "groupIdentifier": identifier(REQUISITION_ID_SYSTEM, draft.draft_id),
        "status": "ready" if owner_ref else "requested",
        "businessStatus": business_status(0, total),
        "intent": "order",
        "code": {"coding": [coding(TASK_CODE, "fulfill", "Fulfill the focal request")]},
        "description": f"Provide {TECHNIQUE_DISPLAY[technique].lower()}: {draft.schedule.text}",
        "focus": ref(order_ref),
        "for": ref(draft.patient_ref),
    }
    if draft.encounter_ref:
        task["encounter"] = ref(draft.encounter_ref)
    task["authoredOn"] = instant(draft.authored)
    task["lastModified"] = instant(now)
    task["requester"] = ref(draft.requester_ref)
    task["performerType"] = [{"coding": [coding(NUCC, NUCC_MASSAGE_THERAPIST, "Massage Therapist")]}]
    if owner_ref:
        task["owner"] = ref(owner_ref)
    task["restriction"] = {"repetitions": total}
    return task


def business_status(done: int, total: int | None) -> dict[str, Any]:
    text = f"{done} of {total} sessions done" if total else f"{done} sessions done"
    return {"coding": [coding(TASK_IO_SYSTEM, "sessions-done", "Sessions done")], "text": text}


def sessions_done(task: Mapping[str, Any]) -> int:
    """Completed sessions recorded on a fulfilment Task (its ``output`` entries of type ``session``)."""
    return sum(1 for o in task.get("output") or [] if _output_type(o) == OUTPUT_SESSION)


def _output_type(output: Any) -> str | None:
    if not isinstance(output, Mapping):
        return None
    for c in (output.get("type") or {}).get("coding") or []:
        if isinstance(c, Mapping) and c.get("system") == TASK_IO_SYSTEM:
            return c.get("code")
    return None


def app_reference(version: str | None = None) -> dict[str, Any]:
    """The app as a logical Device reference (no Device resource needs to exist in the EHR)."""
    display = f"{APP_NAME} {version}" if version else APP_NAME
    return {"type": "Device", "identifier": identifier(APP_ID_SYSTEM, APP_NAME), "display": display}


def provenance(targets: Sequence[str | Mapping[str, Any]], *, author_ref: str, now: datetime,
               activity: str = "CREATE", app_version: str | None = None,
               on_behalf_of: str | None = None) -> dict[str, Any]:
    """One Provenance per write transaction (reference "Authorship: Provenance"; US Core Provenance: target +
    recorded; agent author = the clinician, agent transmitter = the app).

    ``targets``: references as strings (urn:uuid fullUrls of the same Bundle) or Reference dicts (which may carry
    the target's ``identifier`` - ``order_transaction`` uses that for an idempotent create)."""
    if not targets:
        raise InvalidInput("A Provenance needs at least one target.")
    if activity not in ("CREATE", "UPDATE", "DELETE"):
        raise InvalidInput(f"Unknown Provenance activity {activity!r}.")
    transmitter: dict[str, Any] = {
        "type": {"coding": [coding(US_CORE_PROVENANCE_PARTICIPANT_TYPE, "transmitter", "Transmitter")]},
        "who": app_reference(app_version),
    }
    if on_behalf_of:
        transmitter["onBehalfOf"] = ref(on_behalf_of)
    return {
        "resourceType": "Provenance",
        "target": [dict(t) if isinstance(t, Mapping) else ref(t) for t in targets],
        "recorded": instant(now),
        "activity": {"coding": [coding(DATA_OPERATION, activity, activity.lower())]},
        "agent": [
            {"type": {"coding": [coding(PROVENANCE_PARTICIPANT_TYPE, "author", "Author")]},
             "who": ref(author_ref)},
            transmitter,
        ],
    }


PROVENANCE_MODES = ("put", "conditional", "post")


def provenance_entry(prov: dict[str, Any], seed: str, *, mode: str = "put",
                     key: Mapping[str, str] | None = None) -> dict[str, Any]:
    """How the Provenance of a transaction is written so that a retry does not duplicate it. R4 Provenance has no
    ``identifier``, so the usual conditional create on identifier is not available:

    * ``put`` (default): ``PUT Provenance/<id>`` with an id derived from ``seed`` (update as create,
      http.html#upsert; the sandbox declares ``updateCreate``). PUT is idempotent, so fhir.py may retry the Bundle.
    * ``conditional``: ``POST`` with ``ifNoneExist: target:identifier=<key>`` (search.html#reference, the
      ``:identifier`` modifier) keyed on the main target's identifier - for servers that support that modifier.
    * ``post``: a plain POST, for servers with neither; the Bundle is then not safe to retry automatically.
    """
    if mode == "put":
        pid = str(uuid.uuid5(_URN_NS, f"provenance/{seed}"))
        return request_entry("PUT", f"Provenance/{pid}", {**prov, "id": pid})
    if mode == "conditional":
        if key is None or not any(isinstance(t, Mapping) and t.get("identifier") == dict(key) for t in prov["target"]):
            raise InvalidInput("The Provenance key must be the identifier of one of its targets.")
        return request_entry("POST", "Provenance", prov, full_url=urn("provenance", seed),
                             if_none_exist=[("target:identifier", f"{key['system']}|{key['value']}")])
    if mode == "post":
        return request_entry("POST", "Provenance", prov, full_url=urn("provenance", seed))
    raise InvalidInput(f"Unknown Provenance mode {mode!r}; use one of {', '.join(PROVENANCE_MODES)}.")


def _identified_ref(full_url: str, resource: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": full_url}
    idents = resource.get("identifier")
    if isinstance(idents, list) and idents:
        out["identifier"] = dict(idents[0])
    elif isinstance(idents, Mapping):
        out["identifier"] = dict(idents)
    return out


def _prepare_finding(issue: Mapping[str, Any], draft_id: str, index: int,
                     order_urns_: Sequence[str]) -> dict[str, Any]:
    """A copy of a screening DetectedIssue made ready to be written with the orders it was raised for."""
    if not isinstance(issue, Mapping) or issue.get("resourceType") != "DetectedIssue":
        raise InvalidInput(f"Finding {index + 1} is not a DetectedIssue.")
    out = dict(issue)
    # The conditional create keys on the first identifier, so it must be unique to this draft's finding: the
    # screening builder's own identifier names the rule (the same for every patient who trips it), and keying on
    # it would match another patient's finding. Prepend ours unless the caller already put one of ours first.
    idents = [dict(i) for i in out.get("identifier") or [] if isinstance(i, Mapping)]
    if not idents or idents[0].get("system") != FINDING_ID_SYSTEM:
        idents.insert(0, identifier(FINDING_ID_SYSTEM, f"{draft_id}:{index}"))
    out["identifier"] = idents
    implicated = [dict(r) for r in out.get("implicated") or []]
    have = {r.get("reference") for r in implicated}
    implicated = [ref(u) for u in order_urns_ if u not in have] + implicated
    out["implicated"] = implicated
    # reference "DetectedIssue": preliminary while drafting, final once the physician acts - signing is acting.
    if out.get("status") == "preliminary":
        out["status"] = "final"
    return out


def order_urns(draft_id: str, technique: str) -> dict[str, str]:
    """The fullUrls ``order_transaction`` uses for one technique of a draft (same draft id, same urns)."""
    return {"order": urn("order", draft_id, technique), "task": urn("task", draft_id, technique)}


def order_transaction(draft: OrderDraft, finding_issues: Sequence[Mapping[str, Any]], now: datetime, *,
                      owner_ref: str | None = None, app_version: str | None = None,
                      body_structures: bool = False, provenance_mode: str = "put") -> dict[str, Any]:
    """ONE transaction Bundle that signs the draft: [BodyStructures], one ServiceRequest and one fulfilment Task
    per technique, the DetectedIssues, one Provenance. Every POST is conditional and the Provenance is a PUT with
    a derived id (see the module doc), so sending it twice writes each resource once.

    ``body_structures``: also write a BodyStructure per lateralized site and link it (off by default: the sandbox
    and many EHRs do not take BodyStructure writes; laterality is always in bodySite.text).
    ``provenance_mode``: see ``provenance_entry``.

    ``finding_issues`` are DetectedIssue dicts from the screening builder; each gets the orders added to
    ``implicated``, status final, and an identifier derived from the draft id if it has none. Every order lists
    every finding in supportingInfo (the screening ran on the whole draft)."""
    _require_valid(draft)
    per_technique = [(t, order_urns(draft.draft_id, t)) for t in draft.techniques]
    sr_urns = [u["order"] for _, u in per_technique]
    sites = draft.parsed_sites()
    bs_entries, bs_refs = body_structure_entries(sites, draft.patient_ref) if body_structures else ([], {})
    findings = [_prepare_finding(f, draft.draft_id, i, sr_urns) for i, f in enumerate(finding_issues)]
    finding_urns = [urn("finding", draft.draft_id, f["identifier"][0]["system"], f["identifier"][0]["value"])
                    for f in findings]
    if len(set(finding_urns)) != len(finding_urns):
        raise InvalidInput("Two findings share one identifier; each finding must be written once.")
    written: list[tuple[str, dict[str, Any]]] = [(e["fullUrl"], e["resource"]) for e in bs_entries]
    orders = []
    for technique, urns in per_technique:
        sr = service_request(draft, findings_refs=finding_urns, now=now, technique=technique,
                             body_structure_refs=bs_refs)
        orders.append(sr)
        written.append((urns["order"], sr))
        written.append((urns["task"], fulfillment_task(draft, order_ref=urns["order"], now=now,
                                                       technique=technique, owner_ref=owner_ref)))
    written += list(zip(finding_urns, findings))
    prov = provenance([_identified_ref(u, r) for u, r in written], author_ref=draft.requester_ref, now=now,
                      activity="CREATE", app_version=app_version)
    entries = [conditional_create(r, u) for u, r in written]
    entries.append(provenance_entry(prov, f"order/{draft.draft_id}", mode=provenance_mode,
                                    key=orders[0]["identifier"][0]))
    return transaction_bundle(entries)


__all__ = [
    "ORDER_ID_SYSTEM", "REQUISITION_ID_SYSTEM", "TASK_ID_SYSTEM", "PROFILES", "order_identifier", "FINDING_ID_SYSTEM", "BODY_STRUCTURE_ID_SYSTEM", "TARGET_BODY_STRUCTURE",
    "OUTPUT_SESSION", "OUTPUT_SESSION_NOT_DONE", "PROVENANCE_MODES", "provenance_entry",
    "service_request", "fulfillment_task", "provenance", "order_transaction", "order_urns", "sessions_done",
    "business_status", "body_structure", "timing",
]
