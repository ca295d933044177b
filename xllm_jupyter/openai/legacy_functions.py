"""Chat's deprecated ``function_call`` field: the values that ask for nothing, accepted as api.openai.com accepts them.

``function_call`` chose among the legacy ``functions`` before ``tool_choice`` chose among ``tools``. ``"auto"`` (the
default) and ``"none"`` (call nothing) ask for no function this server would have to honour, and clients send them
unasked (older LangChain and agent code, SDK objects dumped with their defaults); they were a 400 here. ``"none"``
also keeps the model from calling ``tools`` when ``tool_choice`` is unset, as ``tool_choice: "none"`` does. Forcing a
function (``{"name": ...}``) needs the legacy ``functions``, which this server does not implement (their calls come
back in another shape, ``message.function_call``): that stays a 400 ``unsupported_parameter``.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidRequest, Unsupported
from .schema_errors import check_json_type, shown

#: the string values of ``function_call``; both ask for nothing this server lacks
NOTHING_ASKED = ("none", "auto")


def tool_choice_with_function_call(function_call: Any, tool_choice: Any) -> Any:
    """``tool_choice`` as the request's ``function_call`` leaves it; 400 for a value this server cannot honour."""
    check_json_type(function_call, ("a string", "an object"), "function_call")
    if function_call is None or function_call == {}:  # absent, or an empty object: asks for nothing
        return tool_choice
    if isinstance(function_call, dict):
        raise Unsupported("'function_call' naming a function is not supported by this server (legacy 'functions' are "
                          "not implemented); use 'tools' and 'tool_choice'", param="function_call")
    if function_call not in NOTHING_ASKED:
        raise InvalidRequest(f"Invalid value: {shown(function_call)}. Supported values are: 'none' and 'auto'.",
                             param="function_call")
    return "none" if function_call == "none" and tool_choice is None else tool_choice
