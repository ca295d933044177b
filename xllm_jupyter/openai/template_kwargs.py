"""vLLM's ``chat_template_kwargs``: extra variables for the model's chat template, checked.

Clients send them to switch template features, e.g. Qwen3's ``{"enable_thinking": false}``. They were dropped as an
unknown field, so such a client got the template's default (a thinking block it had turned off). A name the
server or the template renderer sets itself would replace it (the messages, the tools, the generation prompt) or
change what rendering returns (``tokenize``: token ids instead of text, ``chat_template``: another template): those
are a 400 naming the key, where vLLM would let some through.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidRequest
from .schema_errors import json_type

PARAM = "chat_template_kwargs"
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
    """
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
