"""The order form, as plain data: parse the submitted fields into an ``OrderDraft`` plus messages per field, and
decide which screening findings need the physician's action before signing. Pure (no Flask, no I/O), so every rule
here is a unit test away.

Field names (the template and orders.js use the same):

* ``technique`` (repeated): keys of ``codes.TECHNIQUES``;
* ``site`` (repeated): a SNOMED body-structure code; ``side-<code>``: left | right | bilateral for a site that takes a
  side (the no-JavaScript form is a checkbox list plus a side select; the body diagram fills the same fields);
* ``reason_ref`` (repeated): ``Condition/<id>`` from the patient's chart; ``reason_text``: free text;
* ``frequency`` (sessions a week), ``duration_weeks``, ``session_minutes``;
* ``pressure``, ``pressure_note``, ``positioning`` (one precaution a line), ``notes``;
* ``override-<rule>`` (a reason code of ``OVERRIDE_REASONS``) and ``override-note-<rule>`` (free text) for a finding
  that blocks signing; ``ack-<rule>`` for a relative finding the physician acknowledges;
* ``ack-review-<key>`` for a chart entry the engine could not screen (``screening.needs_review``, e.g. a text-only
  "hx of blood clot in leg"): the physician confirms having read it (``review_key`` makes the key).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping, Protocol, Sequence

from fhir_massage.builders.detected_issue import detected_issue
from fhir_massage.builders.order import FINDING_ID_SYSTEM, annotation, meta, order_transaction
from fhir_massage.codes import TECHNIQUE_DISPLAY, TECHNIQUES
from fhir_massage.orders_model import OrderDraft, is_lateralizable, order_problems

__all__ = [
    "DEFAULTS", "OVERRIDE_REASONS", "FORM_FIELDS", "FormData", "ParsedForm", "parse_order_form", "fields_from_form",
    "Action", "required_actions", "action_problems", "mitigation", "screen_inputs", "finding_issues", "order_bundle",
    "review_key", "review_label", "review_notes",
]

# Sensible defaults (issue 6): once a week for six weeks, one-hour sessions.
DEFAULTS: dict[str, str] = {"frequency": "1", "duration_weeks": "6", "session_minutes": "60"}

# Why the physician signs despite an absolute or local finding. Our own list (the v3 ActDetectedIssueManagementCode
# codes that DetectedIssue.mitigation.action prefers are drug-centric, reference/fhir-modelling.md "DetectedIssue");
# written as mitigation.action.text, not as a Coding, because no CodeSystem of ours defines these codes yet.
OVERRIDE_REASONS: tuple[tuple[str, str], ...] = (
    ("clearance-obtained", "Clearance from the treating specialist obtained and documented"),
    ("site-avoided", "The therapist will avoid the affected site"),
    ("technique-modified", "Technique or pressure modified to remove the risk"),
    ("benefit-outweighs-risk", "Benefit outweighs risk (e.g. palliative care)"),
    ("chart-outdated", "Chart data outdated or incorrect"),
)
_OVERRIDE = dict(OVERRIDE_REASONS)

# Scalar fields kept in the draft store (lists are kept whole).
FORM_FIELDS = ("frequency", "duration_weeks", "session_minutes", "reason_text", "pressure", "pressure_note",
               "positioning", "notes")
_LIST_FIELDS = ("technique", "site", "reason_ref")
_MAX_TEXT = 2000
_RULE_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,80}$")


class FormData(Protocol):
    """What a form looks like here: werkzeug's MultiDict, or a dict of lists (the draft store)."""

    def getlist(self, key: str) -> list[str]: ...

    def get(self, key: str, default: Any = None) -> Any: ...


def fields_from_form(form: Any) -> dict[str, list[str]]:
    """The form as a JSON-able dict of lists (what the draft store keeps), only the fields this form knows."""
    out: dict[str, list[str]] = {}
    keys = form.keys() if hasattr(form, "keys") else []
    for key in keys:
        if key in _LIST_FIELDS or key in FORM_FIELDS or key.startswith(("side-", "override-", "ack-")):
            values = form.getlist(key) if hasattr(form, "getlist") else list(form[key])
            out[key] = [str(v)[:_MAX_TEXT] for v in values][:64]
    return out


