"""Large JSON answers encoded and sent in pieces, with the IOLoop free between them.

One non-streamed generation with logprobs can answer tens of MB (``n`` 4, 2,000 tokens,
``top_logprobs`` 20: 14 MB; the defaults allow 16 x 8,192 tokens). Encoding that in one
``json`` call, then gzipping it in one transform, held the IOLoop, and so every other user
and ``/health``, for the whole of it (0.7-1 s for 14 MB). Here long lists are encoded a
slice at a time and each ~256 KB of text is written and flushed (gzip compresses it then)
before the loop gets a turn. Small answers still leave in one piece with a Content-Length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from .sse import dumps
from .stalls import watch_finish

#: text written (and flushed) at a time
PIECE_CHARS = 256 * 1024
#: list items encoded in one json call (a list longer than this is encoded slice by slice)
SLICE_ITEMS = 64


def json_fragments(obj: Any) -> Iterator[str]:
    """``dumps(obj)`` as consecutive fragments: containers are walked, long lists encoded in slices."""
    if isinstance(obj, dict) and not all(isinstance(key, str) for key in obj):
        yield dumps(obj)  # json's own key conversion (ints, bools, None)
    elif isinstance(obj, dict):
        yield "{"
        for i, (key, value) in enumerate(obj.items()):
            yield ("," if i else "") + dumps(key) + ":"
            yield from json_fragments(value)
        yield "}"
    elif isinstance(obj, (list, tuple)) and len(obj) > SLICE_ITEMS:
        yield "["
        for start in range(0, len(obj), SLICE_ITEMS):
            yield ("," if start else "") + dumps(list(obj[start:start + SLICE_ITEMS]))[1:-1]
        yield "]"
    elif isinstance(obj, (list, tuple)) and obj:
        yield "["
        for i, item in enumerate(obj):
            if i:
                yield ","
            yield from json_fragments(item)
        yield "]"
    else:
        yield dumps(obj)


def _retrieved(fut: asyncio.Future) -> None:
    # a flush that failed because the client left: nothing to do, but do not log it as unretrieved
    if not fut.cancelled():
        fut.exception()


async def write_json_in_pieces(handler: Any, obj: Any, stall_seconds: float, status: int = 200) -> None:
    """Finish ``handler`` with ``obj`` as JSON, yielding to the IOLoop after each piece of ``PIECE_CHARS``."""
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    parts: list[str] = []
    size = 0
    for fragment in json_fragments(obj):
        parts.append(fragment)
        size += len(fragment)
        if size >= PIECE_CHARS:
            handler.write("".join(parts))
            parts, size = [], 0
            handler.flush().add_done_callback(_retrieved)
            await asyncio.sleep(0)
            if getattr(handler, "_client_gone", False):
                return  # nobody to finish for (Tornado finishes the closed request itself)
    done = handler.finish("".join(parts))
    watch_finish(handler, done, stall_seconds)


__all__ = ["json_fragments", "write_json_in_pieces"]
