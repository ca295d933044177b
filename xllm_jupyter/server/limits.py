"""Per-key limits at the HTTP edge: request and token buckets, and a concurrency cap.

Every authenticated request is admitted here before its body is read. A key has
three independent budgets (each off when its setting is 0):

* ``auth.requests_per_minute``: a token bucket of that capacity, refilled evenly.
* ``auth.tokens_per_minute``: charged with the *actual* usage after each response
  (``usage.total_tokens``; a stream without a usage chunk is charged the usage the
  engine reported for it, see ``note_stream_tokens``). The bucket may go into debt; a
  key in debt is refused until it has refilled, so one big request cannot be refused up
  front by a guess.
* ``auth.max_concurrent_per_key``: requests in flight (queued or running); this is
  what keeps one key's flood from filling the shared engine queue.

Refusals are 429 ``rate_limit_exceeded`` with ``Retry-After``. They are counted in
``Limiter.rejections`` (``(key_id, reason) -> count``) and reported to every callable
in ``Limiter.listeners`` — the hook for metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from contextvars import ContextVar
from typing import Any, AsyncIterator, Callable

from ..core.config import AuthConfig
from ..core.errors import RateLimited

log = logging.getLogger("xllm_jupyter.server")

#: the settings key holding the Limiter (absent in the Jupyter extension: no limits there)
LIMITS_KEY = "xllm_limits"


class TokenBucket:
    """``capacity`` units, refilled at ``capacity`` per minute; may go into debt."""

    def __init__(self, capacity: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are now)."""
        self._refill()
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float) -> None:
        """Remove ``amount`` units (the level may become negative)."""
        self._refill()
        self.level -= amount