class _Lists:
    """A dict of lists seen through the FormData protocol."""

    def __init__(self, data: Mapping[str, Sequence[str]]) -> None:
        self.data = data

    def getlist(self, key: str) -> list[str]:
        v = self.data.get(key) or []
        return [v] if isinstance(v, str) else list(v)

    def get(self, key: str, default: Any = None) -> Any:
        values = self.getlist(key)
        return values[0] if values else default


def as_form(data: Any) -> FormData:
    return data if hasattr(data, "getlist") else _Lists(data or {})


@dataclass(frozen=True)
class ParsedForm:
    draft: OrderDraft
    problems: dict[str, str]  # field -> message in plain words (empty: the order can be built)
    values: dict[str, Any] = field(default_factory=dict)  # what to show back in the form


def _int(form: FormData, name: str, problems: dict[str, str], what: str) -> int:
    raw = (form.get(name) or "").strip()
    if raw == "":
        problems[name] = f"Give the {what}."
        return 0
    if not re.fullmatch(r"[+-]?\d{1,6}", raw):
        problems[name] = f"The {what} must be a whole number (got '{raw[:20]}')."
        return 0
    return int(raw)


def parse_sites(form: FormData) -> list[str]:
    """``site`` codes plus their ``side-<code>`` into ``CODE`` / ``CODE:side`` values (order kept, no repeats)."""
    out: list[str] = []
    for code in form.getlist("site"):
        code = code.strip()
        if not code:
            continue
        side = (form.get(f"side-{code}") or "").strip()
        # a side on a site without sides is dropped (the form offers none); an unknown side is kept so that
        # order_problems can name it
        value = f"{code}:{side}" if side and is_lateralizable(code) else code
        if value not in out:
            out.append(value)
    return out


def parse_order_form(data: Any, *, draft_id: str, patient_ref: str, requester_ref: str, authored: datetime,
                     encounter_ref: str | None = None, known_conditions: Iterable[str] | None = None) -> ParsedForm:
    """The submitted form -> (OrderDraft, problems by field). ``known_conditions``: the ``Condition/<id>`` references
    of the chart; a reason outside them is refused (the form only offers those)."""
    form = as_form(data)
    problems: dict[str, str] = {}
    techniques = tuple(dict.fromkeys(t.strip() for t in form.getlist("technique") if t.strip()))
    freq = _int(form, "frequency", problems, "number of sessions a week")
    weeks = _int(form, "duration_weeks", problems, "number of weeks")
    minutes = _int(form, "session_minutes", problems, "session length in minutes")
    reason_refs = tuple(dict.fromkeys(r.strip() for r in form.getlist("reason_ref") if r.strip()))
    pressure = (form.get("pressure") or "").strip() or None
    positioning = tuple(line.strip() for line in (form.get("positioning") or "").splitlines() if line.strip())
    draft = OrderDraft(
        draft_id=draft_id, patient_ref=patient_ref, requester_ref=requester_ref, techniques=techniques,
        sites=tuple(parse_sites(form)), frequency=freq, duration_weeks=weeks, session_minutes=minutes,
        authored=authored, reason_refs=reason_refs, reason_text=(form.get("reason_text") or "").strip()[:_MAX_TEXT],
        pressure=pressure, pressure_note=(form.get("pressure_note") or "").strip()[:_MAX_TEXT],
        positioning=positioning[:10], notes=(form.get("notes") or "").strip()[:_MAX_TEXT],
        encounter_ref=encounter_ref,
    )
    for key, message in order_problems(draft).items():
        problems.setdefault(key, message)  # a parse message ("must be a whole number") is the clearer one
    if known_conditions is not None:
        known = set(known_conditions)
        unknown = [r for r in reason_refs if r not in known]
        if unknown and "reason_refs" not in problems:
            problems["reason_refs"] = "Pick reasons from the patient's conditions listed here."
    return ParsedForm(draft=draft, problems=problems)


