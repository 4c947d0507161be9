"""Readiness of one FHIR server (and its SMART authorization server) for fhir-massage: ``fhir-massage check``.

Two halves, kept apart so the report logic is tested without a network:

* ``gather(fhir_base, ...) -> Observations``: the I/O. It fetches ``.well-known/smart-configuration`` and
  ``/metadata`` and, with a token and a patient, runs live read probes (and, only with ``write_probe=True``, one
  marked test write that it deletes again). Nothing it fetches is interpreted here.
* ``build_report(observations) -> Report``: pure. Every check has a stable id (scripts key on it, see
  docs/check-json.md), a status (ok / warn / fail), what it means for the app, and what to ask the EHR vendor.
  Missing capabilities also add plain-words "degradations": what the app does differently there.

Sources: SMART App Launch 2.2 conformance.html (discovery document, capability names), app-launch.html (PKCE S256:
servers SHALL support it and SHALL NOT support ``plain``), scopes-and-launch-context.html (v1 and v2 scope syntax);
FHIR R4 capabilitystatement.html (rest.interaction, resource.interaction, versioning, conditionalCreate,
searchInclude/searchRevInclude), http.html#transaction, http.html#concurrency (ETag / If-Match).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import requests

from . import smart
from .errors import FhirError, FhirNotFound, InvalidInput, MassageError
from .fhir import FhirClient, StaticToken, resources

__all__ = [
    "Check",
    "Degradation",
    "LiveProbe",
    "Observations",
    "Report",
    "RESOURCE_NEEDS",
    "ServerUnreachable",
    "build_report",
    "gather",
    "registration_facts",
    "render_text",
    "report_json",
]

OK, WARN, FAIL = "ok", "warn", "fail"
PROBE_TAG_SYSTEM = "https://fhir-massage.dev/CodeSystem/readiness"
PROBE_TAG_CODE = "fhir-massage-readiness-probe"
TIMEOUT = (5.0, 20.0)


class ServerUnreachable(MassageError):
    """Neither the SMART configuration nor the CapabilityStatement could be fetched at all (exit 2)."""

    code = "check-unreachable"


# ------------------------------------------------------------------------------------------------ what the app needs


@dataclass(frozen=True)
class ResourceNeed:
    type: str
    interactions: tuple[str, ...]  # CapabilityStatement.rest.resource.interaction codes the app uses
    search: tuple[str, ...]  # search parameters the app uses on it (beyond _id / _count)
    essential: bool  # missing -> fail (the app cannot do its job); else warn
    purpose: str  # what the app does with it, in plain words
    without: str  # what is lost where it is missing


READ = ("read", "search-type")
WRITE = ("read", "search-type", "create", "update")

# The resource types of the app's default scopes (docs: smart-contract "Default scopes"; fhir_massage.smart
# APP_RESOURCE_ACCESS) with the search parameters the screen and the order/plan pages use.
RESOURCE_NEEDS: tuple[ResourceNeed, ...] = (
    ResourceNeed("Patient", ("read",), (), True, "the banner and age checks",
                 "the app cannot show whom it is screening"),
    ResourceNeed("Condition", READ, ("patient",), True, "screening reads the problem list",
                 "screening cannot see diagnoses: every contraindication rule based on a condition is blind"),
    ResourceNeed("Observation", READ, ("patient", "category"), True,
                 "screening reads vital signs and labs (blood pressure, temperature, platelets)",
                 "threshold rules (hypertension, fever, low platelets) cannot be checked"),
    ResourceNeed("MedicationRequest", READ, ("patient",), True, "screening reads prescriptions (anticoagulants, ...)",
                 "medication rules (anticoagulants, steroids, chemotherapy) cannot be checked"),
    ResourceNeed("MedicationStatement", READ, ("patient",), False, "screening reads medications the patient reports",
                 "patient-reported medications are not screened; prescriptions still are"),
    ResourceNeed("MedicationAdministration", READ, ("patient",), False,
                 "screening reads recent in-clinic doses (e.g. injected anticoagulants)",
                 "recent in-clinic doses are not screened"),
    ResourceNeed("AllergyIntolerance", READ, ("patient",), True, "screening reads allergies (oils, lotions, latex)",
                 "allergies to massage media cannot be checked"),
    ResourceNeed("Procedure", WRITE, ("patient", "based-on"), True, "the therapist documents each session",
                 "sessions cannot be documented in the EHR"),
    ResourceNeed("ServiceRequest", WRITE, ("patient", "status"), True, "the physician's massage order",
                 "the app cannot place orders"),
    # The "without" texts say what the app really does (smart_app/orders.py NEEDED_WRITES: signing writes the order,
    # its Task, its findings and a Provenance together and is not offered without create permission for all four).
    ResourceNeed("DetectedIssue", ("read", "search-type", "create"), ("patient",), False,
                 "screening findings are saved with the order",
                 "the app cannot sign orders here: it saves the screening findings with every order and does not "
                 "sign one without them (ordering is offered only with DetectedIssue create permission)"),
    ResourceNeed("Task", WRITE, ("patient", "focus", "status"), False, "hand-off of an order to a therapist",
                 "the app cannot sign orders here (each order is written with its fulfilment Task), and sessions "
                 "cannot be counted against an order that has no Task"),
    ResourceNeed("Communication", ("read", "search-type", "create"), ("patient", "based-on"), False,
                 "messages between therapist and physician about an order",
                 "therapist and physician cannot message each other through the app (sending is refused with a "
                 "plain message)"),
    ResourceNeed("Provenance", ("read", "search-type", "create"), ("target",), False,
                 "who wrote an order or a session note, and from which screening",
                 "the app cannot sign orders or save session notes here: it writes a Provenance with each of them "
                 "and does not write them without it"),
    ResourceNeed("CarePlan", READ, ("patient",), False,
                 "asked for in the app's scopes (patient/CarePlan.rs) for a care-plan view; no page reads it yet",
                 "nothing the app does today is lost"),
    ResourceNeed("Practitioner", ("read",), (), False, "names of the ordering physician and the therapist",
                 "people are shown by reference instead of by name"),
    ResourceNeed("PractitionerRole", ("read",), (), False, "the user's role (physician or therapist)",
                 "the app tells a physician from a therapist by the Practitioner's qualification where it can, and "
                 "otherwise asks the user"),
)

WRITE_TYPES = ("ServiceRequest", "Procedure", "Task")
# The _include/_revinclude the app's searches send (search.html#include; smart_app/sessions.py and plan.py), and
# what the app does where the server ignores one (both are optional for servers).
INCLUDES = (("ServiceRequest", "_revinclude", "Task:focus"),
            ("ServiceRequest", "_revinclude", "Procedure:based-on"),
            ("ServiceRequest", "_include", "ServiceRequest:requester"),
            ("ServiceRequest", "_include", "ServiceRequest:subject"),
            ("Communication", "_include", "Communication:sender"))
INCLUDE_EFFECT = {
    "Task:focus": "the orders' Tasks are found with one more search (Task?focus=...): same content, one more "
                  "round trip",
    "Procedure:based-on": "the plan takes the sessions from the patient's Procedure search it makes anyway: same "
                          "content",
    "ServiceRequest:requester": "the worklist names the ordering physician only where the order carries a display "
                                "name",
    "ServiceRequest:subject": "the physician's panel lists patients by reference instead of by name",
    "Communication:sender": "messages show their sender by reference instead of by name",
}
# The searches one screen needs when fhir_massage.chart_fetch is not available (the chart reader's inputs).
SCREEN_SEARCHES: tuple[tuple[str, dict[str, str]], ...] = (
    ("Condition", {}), ("Observation", {"category": "vital-signs"}), ("Observation", {"category": "laboratory"}),
    ("MedicationRequest", {}), ("MedicationStatement", {}), ("MedicationAdministration", {}),
    ("AllergyIntolerance", {}), ("Procedure", {}),
)


# ------------------------------------------------------------------------------------------------------ observations


@dataclass(frozen=True)
class LiveProbe:
    """One live request's outcome: ``status`` is the HTTP status (None when it never got an answer)."""

    id: str
    resource_type: str
    ok: bool
    status: int | None = None
    count: int | None = None
    message: str = ""


