"""gpt-oss's harmony format: a reply's thinking, answer and tool calls read from the messages the model writes.

A harmony chat template (openai/gpt-oss-20b, -120b) ends the prompt with ``<|start|>assistant``; the model then
writes one message or more, each a header (``<|channel|>`` and its name, maybe a recipient ``to=functions.NAME`` and
a content type) then ``<|message|>`` and a body, closed by ``<|end|>`` (more follow: ``<|start|>assistant...``),
``<|return|>`` (the answer is done) or ``<|call|>`` (a tool is to run). The ``analysis`` channel is the thinking
(``reasoning_content``), ``final`` the answer and ``commentary`` a preamble to the user (``content``); a message with a
recipient in ``functions.`` is a call (``tool_calls``); one to a built-in tool (``to=browser.search``,
``to=python``: none is served) is dropped, as vLLM's chat drops it. The markers are special tokens, kept in the decoded text
while the reply is read (``MARKERS``) and never passed on; ``<|return|>`` and ``<|call|>`` end the reply
(backends/hf_tokenizer.py). Text that is not in the format at all (the model ignored it) is the answer as written.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from ..backends.think_grammar import HARMONY
from ..core.types import Constraint
from .legacy_functions import legacy_delta
from .tool_call import new_call_id
from .tools import ToolConfig, answer_schema, args_schema

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
#: the special tokens the decoded text keeps while a reply is read (``GenerationParams.keep_special``)
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
#: what ends a message's body (``<|start|>`` too: a model that left out the ``<|end|>`` before the next message)
_CLOSERS = (END, RETURN, CALL, START)
#: a message's header (``<|start|>assistant<|channel|>final``: the role, channel, recipient and content type) is no
#: stop string's text (``GenerationParams.stop_exempt``): from its opening marker to ``<|message|>`` (or a marker
#: that ends a message without a body)
STOP_EXEMPT = tuple((opener, closer) for opener in (START, CHANNEL) for closer in (MESSAGE, END, RETURN, CALL))
_HEADS = (START, CHANNEL)  # how a message's header begins
#: how the first may begin too: at its recipient, the prompt having written ``<|start|>assistant`` (gpt-oss's template
#: writes a past call as ``<|start|>assistant to=functions.X<|channel|>commentary json<|message|>``: the model follows)
_FIRST_HEADS = (*_HEADS, "to=")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
#: a piece's kinds: thinking, answer text, a call announced (its function's name), a call's arguments
REASONING, CONTENT, CALLED, ARGUMENTS = "reasoning", "content", "call", "arguments"
_DROP = "drop"


def is_harmony(template: str | None) -> bool:
    """True when a chat template is harmony's (it writes ``<|channel|>`` and ``<|message|>``)."""
    return bool(template) and CHANNEL in template and MESSAGE in template  # type: ignore[operator]


def shown(header: str) -> bool:
    """Whether the body of a message with ``header`` is the reply's ``content``: the final channel or a commentary
    preamble (not the thinking, a call or a built-in tool's message; text after a header never shown is too)."""
    channel = _CHANNEL.search(header)
    return _RECIPIENT.search(header) is None and (channel is None or channel.group(1) != "analysis")


