"""vLLM's ``chat_template_kwargs``: extra variables for the model's chat template, checked.

Clients send them to switch template features, e.g. Qwen3's ``{"enable_thinking": false}``. They were dropped as an
unknown field, so such a client got the template's default (a thinking block it had turned off). A name the
server or the template renderer sets itself would replace it (the messages, the tools, the generation prompt) or
change what rendering returns (``tokenize``: token ids instead of text, ``chat_template``: another template): those
are a 400 naming the key, where vLLM would let some through.

OpenAI's top-level ``reasoning_effort`` is such a variable too, as vLLM passes it (gpt-oss's template reads it): it
goes to a template that reads ``reasoning_effort``; for any other it is a 400 (the model has no effort to set).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidRequest, Unsupported
from .schema_errors import check_json_type, json_type, shown

PARAM = "chat_template_kwargs"
EFFORT = "reasoning_effort"
#: OpenAI's reasoning effort levels (the openai SDK's ``ReasoningEffort``)
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
#: what the server passes, transformers' ``apply_chat_template`` takes as its own arguments, or its template
#: environment defines as functions (a value in their place breaks every template that calls them)
RESERVED = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "chat_template", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "raise_exception", "strftime_now",
})


def chat_template_kwargs(extra: dict[str, Any] | None) -> dict[str, Any]:
    """The request's ``chat_template_kwargs`` (``extra``: a body's unknown fields); {} when absent or null.

    An object of JSON values (the body was JSON, so any value is one); another type or a reserved key is a 400.
    A top-level ``reasoning_effort`` in ``extra`` is checked too (a string, one of OpenAI's levels); ``with_effort``
    adds it once the model is known.
    """
    effort = (extra or {}).get(EFFORT)
    check_json_type(effort, ("a string",), EFFORT)
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(f"Invalid value: {shown(effort)}. Supported values are: "
                             + ", ".join(map(repr, EFFORTS)) + ".", param=EFFORT, code="invalid_value")
    value = (extra or {}).get(PARAM)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid type for '{PARAM}': expected an object, but got {json_type(value)} instead.",
                             param=PARAM, code="invalid_type")
    for key in value:
        if key in RESERVED:
            raise InvalidRequest(f"'{PARAM}' cannot set {key!r}: the server sets it (or it is the template "
                                 "renderer's own argument)", param=f"{PARAM}.{key}")
    return value


def with_effort(kwargs: dict[str, Any], extra: dict[str, Any] | None, model: Any) -> dict[str, Any]:
    """``kwargs`` with the request's top-level ``reasoning_effort`` (in ``extra``) as the template variable of that
    name, as vLLM passes it; as they are without one. A 400 where ``model``'s chat template never reads the variable
    (the effort would change nothing), or where ``chat_template_kwargs`` sets it to another value (either would be
    ignored); the same value in both is taken."""
    effort = (extra or {}).get(EFFORT)
    if effort is None:
        return kwargs
    if EFFORT not in (getattr(model, "chat_template", lambda: None)() or ""):
        raise Unsupported(f"'{EFFORT}' is not supported by this model: its chat template has no reasoning effort",
                          param=EFFORT)
    if kwargs.get(EFFORT, effort) != effort:
        raise InvalidRequest(f"'{EFFORT}' {shown(effort)} and '{PARAM}.{EFFORT}' {shown(kwargs[EFFORT])} disagree: send one",
                             param=EFFORT)
    return {**kwargs, EFFORT: effort}
