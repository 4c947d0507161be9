"""Ordering (issue 6): a physician screens the chart, orders medical massage, overrides or acknowledges what the
screen found, and signs; the order is written back as ONE idempotent transaction (entry by entry, order first,
where the EHR takes no transactions: fhir_massage.writes).

Routes (``/p/<lsid>/orders``):

* ``GET  /``                    a new draft (or the reason ordering is unavailable) -> 303 to the draft;
* ``GET  /draft/<draft_id>``    the order page: screening summary first, then the form (works without JavaScript);
* ``POST /screen``              JSON: the form fields in -> verdict, findings, sites to mark, field messages, and the
                                summary's HTML (orders.js swaps it in); keeps the fields in the draft;
* ``POST /sign``                checks, then the transaction -> 303 to the confirmation (POST-redirect-GET); on an
                                EHR failure the page again, with what happened and the draft intact;
* ``GET  /done/<draft_id>``     the confirmation.

Drafts live in the store (namespace ``order-draft``, keyed by a random draft id that the form carries as a hidden
field); every identifier of the transaction derives from it (builders/order.py), so a double click, a browser
retry or a network retry writes one order. The chart is fetched once per launch session and kept in the store a
few minutes (``ORDERS_CHART_TTL``), so the live re-screen costs no EHR round trip.

Config: ``ORDERS_CHART_TTL`` (s, default 300), ``ORDERS_SIGN_CHART_AGE`` (s, default 60: signing refetches an
older chart), ``ORDERS_VALIDATE`` (check every resource against our profiles before
sending; default on under TESTING or DEBUG), ``ORDERS_TODAY`` (ISO date to screen as of; tests only).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import date, datetime, timezone
from typing import Any, Mapping

from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest, Gone

from fhir_massage import validation
from fhir_massage.builders.order import ORDER_ID_SYSTEM, order_identifier
from fhir_massage.chart import from_resources
from fhir_massage.chart_fetch import fetch_chart_resources
from fhir_massage.codes import TECHNIQUE_DISPLAY, TECHNIQUES
from fhir_massage.errors import FhirAuthError, FhirError, InvalidResource
from fhir_massage.knowledge import Site as KbSite
from fhir_massage.knowledge import load_kb
from fhir_massage.orders_model import LATERALITIES, _sites as known_sites
from fhir_massage.screening import screen
from fhir_massage.units import quantity_text

from . import forms, identity, writes
from .launch import LaunchContext, fhir_client, require_launch

log = logging.getLogger("smart_app.orders")

bp = Blueprint("orders", __name__, url_prefix="/p/<lsid>/orders")

NS_DRAFT = "order-draft"
NS_CHART = "order-chart"

# What signing writes (one transaction: ServiceRequest, Task, DetectedIssue, Provenance): each needs create.
NEEDED_WRITES = ("ServiceRequest", "Task", "DetectedIssue", "Provenance")

VERDICT_TEXT = {
    "clear": "Clear: nothing in the chart speaks against this order.",
    "caution": "Caution: read the findings before signing.",
    "contraindicated": "Contraindicated: signing needs an override with a reason.",
}
CLASS_LABEL = {"absolute": "Absolute contraindication", "relative": "Relative contraindication",
               "local": "Local contraindication (site)"}
EVIDENCE_CLASS = {"EV": "published clinical evidence", "CONS": "consensus / professional convention",
                  "MECH": "mechanistic reasoning only"}


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _store() -> Any:
    return current_app.extensions["store"]


def _ttl() -> float:
    return float(current_app.config.get("SESSION_TTL", 8 * 3600))


def _today() -> date:
    fixed = current_app.config.get("ORDERS_TODAY")
    return date.fromisoformat(fixed) if fixed else date.today()


def _validate_enabled() -> bool:
    cfg = current_app.config
    value = cfg.get("ORDERS_VALIDATE")
    return bool(cfg.get("TESTING") or cfg.get("DEBUG")) if value is None else bool(value)


def unavailable_reason(ctx: LaunchContext) -> tuple[str, str, list[str]] | None:
    """(title, explanation, missing scopes) when this launch cannot order; None when it can."""
    if ctx.role != identity.PHYSICIAN:
        label = ctx.role_label.lower() if ctx.role else ""
        who = (f"{'an' if label[:1] in 'aeiou' else 'a'} {label}" if label else "a user without a known role")
        return ("Ordering is for physicians",
                f"You are signed in as {who}. Only the ordering physician can order medical massage; therapists "
                "see the orders in the plan and document sessions against them.", [])
    if not ctx.patient_id:
        return ("No patient", "The EHR opened the app without a patient. Open it from the patient's chart.", [])
    missing = [rtype for rtype in NEEDED_WRITES if not ctx.can(rtype, "create")]
    if missing:
        scopes = [f"patient/{r}.c (SMART v2) or patient/{r}.write (v1)" for r in missing]
        return ("Ordering is unavailable",
                "The EHR did not grant this app permission to write an order for this patient. Signing writes the "
                "order, its fulfilment task, the screening findings and their provenance together, and the "
                "granted permissions do not allow creating: " + ", ".join(missing) + ". Ask your EHR administrator "
                "to allow these scopes for the app, then open it again.", scopes)
    if not ctx.user_ref:
        return ("Ordering is unavailable",
                "The EHR did not say who is signed in (no fhirUser), so the order would have no ordering "
                "physician. Open the app again from the EHR.", [])
    return None


def _load_draft(draft_id: str | None) -> dict[str, Any]:
    ctx: LaunchContext = g.ctx
    if not draft_id or len(draft_id) > 64:
        raise BadRequest("This order form is missing its draft id; start a new order.")
    rec = _store().get(NS_DRAFT, draft_id)
    if rec is None or rec.get("lsid") != ctx.sid or rec.get("patient") != ctx.patient_id:
        # 410: the draft existed or never belonged here; either way it cannot be used (and says so in words)
        raise Gone("This order draft is not part of this app session (it may have expired). Start a new order "
                   "from the app's start page.")
    return rec


def _save_draft(draft_id: str, rec: Mapping[str, Any]) -> None:
    _store().put(NS_DRAFT, draft_id, dict(rec), _ttl())


def chart_resources(ctx: LaunchContext, *, max_age: float | None = None) -> list[dict[str, Any]]:
    """The patient's chart for screening: fetched once (one batch), then kept in the store for a few minutes.
    ``max_age``: refetch when the kept copy is older (signing screens a chart at most a minute old, so a problem
    entered in the EHR while the physician was filling the form is still seen before the order is written)."""
    store = _store()
    cached = store.get(NS_CHART, ctx.sid)
    if cached and cached.get("patient") == ctx.patient_id and (
            max_age is None or time.time() - float(cached.get("fetched") or 0) <= max_age):
        return cached["resources"]
    resources = fetch_chart_resources(fhir_client(), ctx.patient_id)
    store.put(NS_CHART, ctx.sid, {"patient": ctx.patient_id, "resources": resources, "fetched": time.time()},
              float(current_app.config.get("ORDERS_CHART_TTL", 300)))
    return resources


def active_conditions(resources: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The patient's conditions a physician may give as the order's reason: not resolved, not refuted."""
    out = []
    for r in resources:
        if r.get("resourceType") != "Condition" or not r.get("id"):
            continue
        clinical = _code_of(r.get("clinicalStatus"))
        verification = _code_of(r.get("verificationStatus"))
        if clinical in ("inactive", "resolved", "remission") or verification in ("refuted", "entered-in-error"):
            continue
        code = r.get("code") or {}
        label = code.get("text") or next((c.get("display") for c in code.get("coding") or [] if c.get("display")),
                                         None) or "Condition without a name"
        onset = r.get("onsetDateTime") or (r.get("onsetPeriod") or {}).get("start") or r.get("recordedDate")
        out.append({"ref": f"Condition/{r['id']}", "label": str(label),
                    "onset": str(onset)[:10] if isinstance(onset, str) else ""})
    return sorted(out, key=lambda c: c["label"].lower())


