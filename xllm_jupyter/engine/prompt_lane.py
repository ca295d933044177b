"""A lane of worker threads of its own for tokenizing huge prompts, shared fairly between users.

Prompts are tokenized on worker threads. asyncio's default pool has ``cpu_count + 4`` of them
(6 on 2 CPUs) and the whole server shares it: its big-body parses, other users' small prompts.
A few users pasting megabytes (seconds each to tokenize) would take every one of those threads
and everybody's next prompt would queue behind them. Huge prompts queue in this lane instead,
among themselves.

Within the lane, a plain FIFO let one user's burst of huge prompts (an agent re-sending its whole
history, a notebook loop) hold both threads until the whole burst was encoded, and another user's
huge prompt waited behind all of it. The lane's queue is the engine's ``FairQueue`` instead (one
FIFO per user, least-running user first, round-robin): a free thread goes to the user with the
fewest prompts encoding, so another user's prompt waits for one of the burst's, not for all of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from ..core.slow_work import ThreadLane
from ..core.types import ChatMessage
from .fairness import FairQueue

T = TypeVar("T")

#: prompts longer than this (characters) are tokenized in the lane: ~0.2 s of encoding on a shared CPU
BIG_PROMPT_CHARS = 100_000
#: threads of the lane: two huge prompts encode at once (the Rust encoder releases the GIL)
LANE_WORKERS = 2


def chat_chars(messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None) -> int:
    """About how many characters a chat's prompt has (its messages' text, thinking and tool calls, its tools' schemas)."""
    # an assistant turn's tool call arguments and thinking sent back are rendered into the prompt too: megabytes can
    # come that way
    size = sum(len(m.content or "") + len(m.reasoning_content or "") + (len(str(m.tool_calls)) if m.tool_calls else 0)
               for m in messages)
    return size + (len(str(tools)) if tools else 0)


@dataclass(eq=False)
class _Ticket:
    """One huge prompt's tokenizing, waiting for (or on) a lane thread."""

    user: str
    call: Callable[[], Any]
    done: Future = field(default_factory=Future)


class PromptLane:
    """Runs tokenizing work on a worker thread: the lane's for huge prompts (fair across users), asyncio's default
    pool for the rest."""

    def __init__(self, workers: int = LANE_WORKERS, threshold: int = BIG_PROMPT_CHARS):
        self.workers, self.threshold = workers, threshold
        self._lane = ThreadLane(workers, "xllm-big-prompt")  # (its pool is made on first use: most servers never see one)
        self._lock = threading.Lock()  # guards the two below: tickets are queued on the loop, finished on lane threads
        # no reserve: the lane has no batch to keep a slot of, only the user-by-user order
        self._waiting: FairQueue[_Ticket] = FairQueue(key=lambda t: t.user, reserved=0)
        self._running: list[str] = []  # the user of each ticket on a lane thread now

    def waiting(self) -> int:
        """How many huge prompts wait for a lane thread."""
        with self._lock:
            return len(self._waiting)

    async def run(self, chars: int, work: Callable[..., T], *args: Any, user: str | None = None, **kwargs: Any) -> T:
        """``work(*args, **kwargs)`` on a worker thread, in the lane when the prompt has more than ``threshold`` chars
        (its turn there shared out by ``user``: "" for anonymous callers)."""
        if chars <= self.threshold:
            return await asyncio.to_thread(work, *args, **kwargs)
        # run in a copy of this context, as to_thread runs it
        ticket = _Ticket(user or "", functools.partial(contextvars.copy_context().run, work, *args, **kwargs))
        with self._lock:
            self._waiting.append(ticket)
        self._start()
        try:
            return await asyncio.wrap_future(ticket.done)
        except asyncio.CancelledError:  # (the client left: cancelling the wrapper cancelled ``done`` too)
            with self._lock:
                self._waiting.remove_if(lambda t: t is ticket)
            raise

    def _start(self) -> None:
        """Hand free lane threads to the waiting tickets whose turn it is."""
        with self._lock:
            picked = self._waiting.take(self.workers - len(self._running), self._running)
            self._running.extend(t.user for t in picked)
            pool = self._lane.executor() if picked else None
        for ticket in picked:
            pool.submit(self._call, ticket)  # type: ignore[union-attr]  (the pool has a free thread for each)

    def _call(self, ticket: _Ticket) -> None:
        """Run ``ticket`` on this lane thread (unless it was cancelled while it waited), then start the next."""
        try:
            if ticket.done.set_running_or_notify_cancel():
                try:
                    ticket.done.set_result(ticket.call())
                except BaseException as exc:  # the awaiting request gets it
                    ticket.done.set_exception(exc)
        finally:
            with self._lock:
                self._running.remove(ticket.user)
            self._start()

    def close(self) -> None:
        """Let the lane's threads end once their work is done (a later huge prompt starts a new lane)."""
        self._lane.close()