@dataclass
class Observations:
    """Everything ``gather`` saw; the only input of ``build_report``."""

    fhir_base: str
    smart_status: int | None = None  # HTTP status of .well-known/smart-configuration (None: unreachable)
    smart_doc: Any = None
    smart_error: str | None = None
    metadata_status: int | None = None
    capability: Any = None
    metadata_error: str | None = None
    token_given: bool = False
    patient: str | None = None
    client_id: str | None = None
    app_url: str | None = None
    live: list[LiveProbe] = field(default_factory=list)
    screen_round_trips: int | None = None
    screen_method: str | None = None  # "chart_fetch" or "searches"
    write_probe: LiveProbe | None = None
    write_cleanup: LiveProbe | None = None
    conditional_create: LiveProbe | None = None


# ------------------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Check:
    id: str
    status: str
    title: str
    detail: str
    ask_vendor: str | None = None
    group: str = "fhir"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "title": self.title, "detail": self.detail,
                "askVendor": self.ask_vendor}


@dataclass(frozen=True)
class Degradation:
    id: str
    check: str
    effect: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "check": self.check, "effect": self.effect}


@dataclass
class Report:
    fhir_base: str
    checks: list[Check]
    degradations: list[Degradation]
    registration: dict[str, Any] | None = None
    round_trips: dict[str, Any] | None = None

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    @property
    def exit_code(self) -> int:
        return 1 if self.count(FAIL) else 0


class _Builder:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.degradations: list[Degradation] = []

    def add(self, group: str, id_: str, status: str, title: str, detail: str, ask: str | None = None) -> None:
        self.checks.append(Check(id_, status, title, detail, ask if status != OK else None, group))

    def degrade(self, id_: str, check: str, effect: str) -> None:
        self.degradations.append(Degradation(id_, check, effect))


def build_report(obs: Observations) -> Report:
    """Pure: the readiness report for what ``gather`` observed."""
    b = _Builder()
    config = _smart_checks(b, obs)
    rest = _fhir_checks(b, obs)
    _live_checks(b, obs, rest)
    registration = registration_facts(obs, config) if obs.client_id else None
    trips = None
    if obs.screen_round_trips is not None:
        trips = {"screen": obs.screen_round_trips, "method": obs.screen_method}
    return Report(obs.fhir_base, b.checks, b.degradations, registration, trips)


# -- SMART --------------------------------------------------------------------------------------------------------


