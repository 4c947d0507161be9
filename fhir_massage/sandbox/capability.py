"""The CapabilityStatement, generated from the same tables the server runs on (search params, interactions),
so it states exactly what is supported and cannot drift from the code (R4 §3.1.0.13 "capabilities")."""

from __future__ import annotations

from typing import Any

from fhir_massage import __version__
from fhir_massage.sandbox.searchparams import COMMON, RESOURCE_TYPES, SORTABLE_KINDS, params_for, reference_params

TYPE_INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "create", "search-type")
SYSTEM_INTERACTIONS = ("transaction", "batch")
_COMMON_TYPES = {"_id": "token", "_lastUpdated": "date"}


def capability_statement(base: str, security: dict[str, Any] | None, *, date: str) -> dict[str, Any]:
    resources = []
    for rtype in RESOURCE_TYPES:
        table = params_for(rtype)
        params = [
            {"name": n, "definition": f"http://hl7.org/fhir/SearchParameter/{'Resource' if n in COMMON else rtype}-{n.lstrip('_')}", "type": _COMMON_TYPES[n]}
            for n in COMMON
        ]
        params += [{"name": n, "type": sp.kind} for n, sp in sorted(table.items())]
        sortable = ["_id", "_lastUpdated", *sorted(n for n, sp in table.items() if sp.kind in SORTABLE_KINDS)]
        resources.append(
            {
                "type": rtype,
                "interaction": [{"code": c} for c in TYPE_INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "not-supported",
                "conditionalUpdate": False,
                "conditionalDelete": "not-supported",
                "searchInclude": [f"{rtype}:{n}" for n in sorted(reference_params(rtype))],
                "searchRevInclude": sorted(
                    f"{src}:{n}"
                    for src in RESOURCE_TYPES
                    for n, sp in reference_params(src).items()
                    if not sp.targets or rtype in sp.targets
                ),
                "searchParam": params,
                "extension": [
                    {
                        "url": "http://fhir-massage.example/StructureDefinition/sortable-params",
                        "valueString": ",".join(sortable),
                    }
                ],
            }
        )
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            "fhir-massage sandbox EHR. Search: token (system|code, |code, code, comma = OR, :not), reference"
            " (Type/id, id, absolute URL on this server), date (eq ne lt gt le ge sa eb; partial dates are ranges),"
            " string (starts-with, case/accent-insensitive, :exact, :contains), quantity; _count (default 50, max"
            " 1000), _offset, _sort on date parameters/_lastUpdated/_id, _include, _revinclude, _summary=count."
            " Unknown parameters are ignored and reported (Prefer: handling=strict makes them a 400)."
        ),
        "resource": resources,
        "interaction": [{"code": c} for c in SYSTEM_INTERACTIONS],
    }
    if security:
        rest["security"] = security
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "fhir-massage sandbox", "version": __version__},
        "implementation": {"description": "fhir-massage sandbox EHR", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [rest],
    }


def without_system_interaction(capability: dict[str, Any], code: str) -> dict[str, Any]:
    """The CapabilityStatement minus one system interaction (SandboxConfig.transactions=False drops 'transaction'),
    so the statement keeps saying exactly what the server does."""
    for rest in capability.get("rest") or []:
        rest["interaction"] = [i for i in rest.get("interaction") or [] if i.get("code") != code]
    return capability
