"""A chat history as api.openai.com checks it (tool results answer the calls just before them, names, content)
and each message's content as the text the model sees.

OpenAI refuses a history in which a ``tool`` message answers no call, or an assistant's
``tool_calls`` are left without their results; a model shown such a history sees a call
with no outcome (or an outcome of nothing) and answers from a broken turn. Chat completions
and the Responses API find the first such problem here and word it each in their own terms
(the Responses API's items are translated to chat messages first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from ..core.errors import InvalidRequest, Unsupported
from ..core.types import ChatMessage
from .schema_errors import json_type, shown

if TYPE_CHECKING:
    from .protocol import WireMessage

#: what api.openai.com accepts as a message's ``name`` and a called function's name
NAME_PATTERN = "^[a-zA-Z0-9_-]+$"
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Turn:
    """What the tool check needs of one message: its role, the ids it calls, the id it answers."""

    role: str
    calls: tuple[str, ...] = ()
    answers: str | None = None


@dataclass(frozen=True)
class ToolTurnProblem:
    """The first broken tool exchange of a history.

    ``orphan``: a tool message (at ``index``, answering ``call_ids[0]``) that follows no assistant ``tool_calls``;
    ``unknown_id``: a tool message answering an id (``call_ids[0]``) its turn did not call;
    ``unanswered``: the assistant message at ``index`` has calls (``call_ids``) no tool message answered.
    """

    kind: Literal["orphan", "unknown_id", "unanswered"]
    index: int
    call_ids: tuple[str, ...]


def find_tool_turn_problem(turns: Iterable[Turn]) -> ToolTurnProblem | None:
    """The first broken tool exchange of ``turns``, or None when every call is answered right after it."""
    turn_ids: frozenset[str] = frozenset()  # the calls of the assistant turn the tool messages now answer
    pending: dict[str, None] = {}  # of those, the ones not answered yet (ordered, for the message)
    opened = -1  # index of that assistant message
    in_turn = False
    for i, t in enumerate(turns):
        # Legacy ``function`` results are taken anywhere, as api.openai.com took them (clients trim a call off their
        # memory, or put context in one); one beside an assistant's tool results leaves its turn open.
        if t.role == "function":
            continue
        if t.role == "tool":
            if not in_turn:
                return ToolTurnProblem("orphan", i, (t.answers or "",))
            if t.answers not in turn_ids:
                return ToolTurnProblem("unknown_id", i, (t.answers or "",))
            pending.pop(t.answers, None)
            continue
        if pending:
            return ToolTurnProblem("unanswered", opened, tuple(pending))
        in_turn = t.role == "assistant" and bool(t.calls)
        turn_ids = frozenset(t.calls)
        pending = dict.fromkeys(t.calls)
        opened = i
    if pending:
        return ToolTurnProblem("unanswered", opened, tuple(pending))
    return None


def null_code_error(message: str, param: str) -> InvalidRequest:
    """A 400 with a null ``code``, as api.openai.com sends its checks of a history's messages."""
    exc = InvalidRequest(message, param=param)
    exc.code = None
    return exc


def chat_tool_turn_error(problem: ToolTurnProblem) -> InvalidRequest:
    """Chat completions' 400 for ``problem``, in api.openai.com's words (its typo included: clients match on it)."""
    i = problem.index
    if problem.kind == "orphan":
        return null_code_error(
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
            f"messages[{i}].role")
    if problem.kind == "unknown_id":
        return null_code_error(
            f"Invalid parameter: 'tool_call_id' of {shown(problem.call_ids[0])} not found in 'tool_calls' of previous message.",
            f"messages[{i}].tool_call_id")
    return null_code_error(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. "
        f"The following tool_call_ids did not have response messages: {', '.join(problem.call_ids)}",
        f"messages[{i}].role")


def responses_tool_turn_error(problem: ToolTurnProblem) -> InvalidRequest:
    """The Responses API's 400 for ``problem``, in api.openai.com's words."""
    if problem.kind == "unanswered":
        message = f"No tool output found for function call {problem.call_ids[0]}."
    else:
        message = f"No tool call found for function call output with call_id {problem.call_ids[0]}."
    return null_code_error(message, "input")


