"""Work proportional to a request body, moved off the IOLoop when the body is big.

Every stream and health check shares the IOLoop. A 4 MiB chat or Responses body (tens of
thousands of messages or items) costs 0.1-0.7 s to validate and translate; on the loop that
stalls every other request. Small bodies stay on the loop: a thread hop costs more than they do.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

from .protocol import StrictModel, parse_request

T = TypeVar("T")

#: bodies up to this size are handled on the IOLoop (a 256 KiB body of tiny messages: ~10 ms)
INLINE_BODY_BYTES = 256 * 1024


def is_big(body: bytes | str) -> bool:
    """True when work on ``body`` belongs on a worker thread."""
    return len(body) > INLINE_BODY_BYTES


def is_big_text(chars: int) -> bool:
    """True when work on ``chars`` characters of text a request holds (not its body: stored items it names) belongs
    on a worker thread too."""
    return chars > INLINE_BODY_BYTES


async def off_loop_if(big: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: on a worker thread when ``big``, else right here."""
    if not big:
        return work(*args)
    return await asyncio.to_thread(work, *args)


async def parse_body(cls: type[StrictModel], body: bytes | str) -> Any:
    """``parse_request(cls, body)``, on a worker thread when the body is big."""
    return await off_loop_if(is_big(body), parse_request, cls, body)
