"""Whether this server's xllm API is the hub service's or its own, settled once the hub answers.

The extension asks the hub at start (extension/hub_lookup.py). The service, once found, is forwarded
to; when it stops answering, the hub is asked whether its URL changed (``service_unreachable``). While
the hub has not answered (down, restarting, slower than the lookup timeout under a burst of spawns)
the server waits for it rather than loading a model of its own: the next request to a forwarded route
asks again, at most every ``RETRY_SECONDS``, and concurrent requests share one lookup. A no (403, 404: this server's own engine serves) is asked
again in the background every ``recheck_seconds`` or so, because an admin may add the service or
grant the scope and restart the hub under running servers: when the service appears, new requests
are forwarded while those already in this server's engine finish there (``local_drained``). The found
service is asked about as often, because an admin may also remove it (or move it): when the hub's word
becomes a no, new requests are served by this server's engine again, while those already forwarded finish
at the service (or get its 503 if it is gone).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from .hub_lookup import DEFAULT_HUB_SERVICE, HubLookup, HubService, lookup_hub_service, scope_advice

log = logging.getLogger("xllm_jupyter.extension")

#: the least time between two lookups while the hub has not answered (a request never waits for more than one)
RETRY_SECONDS = 10.0
#: how far each wait between re-checks of a no strays from ``recheck_seconds``: servers started together
#: (a class logging in at nine) do not all ask the hub at once
RECHECK_JITTER = 0.2

#: the states, as ``/xllm/health`` names them in ``engine``
HUB = "hub-service"
LOCAL = "local"
WAITING = "waiting-for-hub"


#: connect fast or say so; a non-streamed generation may take minutes before its first byte
TIMEOUT = httpx.Timeout(900.0, connect=10.0, pool=30.0)


@dataclass
class Upstream:
    """The hub service the API is forwarded to, and the connection pool to it."""

    service: HubService
    client: httpx.AsyncClient
    active: int = 0  # forwarded requests using the pool now
    retired: bool = False  # another took its place (the service moved): closed once ``active`` is 0

    @classmethod
    def open(cls, service: HubService) -> Upstream:
        """A pool for ``service`` (call on the IOLoop; ``close`` it at shutdown)."""
        # identity: chunks pass through as the service wrote them (a compressed stream would be buffered)
        headers = {"Authorization": f"token {service.token}", "Accept-Encoding": "identity"}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=16)
        return cls(service, httpx.AsyncClient(headers=headers, timeout=TIMEOUT, limits=limits))

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Count a forwarded request (a retired pool closes when its last one ends)."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.retired and self.active == 0:
                asyncio.ensure_future(self.close())

    def retire(self) -> None:
        """No new request uses this pool; close it once those using it have ended (on the IOLoop)."""
        self.retired = True
        if self.active == 0:
            asyncio.ensure_future(self.close())

    async def close(self) -> None:
        """Close the pool's connections."""
        await self.client.aclose()