# --- what the physician must do about the findings -------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """A finding that needs the physician before signing: ``kind`` override (absolute or local finding that applies
    to the order: blocks signing), acknowledge (relative finding that applies) or review (a chart entry the engine
    could not screen; ``rule`` is then ``review-<review_key>``, ``item`` the needs-review entry)."""

    rule: str
    kind: str  # "override" | "acknowledge" | "review"
    reason: str | None = None  # override reason code
    note: str = ""
    done: bool = False
    item: Mapping[str, Any] | None = None  # the needs-review entry ({"evidence", "reason"}) for kind "review"


def review_key(item: Mapping[str, Any]) -> str:
    """A stable form key for a needs-review entry (they have no rule id): 12 hex digits of a hash of its chart
    reference and reason, so the same entry keeps its checkbox across re-screens and a changed entry asks again."""
    raw = f"{item.get('evidence', '')}\n{item.get('reason', '')}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


_QUOTED_RE = re.compile(r"'([^']{1,120})'")


def review_label(item: Mapping[str, Any]) -> str:
    """The chart entry's own words (the quoted display in the engine's reason), else the reason itself."""
    reason = str(item.get("reason") or "")
    m = _QUOTED_RE.search(reason)
    return m.group(1) if m else reason[:200]


def required_actions(screening: Any, form: Any) -> list[Action]:
    """One Action per finding of ``screening`` that applies to the proposed order (its rule id in ``applicable``),
    filled from the form. Information items (``screening.information``: allergies to massage products) are not
    findings and need nothing; the ``informational`` test below guards screenings built by other code."""
    form = as_form(form)
    applicable = set(screening.applicable)
    out: list[Action] = []
    for f in screening.findings:
        if f.rule not in applicable or f.informational or not _RULE_RE.match(f.rule):
            continue
        if f.cls in ("absolute", "local"):
            reason = (form.get(f"override-{f.rule}") or "").strip() or None
            note = (form.get(f"override-note-{f.rule}") or "").strip()[:_MAX_TEXT]
            ok = reason in _OVERRIDE and bool(note)
            out.append(Action(f.rule, "override", reason if reason in _OVERRIDE else None, note, ok))
        else:
            ack = (form.get(f"ack-{f.rule}") or "").strip() in ("yes", "on", "1")
            out.append(Action(f.rule, "acknowledge", done=ack))
    # A chart entry the engine could not screen (text only, unknown code, stale result...) may hide exactly the
    # contraindication the screen exists for (a text-only "hx of blood clot in leg"): signing asks the physician
    # to confirm having read each one, like a relative finding.
    for item in getattr(screening, "needs_review", None) or ():
        rule = f"review-{review_key(item)}"
        ack = (form.get(f"ack-{rule}") or "").strip() in ("yes", "on", "1")
        out.append(Action(rule, "review", done=ack, item=item))
    return out


def action_problems(actions: Sequence[Action]) -> dict[str, str]:
    """Messages keyed by the form field that is missing (``override-<rule>`` / ``override-note-<rule>`` /
    ``ack-<rule>``)."""
    out: dict[str, str] = {}
    for a in actions:
        if a.done:
            continue
        if a.kind == "override":
            if a.reason is None:
                out[f"override-{a.rule}"] = "This finding blocks signing: choose why you order anyway."
            if not a.note:
                out[f"override-note-{a.rule}"] = "Say in a few words how the risk is handled."
        elif a.kind == "review":
            out[f"ack-{a.rule}"] = ("The app could not screen this chart entry: read it in the chart and confirm "
                                    "before signing.")
        else:
            out[f"ack-{a.rule}"] = "Acknowledge this finding before signing."
    return out


def mitigation(action: Action, *, author_ref: str, when: str) -> dict[str, Any] | None:
    """The DetectedIssue.mitigation for what the physician did (never silent: reference "DetectedIssue":
    mitigation with date and author)."""
    if not action.done:
        return None
    if action.kind == "review":
        return None  # not a finding: recorded in the order's note (review_notes), see finding_issues
    if action.kind == "override":
        text = f"Overridden by the ordering physician: {_OVERRIDE[action.reason or '']}. {action.note}".strip()
    else:
        text = "Acknowledged by the ordering physician before signing (relative contraindication)."
    return {"action": {"text": text}, "date": when, "author": {"reference": author_ref}}


def screen_inputs(draft: OrderDraft) -> tuple[list[str] | None, list[str] | None]:
    """(techniques, sites) to screen the draft with: the valid ones chosen so far; None = not chosen yet (the
    engine then screens every technique / the whole body, the cautious reading)."""
    techniques = [t for t in draft.techniques if t in TECHNIQUES] or None
    # a lateralizable site still without a side parses with no side, which the engine reads as both sides
    sites = [s.key for s in draft.parsed_sites()]
    return techniques, sites or None


def technique_label(key: str) -> str:
    return TECHNIQUE_DISPLAY.get(key, key)


def finding_issues(draft: OrderDraft, screening: Any, actions: Sequence[Action], now: datetime) -> list[dict[str, Any]]:
    """One DetectedIssue (MassageContraindication) per finding of the screening, each with the physician's
    mitigation when there was one. Every finding is written, also those outside this order's sites or techniques:
    the therapist must know of a DVT in the left leg even when the order is for the back.

    Information items (``screening.information``, an allergy to a massage product) are not written: the issue asks
    for one DetectedIssue per *finding* and these are not findings (no contraindication, nothing the physician
    mitigates); the AllergyIntolerance already is the record, and the therapist's re-screen reads it live, so a
    copy would only go stale when the allergy is corrected. Orders signed before this change may carry one; the
    re-screen treats it as a known finding that no longer fires, which changes nothing.

    Chart entries the engine could not screen (``screening.needs_review``) are not written as DetectedIssues either:
    their acknowledgement goes in the ServiceRequest's ``note`` (``review_notes``, added by ``order_bundle``), one
    annotation per entry: "Reviewed by the physician before signing: 'hx of blood clot in leg' (Condition/…) — not
    screened automatically". Why the note and not a DetectedIssue: a MassageContraindication asserts a
    contraindication of the knowledge base (its code is a rule of ours, with class, evidence and source), and these
    entries are exactly what the engine could not classify; a DetectedIssue with code "needs review" would be read by
    the therapist's re-screen and by other apps as a finding it is not. The note travels with the order itself (the
    therapist's worklist and session page show an order's notes as "Physician's notes"), carries the physician as
    author and the signing time, and is plain R4 (ServiceRequest.note, Annotation), so the order stays valid against
    our profiles."""
    when = now.isoformat().replace("+00:00", "Z")
    by_rule = {a.rule: a for a in actions}
    out = []
    for f in screening.findings:
        if getattr(f, "informational", False):
            continue  # see above: information is never written as a DetectedIssue
        action = by_rule.get(f.rule)
        issue = detected_issue(
            f, patient_ref=draft.patient_ref, now=now, author_ref=draft.requester_ref,
            # the first identifier is the conditional-create key: per draft and rule, never the bare rule id (that
            # would match the finding of another order for the same patient)
            identifier={"system": FINDING_ID_SYSTEM, "value": f"{draft.draft_id}:{f.rule}"},
            mitigation=mitigation(action, author_ref=draft.requester_ref, when=when) if action else None)
        out.append({"resourceType": "DetectedIssue", "meta": meta("DetectedIssue"),
                    **{k: v for k, v in issue.items() if k != "resourceType"}})
    return out


def review_notes(actions: Sequence[Action]) -> list[str]:
    """The acknowledgement of each needs-review entry the physician confirmed, as note texts for the order."""
    out = []
    for a in actions:
        if a.kind == "review" and a.done and a.item is not None:
            ref = str(a.item.get("evidence") or "")
            where = f" ({ref})" if ref else ""
            out.append(f"Reviewed by the physician before signing: '{review_label(a.item)}'{where} — not screened "
                       "automatically.")
    return out


def order_bundle(draft: OrderDraft, screening: Any, actions: Sequence[Action], now: datetime, *,
                 app_version: str | None = None) -> dict[str, Any]:
    """The ONE transaction that signs the draft (builders.order.order_transaction) with its findings; every
    ServiceRequest of it carries the physician's review of the chart entries the engine could not screen
    (``review_notes``; why a note, see ``finding_issues``)."""
    bundle = order_transaction(draft, finding_issues(draft, screening, actions, now), now, app_version=app_version)
    notes = [annotation(t, author_ref=draft.requester_ref, time=now) for t in review_notes(actions)]
    if notes:
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "ServiceRequest":
                resource["note"] = list(resource.get("note") or []) + [dict(n) for n in notes]
    return bundle
