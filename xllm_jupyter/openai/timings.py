"""llama.cpp's ``timings`` on chat completions: the engine's own times for the prompt and the answer.

llama.cpp's server adds ``timings`` to a chat completion and to a stream's last chunk: ``cache_n`` (prompt tokens
its cache held), ``prompt_n``/``prompt_ms`` (the prompt tokens it processed and how long until the first token),
``predicted_n``/``predicted_ms`` (the tokens made and the time from the first to the last), each with its
``*_per_token_ms`` and ``*_per_second``. Measured on the engine thread, they leave out the network and the wait in
the queue, which a client's clock cannot (``xllm run --verbose`` prints them). A rate over no time is null, as
llama.cpp's JSON writes its infinite ones.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from ..core.types import GenerationTimings, Usage

Chunk = dict[str, Any]


class Timed(dict):
    """A stream's ``timings``, its generator's last item: they go on the chunk before it (the stream's last)."""


def timings_wire(timings: GenerationTimings | None, usage: Usage) -> dict[str, Any] | None:
    """``timings`` as llama.cpp's server writes them (None where the engine timed nothing)."""
    if timings is None:
        return None
    prompt_n = max(usage.prompt_tokens - usage.cached_tokens, 0)
    prompt_ms, predicted_ms = timings.prompt_seconds * 1e3, timings.generation_seconds * 1e3
    return {
        "cache_n": usage.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else None,
        "prompt_per_second": prompt_n * 1e3 / prompt_ms if prompt_ms > 0 else None,
        "predicted_n": usage.completion_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / usage.completion_tokens if usage.completion_tokens else None,
        "predicted_per_second": usage.completion_tokens * 1e3 / predicted_ms if predicted_ms > 0 else None,
    }


async def with_timings(chunks: AsyncIterator[Chunk], choices: int) -> AsyncIterator[Chunk]:
    """``chunks`` (a stream of ``choices`` choices) with the ``Timed`` they end with on the last chunk. Only a chunk
    that may be the stream's last waits for the next: the one that ends its last open choice (the engine's times are
    known once that choice has ended, after its last chunk) and the usage chunk. Every other chunk goes at once: a
    legacy completion's last chunk has the choice's last text, and one choice's end must not wait for another's."""
    held: Chunk | None = None
    left = choices
    try:
        async with aclosing(chunks) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                if isinstance(chunk, Timed):
                    held = held and {**held, "timings": dict(chunk)}
                    continue
                if held is not None:
                    yield held
                    held = None
                listed = chunk.get("choices")
                ended = bool(listed) and listed[0].get("finish_reason") is not None
                left -= ended
                if not listed or ended and left <= 0:  # (the usage chunk, or the last open choice's end)
                    held = chunk
                else:
                    yield chunk
    except Exception:
        if held is not None:  # what came before an error still goes first
            yield held
        raise
    if held is not None:
        yield held