def _smart_checks(b: _Builder, obs: Observations) -> smart.SmartConfiguration | None:
    g = "smart"
    config: smart.SmartConfiguration | None = None
    problem = None  # why a .well-known document that did answer 200 is unusable
    if obs.smart_status == 200 and isinstance(obs.smart_doc, Mapping):
        try:
            config = smart.parse_smart_configuration(obs.fhir_base, obs.smart_doc)
        except MassageError as exc:
            problem = exc.message
    elif obs.smart_status == 200:
        problem = "not a JSON object"
    if config is None and isinstance(obs.capability, Mapping):
        try:
            config = smart.parse_capability_statement(obs.fhir_base, obs.capability)
        except MassageError:
            pass  # said below: "the CapabilityStatement names no OAuth endpoints"
    if config is None:
        wk = "unreachable" if obs.smart_status is None else f"HTTP {obs.smart_status}"
        b.add(g, "smart.discovery", FAIL, "SMART discovery",
              f"No usable SMART configuration: .well-known/smart-configuration answered {wk}"
              + (f" ({problem})" if problem else "") + ", and the CapabilityStatement names no OAuth endpoints. "
              "The app cannot sign anyone in here.",
              "Where is this server's SMART App Launch configuration (.well-known/smart-configuration)? Is SMART "
              "enabled for this FHIR base?")
        b.degrade("no-smart", "smart.discovery", "The app cannot be launched against this server at all.")
        return None
    if config.source == "well-known":
        b.add(g, "smart.discovery", OK, "SMART discovery",
              f".well-known/smart-configuration lists authorize {config.authorization_endpoint} and token "
              f"{config.token_endpoint}.")
    else:
        b.add(g, "smart.discovery", WARN, "SMART discovery",
              "Only the CapabilityStatement's oauth-uris extension names the endpoints (SMART 1.0 style; "
              ".well-known/smart-configuration answered "
              + ("nothing" if obs.smart_status is None else f"HTTP {obs.smart_status}")
              + "). The app works with it but cannot see which SMART capabilities the server has, so the checks "
              "below are guesses.",
              "Can you publish .well-known/smart-configuration (SMART App Launch 2.x)?")
    caps = config.capabilities
    known = config.source == "well-known"

    def cap_check(id_: str, name: str, title: str, good: str, bad: str, ask: str, *, fail: bool = False,
                  degrade: str | None = None) -> None:
        if name in caps:
            b.add(g, id_, OK, title, good)
        elif not known:
            b.add(g, id_, WARN, title, f"Unknown (no SMART configuration document). If missing: {bad}", ask)
        else:
            b.add(g, id_, FAIL if fail else WARN, title, bad, ask)
            if degrade:
                b.degrade(id_.split(".", 1)[1], id_, degrade)

    cap_check("smart.launch-ehr", "launch-ehr", "EHR launch",
              "The EHR can open the app from a patient's chart (launch-ehr).",
              "The server does not declare launch-ehr: the app cannot be opened from inside a chart, which is how "
              "physicians and therapists are meant to reach it.",
              "Does your authorization server support the SMART EHR launch (launch-ehr) for registered apps?",
              fail=True, degrade="Users cannot open the app from a chart; only a standalone launch (if supported) "
                                 "remains, and the user has to pick the patient again.")
    cap_check("smart.launch-standalone", "launch-standalone", "Standalone launch",
              "The app can also be started on its own and ask for a patient (launch-standalone).",
              "No standalone launch: the app's own start page still sends users to this EHR's sign-in, which is "
              "expected to refuse (the app shows the refusal in plain words when the EHR sends it back). It works "
              "when opened from a chart.",
              "Is the standalone launch (launch-standalone with launch/patient) available for provider apps?",
              degrade="Starting the app from its own start page is expected to be refused by this EHR (the user "
                      "sees the EHR's refusal, in the app's plain words when the EHR sends it back); users open it "
                      "from a patient's chart.")
    cap_check("smart.context-ehr-patient", "context-ehr-patient", "Patient context on EHR launch",
              "An EHR launch hands the app the chart's patient (context-ehr-patient).",
              "The server does not say it hands the patient in context at an EHR launch; without it the app "
              "cannot know whose chart it was opened from.",
              "Does an EHR launch return the patient in context (context-ehr-patient) in the token response?")

    methods = config.code_challenge_methods_supported
    if "S256" in methods and "plain" not in methods:
        b.add(g, "smart.pkce", OK, "PKCE S256", "code_challenge_methods_supported includes S256.")
    elif "S256" in methods:
        b.add(g, "smart.pkce", WARN, "PKCE S256",
              "S256 is supported, but so is 'plain', which SMART 2.x forbids (a weaker check an attacker can "
              "choose). The app always uses S256, so it is safe; the server is not strict.",
              "Can you turn off the 'plain' PKCE method (SMART App Launch 2.x: SHALL NOT support plain)?")
    else:
        b.add(g, "smart.pkce", WARN, "PKCE S256",
              "The server does not advertise PKCE S256. The app sends a S256 challenge anyway (some servers support "
              "it without saying so); if the server ignores it, the launch still works but without PKCE's "
              "protection of the authorization code.",
              "Do you support PKCE with S256 (required by SMART App Launch 2.x)? Please list it in "
              "code_challenge_methods_supported.")

    auth_methods = set(config.token_endpoint_auth_methods_supported)
    algs = set(config.token_endpoint_auth_signing_alg_values_supported)
    asym = "client-confidential-asymmetric" in caps or "private_key_jwt" in auth_methods
    sym = "client-confidential-symmetric" in caps or "client_secret_basic" in auth_methods
    public = "client-public" in caps
    options = [name for ok, name in ((asym, "private_key_jwt"), (sym, "client_secret_basic"), (public, "public"))
               if ok]
    if asym and (algs & set(smart.CLIENT_ASSERTION_ALGS) or not algs):
        b.add(g, "smart.client-auth", OK, "Client authentication",
              f"Confidential client with private_key_jwt is available (the app's recommended setup: the EHR fetches "
              f"the app's JWKS, no shared secret). Options here: {', '.join(options)}.")
    elif asym:
        b.add(g, "smart.client-auth", WARN, "Client authentication",
              f"private_key_jwt is offered but only with {', '.join(sorted(algs))}; the app signs with RS384 or "
              "ES384 (the algorithms SMART requires servers to accept).",
              "Do you accept RS384 or ES384 client assertions for private_key_jwt?")
    elif sym:
        b.add(g, "smart.client-auth", WARN, "Client authentication",
              "Only client_secret_basic is offered for a confidential client: it works, but a shared secret must be "
              "stored in the app's configuration and rotated by hand.",
              "Can the app be registered as a confidential asymmetric client (private_key_jwt with a JWKS URL)?")
    elif public or not known:
        b.add(g, "smart.client-auth", WARN, "Client authentication",
              "Only a public client is possible (or nothing is declared): the app then relies on PKCE alone and "
              "gets no long refresh tokens from most servers.",
              "Can the app be registered as a confidential client (private_key_jwt preferred)?")
    else:
        b.add(g, "smart.client-auth", FAIL, "Client authentication",
              "The server declares no client type the app can use (public, client_secret_basic, private_key_jwt).",
              "Which client authentication methods does the token endpoint accept for provider-facing apps?")

    dialect = smart.choose_dialect("auto", caps)
    if "permission-v2" in caps and "permission-v1" in caps:
        b.add(g, "smart.scopes", OK, "Scope dialect", "The server takes SMART v2 scopes (and v1); the app asks in v2 "
              "(e.g. patient/Condition.rs).")
    elif "permission-v2" in caps:
        b.add(g, "smart.scopes", OK, "Scope dialect", "The server takes SMART v2 scopes only; the app asks in v2.")
    elif "permission-v1" in caps:
        b.add(g, "smart.scopes", OK, "Scope dialect",
              "The server takes SMART v1 scopes; the app asks in v1 (patient/*.read plus .write for what it writes), "
              "which is broader than the v2 form.")
    else:
        b.add(g, "smart.scopes", WARN, "Scope dialect",
              "The server declares neither permission-v1 nor permission-v2; the app asks in v1 (the older form, "
              "accepted by servers that predate SMART 2.0).",
              "Which scope syntax do you accept: SMART v1 (patient/Condition.read) or v2 (patient/Condition.rs)?")
    last = b.checks.pop()  # every branch above adds smart.scopes; say which dialect the app settles on
    b.checks.append(Check(last.id, last.status, last.title, f"{last.detail} Dialect used here: {dialect}.",
                          last.ask_vendor, g))

    cap_check("smart.openid", "sso-openid-connect", "User identity (OpenID Connect)",
              "The server issues an id_token with fhirUser: the app knows which physician or therapist is signed "
              "in.",
              "No sso-openid-connect: the app cannot learn who the user is from the EHR, so it cannot fill in the "
              "ordering physician or the performing therapist by itself.",
              "Do you issue an OpenID Connect id_token with the fhirUser claim (scopes openid fhirUser)?",
              degrade="The app does not know who is signed in: it never writes an order or a session note "
                      "without its author, so ordering, documenting and changing orders are refused with a plain "
                      "message; reading the plan still works, and the user is asked for their role.")
    if "permission-online" in caps:
        b.add(g, "smart.refresh", OK, "Staying signed in",
              "online_access is supported: the app refreshes its token while the user's EHR session lasts.")
    elif "permission-offline" in caps:
        b.add(g, "smart.refresh", OK, "Staying signed in",
              "Only offline_access is supported; the app asks for it instead of online_access.")
    else:
        b.add(g, "smart.refresh", WARN, "Staying signed in",
              "Neither online_access nor offline_access is declared: when the access token expires (often after an "
              "hour) the user has to open the app again from the chart." if known else
              "Unknown (no SMART configuration document): refresh tokens may not be issued.",
              "Do you issue refresh tokens for online_access (or offline_access) to provider apps?")
        b.degrade("refresh", "smart.refresh", "Sessions end when the access token expires (the app says so); the "
                                              "user opens the app again from the chart. A session note being "
                                              "written is kept as a draft on the app's server and comes back then.")
    return config