def check_name(name: str | None, param: str) -> None:
    """400 unless ``name`` (a message's or a called function's) matches ``NAME_PATTERN``, as OpenAI requires."""
    if name is not None and not _NAME.match(name):
        raise InvalidRequest(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern '{NAME_PATTERN}'.",
            param=param)


def check_history(messages: Sequence[WireMessage]) -> None:
    """400 for what api.openai.com refuses in a history beyond its types: names, a tool message without its
    ``tool_call_id``, tool results that answer no call or calls left unanswered."""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        check_name(m.name, f"{where}.name")
        for j, call in enumerate(m.tool_calls or ()):
            check_name(call.function.name, f"{where}.tool_calls[{j}].function.name")
        if m.function_call is not None:
            check_name(m.function_call.name, f"{where}.function_call.name")
        if m.role == "function" and m.name is None:  # a legacy function result names its function
            raise InvalidRequest(f"Missing required parameter: '{where}.name'.", param=f"{where}.name",
                                 code="missing_required_parameter")
        if m.role == "tool" and m.tool_call_id is None:
            raise null_code_error("Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.",
                                  f"{where}.tool_call_id")
    problem = find_tool_turn_problem(m.turn() for m in messages)
    if problem is not None:
        raise chat_tool_turn_error(problem)


def core_messages(messages: Sequence[WireMessage]) -> list[ChatMessage]:
    """The history as core ``ChatMessage`` objects, legacy function turns as tool turns (see ``core_message``), each
    turn's tool results in the order of its calls (``in_call_order``)."""
    out, call_id = [], None
    for i, m in enumerate(messages):
        message = core_message(m, i, call_id)
        if m.function_call is not None and message.tool_calls:
            call_id = message.tool_calls[-1]["id"]  # what the function results after it answer
        out.append(message)
    return in_call_order(out)


