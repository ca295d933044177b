"""Whether this server's xllm API is the hub service's or its own, settled once the hub answers.

The extension asks the hub at start (extension/hub_lookup.py). A final answer stands for the
server's life: the service (forward to it) or none (this server's own engine). While the hub has
not answered (down, restarting, slower than the lookup timeout under a burst of spawns) the server
waits for it rather than loading a model of its own: the next request to a forwarded route asks
again, at most every ``RETRY_SECONDS``, and concurrent requests share one lookup.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from .hub_lookup import HubLookup, HubService, lookup_hub_service

log = logging.getLogger("xllm_jupyter.extension")

#: the least time between two lookups while the hub has not answered (a request never waits for more than one)
RETRY_SECONDS = 10.0

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

    @classmethod
    def open(cls, service: HubService) -> Upstream:
        """A pool for ``service`` (call on the IOLoop; ``close`` it at shutdown)."""
        # identity: chunks pass through as the service wrote them (a compressed stream would be buffered)
        headers = {"Authorization": f"token {service.token}", "Accept-Encoding": "identity"}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=16)
        return cls(service, httpx.AsyncClient(headers=headers, timeout=TIMEOUT, limits=limits))

    async def close(self) -> None:
        """Close the pool's connections."""
        await self.client.aclose()


class HubLink:
    """This server's choice between the hub's xllm service and its own engine; ``state`` is one of HUB, LOCAL, WAITING."""

    def __init__(self, env: Mapping[str, str], on_settled: Callable[[HubLink], None]) -> None:
        self._env = env
        self._on_settled = on_settled  # called once, when the state leaves WAITING
        self.state = WAITING
        self.upstream: Upstream | None = None
        self.reason = "the hub has not been asked yet"
        self.fault = False  # the answer was a fault of this server's set-up (TLS), not the hub's word
        self._asked_at = -math.inf
        self._waiting_for = ""  # the reason last logged while waiting
        self._asking: asyncio.Future | None = None

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

    async def _lookup(self) -> None:
        try:
            result = await lookup_hub_service(self._env)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the hub has not answered: ask again later
            log.debug("xllm: the hub service lookup failed", exc_info=True)
            result = HubLookup(None, False, f"the hub service lookup failed ({type(exc).__name__})")
        finally:
            self._asked_at = time.monotonic()
            self._asking = None
        self._settle(result)

    def _settle(self, result: HubLookup) -> None:
        self.reason, self.fault = result.reason, result.fault
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
        self._on_settled(self)

    async def close(self) -> None:
        """Stop a lookup in flight and close the connection pool to the service."""
        task, self._asking = self._asking, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None


__all__ = ["HUB", "LOCAL", "RETRY_SECONDS", "WAITING", "HubLink", "Upstream"]