# -- FHIR ---------------------------------------------------------------------------------------------------------


def _server_rest(cap: Any) -> dict[str, Any] | None:
    if not isinstance(cap, Mapping):
        return None
    for rest in cap.get("rest") or []:
        if isinstance(rest, Mapping) and rest.get("mode") == "server":
            return dict(rest)
    return None


def _codes(items: Any, key: str = "code") -> set[str]:
    return {i.get(key) for i in items or [] if isinstance(i, Mapping) and isinstance(i.get(key), str)}


def _fhir_checks(b: _Builder, obs: Observations) -> dict[str, Any] | None:
    g = "fhir"
    cap = obs.capability
    if not isinstance(cap, Mapping) or cap.get("resourceType") != "CapabilityStatement":
        status = "unreachable" if obs.metadata_status is None else f"HTTP {obs.metadata_status}"
        b.add(g, "fhir.capabilities", FAIL, "CapabilityStatement",
              f"GET /metadata did not return a CapabilityStatement ({status}). Every FHIR server must publish one "
              "(http.html#capabilities); without it nothing below can be checked.",
              "Where is this FHIR base's CapabilityStatement (GET [base]/metadata)?")
        return None
    version = cap.get("fhirVersion")
    if version == "4.0.1":
        b.add(g, "fhir.version", OK, "FHIR version", "FHIR R4 (4.0.1), the version the app speaks.")
    elif isinstance(version, str) and version.startswith("4.0"):
        b.add(g, "fhir.version", WARN, "FHIR version",
              f"FHIR {version}: an R4 pre-release/technical correction; the app expects 4.0.1 and will mostly work.",
              "Is an R4 4.0.1 endpoint available?")
    else:
        b.add(g, "fhir.version", FAIL, "FHIR version",
              f"FHIR {version or '(not stated)'}: the app reads and writes R4 (4.0.1) resources only.",
              "Do you have an R4 (4.0.1) endpoint for this organization?")
    formats = {str(f).lower() for f in cap.get("format") or []}
    if formats and not formats & {"json", "application/fhir+json", "application/json"}:
        b.add(g, "fhir.json", FAIL, "JSON", "The server does not declare JSON; the app speaks application/fhir+json.",
              "Does the endpoint support application/fhir+json?")
    rest = _server_rest(cap)
    if rest is None:
        b.add(g, "fhir.rest", FAIL, "REST API", "The CapabilityStatement declares no server REST API.",
              "Is this the FHIR REST endpoint (rest.mode = server)?")
        return None
    by_type = {r.get("type"): r for r in rest.get("resource") or [] if isinstance(r, Mapping)}
    for need in RESOURCE_NEEDS:
        _resource_check(b, need, by_type.get(need.type))

    system = _codes(rest.get("interaction"))
    if "transaction" in system:
        b.add(g, "fhir.transaction", OK, "Transactions",
              "transaction is supported: an order, its screening findings and their Provenance are written "
              "together, all or nothing (http.html#transaction).")
    else:
        b.add(g, "fhir.transaction", WARN, "Transactions",
              "No transaction support: the app writes each order, session note and plan change entry by entry "
              "(the order or the session first, then its findings or pain scores, the Task and the Provenance), "
              "each create conditional (If-None-Exist) and each update with If-Match. A failure half way leaves "
              "what was already saved; the app says what was saved and what was not.",
              "Do you support FHIR transaction Bundles (POST [base] with Bundle.type = transaction)?")
        b.degrade("no-transaction", "fhir.transaction",
                  "Writes are not all-or-nothing: signing saves the order first, then its findings, then links the "
                  "order to them; a session note saves the session first, then its pain scores, the task count and "
                  "the authorship record; the confirmation pages say so. If a later write fails, the page says what "
                  "was saved and what was not, the draft is kept, and signing again (or 'Try again' for a session "
                  "note) writes only what is missing; conditional creates match what landed. A plan change that fails "
                  "after an order was updated says which changes were saved and is not retried by itself.")
    if "batch" in system:
        b.add(g, "fhir.batch", OK, "Batch", "batch is supported: the chart can be read in one round trip.")
    else:
        b.add(g, "fhir.batch", WARN, "Batch",
              "No batch support: every page reads with one request per search instead of one batch (several "
              "round trips).",
              "Do you support FHIR batch Bundles for reads (GET entries)?")
        b.degrade("no-batch", "fhir.batch", "Every page (the screen, the order, the worklist, the plan) reads with "
                                            "one request per search instead of one batch: the same content, more "
                                            "round trips, so pages open more slowly.")

    writes = [by_type.get(t) for t in WRITE_TYPES if by_type.get(t)]
    cc_missing = [t for t in ("ServiceRequest", "Procedure")
                  if by_type.get(t) and not by_type[t].get("conditionalCreate")]
    if not cc_missing and all(by_type.get(t) for t in ("ServiceRequest", "Procedure")):
        b.add(g, "fhir.conditional-create", OK, "Conditional create",
              "conditionalCreate is declared for ServiceRequest and Procedure: a retried order or session note "
              "(If-None-Exist on its identifier) is never saved twice.")
    else:
        missing = ", ".join(cc_missing or [t for t in ("ServiceRequest", "Procedure") if not by_type.get(t)])
        b.add(g, "fhir.conditional-create", WARN, "Conditional create",
              f"conditionalCreate is not declared for {missing}: the app still sends If-None-Exist with every create "
              "and relies on it when it repeats a create whose answer was lost (the client does so by itself; "
              "'Sign' and 'Try again' send the same writes again). A server that ignores If-None-Exist saves a "
              "second copy each time.",
              "Do you support conditional create (If-None-Exist) for ServiceRequest and Procedure?")
        b.degrade("no-conditional-create", "fhir.conditional-create",
                  "A repeated write may be saved twice: after a lost answer or a failed attempt the app sends the "
                  "create again (marked If-None-Exist, which this server may ignore), so the chart can hold a "
                  "duplicate order, note or finding to remove by hand. Where the EHR takes transactions, an order "
                  "is first looked up by its identifier before it is signed again.")
    versioning = {r.get("type"): r.get("versioning") for r in writes}
    weak = sorted(t for t, v in versioning.items() if v != "versioned-update")
    hints = []
    for r in writes:
        extra = []
        if r.get("conditionalUpdate"):
            extra.append("conditionalUpdate")
        if r.get("updateCreate"):
            extra.append("updateCreate")
        if extra:
            hints.append(f"{r.get('type')}: {', '.join(extra)}")
    hint_text = f" Also declared: {'; '.join(hints)}." if hints else ""
    if writes and not weak:
        b.add(g, "fhir.if-match", OK, "Safe concurrent edits (If-Match)",
              "versioning = versioned-update for " + ", ".join(t for t in WRITE_TYPES if t in versioning)
              + ": an edit based on an old version is refused (412) instead of overwriting someone else's."
              + hint_text)
    else:
        shown = ", ".join(f"{t} ({versioning[t] or 'not stated'})" for t in weak) or "the written types"
        b.add(g, "fhir.if-match", WARN, "Safe concurrent edits (If-Match)",
              f"versioned-update is not declared for {shown}: the server may ignore If-Match, so when two people "
              "edit the same order or Task the last save wins." + hint_text,
              "Do you enforce If-Match (versioned-update) on ServiceRequest, Procedure and Task updates?")
        b.degrade("no-if-match", "fhir.if-match",
                  "Two people editing the same order or Task at once: the app still sends If-Match, but a server "
                  "that ignores it lets the later save overwrite the earlier one without a warning (the app's "
                  "conflict page appears only when the EHR answers 412).")
    missing_inc = []
    for rtype, kind, value in INCLUDES:
        declared = (by_type.get(rtype) or {}).get("searchRevInclude" if kind == "_revinclude" else "searchInclude")
        declared = set(declared or [])
        if value not in declared and "*" not in declared:
            missing_inc.append(f"{kind}={value}")
    if not missing_inc:
        b.add(g, "fhir.include", OK, "_include / _revinclude",
              "The includes the app uses are declared: an order comes back with its Tasks and sessions, and "
              "orders and messages with the people they name, in one search.")
    else:
        effects = [f"{kind}={value}: {INCLUDE_EFFECT[value]}" for _, kind, value in INCLUDES
                   if f"{kind}={value}" in missing_inc]
        b.add(g, "fhir.include", WARN, "_include / _revinclude",
              f"Not declared: {', '.join(missing_inc)}. Where the server ignores them: " + "; ".join(effects) + ".",
              "Do you support " + ", ".join(missing_inc) + "?")
        b.degrade("no-include", "fhir.include", "Where this server ignores the app's includes: "
                  + "; ".join(effects) + ".")
    return rest


