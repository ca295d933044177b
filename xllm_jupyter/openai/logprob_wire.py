"""Token logprobs as the wire carries them: chat ``logprobs.content`` entries and the legacy completions object."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.types import TokenLogprob

#: OpenAI's logprob for "very unlikely": a token a grammar rules out has -inf, which JSON cannot carry
UNLIKELY_LOGPROB = -9999.0


def wire_logprob(value: float) -> float:
    """``value`` as it can go on the wire: -inf (and NaN) become ``UNLIKELY_LOGPROB``."""
    return value if value >= UNLIKELY_LOGPROB else UNLIKELY_LOGPROB


def chat_logprob_entries(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries for the tokens of one delta: each token's own string and bytes."""
    return [
        {
            "token": e.token,
            "logprob": wire_logprob(e.logprob),
            "bytes": list(e.raw),
            "top_logprobs": [{"token": t, "logprob": wire_logprob(p), "bytes": list(raw)}
                             for (t, p), raw in zip(e.top, e.top_raw)],
        }
        for e in logprobs
    ]


def _continues(raw: bytes) -> bool:
    """True when ``raw`` starts inside a character: a UTF-8 continuation byte (0b10xxxxxx)."""
    return bool(raw) and raw[0] & 0xC0 == 0x80


def legacy_text_advance(logprobs: Sequence[TokenLogprob]) -> int:
    """Characters of the text that begin in these tokens: how far they move ``text_offset``."""
    return sum(1 for e in logprobs for b in e.raw if b & 0xC0 != 0x80)


def legacy_logprobs(logprobs: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Legacy completions ``logprobs`` object; offsets count characters of the text from ``text_offset`` on.

    A token that starts inside a character (the rest of one split over tokens) is placed at that
    character, so offsets never pass the text they point into; each token's offset depends only on
    the tokens before it, so a stream's chunks (each from ``legacy_text_advance`` on) give the same
    offsets. Every ``top_logprobs`` dict holds the sampled token, as OpenAI's does (up to
    ``logprobs + 1`` entries).
    """
    tokens, token_lps, tops, offsets = [], [], [], []
    for e in logprobs:
        tokens.append(e.token)
        token_lps.append(wire_logprob(e.logprob))
        top = {t: wire_logprob(p) for t, p in e.top}
        top.setdefault(e.token, wire_logprob(e.logprob))
        tops.append(top)
        offsets.append(max(0, text_offset - 1) if _continues(e.raw) else text_offset)
        text_offset += legacy_text_advance((e,))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