def _code_of(concept: Any) -> str | None:
    for c in (concept or {}).get("coding") or [] if isinstance(concept, dict) else []:
        if isinstance(c, dict) and c.get("code"):
            return str(c["code"])
    return None


def site_text(site: Any) -> str:
    code, side = (site.code, site.laterality) if hasattr(site, "code") else (str(site).split(":") + [None])[:2]
    display = known_sites().get(code, (f"body site {code}", False))[0]
    if not side:
        return display
    if side == "bilateral":
        return f"{display}, both sides"
    return f"{side.capitalize()} {display.lower()}"


def marked_sites(screening: Any, techniques: list[str] | None) -> list[str]:
    """Diagram keys (``code`` or ``code:side``) a blocking finding (absolute or local, for the chosen techniques)
    concerns; whole-body findings are left to the verdict (marking every region would hide which one matters)."""
    kb = load_kb()
    chosen = set(techniques or TECHNIQUES)
    regions = []
    for code, (_display, lateral) in known_sites().items():
        regions += [(code, s) for s in ("left", "right")] if lateral else [(code, None)]
    out: list[str] = []
    for f in screening.findings:
        if f.cls not in ("absolute", "local") or not (set(f.techniques) & chosen):
            continue
        for site in f.sites:
            if site.code == kb.root_site:
                continue
            for code, side in regions:
                key = f"{code}:{side}" if side else code
                if key not in out and kb.overlaps(site, KbSite(code, side)):
                    out.append(key)
    return out


