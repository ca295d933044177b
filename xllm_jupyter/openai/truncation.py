"""Fitting a conversation into the context by dropping its oldest messages (Responses ``truncation: "auto"``).

api.openai.com's ``truncation: "auto"`` drops items from the beginning of the conversation
when the input does not fit the model's context window, rather than failing with a
context-length error; long ``previous_response_id`` chains rely on it. Leading system and
developer messages (``instructions``, a Modelfile SYSTEM) are kept, the latest message
always is, and a cut never leaves a tool result without the call it answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ..core.types import ChatMessage

#: roles kept in front whatever is dropped after them
_PINNED_ROLES = ("system", "developer")


def cut_points(messages: Sequence[ChatMessage]) -> tuple[int, list[int]]:
    """The count of leading pinned messages, and the indices a kept tail may start at (oldest first)."""
    head = 0
    while head < len(messages) and messages[head].role in _PINNED_ROLES:
        head += 1
    # a tail starting at a tool message would hold an answer whose call was dropped
    starts = [i for i in range(head + 1, len(messages)) if messages[i].role != "tool"]
    return head, starts


async def fit_front(messages: Sequence[ChatMessage], prompt: list[int], limit: int,
                    encode: Callable[[list[ChatMessage]], Awaitable[list[int]]]) -> tuple[list[int], int]:
    """The prompt with the fewest oldest messages dropped that is at most ``limit`` tokens, and how many were dropped.

    ``prompt`` is the whole conversation's; returned unchanged (0 dropped) when it fits, or when
    no cut fits either (the caller's context-length error then stands). ``encode`` renders a
    message list through the chat template. A binary search over the cut points: fewer
    messages never make a longer prompt.
    """
    if len(prompt) <= limit:
        return prompt, 0
    head, starts = cut_points(messages)
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        start = starts[mid]
        candidate = await encode(list(messages[:head]) + list(messages[start:]))
        if len(candidate) <= limit:
            best, hi = (candidate, start - head), mid - 1
        else:
            lo = mid + 1
    return best if best is not None else (prompt, 0)
