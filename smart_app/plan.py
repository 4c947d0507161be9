"""The plan area: the patient's massage plans for the physician (and, read-only, the therapist), the replies to
therapists' messages, changes to the order (modify, hold, resume, revoke, complete), and the physician's panel.

Data: ONE batch request (R4 http.html#transaction, type batch) holds every search the view needs -
the chart for the re-screen (chart_fetch.chart_searches), the massage orders with their Tasks and sessions
(``_revinclude``, search.html#revinclude), the pain scores, the DetectedIssues and the messages with their senders
(``_include``). A searchset with a ``next`` link adds one round trip per further page (``_count`` is set high
enough that the sandbox never pages a plan: 1000 pain scores, 200 orders/issues/messages), so the view costs
1 round trip whatever the number of sessions, plus one per extra page on servers with a lower page limit.

Writes: each change is ONE transaction - the orders of the plan (PUT with If-Match = the version the physician
saw, http.html#concurrency), their fulfilment Tasks following (PUT with If-Match), and a Provenance (UPDATE).
A 412 means someone changed the order meanwhile: nothing was written, and the conflict page shows the version
seen, what was wanted and what is in the chart now, field by field; the physician applies the change again on top
of the new version or keeps theirs. Nothing is ever overwritten blindly. An EHR without transactions gets the
same entries one by one, orders first (fhir_massage.writes): a 412 on the first order still writes nothing; a
failure after an order landed is a page that says which changes were saved and which were not.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

from flask import Blueprint, abort, g, redirect, render_template, request, url_for

from fhir_massage import chart as chart_mod
from fhir_massage import coordination as co
from fhir_massage import plan_view as pv
from fhir_massage.builders.messages import CATEGORIES, MESSAGE_ID_SYSTEM, communication
from fhir_massage.builders.order import IDENTIFIER_BASE, annotation, instant, provenance, provenance_entry
from fhir_massage.builders.plan import ACTIONS, modify_order, order_status_update, task_follow_order
from fhir_massage.chart_fetch import batch_patient, chart_searches
from fhir_massage.codes import NUCC, NUCC_MASSAGE_THERAPIST, TECHNIQUE_DISPLAY, TECHNIQUE_SYSTEM, TECHNIQUES, codings
from fhir_massage.errors import FhirConflict, FhirError, InvalidInput
from fhir_massage.writes import PartialWrite, batch_or_each
from fhir_massage.fhir import FhirClient, FhirResult, batch_bundle, entry_outcomes, request_entry, resources, \
    transaction_bundle
from fhir_massage.orders_model import LATERALITIES, Schedule, _sites, schedule_problems, site_problem
from fhir_massage.screening import screen

from . import identity, writes
from .charts import pain_chart_svg
from .launch import AREAS, fhir_client, require_launch


bp = Blueprint("plan", __name__, url_prefix="/p/<lsid>/plan")

PAIN_CODE = f"{co.LOINC}|{co.PAIN_LOINC}"
PAGE_CAP = 20  # pages followed per search before the view says the data is cut short
ACTION_LABELS = {"hold": "Put on hold", "resume": "Resume", "revoke": "Revoke", "complete": "Mark complete",
                 "modify": "Change the order"}
DONE_WORDS = {"hold": "The order is on hold.", "resume": "The order is active again.",
              "revoke": "The order is revoked.", "complete": "The order is marked complete.",
              "modify": "The order was changed.", "reply": "Your reply was sent.",
              "finding": "The finding is recorded on the order.", "reviewed": "The finding is marked reviewed.",
              "finding-gone": "That finding is no longer new: the chart changed or someone recorded it already."}
# DetectedIssue.severity (required binding high | moderate | low) in the words the order page uses for the KB
# classes it comes from (builders/detected_issue.SEVERITY: absolute -> high, relative -> moderate, local -> low)
SEVERITY_WORDS = {"high": "Contraindicated", "moderate": "Caution", "low": "Local caution"}
STATUS_WORDS = {"on-hold": "On hold", "revoked": "Revoked", "completed": "Completed", "active": "Resumed"}
# What the panel reads across patients (SMART v2 user-level scopes, SC "Scopes for requesting FHIR Resources").
PANEL_NEEDS: tuple[str, ...] = ("ServiceRequest", "Task", "Procedure", "Observation", "DetectedIssue",
                                "Communication", "Patient")
RESCREEN_NEEDS: tuple[str, ...] = ("Condition", "MedicationRequest", "MedicationStatement",
                                   "MedicationAdministration", "AllergyIntolerance")


# ---------------------------------------------------------------------------------------------------------------
# Reading: one batch


@dataclass
class PlanData:
    patient: dict[str, Any] | None = None
    service_requests: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    procedures: list[dict[str, Any]] = field(default_factory=list)
    observations: list[dict[str, Any]] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    communications: list[dict[str, Any]] = field(default_factory=list)
    people: dict[str, str] = field(default_factory=dict)  # Practitioner/PractitionerRole ref -> name
    person_roles: dict[str, str] = field(default_factory=dict)  # the same refs -> identity.PHYSICIAN | THERAPIST
    chart: list[dict[str, Any]] = field(default_factory=list)  # for the re-screen (Patient first)
    user_ref: str | None = None
    roles: list[dict[str, Any]] = field(default_factory=list)  # the user's PractitionerRoles (+ Practitioner)
    warnings: list[str] = field(default_factory=list)
    round_trips: int = 0


def _q(params: Sequence[tuple[str, str]]) -> str:
    return urlencode(list(params))


def role_search(user_ref: str | None) -> str | None:
    """The search that finds the user's PractitionerRoles (with their Practitioner, for names): every role of a
    Practitioner user; for a PractitionerRole user, that role and its Practitioner (the practitioner's other roles
    take one more search, ``sibling_roles``, as the practitioner is not known before)."""
    ref = co.ref_key(user_ref)
    if ref and ref.startswith("Practitioner/"):
        return "PractitionerRole?" + _q([("practitioner", ref), ("_include", "PractitionerRole:practitioner")])
    if ref and ref.startswith("PractitionerRole/"):
        return "PractitionerRole?" + _q([("_id", ref.split("/", 1)[1]), ("_include", "PractitionerRole:practitioner")])
    return None


def sibling_roles(client: FhirClient, user_ref: str | None, found: Sequence[Mapping[str, Any]]
                  ) -> list[dict[str, Any]]:
    """For a PractitionerRole user: the other roles of the Practitioner behind it (one search, only then). An EHR
    that refuses it leaves the physician known by the references found so far."""
    ref = co.ref_key(user_ref)
    if not ref or not ref.startswith("PractitionerRole/"):
        return []
    who = next((co.ref_key(r.get("practitioner")) for r in found if r.get("resourceType") == "PractitionerRole"
                and f"PractitionerRole/{r.get('id')}" == ref), None)
    if not who or not who.startswith("Practitioner/"):
        return []
    try:
        return [r for r in client.search_all("PractitionerRole", [("practitioner", who)])
                if r.get("resourceType") == "PractitionerRole"]
    except FhirError as exc:
        if exc.status == 401:
            raise
        return []


def person_names(resources: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Practitioner/PractitionerRole reference -> name. A PractitionerRole has no name of its own (R4): it takes its
    Practitioner's, from the resources or the reference's display."""
    out: dict[str, str] = {}
    for r in resources:
        if r.get("resourceType") == "Practitioner":
            name = identity.human_name(r)
            if name:
                out[f"Practitioner/{r.get('id')}"] = name
    for r in resources:
        if r.get("resourceType") == "PractitionerRole":
            who = r.get("practitioner") if isinstance(r.get("practitioner"), Mapping) else {}
            name = out.get(co.ref_key(who) or "") or (who.get("display") if isinstance(who.get("display"), str)
                                                      else None)
            if name:
                out[f"PractitionerRole/{r.get('id')}"] = name
    return out


