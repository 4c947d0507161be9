"""Run a WSGI app on a loopback port in a background thread (sandbox, app, tests, benchmarks).

Port 0 asks the OS for a free port; ``RunningServer.url`` tells which one it got. ``wait_ready`` polls a URL
with a deadline instead of sleeping (house style).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from werkzeug.serving import BaseWSGIServer, make_server


@dataclass
class RunningServer:
    server: BaseWSGIServer
    thread: threading.Thread
    host: str
    port: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    server = make_server(host, port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name=f"wsgi-{server.port}", daemon=True)
    thread.start()
    return RunningServer(server=server, thread=thread, host=host, port=server.port)


def wait_ready(url: str, *, deadline_s: float = 30.0, ok=lambda r: r.status_code < 500) -> None:
    """Poll ``url`` until it answers (any status ``ok`` accepts) or the deadline passes."""
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            if ok(requests.get(url, timeout=2)):
                return
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready within {deadline_s:.0f} s ({last})")
