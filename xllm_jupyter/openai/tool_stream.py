"""Tool calls while streaming: generated text pieces turned into content and call events as OpenAI streams them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .tool_call import (
    CALL_HEAD,
    CLOSE_TAG,
    HERMES,
    OPEN_TAG,
    ToolCall,
    block_calls,
    exact_call,
    new_call_id,
)
from .tool_scan import CALL_START, cut_call, scan


@dataclass
class StreamEvent:
    """One streamed piece: content text, or for call ``index`` its head (``id``, ``name``) or an ``arguments`` piece."""

    content: str | None = None
    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class StreamingToolParser:
    """Turns generated text pieces into content and tool-call events as OpenAI streams them.

    It splits text exactly as :func:`parse_tool_calls` does on the whole output (they share
    one scanner) and sends each piece once the text so far decides it: what may still become
    a call is held back, and a call goes out whole, once it is complete and valid, so a call
    that turns out malformed is streamed as the same content the full response shows.
    Grammar-forced output (``held``) is valid as generated: there a Hermes call is announced
    as soon as its name is known and its arguments follow as they are generated.
    """

    def __init__(self, names: Iterable[str], family: str = HERMES, held: bool = False):
        self.names = frozenset(names)
        self.family = family
        self._incremental = held
        self._buf = ""  # text not decided yet
        self._skip = False  # right after a call: its separators are dropped
        self._lead = ""  # leading blanks: content if text follows, formatting if a call does
        self._started = False  # content or a call was sent
        self._calls = 0
        self._head_end = 0  # where the open call's arguments start in the buffer (0: no call open)
        self._sent = ""  # arguments text of the open call already sent
        self._seen: set[tuple[str, str]] = set()  # calls sent: a repeat is dropped, as parse_tool_calls drops it
        #: calls dropped as repeats of earlier ones (in forced output, the sign of a model looping)
        self.repeats = 0
        self._ended = False  # forced output repeated a call: the rest of it is ignored
        #: at finish, the output ended inside a call, which it left incomplete (only a stop string ends one there)
        self.cut = False

    @property
    def calls(self) -> int:
        """How many calls were started so far."""
        return self._calls

    @property
    def forced(self) -> bool:
        """True for grammar-forced output (nothing but calls)."""
        return self._incremental

    def passes(self, text: str) -> bool:
        """True when ``text`` is plain content to send as it is: ``feed`` would return it as one event and change nothing.

        So it is when nothing is held back or open, content or a call already went out (leading blanks
        are held), no call's separators are being dropped and nothing in ``text`` may start a call: the
        scanner would find no construct and pass it whole. Most pieces of a text reply are such.
        """
        return (self._started and not self._buf and not self._skip and not self._head_end and not self._ended
                and text != "" and CALL_START.search(text) is None)

    def feed(self, text: str) -> list[StreamEvent]:
        """Events for a new piece of generated text."""
        if self.passes(text):  # most pieces of a text reply: the scanner's layers would pass it whole
            return [StreamEvent(content=text)]
        if self._ended:
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """Events for whatever is still held when generation ends."""
        if self._ended:
            return []
        self.cut = cut_call(self._buf, self.names)  # (what is held back is where a call may have been cut)
        out = self._drain(final=True)
        if self._lead:  # nothing but blanks came: they are the whole answer
            out.append(StreamEvent(content=self._lead))
            self._lead = ""
        return out

    def _drain(self, final: bool) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._head_end:
            out += self._close_open(final)
            if self._head_end:
                return out + self._partial_call()
        # forced output is nothing but calls: text left at the end is a call cut short, never content
        pieces, end, self._skip = scan(self._buf, self.names, final and not self._incremental, self._skip)
        self._buf = self._buf[end:]
        out += self._events(pieces)
        # only the first forced call streams as generated: a later one may repeat an earlier one, and
        # is sent whole (or dropped) once complete, or, cut short by max_tokens, as far as it got
        if self._incremental and (final or self._calls == 0) and self._buf.startswith(OPEN_TAG):
            if final and self._calls and self._repeats_earlier(self._buf):
                self.repeats += 1  # a repeat cut short before its closing tag is still a repeat
            else:
                out += self._partial_call()
        if self._incremental and final:
            self._buf = ""  # a call cut before its name is known: nothing to show
        return out

    def _events(self, pieces: list[str | ToolCall]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                if piece.key in self._seen:
                    self.repeats += 1
                    if self._incremental:  # forced output repeating itself: what follows is more of it
                        self._buf, self._lead, self._ended = "", "", True
                        break
                    continue
                self._seen.add(piece.key)
                out += self._announce(piece.id, piece.name)
                out.append(StreamEvent(index=self._calls - 1, arguments=piece.arguments))
            elif not self._started and not piece.strip():
                self._lead += piece
            else:
                out.append(StreamEvent(content=self._lead + piece))
                self._lead, self._started = "", True
        return out

    def _announce(self, call_id: str, name: str) -> list[StreamEvent]:
        self._lead, self._started = "", True  # blanks before a call are formatting
        self._calls += 1
        return [StreamEvent(index=self._calls - 1, id=call_id, name=name, arguments="")]

    def _repeats_earlier(self, block: str) -> bool:
        """True when ``block`` (an unclosed ``<tool_call>``) holds a complete call equal to one already sent."""
        body = block[len(OPEN_TAG):]
        for k in range(len(CLOSE_TAG), 0, -1):  # the end of the text may be the start of the closing tag
            if body.endswith(CLOSE_TAG[:k]):
                body = body[:-k]
                break
        call = exact_call(body, self.names)
        return call is not None and call.key in self._seen

    def _partial_call(self) -> list[StreamEvent]:
        """Head and argument pieces of a forced call being generated (buffer starts with ``<tool_call>``)."""
        out: list[StreamEvent] = []
        if not self._head_end:
            head = CALL_HEAD.match(self._buf, len(OPEN_TAG))
            if not head or (self.names and head.group(1) not in self.names):
                return out
            self._head_end = head.end()
            out += self._announce(new_call_id(), head.group(1))
        args = self._buf[self._head_end:]
        cut = args.rfind("}")  # the last brace may close the call object rather than the arguments
        safe = (args[:cut] if cut >= 0 else args).rstrip()
        if len(safe) > len(self._sent) and safe.startswith(self._sent):
            out.append(StreamEvent(index=self._calls - 1, arguments=safe[len(self._sent):]))
            self._sent = safe
        return out

    def _close_open(self, final: bool) -> list[StreamEvent]:
        """Once the announced call's block closes (or the output ends), send the rest of its arguments."""
        close = self._buf.find(CLOSE_TAG)
        if close < 0 and not final:
            return []
        body = self._buf[len(OPEN_TAG):close if close >= 0 else len(self._buf)]
        self._buf = self._buf[close + len(CLOSE_TAG):] if close >= 0 else ""
        index, sent = self._calls - 1, self._sent
        self._head_end, self._sent, self._skip = 0, "", True
        calls = list(block_calls(body, self.names))
        out: list[StreamEvent] = []
        # Cut short, the block does not parse: the call keeps the arguments already sent.
        if calls:
            first = calls.pop(0)
            self._seen.add(first.key)
            rest = first.arguments
            if rest.startswith(sent) and len(rest) > len(sent):
                out.append(StreamEvent(index=index, arguments=rest[len(sent):]))
        return out + self._events(calls)