def in_call_order(messages: list[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with the tool results after each assistant's calls sorted into the order of those calls.

    OpenAI takes a turn's results in any order (a client running calls at once appends each as it ends), matching
    them by ``tool_call_id``; chat templates show them by position (Hermes, Qwen and Llama 3.x carry no id), so a
    model read results sent in another order as the answers of the wrong calls."""
    out = list(messages)
    i = 0
    while i < len(out):
        end = i + 1
        while end < len(out) and out[end].role == "tool":
            end += 1
        calls = out[i].tool_calls if out[i].role == "assistant" else None
        if calls and end - i > 2:
            order = {c.get("id"): k for k, c in enumerate(calls)}
            out[i + 1:end] = sorted(out[i + 1:end], key=lambda m: order.get(m.tool_call_id, len(order)))  # (stable)
        i = end
    return out


def core_message(m: WireMessage, i: int, function_call_id: str | None = None) -> ChatMessage:
    """Message ``i`` as a core ``ChatMessage``: its content parts joined to text; null content only where OpenAI
    takes it (an assistant message that calls tools or a function or carries a refusal, a function result) and in
    an assistant message with thinking (``sent_thinking``: a reply cut while it thought comes back so).

    A legacy assistant ``function_call`` becomes one more tool call (id ``call_fn<i>``) and a ``function`` message a
    ``tool`` message answering ``function_call_id`` (the last such call), so chat templates render them as tool turns.
    """
    param = f"messages[{i}].content"
    content = flatten_content(m.content, param, m.role)
    thought = sent_thinking(m, i) if m.role == "assistant" else None
    said = m.tool_calls or m.function_call is not None or thought is not None or isinstance((m.model_extra or {}).get("refusal"), str)
    if content is None and m.role == "function" and "content" in m.model_fields_set:
        content = ""  # the SDK types a function result's content as nullable
    elif content is None and not (m.role == "assistant" and said):
        if "content" not in m.model_fields_set:
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
        raise null_code_error("Invalid value for 'content': expected a string, got null.", param)
    calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
    if m.role == "assistant" and m.function_call is not None:
        legacy = {"id": f"call_fn{i}", "type": "function", "function": m.function_call.model_dump()}
        calls = [*(calls or ()), legacy]
    if m.role == "function":
        return ChatMessage(role="tool", content=content, name=m.name, tool_call_id=function_call_id or f"call_{m.name}")
    return ChatMessage(role=m.role, content=content, name=m.name, tool_calls=calls, tool_call_id=m.tool_call_id,
                       reasoning_content=thought)


def sent_thinking(m: WireMessage, i: int) -> str | None:
    """Assistant message ``i``'s thinking sent back: its ``reasoning_content`` (DeepSeek's name), else ``reasoning``
    (vLLM's). It reaches the chat template as vLLM passes it: Qwen3's shows the thinking of the turns after the last
    user message (a tool-call chain's). Null is absent; another non-string is a 400 naming the field."""
    extra = m.model_extra or {}
    for key in ("reasoning_content", "reasoning"):
        value = extra.get(key)
        if value is not None and not isinstance(value, str):
            param = f"messages[{i}].{key}"
            raise InvalidRequest(f"Invalid type for '{param}': expected a string, but got {json_type(value)} instead.",
                                 param=param, code="invalid_type")
    thought = extra.get("reasoning_content")
    return thought if thought is not None else extra.get("reasoning")


#: the content part types api.openai.com takes in each role's messages (chat); only text (and an assistant's
#: refusal) is served here, the others are refused as unsupported rather than as unknown
_PART_TYPES = {
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
}
_TEXT_ONLY = ("text",)


def _supported(kinds: tuple[str, ...]) -> str:
    """``'a', 'b', and 'c'`` as OpenAI lists supported values."""
    quoted = [repr(k) for k in kinds]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def flatten_content(content: Any, param: str, role: str = "user") -> str | None:
    """A message's content as one string; only text parts (and an assistant's refusal parts) are accepted."""
    if content is None or isinstance(content, str):
        return content
    if not content:
        raise InvalidRequest(f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array "
                             "instead.", param=param, code="empty_array")
    allowed = _PART_TYPES.get(role, _TEXT_ONLY)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        where = f"{param}[{j}]"
        if kind is None:
            raise InvalidRequest(f"Missing required parameter: '{where}.type'.", param=f"{where}.type",
                                 code="missing_required_parameter")
        if kind not in allowed:
            raise InvalidRequest(f"Invalid value: {shown(kind)}. Supported values are: {_supported(allowed)}.", param=f"{where}.type")
        if kind not in ("text", "refusal"):
            raise Unsupported(f"Content parts of type '{kind}' are not supported by this model", param=f"{where}.type")
        # a refusal part is what the assistant said (an SDK sends back the message it was given)
        texts.append(part_text(part, kind, f"{where}.{kind}"))
        check_cache_breakpoint(part.get("prompt_cache_breakpoint"), f"{where}.prompt_cache_breakpoint")
    return "\n".join(texts)


#: ``prompt_cache_breakpoint``'s fields and their values, as the openai SDK types a content part's (``mode`` required)
_BREAKPOINT_VALUES = {"mode": ("explicit",), "ttl": ("30m", "12h")}


def check_cache_breakpoint(value: Any, param: str) -> None:
    """A 400 naming ``param`` unless a content part's ``prompt_cache_breakpoint`` has the SDK's shape.

    It is a hint to api.openai.com's prompt cache (this server's prefix reuse needs none), so a well-formed one
    changes nothing here; a wrongly typed one is refused as OpenAI refuses it, rather than taken as anything.
    Null is taken as absent, as for the request's own optional fields; unknown keys are tolerated likewise.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid type for '{param}': expected an object, but got {json_type(value)} instead.",
                             param=param, code="invalid_type")
    if value.get("mode") is None:
        raise InvalidRequest(f"Missing required parameter: '{param}.mode'.", param=f"{param}.mode",
                             code="missing_required_parameter")
    for key, allowed in _BREAKPOINT_VALUES.items():
        field = value.get(key)
        if field is None:
            continue
        if not isinstance(field, str):
            raise InvalidRequest(f"Invalid type for '{param}.{key}': expected a string, but got {json_type(field)} instead.",
                                 param=f"{param}.{key}", code="invalid_type")
        if field not in allowed:
            raise InvalidRequest(f"Invalid value: {shown(field)}. Supported values are: {_supported(allowed)}.",
                                 param=f"{param}.{key}", code="invalid_value")


def part_text(part: dict[str, Any], key: str, param: str) -> str:
    """The string ``part[key]`` of a text (or refusal) content part; a 400 in OpenAI's words when absent or not one."""
    text = part.get(key)
    if text is None:
        raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if not isinstance(text, str):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string, but got {json_type(text)} instead.",
                             param=param, code="invalid_type")
    return text
