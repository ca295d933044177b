"""The tool-call scanner: generated text split into plain pieces and calls, as far as the text so far decides.

One scanner serves the full response and the stream, so both split any text the same way; the
stream only waits until the text so far decides each piece.
"""

from __future__ import annotations

import json
import re

from .tool_call import CLOSE_TAG, OPEN_TAG, ToolCall, block_calls, json_calls

_DECODER = json.JSONDecoder()
_MARKERS = ("<|python_tag|>", "[TOOL_CALLS]")
_MARKER_AT = {m[0]: m for m in _MARKERS}
#: where a call may start: a tag, a marker, a JSON object or array (text without one is plain)
CALL_START = re.compile(r"[<{\[]")
_SPACE = re.compile(r"\s*")
_AFTER_CALL = re.compile(r"[\s;,]*")  # what joins calls (Llama's ";", blank lines) is not content
# What a JSON value cut short by the end of the text leaves past the decoder's error position:
# part of a literal, a number's sign, fraction or exponent, or a \uXXXX escape (or a surrogate pair).
_CUT_TOKEN = re.compile(r"(?:t(?:ru?)?|f(?:a(?:ls?)?)?|n(?:ul?)?|-|[.eE][-+]?|u[0-9a-fA-F]{0,4}(?:\\(?:u[0-9a-fA-F]{0,4})?)?)\Z")
_Span = tuple[int, tuple[ToolCall, ...]]  # where a construct ends, and its calls (none: plain text)
_HOLD: _Span = (-1, ())  # a construct the text so far cannot decide
# A Mistral v11+ call after its marker: the name, an optional call id (v13), then the arguments object
_V11_HEAD = re.compile(r"([a-zA-Z0-9_-]{1,64})(?:\[CALL_ID\][a-zA-Z0-9]{1,64})?\[ARGS\]\s*")
_V11_CUT = re.compile(r"[a-zA-Z0-9_-]{0,64}(?:\[CALL_ID\][a-zA-Z0-9]{0,64})?")  # the part a cut head may end in


def _may_grow(text: str, err: json.JSONDecodeError) -> bool:
    """True when the JSON value that failed with ``err`` is only cut short, so more text may complete it."""
    if err.pos >= len(text) or err.msg.startswith("Unterminated string"):
        return True
    return _CUT_TOKEN.match(text, err.pos) is not None


def _cut_short(text: str, i: int, marker: str, final: bool) -> bool:
    """True when the text ends inside what may still become ``marker``."""
    return not final and len(text) - i < len(marker) and marker.startswith(text[i:])


def _value_at(text: str, i: int, final: bool) -> tuple[object, int] | None:
    """The JSON value at ``i`` and where it ends; ``_HOLD`` while more text may complete it; None: no value."""
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as err:
        return _HOLD if not final and _may_grow(text, err) else None
    except RecursionError:  # nested past the parser's depth: text, not a call
        return None


def _json_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    if text[i] not in "{[":
        return None
    found = _value_at(text, i, final)
    return found if found is None or found is _HOLD else (found[1], json_calls(found[0], names))


def _marker_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    """A call marker with the JSON calls after it (a marker followed by anything else is plain text)."""
    marker = _MARKER_AT[text[i]]  # (the one marker that begins with this character)
    if text.startswith(marker, i):
        j = _SPACE.match(text, i + len(marker)).end()
        if j == len(text):
            return None if final else _HOLD
        span = _json_at(text, j, names, final) or _v11_at(text, j, names, final)
        return span if span is _HOLD or (span and span[1]) else None
    return _HOLD if _cut_short(text, i, marker, final) else None


def _v11_at(text: str, j: int, names: frozenset[str], final: bool) -> _Span | None:
    """A Mistral v11+ call after its ``[TOOL_CALLS]`` (at ``j``): ``name[ARGS]{...}``, its arguments kept as written."""
    head = _V11_HEAD.match(text, j)
    if not head:
        cut = _V11_CUT.match(text, j).end()  # name (and id) so far; the text may end inside a tag after them
        tags = ("[CALL_ID]", "[ARGS]") if "[CALL_ID]" not in text[j:cut] else ("[ARGS]",)
        growing = cut == len(text) or any(_cut_short(text, cut, tag, final) for tag in tags)
        return _HOLD if not final and growing else None
    if names and head.group(1) not in names:
        return None
    k = head.end()
    if k == len(text) or text[k] != "{":
        return _HOLD if k == len(text) and not final else None
    found = _value_at(text, k, final)  # (parsed once: its text is kept as written, its type decides)
    if found is None or found is _HOLD:
        return found
    value, end = found
    return (end, (ToolCall(head.group(1), text[k:end]),)) if isinstance(value, dict) else None


def _block_at(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    """A ``<tool_call>`` block; one left open counts only when the text ends inside it."""
    if not text.startswith(OPEN_TAG, i):
        return _HOLD if _cut_short(text, i, OPEN_TAG, final) else None
    close = text.find(CLOSE_TAG, i + len(OPEN_TAG))
    if close >= 0:
        return close + len(CLOSE_TAG), block_calls(text[i + len(OPEN_TAG):close], names)
    return (len(text), block_calls(text[i + len(OPEN_TAG):], names)) if final else _HOLD


#: what may start at each CALL_START character, in the order tried (the others cannot: a marker, the
#: tag and JSON each begin with one character), so a "{" in plain text costs one JSON attempt, not three
_TRIES = {"<": (_marker_at, _block_at), "[": (_marker_at, _json_at), "{": (_json_at,)}


def _construct(text: str, i: int, names: frozenset[str], final: bool) -> _Span | None:
    for at in _TRIES[text[i]]:
        span = at(text, i, names, final)
        if span is not None:
            return span
    return None


def scan(text: str, names: frozenset[str], final: bool, skip: bool = False) -> tuple[list[str | ToolCall], int, bool]:
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
        m = CALL_START.search(text, i)
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


def cut_call(text: str, names: frozenset[str]) -> bool:
    """True when ``text`` (an output a stop string ended) ends inside what may be a call and is not a complete one.

    The tail a scan cannot decide yet is what the stream holds back at the end; read as final it is complete
    calls when only their closing tag (or the space before it) was cut, else what was cut is a call's middle.
    """
    _, end, _ = scan(text, names, final=False)
    return end < len(text) and not all(isinstance(p, ToolCall) for p in scan(text[end:], names, final=True)[0])


def calls_end(text: str, start: int = 0) -> int | None:
    """Where the first complete call construct at or after ``start`` in ``text`` ends, with those right after it (joined
    by blanks, ``;`` or ``,``); None when there is none. Any function name counts."""
    end, i = None, start
    while (m := CALL_START.search(text, i)) is not None and (end is None or m.start() == i):
        span = _construct(text, m.start(), frozenset(), final=False)
        if span is not None and span is not _HOLD and span[1]:
            end = span[0]
            i = _AFTER_CALL.match(text, end).end()
        elif end is not None:
            break
        else:  # text before the call (a token with its blanks and the text's last character)
            i = m.start() + 1 if span is None or span is _HOLD else span[0]
    return end
