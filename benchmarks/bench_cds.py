"""CDS Hooks order-sign latency: 1,000 calls with full prefetch to the app on loopback (p50, p95; target p95 <= 50 ms).

What one call costs on the service side: JWT verification (ES384, JWKS cached after the first call, jti written
to the store), request parsing, chart building from the prefetch, one screen per massage order, card building,
card records written to the store (SQLite in memory) and the JSON answer. The EHR side is not timed: the JWTs
(one per call, each with its own jti) and the prefetch are made before the clock starts, and the same
``requests.Session`` (keep-alive) is used for every call. The prefetch is Dana Whitfield's chart (acute DVT on
apixaban), taken from the sandbox with the service's own prefetch templates; the draft is deep tissue to her
left lower leg, so every call returns the critical card and the full set of suggestions.

The spec asks services to answer in about 500 ms; we aim at 50 ms at the 95th percentile on this machine.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import time
import uuid
from collections.abc import Callable

import requests
from flask import Flask, jsonify
from joserfc import jwt
from joserfc.jwk import ECKey

from benchmarks._common import percentile
from fhir_massage import cds_cards as cc
from fhir_massage import codes as C
from fhir_massage.fhir import FhirClient
from fhir_massage.serving import serve_in_thread, wait_ready
from tests.fixtures.app import start_app_server
from tests.fixtures.sandbox import start_sandbox

Report = Callable[..., None]

CALLS = 1_000
WARMUP = 20
TARGET_P95_MS = 50.0
SPEC_MS = 500.0
PATIENT = "demo-dana-whitfield"
ISS = "https://bench-ehr.test"


def _prefetch(fhir_base: str) -> dict:
    out = {}
    with FhirClient(fhir_base) as client:
        for key, query in cc.prefetch_queries(PATIENT).items():
            path, _, qs = query.partition("?")
            out[key] = client.read(*path.split("/")) if not qs else client.get_url(query)
    return out


def _body(prefetch: dict) -> dict:
    sr = {"resourceType": "ServiceRequest", "id": "bench-draft", "status": "draft", "intent": "order",
          "code": {"coding": [{"system": C.CPT, "code": "97124"},
                              {"system": C.TECHNIQUE_SYSTEM, "code": "deep-tissue"}]},
          "subject": {"reference": f"Patient/{PATIENT}"},
          "bodySite": [{"coding": [{"system": C.SNOMED, "code": "30021000"}], "text": "Left lower leg"}]}
    return {"hook": "order-sign", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/dr-ada-grey", "patientId": PATIENT,
                        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": sr}]}},
            "prefetch": prefetch}


def run(report: Report) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    key = ECKey.generate_key("P-384", private=True)
    key.ensure_kid()
    jwks = {"keys": [{**key.as_dict(private=False), "kid": key.kid, "alg": "ES384", "use": "sig"}]}
    keys_app = Flask("bench-ehr-keys")
    keys_app.add_url_rule("/jwks", "jwks", lambda: jsonify(jwks))
    keys_server = serve_in_thread(keys_app)
    sandbox = start_sandbox(open=True, seed=True)
    app = None
    try:
        wait_ready(f"{keys_server.url}/jwks")
        app = start_app_server(lambda url: [{"iss": sandbox.fhir_base, "client_id": "bench", "cds_iss": ISS,
                                             "cds_jwks_url": f"{keys_server.url}/jwks"}])
        url = f"{app.url}/cds-services/massage-order-sign"
        body = _body(_prefetch(sandbox.fhir_base))
        now = int(time.time())
        tokens = [jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT"},
                             {"iss": ISS, "aud": url, "iat": now, "exp": now + 590,
                              "jti": secrets.token_urlsafe(16)}, key, algorithms=["ES384"])
                  for _ in range(CALLS + WARMUP)]
        session = requests.Session()
        samples: list[float] = []
        for i, token in enumerate(tokens):
            started = time.perf_counter()
            r = session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            elapsed = (time.perf_counter() - started) * 1000
            if r.status_code != 200 or r.json()["cards"][0]["indicator"] != "critical":
                raise RuntimeError(f"call {i} answered {r.status_code}: {r.text[:200]}")
            if i >= WARMUP:
                samples.append(elapsed)
        session.close()
        p50, p95 = statistics.median(samples), percentile(samples, 95)
        report("order-sign, full prefetch: calls", len(samples), "calls", f"after {WARMUP} warm-up calls")
        report("order-sign, full prefetch: p50 latency", p50, "ms")
        report("order-sign, full prefetch: p95 latency", p95, "ms",
               f"target <= {TARGET_P95_MS:.0f} ms ({'met' if p95 <= TARGET_P95_MS else 'NOT met'}); "
               f"spec asks ~{SPEC_MS:.0f} ms")
        report("order-sign, full prefetch: max latency", max(samples), "ms")
        report("order-sign, full prefetch: prefetch size", len(str(body["prefetch"])), "chars")
    finally:
        if app is not None:
            app.stop()
        sandbox.stop()
        keys_server.stop()


if __name__ == "__main__":
    from benchmarks.__main__ import report as _report

    run(_report)