def _resource_check(b: _Builder, need: ResourceNeed, declared: Mapping[str, Any] | None) -> None:
    id_ = f"fhir.resource.{need.type}"
    title = f"{need.type}"
    fail = FAIL if need.essential else WARN
    ask_base = f"Does your FHIR API support {need.type}"
    if declared is None:
        b.add("fhir", id_, fail, title, f"Not supported at all. Used for: {need.purpose}. Without it: "
              f"{need.without}.", f"{ask_base} ({', '.join(need.interactions)})?")
        b.degrade(f"no-{need.type}", id_, need.without[0].upper() + need.without[1:] + ".")
        return
    have = _codes(declared.get("interaction"))
    params = _codes(declared.get("searchParam"), "name")
    missing_i = [i for i in need.interactions if i not in have]
    missing_p = [p for p in need.search if p not in params]
    if missing_i:
        reading = {"read", "search-type"}
        # A missing write on an essential type is as bad as a missing read: the app's job there cannot be done.
        status = fail if (set(missing_i) & reading or need.essential) else WARN
        b.add("fhir", id_, status, title,
              f"Missing interactions: {', '.join(missing_i)}. Used for: {need.purpose}. Without it: {need.without}.",
              f"{ask_base} {', '.join(missing_i)} for provider-facing apps?")
        b.degrade(f"no-{need.type}", id_, need.without[0].upper() + need.without[1:] + ".")
    elif missing_p:
        b.add("fhir", id_, WARN, title,
              f"Search parameters not declared: {', '.join(missing_p)} (declared: "
              f"{', '.join(sorted(params)) or 'none'}). The app may get refused searches or have to filter itself.",
              f"Does {need.type} search support {', '.join(missing_p)}?")
    else:
        b.add("fhir", id_, OK, title, f"{', '.join(need.interactions)}"
              + (f"; search by {', '.join(need.search)}" if need.search else "") + f". Used for: {need.purpose}.")


