"""A lane of worker threads of its own for tokenizing huge prompts.

Prompts are tokenized on worker threads. asyncio's default pool has ``cpu_count + 4`` of them
(6 on 2 CPUs) and the whole server shares it: its big-body parses, other users' small prompts.
A few users pasting megabytes (seconds each to tokenize) would take every one of those threads
and everybody's next prompt would queue behind them. Huge prompts queue in this lane instead,
among themselves.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from ..core.types import ChatMessage

T = TypeVar("T")

#: prompts longer than this (characters) are tokenized in the lane: ~0.2 s of encoding on a shared CPU
BIG_PROMPT_CHARS = 100_000
#: threads of the lane: two huge prompts encode at once (the Rust encoder releases the GIL)
LANE_WORKERS = 2


def chat_chars(messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None) -> int:
    """About how many characters a chat's prompt has (its messages' text and tool calls, its tools' schemas)."""
    # an assistant turn's tool call arguments are rendered into the prompt too: megabytes can come that way
    size = sum(len(m.content or "") + (len(str(m.tool_calls)) if m.tool_calls else 0) for m in messages)
    return size + (len(str(tools)) if tools else 0)


class PromptLane:
    """Runs tokenizing work on a worker thread: the lane's for huge prompts, asyncio's default pool for the rest."""

    def __init__(self, workers: int = LANE_WORKERS, threshold: int = BIG_PROMPT_CHARS):
        self.workers, self.threshold = workers, threshold
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, chars: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``work(*args, **kwargs)`` on a worker thread, in the lane when the prompt has more than ``threshold`` chars."""
        if chars <= self.threshold:
            return await asyncio.to_thread(work, *args, **kwargs)
        call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)  # as to_thread does
        return await asyncio.get_running_loop().run_in_executor(self._executor(), call)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:  # (made on first use: most servers never see a huge prompt)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xllm-big-prompt")
            return self._pool

    def close(self) -> None:
        """Let the lane's threads end once their work is done (a later huge prompt starts a new lane)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
