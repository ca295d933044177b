"""Reasoning models' thinking split from their answer, as vLLM's ``--reasoning-parser`` and llama.cpp's
``reasoning_format`` split it.

Qwen3, QwQ, DeepSeek-R1 (and its distills) and SmolLM3 write ``<think>...</think>`` before the answer; Mistral's
Magistral writes ``[THINK]...[/THINK]`` as special tokens. The thinking goes to the message's ``reasoning`` (vLLM's
name since it followed OpenAI's guidance) and ``reasoning_content`` (DeepSeek's, which llama.cpp, LangChain and
most clients read), the rest to ``content``. Which markers a model uses is read from its chat template, as the
tool-call format is (tool_call.detect_family): a template naming neither leaves every reply as it was, and a reply
that does not begin with the opening marker is untouched, unless the prompt itself ends inside an opened block
(DeepSeek-R1's template, Qwen3-Thinking's): then the reply starts in the thinking. A grammar (response_format, a
guided field, forced tool calls) applies after the thinking, which the model writes freely first
(``Reasoning.around``, backends/think_grammar.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..backends.grammar_prefix import can_begin
from ..core.errors import InvalidRequest
from ..core.types import Constraint

THINK = ("<think>", "</think>")
MAGISTRAL = ("[THINK]", "[/THINK]")
#: llama.cpp's per-request switch: "none" leaves the thinking in ``content``; the others split it
FIELD = "reasoning_format"
_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
#: how many tokens (whitespace) a prompt may have after the opening marker it ends with
_TAIL = 4
_UNDECIDED, _THINKING, _ANSWER = 0, 1, 2


def markers_of(template: str | None) -> tuple[str, str] | None:
    """The thinking markers a chat template's model writes (None: it names none, replies are left alone)."""
    if not template:
        return None
    if "[THINK]" in template:
        return MAGISTRAL
    if "<think>" in template or "</think>" in template:
        return THINK
    return None


def wanted(extra: dict[str, Any] | None) -> bool:
    """False when the request's ``reasoning_format`` (llama.cpp's) is "none"; a value it does not know is a 400."""
    value = (extra or {}).get(FIELD)
    if value is None:
        return True
    if value not in _FORMATS:
        raise InvalidRequest(f"Invalid value for '{FIELD}': expected one of {', '.join(map(repr, _FORMATS))}.",
                             param=FIELD, code="invalid_value")
    return value != "none"


def kept_markers(model: Any, extra: dict[str, Any] | None, *, forced: bool) -> tuple[str, ...]:
    """The thinking markers a reply keeps as text where the request turns the split off (``reasoning_format``
    "none", which leaves llama.cpp's ``<think>`` in content): decoding else drops special ones (Magistral's)."""
    if forced or wanted(extra):
        return ()
    return markers_of(getattr(model, "chat_template", lambda: None)()) or ()


