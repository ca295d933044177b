"""The playground's Stop: a per-page signal that ends the page's streaming replies from inside."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

#: the ASGI scope key holding when the playground's server received a request (``time.monotonic()``)
ARRIVED = "xllm.arrived"


def stamp_arrival(app: Any) -> Any:
    """``app`` (ASGI) with each request's arrival time in its scope under ``ARRIVED``.

    A chat turn waits in Gradio's queue while its concurrency limit is taken; Stop must reach it
    there, so it needs to know whether the turn was sent before Stop was pressed.
    """

    async def stamped(scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope = {**scope, ARRIVED: time.monotonic()}
        await app(scope, receive, send)

    return stamped


def arrived(request: Any) -> float | None:
    """When the playground received ``request`` (a ``gr.Request``), or None where it was not stamped."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    when = scope.get(ARRIVED) if isinstance(scope, dict) else None
    return when if isinstance(when, float) else None


#: pages whose last Stop is kept at most (the oldest goes first): a client naming made-up pages must not grow it for good
KEPT_PAGES = 4096


class ReplyStop(asyncio.Event):
    """One reply's stop event; ``cleared`` once Clear (not Stop) set it; ``sent``: when its question arrived (None: unknown)."""

    cleared = False
    sent: float | None = None


class Stops:
    """The stop events of the replies streaming now, by page (Gradio's session hash).

    Stop ends a reply by setting its event, not through Gradio's ``cancels=``: cancelling the
    task raced Gradio's own reset of the outputs (its 'cancelled' message could arrive after the
    page's /reset call) and left "Error" over the transcript and the box. A reply that ends
    itself keeps its text so far and completes like any other.

    A reply still waiting in Gradio's queue (its concurrency limit taken) is not running yet; the
    page's last Stop is kept, so the reply starts stopped if it was sent before that Stop. A Stop
    reaches only what was sent before it: a question sent just after it is answered, even one that
    started before the Stop's handler ran.
    """

    def __init__(self) -> None:
        self._running: dict[str, set[ReplyStop]] = {}
        # page -> when its last Stop or Clear was sent, and its last Clear (-inf: none)
        self._last_stop: dict[str, tuple[float, float]] = {}

    def begin(self, page: str, sent: float | None = None) -> ReplyStop:
        """A new reply on ``page``, sent at ``sent`` (``time.monotonic()``; None: just now): the event Stop sets
        for it, already set when the page's last Stop came after ``sent`` (pass it to ``end`` when it is done)."""
        event = ReplyStop()
        event.sent = sent
        last_stop, last_clear = self._last_stop.get(page, (-math.inf, -math.inf))
        if sent is not None and last_stop >= sent:
            event.cleared = last_clear >= sent
            event.set()
        self._running.setdefault(page, set()).add(event)
        return event

    def end(self, page: str, event: ReplyStop) -> None:
        """The reply of ``event`` is over: Stop no longer needs to reach it."""
        events = self._running.get(page)
        if events is not None:
            events.discard(event)
            if not events:
                del self._running[page]

    def stop(self, page: str, *, cleared: bool = False, sent: float | None = None) -> int:
        """Stop the replies on ``page`` sent before ``sent`` (the Stop's own arrival; None: now), streaming or still
        queued (``cleared``: for Clear); how many were streaming."""
        when = time.monotonic() if sent is None else sent
        last_stop, last_clear = self._last_stop.pop(page, (-math.inf, -math.inf))
        # the latest of each, whatever order the handlers ran in; re-inserted, so the page is the newest
        self._last_stop[page] = (max(last_stop, when), max(last_clear, when) if cleared else last_clear)
        while len(self._last_stop) > KEPT_PAGES:
            del self._last_stop[next(iter(self._last_stop))]
        events = [e for e in self._running.get(page, ()) if e.sent is None or e.sent <= when]
        for event in events:
            event.cleared = event.cleared or cleared
            event.set()
        return len(events)

    def forget(self, page: str) -> None:
        """``page`` has closed: drop its last Stop (its replies end on their own)."""
        self._last_stop.pop(page, None)


async def until_set(pieces: AsyncIterator[str], stop: asyncio.Event) -> AsyncIterator[str]:
    """``pieces`` until ``stop`` is set; the piece awaited then is cancelled and ``pieces`` closed.

    Racing each piece against ``stop`` (not only checking between pieces) lets Stop end a reply
    that has not started yet, such as one waiting for its model to load.
    """
    halt = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[str] | None = None
    try:
        while not stop.is_set():
            following = asyncio.ensure_future(anext(pieces))
            await asyncio.wait({following, halt}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return  # stopped: the finally cancels the piece awaited
            try:
                piece = following.result()
            except StopAsyncIteration:
                return
            yield piece
    finally:
        halt.cancel()
        if following is not None and not following.done():
            # Stopped, or this reply cancelled from outside (Gradio's /cancel; asyncio.wait leaves the piece
            # running then): cancelling it closes the HTTP stream, and the server cancels the generation.
            following.cancel()
            await asyncio.wait({following})
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()