def person_roles(resources: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Practitioner/PractitionerRole reference -> physician | therapist, from the role's code and specialty (or the
    practitioner's qualifications), as identity.guess_role reads the user's own; a reference whose role the EHR
    does not say is left out (the page then says nothing rather than guess)."""
    practitioners = {f"Practitioner/{r.get('id')}": r for r in resources if r.get("resourceType") == "Practitioner"}
    roles_of: dict[str, list[Mapping[str, Any]]] = {}
    for r in resources:
        if r.get("resourceType") == "PractitionerRole":
            roles_of.setdefault(co.ref_key(r.get("practitioner")) or "", []).append(r)
    out: dict[str, str] = {}
    for ref, p in practitioners.items():
        guess = identity.guess_role(ref, p, roles_of.get(ref, ()))
        if guess.role:
            out[ref] = guess.role
    for r in resources:
        if r.get("resourceType") == "PractitionerRole":
            ref = f"PractitionerRole/{r.get('id')}"
            guess = identity.guess_role(ref, practitioners.get(co.ref_key(r.get("practitioner")) or ""), [r])
            if guess.role:
                out[ref] = guess.role
    return out


def plan_searches(patient_id: str, *, with_chart: bool = True, user_ref: str | None = None
                  ) -> list[tuple[str, str]]:
    """(key, relative URL) of every GET the plan view puts in its batch; with ``user_ref``, the user's roles too
    (who "the physician" is for the message threads and the authorship note)."""
    p = ("patient", patient_id)
    out: list[tuple[str, str]] = []
    if with_chart:
        out.append(("patient", f"Patient/{patient_id}"))
        out += [(f"chart:{rtype}", f"{rtype}?{_q(params)}") for rtype, params in chart_searches(patient_id)]
    out += [
        ("orders", "ServiceRequest?" + _q([p, ("code", f"{TECHNIQUE_SYSTEM}|"), ("_revinclude", "Task:focus"),
                                          ("_revinclude", "Procedure:based-on"),
                                          ("_include", "ServiceRequest:requester"), ("_count", "200")])),
        ("pain", "Observation?" + _q([p, ("code", PAIN_CODE), ("_count", "1000")])),
        ("issues", "DetectedIssue?" + _q([p, ("_count", "200")])),
        ("messages", "Communication?" + _q([p, ("_include", "Communication:sender"), ("_count", "200")])),
    ]
    roles = role_search(user_ref)
    if roles:
        out.append(("roles", roles))
    return out


_WHAT = {"orders": "massage orders and sessions", "pain": "pain scores", "issues": "contraindication findings",
         "messages": "messages", "patient": "patient record", "roles": "your practitioner roles"}


def _pages(client: FhirClient, first: dict[str, Any], what: str, warnings: list[str]) -> list[dict[str, Any]]:
    found = resources(first)
    page, n = first, 1
    while True:
        if n >= PAGE_CAP:
            if any(link.get("relation") == "next" for link in page.get("link") or []):
                warnings.append(f"Only the first {n} pages of {what} were read; the view may be incomplete.")
            break
        nxt = client.next_page(page)
        if nxt is None:
            break
        found.extend(resources(nxt))
        page, n = nxt, n + 1
    return found


def _without_include(url: str) -> str:
    rtype, _, query = url.partition("?")
    kept = [kv for kv in query.split("&") if kv and not kv.startswith(("_include=", "_revinclude="))]
    return f"{rtype}?{'&'.join(kept)}"


def _run_batch(client: FhirClient, searches: Sequence[tuple[str, str]], out: dict[str, list[dict[str, Any]]],
               warnings: list[str], *, last: bool) -> list[tuple[str, str]]:
    """One batch; fills ``out`` and returns the searches worth another try: a 400 on a search with _include is
    tried again without it (a server that lacks the include parameter, like the sandbox for
    MedicationRequest:medication), a 429/5xx as it was. With ``last`` nothing is retried."""
    try:
        outcomes = entry_outcomes(client.batch(batch_bundle([request_entry("GET", u) for _, u in searches])))
    except FhirError as exc:
        if exc.status in (401, 403) or last:
            raise
        return [(k, u) for k, u in searches]  # no batch here: the caller goes one by one
    if len(outcomes) != len(searches):
        return [(k, u) for k, u in searches]
    retry = []
    for (key, url), result in zip(searches, outcomes):
        if key == "patient":
            batch_patient(result)  # a refused Patient raises FhirAuthError: the plan of this patient cannot be shown
        if isinstance(result, FhirResult) and isinstance(result.resource, dict):
            res = result.resource
            out[key] = (_pages(client, res, _WHAT.get(key, key.split(":")[-1]), warnings)
                        if res.get("resourceType") == "Bundle" else [res])
        elif isinstance(result, FhirError) and result.status == 401:
            raise result
        elif not last and isinstance(result, FhirError) and result.status == 400 and "_include=" in url:
            retry.append((key, _without_include(url)))
        elif not last and isinstance(result, FhirError) and result.retryable:
            retry.append((key, url))
        elif key == "patient" and isinstance(result, FhirError):
            # Without the Patient no part of the plan can be shown: say what the EHR answered (not found, did not
            # answer, ...) through the app's error pages instead of a misleading "the data has no Patient".
            raise result
        else:
            out[key] = [_outcome(key, result)]
    return retry


def fetch(client: FhirClient, patient_id: str, *, with_chart: bool = True, user_ref: str | None = None
          ) -> dict[str, list[dict[str, Any]]]:
    """Run the searches and return the resources per key: one batch, plus at most one more batch for the
    searches worth retrying (see ``_run_batch``), plus one request per further page. A server without batch
    gets the searches one by one. A search that still fails becomes an OperationOutcome (shown as a warning;
    for the chart, chart.py turns it into an 'incomplete chart' warning, never a silent 'nothing there')."""
    searches = plan_searches(patient_id, with_chart=with_chart, user_ref=user_ref)
    out: dict[str, list[dict[str, Any]]] = {}
    warnings: list[str] = []
    retry = _run_batch(client, searches, out, warnings, last=False)
    if retry and len(retry) == len(searches) and not out:
        for key, url in retry:  # batch not supported: one by one
            try:
                out[key] = ([client.get_url(url)] if key == "patient" else
                            [r for page in _iter_url(client, url) for r in page])
            except FhirError as exc:
                if exc.status == 401:
                    raise
                if key == "patient":
                    raise  # refused, missing or unanswered: as in the batch, no plan without the patient
                out[key] = [_outcome(key, exc)]
    elif retry:
        _run_batch(client, retry, out, warnings, last=True)
    if warnings:
        out["_warnings"] = [{"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "incomplete", "diagnostics": w}]} for w in warnings]
    return out


def _iter_url(client: FhirClient, url: str) -> list[list[dict[str, Any]]]:
    first = client.get_url(url)
    return [_pages(client, first, url.split("?")[0], [])]


def _outcome(key: str, error: Exception) -> dict[str, Any]:
    what = _WHAT.get(key, key.split(":")[-1])
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "incomplete", "diagnostics": f"The EHR did not return the {what}: {error}"}]}


def _outcome_words(items: list[dict[str, Any]]) -> list[str]:
    return [str(i.get("diagnostics")) for o in items if o.get("resourceType") == "OperationOutcome"
            for i in o.get("issue") or [] if i.get("diagnostics")]


def _missing_tasks(client: FhirClient, found: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The Tasks of orders that came back without one: a server may ignore ``_revinclude`` (optional,
    search.html#revinclude), so look them up in one more search (``Task?focus=a,b``), and only then."""
    focused = {co.ref_key(t.get("focus")) for t in found if t.get("resourceType") == "Task"}
    missing = [f"ServiceRequest/{r.get('id')}" for r in found if r.get("resourceType") == "ServiceRequest"
               and f"ServiceRequest/{r.get('id')}" not in focused]
    if not missing:
        return []
    try:
        return [t for t in client.search_all("Task", [("focus", ",".join(missing))]) if t.get("resourceType") == "Task"]
    except FhirError as exc:
        if exc.status == 401:
            raise
        return []  # no Task access or search: the plan shows the orders without their Tasks, as before


def _unique(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in items:
        key = f"{r.get('resourceType')}/{r.get('id')}"
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def load(client: FhirClient, patient_id: str, *, with_chart: bool = True, user_ref: str | None = None) -> PlanData:
    """Everything the plan view shows for one patient, with the number of round trips it took. With ``user_ref``
    the user's roles come in the same batch (plus one search for a PractitionerRole user: ``sibling_roles``)."""
    before = client.request_count
    raw = fetch(client, patient_id, with_chart=with_chart, user_ref=user_ref)
    data = PlanData(user_ref=user_ref)
    data.roles = [r for r in raw.get("roles", []) if r.get("resourceType") in ("PractitionerRole", "Practitioner")]
    data.roles += [r for r in sibling_roles(client, user_ref, data.roles)
                   if all(r.get("id") != x.get("id") or x.get("resourceType") != "PractitionerRole"
                          for x in data.roles)]
    data.round_trips = client.request_count - before
    for key in ("orders", "pain", "issues", "messages"):
        data.warnings += _outcome_words(raw.get(key, []))
    data.warnings += _outcome_words(raw.get("_warnings", []))
    orders = raw.get("orders", [])
    seen: set[str] = set()

    def once(res: dict[str, Any]) -> bool:
        k = f"{res.get('resourceType')}/{res.get('id')}"
        if k in seen:
            return False
        seen.add(k)
        return True

    for res in orders + raw.get("chart:Procedure", []):
        if not isinstance(res, dict) or not once(res):
            continue
        rtype = res.get("resourceType")
        if rtype == "ServiceRequest":
            data.service_requests.append(res)
        elif rtype == "Task":
            data.tasks.append(res)
        elif rtype == "Procedure":
            data.procedures.append(res)
    for res in _missing_tasks(client, data.service_requests + data.tasks):
        if once(res):
            data.tasks.append(res)
    data.observations = [o for o in raw.get("pain", []) if o.get("resourceType") == "Observation"]
    data.issues = [i for i in raw.get("issues", []) if i.get("resourceType") == "DetectedIssue"]
    data.communications = [r for r in raw.get("messages", []) if r.get("resourceType") == "Communication"]
    # names of the message senders, the ordering physicians and the user's roles (all _include'd)
    people = [r for r in raw.get("messages", []) + orders + data.roles
              if isinstance(r, dict) and r.get("resourceType") in ("Practitioner", "PractitionerRole")]
    data.people = person_names(people)
    data.person_roles = person_roles(people)
    patient = raw.get("patient", [None])[0] if raw.get("patient") else None
    data.patient = patient if isinstance(patient, dict) and patient.get("resourceType") == "Patient" else None
    if with_chart:
        data.chart = ([data.patient] if data.patient else []) + [
            r for k, v in raw.items() if k.startswith("chart:") for r in v]
    return data


# ---------------------------------------------------------------------------------------------------------------
# The view model (pure given the data)


@dataclass
class PlanCard:
    group: pv.PlanGroup
    orders: list[dict[str, Any]]
    tasks: dict[str, dict[str, Any]]  # order ref -> Task
    new_findings: list[dict[str, Any]]
    threads: list[co.Thread]
    chart_svg: Any
    actions: list[str]
    schedule: dict[str, int]  # current frequency/weeks/minutes for the modify form
    site_keys: list[tuple[str, str]]  # (site code string, text)


def _schedule_of(sr: Mapping[str, Any]) -> dict[str, int]:
    rep = ((sr.get("occurrenceTiming") or {}).get("repeat") or {})
    weeks = (rep.get("boundsDuration") or {}).get("value")
    out = {"frequency": rep.get("frequency"), "weeks": weeks, "minutes": rep.get("duration")}
    return {k: int(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_cards(data: PlanData, *, today: date, now: datetime, physician_refs: Sequence[str],
                patient_ref: str) -> tuple[list[PlanCard], list[co.Thread], list[str], list[co.Attention]]:
    """(plan cards, threads about no plan of this patient, warnings, attention list)."""
    rows = co.plan_rows(data.service_requests, data.tasks, data.procedures, data.observations, data.issues,
                        today=today)
    groups = pv.group_plans(data.service_requests, rows, data.issues)
    requesters = [co.ref_key(sr.get("requester")) for sr in data.service_requests]
    threads = co.threads(data.communications, physician_refs=[*physician_refs, *[r for r in requesters if r]])
    warnings = list(data.warnings)
    chart = None
    if data.chart:
        chart = chart_mod.from_resources(data.chart)
        warnings += [w for w in chart.warnings if "could not return" in w or "did not return" in w]
    by_ref = {f"ServiceRequest/{sr['id']}": sr for sr in data.service_requests}
    tasks = {}
    for t in data.tasks:
        k = co.ref_key(t.get("focus"))
        if k and "fulfill" in {c.get("code") for c in codings(t.get("code"))}:
            tasks.setdefault(k, t)
    cards, used, all_new = [], set(), []
    for gi, grp in enumerate(groups):
        orders = [by_ref[r] for r in grp.order_refs if r in by_ref]
        found: list[dict[str, Any]] = []
        if chart is not None and grp.active and grp.techniques:
            try:
                s = screen(chart, techniques=grp.techniques, sites=grp.site_codes or None, today=today)
                recorded = pv.recorded_issues(orders, data.issues)
                found = pv.new_findings(s, recorded, patient_ref=patient_ref, order_refs=grp.order_refs, now=now)
                grp = pv.with_rescreen(grp, recorded, s)  # open vs elsewhere by the chart's own finding sites
            except InvalidInput as exc:
                warnings.append(f"The plan could not be screened again: {exc.message}")
        all_new += found
        mine = [t for t in threads if t.order_ref in grp.order_refs]
        used |= {t.root_ref for t in mine}
        statuses = {r.status for r in grp.rows}
        actions = [a for a, (target, allowed) in ACTIONS.items() if statuses & allowed]
        if statuses & {"draft", "active", "on-hold"}:
            actions.append("modify")
        sites = []
        for sr in orders[:1]:
            for key, b in zip(pv.order_sites(sr), sr.get("bodySite") or []):
                sites.append((key, str(b.get("text") or key)))
        cards.append(PlanCard(grp, orders, {r: tasks[r] for r in grp.order_refs if r in tasks}, found, mine,
                              pain_chart_svg(grp.pain, chart_id=f"pain-{gi}"), actions,
                              _schedule_of(orders[0]) if orders else {}, sites))
    other = [t for t in threads if t.root_ref not in used]
    att = co.attention(rows, all_new, threads)
    return cards, other, warnings, att


# ---------------------------------------------------------------------------------------------------------------
# Views


def _now() -> datetime:
    return datetime.now(timezone.utc)


def physician_refs_of(data: PlanData) -> list[str]:
    """Every reference that is this physician (their Practitioner and each of its PractitionerRoles)."""
    return co.physician_refs(data.user_ref, data.roles)


def my_refs(client: FhirClient, user_ref: str | None) -> list[str]:
    """The same, looked up on its own (1 search; 2 for a PractitionerRole user) where no plan batch is read. An EHR
    that refuses the search leaves the user's own reference only."""
    url = role_search(user_ref)
    found: list[dict[str, Any]] = []
    if url:
        try:
            found = _iter_url(client, url)[0]
        except FhirError as exc:
            if exc.status == 401:
                raise
        found += sibling_roles(client, user_ref, found)
    return co.physician_refs(user_ref, found)


@dataclass(frozen=True)
class Authorship:
    ordered_by: str  # name (or reference) of the ordering physician(s) of the plan
    acting: str  # the user, by name


def authorship(card: PlanCard, mine: Sequence[str], people: Mapping[str, str]) -> Authorship | None:
    """When the plan was ordered by someone else (a covering physician changes it): who ordered it and who is
    changing it, said on the page before the change. The order keeps its requester; the change is recorded under
    the acting user (order note + Provenance author). None when the user ordered every order of the plan."""
    requesters = list(dict.fromkeys(co.ref_key(o.get("requester")) for o in card.orders))
    if requesters and all(r in mine for r in requesters):
        return None
    names = []
    for o in card.orders:
        r = co.ref_key(o.get("requester"))
        if r in mine:
            continue
        display = (o.get("requester") or {}).get("display") if isinstance(o.get("requester"), Mapping) else None
        names.append(people.get(r or "") or (display if isinstance(display, str) else None) or r
                     or "no one named in the order")
    ctx = g.ctx
    return Authorship(" and ".join(dict.fromkeys(names)), ctx.user_name or people.get(ctx.user_ref or "")
                      or ctx.user_ref or "you")


def _may_act() -> str | None:
    """Why the user may not change orders or reply here (None: they may)."""
    ctx = g.ctx
    if ctx.role != identity.PHYSICIAN:
        return "Only physicians change the order or reply to the therapist from this view."
    if not ctx.user_ref or not ctx.user_ref.startswith(("Practitioner/", "PractitionerRole/")):
        return "The EHR did not say which practitioner you are, so the app cannot sign changes in your name."
    if not (ctx.can("ServiceRequest", "update") and ctx.can("Task", "update")):
        return "The EHR did not grant this app permission to update orders and tasks."
    return None


@bp.get("/")
@require_launch
def index() -> Any:
    return render_plan()


def render_plan(typed: ChangeForm | None = None, status: int = 200) -> Any:
    """The plan page; with ``typed``, a change that could not be made is shown again in its form, as typed, with
    each problem next to its field (status 422: the request was understood but the change is not possible)."""
    ctx = g.ctx
    if not ctx.patient_id:
        return render_template("plan/no_patient.html"), 400
    client = fhir_client()
    data = load(client, ctx.patient_id, user_ref=ctx.user_ref)
    now = _now()
    mine = physician_refs_of(data)
    cards, other, warnings, att = build_cards(data, today=now.date(), now=now, physician_refs=mine,
                                              patient_ref=f"Patient/{ctx.patient_id}")
    done = request.args.get("done") if typed is None else None
    # adherence, gaps and not-done are the plan's (counted in visits): label a reason with its plan
    order_names = {r.order_ref: tech_names(c.group.techniques) for c in cards for r in c.group.rows}
    several = len(cards) > 1
    # new findings have their own box at the top; the rest in attention order (coordination.attention)
    attention = [(order_names.get(a.order_ref or "") if several else None, reason) for a in att if a.score > 0
                 for reason in a.reasons if not reason.startswith("New finding")]
    if typed is not None and not any(c.group.key == typed.plan for c in cards):
        typed.problems.setdefault("form", "That plan is not in this patient's chart (any more).")
    return render_template("plan/index.html", cards=cards, other_threads=other, warnings=warnings,
                           attention=attention, people=data.people, done=DONE_WORDS.get(done or ""),
                           cannot_act=_may_act(), reply_target=lambda t: reply_target(t, mine),
                           action_labels=ACTION_LABELS, categories=CATEGORIES,
                           round_trips=data.round_trips, techniques=TECHNIQUES, technique_display=TECHNIQUE_DISPLAY,
                           all_sites=_site_choices(), lateralities=list(LATERALITIES), typed=typed,
                           mine=set(mine), authorship=lambda card: authorship(card, mine, data.people),
                           new_id=lambda: uuid.uuid4().hex, tech_names=tech_names,
                           panel_ok=not _panel_missing() and bool(ctx.user_ref),
                           panel_needs=" ".join(f"user/{t}.rs" for t in (_panel_missing() or PANEL_NEEDS)),
                           order_url=_order_url(), severity_words=SEVERITY_WORDS, status_words=STATUS_WORDS,
                           role_of=lambda ref: message_role(ref, {**session_performers(data.procedures),
                                                                  **data.person_roles}, mine, cards)), status


def _order_url() -> str | None:
    """Where a physician orders massage, when that area is installed and this launch may use it (the same test
    as the launch page, launch.LaunchContext.area_status); None otherwise."""
    from flask import current_app
    area = next((a for a in AREAS if a.name == "orders"), None)
    if area is None or "orders.index" not in current_app.view_functions or not g.ctx.area_status(area)[0]:
        return None
    return url_for("orders.index")


def message_role(ref: str | None, roles: Mapping[str, str], mine: Sequence[str], cards: Sequence[PlanCard]
                 ) -> str | None:
    """The role label of a message's sender, from what the chart says, never guessed: the sender's PractitionerRole
    code or qualification (``person_roles``); this physician or an ordering physician of a plan here is a
    physician; a performer of this patient's massage sessions whose Procedure.performer.function is the NUCC
    massage therapist code is a massage therapist. None: the chart does not say (the page shows the name only)."""
    role = roles.get(ref or "")
    if role is None and ref and (ref in mine or any(co.ref_key(o.get("requester")) == ref for c in cards
                                                    for o in c.orders)):
        role = identity.PHYSICIAN
    return identity.ROLE_LABELS.get(role) if role else None


def session_performers(procedures: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Performer reference -> therapist, for the performers of massage sessions whose function is coded as
    massage therapist (NUCC 225700000X, as builders/session.py writes Procedure.performer.function)."""
    out: dict[str, str] = {}
    for p in procedures:
        for perf in p.get("performer") or []:
            if not isinstance(perf, Mapping):
                continue
            if any(str(c.get("system") or "").split("|")[0] == NUCC and c.get("code") == NUCC_MASSAGE_THERAPIST
                   for c in codings(perf.get("function"))):
                who = co.ref_key(perf.get("actor"))
                if who:
                    out[who] = identity.THERAPIST
    return out


def tech_names(techniques: Sequence[str], sep: str = ", ") -> str:
    return sep.join(TECHNIQUE_DISPLAY.get(t, t) for t in techniques)


def reply_target(thread: co.Thread, mine: Sequence[str]) -> co.Message:
    """The message a reply answers: the latest one not written by this physician under any of their references
    (else the latest)."""
    refs = set(mine)
    return next((m for m in reversed(thread.messages) if m.sender not in refs), thread.messages[-1])


def _site_choices() -> list[tuple[str, str, bool]]:
    return sorted(((code, name, bool(lat)) for code, (name, lat) in _sites().items()), key=lambda s: s[1])


# -- reply ------------------------------------------------------------------------------------------------------


@bp.post("/reply")
@require_launch
def reply() -> Any:
    ctx = g.ctx
    why = _may_act()
    if why:
        abort(403, description=why)
    if not ctx.can("Communication", "create"):
        abort(403, description="The EHR did not grant this app permission to send messages (Communication).")
    form = request.form
    target = form.get("in_response_to", "")
    draft_id = form.get("draft_id", "")
    text = form.get("text", "")
    category = form.get("category", "progress")
    if not target.startswith("Communication/") or not draft_id.isalnum() or len(draft_id) > 64:
        raise InvalidInput("The reply form is incomplete; reload the plan and write the reply again.")
    client = fhir_client()
    original = client.read("Communication", target.split("/", 1)[1])
    if co.ref_key(original.get("subject")) != f"Patient/{ctx.patient_id}":
        abort(404)
    sender = co.ref_key(original.get("sender"))
    order = next((co.ref_key(b) for b in original.get("basedOn") or [] if co.ref_key(b)), None)
    if not sender or not order:
        raise InvalidInput("That message names no sender or no order, so a reply cannot be addressed.")
    mine = set(my_refs(client, ctx.user_ref))
    if sender in mine:  # replying to one's own message (under any of one's references): answer whom it went to
        sender = next((co.ref_key(r) for r in original.get("recipient") or []
                       if co.ref_key(r) and co.ref_key(r) not in mine), sender)
    msg = communication(order_ref=order, patient_ref=f"Patient/{ctx.patient_id}", sender_ref=ctx.user_ref,
                        recipient_ref=sender, text=text, category=category, in_response_to=target, now=_now(),
                        draft_id=draft_id)
    client.create(msg, if_none_exist=[("identifier", f"{MESSAGE_ID_SYSTEM}|{draft_id}")])
    return redirect(url_for("plan.index", done="reply"), code=303)


# -- changes to the order ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    action: str  # hold | resume | revoke | complete | modify
    reason: str
    only: str | None  # one order id of the plan, or None for all
    technique: dict[str, str]  # order id -> technique (modify)
    sites: tuple[str, ...] | None
    schedule: Schedule | None

    def fields(self) -> list[tuple[str, str]]:
        """The change as form fields again (the conflict page re-posts them)."""
        out = [("action", self.action), ("reason", self.reason)]
        if self.only:
            out.append(("order", self.only))
        for oid, t in self.technique.items():
            out.append((f"technique-{oid}", t))
        for s in self.sites or ():
            out.append(("site", s))
        if self.schedule:
            out += [("frequency", str(self.schedule.frequency)), ("weeks", str(self.schedule.duration_weeks)),
                    ("minutes", str(self.schedule.session_minutes))]
        return out


@dataclass
class ChangeForm:
    """What the physician typed into one plan's change form, and what is wrong with it (field -> plain words), so
    that a mistake re-renders the plan page with everything kept (pages are no-store: Back brings nothing back)."""

    plan: str
    action: str
    reason: str
    technique: dict[str, str]
    sites: list[str]  # ticked ones
    add_site: str
    add_side: str
    frequency: str
    weeks: str
    minutes: str
    seen: dict[str, str] = field(default_factory=dict)  # order id -> version the physician saw (kept: If-Match)
    problems: dict[str, str] = field(default_factory=dict)

    def version(self, order: Mapping[str, Any]) -> str:
        """The version to send back for ``order``: the one seen when the change was first typed, so that a
        change made meanwhile by someone else still ends in the conflict page, never overwritten."""
        return self.seen.get(str(order.get("id"))) or str((order.get("meta") or {}).get("versionId") or "")


def _whole(raw: str, name: str, what: str, problems: dict[str, str]) -> int:
    raw = raw.strip()
    if not raw:
        problems[name] = f"Give the {what}."
    elif not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        problems[name] = f"The {what} must be a whole number (got '{raw[:20]}')."
    else:
        return int(raw)
    return 0


# orders_model.schedule_problems speaks the order form's field names; the plan's modify form has shorter ones
_SCHEDULE_FIELDS = {"frequency": "frequency", "duration_weeks": "weeks", "session_minutes": "minutes"}


def _change_from_form() -> tuple[Change | None, ChangeForm]:
    """The posted change, or None with the problems by field in the ChangeForm (never an exception for a person's
    mistake: the caller shows the plan page again with what was typed)."""
    form = request.form
    action = form.get("action", "")
    typed = ChangeForm(
        plan=form.get("plan", ""), action=action, reason=form.get("reason", "").strip()[:500],
        technique={k[len("technique-"):]: v for k, v in form.items() if k.startswith("technique-") and v},
        sites=[s for s in form.getlist("site") if s], add_site=form.get("add_site", ""),
        add_side=form.get("add_side", ""), frequency=form.get("frequency", ""), weeks=form.get("weeks", ""),
        minutes=form.get("minutes", ""),
        seen={k[2:]: v[:64] for k, v in form.items() if k.startswith("v-") and v})
    problems = typed.problems
    if action not in ACTIONS and action != "modify":
        problems["action"] = "Choose what to do with the order: hold, resume, revoke, complete or change it."
        return None, typed
    only = form.get("order") or None
    sites = schedule = None
    if action == "modify":
        unknown = sorted({t for t in typed.technique.values() if t not in TECHNIQUES})
        if unknown:
            problems["technique"] = (f"Unknown technique {', '.join(repr(t[:40]) for t in unknown)}; "
                                     "pick one from the list.")
        picked = list(typed.sites)
        if typed.add_site:
            picked.append(f"{typed.add_site}:{typed.add_side}" if typed.add_side else typed.add_site)
        sites = tuple(dict.fromkeys(picked))
        site_words = [p for p in (site_problem(s) for s in sites) if p]
        if not sites:
            site_words.append("Keep or add at least one body site: an order treats at least one.")
        if site_words:
            problems["site"] = " ".join(site_words)
        numbers = (_whole(typed.frequency, "frequency", "number of sessions a week", problems),
                   _whole(typed.weeks, "weeks", "number of weeks", problems),
                   _whole(typed.minutes, "minutes", "session length in minutes", problems))
        if not {"frequency", "weeks", "minutes"} & problems.keys():
            for name, words in schedule_problems(*numbers).items():
                problems[_SCHEDULE_FIELDS[name]] = words
        schedule = Schedule(*numbers)
    if problems:
        return None, typed
    return Change(action, typed.reason, only, typed.technique, sites, schedule), typed


def _plan_orders(client: FhirClient, key: str, names: dict[str, str] | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The plan's orders as they are now (one search) and their fulfilment Tasks, by order ref; the names of the
    ordering physicians go into ``names`` when given (for the covering note)."""
    found = client.search_all("ServiceRequest", [("patient", g.ctx.patient_id), ("code", f"{TECHNIQUE_SYSTEM}|"),
                                                 ("_revinclude", "Task:focus"),
                                                 ("_include", "ServiceRequest:requester"), ("_count", "200")])
    if names is not None:
        names.update(person_names([r for r in found if r.get("resourceType") in ("Practitioner", "PractitionerRole")]))
    orders = [r for r in found if r.get("resourceType") == "ServiceRequest"
              and (pv.requisition_of(r) or f"ServiceRequest/{r.get('id')}") == key]
    tasks: dict[str, dict[str, Any]] = {}
    for t in found + _missing_tasks(client, orders + [t for t in found if t.get("resourceType") == "Task"]):
        if t.get("resourceType") == "Task" and "fulfill" in {c.get("code") for c in codings(t.get("code"))}:
            k = co.ref_key(t.get("focus"))
            if k and t.get("status") not in ("entered-in-error",):
                tasks.setdefault(k, t)
    return orders, tasks


def apply_change(change: Change, sr: Mapping[str, Any], *, author_ref: str, now: datetime) -> dict[str, Any] | None:
    """The order after ``change`` (None when the change does not concern it: another order of the plan, or a
    status it cannot take from here). Raises InvalidInput for a change that makes no sense."""
    if change.only and sr.get("id") != change.only:
        return None
    if change.action in ACTIONS:
        target, allowed = ACTIONS[change.action]
        if sr.get("status") not in allowed:
            return None
        return order_status_update(sr, change.action, reason_text=change.reason or None, author_ref=author_ref,
                                   now=now)
    if sr.get("status") not in ("draft", "active", "on-hold"):
        return None
    technique = change.technique.get(str(sr.get("id")))
    technique = technique if technique and technique not in pv.order_techniques(sr) else None
    sites = change.sites if change.sites is not None and tuple(change.sites) != pv.order_sites(sr) else None
    schedule = change.schedule if change.schedule and _schedule_of(sr) != {
        "frequency": change.schedule.frequency, "weeks": change.schedule.duration_weeks,
        "minutes": change.schedule.session_minutes} else None
    if technique is None and sites is None and schedule is None:
        return None  # a reason alone is not a change to the order
    return modify_order(sr, technique=technique, sites=sites, schedule=schedule,
                        reason_text=change.reason or None, author_ref=author_ref, now=now)


def change_transaction(change: Change, orders: Sequence[Mapping[str, Any]], tasks: Mapping[str, Mapping[str, Any]],
                       seen_versions: Mapping[str, str], *, author_ref: str, now: datetime,
                       physician_refs: Sequence[str] | None = None,
                       names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ONE transaction: each changed order with If-Match = the version the physician saw, each Task following its
    order with If-Match = the Task's version as read, and a Provenance (UPDATE) for all of them.

    Who may change an order: any physician this EHR lets update orders (a covering physician acts on a colleague's
    orders). Authorship is never moved silently: ``requester`` stays the ordering physician, the Provenance author
    is ``author_ref`` (the acting user), and an order whose requester is not among ``physician_refs`` (the acting
    user's references; default: ``author_ref`` alone) also gets a note by the acting user saying so, naming the
    ordering physician from ``names`` (reference -> name) where known."""
    mine = set(physician_refs or [author_ref])
    entries, targets = [], []
    for sr in orders:
        oid = str(sr.get("id"))
        updated = apply_change(change, sr, author_ref=author_ref, now=now)
        if updated is None:
            continue
        if co.ref_key(sr.get("requester")) not in mine:
            updated = covering_note(updated, sr, change, author_ref=author_ref, now=now, names=names)
        version = seen_versions.get(oid)
        if not version:
            raise InvalidInput("The form did not say which version of the order you saw; reload the plan.")
        entries.append(request_entry("PUT", f"ServiceRequest/{oid}", updated, if_match=version))
        targets.append({"reference": f"ServiceRequest/{oid}"})
        task = tasks.get(f"ServiceRequest/{oid}")
        if task is None or not (task.get("meta") or {}).get("versionId"):
            continue
        new_task = None
        if updated.get("status") != sr.get("status"):
            new_task = task_follow_order(task, updated["status"], now=now)
        elif change.schedule is not None and updated.get("occurrenceTiming") != sr.get("occurrenceTiming"):
            techs = pv.order_techniques(updated)
            new_task = pv.task_follow_schedule(task, change.schedule, techs[0] if techs else None, now=now)
        if new_task is not None:
            entries.append(request_entry("PUT", f"Task/{task['id']}", new_task,
                                         if_match=str(task["meta"]["versionId"])))
            targets.append({"reference": f"Task/{task['id']}"})
    if not entries:
        raise InvalidInput({"hold": "No active order in this plan to put on hold.",
                            "resume": "No order of this plan is on hold.",
                            "revoke": "No order of this plan can be revoked (they are finished already).",
                            "complete": "No order of this plan is active or on hold.",
                            "modify": "Nothing was changed: the order already says that."}[change.action])
    prov = provenance(targets, author_ref=author_ref, now=now, activity="UPDATE")
    entries.append(provenance_entry(prov, f"plan-change/{uuid.uuid4()}", mode="put"))
    return transaction_bundle(entries)


@bp.post("/action")
@require_launch
def action() -> Any:
    ctx = g.ctx
    why = _may_act()
    if why:
        abort(403, description=why)
    key = request.form.get("plan", "")
    change, typed = _change_from_form()
    if change is None:
        return render_plan(typed, 422)
    seen = {k[2:]: v for k, v in request.form.items() if k.startswith("v-") and v}
    client = fhir_client()
    names: dict[str, str] = {}
    orders, tasks = _plan_orders(client, key, names)
    if not orders:
        abort(404, description="That plan is not in this patient's chart (any more).")
    now = _now()
    mine = my_refs(client, ctx.user_ref)
    for attempt in (1, 2):
        try:
            bundle = change_transaction(change, orders, tasks, seen, author_ref=ctx.user_ref, now=now,
                                        physician_refs=mine, names=names)
        except InvalidInput as exc:  # nothing to change, or a change the order cannot take: nothing was written
            typed.problems["form"] = exc.message
            return render_plan(typed, 422)
        try:
            outcome = writes.write(client, bundle)
        except FhirConflict as exc:
            if exc.status != 412:
                raise
            orders, tasks = _plan_orders(client, key, names)
            unchanged = all(seen.get(str(o.get("id"))) == str((o.get("meta") or {}).get("versionId"))
                            for o in orders)
            if attempt == 2 or not unchanged:
                return conflict_page(client, change, key, orders, seen, now)
            # The orders are as the physician saw them; only a Task moved (a session was documented meanwhile).
            # The Task follows from its fresh version, so one more try overwrites nothing.
            continue
        if not outcome.complete:
            # An EHR without transactions (fhir_massage.writes): the orders went first, one PUT each, and a later
            # write failed. What landed stays (there is no rollback); say exactly what, and nothing more is tried.
            raise PartialWrite(outcome, what=_PLAN_WHAT)
        break
    return redirect(url_for("plan.index", done=change.action), code=303)


def covering_note(updated: dict[str, Any], sr: Mapping[str, Any], change: Change, *, author_ref: str,
                  now: datetime, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A change by someone other than the ordering physician says so in the order itself (R4 ServiceRequest.note,
    an Annotation with authorReference), next to the reason note if there is one: readers of the order who never
    open its Provenance still see that the order was changed by another physician."""
    who = sr.get("requester") if isinstance(sr.get("requester"), Mapping) else {}
    ref = co.ref_key(who)
    name = ((names or {}).get(ref or "") or (who.get("display") if isinstance(who.get("display"), str) else None)
            or ref or "no one named")
    text = (f"{ACTION_LABELS[change.action]}: done by a physician other than the ordering one ({name}); the "
            "ordering physician is unchanged.")
    return {**updated, "note": list(updated.get("note") or []) + [annotation(text, author_ref=author_ref, time=now)]}


_PLAN_WHAT = {"ServiceRequest": "an order change", "Task": "the therapists' task following the order",
              "Provenance": "the record of who changed it (Provenance)", "DetectedIssue": "the finding"}


def conflict_page(client: FhirClient, change: Change, key: str, current: Sequence[Mapping[str, Any]],
                  seen: Mapping[str, str], now: datetime) -> Any:
    """412: someone changed the order after the physician read it. Show, per order, the version they saw, what
    they wanted (their change applied to it) and what the chart holds now; offer to apply the change again on top
    of the current version or keep it. Nothing was written."""
    versions = []
    for sr in current:
        oid = str(sr.get("id"))
        seen_v = seen.get(oid)
        seen_sr = None
        if seen_v and seen_v != str((sr.get("meta") or {}).get("versionId")):
            try:
                seen_sr = client.vread("ServiceRequest", oid, seen_v)
            except FhirError:
                seen_sr = None
        base = seen_sr or sr
        try:
            wanted = apply_change(change, base, author_ref=g.ctx.user_ref, now=now)
        except InvalidInput:
            wanted = None
        rows = pv.version_diff(seen_sr, wanted or base, sr)
        changed_by = co.ref_key(((sr.get("note") or [{}])[-1] or {}).get("authorReference"))
        versions.append({"order": sr, "seen_version": seen_v, "current_version": (sr.get("meta") or {}).get(
            "versionId"), "rows": rows, "stale": seen_v != str((sr.get("meta") or {}).get("versionId")),
            "still_applies": wanted is not None, "changed_by": changed_by,
            "title": ", ".join(TECHNIQUE_DISPLAY.get(t, t) for t in pv.order_techniques(sr)) or "Order"})
    return render_template("plan/conflict.html", versions=versions, change=change, key=key,
                           action_label=ACTION_LABELS[change.action]), 409


# -- findings: record a new one on the plan, mark an open one reviewed -----------------------------------------

FINDING_SYSTEM = f"{IDENTIFIER_BASE}/plan-finding"


def _mitigation(text: str, *, author_ref: str, now: datetime) -> dict[str, Any]:
    # R4 DetectedIssue.mitigation: action 1..1 (CodeableConcept, example binding: text is enough), date, author
    return {"action": {"text": text}, "date": instant(now), "author": {"reference": author_ref}}


@bp.post("/finding")
@require_launch
def record_finding() -> Any:
    """Write a finding that is new since signing onto the plan (DetectedIssue, status final, implicating the
    plan's orders), optionally with what the physician did about it. The chart is screened again here rather
    than trusting the form: what is written is what the chart says now."""
    ctx = g.ctx
    why = _may_act()
    if why or not ctx.can("DetectedIssue", "create"):
        abort(403, description=why or "The EHR did not grant this app permission to record findings.")
    key, rule = request.form.get("plan", ""), request.form.get("rule", "")
    text = request.form.get("mitigation", "").strip()[:500]
    client = fhir_client()
    data = load(client, ctx.patient_id, user_ref=ctx.user_ref)
    now = _now()
    cards, *_ = build_cards(data, today=now.date(), now=now, physician_refs=physician_refs_of(data),
                            patient_ref=f"Patient/{ctx.patient_id}")
    card = next((c for c in cards if c.group.key == key), None)
    found = next((f for f in (card.new_findings if card else []) if f["_rule"] == rule), None)
    if found is None:
        return redirect(url_for("plan.index", done="finding-gone"), code=303)
    issue = {k: v for k, v in found.items() if not k.startswith("_")}
    evidence = ",".join(sorted(found["_new_evidence"]))
    ident = {"system": FINDING_SYSTEM, "value": f"{key}:{rule}:{uuid.uuid5(uuid.NAMESPACE_URL, evidence)}"}
    issue["identifier"] = [ident] + list(issue.get("identifier") or [])
    issue["status"] = "final"
    issue["author"] = {"reference": ctx.user_ref}
    if text:
        issue["mitigation"] = [_mitigation(text, author_ref=ctx.user_ref, now=now)]
    full_url = f"urn:uuid:{uuid.uuid4()}"
    prov = provenance([{"reference": full_url, "identifier": ident}], author_ref=ctx.user_ref, now=now)
    outcome = writes.write(client, transaction_bundle([
        request_entry("POST", "DetectedIssue", issue, full_url=full_url,
                      if_none_exist=[("identifier", f"{ident['system']}|{ident['value']}")]),
        provenance_entry(prov, f"plan-finding/{ident['value']}", mode="put")]))
    if not outcome.complete:  # no transactions here: the finding landed, its Provenance did not
        raise PartialWrite(outcome, what=_PLAN_WHAT)
    return redirect(url_for("plan.index", done="finding"), code=303)


@bp.post("/review")
@require_launch
def review_issue() -> Any:
    """Mark an open finding reviewed: a mitigation added with If-Match (a 412 is the 'someone else changed this
    record' page; nothing is overwritten)."""
    ctx = g.ctx
    why = _may_act()
    if why or not ctx.can("DetectedIssue", "update"):
        abort(403, description=why or "The EHR did not grant this app permission to update findings.")
    ref, version = request.form.get("issue", ""), request.form.get("version", "")
    text = request.form.get("mitigation", "").strip()[:500] or "Reviewed by the ordering physician"
    if not ref.startswith("DetectedIssue/") or not version:
        raise InvalidInput("The form is incomplete; reload the plan and try again.")
    client = fhir_client()
    issue = client.read("DetectedIssue", ref.split("/", 1)[1])
    if co.ref_key(issue.get("patient")) != f"Patient/{ctx.patient_id}":
        abort(404)
    updated = {**issue, "mitigation": list(issue.get("mitigation") or [])
               + [_mitigation(text, author_ref=ctx.user_ref, now=_now())]}
    client.update(updated, if_match=version)
    return redirect(url_for("plan.index", done="reviewed"), code=303)


# ---------------------------------------------------------------------------------------------------------------
# The physician's panel


def _panel_missing() -> list[str]:
    """The user-level read scopes the panel needs and the launch lacks (SMART v2 spelling)."""
    ctx = g.ctx
    have = {(rtype, frozenset(letters)) for c, rtype, letters, q in ctx.scopes.grants if c == "user" and not q}
    missing = []
    for rtype in PANEL_NEEDS + RESCREEN_NEEDS:
        if not any(t in (rtype, "*") and {"r", "s"} <= set(letters) for t, letters in have):
            missing.append(rtype)
    return missing


@bp.get("/panel")
@require_launch(roles=(identity.PHYSICIAN,))
def panel() -> Any:
    ctx = g.ctx
    missing = _panel_missing()
    if missing or not ctx.user_ref:
        return render_template("plan/panel_scopes.html", missing=missing, user_known=bool(ctx.user_ref)), 200
    client = fhir_client()
    before = client.request_count
    now = _now()
    patients = load_panel(client, ctx.user_ref, today=now.date(), now=now)
    confined = any(c == "patient" for c, *_ in ctx.scopes.grants)
    return render_template("plan/panel.html", patients=patients, confined=confined,
                           round_trips=client.request_count - before)


@dataclass
class PanelPatient:
    patient_ref: str
    name: str
    score: int
    reasons: list[str]
    plans: int
    sessions_done: int
    adherence: float | None
    last_session: date | None
    is_current: bool


def load_panel(client: FhirClient, user_ref: str, *, today: date, now: datetime) -> list[PanelPatient]:
    """The physician's patients with active massage orders, most in need of attention first. First who the
    physician is (``my_refs``: their Practitioner and every PractitionerRole of it, since an EHR may file an order
    or a message under either); then two batches: the orders requested under any of those references (comma = OR,
    search.html#combining) with Tasks, sessions and the patients, and the messages to and from any of them; then, per
    patient, the pain scores, findings and chart for the re-screen - all patients in the same second batch."""
    mine = my_refs(client, user_ref) or [user_ref]
    anyone = ",".join(mine)
    first = [
        ("orders", "ServiceRequest?" + _q([("requester", anyone), ("status", "active"),
                                          ("code", f"{TECHNIQUE_SYSTEM}|"), ("_revinclude", "Task:focus"),
                                          ("_revinclude", "Procedure:based-on"),
                                          ("_include", "ServiceRequest:subject"), ("_count", "200")])),
        ("messages", "Communication?" + _q([("recipient", anyone), ("_count", "500")])),
        # the physician's own replies: without them every answered thread would still read "unread"
        ("sent", "Communication?" + _q([("sender", anyone), ("_count", "500")])),
    ]
    answers = entry_outcomes(batch_or_each(client, batch_bundle([request_entry("GET", u) for _, u in first])))
    got: dict[str, list[dict[str, Any]]] = {}
    for (key, _), result in zip(first, answers):
        if isinstance(result, FhirError):
            if result.status in (401, 403):
                raise result
            got[key] = []
            continue
        got[key] = _pages(client, result.resource or {}, key, [])
    found = got.get("orders", [])
    patients = {f"Patient/{r['id']}": r for r in found if r.get("resourceType") == "Patient"}
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        if r.get("resourceType") == "ServiceRequest":
            pref = co.ref_key(r.get("subject"))
            if pref:
                by_patient.setdefault(pref, []).append(r)
    if not by_patient:
        return []
    second: list[tuple[str, str]] = []
    for pref in sorted(by_patient):
        pid = pref.split("/", 1)[1]
        for key, url in plan_searches(pid, with_chart=True):
            if key in ("orders", "messages", "patient"):
                continue
            second.append((f"{pref}|{key}", url))
    per: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in by_patient}
    answers = entry_outcomes(batch_or_each(client, batch_bundle([request_entry("GET", u) for _, u in second])))
    for (key, _), result in zip(second, answers):
        pref, _, what = key.partition("|")
        if isinstance(result, FhirResult) and isinstance(result.resource, dict):
            per[pref][what] = _pages(client, result.resource, what, [])
        else:
            per[pref][what] = [_outcome(what, result if isinstance(result, Exception) else Exception("?"))]
    found = found + _missing_tasks(client, found)
    others = [r for r in found if r.get("resourceType") in ("Task", "Procedure")]
    messages = _unique([m for m in got.get("messages", []) + got.get("sent", [])
                        if m.get("resourceType") == "Communication"])
    out = []
    for pref, srs in by_patient.items():
        data = PlanData(patient=patients.get(pref), service_requests=srs,
                        tasks=[t for t in others if t["resourceType"] == "Task"],
                        procedures=_unique([p for p in others if p["resourceType"] == "Procedure"]
                                           + [p for p in per[pref].get("chart:Procedure", [])
                                              if p.get("resourceType") == "Procedure"]),
                        observations=[o for o in per[pref].get("pain", []) if o.get("resourceType") == "Observation"],
                        issues=[i for i in per[pref].get("issues", []) if i.get("resourceType") == "DetectedIssue"],
                        communications=[m for m in messages if co.ref_key(m.get("subject")) == pref])
        data.chart = ([data.patient] if data.patient else []) + [
            r for k, v in per[pref].items() if k.startswith("chart:") for r in v]
        cards, _other, _w, att = build_cards(data, today=today, now=now, physician_refs=mine,
                                             patient_ref=pref)
        reasons = [r for a in att for r in a.reasons]
        adh = [c.group.adherence for c in cards if c.group.adherence is not None]  # per plan, in visits
        lasts = [c.group.last_session for c in cards if c.group.last_session]
        out.append(PanelPatient(pref, identity.human_name(data.patient) or pref, sum(a.score for a in att), reasons,
                                len(cards), sum(c.group.sessions_done for c in cards),
                                min(adh) if adh else None, max(lasts) if lasts else None,
                                pref == f"Patient/{g.ctx.patient_id}" if g.get("ctx") else False))
    out.sort(key=lambda p: (-p.score, p.name))
    return out
