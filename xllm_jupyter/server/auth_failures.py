"""A per-address cap on failed authentications (guessing API keys or hub tokens).

After ``auth.failed_auth_limit`` requests from one client address carried credentials
that matched nothing within ``auth.failed_auth_window_seconds``, the address is capped until
the window ends (the window after it too when it kept guessing past the cap, so that it averages
no more than the limit a window, as when it was refused outright): its credentials are checked
one request at a time, at most one every ``window / limit`` seconds (3 s by default), each
request waiting its turn (``past_cap``), and a request that finds ``PAST_CAP_WAITING`` of the address's requests already waiting gets 429
``rate_limit_exceeded`` with a ``Retry-After`` without its credentials being looked at. A key
guesser gets no more than one more guess each such interval (on the hub service no faster to
the hub's API); another caller behind the same address (a NAT, or an address a trusted proxy's
other clients can name, below) with a right key or token is served after the guesses ahead
of it instead of being locked out until the window ends. Callers at other addresses are not
affected. A request with no credentials at all is not a guess and is not counted.

A credential already verified on a client's own connection (not a trusted proxy's), or by a client that sends
back the cookie it was given for it (vouch_cookie.py), skips the line (``vouched``): a guesser keeping the
address's line full cannot hold up a caller it shares the address with once that caller is in, and gains no check
by it. A client's very first request waits its turn like any other: checking its credential ahead of the line
would tell a guesser which keys are right at any rate (``vouched`` says why).

Memory is bounded: at most ``auth.failed_auth_max_clients`` addresses are remembered; the least harmful is
forgotten first (``_evict``: the oldest not capped, while they fill more than a quarter of the table), so that a
guesser filling the table from fresh addresses pushes out one-off typos and his own fresh entries, not the capped
entries that throttle him. An IPv6 client counts by its /64 network (one host commonly has a whole /64 to
pick addresses from), and towards its /56 and /48 too, capped at ``IPV6_SITE_SHARE`` and ``IPV6_WIDE_SHARE`` times
the limit (a site can route any of its /64s to one host; ISPs hand out /56s and /48s: ``site_labels``).

The client address is the connection's peer, or, when the peer is one of ``auth.trusted_proxies``
(JupyterHub's proxy in front of the hub service), the last ``X-Forwarded-For`` hop that is not. A
request from a trusted address that names no such client is not counted: that address speaks for
many callers (on a one-host hub every user's server and kernel reaches the service from loopback
too), so one guesser there would lock all of them out, and a caller there can name any client anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import select
import socket
import time
import weakref
from collections import OrderedDict, deque
from typing import Any, AsyncIterator, Callable

from ..core.config import AuthConfig
from ..core.errors import Overloaded, RateLimited
from .client_address import IPV6_SITE_SHARE, IPV6_WIDE_SHARE, client_label, proxy_matcher, site_label, site_labels
from .vouch_cookie import VouchCookies

log = logging.getLogger("xllm_jupyter.server")

#: the settings key holding the FailedAuthLimiter (standalone and hub apps)
FAILURES_KEY = "xllm_auth_failures"
#: requests of a capped address that may wait for their credential check; more get 429 at once (at the
#: default 3 s a check, the last one waits ~24 s)
PAST_CAP_WAITING = 8

# poll()'s "peer closed its end" event (Linux); 0 where the platform has none
_RDHUP = getattr(select, "POLLRDHUP", 0) if hasattr(select, "poll") else 0


def connection_gone(request: Any) -> bool:
    """True when the client of ``request`` (a Tornado HTTPServerRequest) has closed its connection.

    For a request waiting in a route's ``prepare``, where Tornado does not watch the connection. On Linux
    ``POLLRDHUP`` sees the client's close (or half-close) even while part of its body is still unread in the
    socket; elsewhere a peek at the socket sees it only once nothing it sent is left unread.
    """
    stream = getattr(getattr(request, "connection", None), "stream", None)
    if stream is None:
        return False
    if stream.closed():
        return True
    if _RDHUP:
        # the peer's close, seen even behind a body still unread in the socket (a guesser's parked POSTs), TLS too
        try:
            poller = select.poll()
            poller.register(stream.socket.fileno(), select.POLLIN | _RDHUP)
            events = poller.poll(0)
        except (OSError, AttributeError, ValueError):
            return True  # no socket left
        if events and events[0][1] & (_RDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
    try:
        return stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # connected, nothing to read
    except ValueError:
        return False  # a socket that takes no flags (TLS): cannot tell, so it waits its turn as before
    except (OSError, AttributeError):
        return True  # reset, or no socket left


def _credential_digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode("utf-8", "replace")).digest()


class FailedAuthLimiter:
    """Counts failed authentications per client address in fixed windows; refuses an address over the limit."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic):
        self.limit = config.failed_auth_limit
        self.window = config.failed_auth_window_seconds
        self.max_clients = config.failed_auth_max_clients
        self._proxies = bool(config.trusted_proxies)
        self._trusted = proxy_matcher(config.trusted_proxies)
        self._clock = clock
        #: seconds between two credential checks of a capped address: the cap's own average rate
        self.interval = self.window / self.limit if self.limit > 0 else 0.0
        # label -> [failures, window start, earliest next check once capped, the label's limit]; ordered by last
        # failure, oldest first (what is forgotten first)
        self._table: OrderedDict[str, list[float]] = OrderedDict()
        # the labels of ``_table`` not capped, in the same order: forgotten before any capped one (``_evict``)
        self._uncapped: OrderedDict[str, None] = OrderedDict()
        # label -> [tickets of the requests in ``past_cap``, in arrival order; event set whenever one leaves]
        self._lanes: dict[str, list[Any]] = {}
        # set by ``close``: the server stops, requests still waiting their turn end now
        self._closing = asyncio.Event()
        #: 429s answered so far (every refused request, not each address once)
        self.refused = 0
        # label -> [credential checks under way, event set when one ends] (``asking``)
        self._asking: dict[str, list[Any]] = {}
        # open connection (its IOStream) -> digest of the credential verified on it (``vouch``); an entry goes
        # with its connection, so this holds no more than the open connections
        self._verified: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
        #: the cookies that vouch for a proved key on the client's later connections too (vouch_cookie.py)
        self.cookies = VouchCookies()

    @property
    def enabled(self) -> bool:
        """True when a limit is configured (``auth.failed_auth_limit`` > 0)."""
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._table)

    def client(self, request: Any) -> str | None:
        """The label of the client that sent ``request`` (a Tornado HTTPServerRequest); None when it came from a
        trusted proxy's address and names no client beyond our proxies (never counted)."""
        peer = request.remote_ip or ""
        if self._proxies and self._trusted(peer):
            # each proxy appends the address it was connected from: walk back over our own proxies only,
            # since anything further left was written by the client and may be made up
            hops = [h.strip() for h in ",".join(request.headers.get_list("X-Forwarded-For")).split(",") if h.strip()]
            for hop in reversed(hops):
                peer = hop
                if not self._trusted(hop):
                    break
            if self._trusted(peer):
                # the proxy itself, or any process on its host: every user behind it shares this address
                return None
        return client_label(peer)

    def _live(self, client: str) -> list[float] | None:
        """``client``'s entry while its window lasts (an ended one is dropped: the address starts afresh, unless
        ``_next_window`` keeps it capped)."""
        entry = self._table.get(client)
        if entry is not None:
            now = self._clock()
            if entry[1] + self.window - now <= 0 and self._next_window(entry, now) is None:
                del self._table[client]
                self._uncapped.pop(client, None)
                entry = None
        return entry

    def _next_window(self, entry: list[float], now: float) -> list[float] | None:
        """``entry`` moved on to the window after its ended one, capped, when the address guessed past the cap in
        the ended one (more failures than the limit) and ``now`` is in that next window; else None (afresh).

        A fresh window gave such an address ``limit`` guesses at once on top of the line's one every ``interval``:
        twice the cap's rate for as long as it kept guessing. Kept capped, it gets one every ``interval``, which is
        ``limit`` a window; a window with no guess past the cap ends it.
        """
        if entry[0] > entry[3] and now - entry[1] < 2 * self.window:
            entry[0], entry[1] = entry[3], entry[1] + self.window  # entry[2] kept: the line's spacing goes on
            return entry
        return None

    def _refusal(self, entry: list[float]) -> RateLimited:
        self.refused += 1
        left = entry[1] + self.window - self._clock()
        return RateLimited(
            f"Too many failed authentication attempts from this address; retry in {math.ceil(left)} s.",
            retry_after=max(1, math.ceil(left)),
        )

    def check(self, client: str | None) -> None:
        """Raise RateLimited while ``client`` is over the limit: its credentials then go through ``past_cap``."""
        if not self.enabled or client is None:
            return
        for label in (client, *(site for site, _ in site_labels(client))):
            entry = self._live(label)
            if entry is not None and entry[0] >= entry[3]:
                raise self._refusal(entry)

    def _capped_sites(self, client: str) -> list[tuple[str, list[float]]]:
        """The IPv6 networks of ``client`` (its /56, its /48) that are capped now, with their entries, widest first."""
        capped = []
        for site, _ in reversed(site_labels(client)):
            entry = self._live(site)
            if entry is not None and entry[0] >= entry[3]:
                capped.append((site, entry))
        return capped

    def _lane_label(self, client: str) -> str:
        """The label whose line ``client``'s capped requests wait in: its widest capped IPv6 network's (/48, else
        /56: else each of its /64s would have a line of its own, one check every ``interval`` each), or its own."""
        capped = self._capped_sites(client)
        return capped[0][0] if capped else client

    @contextlib.asynccontextmanager
    async def past_cap(self, client: str | None, gone: Callable[[], bool] | None = None) -> AsyncIterator[None]:
        """Around a credential check of a capped ``client``: one at a time, in arrival order, no sooner than
        ``interval`` after the address's last check or failure; RateLimited at once when ``PAST_CAP_WAITING``
        of its requests already wait, or when ``gone()`` says its client left while it waited (its turn passes
        to the next one, unspent).

        An address is no proof of who is calling (users behind one NAT; on a one-host hub any kernel can name any
        address through the trusted loopback proxy), so a capped address's right credentials still get in: after
        the guesses ahead of them, which pass no faster than the cap's own rate.
        """
        if not self.enabled or client is None:
            yield
            return
        label = self._lane_label(client)
        lane = self._lanes.get(label)
        if lane is None:
            lane = self._lanes[label] = [deque(), asyncio.Event()]  # tickets in arrival order, "moved"
        entry = self._live(label)
        if len(lane[0]) >= PAST_CAP_WAITING and entry is not None:
            # a place in the line frees at the next check, not at the window's end: a right key's client told to
            # come back then (the openai SDK waits a Retry-After of up to 60 s) gets another chance of a place
            self.refused += 1
            left = max(1, math.ceil(entry[2] - self._clock()))
            raise RateLimited(f"Too many failed authentication attempts from this address, and {PAST_CAP_WAITING} of "
                              f"its requests already wait their turn; retry in {left} s.", retry_after=left)
        ticket = object()
        lane[0].append(ticket)
        try:
            while True:
                if self._closing.is_set():
                    raise Overloaded("The server is shutting down; retry in a moment.")
                if gone is not None and gone():
                    raise RateLimited("The client left while its request waited for its turn.", retry_after=1)
                spacing = self._spacing(label, client)
                due = max(e[2] for e in spacing) - self._clock() if spacing else 0.0
                if lane[0][0] is ticket and due <= 0:
                    break
                # wake when the line moves, at this request's turn, or within a second to see whether its client left
                moved = lane[1]
                wait = min(1.0, due) if lane[0][0] is ticket else 1.0
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(moved.wait(), wait)
            for spaced in spacing:
                spaced[2] = self._clock() + self.interval
            yield
        finally:
            lane[0].remove(ticket)
            moved, lane[1] = lane[1], asyncio.Event()
            moved.set()  # the next in line looks again
            if not lane[0] and self._lanes.get(label) is lane:
                del self._lanes[label]

    def _spacing(self, label: str, client: str) -> list[list[float]]:
        """The entries whose next-check time a request of ``client`` in ``label``'s line waits for: the line's own,
        and its IPv6 networks' while they are capped (a /64's line the request joined before its /48 was capped
        went on at its own pace: 16 such lines of 8 guesses each were checked 16 an interval, not one)."""
        entries = [entry] if (entry := self._live(label)) is not None else []
        entries += [site_entry for site, site_entry in self._capped_sites(client) if site != label]
        return entries

    async def close(self, timeout: float = 1.0) -> None:
        """The server stops: requests waiting in ``past_cap`` get a 503 now; returns once they have (or ``timeout``).

        They wait in a route's ``prepare``, where Tornado does not watch the connection: closing it at shutdown
        would not end them, and the shutdown waited for each one's turn (up to ``PAST_CAP_WAITING`` intervals).
        """
        self._closing.set()
        for lane in list(self._lanes.values()):
            lane[1].set()  # wake them now
        deadline = time.monotonic() + timeout
        while self._lanes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # their 503s, raised as they left, are written in the step after

    @contextlib.asynccontextmanager
    async def asking(self, client: str | None) -> AsyncIterator[None]:
        """Around a credential check that awaits (the hub's API): ``client`` has at most as many under way as it
        has failures left, the others wait for them; RateLimited once it is over the limit.

        Without it, concurrent guesses all passed ``check`` before the first of them was counted (50 at once
        with a limit of 3: all 50 sent to the hub). A client whose credentials are right waits at most for the
        checks ahead of it, and is never refused for its concurrency.
        """
        if not self.enabled or client is None:
            yield
            return
        # the client's own count, and its IPv6 /56's and /48's (fresh /64s of one site each had a whole limit's room)
        labels = [(client, self.limit)] + [(site, self.limit * share) for site, share in site_labels(client)]
        while True:
            self.check(client)
            full = None
            for label, limit in labels:
                entry, slot = self._table.get(label), self._asking.get(label)
                if slot is not None and (entry[0] if entry is not None else 0) + slot[0] >= limit:
                    full = slot
                    break
            if full is None:
                break
            await full[1].wait()
        slots = []
        for label, _ in labels:
            slot = self._asking.get(label)
            if slot is None:
                slot = self._asking[label] = [0, asyncio.Event()]
            slot[0] += 1
            slots.append((label, slot))
        try:
            yield
        finally:
            for label, slot in slots:
                slot[0] -= 1
                done, slot[1] = slot[1], asyncio.Event()
                done.set()  # those waiting look again (on the counts as they are now)
                if slot[0] == 0 and self._asking.get(label) is slot:
                    del self._asking[label]

    def _own_stream(self, request: Any) -> Any:
        """The connection ``request`` came on, when it is its client's own; None behind a trusted proxy (a proxy's
        connection may carry many clients' requests, one after another: nginx's upstream keepalive)."""
        if self._proxies and self._trusted(request.remote_ip or ""):
            return None
        return getattr(getattr(request, "connection", None), "stream", None)

    def vouch(self, request: Any, credential: str) -> str | None:
        """``credential`` (the request's Authorization header) proved right on ``request``'s connection: later
        requests on it carrying the same credential skip the cap (``vouched``), and so do the client's on its other
        connections once it sends back the cookie; the ``Set-Cookie`` value to answer with (None: it has one)."""
        if not credential:
            return None
        stream = self._own_stream(request)
        digest = _credential_digest(credential)
        if stream is not None:
            with contextlib.suppress(TypeError):  # a stream that takes no weak reference is simply not remembered
                self._verified[stream] = digest
        return None if self.cookies.vouches(request, digest) else self.cookies.header(digest)

    def vouched(self, request: Any, credential: str | None) -> bool:
        """True when ``credential`` is the one already verified on ``request``'s own connection.

        Such a request neither waits its turn past the cap nor is refused for a full line: its caller already
        proved it holds that credential, through a check the cap counted (or before the address was capped).
        Why this is safe, when checking the presented credential before the line is not:

        - A check of a *presented* credential ahead of the line is a guessing oracle. Whatever it does for a right
          key (serve it at once, give it a place in a full line) differs from what a wrong key gets (its turn, or
          the full line's 429, which costs nothing to ask for), so each request sent past the cap would test one
          guess: as many guesses a window as the guesser can send, not ``limit``. A guess-rate count of 401s
          would not even see it: the oracle's answers are the 429s.
        - Here the answer depends on the connection's own history, not on any credential it did not prove. Only
          the client at the other end of a TCP connection can send on it (a NAT forwards connections, it does not
          mix them); a connection from a trusted proxy is never vouched for, since the proxy may pass another
          client's request over it. A guesser gets a vouched connection only by sending the right key through
          the counted check first, and then has nothing left to guess; a different credential on a vouched
          connection (a guess, or another key) takes the ordinary path and is counted as before, and the connection
          vouches for nothing after it (until a right key is checked on it again, in its turn).
        - Likewise the cookie (vouch_cookie.py): signed for the one key whose check it followed, with a secret of this
          process; a guess with anyone's cookie is not that key, and takes the line.
        """
        if not credential:
            return False
        if self.cookies.vouches(request, _credential_digest(credential)):
            return True  # this client proved this very key before, on another connection (vouch_cookie.py)
        stream = self._own_stream(request)
        if stream is None:
            return False
        try:
            known = self._verified.get(stream)
        except TypeError:
            return False
        if known is None:
            return False
        if hmac.compare_digest(known, _credential_digest(credential)):
            return True
        # another credential on it: the connection no longer vouches for the one it proved. Were it kept, each
        # wrong key sent on a connection that a non-trusted proxy shares between its clients (upstream keepalive)
        # would test one guess against the proved key at no cost (the full line's 429 meaning "not it"). The 401 or
        # 429 that follows closes the connection today; this does not rest on that.
        del self._verified[stream]
        return False

    def failed(self, client: str | None) -> None:
        """Count one request from ``client`` whose credentials matched nothing."""
        if not self.enabled or client is None:
            return
        now = self._clock()
        for site, share in reversed(site_labels(client)):  # widest first, so that the /64's own is the last forgotten
            self._count(site, self.limit * share, now)
        self._count(client, self.limit, now)

    def _count(self, label: str, limit: int, now: float) -> None:
        entry = self._table.pop(label, None)
        if entry is not None and now - entry[1] >= self.window:
            entry = self._next_window(entry, now)
        if entry is None:
            entry = [0, now, now, limit]
        entry[0] += 1
        entry[2] = now + self.interval  # once capped, the next check waits this long (``past_cap``)
        self._table[label] = entry  # to the end: the most recent failure is forgotten last
        self._uncapped.pop(label, None)
        if entry[0] < limit:
            self._uncapped[label] = None
        if entry[0] == limit:
            log.warning("client %s reached %d failed authentications in %g s: its credentials are checked one at a "
                        "time until the window ends",
                        label, limit, self.window)
        while len(self._table) > self.max_clients:
            self._evict()

    def _evict(self) -> None:
        """Forget the least harmful entry: the oldest one not capped while more than a quarter of the table is not
        capped, else the oldest of all.

        Oldest first alone let a guesser spread over many fresh addresses (a /32's /48s, or a botnet) push out the
        capped entries that throttled him, his own among them, and start afresh where they were: one failure from
        each of ``max_clients`` fresh addresses was enough. Entries not capped are worth less than a limit each.
        They are not always forgotten first: in a table of capped entries an address's second failure would find
        its first forgotten (a guesser alternating two fresh addresses was never capped), so a quarter of the room
        stays theirs, oldest first there.
        """
        if len(self._uncapped) > max(1, self.max_clients // 4):
            label, _ = self._uncapped.popitem(last=False)
            del self._table[label]
        else:
            label, _ = self._table.popitem(last=False)
            self._uncapped.pop(label, None)


__all__ = ["FAILURES_KEY", "IPV6_SITE_SHARE", "IPV6_WIDE_SHARE", "PAST_CAP_WAITING", "FailedAuthLimiter", "client_label", "connection_gone",
           "proxy_matcher", "site_label", "site_labels"]
