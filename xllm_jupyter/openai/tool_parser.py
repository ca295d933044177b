"""Function calling, response side: the calls in a whole generated output (parse_tool_calls).

The pieces live in modules of their own: tool_call.py (what a call is, the output families),
tool_scan.py (the scanner the whole output and the stream share), tool_stream.py (the
stream's parser); the names callers use are importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .tool_call import HERMES, LLAMA3, MISTRAL, MISTRAL_V11, ToolCall, detect_family
from .tool_scan import scan
from .tool_stream import StreamEvent, StreamingToolParser

__all__ = ["HERMES", "LLAMA3", "MISTRAL", "MISTRAL_V11", "ParsedOutput", "StreamEvent", "StreamingToolParser", "ToolCall",
           "detect_family", "parse_tool_calls"]


@dataclass(frozen=True)
class ParsedOutput:
    """Generated text split into the text the user sees and the calls found in it."""

    content: str | None
    calls: tuple[ToolCall, ...]
    #: forced output repeated a call, which ended it there
    repeated: bool = False


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


def parse_tool_calls(text: str, names: Iterable[str] = (), family: str = HERMES,
                     forced: bool = False) -> ParsedOutput:
    """Split ``text`` into content and calls to the functions in ``names`` (any name when empty).

    Every family's syntax is understood whatever ``family`` the model was asked for:
    models drift between them. A call that repeats an earlier one is dropped; in ``forced``
    (grammar-forced) output it ends the reply, as :class:`StreamingToolParser` ends it.
    """
    pieces, _, _ = scan(text, frozenset(names), final=True)
    whole = len(pieces)
    if forced:
        pieces = _until_repeat(pieces)
    calls = tuple(_first_of_each(p for p in pieces if isinstance(p, ToolCall)))
    if not calls:
        return ParsedOutput(text, ())
    return ParsedOutput(_content("".join(p for p in pieces if isinstance(p, str))), calls, len(pieces) < whole)


def _until_repeat(pieces: list[str | ToolCall]) -> list[str | ToolCall]:
    """``pieces`` up to the first call that repeats an earlier one."""
    seen: set[tuple[str, str]] = set()
    for i, piece in enumerate(pieces):
        if isinstance(piece, ToolCall):
            if piece.key in seen:
                return pieces[:i]
            seen.add(piece.key)
    return pieces


def _first_of_each(calls: Iterable[ToolCall]) -> list[ToolCall]:
    """``calls`` without repeats of an earlier call (same name and arguments).

    Small models, forced to call a tool, tend to write the same call again and again; a
    client would run it each time (a side effect, twice).
    """
    seen: set[tuple[str, str]] = set()
    out = []
    for call in calls:
        if call.key not in seen:
            seen.add(call.key)
            out.append(call)
    return out
