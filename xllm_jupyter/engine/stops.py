"""Stop-string matching over streamed text, holding back only what could still match."""

from __future__ import annotations

import re


class StopMatcher:
    """Feeds streamed text; releases text that cannot be part of a stop string.

    Only the longest tail of the buffer that is a prefix of some stop string is held
    back, so text without stop-string beginnings streams with no delay.
    """

    __slots__ = ("stops", "_buf", "_starts")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._buf = ""
        # the characters a stop string begins with: text without one can neither match nor be held
        starts = "".join(re.escape(c) for c in sorted({s[0] for s in self.stops}))
        self._starts = re.compile(f"[{starts}]") if starts else None  # (re's cache: one compile per stop set)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string matched)."""
        if not self.stops:
            return text, False
        buf = self._buf + text
        if self._starts.search(buf) is None:  # most tokens: one C-level scan instead of a find per stop
            self._buf = ""
            return buf, False
        cut = -1
        for stop in self.stops:
            idx = buf.find(stop)
            if idx != -1 and (cut == -1 or idx < cut):
                cut = idx
        if cut != -1:
            self._buf = ""
            return buf[:cut], True
        hold = self._held_tail(buf)
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _held_tail(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Release whatever is held (the sequence ended without a match)."""
        out, self._buf = self._buf, ""
        return out
