"""Run a WSGI app on a loopback port in a background thread (sandbox, app, tests, benchmarks).

Port 0 asks the OS for a free port; ``RunningServer.url`` tells which one it got. ``wait_ready`` polls a URL
with a deadline instead of sleeping (house style).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


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


class KeepAliveHandler(WSGIRequestHandler):
    """HTTP/1.1 with persistent connections. Werkzeug's default (HTTP/1.0) closes the connection after every
    response, so each FHIR request paid a new TCP connection and thread: most of the sandbox's p95 on loopback."""

    protocol_version = "HTTP/1.1"


def make_threaded_server(host: str, port: int, app: Any) -> BaseWSGIServer:
    """A threaded WSGI server with keep-alive (the sandbox, the app, the demo, tests).

    A busy or forbidden address raises OSError (callers turn it into one plain line): we bind the socket ourselves
    and hand werkzeug its descriptor, because werkzeug's own bind answers a busy port with two lines on stderr and
    sys.exit(1).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does: TIME_WAIT is not "busy"
        sock.bind((host, port))
        sock.listen(128)
        return make_server(host, port, app, threaded=True, request_handler=KeepAliveHandler, fd=sock.fileno())
    finally:
        sock.close()  # werkzeug serves on its own duplicate of the descriptor


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    server = make_threaded_server(host, port, app)
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
