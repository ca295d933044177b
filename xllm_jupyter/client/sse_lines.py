"""The lines of a server-sent event stream, split as its spec says: at CR, LF or CRLF, and nowhere else.

httpx's ``iter_lines`` splits as ``str.splitlines`` does, so a data line whose JSON holds a raw U+2028, U+2029 or
U+0085 (the server writes non-ASCII text unescaped) broke in two, a malformed event; and it held a line ended by a
bare CR until more bytes came, which for a stream's last event is its end.
"""

from __future__ import annotations

import re
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSELines:
    """Lines of an event stream fed as decoded text in pieces; a line ended by CR leaves at once (an LF right after
    it, in the next piece, is the rest of its CRLF and is skipped)."""

    __slots__ = ("_held", "_after_cr")

    def __init__(self) -> None:
        self._held: list[str] = []  # the start of a line whose end has not come
        self._after_cr = False

    def feed(self, text: str) -> list[str]:
        """The lines ``text`` ends (without their line ends); what follows the last is held."""
        if self._after_cr and text[:1] == "\n":
            text = text[1:]
        self._after_cr = text.endswith("\r")
        parts = _LINE_END.split(text)
        if len(parts) == 1:  # (no line end: held, joined once its end comes)
            if text:
                self._held.append(text)
            return []
        if self._held:
            parts[0] = "".join(self._held) + parts[0]
            self._held = []
        rest = parts.pop()
        if rest:
            self._held.append(rest)
        return parts

    def flush(self) -> list[str]:
        """The last line, when the stream ended without a line end after it."""
        line, self._held = "".join(self._held), []
        return [line] if line else []


def sse_lines(texts: Iterable[str]) -> Iterator[str]:
    """The lines of the decoded text pieces ``texts`` (``response.iter_text()``)."""
    lines = SSELines()
    for text in texts:
        yield from lines.feed(text)
    yield from lines.flush()


async def asse_lines(texts: AsyncIterable[str]) -> AsyncIterator[str]:
    """The lines of the decoded text pieces ``texts`` (``response.aiter_text()``)."""
    lines = SSELines()
    async for text in texts:
        for line in lines.feed(text):
            yield line
    for line in lines.flush():
        yield line
