"""Is this the local machine? Shared by the app's config checks, the CDS JWT checks and the sandbox.

Two questions, kept apart on purpose:

* ``is_loopback_host``: a *host name* from a URL or a --host option; ``localhost`` counts (RFC 6761 section 6.3 lets
  it resolve only to loopback), and so does an IPv6 literal in brackets.
* ``is_loopback_addr``: the *peer address* of a request (``request.remote_addr``); only an IP literal counts, never
  a name, so a forwarded or forged "localhost" opens nothing.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host", "is_loopback_addr"]


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    return is_loopback_addr(host)


def is_loopback_addr(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False