@dataclass(frozen=True)
class Reasoning:
    """How one request's replies are split: the markers, and whether its prompt already opened the thinking."""

    start: str
    end: str
    #: the prompt ends inside an opened block (DeepSeek-R1's template): replies begin in the thinking
    opened: bool = False
    #: the end marker's token id where it is one token (thinking tokens are counted up to it exactly)
    end_id: int | None = None
    #: the end marker's token ids (several: thinking tokens are counted up to them where the model spells it so)
    end_ids: tuple[int, ...] = ()
    #: the reply is decoded under a grammar it may think before, freely: the grammar applies after the end marker
    #: (``around``); False where no grammar applies, or one applies from the first token
    free: bool = False
    #: the model's ``detokenize``: the tally finds the end marker in the text of a delta's tokens where the model spelt
    #: it in other tokens than ``end_ids``
    decode: Callable[[Sequence[int]], str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: Any, prompt: Sequence[int], extra: dict[str, Any] | None, *, forced: bool,
           constraint: Constraint | None = None) -> "Reasoning | None":
        """The split for a chat request to loaded ``model`` with prompt ids ``prompt`` (None: no split).

        ``constraint``: the grammar the reply is decoded under (response_format, a guided field, a tool grammar). The
        model may think first, as without one, and the grammar applies after its thinking (``free``, as vLLM's
        reasoning parsers start it), unless the request turns thinking off (``enable_thinking: false``, or a prompt
        that closed an empty block) or the grammar writes the opening marker itself: then it shapes the reply from
        the first token, which is not taken as thinking even where the prompt opened a block (what it writes between
        markers is still split). ``forced``: its tool calls are forced (``constraint`` is their grammar); from the
        first token there is no thinking to split.
        """
        if not wanted(extra):
            return None
        markers = markers_of(getattr(model, "chat_template", lambda: None)())
        tokenize = getattr(model, "tokenize", None)
        if markers is None or tokenize is None:
            return cls(*markers) if markers is not None and not forced else None
        start, end = (tuple(tokenize(m, add_special_tokens=False)) for m in markers)
        free = (constraint is not None and not _thinking_off(extra) and not _ends_with(model, prompt, end)
                and not _writes(constraint, markers[0], start, read=not forced))
        if forced and not free:
            return None
        opened = (free or constraint is None) and _ends_with(model, prompt, start, without=end)
        return cls(*markers, opened=opened, end_id=end[0] if len(end) == 1 else None, end_ids=end, free=free,
                   decode=getattr(model, "detokenize", None))

    def around(self, constraint: Constraint) -> Constraint:
        """``constraint`` as the backend applies it: after the thinking where the reply may think first (``free``)."""
        return replace(constraint, think=self.markers, opened=self.opened) if self.free else constraint

    @property
    def markers(self) -> tuple[str, str]:
        """The two markers, which decoding keeps where the tokenizer has them as special tokens (Magistral's)."""
        return (self.start, self.end)

    def splitter(self) -> "ThinkSplitter":
        """A new per-choice splitter."""
        return ThinkSplitter(self.start, self.end, self.opened)

    def split(self, text: str) -> tuple[str | None, str]:
        """``(reasoning, answer)`` of a whole reply; reasoning is None when it has none."""
        splitter = self.splitter()
        thought, answer = splitter.feed(text, final=True)
        return (thought if splitter.began else None), answer


def _ends_with(model: Any, prompt: Sequence[int], marker: tuple[int, ...], without: tuple[int, ...] = ()) -> bool:
    """True when ``prompt`` ends with ``marker``'s ids, whitespace after it allowed (not ``without``'s ids): the
    opening marker (the reply begins in the thinking), or the end one (the template closed an empty block)."""
    tail = tuple(prompt[-(len(marker) + _TAIL):])
    for i in range(len(tail) - len(marker), -1, -1):
        if marker and tail[i:i + len(marker)] == marker:
            rest = tail[i + len(marker):]
            return not rest or (not _contains(rest, without) and not model.detokenize(rest).strip())
    return False


def _thinking_off(extra: dict[str, Any] | None) -> bool:
    """True when the request's ``chat_template_kwargs`` turn thinking off (Qwen3's ``enable_thinking``, DeepSeek-V3.1's
    ``thinking``), whether or not the template reads them (Magistral's does not)."""
    kwargs = (extra or {}).get("chat_template_kwargs")
    return isinstance(kwargs, dict) and any(kwargs.get(k) is False for k in ("enable_thinking", "thinking"))


def _writes(constraint: Constraint, start: str, start_ids: tuple[int, ...], read: bool = True) -> bool:
    """True when grammar ``constraint`` (a Lark, GBNF or regex one) writes the opening marker itself, as text or by
    its token id (``<[ID]>``): it shapes the thinking too, so it applies from the first token. ``read``: also where
    its source spells the marker otherwise (a regex's ``\\[THINK\\]``) and it lets the reply begin with it (llguidance
    reads the grammar: grammar_prefix.can_begin); not for serving's own tool grammars."""
    spec = constraint.spec if constraint.kind in ("lark", "grammar", "regex") else ""
    return (start in spec or (len(start_ids) == 1 and f"<[{start_ids[0]}]>" in spec)
            or (read and bool(spec) and can_begin(constraint, start)))


