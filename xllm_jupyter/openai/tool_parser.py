"""Function calling, response side: find tool calls in generated text, whole or while streaming.

Three output families are understood: Hermes/Qwen ``<tool_call>{"name", "arguments"}</tool_call>``
(also what our fallback prompt and grammar produce), Llama 3.x bare JSON
``{"name", "parameters"}`` (optionally after ``<|python_tag|>``, several joined by ``;``)
and Mistral ``[TOOL_CALLS][{"name", "arguments"}, ...]`` (the marker is a special token
and is often already stripped, leaving the bare array). Every family is recognized in
any output, since models drift between them. Only calls to known functions with object
arguments count; anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_DECODER = json.JSONDecoder()
# The shape our prompt and grammar produce; its arguments are kept as written, so a
# streamed call (sent piece by piece) and the same call unstreamed carry the same text.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*$")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: function name and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: _new_id())

    def wire(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @property
    def key(self) -> tuple[str, str]:
        """Name and arguments in one spelling (key order, spacing): equal for the same call written twice."""
        try:
            args = json.dumps(json.loads(self.arguments), sort_keys=True, separators=(",", ":"))
        except (ValueError, RecursionError):
            args = self.arguments
        return self.name, args


@dataclass(frozen=True)
class ParsedOutput:
    """Generated text split into the text the user sees and the calls found in it."""

    content: str | None
    calls: tuple[ToolCall, ...]


def detect_family(template: str | None) -> str:
    """The tool-call format a model's chat template asks for (Hermes when it shows none)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<tool_call>" in t:
        return HERMES
    if "<|python_tag|>" in t or "ipython" in t:
        return LLAMA3
    return HERMES


def _call_from(obj: Any, names: frozenset[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(name, str) or (names and name not in names):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):  # (nesting past the parser's depth is not a call either)
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> Iterable[tuple[int, int, Any]]:
    """Every top-level JSON object or array in ``text`` as (start, end, value)."""
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = _DECODER.raw_decode(text, i)
            except (ValueError, RecursionError):
                i += 1
                continue
            yield i, end, value
            i = end
        else:
            i += 1


def _exact_call(body: str, names: frozenset[str]) -> ToolCall | None:
    """A ``{"name": ..., "arguments": {...}}`` body with the arguments text kept verbatim."""
    head = _HEAD.match(body)
    tail = _TAIL.search(body)
    if not head or not tail or tail.start() < head.end() or (names and head.group(1) not in names):
        return None
    raw = body[head.end():tail.start()]
    try:
        ok = isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return None
    return ToolCall(head.group(1), raw) if ok else None


def _json_calls(value: Any, names: frozenset[str]) -> tuple[ToolCall, ...]:
    """The calls a bare JSON value holds: one call object, or a list made only of calls."""
    items = value if isinstance(value, list) else [value]
    calls = tuple(c for c in (_call_from(v, names) for v in items) if c)
    return calls if calls and len(calls) == len(items) else ()


def _block_calls(body: str, names: frozenset[str]) -> tuple[ToolCall, ...]:
    """The calls inside one ``<tool_call>`` block (none: the block is plain text)."""
    exact = _exact_call(body, names)
    if exact:
        return (exact,)
    return tuple(c for _, _, v in _json_values(body) for c in _json_calls(v, names))


# ---------------------------------------------------------------------- scanner
# One scanner serves the full response and the stream, so both split any text the same
# way; the stream only waits until the text so far decides each piece.
_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]")
_START = re.compile(r"[<{\[]")  # where a call may start: a tag, a marker, a JSON object or array
_SPACE = re.compile(r"\s*")
_AFTER_CALL = re.compile(r"[\s;,]*")  # what joins calls (Llama's ";", blank lines) is not content
# What a JSON value cut short by the end of the text leaves past the decoder's error position:
# part of a literal, a number's sign, fraction or exponent, or a \uXXXX escape (or a surrogate pair).
_CUT_TOKEN = re.compile(r"(?:t(?:ru?)?|f(?:a(?:ls?)?)?|n(?:ul?)?|-|[.eE][-+]?|u[0-9a-fA-F]{0,4}(?:\\(?:u[0-9a-fA-F]{0,4})?)?)\Z")
_Span = tuple[int, tuple[ToolCall, ...]]  # where a construct ends, and its calls (none: plain text)
_HOLD: _Span = (-1, ())  # a construct the text so far cannot decide


def _may_grow(text: str, err: json.JSONDecodeError) -> bool:
    """True when the JSON value that failed with ``err`` is only cut short, so more text may complete it."""
    if err.pos >= len(text) or err.msg.startswith("Unterminated string"):
        return True
    return _CUT_TOKEN.match(text, err.pos) is not None


def _cut_short(text: str, i: int, marker: str, final: bool) -> bool:
    """True when the text ends inside what may still become ``marker``."""
    return not final and len(text) - i < len(marker) and marker.startswith(text[i:])


def _json_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    if text[i] not in "{[":
        return None
    try:
        value, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as err:
        return _HOLD if not final and _may_grow(text, err) else None
    except RecursionError:  # nested past the parser's depth: text, not a call
        return None
    return end, _json_calls(value, names)


