"""The playground's Stop: a per-page signal that ends the page's streaming replies from inside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class ReplyStop(asyncio.Event):
    """One reply's stop event; ``cleared`` once Clear (not Stop) set it."""

    cleared = False


class Stops:
    """The stop events of the replies streaming now, by page (Gradio's session hash).

    Stop ends a reply by setting its event, not through Gradio's ``cancels=``: cancelling the
    task raced Gradio's own reset of the outputs (its 'cancelled' message could arrive after the
    page's /reset call) and left "Error" over the transcript and the box. A reply that ends
    itself keeps its text so far and completes like any other.
    """

    def __init__(self) -> None:
        self._running: dict[str, set[asyncio.Event]] = {}

    def begin(self, page: str) -> ReplyStop:
        """A new reply on ``page``: the event Stop sets for it (pass it to ``end`` when it is done)."""
        event = ReplyStop()
        self._running.setdefault(page, set()).add(event)
        return event

    def end(self, page: str, event: asyncio.Event) -> None:
        """The reply of ``event`` is over: Stop no longer needs to reach it."""
        events = self._running.get(page)
        if events is not None:
            events.discard(event)
            if not events:
                del self._running[page]

    def stop(self, page: str, *, cleared: bool = False) -> int:
        """Stop every reply streaming on ``page`` (``cleared``: for Clear); how many there were."""
        events = self._running.get(page, set())
        for event in events:
            event.cleared = event.cleared or cleared
            event.set()
        return len(events)


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
