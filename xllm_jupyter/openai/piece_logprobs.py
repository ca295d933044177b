"""Which streamed chat pieces carry which held token logprobs, however the engine grouped the tokens."""

from __future__ import annotations

from typing import Any, Sequence

from .reasoning import thinking_share
from .tool_call import CLOSE_TAG
from .tool_scan import calls_end


def piece_shares(entries: Sequence[dict[str, Any]], pieces: Sequence[tuple[dict[str, Any], str | None]],
                 think_end: str | None) -> list[int]:
    """How many of a choice's held token logprob ``entries`` (oldest first) each of ``pieces`` (the chunk deltas and
    finish reasons one engine delta's text made, in order) takes: as many as each would take had every token come
    alone (the chat stream's pieces then never depend on how many tokens one delta held).

    A thinking piece takes the thinking's tokens (``thinking_share``); a content piece those that end within its text
    (not yet sent ones before it too: the end marker, a call's separators); a call piece (``tool_calls``, or the legacy
    ``function_call``) those before the next content piece's text (found past the call's own tokens) and its leading
    blanks (with no content after it, the call's own: blanks after it ride on the text after them, as one by one; all
    of them while a forced call is still being written); the choice's last piece what is left. What none takes stays
    held: text the parser holds back (it may start a call) rides on a later one. Texts are found among the tokens'
    bytes (a character split over tokens has no string of its own); where a piece's is not there, it takes what is left.
    """
    if not entries:
        return [0] * len(pieces)
    text, ends = _joined(entries)
    shares, taken, at = [], 0, 0

    def upto(cut: int) -> int:  # the entries not yet taken that end by ``cut``
        return sum(1 for e in ends[taken:] if e <= cut)

    def reaching(cut: int) -> int:  # those that start before ``cut``
        n = upto(cut)
        nxt = taken + n
        return n + (nxt < len(ends) and (ends[nxt - 1] if nxt else 0) < cut)

    for i, (delta, reason) in enumerate(pieces):
        k = len(entries) - taken
        if reason is None and k:
            if delta.get("reasoning_content") and think_end is not None:
                k = thinking_share(entries[taken:], think_end)
            elif delta.get("content"):
                own = delta["content"].encode("utf-8")
                found = text.find(own, at)
                k = upto(found + len(own)) if found >= 0 else k
            elif delta.get("tool_calls") or delta.get("function_call"):  # (the deprecated ``functions``' pieces)
                later = next((d["content"] for d, _ in pieces[i + 1:] if d.get("content")), None)
                end = _calls_end(text, at)
                found = _after(text, at, end, later.encode("utf-8")) if later else -1
                if found >= 0:  # (blanks between a call and text after it ride on the text, as one by one)
                    k = upto(at + len(text[at:found].rstrip()))
                elif end is not None:  # its own tokens (the one it ends in too): blanks after it ride on later text
                    k = reaching(end)
                elif not text[at:].strip():  # blanks after a call an earlier piece took: as above
                    k = 0
        shares.append(k)
        taken += k
        at = ends[taken - 1] if taken else 0
    return shares


def _calls_end(text: bytes, at: int) -> int | None:
    """Where the call whose tokens start at ``at`` in ``text`` ends: past the call constructs there, or past its end tag
    when it began in an earlier delta; None when neither is there (a forced call still being written)."""
    wide = text.decode("latin-1")  # one character a byte: the scanner's positions are the bytes'
    end = calls_end(wide, at)
    if end is None and (tag := wide.find(CLOSE_TAG, at)) >= 0:
        end = tag + len(CLOSE_TAG)
    return end


def _after(text: bytes, at: int, end: int | None, later: bytes) -> int:
    """Where ``later`` (the text after a call) is in ``text``: past the call's ``end``, as it may be in the call's JSON
    too (a ``}``, a quote); from ``at`` when it is not found there."""
    found = text.find(later, end) if end is not None else -1
    return found if found >= 0 else text.find(later, at)


def _joined(entries: Sequence[dict[str, Any]]) -> tuple[bytes, list[int]]:
    """The tokens' bytes joined, and where each token ends in them (an entry without bytes: its string's)."""
    joined, ends = b"", []
    for entry in entries:
        raw = entry.get("bytes")
        joined += bytes(raw) if raw is not None else (entry.get("token") or "").encode("utf-8")
        ends.append(len(joined))
    return joined, ends