def _marker_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    """A call marker with the JSON calls after it (a marker followed by anything else is plain text)."""
    for marker in _MARKERS:
        if text.startswith(marker, i):
            j = _SPACE.match(text, i + len(marker)).end()
            if j == len(text):
                return None if final else _HOLD
            span = _json_at(text, j, names, final)
            return span if span is _HOLD or (span and span[1]) else None
        if _cut_short(text, i, marker, final):
            return _HOLD
    return None


def _block_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    """A ``<tool_call>`` block; one left open counts only when the text ends inside it."""
    if not text.startswith(_OPEN, i):
        return _HOLD if _cut_short(text, i, _OPEN, final) else None
    close = text.find(_CLOSE, i + len(_OPEN))
    if close >= 0:
        return close + len(_CLOSE), _block_calls(text[i + len(_OPEN):close], names)
    return (len(text), _block_calls(text[i + len(_OPEN):], names)) if final else _HOLD


def _construct(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    for at in (_marker_at, _block_at, _json_at):
        span = at(text, i, names, final)
        if span is not None:
            return span
    return None


def _scan(text: str, names: frozenset[str], final: bool, skip: bool = False) -> tuple[list[str | ToolCall], int, bool]:
    """Split ``text`` into plain pieces and calls as far as it is decided: (pieces, decided length, skip).

    ``skip`` is True right after a call, whose separators are not content. Unless ``final``
    the text may still grow, and a call construct it cuts short stays undecided.
    """
    out: list[str | ToolCall] = []
    i = plain = 0
    while i < len(text):
        if skip:
            i = plain = _AFTER_CALL.match(text, i).end()
            skip = i == len(text)
            continue
        m = _START.search(text, i)
        if not m:
            break
        i = m.start()
        span = _construct(text, i, names, final)
        if span is None or (span is not _HOLD and not span[1]):
            i = i + 1 if span is None else span[0]  # plain text, even where it looked like a call
            continue
        if plain < i:
            out.append(text[plain:i])
        if span is _HOLD:
            return out, i, False
        out.extend(span[1])
        i, plain, skip = span[0], span[0], True
    if plain < len(text):
        out.append(text[plain:])
    return out, len(text), skip


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
    pieces, _, _ = _scan(text, frozenset(names), final=True)
    if forced:
        pieces = _until_repeat(pieces)
    calls = tuple(_first_of_each(p for p in pieces if isinstance(p, ToolCall)))
    if not calls:
        return ParsedOutput(text, ())
    return ParsedOutput(_content("".join(p for p in pieces if isinstance(p, str))), calls)


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


# -------------------------------------------------------------------- streaming
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

    @property
    def calls(self) -> int:
        """How many calls were started so far."""
        return self._calls

    @property
    def forced(self) -> bool:
        """True for grammar-forced output (nothing but calls)."""
        return self._incremental

    def feed(self, text: str) -> list[StreamEvent]:
        """Events for a new piece of generated text."""
        if self._ended:
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """Events for whatever is still held when generation ends."""
        if self._ended:
            return []
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
        pieces, end, self._skip = _scan(self._buf, self.names, final and not self._incremental, self._skip)
        self._buf = self._buf[end:]
        out += self._events(pieces)
        # only the first forced call streams as generated: a later one may repeat an earlier one, and
        # is sent whole (or dropped) once complete, or, cut short by max_tokens, as far as it got
        if self._incremental and (final or self._calls == 0) and self._buf.startswith(_OPEN):
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
        body = block[len(_OPEN):]
        for k in range(len(_CLOSE), 0, -1):  # the end of the text may be the start of the closing tag
            if body.endswith(_CLOSE[:k]):
                body = body[:-k]
                break
        call = _exact_call(body, self.names)
        return call is not None and call.key in self._seen

    def _partial_call(self) -> list[StreamEvent]:
        """Head and argument pieces of a forced call being generated (buffer starts with ``<tool_call>``)."""
        out: list[StreamEvent] = []
        if not self._head_end:
            head = _HEAD.match(self._buf, len(_OPEN))
            if not head or (self.names and head.group(1) not in self.names):
                return out
            self._head_end = head.end()
            out += self._announce(_new_id(), head.group(1))
        args = self._buf[self._head_end:]
        cut = args.rfind("}")  # the last brace may close the call object rather than the arguments
        safe = (args[:cut] if cut >= 0 else args).rstrip()
        if len(safe) > len(self._sent) and safe.startswith(self._sent):
            out.append(StreamEvent(index=self._calls - 1, arguments=safe[len(self._sent):]))
            self._sent = safe
        return out

    def _close_open(self, final: bool) -> list[StreamEvent]:
        """Once the announced call's block closes (or the output ends), send the rest of its arguments."""
        close = self._buf.find(_CLOSE)
        if close < 0 and not final:
            return []
        body = self._buf[len(_OPEN):close if close >= 0 else len(self._buf)]
        self._buf = self._buf[close + len(_CLOSE):] if close >= 0 else ""
        index, sent = self._calls - 1, self._sent
        self._head_end, self._sent, self._skip = 0, "", True
        calls = list(_block_calls(body, self.names))
        out: list[StreamEvent] = []
        # Cut short, the block does not parse: the call keeps the arguments already sent.
        if calls:
            first = calls.pop(0)
            self._seen.add(first.key)
            rest = first.arguments
            if rest.startswith(sent) and len(rest) > len(sent):
                out.append(StreamEvent(index=index, arguments=rest[len(sent):]))
        return out + self._events(calls)


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