def _contains(ids: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return bool(part) and any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _partial(text: str, marker: str) -> int:
    """The length of ``text``'s longest end that begins ``marker`` (held back: the marker may be arriving)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def thinking_share(entries: Sequence[dict[str, Any]], end: str) -> int:
    """How many of a choice's held token logprob ``entries`` (oldest first) are the thinking's own: those wholly
    before the end marker ``end``, less any at the end that may be the marker's beginning or are trailing whitespace
    (ThinkSplitter holds that back: it may end the thinking). The rest ride on the choice's next piece (the marker's
    and the answer's on the answer's first), however the engine grouped the tokens: one token a delta holds the
    whitespace back alone too."""
    text, ends = "", []
    for entry in entries:
        text += entry.get("token") or ""
        ends.append(len(text))
    cut = text.find(end)
    if cut < 0:
        cut = len(text) - _partial(text, end)
    cut = len(text[:cut].rstrip())
    return sum(1 for e in ends if e <= cut)


class ThinkSplitter:
    """One choice's text as it streams, split into thinking and answer; the markers never reach either.

    A marker split over pieces is held until it is whole. The thinking's leading and trailing whitespace and the
    answer's leading whitespace (the template's line breaks around the markers) are dropped, the same whole or
    streamed.
    """

    def __init__(self, start: str, end: str, opened: bool = False):
        self.start, self.end = start, end
        self.state = _THINKING if opened else _UNDECIDED
        #: the reply had thinking (began with the marker, or the prompt opened it)
        self.began = opened
        self._held = ""
        self._lead = True  # the thinking's leading whitespace is still to drop
        self._after = False  # the answer's leading whitespace (after the end marker) is still to drop

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """``(thinking, answer)`` text released by ``text``; ``final``: nothing follows."""
        buf, self._held = self._held + text, ""
        if self.state == _UNDECIDED:
            lead = buf.lstrip()
            if lead.startswith(self.start):
                self.state, self.began, buf = _THINKING, True, lead[len(self.start):]
            elif self.start.startswith(lead) and not final:  # only whitespace, or the marker's beginning, so far
                self._held = buf
                return "", ""
            else:
                self.state = _ANSWER  # no thinking: the text as written
                return "", buf
        thought = ""
        if self.state == _THINKING:
            cut = buf.find(self.end)
            if cut < 0:
                keep = 0 if final else _partial(buf, self.end)
                thought, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
                return self._trimmed(thought, final), ""
            thought, buf = self._trimmed(buf[:cut], True), buf[cut + len(self.end):]
            self.state, self._after = _ANSWER, True
        if self._after:
            buf = buf.lstrip()
            self._after = not buf
        return thought, buf

    def _trimmed(self, thought: str, last: bool) -> str:
        """``thought`` without the thinking's leading whitespace, its trailing whitespace held (dropped when
        ``last``) until more thinking follows it."""
        if self._lead:
            thought = thought.lstrip()
            self._lead = not thought
        body = thought.rstrip()
        if not last:
            self._held = thought[len(body):] + self._held
        return body


class ThinkingDeltas:
    """Streams one choice of a reasoning model: thinking deltas, then the answer's (through ``inner``, the tool-call
    streamer, when calls are parsed: they are read from the answer only)."""

    def __init__(self, splitter: ThinkSplitter, inner: Any = None):
        self.splitter = splitter
        self.inner = inner

    @property
    def looping(self) -> bool:
        """The tool-call streamer's ``looping`` (ForcedLoops)."""
        return self.inner is not None and self.inner.looping

    def deltas(self, text: str, finish: str | None, stop_string: bool = False) -> list[tuple[dict[str, Any], str | None]]:
        """``(delta, finish_reason)`` pairs for a new piece of text, as ToolDeltas.deltas gives them."""
        thought, answer = self.splitter.feed(text, final=finish is not None)
        out: list[tuple[dict[str, Any], str | None]] = []
        if thought:
            out.append(({"reasoning": thought, "reasoning_content": thought}, None))
        if self.inner is not None:
            return out + (self.inner.deltas(answer, finish, stop_string) if answer or finish is not None else [])
        if answer:
            out.append(({"content": answer}, None))
        if finish is not None:
            out.append(({}, finish))
        return out


