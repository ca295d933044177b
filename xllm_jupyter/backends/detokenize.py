"""Incremental detokenization: the new text each generated token adds.

Decoding one token at a time is wrong for SentencePiece (a leading "▁" becomes a space
only after other text) and ByteLevel BPE (one character can span tokens). So, like
TGI and vLLM, we decode a short window of previous tokens with and without the new
ones and emit the difference, holding text back while it ends in an incomplete UTF-8
character (decoded as U+FFFD).

Logprobs describe tokens, not released text: each token's own bytes come from its
vocabulary string (``piece_bytes``), so the entries of a character split over tokens
carry a part of it each, and join up to the text byte for byte.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

#: how many prompt tokens seed the window, so the first generated token decodes in context
PROMPT_CONTEXT = 5

#: how a vocabulary's token strings spell bytes (``piece_scheme``)
BYTE_LEVEL, SENTENCEPIECE, TEXT = "byte-level", "sentencepiece", "text"
#: a SentencePiece byte-fallback token: one byte of a character the vocabulary has no piece for
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's alphabet: printable latin-1 bytes stand for themselves, the others for U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table = {chr(b): b for b in printable}
    table.update((chr(0x100 + n), b) for n, b in enumerate(b for b in range(256) if b not in printable))
    return table


_BYTE_LEVEL_CHARS = _byte_level_alphabet()


def piece_scheme(tokenizer: Any) -> str:
    """How ``tokenizer``'s token strings spell bytes: BYTE_LEVEL, SENTENCEPIECE ("▁" space, "<0xE3>" bytes) or TEXT."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    state = decoder.__getstate__() if decoder is not None else None  # the decoder's JSON
    if isinstance(state, bytes):
        state = state.decode("utf-8", errors="replace")
    if isinstance(state, str):
        if '"ByteLevel"' in state:
            return BYTE_LEVEL
        if '"ByteFallback"' in state or '"Metaspace"' in state:
            return SENTENCEPIECE
    elif hasattr(tokenizer, "sp_model"):  # a slow SentencePiece tokenizer
        return SENTENCEPIECE
    return TEXT


def piece_bytes(piece: str, scheme: str) -> bytes | None:
    """The bytes a vocabulary token string stands for under ``scheme`` (None: it spells none; decode it instead)."""
    if scheme == BYTE_LEVEL:
        try:
            return bytes(_BYTE_LEVEL_CHARS[c] for c in piece)
        except KeyError:
            return None
    if scheme == SENTENCEPIECE:
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes((int(byte[1], 16),)) if byte else piece.replace("\u2581", " ").encode("utf-8")
    return None


def token_text(raw: bytes) -> str:
    """One token's bytes as a string; bytes that are no whole UTF-8 character alone are written ``\\xe3`` (as OpenAI)."""
    return raw.decode("utf-8", errors="backslashreplace")


class PieceDecoder:
    """A model's window decoder that remembers each single token's text, shared by its jobs' detokenizers.

    Every token decodes two windows: the text already emitted (after the last token came out, that is
    that one token alone) and the same with the new token. Remembering one-token windows makes the first
    a dict look-up; decoding is a pure function of the ids, so the text is the same.
    """

    __slots__ = ("_decode", "_one", "_limit")

    def __init__(self, decode: Callable[[Sequence[int]], str], limit: int = 1 << 16) -> None:
        self._decode = decode
        self._one: dict[int, str] = {}
        self._limit = limit  # bounds the memory on a huge vocabulary; the common tokens come first

    def __call__(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (one id: remembered)."""
        if len(ids) != 1:
            return self._decode(ids)
        text = self._one.get(ids[0])
        if text is None:
            text = self._decode(ids)
            if len(self._one) < self._limit:
                self._one[ids[0]] = text
        return text


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
        """Text still held back at the end of generation (may hold U+FFFD).

        Called at every end, a stop token's too: an answer that stops inside a character shows it as U+FFFD
        rather than dropping it: the content is always the answer tokens' bytes decoded (as invalid bytes inside
        it already are, as a ``length`` end and ``tokenizer.decode`` give it), so its logprobs' ``bytes``, joined,
        decode to it, and a client sees that something was cut. Both exllama backends do the same
        (``exllama_results.with_held_answer``).
        """
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
