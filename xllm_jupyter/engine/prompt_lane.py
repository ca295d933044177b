"""A lane of worker threads of its own for tokenizing huge prompts.

Prompts are tokenized on worker threads. asyncio's default pool has ``cpu_count + 4`` of them
(6 on 2 CPUs) and the whole server shares it: its big-body parses, other users' small prompts.
A few users pasting megabytes (seconds each to tokenize) would take every one of those threads
and everybody's next prompt would queue behind them. Huge prompts queue in this lane instead,
among themselves.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence, TypeVar

from ..core.slow_work import ThreadLane
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
        self._lane = ThreadLane(workers, "xllm-big-prompt")  # (its pool is made on first use: most servers never see one)

    async def run(self, chars: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``work(*args, **kwargs)`` on a worker thread, in the lane when the prompt has more than ``threshold`` chars."""
        if chars <= self.threshold:
            return await asyncio.to_thread(work, *args, **kwargs)
        return await self._lane.run(work, *args, **kwargs)

    def close(self) -> None:
        """Let the lane's threads end once their work is done (a later huge prompt starts a new lane)."""
        self._lane.close()