def finding_views(screening: Any, actions: list[forms.Action]) -> list[dict[str, Any]]:
    by_rule = {a.rule: a for a in actions}
    applicable = set(screening.applicable)
    order = {"absolute": 0, "local": 1, "relative": 2}
    views = []
    for f in screening.findings:
        evidence = []
        for d in f.details:
            bits = [f"{k} {v}" for k, v in d.dates.items()]
            if d.value is not None:
                bits.insert(0, quantity_text(d.value, d.unit))  # "38.9 °C", not the UCUM code "38.9 Cel"
            if d.status:
                bits.append(d.status)
            code = d.code
            evidence.append({
                "display": d.display, "ref": d.ref, "facts": ", ".join(bits), "note": d.note,
                "unconfirmed": d.unconfirmed,
                "code": f"{code.system.rsplit('/', 1)[-1]} {code.code}" if code else None,
                "unverified": bool(code and not code.verified),
            })
        views.append({
            "rule": f.rule, "cls": f.cls, "cls_label": CLASS_LABEL.get(f.cls, f.cls), "title": f.title or f.rule,
            "message": f.message, "evidence": evidence, "evidence_class": f.evidence_class,
            "evidence_class_label": EVIDENCE_CLASS.get(f.evidence_class, f.evidence_class), "source": f.source,
            "verified": f.verified, "applies": f.rule in applicable, "informational": f.informational,
            "unconfirmed": f.unconfirmed, "sites": [site_text(s) for s in f.sites],
            "techniques": [TECHNIQUE_DISPLAY.get(t, t) for t in f.techniques],
            "action": by_rule.get(f.rule),
        })
    views.sort(key=lambda v: (not v["applies"], order.get(v["cls"], 3)))
    return views


def review_views(actions: list[forms.Action]) -> list[dict[str, Any]]:
    """The needs-review entries with their acknowledgement checkbox (``ack-review-<key>``)."""
    return [{"field": f"ack-{a.rule}", "label": forms.review_label(a.item or {}),
             "reason": (a.item or {}).get("reason"), "evidence": (a.item or {}).get("evidence"), "done": a.done}
            for a in actions if a.kind == "review"]


class _Evaluation:
    """One pass over the form: parsed draft, screening, required actions, messages."""

    def __init__(self, ctx: LaunchContext, draft_id: str, fields: Mapping[str, Any], resources: list[dict[str, Any]],
                 now: datetime) -> None:
        self.fields = fields
        self.conditions = active_conditions(resources)
        self.parsed = forms.parse_order_form(
            fields, draft_id=draft_id, patient_ref=f"Patient/{ctx.patient_id}",
            requester_ref=ctx.user_ref or "", authored=now,
            encounter_ref=f"Encounter/{ctx.encounter_id}" if ctx.encounter_id else None,
            known_conditions=[c["ref"] for c in self.conditions])
        self.draft = self.parsed.draft
        self.techniques, sites = forms.screen_inputs(self.draft)
        self.screening = screen(from_resources(resources), techniques=self.techniques, sites=sites, today=_today())
        self.actions = forms.required_actions(self.screening, fields)
        self.action_problems = forms.action_problems(self.actions)
        self.marked = marked_sites(self.screening, self.techniques)

    @property
    def problems(self) -> dict[str, str]:
        return {**self.parsed.problems, **self.action_problems}

    def sign_status(self) -> str:
        blocking = sum(1 for a in self.actions if a.kind == "override" and not a.done)
        acks = sum(1 for a in self.actions if a.kind == "acknowledge" and not a.done)
        reviews = sum(1 for a in self.actions if a.kind == "review" and not a.done)
        parts = []
        if blocking:
            parts.append(f"Signing is blocked: {_n(blocking, 'finding needs', 'findings need')} an override with a "
                         "reason.")
        if acks:
            parts.append(f"Acknowledge {_n(acks, 'finding', 'findings')} before signing.")
        if reviews:
            parts.append(f"Confirm you have reviewed {_n(reviews, 'chart entry', 'chart entries')} the app could not "
                         "screen.")
        missing = list(dict.fromkeys(FIELD_WORDS.get(k, k) for k in self.parsed.problems))
        if missing:
            parts.append("Still to complete: " + ", ".join(missing) + ".")
        return " ".join(parts) or "Ready to sign."

    def summary_context(self) -> dict[str, Any]:
        return {
            "verdict": self.screening.verdict, "verdict_text": VERDICT_TEXT[self.screening.verdict],
            "findings": finding_views(self.screening, self.actions), "needs_review": self.screening.needs_review,
            "review_items": review_views(self.actions),
            # allergies to massage products: shown as information, no acknowledgement (required_actions skips them)
            "information": self.screening.information,
            "warnings": self.screening.warnings, "override_reasons": forms.OVERRIDE_REASONS,
            "problems": self.action_problems, "screened_all_techniques": self.techniques is None,
            "screened_on": self.screening.today.isoformat(), "sign_status": self.sign_status(),
        }


