"""Caps on open connections, so a client holding many half-sent requests cannot take the server's sockets.

Tornado accepts every connection and waits up to ``server.connection_timeout_seconds`` for its
request head. A client that opens connections and sends nothing more (slowloris) therefore held
one file descriptor each: at the process's descriptor limit ``accept`` failed, Tornado logged a
traceback and retried at once, so the server spun a core, wrote its log full, and answered nobody
for as long as the client kept them open.

Here a connection is refused as soon as it is accepted when its client already has
``server.max_connections_per_client`` open (IPv6 by /64, as for failed authentications; the
``auth.trusted_proxies`` are exempt, since every user of a hub arrives through its proxy, and count towards no
client's or network's cap, only the total: counted, a proxy's many connections filled the caps of its /64, /56 and
/48 and shut out every other host there, a hub's users on the proxy's subnet included), when its IPv6
/56 already has ``IPV6_SITE_SHARE`` (16) times that open or its /48 ``IPV6_WIDE_SHARE`` (64) times (a site can
route any of its /64s to one host: by /64 alone such a client opened 256 in each, up to the total cap, and shut
everyone else out; an ISP handing out /56s puts 256 homes in one /48, which one home's 16 /64s filled), or when
the server has ``server.max_connections`` open (0: three quarters of the descriptor limit, which
``raise_fd_limit`` first lifts to its hard maximum, so the cap is reached before ``accept`` fails).
The per-client cap's default (-1) is 256, or a quarter of the total cap where that is lower: at a
low descriptor limit the total cap was below 256 and the per-client one never came first.

A refused connection is answered before it is closed, 429 ``too_many_connections`` (503 at the total
cap) with an OpenAI error body and ``Retry-After``: closed without a word, the openai SDK saw a
connection error and retried it at once. The answer costs little more than the close: one non-blocking
``send`` of a few hundred bytes (what does not fit is dropped) and nothing parsed. The connection is then
closed the way web servers do it ("lingering close"): its sending half at once, so the client reads the answer
and its end, and the whole of it once the client has closed too, or after ``LINGER_SECONDS``, the request
that arrives meanwhile read off and dropped. Closed outright with a request still arriving, it drew a reset,
which made the client's read of the answer fail (and on some systems destroys the unread answer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Any, Callable

from tornado import gen, httputil
from tornado.ioloop import IOLoop
from tornado.iostream import SSLIOStream, StreamClosedError

from ..core.errors import Overloaded, RateLimited, XllmError
from .auth_failures import IPV6_SITE_SHARE, IPV6_WIDE_SHARE, client_label, site_labels
from .errors import error_response
from .head_limit import HeadLimitedHTTPServer
from .sse import dumps

log = logging.getLogger("xllm_jupyter.server")
#: what ``ConnectionGuard.admit`` counts a trusted proxy's connection under: nothing but the total
EXEMPT = "(trusted proxy)"

#: descriptors ``max_connections: 0`` leaves for everything else (model files, logs, the usage file)
_SPARE_SHARE = 4
#: the most ``raise_fd_limit`` asks for (some systems allow millions; the cap need not follow them)
_FD_CEILING = 65536
#: the per-client cap ``max_connections_per_client: -1`` stands for, unless a quarter of the total is lower
_PER_CLIENT_DEFAULT = 256
#: of what a refused client already sent, the most read off (and dropped) before the close, in one ``recv``:
#: unread data turns the close into a reset, which some systems let destroy the answer before it is read
_DRAIN_BYTES = 64 * 1024
#: how long a refused connection stays half-closed, its request read off, before it is closed anyway
LINGER_SECONDS = 2.0
#: of a refused connection's request, the most read off while it lingers (a reset is all a bigger one gets)
LINGER_BYTES = 1024 * 1024
#: refused connections one server lets linger at once, past which they are closed at once; fewer where the total cap
#: is low (a 16th of it): they hold descriptors beyond the cap, which at a low descriptor limit are the last ones
LINGER_MAX = 64


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


def per_client_cap(configured: int, total: int) -> int:
    """The per-client cap in force: ``configured``, or for -1 (the default) 256 or a quarter of ``total`` if lower."""
    return configured if configured >= 0 else max(1, min(_PER_CLIENT_DEFAULT, total // 4))


def refusal_reply(exc: XllmError) -> bytes:
    """A whole HTTP/1.1 response for ``exc`` (OpenAI error body, its Retry-After), ending the connection."""
    status, body, headers = error_response(exc)
    data = dumps(body).encode()
    head = [f"HTTP/1.1 {status} {httputil.responses[status]}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def answer(stream: Any, reply: bytes) -> bool:
    """Send ``reply`` on a just-accepted ``stream`` without waiting on its client and end its sending half;
    whether both happened (not over TLS, which would need a handshake first, nor to a client already gone)."""
    sock = getattr(stream, "socket", None)
    if sock is None or isinstance(stream, SSLIOStream):
        return False
    try:
        # Tornado made the socket non-blocking: one send, and a fresh connection's buffer takes it all
        sock.send(reply)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone: the close is all that is left
        return False
    return True


def drain_and_close(stream: Any) -> None:
    """Close ``stream`` now, first reading off what its client has already sent (so the close is no reset)."""
    sock = getattr(stream, "socket", None)
    if sock is not None and not isinstance(stream, SSLIOStream):
        try:
            sock.recv(_DRAIN_BYTES)  # only what has already arrived (BlockingIOError when nothing has)
        except OSError:
            pass
    stream.close()


async def linger_then_close(stream: Any) -> None:
    """Read off and drop what the client of an answered ``stream`` sends until it closes (``LINGER_BYTES``
    at most) or ``LINGER_SECONDS`` pass; then close it."""
    deadline = IOLoop.current().time() + LINGER_SECONDS
    left = LINGER_BYTES
    try:
        while left > 0:
            chunk = await gen.with_timeout(deadline, stream.read_bytes(min(left, _DRAIN_BYTES), partial=True),
                                           quiet_exceptions=(StreamClosedError,))
            left -= len(chunk)
    except (StreamClosedError, gen.TimeoutError):
        pass
    finally:
        stream.close()


class ConnectionGuard:
    """Counts open connections per client and in all; says whether a new one may stay."""

    def __init__(self, total: int, per_client: int, exempt: Callable[[str], bool] = lambda _: False):
        self.total = total
        self.per_client = per_client_cap(per_client, total)
        #: connections the /64s of one IPv6 /56 may hold open together (``per_client`` x ``IPV6_SITE_SHARE``)
        self.per_site = self.per_client * IPV6_SITE_SHARE
        #: connections the /64s of one IPv6 /48 may hold open together (``per_client`` x ``IPV6_WIDE_SHARE``)
        self.per_wide_site = self.per_client * IPV6_WIDE_SHARE
        self._exempt = exempt
        self._open: Counter[str] = Counter()
        self._count = 0
        self._warned: set[str] = set()
        #: connections closed on arrival so far
        self.refused = 0
        #: the answer to the connection ``admit`` refused last (429 over a client's cap, 503 over the total)
        self.reply = b""
        self._client_reply = refusal_reply(RateLimited(
            f"Too many open connections from this address (at most {self.per_client}); close some and retry.",
            code="too_many_connections"))
        self._site_replies = {prefix: refusal_reply(RateLimited(
            f"Too many open connections from this address's IPv6 /{prefix} network (at most {cap}); close some "
            "and retry.", code="too_many_connections")) for prefix, cap in ((56, self.per_site), (48, self.per_wide_site))}
        self._total_reply = refusal_reply(Overloaded(
            f"The server has too many open connections (at most {self.total}); retry shortly.",
            code="too_many_connections"))

    @property
    def open(self) -> int:
        """Connections open now."""
        return self._count

    def admit(self, address: str) -> str | None:
        """The label ``address`` is counted under if its connection may stay (pair with ``release``), else None;
        ``EXEMPT`` for a trusted proxy's, counted in the total only."""
        exempt = self._exempt(address)
        label = EXEMPT if exempt else client_label(address)
        sites = () if exempt else site_labels(label)
        capped = self.per_client and not exempt
        over_client = capped and self._open[label] >= self.per_client
        over_site = None if not capped or over_client else next(
            (site for site, share in sites if self._open[site] >= self.per_client * share), None)
        if over_client or over_site or self._count >= self.total:
            self.refused += 1
            self.reply = (self._client_reply if over_client else
                          self._site_replies[int(over_site.rpartition("/")[2])] if over_site else self._total_reply)
            why = label if over_client else over_site if over_site else "*"
            if why not in self._warned:  # once per episode, not per connection: the log must not fill up
                self._warned.add(why)
                log.warning("closing new connections from %s: %s", why if why != "*" else "every client",
                            f"it has {self.per_client} open" if over_client else
                            f"its /64s have {self._open[why]} open" if over_site else f"{self.total} are open")
            return None
        self._count += 1
        if exempt:
            return label
        self._open[label] += 1
        for site, _ in sites:
            self._open[site] += 1
        return label

    def release(self, label: str) -> None:
        """A connection ``admit`` let in has closed."""
        self._count -= 1
        for counted in () if label == EXEMPT else (label, *(site for site, _ in site_labels(label))):
            self._open[counted] -= 1
            if self._open[counted] <= 0:
                del self._open[counted]
                self._warned.discard(counted)
        if self._count < self.total:
            self._warned.discard("*")