class Limiter:
    """The per-key buckets and in-flight counts of one server."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._in_flight: Counter[str] = Counter()
        # handlers run on one IOLoop, but the Limiter may be read from other threads (metrics)
        self._lock = threading.Lock()
        #: rejections so far, by ``(key_id, reason)``; reason is "requests", "tokens" or "concurrency"
        self.rejections: Counter[tuple[str, str]] = Counter()
        #: called as ``listener(key_id, reason)`` on every rejection (metrics hook)
        self.listeners: list[Callable[[str, str], None]] = []

    @property
    def enabled(self) -> bool:
        """True when any limit is configured."""
        c = self.config
        return bool(c.requests_per_minute or c.tokens_per_minute or c.max_concurrent_per_key)

    def in_flight(self, key_id: str) -> int:
        """Requests of ``key_id`` admitted and not yet finished."""
        return self._in_flight[key_id]

    def admit(self, key_id: str, generates: bool = True) -> None:
        """Count one request of ``key_id`` in, or raise RateLimited; pair with ``release``.

        ``generates``: the request spends tokens (a POST to a generation route); only those wait for the
        key's token budget, so a key that spent it can still list models and read its stored objects.
        """
        with self._lock:
            refusal = self._refusal(key_id, generates)
            if refusal is None:
                self._in_flight[key_id] += 1
                return
            reason, error = refusal
            self.rejections[(key_id, reason)] += 1
        # listeners run outside the lock: one that reads this Limiter must not deadlock
        self._notify(key_id, reason)
        raise error

    def _refusal(self, key_id: str, generates: bool) -> tuple[str, RateLimited] | None:
        """Why ``key_id`` may not start a request now (reason, error), or None; takes a request token if allowed."""
        c = self.config
        if c.max_concurrent_per_key and self._in_flight[key_id] >= c.max_concurrent_per_key:
            return "concurrency", RateLimited(
                f"Too many concurrent requests for this API key (limit {c.max_concurrent_per_key}); retry when one finishes.",
                retry_after=1,
            )
        if c.tokens_per_minute and generates:
            wait = self._bucket(self._tokens, key_id, c.tokens_per_minute).wait_for(1)
            if wait > 0:
                return "tokens", RateLimited(
                    f"Token rate limit reached for this API key ({c.tokens_per_minute} tokens per minute).",
                    retry_after=math.ceil(wait),
                )
        if c.requests_per_minute:
            bucket = self._bucket(self._requests, key_id, c.requests_per_minute)
            wait = bucket.wait_for(1)
            if wait > 0:
                return "requests", RateLimited(
                    f"Request rate limit reached for this API key ({c.requests_per_minute} requests per minute).",
                    retry_after=math.ceil(wait),
                )
            bucket.take(1)
        return None

    def release(self, key_id: str) -> None:
        """The request counted in by ``admit`` has finished."""
        with self._lock:
            self._in_flight[key_id] -= 1
            if self._in_flight[key_id] <= 0:
                del self._in_flight[key_id]

    def charge(self, key_id: str, tokens: int) -> None:
        """Charge ``tokens`` of actual usage to ``key_id``'s token bucket."""
        if self.config.tokens_per_minute and tokens > 0:
            with self._lock:
                self._bucket(self._tokens, key_id, self.config.tokens_per_minute).take(tokens)

    def _bucket(self, table: dict[str, TokenBucket], key_id: str, capacity: int) -> TokenBucket:
        bucket = table.get(key_id)
        if bucket is None:
            bucket = table[key_id] = TokenBucket(capacity, self._clock)
        return bucket

    def _notify(self, key_id: str, reason: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(key_id, reason)
            except Exception:  # a broken metrics hook must never turn a 429 into a 500
                log.debug("a rate-limit listener failed", exc_info=True)


# ------------------------------------------------------------ usage charging
#: tokens the engine reported for the stream being metered in this task. A chunk is not
#: a token (the engine merges tokens made close together), so a stream whose client did
#: not ask for a usage chunk is charged what ``ObservedEngine`` saw instead.
_stream_tokens: ContextVar[list[int] | None] = ContextVar("xllm_stream_tokens", default=None)


def open_stream_tally() -> None:
    """Give this request's task a fresh tally before its serving call runs.

    Tasks the call starts copy the context then (the engine's first step, awaited before a stream
    starts; one task per prompt of a legacy completion), so their tokens reach the same tally.
    """
    _stream_tokens.set([0])


def note_stream_tokens(tokens: int) -> None:
    """Add a finished generation's tokens to the stream metered in this task (if any)."""
    tally = _stream_tokens.get()
    if tally is not None:
        tally[0] += tokens


def _usage_tokens(obj: dict[str, Any]) -> int | None:
    """``total_tokens`` of a response, a usage chunk, or a Responses ``response.completed`` event."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        inner = obj.get("response")
        usage = inner.get("usage") if isinstance(inner, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
        return usage["total_tokens"]
    return None


def _target(handler: Any) -> tuple[Limiter, str] | None:
    limiter = handler.settings.get(LIMITS_KEY)
    key_id = getattr(handler, "xllm_key_id", None)
    if limiter is None or key_id is None or not limiter.config.tokens_per_minute:
        return None
    return limiter, key_id


def charge_response(handler: Any, result: dict[str, Any]) -> None:
    """Charge a finished JSON response's usage to the handler's key."""
    target = _target(handler)
    tokens = _usage_tokens(result) if target else None
    if target and tokens:
        target[0].charge(target[1], tokens)


def charge_left(handler: Any) -> None:
    """Charge the handler's key what a request its client left before the answer used (the engine's count: its
    prompt and the tokens made for it), as a stream left early is (``_metered``)."""
    target = _target(handler)
    tally = _stream_tokens.get()
    if target and tally and tally[0]:
        target[0].charge(target[1], tally[0])


def metered(handler: Any, stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """``stream``, charging its usage to the handler's key when it ends."""
    target = _target(handler)
    return stream if target is None else _metered(stream, *target)


async def _metered(stream: AsyncIterator[dict[str, Any]], limiter: Limiter, key_id: str) -> AsyncIterator[dict[str, Any]]:
    chunks, usage = 0, None
    # the body of an async generator runs in its caller's context: the engine wrapper iterated
    # below (same task) sees this tally, as do tasks started since ``open_stream_tally``
    tally = _stream_tokens.get() or [0]
    _stream_tokens.set(tally)
    try:
        async for chunk in stream:
            chunks += 1
            usage = _usage_tokens(chunk) or usage
            yield chunk
    finally:
        try:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                # close the engine stream now, so an early stop cancels its jobs; first, while the tally is
                # still set: a stream closed at a yield (its client gone at a write) counts its tokens as it closes
                await aclose()
        finally:
            _stream_tokens.set(None)
            # a usage chunk, else the engine's count, else (a replay from the response cache) the chunks
            limiter.charge(key_id, usage if usage is not None else tally[0] or chunks)
