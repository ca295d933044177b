"""Caps on open connections, so a client holding many half-sent requests cannot take the server's sockets.

Tornado accepts every connection and waits up to ``server.connection_timeout_seconds`` for its
request head. A client that opens connections and sends nothing more (slowloris) therefore held
one file descriptor each: at the process's descriptor limit ``accept`` failed, Tornado logged a
traceback and retried at once, so the server spun a core, wrote its log full, and answered nobody
for as long as the client kept them open.

Here a connection is closed as soon as it is accepted when its client already has
``server.max_connections_per_client`` open (IPv6 by /64, as for failed authentications; the
``auth.trusted_proxies`` are exempt, since every user of a hub arrives through its proxy), or when
the server has ``server.max_connections`` open (0: three quarters of the descriptor limit, which
``raise_fd_limit`` first lifts to its hard maximum, so the cap is reached before ``accept`` fails).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

from tornado import httputil

from .auth_failures import client_label
from .head_limit import HeadLimitedHTTPServer

log = logging.getLogger("xllm_jupyter.server")

#: descriptors ``max_connections: 0`` leaves for everything else (model files, logs, the usage file)
_SPARE_SHARE = 4
#: the most ``raise_fd_limit`` asks for (some systems allow millions; the cap need not follow them)
_FD_CEILING = 65536


def raise_fd_limit() -> int:
    """Lift this process's soft descriptor limit towards its hard one (at most 65536); the soft limit after."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits
        return 8192
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, _FD_CEILING)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return _FD_CEILING if soft == resource.RLIM_INFINITY else soft


def default_max_connections() -> int:
    """The total cap ``max_connections: 0`` stands for: three quarters of the (raised) descriptor limit."""
    limit = raise_fd_limit()
    return max(16, limit - limit // _SPARE_SHARE)


class ConnectionGuard:
    """Counts open connections per client and in all; says whether a new one may stay."""

    def __init__(self, total: int, per_client: int, exempt: Callable[[str], bool] = lambda _: False):
        self.total = total
        self.per_client = per_client
        self._exempt = exempt
        self._open: Counter[str] = Counter()
        self._count = 0
        self._warned: set[str] = set()
        #: connections closed on arrival so far
        self.refused = 0

    @property
    def open(self) -> int:
        """Connections open now."""
        return self._count

    def admit(self, address: str) -> str | None:
        """The label ``address`` is counted under if its connection may stay (pair with ``release``), else None."""
        label = client_label(address)
        over_client = self.per_client and not self._exempt(address) and self._open[label] >= self.per_client
        if over_client or self._count >= self.total:
            self.refused += 1
            why = label if over_client else "*"
            if why not in self._warned:  # once per episode, not per connection: the log must not fill up
                self._warned.add(why)
                log.warning("closing new connections from %s: %s", label if over_client else "every client",
                            f"it has {self.per_client} open" if over_client else f"{self.total} are open")
            return None
        self._open[label] += 1
        self._count += 1
        return label

    def release(self, label: str) -> None:
        """A connection ``admit`` let in has closed."""
        self._count -= 1
        self._open[label] -= 1
        if self._open[label] <= 0:
            del self._open[label]
            self._warned.discard(label)
        if self._count < self.total:
            self._warned.discard("*")


class GuardedHTTPServer(HeadLimitedHTTPServer):
    """The standalone/hub HTTP server, closing connections over the ``guard``'s caps as they arrive."""

    guard: ConnectionGuard | None = None

    def handle_stream(self, stream: Any, address: Any) -> None:
        """Serve ``stream`` unless its client (or the server) is at its cap; then close it at once."""
        if self.guard is None:
            return super().handle_stream(stream, address)
        host = address[0] if isinstance(address, tuple) and address else ""
        label = self.guard.admit(host)
        if label is None:
            stream.close()
            return None
        if not hasattr(self, "_labels"):
            self._labels: dict[Any, str] = {}
        self._labels[stream] = label
        return super().handle_stream(stream, address)

    def on_close(self, server_conn: httputil.HTTPConnection) -> None:
        """Count the connection out."""
        super().on_close(server_conn)
        label = getattr(self, "_labels", {}).pop(getattr(server_conn, "stream", None), None)
        if label is not None and self.guard is not None:
            self.guard.release(label)


__all__ = ["ConnectionGuard", "GuardedHTTPServer", "default_max_connections", "raise_fd_limit"]