# -- live ---------------------------------------------------------------------------------------------------------


def _live_checks(b: _Builder, obs: Observations, rest: Mapping[str, Any] | None) -> None:
    g = "live"
    if not obs.token_given:
        detail = "No token given: live reads were not tried."
        if obs.client_id:
            detail += (" A token needs a browser sign-in, which this command cannot do: launch the app once (or use "
                       "the EHR's test launcher), copy the access token and run again with --token.")
        else:
            detail += " Give --token (and --patient) to try real reads with the app's scopes."
        b.add(g, "live.token", WARN, "Live probes", detail, None)
        return
    if not obs.patient:
        b.add(g, "live.token", WARN, "Live probes",
              "A token was given but no --patient: the app's reads are all patient-scoped, so none was tried.", None)
        return
    needs = {n.type: n for n in RESOURCE_NEEDS}
    for probe in obs.live:
        need = needs.get(probe.resource_type)
        id_ = f"live.{probe.id}"
        title = f"Read {probe.resource_type}" if probe.id == "patient-read" else f"Search {probe.resource_type}"
        if probe.ok:
            counted = f" ({probe.count} found)" if probe.count is not None else ""
            b.add(g, id_, OK, title, f"Answered with the given token{counted}.")
            continue
        essential = need.essential if need else False
        if probe.status in (401,):
            b.add(g, id_, FAIL, title, f"401: the token was refused ({probe.message}). It may have expired.",
                  None)
        elif probe.status == 403:
            b.add(g, id_, FAIL if essential else WARN, title,
                  f"403: the token's scopes (or the user's rights) do not allow this ({probe.message}).",
                  f"Can the app's registration be granted {probe.resource_type} read access?")
        elif probe.status == 404 and probe.id == "patient-read":
            b.add(g, id_, FAIL, title, f"Patient {obs.patient} was not found on this server.", None)
        else:
            status = "no answer" if probe.status is None else f"HTTP {probe.status}"
            b.add(g, id_, FAIL if essential else WARN, title, f"Failed ({status}): {probe.message}",
                  f"Why does {probe.resource_type} search for a patient fail?")
    if obs.screen_round_trips is not None:
        how = ("fhir_massage.chart_fetch.fetch_chart_resources" if obs.screen_method == "chart_fetch"
               else "one search per resource type the screen reads")
        status = OK if obs.screen_round_trips <= 12 else WARN
        b.add(g, "live.round-trips", status, "Round trips per screen",
              f"Reading one patient's chart for a screen took {obs.screen_round_trips} HTTP round trips here "
              f"({how}).", "Can page sizes (_count) up to 100 be honoured?" if status == WARN else None)
    if obs.write_probe is not None:
        wp = obs.write_probe
        if wp.ok:
            b.add(g, "live.write", OK, "Test write",
                  f"Created a marked test Communication (status entered-in-error, tag {PROBE_TAG_CODE}).")
        else:
            b.add(g, "live.write", FAIL, "Test write",
                  f"Writing a marked test Communication failed ({wp.status or 'no answer'}): {wp.message}",
                  "Can the app's registration write Communication (and ServiceRequest, Procedure) for a patient?")
        cc = obs.conditional_create
        if cc is not None:
            if cc.ok:
                b.add(g, "live.conditional-create", OK, "Conditional create (tried)",
                      "Repeating the test write with If-None-Exist returned the existing resource instead of a "
                      "copy.")
            else:
                b.add(g, "live.conditional-create", WARN, "Conditional create (tried)",
                      f"Repeating the test write with If-None-Exist did not return the same resource: {cc.message}",
                      "Is If-None-Exist honoured on create?")
        cl = obs.write_cleanup
        if cl is not None:
            if cl.ok:
                b.add(g, "live.cleanup", OK, "Test write removed", "The test resource(s) were deleted again.")
            else:
                b.add(g, "live.cleanup", WARN, "Test write removed",
                      f"Could not delete the test resource(s): {cl.message} Remove them by hand (tag "
                      f"{PROBE_TAG_CODE}); they are marked entered-in-error.",
                      None)