class ReasoningTally:
    """Counts a request's thinking tokens (``usage.completion_tokens_details.reasoning_tokens``) as events arrive:
    every token up to the end marker's, of a reply that had thinking."""

    def __init__(self, reasoning: Reasoning | None, n: int):
        self._end = reasoning.end_id if reasoning is not None else None
        # a marker of several tokens: the last ones a choice's earlier pieces ended with (the marker may span two)
        self._ids = reasoning.end_ids if reasoning is not None and len(reasoning.end_ids) > 1 else ()
        self._tails: list[tuple[int, ...]] = [()] * n
        self._marker, self._decode = (reasoning.end, reasoning.decode) if reasoning is not None else ("", None)
        self._texts = [""] * n  # the end of each choice's text so far (the marker may span two pieces)
        self._splitters = [reasoning.splitter() for _ in range(n)] if reasoning is not None else []
        self._counts = [0] * len(self._splitters)
        self._closed = [False] * len(self._splitters)

    def count(self, index: int, text: str, ids: Sequence[int], final: bool) -> None:
        """Feed choice ``index``'s next ``text``, of tokens ``ids`` (``final``: its last)."""
        if not self._splitters or self._closed[index]:
            return
        splitter = self._splitters[index]
        before, self._texts[index] = self._texts[index], (self._texts[index] + text)[1 - len(self._marker):]
        splitter.feed(text, final)
        through = _through(self._tails[index], tuple(ids), self._ids) if self._ids else None
        if through is None and splitter.state == _ANSWER and splitter.began and self._end not in ids:
            through = _spelt_through(self._decode, before, list(ids), self._marker)
        if self._end is not None and self._end in ids:  # (a piece of text may carry tokens after the marker)
            self._counts[index] += list(ids).index(self._end) + 1
            self._closed[index] = True
        elif through is not None:  # (tokens made within one stream interval: the answer's may follow the marker)
            self._counts[index] += through
            self._closed[index] = True
        else:
            self._counts[index] += len(ids)
            if self._ids:
                self._tails[index] = (self._tails[index] + tuple(ids))[1 - len(self._ids):]
        if splitter.state == _ANSWER:  # ended (or never began: then none counts)
            self._closed[index] = True

    @property
    def tokens(self) -> int:
        """Thinking tokens across every choice so far."""
        return sum(c for c, s in zip(self._counts, self._splitters) if s.began)


def _spelt_through(decode: Callable[[Sequence[int]], str] | None, before: str, ids: list[int], marker: str) -> int | None:
    """How many of ``ids`` (the piece the thinking ended in) it takes to write ``marker``'s end, their text decoded
    after ``before`` (the text so far's end); None where that cannot be told."""
    if decode is None or not ids or marker not in before + decode(ids):
        return None
    lo, hi = 1, len(ids)  # the fewest (more write it too)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if marker in before + decode(ids[:mid]) else (mid + 1, hi)
    return lo


def _through(tail: tuple[int, ...], ids: tuple[int, ...], marker: tuple[int, ...]) -> int | None:
    """How many of ``ids`` reach the end of ``marker``'s first place in ``tail + ids`` (``tail``: the tokens before
    them); None where it is not there."""
    seq = tail + ids
    for at in range(len(seq) - len(marker) + 1):
        if seq[at:at + len(marker)] == marker and at + len(marker) > len(tail):
            return at + len(marker) - len(tail)
    return None
