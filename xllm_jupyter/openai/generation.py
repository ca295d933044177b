"""Pieces the chat and legacy completion paths share: several generations as one event
stream, their usage added up, the response envelope, and the checks and errors both make.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator, Sequence

from ..core.errors import EngineError, InvalidRequest
from ..core.types import GenerationRequest, Usage
from .protocol import SYSTEM_FINGERPRINT, usage_dict
from .schema_errors import shown

#: one streamed chunk, as a JSON-ready dict
Chunk = dict[str, Any]


def engine_failure() -> EngineError:
    """What a client is told when generation failed on our side (the log has the cause)."""
    return EngineError("The server had an error while generating. Retry the request.")


def check_token_ids(ids: Any, model: Any, param: str) -> None:
    """Reject token ids outside the vocabulary before they reach (and break) a model step."""
    vocab = getattr(model, "vocab_size", None)
    for t in ids:
        if t < 0 or (vocab is not None and t >= vocab):
            raise InvalidRequest(f"Token id {shown(t)} in '{param}' is outside this model's vocabulary", param=param)


def check_request_token_ids(req: Any, sampling: Any, model: Any) -> None:
    """Check a request's ``logit_bias`` and ``stop_token_ids`` against the model's vocabulary."""
    check_token_ids(sampling.logit_bias, model, "logit_bias")
    # (an id no token has would never stop the choice; once each: a body may repeat one thousands of times)
    check_token_ids(dict.fromkeys(req.stop_token_ids or ()), model, "stop_token_ids")


def sum_usage(usages: Sequence[Usage]) -> Usage:
    """The usages of several generations (one request's prompts) added up."""
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


async def interleaved(engine: Any, gens: Sequence[GenerationRequest]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several requests as ``(request index, event)``; one request needs no tasks."""
    if len(gens) == 1:
        async with aclosing(engine.generate(gens[0])) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: GenerationRequest) -> None:
        try:
            async with aclosing(engine.generate(gen)) as events:
                async for ev in events:
                    queue.put_nowait((i, ev))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        open_ = len(tasks)
        while open_:
            i, ev = await queue.get()
            if ev is done:
                open_ -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_NOTHING = object()  # the first step found an empty stream


async def started(events: AsyncIterator[Any], wait: float) -> StartedStream:
    """``events`` with its first event awaited now, up to ``wait`` s, before a stream is returned.

    A request refused once it reaches the engine (a full queue, a quota hold, a model that
    cannot be loaded) then raises here, while the handler can still answer with its HTTP status
    (a 429 the SDK retries, not a 200 whose first event is an error). A first event slower than
    ``wait`` (a queue, a load) is left to the stream, so its headers and keepalives go out.
    """

    async def first_step() -> Any:
        try:
            return await anext(events)
        except StopAsyncIteration:
            return _NOTHING

    # the step runs as a task so waiting can give up without cancelling it (that would end the stream)
    first = asyncio.ensure_future(first_step())
    # a stream dropped unread must not log "Task exception was never retrieved" for its first step
    first.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        await asyncio.wait({first}, timeout=wait)
    except BaseException:  # the client left meanwhile: stop the step and the stream
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()  # type: ignore[attr-defined]
        raise
    if first.done() and first.exception() is not None:
        await events.aclose()  # type: ignore[attr-defined]
        raise first.exception()  # type: ignore[misc]
    return StartedStream(first, events)


class StartedStream:
    """The stream ``started`` returns: the awaited first event, then the rest of ``events``.

    A class, not an async generator, so that ``aclose`` ends the engine's work even when the
    stream was never read (an unstarted generator's ``finally`` never runs).
    """

    def __init__(self, first: asyncio.Future, events: AsyncIterator[Any]):
        self._first: asyncio.Future | None = first
        self._events = events
        self._closed = False

    def __aiter__(self) -> StartedStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        first = self._first
        if first is not None:
            head = await first
            self._first = None
            if head is not _NOTHING:
                return head
            await self.aclose()
            raise StopAsyncIteration
        return await anext(self._events)

    async def aclose(self) -> None:
        """Stop the first step if it still runs and close the engine stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        first, self._first = self._first, None
        if first is not None and not first.done():
            first.cancel()
        if first is not None:
            await asyncio.gather(first, return_exceptions=True)  # the step is over before the stream closes
        await self._events.aclose()  # type: ignore[attr-defined]


def envelope(rid: str, obj: str, created: int, model: str, choices: list, usage: Usage,
             reasoning_tokens: int = 0) -> dict[str, Any]:
    """The fields every non-streamed completion response shares (``reasoning_tokens``: of a reasoning model)."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage_dict(usage, reasoning_tokens),
    }
