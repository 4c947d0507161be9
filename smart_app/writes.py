"""Flask glue for fhir_massage.writes: every write of the app goes through ``write(bundle)``.

Whether the launch's EHR takes transactions is kept per FHIR base for the app process (``CapabilityCache`` in
``app.extensions``). It is learnt without an extra round trip: the first write tries the transaction, and a server
that refuses it as not supported (501/405, OperationOutcome ``not-supported``) gets the entries one by one at once
and every later write goes one by one straight away (``CapabilityCache.transactions(client)`` reads the
CapabilityStatement instead, for callers that can afford the round trip).
"""

from __future__ import annotations

from typing import Any, Mapping

from flask import current_app, has_app_context

from fhir_massage.errors import FhirError
from fhir_massage.fhir import FhirClient
from fhir_massage.writes import CapabilityCache, WriteOutcome, write_bundle

EXT = "fhir_massage.capabilities"


def cache() -> CapabilityCache:
    if not has_app_context():  # a helper called outside a request (scripts, tests): learn for this call only
        return CapabilityCache()
    return current_app.extensions.setdefault(EXT, CapabilityCache())


def write(client: FhirClient, bundle: Mapping[str, Any]) -> WriteOutcome:
    """``write_bundle`` with what is known of this EHR; raises FhirError when nothing was saved."""
    c = cache()
    try:
        outcome = write_bundle(client, bundle, transactions=c.known(client.base_url))
    except FhirError as exc:
        c.learn(client.base_url, getattr(exc, "atomic", None))
        raise
    c.learn(client.base_url, outcome.atomic)
    return outcome


def atomic(client: FhirClient) -> bool:
    """True only when this EHR is known to take transactions (so finding one written resource of a write means
    the whole write landed)."""
    return cache().known(client.base_url) is True


__all__ = ["atomic", "cache", "write"]