# -------------------------------------------------------------------------------------------------- registration


def registration_facts(obs: Observations, config: smart.SmartConfiguration | None) -> dict[str, Any]:
    """What the integrator gives the EHR to register the app (docs/registering.md)."""
    base = (obs.app_url or "<APP_URL>").rstrip("/")
    caps = config.capabilities if config else frozenset()
    dialect = smart.choose_dialect("auto", caps)
    return {
        "clientId": obs.client_id,
        "launchUrl": f"{base}/launch",
        "redirectUri": f"{base}/callback",
        "jwksUrl": f"{base}/.well-known/jwks.json",
        "scopeDialect": dialect,
        "scopes": {
            "ehrLaunch": smart.default_scopes(dialect, standalone=False, capabilities=caps),
            "standalone": smart.default_scopes(dialect, standalone=True, capabilities=caps),
        },
        "authorizationEndpoint": config.authorization_endpoint if config else None,
        "tokenEndpoint": config.token_endpoint if config else None,
        "tokenNote": "A token needs an interactive sign-in in a browser; this command cannot get one. Launch the "
                     "app (or use the EHR's test launcher) and pass the access token with --token.",
    }


# ------------------------------------------------------------------------------------------------------ rendering


def report_json(report: Report) -> dict[str, Any]:
    """The stable JSON shape (docs/check-json.md)."""
    return {
        "fhirBase": report.fhir_base,
        "summary": {"ok": report.count(OK), "warn": report.count(WARN), "fail": report.count(FAIL)},
        "checks": [c.to_json() for c in report.checks],
        "degradations": [d.to_json() for d in report.degradations],
        "registration": report.registration,
        "roundTrips": report.round_trips,
    }


MARKS = {OK: "✓", WARN: "⚠", FAIL: "✗"}
GROUPS = (("smart", "SMART on FHIR"), ("fhir", "FHIR API"), ("live", "Live probes"))


