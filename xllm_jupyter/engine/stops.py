"""Stop-string matching over streamed text, holding back only what could still match."""

from __future__ import annotations


class StopMatcher:
    """Feeds streamed text; releases text that cannot be part of a stop string.

    Only the longest tail of the buffer that is a prefix of some stop string is held
    back, so text without stop-string beginnings streams with no delay.
    """

    __slots__ = ("stops", "_buf")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string matched)."""
        if not self.stops:
            return text, False
        buf = self._buf + text
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