def stop_exempt(keep_special: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``GenerationParams.stop_exempt`` for a reply whose text keeps ``keep_special``: harmony's headers where it
    keeps harmony's markers; none otherwise."""
    return STOP_EXEMPT if set(MARKERS) <= set(keep_special) else ()


def in_final(constraint: Constraint, model: Any) -> Constraint:
    """``constraint`` as the backend applies it to ``model``'s harmony reply: in the ``final`` channel, after an
    analysis message the model may write first (backends/think_grammar.py), as vLLM applies it to gpt-oss's final
    channel; as it is where the grammar writes the channels itself (its source names ``<|channel|>``) or the
    tokenizer has not the markers as single tokens."""
    ids = [model.tokenize(m, add_special_tokens=False) for m in (CHANNEL, MESSAGE, END, START)]
    spec = constraint.spec if constraint.kind in ("lark", "grammar", "regex") else ""
    if any(len(i) != 1 for i in ids) or CHANNEL in spec or f"<[{ids[0][0]}]>" in spec:
        return constraint
    return replace(constraint, think=HARMONY)


def call_grammar(tools: Sequence[Any], model: Any, answer: Any = None) -> Constraint | None:
    """The grammar of a harmony reply forced to call one of ``tools`` (ToolSpecs: ``tool_choice`` required or a named
    function): an analysis message it may write first, then a commentary message to ``functions.NAME`` with JSON
    arguments its schema admits, which ``<|call|>`` ends; or, given ``answer`` (a JSON schema), a final message that
    matches it instead. None where ``model``'s tokenizer has not every marker as one token."""
    ids = [model.tokenize(m, add_special_tokens=False) for m in (CHANNEL, MESSAGE, END, START, CONSTRAIN)]
    if any(len(i) != 1 for i in ids):
        return None
    ch, msg, end, st, con = (f"<[{i[0]}]>" for i in ids)
    calls = [f'{ch} {json.dumps("commentary to=functions." + t.name + " ")} {con} "json" {msg} '
             f"%json{json.dumps(args_schema(t.parameters))}" for t in tools]
    if answer is not None:
        calls.append(f'{ch} "final" {msg} %json{json.dumps(answer)}')
    return Constraint("lark", "\n".join([
        "start: xllm_think? xllm_call", "xllm_call: " + " | ".join(calls),
        f'xllm_think: {ch} "analysis" {msg} XLLM_THOUGHT {end} {st} "assistant"',
        "XLLM_THOUGHT: /(.|\\n)*/ & ~/(.|\\n)*<\\|end\\|>(.|\\n)*/"]) + "\n")  # (nor <|end|> spelt in text)


def calls_or_final(cfg: ToolConfig, answer: Constraint | None, model: Any) -> Constraint | None:
    """``answer`` (a ``response_format``'s constraint) for a harmony reply that may call the request's tools instead
    (tools.calls_or_answer's counterpart: agents with tools and a structured final output); as it is otherwise."""
    if answer is None or model is None or not cfg.active or cfg.constrained or answer.kind not in ("json_object",
                                                                                                   "json_schema"):
        return answer
    return call_grammar(cfg.callable_tools(), model, answer_schema(answer)) or answer


def _partial(text: str, markers: Sequence[str]) -> int:
    """The length of ``text``'s longest end that begins one of ``markers`` (held back: a marker may be arriving)."""
    for k in range(min(max(map(len, markers)) - 1, len(text)), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):
            return k
    return 0


def _first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """Where the first of ``markers`` in ``text`` is, and which one it is (-1 and "" where none is)."""
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else (-1, "")


class HarmonyParser:
    """One choice's text as it streams, read into ``(kind, text)`` pieces (``REASONING``, ``CONTENT``, ``CALLED``
    with the function's name, ``ARGUMENTS``); no marker reaches any of them, however the text was split.

    ``names``: the functions the request offers (a call to another one is content, as other formats leave it);
    ``parallel``: more than one call is kept (else later ones are dropped, as the other formats drop them).
    """

    def __init__(self, names: Iterable[str] = (), parallel: bool = True):
        self.names, self.parallel = frozenset(names), parallel
        self.calls = 0
        self._buf = ""
        self._kind: str | None = None  # the body being read; None: a header
        self._plain = False  # the text is not in the format: all of it is content
        self._first = True  # no header read yet

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """The pieces ``text`` releases (``final``: nothing follows it)."""
        buf, self._buf, out = self._buf + text, "", []
        while buf:
            if self._kind is None:
                buf = self._header(buf, final, out)
                if self._kind is None:
                    break
            cut, closer = _first(buf, _CLOSERS)
            if cut < 0:
                keep = 0 if final else _partial(buf, _CLOSERS)
                self._emit(out, buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            self._emit(out, buf[:cut])
            buf = buf[cut + (0 if closer == START else len(closer)):]  # (a header begins at <|start|>)
            self._kind = None
        return out

    def _header(self, buf: str, final: bool, out: list[tuple[str, str]]) -> str:
        """Read a message's header from ``buf``; what is left of it (held in ``_buf`` while the header is not whole)."""
        lead, heads = buf.lstrip(), _FIRST_HEADS if self._first else _HEADS
        # (the end of a reply that only began a header's opening is text: a marker is one token, never cut)
        if not self._plain and lead and not lead.startswith(heads) and (final or not any(h.startswith(lead) for h in heads)):
            self._plain = True  # not the format: the text as written (its later markers still end what it says)
        if self._plain and not lead.startswith(heads):
            self._kind = CONTENT
            return buf
        cut = buf.find(MESSAGE)
        stray, closer = _first(buf, (END, RETURN, CALL))
        if stray >= 0 and (cut < 0 or stray < cut):  # a header closed without a body: nothing of it is said
            self._first = False
            return self._header(buf[stray + len(closer):], final, out) if buf[stray + len(closer):] else ""
        if cut < 0:
            if final:  # a header the reply was cut in: nothing of it is said
                return ""
            self._buf = buf
            return ""
        self._first = False
        self._kind = self._kind_of(buf[:cut], out)
        return buf[cut + len(MESSAGE):]

    def _kind_of(self, header: str, out: list[tuple[str, str]]) -> str:
        """What a message with ``header`` is; a call is announced in ``out``."""
        to = _RECIPIENT.search(header)
        if to is not None:
            if not to.group(1).startswith("functions."):  # a built-in tool's (browser.search, python): none runs
                return _DROP  # here, and vLLM's chat drops it too (neither a function call nor the final channel)
            name = to.group(1).removeprefix("functions.")
            if name not in self.names:
                return CONTENT  # (a call the request cannot take: its arguments are shown as other formats show them)
            self.calls += 1
            if self.calls > 1 and not self.parallel:
                return _DROP
            out.append((CALLED, name))
            return ARGUMENTS
        channel = _CHANNEL.search(header)
        return REASONING if channel is not None and channel.group(1) == "analysis" else CONTENT

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if text and self._kind not in (None, _DROP):
            out.append((self._kind, text))  # type: ignore[arg-type]


class HarmonySplit:
    """One harmony reply's text as ``(thinking, answer)`` pairs of new text, as ThinkSplitter.feed gives them (the
    in-process client's split: it has no tools)."""

    def __init__(self) -> None:
        self.parser = HarmonyParser()

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The thinking and answer text ``text`` releases (``final``: nothing follows it)."""
        pieces = self.parser.feed(text, final)
        return ("".join(t for k, t in pieces if k == REASONING), "".join(t for k, t in pieces if k == CONTENT))


class HarmonyDeltas:
    """Streams one choice of a harmony model as chat ``delta`` objects (``ToolDeltas.deltas``'s shape)."""

    looping = False  # (no tool grammar binds it: ForcedLoops never ends it early)

    def __init__(self, names: Iterable[str] = (), parallel: bool = True, legacy: bool = False, named: bool = False):
        self.parser = HarmonyParser(names, parallel)
        self.legacy = legacy  # the request gave legacy ``functions``: calls go out as ``function_call`` pieces
        # a reply forced to call one named function ends "stop", as api.openai.com ends it (ToolDeltas.called)
        self.called = "stop" if named else "tool_calls"
        self._index = -1

    def deltas(self, text: str, finish: str | None, stop_string: bool = False) -> list[tuple[dict[str, Any], str | None]]:
        """``(delta, finish_reason)`` pairs for a new piece of text; the last pair finishes when ``finish`` is set
        (``tool_calls`` for a reply that called, as the model ends it with ``<|call|>``)."""
        out: list[tuple[dict[str, Any], str | None]] = []
        for kind, value in self.parser.feed(text, final=finish is not None):
            if kind == REASONING:
                out.append(({"reasoning": value, "reasoning_content": value}, None))
            elif kind == CONTENT:
                out.append(({"content": value}, None))
            elif kind == CALLED:
                self._index += 1
                fn = {"name": value, "arguments": ""}
                out.append(({"tool_calls": [{"index": self._index, "id": new_call_id(), "type": "function", "function": fn}]}, None))
            else:
                out.append(({"tool_calls": [{"index": self._index, "function": {"arguments": value}}]}, None))
        if finish is not None:
            out.append(({}, self.called if self._index >= 0 and finish == "stop" and not stop_string else finish))
        return [legacy_delta(d, r) for d, r in out] if self.legacy else out


def harmony_message(text: str, finish: str, names: Iterable[str], parallel: bool, stop_string: bool = False,
                    named: bool = False) -> tuple[dict[str, Any], str]:
    """The ``message`` and ``finish_reason`` of one choice's whole text: what a client assembles from its stream."""
    thought, content, calls, reason = "", "", [], finish
    for delta, end in HarmonyDeltas(names, parallel, named=named).deltas(text, finish, stop_string):
        thought += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        for frag in delta.get("tool_calls", ()):
            if "id" in frag:
                calls.append({k: frag[k] for k in ("id", "type")} | {"function": dict(frag["function"])})
            else:
                calls[-1]["function"]["arguments"] += frag["function"]["arguments"]
        reason = end or reason
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if thought or calls else ""),
                               "refusal": None, "reasoning": thought or None, "reasoning_content": thought or None}
    if calls:
        message["tool_calls"] = calls
    return message, reason


class HarmonyTally:
    """Counts a request's thinking tokens (``reasoning_tokens``): those of its ``analysis`` messages, headers and
    markers included, told apart by token id however the engine grouped them."""

    def __init__(self, ids: dict[str, int], decode: Callable[[Sequence[int]], str], n: int):
        self._message, self._closers = ids[MESSAGE], {ids[m] for m in (END, RETURN, CALL, START)}
        self._start = ids[START]
        self._decode = decode
        self._heads: list[list[int]] = [[] for _ in range(n)]  # each choice's header so far (None: in a body)
        self._in: list[bool | None] = [None] * n  # in a body: an analysis one (True) or another; None: a header
        self.tokens = 0

    @classmethod
    def of(cls, model: Any, n: int) -> "HarmonyTally | None":
        """The tally for ``model``'s replies; None where its tokenizer has not every marker as one token."""
        ids = {m: model.tokenize(m, add_special_tokens=False) for m in MARKERS}
        if any(len(i) != 1 for i in ids.values()) or getattr(model, "detokenize", None) is None:
            return None
        return cls({m: i[0] for m, i in ids.items()}, model.detokenize, n)

    def count(self, index: int, text: str, ids: Sequence[int], final: bool) -> None:
        """Feed choice ``index``'s next tokens ``ids`` (``text``, ``final``: as ReasoningTally takes them)."""
        for token in ids:
            body = self._in[index]
            if body is None:
                self._heads[index].append(token)
                if token == self._message:
                    head = self._heads[index]
                    self._in[index] = "analysis" in self._decode(head) and "to=" not in self._decode(head)
                    self.tokens += len(head) if self._in[index] else 0
                    self._heads[index] = []
            else:
                self.tokens += body
                if token in self._closers:
                    self._in[index] = None
                    self._heads[index] = [token] if token == self._start else []
                    self.tokens -= body and token == self._start  # (it heads the next message)
