"""Chat's deprecated ``functions`` and ``function_call``: served through the tool-calling machinery, answered in their shape.

``functions`` (function definitions, like ``tools`` without the ``{"type": "function"}`` wrapper) and ``function_call``
(``"none"``, ``"auto"`` or ``{"name": ...}``, which forces that function) came before ``tools`` and ``tool_choice``;
the openai SDK still takes them and older clients (LangChain's ``bind_functions``, many notebooks) send them. A request
with ``functions`` is run as the same request with ``tools``, one call at most (a legacy reply holds one), and its reply
comes back as OpenAI sends it: ``message.function_call`` (no ``tool_calls``), ``finish_reason: "function_call"``
(``"stop"`` for a named function, as OpenAI ends it), and in a stream ``delta.function_call`` pieces, the name in the
first. Errors name the legacy params.

Without ``functions``, ``"auto"`` and ``"none"`` ask for nothing (``"none"`` also keeps the model from calling
``tools`` when ``tool_choice`` is unset, as ``tool_choice: "none"`` does); naming a function is a 400, as on
api.openai.com. ``functions`` with ``tools`` or ``tool_choice`` is a 400: which of them should choose is unclear.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from ..core.errors import InvalidRequest
from .conversation import null_code_error
from .schema_errors import check_json_type, json_type, shown
from .tools import ToolConfig, parse_tool_config

#: the string values of ``function_call``; both ask for nothing this server lacks
NOTHING_ASKED = ("none", "auto")


def tool_choice_with_function_call(function_call: Any, tool_choice: Any) -> Any:
    """``tool_choice`` as the request's ``function_call`` leaves it (no ``functions``); 400 for a value it cannot honour."""
    check_json_type(function_call, ("a string", "an object"), "function_call")
    if function_call is None or function_call == {}:  # absent, or an empty object: asks for nothing
        return tool_choice
    if isinstance(function_call, dict):  # api.openai.com's words
        raise InvalidRequest("Invalid value for 'function_call': 'function_call' is only allowed when 'functions' are "
                             "specified.", param="function_call")
    if function_call not in NOTHING_ASKED:
        raise InvalidRequest(f"Invalid value: {shown(function_call)}. Supported values are: 'none' and 'auto'.",
                             param="function_call")
    return "none" if function_call == "none" and tool_choice is None else tool_choice


def request_tool_config(tools: Any, tool_choice: Any, parallel: Any, extra: dict[str, Any]) -> tuple[ToolConfig, bool]:
    """The request's tool config, and whether it came from legacy ``functions`` (then replies take the legacy shape)."""
    functions = extra.get("functions")
    check_json_type(functions, ("an array",), "functions")
    if not functions:  # absent or []: asks for nothing
        return parse_tool_config(tools, tool_choice_with_function_call(extra.get("function_call"), tool_choice), parallel), False
    if tools:
        raise InvalidRequest("'functions' and 'tools' cannot be used together; send the functions as 'tools' (the "
                             "legacy 'functions' are deprecated)", param="functions")
    if tool_choice is not None:
        raise InvalidRequest("'tool_choice' chooses among 'tools'; with the legacy 'functions' use 'function_call'",
                             param="tool_choice")
    if parallel is True:  # asks for several calls, and a legacy reply holds one (api.openai.com's words)
        raise InvalidRequest("Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' "
                             "are specified.", param="parallel_tool_calls")
    wrapped = []
    for i, fn in enumerate(functions):
        if not isinstance(fn, dict):
            raise InvalidRequest(f"Invalid type for 'functions[{i}]': expected an object, but got {json_type(fn)} instead.",
                                 param=f"functions[{i}]", code="invalid_type")
        wrapped.append({"type": "function", "function": fn})
    choice = _tool_choice(extra.get("function_call"))  # (its errors are in legacy terms already)
    try:  # one call at most: a legacy reply's message holds one function_call
        return parse_tool_config(wrapped, choice, False), True
    except InvalidRequest as exc:
        raise in_legacy_terms(exc) from None


def check_legacy_history(messages: Sequence[Any]) -> None:
    """400 for a past ``tool_calls`` in a request with ``functions``, as api.openai.com refuses it (its words)."""
    for i, m in enumerate(messages):
        if m.tool_calls:
            raise null_code_error("Invalid parameter: 'tool_calls' cannot be used when 'functions' are present. Please use "
                                  "'tools' instead of 'functions'.", f"messages[{i}].tool_calls")


def _tool_choice(function_call: Any) -> Any:
    """The ``tool_choice`` that ``function_call`` is when ``functions`` are given."""
    check_json_type(function_call, ("a string", "an object"), "function_call")
    if function_call is None or function_call == {}:
        return "auto"
    if isinstance(function_call, str):
        if function_call not in NOTHING_ASKED:
            raise InvalidRequest(f"Invalid value: {shown(function_call)}. Supported values are: 'none' and 'auto'.",
                                 param="function_call")
        return function_call
    name = function_call.get("name")
    if name is None:
        raise InvalidRequest("Missing required parameter: 'function_call.name'.", param="function_call.name",
                             code="missing_required_parameter")
    check_json_type(name, ("a string",), "function_call.name")
    return {"type": "function", "function": {"name": name}}


#: the tool checks' names for the fields (renamed to the legacy ones), and the client's own words in their messages,
#: kept as they are: a function's quoted name (``shown``, maybe cut with "…") and a schema error's text, which quote
#: the client's function names and property names (a function or property named "tools" is not the 'tools' param)
_WORDS = re.compile(r"(?P<own>Invalid schema for function .*|function (?:name )?(?:'(?:[^'\\…]|\\.)*['…]"
                    r"|\"(?:[^\"\\…]|\\.)*[\"…]))|tools\[(?P<index>\d+)\]\.function|(?P<tools>\btools\b)"
                    r"|\btool_choice(?:\.function)?\b", re.S)


def _legacy_word(match: re.Match[str]) -> str:
    if match["own"] is not None:
        return match["own"]
    if match["index"] is not None:
        return f"functions[{match['index']}]"
    return "functions" if match["tools"] is not None else "function_call"


def _legacy_words(text: str) -> str:
    return _WORDS.sub(_legacy_word, text)


def in_legacy_terms(exc: InvalidRequest) -> InvalidRequest:
    """``exc`` (a check of the ``tools`` that ``functions`` became) naming ``functions``/``function_call`` instead."""
    exc.message = _legacy_words(exc.message)
    exc.args = (exc.message,)
    exc.param = _legacy_words(exc.param) if exc.param else exc.param
    return exc


def legacy_message(message: dict[str, Any], finish: str) -> tuple[dict[str, Any], str]:
    """A reply's ``message`` and ``finish_reason`` with its (one) tool call as the legacy ``function_call``."""
    calls = message.pop("tool_calls", None)
    if calls:
        fn = calls[0]["function"]
        message["function_call"] = {"name": fn["name"], "arguments": fn["arguments"]}
    return message, "function_call" if finish == "tool_calls" else finish


def legacy_delta(delta: dict[str, Any], finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A stream ``delta`` and its ``finish_reason`` with tool-call pieces as ``function_call`` pieces."""
    frags = delta.get("tool_calls")
    if frags:
        fn = frags[0]["function"]
        delta = {k: v for k, v in delta.items() if k != "tool_calls"}
        delta["function_call"] = {k: fn[k] for k in ("name", "arguments") if k in fn}
    return delta, "function_call" if finish == "tool_calls" else finish