def _form_context(ev: _Evaluation, draft_id: str, *, show_problems: bool, error: str | None = None
                  ) -> dict[str, Any]:
    f = forms.as_form(ev.fields)
    chosen_sites = {s.split(":")[0]: (s.split(":") + [""])[1] for s in ev.draft.sites}
    sites = [{"code": code, "display": display, "lateral": lateral, "checked": code in chosen_sites,
              "side": chosen_sites.get(code, "")} for code, (display, lateral) in known_sites().items()]
    selected = []
    for code, side in chosen_sites.items():
        selected.append(f"{code}:{side}" if side else code)
    return {
        "draft_id": draft_id,
        "techniques": [{"key": t, "label": TECHNIQUE_DISPLAY[t], "checked": t in ev.draft.techniques}
                       for t in TECHNIQUES],
        "sites": sites, "sides": list(LATERALITIES), "selected_sites": selected, "marked_sites": ev.marked,
        "conditions": [{**c, "checked": c["ref"] in ev.draft.reason_refs} for c in ev.conditions],
        "values": {k: (f.get(k) or "") for k in forms.FORM_FIELDS},
        "pressures": ("light", "moderate", "firm"),
        "form_problems": ev.parsed.problems if show_problems else {},
        "show_problems": show_problems, "error": error,
        **ev.summary_context(),
        "problems": ev.action_problems if show_problems else {},
    }


FIELD_WORDS = {"techniques": "technique", "sites": "body sites", "reason_text": "reason", "reason_refs": "reason",
               "frequency": "sessions a week", "duration_weeks": "weeks", "session_minutes": "session length",
               "pressure": "pressure", "requester_ref": "ordering physician", "patient_ref": "patient"}


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------------------------------------------
# Routes


@bp.get("/")
@require_launch
def index() -> Any:
    ctx: LaunchContext = g.ctx
    why = unavailable_reason(ctx)
    if why is not None:
        title, message, scopes = why
        return render_template("orders/unavailable.html", title=title, message=message, scopes=scopes), 403
    draft_id = str(uuid.uuid4())
    fields = {k: [v] for k, v in forms.DEFAULTS.items()}
    _save_draft(draft_id, {"lsid": ctx.sid, "patient": ctx.patient_id, "fields": fields, "status": "draft",
                           "created": time.time(), "attempts": 0})
    return redirect(url_for("orders.draft", draft_id=draft_id), code=303)


def _require_can_order() -> None:
    why = unavailable_reason(g.ctx)
    if why is not None:
        abort(403, description=f"{why[0]}. {why[1]}")


@bp.get("/draft/<draft_id>")
@require_launch
def draft(draft_id: str) -> Any:
    ctx: LaunchContext = g.ctx
    why = unavailable_reason(ctx)
    if why is not None:
        return render_template("orders/unavailable.html", title=why[0], message=why[1], scopes=why[2]), 403
    rec = _load_draft(draft_id)
    if rec.get("status") == "signed":
        return redirect(url_for("orders.done", draft_id=draft_id), code=303)
    ev = _Evaluation(ctx, draft_id, rec["fields"], chart_resources(ctx), _now())
    return render_template("orders/form.html", **_form_context(ev, draft_id, show_problems=False))


