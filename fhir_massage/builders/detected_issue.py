"""Finding -> FHIR R4 DetectedIssue (dict). Pure: ``now`` is passed in.

R4 DetectedIssue (detectedissue.html): ``code`` preferred binding DetectedIssueCategory (v3 ActCode: COND
condition alert, PREG pregnancy alert (a COND child), LAB lab alert, DACT drug action detected issue, OBSA
observation alert); ``severity`` required binding high | moderate | low; ``status`` required ObservationStatus.
Severity by KB class, per reference/fhir-modelling.md (our design): absolute -> high, relative -> moderate,
local -> low. ``implicated`` holds the proposed order (when there is one) and the chart resources behind the
finding; ``evidence.detail`` the same resources; ``detail`` the clinician-readable message with dates and values,
the evidence class and the rule id, so a note or audit can quote the rule.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fhir_massage.codes import ACT_CODE, CANONICAL_BASE

__all__ = ["detected_issue", "RULE_IDENTIFIER_SYSTEM", "SEVERITY"]

RULE_IDENTIFIER_SYSTEM = f"{CANONICAL_BASE}/contraindication-rule"
SEVERITY = {"absolute": "high", "relative": "moderate", "local": "low"}
_ACT_DISPLAY = {
    "COND": "Condition Alert",
    "PREG": "Pregnancy Alert",
    "LAB": "Lab Alert",
    "DACT": "Drug Action Detected Issue",
    "OBSA": "Observation Alert",
}
_EVIDENCE_CLASS = {"EV": "published clinical evidence", "CONS": "consensus / professional convention",
                   "MECH": "mechanistic reasoning only"}


def _instant(now: datetime) -> str:
    if now.tzinfo is None:
        raise ValueError("detected_issue needs an aware datetime (FHIR dateTime with a time needs a zone).")
    return now.isoformat(timespec="seconds")


PROFILE = f"{CANONICAL_BASE}/StructureDefinition/massage-contraindication"


def detected_issue(
    finding: Any,
    *,
    patient_ref: str,
    now: datetime,
    order_ref: str | None = None,
    identifier: dict[str, Any] | None = None,
    mitigation: dict[str, Any] | None = None,
    author_ref: str | None = None,
    status: str = "final",
) -> dict[str, Any]:
    """A DetectedIssue for one screening Finding (fhir_massage.screening.Finding)."""
    act = finding.act_code if finding.act_code in _ACT_DISPLAY else "COND"
    evidence_refs = list(dict.fromkeys(finding.evidence))
    implicated = ([{"reference": order_ref}] if order_ref else []) + [{"reference": r} for r in evidence_refs]
    ev_class = _EVIDENCE_CLASS.get(finding.evidence_class, finding.evidence_class)
    techniques = ", ".join(finding.techniques)
    sites = ", ".join(str(s) for s in finding.sites)
    detail = (f"{finding.message}\n\nRule {finding.rule} ({finding.cls}; techniques: {techniques}; sites: {sites}). "
              f"Evidence class: {finding.evidence_class} ({ev_class}). Source: {finding.source}")
    if not finding.verified:
        detail += " Some codes behind this finding are not verified against a published value set."
    identifiers = [{"system": RULE_IDENTIFIER_SYSTEM, "value": finding.rule}]
    if identifier:
        identifiers.insert(0, dict(identifier))
    issue: dict[str, Any] = {
        "resourceType": "DetectedIssue",
        # Declared so the EHR (and `fhir-massage validate`) checks it against the package's profile.
        "meta": {"profile": [PROFILE]},
        "identifier": identifiers,
        "status": status,
        "code": {"coding": [{"system": ACT_CODE, "code": act, "display": _ACT_DISPLAY[act]}],
                 "text": f"{finding.title or finding.rule} [{finding.rule}]"},
        "severity": SEVERITY[finding.cls],
        "patient": {"reference": patient_ref},
        "identifiedDateTime": _instant(now),
    }
    if author_ref:
        issue["author"] = {"reference": author_ref}
    if implicated:
        issue["implicated"] = implicated
    if evidence_refs:
        issue["evidence"] = [{"detail": [{"reference": r} for r in evidence_refs]}]
    issue["detail"] = detail
    if finding.reference:
        issue["reference"] = finding.reference
    if mitigation:
        issue["mitigation"] = [dict(mitigation)]
    return issue