class HubLink:
    """This server's choice between the hub's xllm service and its own engine; ``state`` is one of HUB, LOCAL, WAITING."""

    def __init__(self, env: Mapping[str, str], on_settled: Callable[[HubLink], None], recheck_seconds: float = 0.0) -> None:
        self._env = env
        self._on_settled = on_settled  # called when the state leaves WAITING, and again on each switch (LOCAL, HUB)
        self.recheck_seconds = recheck_seconds  # 0: the first answer stands for the server's life (but for a move)
        self.state = WAITING
        self.upstream: Upstream | None = None
        self.reason = "the hub has not been asked yet"
        self.fault = False  # the answer was a fault of this server's set-up (TLS), not the hub's word
        self.missing_scope = False  # the hub's no was a 403: this server's token lacks the read scope
        self._asked_at = -math.inf
        self._waiting_for = ""  # the reason last logged while waiting
        self._asking: asyncio.Future | None = None
        self._rechecking: asyncio.Task | None = None
        self._retired: list[Upstream] = []  # pools to a URL the service has left (closed when unused, or at close)
        self._local = 0  # requests of forwarded routes being served by this server's engine
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def advice(self) -> str | None:
        """What this server's user can do about the hub's no, when a restart of the server may mend it (else None)."""
        if self.state != LOCAL or not self.missing_scope:
            return None
        return scope_advice(self._env.get("XLLM_HUB_SERVICE", "").strip() or DEFAULT_HUB_SERVICE)

    @property
    def rechecking(self) -> bool:
        """True while the hub's answer is being asked again in the background (``recheck_seconds``)."""
        return self._rechecking is not None and not self._rechecking.done()

    async def resolve(self) -> str:
        """The state, after asking the hub again when it has not answered and ``RETRY_SECONDS`` have passed."""
        if self.state != WAITING:
            return self.state
        if self._asking is None:
            if time.monotonic() - self._asked_at < RETRY_SECONDS:
                return WAITING
            self._asking = asyncio.ensure_future(self._lookup())
        # shielded: a client that leaves cancels its own wait, not the lookup the others share
        await asyncio.shield(self._asking)
        return self.state

    @contextmanager
    def serving_locally(self) -> Iterator[None]:
        """Count a request that this server's engine serves (enter it on the IOLoop, with no await since ``resolve``)."""
        self._local += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._local -= 1
            if self._local == 0:
                self._drained.set()

    async def local_drained(self) -> None:
        """Return once no request is being served by this server's engine (after a switch, none starts again)."""
        await self._drained.wait()

    def service_unreachable(self, upstream: Upstream) -> None:
        """A forwarded request found the service not answering: ask the hub (at most every ``RETRY_SECONDS``)
        whether its URL changed, as when an admin moves it or mends a URL the user servers cannot reach."""
        if upstream is not self.upstream or self._asking is not None or time.monotonic() - self._asked_at < RETRY_SECONDS:
            return
        self._asking = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        try:
            result = await self._ask()
        finally:
            self._asked_at = time.monotonic()
            self._asking = None
        if not self._heard(result):
            # the same URL (the service is restarting or down), or no answer: the 503 stands, a later one asks again
            log.debug("xllm: the JupyterHub xllm service did not answer; the hub says: %s", result.reason)

    def _heard(self, result: HubLookup) -> bool:
        """Act on the hub's answer while forwarding: follow a service that moved, leave one the hub no longer shows
        this server (removed, or the scope revoked: its own engine serves again). False when nothing changed."""
        old = self.upstream
        if self.state != HUB or old is None:
            return False
        if result.service is not None:
            if result.service.root == old.service.root:
                return False
            self.upstream, self.reason = Upstream.open(result.service), result.reason
            log.info("xllm: the JupyterHub service %r moved to %s (was %s): this server forwards there now",
                     result.service.name, result.service.root, old.service.root)
        elif result.final and not result.fault:  # the hub's word (403, 404), not this server's TLS set-up
            # on the IOLoop, with no await from here to the state change: a request is either forwarded before
            # it (and finishes at the service, or gets its 503) or served by this server's engine
            self.upstream, self.state = None, LOCAL
            self._note(result)
            log.info("xllm: the JupyterHub no longer shows this server an xllm service (%s): its own engine "
                     "serves again", result.reason)
        else:
            return False
        self._retired.append(old)
        old.retire()  # requests still streaming through it finish there
        if self.state == LOCAL:
            self._on_settled(self)
        return True

    async def _lookup(self) -> None:
        try:
            result = await self._ask()
        finally:
            self._asked_at = time.monotonic()
            self._asking = None
        self._settle(result)

    async def _ask(self) -> HubLookup:
        try:
            return await lookup_hub_service(self._env)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the hub has not answered: ask again later
            log.debug("xllm: the hub service lookup failed", exc_info=True)
            return HubLookup(None, False, f"the hub service lookup failed ({type(exc).__name__})")

    def _note(self, result: HubLookup) -> None:
        """Keep why the hub answered as it did (the log and ``/xllm/health`` say it)."""
        self.reason, self.fault, self.missing_scope = result.reason, result.fault, result.missing_scope

    def _settle(self, result: HubLookup) -> None:
        self._note(result)
        if result.service is not None:
            self.upstream = Upstream.open(result.service)
            self.state = HUB
        elif result.final:
            self.state = LOCAL
        else:
            # a warning when the reason is new; the same one again (every retry) only at debug level
            level = logging.DEBUG if result.reason == self._waiting_for else logging.WARNING
            self._waiting_for = result.reason
            log.log(level, "xllm: waiting for the JupyterHub xllm service: %s; kernels use this server, which loads "
                    "no model and answers 503 until the hub answers (asked again on the next request, at most every "
                    "%g s)", result.reason, RETRY_SECONDS)
            return
        if self.recheck_seconds > 0 and not result.lasting:
            self._rechecking = asyncio.ensure_future(self._recheck())
        self._on_settled(self)

    async def _recheck(self) -> None:
        """Ask the hub again, rarely: switch to the service once it appears, back to this server's own engine once
        the hub no longer shows it."""
        while self.state in (LOCAL, HUB):
            await asyncio.sleep(self.recheck_seconds * random.uniform(1 - RECHECK_JITTER, 1 + RECHECK_JITTER))
            result = await self._ask()
            if self.state == HUB:
                self._heard(result)
                continue
            if result.service is not None:
                # on the IOLoop, with no await from here to the state change: a request either started in this
                # server's engine before it (and finishes there) or is forwarded
                self.upstream = Upstream.open(result.service)
                self.state = HUB
                self._note(result)
                self._on_settled(self)
                continue
            # no news is the usual answer: the log hears of a new reason only (a hub down now and then is no news
            # either: the own engine keeps serving, the next re-check asks again)
            new = result.final and result.reason != self.reason
            log.log(logging.INFO if new else logging.DEBUG, "xllm: the JupyterHub xllm service is still not there for "
                    "this server (%s): its own engine serves; asked again in about %g s", result.reason,
                    self.recheck_seconds)
            if result.final:
                self._note(result)

    async def close(self) -> None:
        """Stop a lookup in flight and close the connection pool to the service."""
        for name in ("_asking", "_rechecking"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None
        retired, self._retired = self._retired, []
        for upstream in retired:  # closing a closed pool again is harmless
            await upstream.close()


__all__ = ["HUB", "LOCAL", "RECHECK_JITTER", "RETRY_SECONDS", "WAITING", "HubLink", "Upstream"]
