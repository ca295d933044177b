"""Client addresses as the per-address caps count them: trusted proxies, and the address, IPv6 /64, /56, /48 labels."""

from __future__ import annotations

import ipaddress
import logging
from typing import Callable, Iterable

log = logging.getLogger("xllm_jupyter.server")

#: /64s of one IPv6 /56 that may use up their failures before the /56 as a whole is capped (``site_labels``)
IPV6_SITE_SHARE = 16
#: /64s of one IPv6 /48 that may use up their failures before the /48 as a whole is capped: four /56s' shares
IPV6_WIDE_SHARE = 64
#: the networks an IPv6 /64 counts towards too, narrowest first, each with its share (times the per-client cap)
IPV6_LEVELS = ((56, IPV6_SITE_SHARE), (48, IPV6_WIDE_SHARE))

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(entries: Iterable[str]) -> tuple[_Network, ...]:
    out: list[_Network] = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            log.warning("ignoring auth.trusted_proxies entry %r: not an IP address or network", entry)
            continue
        mapped = getattr(net.network_address, "ipv4_mapped", None)
        if mapped is not None and net.prefixlen >= 96:
            # ::ffff:10.0.0.5 (as a dual-stack server logs an IPv4 peer) names the IPv4 proxy 10.0.0.5, which is
            # how ``_address`` reads such a peer: kept IPv6, the entry matched no peer at all
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        out.append(net)
    return tuple(out)


def proxy_matcher(entries: Iterable[str]) -> Callable[[str], bool]:
    """A test of whether an address is one of ``entries`` (``auth.trusted_proxies``: addresses or networks)."""
    networks = _networks(entries)

    def trusted(addr: str) -> bool:
        parsed = _address(addr)
        return parsed is not None and any(parsed in net for net in networks if net.version == parsed.version)

    return trusted


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    # a proxy that writes the client's port too (1.2.3.4:5678, [2001:db8::1]:5678): a port per connection
    # must not make a fresh client of each one
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:1.2.3.4 is the IPv4 client 1.2.3.4
    return mapped or addr


def client_label(addr: str) -> str:
    """The key an address is counted under: the address, or its /64 for IPv6 (bounded length otherwise)."""
    parsed = _address(addr)
    if parsed is None:
        return addr[:64]
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def site_labels(label: str) -> tuple[tuple[str, int], ...]:
    """The IPv6 /56 and /48 a /64 label (``client_label``) lies in, each with its share (``IPV6_LEVELS``); none for
    any other label.

    For the failed-auth cap (auth_failures.py; connections.py caps open connections the same way): a site can
    route any of its /64s to one host: counted by /64 alone, such a guesser rotated through 65536 fresh caps
    (``limit`` guesses each a window) and pushed every other address out of the bounded table. Its failures count
    towards its /56 and its /48 too, capped at 16 and 64 times the limit (a site's honest hosts in several /64s are
    not capped for one another's typos at once).

    Two levels, since ISPs hand out either: a home or small site commonly gets a /56 (256 /64s), and ISPs that do
    so put 256 homes in one /48. With the /48 alone at 16 times the limit, one home's guesser (any of its /64s)
    capped its 255 neighbours' /48 too. Now it caps its own /56; its /48 (64 times the limit, four /56s' shares)
    takes four or more /56s guessing at full speed together, and a site with a whole /48 still gets no more than
    64 limits a window however it spreads over its /56s (it had 16).

    One /64 cannot cap its /56 alone: its own cap holds it to about twice the limit in a window (the limit at once,
    then one every ``interval``), so it takes ``IPV6_SITE_SHARE / 2`` or more /64s guessing at full speed together;
    likewise a capped /56 holds its /64s to about twice the limit together. Once a network is capped, every /64 of
    it waits in its one line until its windows end: connections that already proved their key are still served at
    once (``vouched``), fresh ones wait their turn or get 429. A site whose many users' typos alone reach 16 times
    the limit in a window needs a higher ``auth.failed_auth_limit``."""
    if not label.endswith("/64"):
        return ()
    try:
        net = ipaddress.IPv6Network(label)
    except ValueError:
        return ()
    return tuple((str(net.supernet(new_prefix=prefix)), share) for prefix, share in IPV6_LEVELS)


def site_label(label: str) -> str | None:
    """The IPv6 /48 a /64 label (``client_label``) lies in, the widest of ``site_labels``; None for any other."""
    levels = site_labels(label)
    return levels[-1][0] if levels else None
