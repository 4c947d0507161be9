"""Search parameters and the Patient compartment, as data.

Each entry is ``name -> SearchParam(kind, paths, targets)``. A path is a dotted walk through the resource JSON
(FHIRPath-like, lists are flattened); choice types ``value[x]`` are spelled out per type because JSON has no [x].
``targets`` restricts a reference parameter to those resource types (the spec's ``.where(resolve() is Patient)``).

The names, types and paths follow the FHIR R4 (4.0.1) search parameter registry
(http://hl7.org/fhir/R4/searchparameter-registry.html). The store indexes every parameter here on each write, and
the CapabilityStatement is generated from this same table, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchParam:
    kind: str  # token | reference | date | string | quantity
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    doc: str = ""


def _p(kind: str, *paths: str, targets: tuple[str, ...] = (), doc: str = "") -> SearchParam:
    return SearchParam(kind, tuple(paths), targets, doc)


PATIENT = ("Patient",)
ANY_AGENT = ("Practitioner", "PractitionerRole", "Organization", "Patient", "RelatedPerson", "Device", "CareTeam")

# Parameters every resource type has (R4 §3.1.1.1 "Parameters for all resources"); _id and _lastUpdated are
# answered from the resource table's own columns, not from the index.
COMMON = ("_id", "_lastUpdated")

SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    "Patient": {
        "identifier": _p("token", "identifier"),
        "name": _p("string", "name"),
        "family": _p("string", "name.family"),
        "given": _p("string", "name.given"),
        "birthdate": _p("date", "birthDate"),
        "gender": _p("token", "gender"),
        "general-practitioner": _p("reference", "generalPractitioner",
                                   targets=("Organization", "Practitioner", "PractitionerRole")),
    },
    "Condition": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject", targets=("Patient", "Group")),
        "clinical-status": _p("token", "clinicalStatus"),
        "verification-status": _p("token", "verificationStatus"),
        "category": _p("token", "category"),
        "code": _p("token", "code"),
        "onset-date": _p("date", "onsetDateTime", "onsetPeriod"),
        "recorded-date": _p("date", "recordedDate"),
        "body-site": _p("token", "bodySite"),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
    },
    "Observation": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "code": _p("token", "code"),
        "category": _p("token", "category"),
        "date": _p("date", "effectiveDateTime", "effectivePeriod", "effectiveInstant", "effectiveTiming.event"),
        "status": _p("token", "status"),
        "based-on": _p("reference", "basedOn"),
        "part-of": _p("reference", "partOf"),
        "value-quantity": _p("quantity", "valueQuantity"),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
    },
    "MedicationRequest": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "intent": _p("token", "intent"),
        "code": _p("token", "medicationCodeableConcept"),
        "authoredon": _p("date", "authoredOn"),
        "medication": _p("reference", "medicationReference", targets=("Medication",)),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
    },
    "MedicationStatement": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "code": _p("token", "medicationCodeableConcept"),
        "effective": _p("date", "effectiveDateTime", "effectivePeriod"),
        "medication": _p("reference", "medicationReference", targets=("Medication",)),
    },
    "MedicationAdministration": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "code": _p("token", "medicationCodeableConcept"),
        "effective-time": _p("date", "effectiveDateTime", "effectivePeriod"),
        "medication": _p("reference", "medicationReference", targets=("Medication",)),
    },
    "AllergyIntolerance": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "patient", targets=PATIENT),
        "clinical-status": _p("token", "clinicalStatus"),
        "verification-status": _p("token", "verificationStatus"),
        "code": _p("token", "code"),
    },
    "Procedure": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "based-on": _p("reference", "basedOn"),
        "status": _p("token", "status"),
        "code": _p("token", "code"),
        "date": _p("date", "performedDateTime", "performedPeriod"),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
    },
    "ServiceRequest": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "intent": _p("token", "intent"),
        "code": _p("token", "code"),
        "requester": _p("reference", "requester"),
        "performer": _p("reference", "performer"),
        "authored": _p("date", "authoredOn"),
        "category": _p("token", "category"),
        "based-on": _p("reference", "basedOn"),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
    },
    "DetectedIssue": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "patient", targets=PATIENT),
        "implicated": _p("reference", "implicated"),
        "code": _p("token", "code"),
        "identified": _p("date", "identifiedDateTime", "identifiedPeriod"),
    },
    "CarePlan": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "category": _p("token", "category"),
        "date": _p("date", "period"),
    },
    "Task": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "for", targets=PATIENT),
        "subject": _p("reference", "for"),
        "focus": _p("reference", "focus"),
        "based-on": _p("reference", "basedOn"),
        "status": _p("token", "status"),
        "owner": _p("reference", "owner"),
        "code": _p("token", "code"),
        "authored-on": _p("date", "authoredOn"),
        "modified": _p("date", "lastModified"),
    },
    "Communication": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "based-on": _p("reference", "basedOn"),
        "recipient": _p("reference", "recipient"),
        "sender": _p("reference", "sender"),
        "sent": _p("date", "sent"),
        "status": _p("token", "status"),
    },
    "Provenance": {
        "target": _p("reference", "target"),
        "patient": _p("reference", "target", targets=PATIENT),
        "recorded": _p("date", "recorded"),
        "agent": _p("reference", "agent.who"),
    },
    "Practitioner": {
        "identifier": _p("token", "identifier"),
        "name": _p("string", "name"),
        "family": _p("string", "name.family"),
        "given": _p("string", "name.given"),
    },
    "PractitionerRole": {
        "identifier": _p("token", "identifier"),
        "practitioner": _p("reference", "practitioner", targets=("Practitioner",)),
        "organization": _p("reference", "organization", targets=("Organization",)),
        "specialty": _p("token", "specialty"),
        "role": _p("token", "code"),
    },
    "Encounter": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "subject": _p("reference", "subject"),
        "status": _p("token", "status"),
        "date": _p("date", "period"),
        "class": _p("token", "class"),
    },
    "Device": {"identifier": _p("token", "identifier"), "patient": _p("reference", "patient", targets=PATIENT)},
    "Organization": {"identifier": _p("token", "identifier"), "name": _p("string", "name", "alias")},
    "Location": {"identifier": _p("token", "identifier"), "name": _p("string", "name", "alias")},
    "Medication": {"identifier": _p("token", "identifier"), "code": _p("token", "code")},
    "CareTeam": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "participant": _p("reference", "participant.member"),  # also who may access the patient (user/ scopes)
        "status": _p("token", "status"),
    },
    "Goal": {"identifier": _p("token", "identifier"), "patient": _p("reference", "subject", targets=PATIENT)},
    "DocumentReference": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "status": _p("token", "status"),
        "type": _p("token", "type"),
    },
    "Questionnaire": {
        "identifier": _p("token", "identifier"),
        "url": _p("token", "url"),
        "status": _p("token", "status"),
    },
    "QuestionnaireResponse": {
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=PATIENT),
        "based-on": _p("reference", "basedOn"),
        "status": _p("token", "status"),
    },
    "Consent": {"identifier": _p("token", "identifier"), "patient": _p("reference", "patient", targets=PATIENT)},
}

# The types the sandbox serves: the ones above. Anything else is "unknown resource type" (404 per R4 §3.1.0.4.3
# "not supported"), so a client learns early that a real EHR may not have it either.
RESOURCE_TYPES: tuple[str, ...] = tuple(sorted(SEARCH_PARAMS))

# FHIR R4 Patient compartment (http://hl7.org/fhir/R4/compartmentdefinition-patient.html): for each type, the
# elements whose Patient reference puts a resource into that patient's compartment. Types absent here are not in
# the compartment (Practitioner, Organization, Location, Medication, Device, Questionnaire, ...) and are readable
# under a patient grant when the grant allows the type.
# Task is NOT in the R4 Patient compartment; the sandbox adds it through Task.for (documented deviation) because a
# patient-scoped app must not read other patients' Tasks.
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "CarePlan": ("subject", "activity.detail.performer"),
    "CareTeam": ("subject", "participant.member"),
    "Communication": ("subject", "sender", "recipient"),
    "Condition": ("subject", "asserter"),
    "Consent": ("patient",),
    "DetectedIssue": ("patient",),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("subject",),
    "Goal": ("subject",),
    "MedicationAdministration": ("subject", "performer.actor"),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "Observation": ("subject", "performer"),
    "Patient": ("link.other",),
    "Procedure": ("subject", "performer.actor"),
    "Provenance": ("target",),
    "QuestionnaireResponse": ("subject", "author"),
    "ServiceRequest": ("subject", "performer"),
    "Task": ("for",),
}

# Parameters that name the patient in a search (used to answer 403 when a patient-scoped client asks for someone
# else's data by name, rather than silently returning nothing).
PATIENT_SEARCH_PARAMS = ("patient", "subject")

# Sorting is offered on date parameters (and _lastUpdated, _id): what the app needs ("latest first").
SORTABLE_KINDS = ("date",)


def params_for(resource_type: str) -> dict[str, SearchParam]:
    return SEARCH_PARAMS.get(resource_type, {})


def reference_params(resource_type: str) -> dict[str, SearchParam]:
    return {n: p for n, p in params_for(resource_type).items() if p.kind == "reference"}
