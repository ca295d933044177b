"""One streamed chat completion, timed client-side: arrival time of every text piece.

``profile``, ``compare`` and the widgets all measure the same way, so their numbers agree:
time to first token from sending the request to the first content chunk, inter-token
latency per token (a chunk holds every token the server made within its stream interval,
several on a GPU: with ``token_counts`` the server says how many, and a chunk of n tokens
after a gap g counts as n gaps of g / n), and decode speed as the tokens after the first
over the time from the first generated piece (a reasoning model's thinking included) to
the end of the stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..client import AsyncXllmClient
from ..client.base import delta_text
from ..client.thinking import delta_thinking
from ..core.errors import InvalidRequest, XllmError

Messages = list[dict[str, Any]]


def build_messages(prompt: str | Sequence[Mapping[str, Any]], system: str | None = None) -> Messages:
    """The message list for ``prompt`` (a string or OpenAI-style messages), ``system`` first."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRequest("the prompt is empty", param="prompt")
        messages: Messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise InvalidRequest("prompt must be a string or a non-empty list of {'role': ..., 'content': ...} messages", param="prompt")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidRequest("system must be a string", param="system")
        if system.strip():
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


#: request fields the measured stream sets itself (``n`` > 1 would interleave choices)
RESERVED_PARAMS = frozenset({"messages", "model", "stream", "stream_options", "n"})


def check_params(params: Mapping[str, Any]) -> None:
    """Reject parameters a measured stream cannot carry, naming the first one."""
    bad = sorted(k for k in params if k in RESERVED_PARAMS and not (k == "n" and params[k] in (None, 1)))
    if bad:
        raise InvalidRequest(f"the parameter {bad[0]!r} cannot be set here", param=bad[0])


@dataclass
class StreamRecord:
    """What one streamed request produced and when (times in seconds from sending it)."""

    model: str
    params: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # time.perf_counter() when the request was sent
    pieces: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each piece
    #: the server's count of tokens made when each piece arrived (``continuous_usage_stats``); None: not sent
    tokens: list[int | None] = field(default_factory=list)
    #: arrival of the first generated piece, thinking or answer (a reasoning model's tokens start with its thinking)
    first_s: float = math.nan
    latency_s: float = math.nan
    prompt_tokens: int | None = None
    usage_tokens: int | None = None  # completion tokens as the server counted them
    finish_reason: str | None = None
    error: XllmError | None = None
    cancelled: bool = False

    @property
    def text(self) -> str:
        """The whole reply so far."""
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated: the server's count, else the number of pieces."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.pieces)

    @property
    def ttft_s(self) -> float:
        """Time to the first text piece (NaN when none came)."""
        return self.times[0] if self.times else math.nan

    @property
    def itl_s(self) -> list[float]:
        """Time per token after the first text piece: a piece whose count says n tokens came since the last one counts
        n times as the gap / n (none for a piece of no new token); without counts, one gap per piece."""
        gaps: list[float] = []
        counts = self.tokens if len(self.tokens) == len(self.times) else [None] * len(self.times)
        for (a, ca), (b, cb) in zip(zip(self.times, counts), zip(self.times[1:], counts[1:])):
            made = cb - ca if ca is not None and cb is not None else 1
            if made > 0:
                gaps += [(b - a) / made] * made
        return gaps

    @property
    def tok_per_s(self) -> float:
        """Decode speed: tokens after the first over the time from the first to the stream's end.

        The end of the stream rather than the last piece: pieces can arrive in bursts
        (several per network read), which would make a last-piece span look too short.
        The first token is the first generated piece, thinking included: the server's count has the thinking's
        tokens, so timing from the first answer piece made a reasoning model's speed too high.
        """
        first = self.first_s if not math.isnan(self.first_s) else (self.times[0] if self.times else math.nan)
        if math.isnan(first) or self.completion_tokens < 2 or math.isnan(self.latency_s):
            return math.nan
        span = self.latency_s - first
        return (self.completion_tokens - 1) / span if span > 0 else math.nan

    @property
    def ended(self) -> float:
        """``perf_counter()`` time the stream finished."""
        return self.started + (self.latency_s if not math.isnan(self.latency_s) else 0.0)


async def measure_stream(
    client: AsyncXllmClient,
    messages: Messages,
    model: str,
    params: Mapping[str, Any] | None = None,
    on_piece: Callable[[str], None] | None = None,
    record: StreamRecord | None = None,
    on_thinking: Callable[[str], None] | None = None,
    token_counts: bool = False,
) -> StreamRecord:
    """Stream one chat completion, timing each piece; server errors land in ``.error``. A reasoning model's thinking
    goes to ``on_thinking`` where given (its pieces are not the answer's: never in ``record.pieces``). ``token_counts``
    asks the server for its count of tokens on every chunk (``record.tokens``: inter-token latency per token).

    Cancelling the calling task closes the HTTP stream (the server then cancels the
    generation); pass ``record`` to keep what arrived (it is marked ``cancelled``).
    """
    params = dict(params or {})
    if record is None:
        record = StreamRecord(model=model, params=params)
    body = {**params, "stream_options": {"include_usage": True, **({"continuous_usage_stats": True} if token_counts else {})}}
    record.started = t0 = time.perf_counter()
    try:
        async for chunk in client.stream_chunks(messages, model, **body):
            now = time.perf_counter() - t0
            thought = delta_thinking(chunk)
            if thought and on_thinking is not None:
                on_thinking(thought)
            text = delta_text(chunk)
            if (thought or text) and math.isnan(record.first_s):
                record.first_s = now
            usage = chunk.get("usage")
            if text:
                record.pieces.append(text)
                record.times.append(now)
                record.tokens.append(usage.get("completion_tokens") if usage else None)
                if on_piece is not None:
                    on_piece(text)
            for choice in chunk.get("choices") or ():
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens")
                record.usage_tokens = usage.get("completion_tokens")
    except XllmError as exc:
        record.error = exc
    except BaseException:
        # CancelledError (a stop button, Ctrl-C) or worse: keep what arrived, then re-raise
        record.cancelled = True
        record.latency_s = time.perf_counter() - t0
        raise
    record.latency_s = time.perf_counter() - t0
    return record