@bp.post("/screen")
@require_launch
def screen_json() -> Response:
    """The live re-screen: the form fields -> verdict, findings, sites to mark (orders.js)."""
    ctx: LaunchContext = g.ctx
    _require_can_order()
    draft_id = request.form.get("draft_id")
    rec = _load_draft(draft_id)
    fields = forms.fields_from_form(request.form)
    if rec.get("status") != "signed":
        rec["fields"] = fields
        _save_draft(draft_id, rec)  # nothing typed is lost, even without signing
    ev = _Evaluation(ctx, draft_id, fields, chart_resources(ctx), _now())
    summary = ev.summary_context()
    html = render_template("orders/_screening.html", **summary)
    return current_app.response_class(__import__("orjson").dumps({
        "verdict": ev.screening.verdict, "verdictText": summary["verdict_text"],
        "findings": [{**{k: v for k, v in fv.items() if k != "action"},
                      "action": fv["action"].kind if fv["action"] else None,
                      "actionDone": bool(fv["action"] and fv["action"].done)} for fv in summary["findings"]],
        "needsReview": [dict(n) for n in ev.screening.needs_review],
        "information": [{"rule": i.rule, "title": i.title or i.rule, "message": i.message,
                         "evidence": list(i.evidence)} for i in ev.screening.information],
        "markedSites": ev.marked, "problems": ev.parsed.problems, "signStatus": summary["sign_status"],
        "html": html,
    }), mimetype="application/json")


@bp.post("/sign")
@require_launch
def sign() -> Any:
    ctx: LaunchContext = g.ctx
    _require_can_order()
    draft_id = request.form.get("draft_id")
    _load_draft(draft_id)
    store = _store()
    # One sign at a time per draft: a double click waits here, then finds the draft signed (PRG to the same page).
    with store.lock("order-sign", draft_id, lease=120.0, wait=120.0):
        rec = _load_draft(draft_id)
        if rec.get("status") == "signed":
            return redirect(url_for("orders.done", draft_id=draft_id), code=303)
        fields = forms.fields_from_form(request.form)
        rec["fields"] = fields
        _save_draft(draft_id, rec)
        now = _now()
        fresh = float(current_app.config.get("ORDERS_SIGN_CHART_AGE", 60))
        ev = _Evaluation(ctx, draft_id, fields, chart_resources(ctx, max_age=fresh), now)
        if ev.problems:
            return render_template("orders/form.html", **_form_context(ev, draft_id, show_problems=True)), 422
        client = fhir_client()
        if rec.get("attempts") and writes.atomic(client):
            # An earlier attempt may have been written although its answer was lost: look before writing again
            # (the transaction is all-or-nothing, so finding the order means everything was written). An EHR
            # without transactions gets the Bundle again instead: its conditional creates match what landed and
            # write only what is missing (fhir_massage.writes).
            found = _find_written(client, ev)
            if found is not None:
                return _finish(draft_id, rec, ev, found)
        bundle = _bundle(ev, now)
        if _validate_enabled():
            problems = validation.errors(validation.validate_resource(bundle))
            if problems:
                log.error("order bundle failed profile validation (%d issues)", len(problems))
                raise InvalidResource("The app built an order the EHR's profiles would not accept; nothing was sent. "
                                      "This is a bug in the app.", issues=[p.as_dict() for p in problems])
        rec["attempts"] = int(rec.get("attempts") or 0) + 1
        _save_draft(draft_id, rec)
        try:
            outcome = writes.write(client, bundle)
        except FhirError as exc:
            found = None
            if writes.atomic(client) and (not isinstance(exc, FhirAuthError) or exc.status == 403):
                found = _find_written(client, ev)
            if found is not None:
                return _finish(draft_id, rec, ev, found)
            if isinstance(exc, FhirAuthError) and exc.status == 401:
                raise
            log.info("order transaction refused (%s, status %s); draft kept", exc.code, exc.status)
            return render_template("orders/form.html", **_form_context(ev, draft_id, show_problems=True,
                                                                         error=_failure_text(exc))), \
                (exc.status if exc.status in (409, 412, 422, 429, 503) else 502)
        if not outcome.complete:
            # No transaction here and a write after the first failed: say what is in the chart and what is not,
            # keep the draft (not signed) so "Sign" again finishes only what is missing.
            log.info("order written in part (%d saved, %d not); draft kept", len(outcome.written),
                     len(outcome.failed))
            return render_template("orders/form.html", **_form_context(ev, draft_id, show_problems=True,
                                                                         error=_partial_text(outcome))), 502
        return _finish(draft_id, rec, ev, outcome.by_type(), atomic=outcome.atomic)


