"""The asyncio side of a generation: request handles, and how the step thread's output reaches them.

The step thread (runner.py) hands what one step made to each event loop with a single
``call_soon_threadsafe`` (``deliver_all``), into per-request deques: a slow consumer
only grows its own queue and never stalls the step loop.

Deliveries are paced by the runner's ``stream_interval``: tokens made within one interval
leave together, merged into one delta per choice (``coalesce``), so the event loop (which
shares the GIL with the step loop) wakes, encodes and writes once per interval instead of
once per token. Past ``SCALE_STREAMS`` running sequences the interval grows in proportion
(``paced_interval``), which caps the chunks per second the loop must write however many
streams run.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, AsyncIterator

from ..core.log_context import request_id_var
from ..core.types import ChoiceDelta, GenerationDone, GenerationRequest, GenerationTimings
from .loop_wake import waker_for

if TYPE_CHECKING:
    from .runner import ModelRunner

END = object()  # queue sentinel: the request is over

#: sequences one stream interval serves; with more running, the interval grows in proportion
SCALE_STREAMS = 16
#: the scaled interval never passes this (a base interval above it is kept as configured)
MAX_SCALED_INTERVAL = 0.25


def paced_interval(base: float, running: int) -> float:
    """Seconds between deliveries with ``running`` sequences: ``base``, scaled up past SCALE_STREAMS."""
    if base <= 0 or running <= SCALE_STREAMS:
        return base
    return max(base, min(MAX_SCALED_INTERVAL, base * running / SCALE_STREAMS))


class RequestHandle:
    """The asyncio side of one request: an async iterator over its deltas."""

    def __init__(self, runner: "ModelRunner", loop: asyncio.AbstractEventLoop, request: GenerationRequest):
        self.runner = runner
        self.loop = loop
        self.waker = waker_for(loop)  # how the engine thread reaches this loop (made here, on the loop's thread)
        self.request = request
        self.log_id = request_id_var.get()  # its HTTP request's id (made in its context): for the engine thread's logs
        # every token that ends a choice, the request's own and the model's EOS: one set for all n choices
        # (a request's ids may be thousands: a copy each lived as long as its choice)
        params = request.params
        self._eos = frozenset() if params.ignore_eos else runner.model.eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids) | self._eos
        # a deque and one waiter instead of an asyncio.Queue: a step's items arrive together
        # and are read without a future (or Queue bookkeeping) per token
        self._ready: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self.job_ids: list[int] = []
        self.finished = False
        self.started = False  # engine thread: a delta of this request has been handed out
        self.failed = False  # engine thread: an error ended it (its other choices add none)
        # written by the engine thread only
        self.open_choices = request.params.n
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.admitted_at = 0.0  # perf_counter when its first job entered the batch (0: not yet)
        self.first_token_at = 0.0  # ... and when its first token came (0: none yet)

    def stop_reason_for(self, token_id: int | None) -> int | None:
        """The stop_reason (vLLM's) of a choice ended by ``token_id``: the id if the request named it, else None."""
        if token_id in self.stop_token_ids and token_id not in self._eos:  # the model's EOS is none
            return token_id
        return None

    def admitted(self) -> None:
        """Engine thread, under the runner's lock: a job of this request entered the batch (its prompt is prefilled)."""
        self.admitted_at = self.admitted_at or time.perf_counter()
        admission = self.request.admission
        if admission is not None:
            admission.admitted = True

    def timings(self) -> GenerationTimings:
        """Engine thread, as its last choice ends: how long its prompt and its generation took."""
        end = time.perf_counter()
        first = self.first_token_at or end
        # one token: no time between tokens (its end is the same step, a few µs later on this thread)
        generation = end - first if self.completion_tokens > 1 else 0.0
        return GenerationTimings(max(first - (self.admitted_at or first), 0.0), generation)

    def deliver(self, items: list) -> None:
        """Runs on the event loop: queue what one step produced for this request, wake its reader."""
        self._ready.extend(items)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta | GenerationDone]:
        ready = self._ready
        while True:
            if not ready:
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            item = ready.popleft()
            if item is END:
                self.finished = True
                return
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            yield item

    def cancel(self) -> None:
        """Cancel all of this request's jobs (no-op once it has finished)."""
        if not self.finished:
            self.finished = True
            self.runner.cancel(self.job_ids)


def deliver_all(deliveries: list) -> None:
    """Runs on an event loop: hand each (handle, items) pair of one step's delivery to its handle."""
    for handle, items in deliveries:
        handle.deliver(items)


def coalesce(items: list) -> list:
    """Merge the held deltas of each choice into one (text, token ids and logprobs joined).

    Other items (the usage, the end marker, an error) keep their place after them; a
    choice's ``finish`` is only ever on its last delta, so the merged one carries it.
    """
    out: list = []
    groups: dict[int, list[ChoiceDelta]] = {}
    for item in items:
        if type(item) is ChoiceDelta:
            group = groups.get(item.index)
            if group is None:
                group = groups[item.index] = []
                out.append(group)
            group.append(item)
        else:
            out.append(item)
    return [_merged(entry) if type(entry) is list else entry for entry in out]


def _merged(deltas: list[ChoiceDelta]) -> ChoiceDelta:
    if len(deltas) == 1:
        return deltas[0]
    return ChoiceDelta(
        deltas[0].index,
        "".join(d.text for d in deltas),
        tuple(i for d in deltas for i in d.token_ids),
        tuple(lp for d in deltas for lp in d.logprobs),
        deltas[-1].finish,
        deltas[-1].stop_reason,
    )
