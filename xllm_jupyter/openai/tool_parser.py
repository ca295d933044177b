"""Function calling, response side: find tool calls in generated text, whole or while streaming.

Three output families are understood: Hermes/Qwen ``<tool_call>{"name", "arguments"}</tool_call>``
(also what our fallback prompt and grammar produce), Llama 3.x bare JSON
``{"name", "parameters"}`` (optionally after ``<|python_tag|>``, several joined by ``;``)
and Mistral ``[TOOL_CALLS][{"name", "arguments"}, ...]`` (the marker is a special token
and is often already stripped, leaving the bare array). Only calls to known functions
count; anything else stays text.
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
        except ValueError:
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
            except ValueError:
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
    except ValueError:
        return None
    return ToolCall(head.group(1), raw) if ok else None


def _parse_hermes(text: str, names: frozenset[str]) -> ParsedOutput | None:
    if _OPEN not in text:
        return None
    calls, rest, pos = [], [], 0
    for m in _HERMES_BLOCK.finditer(text):
        exact = _exact_call(m.group(1), names)
        found = [exact] if exact else [c for _, _, v in _json_values(m.group(1)) for c in [_call_from(v, names)] if c]
        if not found:
            continue
        rest.append(text[pos:m.start()])
        pos = m.end()
        calls.extend(found)
    if not calls:
        return None
    rest.append(text[pos:])
    return ParsedOutput(_content("".join(rest)), tuple(calls))


def _parse_json_calls(text: str, names: frozenset[str]) -> ParsedOutput | None:
    """Bare JSON calls (Llama 3.x objects, Mistral arrays) anywhere in ``text``."""
    cleaned = text.replace("<|python_tag|>", "").replace("[TOOL_CALLS]", "")
    calls, rest, pos = [], [], 0
    for start, end, value in _json_values(cleaned):
        items = value if isinstance(value, list) else [value]
        found = [c for c in (_call_from(v, names) for v in items) if c]
        if not found or len(found) != len(items):
            continue
        rest.append(cleaned[pos:start])
        pos = end
        calls.extend(found)
    if not calls:
        return None
    rest.append(cleaned[pos:])
    leftover = re.sub(r"[\s;,]+", " ", "".join(rest))
    return ParsedOutput(_content(leftover), tuple(calls))


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


def parse_tool_calls(text: str, names: Iterable[str] = (), family: str = HERMES) -> ParsedOutput:
    """Split ``text`` into content and calls to the functions in ``names`` (any name when empty)."""
    known = frozenset(names)
    order = (_parse_hermes, _parse_json_calls) if family == HERMES else (_parse_json_calls, _parse_hermes)
    for parse in order:
        out = parse(text, known)
        if out is not None:
            return out
    return ParsedOutput(text, ())


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

    Text that may still become a tool call is held back, never streamed as content:
    in Hermes mode a suffix that could start ``<tool_call>``; in the JSON families
    everything once the output starts with ``{``, ``[`` or a call marker. A Hermes call
    is announced as soon as its name is known and its arguments follow as they are
    generated (all but a possible closing brace); other calls are sent when complete.
    """

    def __init__(self, names: Iterable[str], family: str = HERMES, held: bool = False):
        self.names = frozenset(names)
        self.family = family
        self._buf = ""
        self._calls = 0
        self._json_mode: bool | None = None
        self._in_call = held  # a grammar-forced output is all calls: never stream it as text
        self._head_end = 0  # where the open call's arguments start in the buffer (0: no call open)
        self._sent = ""  # arguments text of the open call already sent

    @property
    def calls(self) -> int:
        """How many calls were started so far."""
        return self._calls

    def feed(self, text: str) -> list[StreamEvent]:
        """Events for a new piece of generated text."""
        self._buf += text
        if self.family != HERMES:
            return self._feed_json()
        out: list[StreamEvent] = []
        while self._buf:
            if self._in_call:
                end = self._buf.find(_CLOSE)
                if end < 0:
                    out.extend(self._partial_call())
                    break
                block, self._buf = self._buf[: end + len(_CLOSE)], self._buf[end + len(_CLOSE):]
                self._in_call = False
                out.extend(self._emit(block, final=False))
                continue
            start = self._buf.find(_OPEN)
            if start >= 0:
                out.extend(self._text(self._buf[:start]))
                self._buf = self._buf[start:]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, _OPEN)
            out.extend(self._text(self._buf[: len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def finish(self) -> list[StreamEvent]:
        """Events for whatever is still held when generation ends."""
        buf, self._buf = self._buf, ""
        if not buf:
            return []
        return self._emit(buf, final=True)

    def _feed_json(self) -> list[StreamEvent]:
        if self._json_mode is None:
            head = self._buf.lstrip()
            if not head:
                return []
            self._json_mode = head[0] in "{[" or head.startswith(("<|python_tag|>", "[TOOL_CALLS]")) or self._in_call
        if self._json_mode:
            return []
        buf, self._buf = self._buf, ""
        return [StreamEvent(content=buf)]

    def _text(self, text: str) -> list[StreamEvent]:
        # Blank lines between calls are formatting, not an answer.
        if not text or (self._calls and not text.strip()):
            return []
        return [StreamEvent(content=text)]

    def _partial_call(self) -> list[StreamEvent]:
        """Head and argument pieces of the call being generated (buffer starts with ``<tool_call>``)."""
        out: list[StreamEvent] = []
        if not self._head_end:
            head = _HEAD.match(self._buf, len(_OPEN)) if self._buf.startswith(_OPEN) else None
            if not head or (self.names and head.group(1) not in self.names):
                return out
            self._head_end = head.end()
            out.append(StreamEvent(index=self._calls, id=_new_id(), name=head.group(1), arguments=""))
            self._calls += 1
        args = self._buf[self._head_end:]
        cut = args.rfind("}")  # the last brace may close the call object rather than the arguments
        safe = (args[:cut] if cut >= 0 else args).rstrip()
        if len(safe) > len(self._sent) and safe.startswith(self._sent):
            out.append(StreamEvent(index=self._calls - 1, arguments=safe[len(self._sent):]))
            self._sent = safe
        return out

    def _emit(self, text: str, final: bool) -> list[StreamEvent]:
        parsed = parse_tool_calls(text, self.names, self.family)
        calls = list(parsed.calls)
        out: list[StreamEvent] = []
        if self._head_end:
            # finish the call already announced: send the rest of its arguments
            open_index, sent = self._calls - 1, self._sent
            self._head_end, self._sent = 0, ""
            if calls:
                rest = calls.pop(0).arguments
                if rest.startswith(sent) and len(rest) > len(sent):
                    out.append(StreamEvent(index=open_index, arguments=rest[len(sent):]))
            return out + self._complete(calls)
        if not calls:
            return self._text(text) if final or text.strip() else []
        return self._text(parsed.content or "") + self._complete(calls)

    def _complete(self, calls: list[ToolCall]) -> list[StreamEvent]:
        out = []
        for call in calls:
            out.append(StreamEvent(index=self._calls, id=call.id, name=call.name, arguments=""))
            out.append(StreamEvent(index=self._calls, arguments=call.arguments))
            self._calls += 1
        return out


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
