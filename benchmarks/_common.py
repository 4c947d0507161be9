"""Helpers shared by the benchmark modules (not a benchmark itself: only ``bench_*`` modules are run).

* ``percentile`` / ``median_ms``: the figures several benchmarks report, computed one way.
* ``start_sandbox_and_app``: the seeded sandbox (with its authorization server) and the real app registered as a
  public client of it, both on loopback ports, for benchmarks that walk a real launch.
* ``record_outgoing``: the app's own requests to the EHR, as "METHOD /path" lines, to count round trips.
"""

from __future__ import annotations

import secrets
import statistics
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import requests


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile: small sample sets, no interpolation to pretend precision."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def median_ms(fn: Callable[[], Any], n: int) -> float:
    """The median time of ``n`` calls of ``fn``, in milliseconds."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def start_sandbox_and_app(**config: Any) -> tuple[Any, Any, Any, str]:
    """→ (sandbox server, app server, app, client_id). ``config`` goes to ``smart_app.create_app`` (AREAS, ...).

    The caller stops both servers. The client is registered with exact redirect and launch URLs, as a real EHR
    registration would be."""
    from fhir_massage.sandbox.server import SandboxConfig, create_sandbox_app
    from fhir_massage.serving import serve_in_thread, wait_ready
    from tests.fixtures.app import start_app_server

    sandbox = serve_in_thread(create_sandbox_app(SandboxConfig(seed=True)))
    wait_ready(f"{sandbox.url}/_sandbox/health", ok=lambda r: r.status_code == 200)
    client_id = f"bench-{secrets.token_hex(4)}"
    app_server = start_app_server(lambda url: [{"iss": f"{sandbox.url}/fhir", "client_id": client_id}], **config)
    r = requests.post(f"{sandbox.url}/_sandbox/clients", json={
        "client_id": client_id, "auth_method": "none", "redirect_uris": [app_server.redirect_uri],
        "launch_url": app_server.launch_url, "name": "bench"}, timeout=10)
    r.raise_for_status()
    return sandbox, app_server, app_server.app, client_id


def record_outgoing(app: Any) -> list[str]:
    """A list the app's HTTP session appends "METHOD /path" to for every response it gets from the EHR."""
    outgoing: list[str] = []
    app.extensions["smart_app"].http.hooks["response"].append(
        lambda resp, *a, **k: outgoing.append(f"{resp.request.method} {urlsplit(resp.url).path}"))
    return outgoing