class GuardedHTTPServer(HeadLimitedHTTPServer):
    """The standalone/hub HTTP server, closing connections over the ``guard``'s caps as they arrive."""

    guard: ConnectionGuard | None = None

    def handle_stream(self, stream: Any, address: Any) -> None:
        """Serve ``stream`` unless its client (or the server) is at its cap; then answer 429/503 and close it."""
        if self.guard is None:
            return super().handle_stream(stream, address)
        host = address[0] if isinstance(address, tuple) and address else ""
        label = self.guard.admit(host)
        if label is None:
            self._refuse(stream, self.guard.reply)
            return None
        if not hasattr(self, "_labels"):
            self._labels: dict[Any, str] = {}
        self._labels[stream] = label
        return super().handle_stream(stream, address)

    def _refuse(self, stream: Any, reply: bytes) -> None:
        """Answer ``stream`` with ``reply`` and close it, lingering while fewer than ``LINGER_MAX`` do (a 16th of the
        total cap where that is lower)."""
        if not hasattr(self, "_lingering"):
            self._lingering: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
        most = max(1, min(LINGER_MAX, self.guard.total // 16)) if self.guard is not None else LINGER_MAX
        if not answer(stream, reply) or len(self._lingering) >= most:
            return drain_and_close(stream)
        task = asyncio.ensure_future(linger_then_close(stream))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)
        return None

    def on_close(self, server_conn: httputil.HTTPConnection) -> None:
        """Count the connection out."""
        super().on_close(server_conn)
        label = getattr(self, "_labels", {}).pop(getattr(server_conn, "stream", None), None)
        if label is not None and self.guard is not None:
            self.guard.release(label)


__all__ = ["EXEMPT", "LINGER_BYTES", "LINGER_MAX", "LINGER_SECONDS", "ConnectionGuard", "GuardedHTTPServer", "answer",
           "default_max_connections", "drain_and_close", "linger_then_close", "per_client_cap",
           "raise_fd_limit", "refusal_reply"]
