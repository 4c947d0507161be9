"""Code-system URIs and small Coding helpers, from reference/fhir-modelling.md ("use exactly these").

The evidence tag after each URI is the reference's: [V] verified against a specification, [V2] seen in a second
trustworthy source, [B] believed (standard URI, not verified here).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

SNOMED = "http://snomed.info/sct"  # [V]
LOINC = "http://loinc.org"  # [V]
CPT = "http://www.ama-assn.org/go/cpt"  # [V] US Core procedure-code value set
HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"  # [V]
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"  # [V]
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"  # [V2]
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"  # [B]
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"  # [V]
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"  # [V]
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"  # [V]
CONDITION_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"  # [V]
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"  # [V]
US_CORE_CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"  # [V]
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"  # [V]
US_CORE_CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"  # [V]
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"  # [V]
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"  # [V]
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"  # [V]
NUCC = "http://nucc.org/provider-taxonomy"  # [B] URI
NUCC_MASSAGE_THERAPIST = "225700000X"  # [V2] "Massage Therapist"
SERVICE_TYPE = "http://terminology.hl7.org/CodeSystem/service-type"  # [B] URI
SERVICE_TYPE_MASSAGE = "25"  # [V2] "Massage Therapy"
CDS_HOOKS_HOOK_CODES = "http://cds-hooks.hl7.org/hooks/CodeSystem/HookCodes"  # [V2]

# Our own canonical base (the FHIR package in profiles/ publishes under it).
CANONICAL_BASE = "https://fhir-massage.dev/fhir"
TECHNIQUE_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/massage-technique"

# The technique keys are fixed (issue: screening); the CodeSystem in profiles/ has exactly these codes.
TECHNIQUES: tuple[str, ...] = (
    "swedish",
    "deep-tissue",
    "myofascial-release",
    "trigger-point",
    "lymphatic-drainage",
    "neuromuscular",
    "stretching",
)

# Which CPT code bills each technique: the ONE technique -> CPT mapping in the project (the ConceptMap in profiles/
# must agree with it). (code, evidence) from reference/fhir-modelling.md "CPT": 97124 = massage (effleurage,
# petrissage, tapotement) [V2]; 97140 = manual therapy incl. MLD and myofascial release [V2]; deep tissue, trigger
# point and neuromuscular therapy as practised by massage therapists are billed 97124/97140 by convention [B];
# stretching as therapeutic exercise 97110 [B]. Uncertain rows say so in the data.
TECHNIQUE_CPT: dict[str, tuple[str, str]] = {
    "swedish": ("97124", "V2"),
    "deep-tissue": ("97124", "B"),
    "myofascial-release": ("97140", "V2"),
    "trigger-point": ("97140", "B"),
    "lymphatic-drainage": ("97140", "V2"),
    "neuromuscular": ("97140", "B"),
    "stretching": ("97110", "B"),
}
# Short displays only: CPT long descriptors are AMA-copyrighted (reference: "store code + short display").
CPT_DISPLAY: dict[str, str] = {
    "97124": "Massage therapy",
    "97140": "Manual therapy techniques",
    "97110": "Therapeutic exercise",
}
UCUM = "http://unitsofmeasure.org"  # [V]
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"  # [B] Provenance.activity CREATE/UPDATE
# "transmitter" lives in US Core's own code system, not in provenance-participant-type [V: US Core 3.1.1-8.0.0
# CodeSystem us-core-provenance-participant-type].
US_CORE_PROVENANCE_PARTICIPANT_TYPE = "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"  # [B]
# Our own systems for what the app writes (identifiers derived from the app's draft ids; small app CodeSystems).
IDENTIFIER_BASE = f"{CANONICAL_BASE}/identifier"
ORDER_DETAIL_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/massage-order-detail"
TASK_IO_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/massage-task-io"
MESSAGE_CATEGORY_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/massage-message-category"

TECHNIQUE_DISPLAY: dict[str, str] = {
    "swedish": "Swedish massage",
    "deep-tissue": "Deep tissue massage",
    "myofascial-release": "Myofascial release",
    "trigger-point": "Trigger point therapy",
    "lymphatic-drainage": "Manual lymphatic drainage",
    "neuromuscular": "Neuromuscular therapy",
    "stretching": "Assisted stretching",
}


def codings(concept: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The codings of a CodeableConcept, tolerating a missing or malformed concept."""
    if not isinstance(concept, dict):
        return
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict):
            yield coding


def has_code(concept: dict[str, Any] | None, system: str, codes: Iterable[str]) -> bool:
    wanted = set(codes)
    return any(c.get("system") == system and c.get("code") in wanted for c in codings(concept))


def first_code(concept: dict[str, Any] | None, system: str) -> str | None:
    for c in codings(concept):
        if c.get("system") == system and isinstance(c.get("code"), str):
            return c["code"]
    return None


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out
