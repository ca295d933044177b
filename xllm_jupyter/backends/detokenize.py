"""Incremental detokenization: the new text each generated token adds.

Decoding one token at a time is wrong for SentencePiece (a leading "▁" becomes a space
only after other text) and ByteLevel BPE (one character can span tokens). So, like
TGI and vLLM, we decode a short window of previous tokens with and without the new
ones and emit the difference, holding text back while it ends in an incomplete UTF-8
character (decoded as U+FFFD).
"""

from __future__ import annotations

from typing import Callable, Sequence

#: how many prompt tokens seed the window, so the first generated token decodes in context
PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; one per job."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_before")

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        # _ids[_prefix:_read] is text already emitted; _ids[_read:] is held back
        self._prefix = 0
        self._read = len(self._ids)
        self._before: str | None = None  # cached decode of _ids[_prefix:_read]

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (may hold U+FFFD)."""
        return self._emit(final=True) if self._read < len(self._ids) else ""

    def _emit(self, *, final: bool) -> str:
        window = self._ids[self._prefix :]
        before = self._before
        if before is None:
            before = self._decode(window[: self._read - self._prefix]) if self._read > self._prefix else ""
            self._before = before
        after = self._decode(window)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        # slide the window: what was emitted becomes the context for the next token
        self._prefix = self._read
        self._read = len(self._ids)
        self._before = None
        if self._prefix > 64:
            # keep memory bounded on long generations; only the window is ever decoded
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return after[len(before) :]
