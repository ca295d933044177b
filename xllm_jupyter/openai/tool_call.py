"""Tool calls, one at a time: what a call is, and the call(s) one piece of generated text holds.

Three output families are understood: Hermes/Qwen ``<tool_call>{"name", "arguments"}</tool_call>``
(also what our fallback prompt and grammar produce), Llama 3.x bare JSON
``{"name", "parameters"}`` (optionally after ``<|python_tag|>``, several joined by ``;``)
Mistral ``[TOOL_CALLS][{"name", "arguments"}, ...]`` (the marker is a special token
and is often already stripped, leaving the bare array) and the newer Mistral (tokenizer v11+: Small 3.2,
Magistral, Devstral) ``[TOOL_CALLS]name[ARGS]{...}``, one marker per call. Only calls to known functions with
object arguments count; anything else stays text. Finding them in a whole output or a stream
is tool_scan.py's job.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

#: the output families (detect_family tells which one a template asks for)
HERMES, LLAMA3, MISTRAL, MISTRAL_V11 = "hermes", "llama3", "mistral", "mistral_v11"

#: the Hermes call block's tags
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()
# The shape our prompt and grammar produce; its arguments are kept as written, so a
# streamed call (sent piece by piece) and the same call unstreamed carry the same text.
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*$")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: function name and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())

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


def detect_family(template: str | None) -> str:
    """The tool-call format a model's chat template asks for (Hermes when it shows none)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return MISTRAL_V11 if "[ARGS]" in t else MISTRAL
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


def exact_call(body: str, names: frozenset[str]) -> ToolCall | None:
    """A ``{"name": ..., "arguments": {...}}`` body with the arguments text kept verbatim."""
    head = CALL_HEAD.match(body)
    tail = _TAIL.search(body)
    if not head or not tail or tail.start() < head.end() or (names and head.group(1) not in names):
        return None
    raw = body[head.end():tail.start()]
    try:
        ok = isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return None
    return ToolCall(head.group(1), raw) if ok else None


def json_calls(value: Any, names: frozenset[str]) -> tuple[ToolCall, ...]:
    """The calls a bare JSON value holds: one call object, or a list made only of calls."""
    items = value if isinstance(value, list) else [value]
    calls = tuple(c for c in (_call_from(v, names) for v in items) if c)
    return calls if calls and len(calls) == len(items) else ()


def block_calls(body: str, names: frozenset[str]) -> tuple[ToolCall, ...]:
    """The calls inside one ``<tool_call>`` block (none: the block is plain text)."""
    exact = exact_call(body, names)
    if exact:
        return (exact,)
    return tuple(c for _, _, v in _json_values(body) for c in json_calls(v, names))


def new_call_id() -> str:
    """A fresh call id, as OpenAI spells them (``call_`` and 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]
