"""Function calling for one chat request: the small interface serving.py delegates to."""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable, Sequence

from ..backends.grammar_prefix import KINDS as PREFIX_KINDS
from ..core.errors import InvalidRequest
from ..core.types import ChatMessage, Constraint
from .harmony import END as HARMONY_END
from .harmony import MARKERS as HARMONY_MARKERS
from .harmony import HarmonyDeltas, HarmonyTally, call_grammar, calls_or_final, harmony_message, in_final, is_harmony
from .legacy_functions import check_legacy_history, in_legacy_terms, legacy_delta, legacy_message, request_tool_config
from .offload import off_loop_if
from .reasoning import Reasoning, ReasoningTally, ThinkingDeltas, kept_markers, wanted
from .tool_parser import HERMES, MISTRAL, MISTRAL_V11, StreamingToolParser, detect_family, parse_tool_calls
from .tool_scan import cut_call
from .tools import (ToolConfig, args_schema, calls_or_answer, nine_char_ids, one_call_per_turn, prepare_messages,
                    template_supports_tools, tool_constraint)

#: each format's tool-call markup, which some tokenizers make special tokens (Mistral's own; Hermes-2-Pro's
#: ``<tool_call>``): decoding skips those unless told (``markup_tokens``)
MARKUP = {MISTRAL: ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"), HERMES: ("<tool_call>", "</tool_call>")}
MARKUP[MISTRAL_V11] = MARKUP[MISTRAL]
#: how the grammar compiler's message for one schema starts; the tool's name says it instead
_COMPILER_PREFIX = re.compile(r"^Invalid (json_schema constraint|JSON schema): ")
#: compiles a constraint for the request's model, a 400 naming the param where it cannot (serving's engine check)
Check = Callable[[Constraint, str], Awaitable[None]]


class ToolCalling:
    """What tools change in one chat completion: prompt, decoding constraint and response shape."""

    def __init__(self, cfg: ToolConfig, template: str | None, legacy: bool = False):
        self.cfg = cfg
        #: the request gave legacy ``functions``: replies carry ``function_call`` (legacy_functions.py)
        self.legacy = legacy
        self.native = template_supports_tools(template)
        # Our fallback prompt and our grammar both use the Hermes format.
        self.family = detect_family(template) if self.native and not cfg.constrained else HERMES
        #: calls are decoded under a tool grammar (forced, or beside a response_format: tools.calls_or_answer), so
        #: a call repeating an earlier one can only be followed by more calls: the reply ends there (ForcedLoops)
        self.bound = cfg.constrained
        #: a Mistral template, which takes only 9-character tool call ids (tools.nine_char_ids)
        self.short_ids = self.native and "[TOOL_CALLS]" in (template or "")
        #: a Llama 3.x template, which takes one call per assistant message (tools.one_call_per_turn)
        self.one_call = self.native and "single tool-call" in (template or "")
        #: how replies are split into thinking and answer (reasoning.py; serving sets it once the prompt is known)
        self.reasoning: Reasoning | None = None
        #: thinking markers kept in the text while it is not split (reasoning_format "none"): as markup_tokens
        self.kept: tuple[str, ...] = ()
        #: a harmony template's (gpt-oss): replies are read as its messages (harmony.py), not by the parsers here
        self.harmony = is_harmony(template)
        self._model: Any = None  # the loaded model: its marker ids make a harmony reply's grammar, count its thinking
        #: the request field the decoding grammar came from (``decoding``), which a 400 about it names
        self._param = "response_format"

    @classmethod
    def from_request(cls, req: Any, model: Any) -> "ToolCalling":
        """Validate the request's tool fields (400 on mistakes) against ``model``'s template."""
        extra = getattr(req, "model_extra", None) or {}  # legacy functions and function_call (legacy_functions.py)
        cfg, legacy = request_tool_config(req.tools, req.tool_choice, req.parallel_tool_calls, extra)
        if legacy:  # (not at parse time: protocol.py is at its size limit)
            check_legacy_history(req.messages)
        template = getattr(model, "chat_template", lambda: None)()
        calling = cls(cfg, template, legacy)
        calling._model = model
        return calling

    @property
    def active(self) -> bool:
        """True when the output is parsed for tool calls."""
        return self.cfg.active

    @property
    def parses(self) -> bool:
        """True when the output goes through a parser (tool calls, or thinking split from the answer)."""
        return self.cfg.active or self.reasoning is not None or self.harmony

    @property
    def markup_tokens(self) -> tuple[str, ...]:
        """Special tokens the decoded text must keep for the tool parser (``GenerationParams.keep_special``): the
        format's markup while its calls are parsed (grammar-forced ones too), as vLLM's Mistral and Hermes parsers
        turn ``skip_special_tokens`` off; else none, so they never reach content of a reply whose calls are not
        parsed. Only tokens the vocabulary has as special ones change anything (Qwen's ``<tool_call>`` is not)."""
        if self.harmony:
            return HARMONY_MARKERS
        own = MARKUP.get(self.family, ()) if self.active else ()
        return own + (self.reasoning.markers if self.reasoning is not None else self.kept)  # (Magistral's [THINK] too)

    async def decoding(self, answer: Constraint | None, answer_param: str, check: Check,
                       request_tools: Sequence[Any] | None) -> Constraint | None:
        """The grammar the reply is decoded under, compiled by ``check(constraint, param)`` (a bad one is a plain 400):
        forced tool calls' (they win over the request's ``answer`` format), the format widened to admit the calls the
        model may make beside it (tools.calls_or_answer), or the format alone."""
        constraint = self.constraint() or (calls_or_final(self.cfg, answer, self._model) if self.harmony
                                           else calls_or_answer(self.cfg, answer, self.family == HERMES))
        self.bound = constraint is not None and constraint is not answer  # a tool grammar (a choice's is Lark too)
        if constraint is None:
            return None
        try:
            await check(constraint, "tools" if self.cfg.constrained else answer_param)
        except InvalidRequest as failed:
            if not self.bound:
                raise
            if self.cfg.constrained:
                raise await self.at_fault(lambda c: check(c, "tools"), request_tools, failed) from None
            # beside a format: the format's own fault is its 400 as without tools (not the Lark grammar quoted);
            # a tool schema the grammar cannot take leaves the format alone, as before calls were admitted beside
            # it (auto tools' schemas are not enforced without a format either), so such an agent keeps working
            await check(answer, answer_param)
            constraint, self.bound = answer, False
        self._param = "tools" if self.cfg.constrained else answer_param
        return constraint

    async def think(self, model: Any, prompt: Sequence[int], extra: dict[str, Any] | None,
                    constraint: Constraint | None, check: Check) -> Constraint | None:
        """Set how replies to ``prompt`` are split into thinking and answer (``Reasoning.of``), or which markers they
        keep as text when the request turns the split off; the grammar the reply is decoded under, after any thinking
        (``Reasoning.around``: compiled by ``check`` too, not on the model's step thread)."""
        forced, self._model = self.cfg.constrained, model
        if self.harmony:  # (its thinking is a message of its own, before the final one the grammar shapes)
            wanted(extra)  # (a reasoning_format it does not know is still a 400)
            after = in_final(constraint, model) if constraint is not None else None
            if after is not constraint:
                await check(after, self._param)
            return after
        # a grammar the client wrote is compiled to be read for the opening marker (grammar_prefix.can_begin): on a
        # worker thread, as the engine compiles grammars, not on the IOLoop every stream shares
        read = constraint is not None and not forced and constraint.kind in PREFIX_KINDS
        self.reasoning = await off_loop_if(read, lambda: Reasoning.of(model, prompt, extra, forced=forced,
                                                                      constraint=constraint))
        self.kept = kept_markers(model, extra, forced=forced) if self.reasoning is None else ()
        after = self.reasoning.around(constraint) if self.reasoning is not None and constraint is not None else constraint
        if after is not constraint:
            await check(after, self._param)
        return after

    def prompt(self, messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
        """Messages and ``tools`` for the chat template."""
        shown = nine_char_ids(messages) if self.short_ids else list(messages)
        return prepare_messages(one_call_per_turn(shown) if self.one_call else shown, self.cfg, self.native)

    def constraint(self) -> Constraint | None:
        """The grammar that forces tool calls (``required`` or a named function), else None."""
        if self.harmony and self.cfg.constrained:  # (its calls are commentary messages, not Hermes blocks)
            grammar = call_grammar(self.cfg.callable_tools(), self._model) if self._model is not None else None
            if grammar is None:
                field = "function_call" if self.legacy else "tool_choice"
                raise InvalidRequest(f"This model's tokenizer lacks harmony's markers as tokens: it cannot be forced "
                                     f"to call a tool; use {field} 'auto'.", param=field, code="unsupported_value")
            return grammar
        return tool_constraint(self.cfg)

    async def at_fault(self, check: Callable[[Constraint], Awaitable[None]], request_tools: Sequence[Any] | None,
                       failed: InvalidRequest) -> InvalidRequest:
        """The 400 for a forcing grammar that did not compile (``failed``): the first tool whose arguments' schema alone
        fails ``check``, named as OpenAI names a bad schema (``tools[i].function.parameters``); ``failed`` when none
        does. Its message quoted the Lark grammar the schemas were compiled into; only run on that error path."""
        for spec in self.cfg.callable_tools():
            try:
                await check(Constraint("json_schema", json.dumps(args_schema(spec.parameters), sort_keys=True)))
            except InvalidRequest as own:
                index = next((i for i, t in enumerate(request_tools or ()) if isinstance(t, dict)
                              and isinstance(t.get("function"), dict) and t["function"].get("name") == spec.name), 0)
                code = own.code if own.code == "constraint_failed" else "invalid_function_parameters"
                named = InvalidRequest(f"Invalid schema for function {spec.name!r}: {_COMPILER_PREFIX.sub('', own.message)}",
                                       param=f"tools[{spec.index if self.legacy else index}].function.parameters", code=code)
                return in_legacy_terms(named) if self.legacy else named
        return failed

    def message(self, text: str, finish: str, stop_string: bool = False) -> tuple[dict[str, Any], str]:
        """The response ``message`` and ``finish_reason`` for one choice's full text (``stop_string``: a stop string
        of the request ended it)."""
        if self.harmony:
            message, reason = harmony_message(text, finish, self.cfg.names if self.active else (), self.cfg.parallel,
                                              stop_string, named=self.cfg.choice == "function")
            return legacy_message(message, reason) if self.legacy else (message, reason)
        thought = None
        if self.reasoning is not None:  # calls are read from the answer only
            thought, text = self.reasoning.split(text)
        message, reason = self._message(text, finish, stop_string)
        if self.reasoning is not None:
            if thought is not None and message["content"] == "":
                message["content"] = None  # all thinking (cut by max_tokens): no answer, as vLLM says it
            # an empty block is no thinking, as its stream sends none (and Responses open no reasoning item for it)
            message["reasoning"] = message["reasoning_content"] = thought or None
        return legacy_message(message, reason) if self.legacy else (message, reason)

    def _message(self, text: str, finish: str, stop_string: bool) -> tuple[dict[str, Any], str]:
        if not self.active:
            return {"role": "assistant", "content": text, "refusal": None}, finish
        if self.cfg.constrained:
            # what the stream says, by construction: a forced call cut by max_tokens or a stop string keeps its
            # partial arguments (finish length or stop), as the stream already sent them
            return self._as_streamed(text, finish, stop_string)
        # under a tool grammar what follows a repeated call is more of them (the stream ended there: ToolDeltas)
        parsed = parse_tool_calls(text, self.cfg.names, self.family, forced=self.bound)
        calls = list(parsed.calls if self.cfg.parallel else parsed.calls[:1])
        if not calls:
            return {"role": "assistant", "content": text, "refusal": None}, finish
        message = {"role": "assistant", "content": parsed.content, "refusal": None, "tool_calls": [c.wire() for c in calls]}
        cut = stop_string and cut_call(text, self.cfg.names)  # a stop string ended it inside a call
        # a repeat ends the reply with its calls, as the stream ends it, even when its last token was max_tokens' last
        return message, "tool_calls" if (finish == "stop" and not cut) or parsed.repeated else finish

    def _as_streamed(self, text: str, finish: str, stop_string: bool) -> tuple[dict[str, Any], str]:
        """The ``message`` a client assembles from this text's stream, and its finish_reason."""
        content, calls, reason = "", {}, finish
        for delta, end in self._deltas().deltas(text, finish, stop_string):
            content += delta.get("content") or ""
            for frag in delta.get("tool_calls", []):
                call = calls.setdefault(frag["index"], {"id": frag.get("id"), "type": "function",
                                                        "function": {"name": frag["function"].get("name"), "arguments": ""}})
                call["function"]["arguments"] += frag["function"].get("arguments") or ""
            reason = end or reason
        # forced output has no content: cut before a call's name is known, the reply is empty (finish length)
        message: dict[str, Any] = {"role": "assistant", "content": content.strip() or None, "refusal": None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return message, reason

    def streamer(self) -> "ToolDeltas":
        """A per-choice converter of text pieces into chat ``delta`` objects (legacy ``function_call`` ones for functions)."""
        if self.harmony:
            return HarmonyDeltas(self.cfg.names if self.active else (), self.cfg.parallel, self.legacy,  # type: ignore[return-value]
                                 named=self.cfg.choice == "function")
        inner = self._deltas(self.legacy) if self.active else None
        return ThinkingDeltas(self.reasoning.splitter(), inner) if self.reasoning is not None else inner  # type: ignore[return-value]

    @property
    def think_end(self) -> str | None:
        """The text that ends a reply's thinking (a streamed thinking piece's logprobs are its tokens before it)."""
        if self.harmony:
            return HARMONY_END
        return self.reasoning.end if self.reasoning is not None else None

    def tally(self, n: int) -> ReasoningTally | HarmonyTally:
        """A counter of the thinking tokens of the request's ``n`` choices (``usage``'s ``reasoning_tokens``)."""
        if self.harmony and self._model is not None:
            return HarmonyTally.of(self._model, n) or ReasoningTally(None, n)
        return ReasoningTally(self.reasoning, n)

    def _deltas(self, legacy: bool = False) -> "ToolDeltas":
        parser = StreamingToolParser(self.cfg.names, self.family, held=self.cfg.constrained)
        return ToolDeltas(parser, self.cfg.parallel, legacy, self.bound, named=self.cfg.choice == "function")


class ToolDeltas:
    """Streams one choice: content deltas, and tool-call fragments shaped as OpenAI sends them."""

    def __init__(self, parser: StreamingToolParser, parallel: bool, legacy: bool = False, bound: bool = False,
                 named: bool = False):
        self.parser = parser
        # a reply forced to call one named function ends "stop", as api.openai.com (and vLLM) end it; required and
        # auto calls end "tool_calls" (legacy: "function_call")
        self.called = "stop" if named else "tool_calls"
        self.bound = bound or parser.forced  # decoded under a tool grammar (ToolCalling.bound)
        self.parallel = parallel
        self.legacy = legacy  # tool-call pieces go out as legacy ``function_call`` pieces

    @property
    def looping(self) -> bool:
        """True once a reply decoded under a tool grammar repeats a call it already made: the rest would be more
        of the same (serving ends the choice there, with finish_reason ``tool_calls``)."""
        return self.bound and self.parser.repeats > 0

    def deltas(self, text: str, finish: str | None, stop_string: bool = False) -> list[tuple[dict[str, Any], str | None]]:
        """``(delta, finish_reason)`` pairs for a new piece of text; the last pair finishes when ``finish`` is set
        (``stop_string``: a stop string of the request ended the text)."""
        out = self._pairs(text, finish, stop_string)
        return [legacy_delta(d, r) for d, r in out] if self.legacy else out

    def _pairs(self, text: str, finish: str | None, stop_string: bool) -> list[tuple[dict[str, Any], str | None]]:
        if finish is None and self.parser.passes(text):  # most pieces of a text reply: what feed would make of it
            return [({"content": text}, None)]
        out = [(d, None) for d in self._deltas(self.parser.feed(text))] if text else []
        if finish is not None:
            if not self.looping:  # (after a repeat under a tool grammar comes only the start of another call)
                out.extend((d, None) for d in self._deltas(self.parser.finish()))
            # Unforced calls are announced only once complete and valid, so the full response has them too.
            # A forced reply that repeated a call is complete at the repeat, even if max_tokens came next.
            # A stop string may fall inside a call (stop "}"): the reply keeps it as far as it got and finishes
            # stop. Matched after complete calls (or at a call's closing tag), it ended a reply of calls to run.
            done = (finish == "stop" and not (stop_string and self.parser.cut)) or self.looping
            out.append(({}, self.called if self.parser.calls and done else finish))
        return out

    def _deltas(self, events: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in events:
            if ev.content is not None:
                out.append({"content": ev.content})
            elif not self.parallel and ev.index > 0:
                continue  # one call asked for: later ones are dropped, as in the full response
            elif ev.id is not None:
                fn = {"name": ev.name, "arguments": ""}
                out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function", "function": fn}]})
            elif ev.arguments:
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})
        return out
