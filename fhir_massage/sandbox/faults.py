"""Fault injection: make the sandbox behave like a slow, flaky or overloaded EHR, on purpose.

Off by default. Set at start (``SandboxConfig.faults``) or at run time via ``POST /_sandbox/faults`` (JSON with
the ``FaultConfig`` fields) and cleared with ``DELETE /_sandbox/faults``. Applies to FHIR requests only (paths
under ``/fhir``, narrowed by ``fail_paths``), never to the admin endpoints.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FAIL_STATUSES = (429, 500, 503)


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: int = 0  # added before every matching request
    fail_every_n: int = 0  # every n-th matching request answers fail_status (0 = never)
    fail_status: int = 503
    fail_methods: tuple[str, ...] = ()  # e.g. ("POST",); empty = all methods
    fail_paths: tuple[str, ...] = ()  # path prefixes, e.g. ("/fhir/ServiceRequest",); empty = all of /fhir
    drop_every_n: int = 0  # every n-th matching request gets its connection closed with no answer
    retry_after: int | None = None  # seconds, sent as Retry-After on injected 429/503

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.fail_every_n or self.drop_every_n)

    @classmethod
    def from_json(cls, data: Any) -> "FaultConfig":
        """Build from a JSON object; ValueError with a plain message on anything unexpected."""
        if not isinstance(data, dict):
            raise ValueError("The body must be a JSON object with fault settings.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown fault setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        kw: dict[str, Any] = {}
        for name in ("latency_ms", "fail_every_n", "drop_every_n"):
            if name in data:
                v = data[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 600_000:
                    raise ValueError(f"{name} must be a whole number from 0 to 600000.")
                kw[name] = v
        if "fail_status" in data:
            if data["fail_status"] not in FAIL_STATUSES:
                raise ValueError(f"fail_status must be one of {', '.join(map(str, FAIL_STATUSES))}.")
            kw["fail_status"] = data["fail_status"]
        for name in ("fail_methods", "fail_paths"):
            if name in data:
                v = data[name]
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{name} must be a list of strings.")
                kw[name] = tuple(x.upper() for x in v) if name == "fail_methods" else tuple(v)
        if "retry_after" in data and data["retry_after"] is not None:
            v = data["retry_after"]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("retry_after must be a whole number of seconds.")
            kw["retry_after"] = v
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fail_methods"] = list(self.fail_methods)
        d["fail_paths"] = list(self.fail_paths)
        return d


@dataclass
class Decision:
    delay_s: float = 0.0
    fail_status: int | None = None
    drop: bool = False
    retry_after: int | None = None


@dataclass
class FaultInjector:
    config: FaultConfig = field(default_factory=FaultConfig)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count: int = 0

    def set(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._count = 0

    def decide(self, method: str, path: str) -> Decision:
        with self._lock:
            cfg = self.config
            if not cfg.active or not path.startswith("/fhir"):
                return Decision()
            if cfg.fail_methods and method.upper() not in cfg.fail_methods:
                return Decision()
            if cfg.fail_paths and not any(path.startswith(p) for p in cfg.fail_paths):
                return Decision()
            self._count += 1
            n = self._count
        d = Decision(delay_s=cfg.latency_ms / 1000.0, retry_after=cfg.retry_after)
        if cfg.drop_every_n and n % cfg.drop_every_n == 0:
            d.drop = True
        elif cfg.fail_every_n and n % cfg.fail_every_n == 0:
            d.fail_status = cfg.fail_status
        return d

    @staticmethod
    def wait(decision: Decision) -> None:
        if decision.delay_s > 0:
            time.sleep(decision.delay_s)  # the injected latency itself, not a wait for readiness

    @staticmethod
    def drop_connection(environ: dict[str, Any]) -> bool:
        """Close the client socket so the client sees a dropped connection; False if the server gives no socket."""
        sock = environ.get("werkzeug.socket")
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True
