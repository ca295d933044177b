"""``Host`` header names and loopback checks: the one reading both DNS-rebinding guards share.

The standalone server (keyless loopback mode, its allowed hosts) and the playground's guard
must agree on what a Host names, or a name one accepts slips past the other.
"""

from __future__ import annotations

import ipaddress
import re
import socket

#: names that resolve to this machine without DNS (RFC 6761 reserves ``localhost`` and ``*.localhost``)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
#: the short IPv4 forms ``inet_aton`` (so the bind's ``getaddrinfo``) reads: ``0``, ``0x0``, ``127.1``
_SHORT_IPV4 = re.compile(r"[0-9a-fA-FxX]+(\.[0-9a-fA-FxX]+){0,3}")


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, lower-case, without port, brackets or trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:7860
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_ip_literal(name: str) -> bool:
    """True for an IPv4/IPv6 address (which DNS rebinding cannot spoof: it needs a domain name)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``*.localhost`` and loopback IPs (``127.0.0.0/8``, ``::1``); brackets allowed."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    return is_ip_literal(name) and ipaddress.ip_address(name).is_loopback


def unspecified_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The "every interface" address a bind ``host`` spells (``""``, ``0``, ``0.0.0.0``, ``::``, ``::0``, ``[::]``),
    else None. ``""`` binds every address of both families and reads as ``0.0.0.0``.

    Read as addresses, not matched as strings: ``--host 0`` or ``--host ::0`` listen everywhere just as
    ``0.0.0.0`` and ``::`` do, and must be treated alike (the Host check, the URL to print).
    """
    name = host.strip().strip("[]").rstrip(".")
    if not name:
        return ipaddress.IPv4Address(0)
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if not _SHORT_IPV4.fullmatch(name):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return address if address.is_unspecified else None