def _partial_text(outcome: writes.WriteOutcome) -> str:
    first = outcome.failed[0][1]
    saved = ", ".join(outcome.saved_refs()) or "nothing"
    missing = ", ".join(WHAT.get(t, t) for t in outcome.missing_types())
    return (f"This EHR does not accept all-or-nothing writes, so the order was saved piece by piece, and not all of "
            f"it was saved. Saved in the chart: {saved}. Not saved: {missing} (the EHR said: {first.message[:300]}) "
            "Your order is kept here: sign again to save only what is missing; nothing is written twice.")


WHAT = {"ServiceRequest": "the order (or its link to its findings)", "Task": "the therapists' task",
        "DetectedIssue": "the screening findings", "Provenance": "the authorship record (Provenance)",
        "BodyStructure": "the body sites"}


def _failure_text(exc: FhirError) -> str:
    if exc.status is None and getattr(exc, "atomic", None) is False:
        # Entry by entry (no transactions here) and no answer to the first write: it may have landed.
        return ("The EHR did not answer, so part of the order may have been saved. Your order is kept here: sign "
                "again to finish it; nothing is written twice.")
    status = f" (it answered {exc.status})" if exc.status else " (it could not be reached)"
    text = f"The EHR did not accept the order{status}. Nothing was saved. Your order is kept here: try again."
    if exc.status and 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
        text += " If it keeps failing, the EHR said: " + exc.message[:300]
    return text


def _bundle(ev: _Evaluation, now: datetime) -> dict[str, Any]:
    return forms.order_bundle(ev.draft, ev.screening, ev.actions, now, app_version=_app_version())


def _app_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fhir-massage")
    except Exception:  # not installed as a distribution (a checkout): the app name alone identifies it
        return None


def _find_written(client: Any, ev: _Evaluation) -> dict[str, list[str]] | None:
    """The order already in the EHR for this draft (all techniques' ServiceRequests), or None."""
    if not g.ctx.can("ServiceRequest", "search"):
        return None
    ids = []
    try:
        for technique in ev.draft.techniques:
            ident = order_identifier(ev.draft.draft_id, technique)
            found = client.search("ServiceRequest", [("identifier", f"{ORDER_ID_SYSTEM}|{ident['value']}")])
            hits = [e.get("resource") for e in found.get("entry") or []
                    if (e.get("resource") or {}).get("resourceType") == "ServiceRequest"]
            if not hits:
                return None
            ids.append(hits[0]["id"])
    except FhirError:
        return None
    return {"ServiceRequest": ids}


def _finish(draft_id: str, rec: dict[str, Any], ev: _Evaluation, written: Mapping[str, list[str]], *,
            atomic: bool = True) -> Response:
    actions = {a.rule: a for a in ev.actions}
    rec["status"] = "signed"
    rec["result"] = {
        "written": dict(written),
        "atomic": atomic,
        "signed": time.time(),
        "techniques": [TECHNIQUE_DISPLAY[t] for t in ev.draft.techniques],
        "sites": [s.text for s in ev.draft.parsed_sites()],
        "schedule": ev.draft.schedule.text,
        "reason": [c["label"] for c in ev.conditions if c["ref"] in ev.draft.reason_refs]
        + ([ev.draft.reason_text] if ev.draft.reason_text else []),
        "verdict": ev.screening.verdict,
        "findings": [{"title": f.title or f.rule, "rule": f.rule, "cls": CLASS_LABEL.get(f.cls, f.cls),
                      "applies": f.rule in ev.screening.applicable,
                      "mitigation": (forms.mitigation(actions[f.rule], author_ref="", when="") or {}).get(
                          "action", {}).get("text") if f.rule in actions else None}
                     for f in ev.screening.findings],
        # the needs-review entries the physician confirmed: the same words the ServiceRequest note carries
        "reviewed": forms.review_notes(ev.actions),
    }
    _save_draft(draft_id, rec)
    log.info("order signed (%d order(s))", len(written.get("ServiceRequest", [])))
    return redirect(url_for("orders.done", draft_id=draft_id), code=303)


@bp.get("/done/<draft_id>")
@require_launch
def done(draft_id: str) -> Any:
    rec = _load_draft(draft_id)
    if rec.get("status") != "signed":
        return redirect(url_for("orders.draft", draft_id=draft_id), code=303)
    plan_url = url_for("plan.index") if "plan.index" in current_app.view_functions else None
    return render_template("orders/done.html", result=rec["result"], plan_url=plan_url)