def render_text(report: Report) -> str:
    lines = [f"Readiness of {report.fhir_base} for fhir-massage", ""]
    for key, heading in GROUPS:
        group = [c for c in report.checks if c.group == key]
        if not group:
            continue
        lines.append(heading)
        for c in group:
            lines.append(f"  {MARKS[c.status]} {c.title}: {c.detail}")
            if c.ask_vendor:
                lines.append(f"      ask the vendor: {c.ask_vendor}")
        lines.append("")
    if report.degradations:
        lines.append("What the app does differently here")
        lines.extend(f"  - {d.effect}" for d in report.degradations)
        lines.append("")
    if report.registration:
        r = report.registration
        lines += ["Registration facts for this EHR",
                  f"  client id:     {r['clientId']}",
                  f"  launch URL:    {r['launchUrl']}",
                  f"  redirect URI:  {r['redirectUri']}",
                  f"  JWKS URL:      {r['jwksUrl']}   (private_key_jwt only)",
                  f"  scopes ({r['scopeDialect']}), EHR launch:  {r['scopes']['ehrLaunch']}",
                  f"  scopes ({r['scopeDialect']}), standalone:  {r['scopes']['standalone']}",
                  f"  {r['tokenNote']}", ""]
    lines.append(f"Summary: {report.count(OK)} ok, {report.count(WARN)} warning(s), {report.count(FAIL)} failure(s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ I/O


def check_base_url(url: str) -> str:
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InvalidInput(f"--fhir-base must be an absolute http(s) URL without a query, not {url!r}.")
    return url.rstrip("/")


def _fetch(session: requests.Session, url: str, accept: str) -> tuple[int | None, Any, str | None]:
    try:
        response = session.get(url, headers={"Accept": accept}, timeout=TIMEOUT, allow_redirects=False)
    except requests.RequestException as exc:
        return None, None, type(exc).__name__
    try:
        return response.status_code, response.json(), None
    except ValueError:
        return response.status_code, None, "not JSON"


def gather(fhir_base: str, *, token: str | None = None, patient: str | None = None, client_id: str | None = None,
           app_url: str | None = None, write_probe: bool = False, session: requests.Session | None = None,
           chart_fetch: Callable[[FhirClient, str], Any] | None = None) -> Observations:
    """Fetch what ``build_report`` needs. Raises ``InvalidInput`` for a bad URL and ``ServerUnreachable`` when
    nothing answers at all. Reads only, unless ``write_probe``."""
    base = check_base_url(fhir_base)
    http = session or requests.Session()
    obs = Observations(base, token_given=bool(token), patient=patient, client_id=client_id, app_url=app_url)
    obs.smart_status, obs.smart_doc, obs.smart_error = _fetch(
        http, f"{base}/.well-known/smart-configuration", "application/json")
    obs.metadata_status, obs.capability, obs.metadata_error = _fetch(
        http, f"{base}/metadata", "application/fhir+json, application/json")
    if obs.smart_status is None and obs.metadata_status is None:
        raise ServerUnreachable(f"Nothing answered at {base} ({obs.metadata_error}): check the URL and that the "
                                "server is running.")
    if token and patient:
        with FhirClient(base, token_source=StaticToken(token), session=http, timeout=TIMEOUT,
                        max_retries=1) as client:
            _live(obs, client, patient, chart_fetch)
            if write_probe:
                _write_probe(obs, client, patient)
    return obs


def _probe(id_: str, rtype: str, call: Callable[[], Any]) -> tuple[LiveProbe, Any]:
    try:
        value = call()
    except FhirError as exc:
        return LiveProbe(id_, rtype, False, exc.status, None, exc.message), None
    except MassageError as exc:
        return LiveProbe(id_, rtype, False, None, None, exc.message), None
    count = len(value) if isinstance(value, list) else None
    return LiveProbe(id_, rtype, True, 200, count), value


def _live(obs: Observations, client: FhirClient, patient: str,
          chart_fetch: Callable[[FhirClient, str], Any] | None) -> None:
    probe, _ = _probe("patient-read", "Patient", lambda: client.read("Patient", patient))
    obs.live.append(probe)
    if not probe.ok:
        return
    for need in RESOURCE_NEEDS:
        if "search-type" not in need.interactions or "patient" not in need.search:
            continue
        probe, _ = _probe(f"search.{need.type}", need.type,
                          lambda t=need.type: resources(client.search(t, {"patient": patient, "_count": 50}), t))
        obs.live.append(probe)
    fetch = chart_fetch or _chart_fetch_function()
    client.reset_request_count()
    if fetch is not None:
        try:
            fetch(client, patient)
            obs.screen_method = "chart_fetch"
        except MassageError:
            obs.screen_method = "chart_fetch"
    else:
        for rtype, params in SCREEN_SEARCHES:
            try:
                client.search_all(rtype, {"patient": patient, "_count": 100, **params})
            except MassageError:
                pass  # the per-type probes above already report the failure; here only the count matters
        obs.screen_method = "searches"
    obs.screen_round_trips = client.reset_request_count()


def _chart_fetch_function() -> Callable[[FhirClient, str], Any] | None:
    # fhir_massage.chart_fetch belongs to the screening work; use it when it is there, so the count is the app's.
    if importlib.util.find_spec("fhir_massage.chart_fetch") is None:
        return None
    module = importlib.import_module("fhir_massage.chart_fetch")
    return getattr(module, "fetch_chart_resources", None)


def _write_probe(obs: Observations, client: FhirClient, patient: str) -> None:
    """One clearly marked, entered-in-error Communication about the patient, written and deleted again."""
    import uuid

    marker = uuid.uuid4().hex
    resource = {
        "resourceType": "Communication",
        "meta": {"tag": [{"system": PROBE_TAG_SYSTEM, "code": PROBE_TAG_CODE,
                          "display": "fhir-massage readiness probe: not clinical data"}]},
        "identifier": [{"system": PROBE_TAG_SYSTEM, "value": marker}],
        "status": "entered-in-error",
        "subject": {"reference": f"Patient/{patient}"},
        "payload": [{"contentString": "fhir-massage readiness probe (test data, safe to delete)"}],
    }
    made: list[str] = []
    try:
        first = client.create(resource, if_none_exist={"identifier": f"{PROBE_TAG_SYSTEM}|{marker}"})
    except FhirError as exc:
        obs.write_probe = LiveProbe("write", "Communication", False, exc.status, None, exc.message)
        return
    obs.write_probe = LiveProbe("write", "Communication", True, first.status)
    if first.id:
        made.append(first.id)
    try:
        again = client.create(resource, if_none_exist={"identifier": f"{PROBE_TAG_SYSTEM}|{marker}"})
        if again.id and again.id not in made:
            made.append(again.id)
        same = bool(first.id) and again.id == first.id
        obs.conditional_create = LiveProbe("conditional-create", "Communication", same, again.status, None,
                                           "" if same else "a second resource was created")
    except FhirError as exc:
        obs.conditional_create = LiveProbe("conditional-create", "Communication", False, exc.status, None,
                                           exc.message)
    problems = []
    for rid in made:
        try:
            client.delete("Communication", rid)
        except (FhirNotFound,):
            pass
        except FhirError as exc:
            problems.append(f"Communication/{rid}: {exc.message}")
    if not made:
        problems.append("the server did not say which id it gave the test resource.")
    obs.write_cleanup = LiveProbe("cleanup", "Communication", not problems, None, None, " ".join(problems))
