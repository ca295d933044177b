"""Pydantic's validation errors in api.openai.com's words and codes.

OpenAI answers a value outside a bound, a wrong JSON type, an empty array or a value outside
an enum with fixed sentences and codes (``decimal_above_max_value``, ``invalid_type``,
``empty_array`` ...); clients and people who know those get the same here. Errors without
an OpenAI counterpart keep pydantic's wording (``protocol._validation_error``).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidRequest

#: pydantic's bound errors: (OpenAI's word for the direction, comparison written in the message, code suffix)
_BOUNDS = {
    "greater_than_equal": ("below minimum value", ">=", "ge", "below_min_value"),
    "greater_than": ("below minimum value", ">", "gt", "below_min_value"),
    "less_than_equal": ("above maximum value", "<=", "le", "above_max_value"),
    "less_than": ("above maximum value", "<", "lt", "above_max_value"),
}

#: pydantic's type errors: what the field expected, in OpenAI's words
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a decimal",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "list_type": "an array",
}


def json_type(value: Any) -> str:
    """The JSON type of ``value`` as OpenAI names it in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_json_type(value: Any, expected: tuple[str, ...], param: str) -> None:
    """400 ``invalid_type`` in OpenAI's words unless ``value`` is null or of one of the ``expected`` JSON types (as
    ``json_type`` names them): for fields read from a body's extras, which pydantic does not type."""
    if value is not None and json_type(value) not in expected:
        raise InvalidRequest(f"Invalid type for '{param}': expected {' or '.join(expected)}, but got {json_type(value)} "
                             "instead.", param=param, code="invalid_type")


def check_present_string(value: Any, param: str) -> None:
    """400 in OpenAI's words for a field that must be a string and is missing or null (``missing_required_parameter``)
    or of another type (``invalid_type``): before its value is checked, whose message would show Python's ``None``."""
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    check_json_type(value, ("a string",), param)


#: how much of an offending value an error message repeats (a 3 MB string would come back whole otherwise)
SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to ``SHOWN_CHARS`` characters."""
    text = repr(value) if not isinstance(value, str) else repr(value[:SHOWN_CHARS + 1])
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def _number(value: Any) -> str:
    """A bound or value as OpenAI writes it: 2, not 2.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _choices(expected: str, joiner: str = "and") -> str:
    """Pydantic's "'a', 'b' or 'c'" as OpenAI's "'a', 'b', and 'c'" (``joiner`` "or": "'a', 'b', or 'c'")."""
    head, sep, last = expected.rpartition(" or ")
    if not sep:
        return expected
    return f"{head}, {joiner} {last}" if "," in head else f"{head} {joiner} {last}"


def openai_wording(err: dict[str, Any], param: str | None, siblings: list[dict[str, Any]]) -> tuple[str, str] | None:
    """``(message, code)`` for pydantic error ``err`` at ``param``, or None where OpenAI has no set wording.

    ``siblings``: the errors pydantic gave for this location (more than one: a union, whose "expected" is
    each member's type).
    """
    alternatives = len(siblings)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind in _BOUNDS and param:
        words, op, key, suffix = _BOUNDS[kind]
        bound = ctx.get(key)
        number = "integer" if isinstance(bound, int) and not isinstance(value, float) else "decimal"
        return (f"Invalid '{param}': {number} {words}. Expected a value {op} {_number(bound)}, but got {_number(value)} instead.",
                f"{number}_{suffix}")
    if kind == "too_short" and param and isinstance(value, list):
        least = ctx.get("min_length")
        if not value:
            return (f"Invalid '{param}': empty array. Expected an array with minimum length {least}, but got an empty array "
                    "instead.", "empty_array")
        return (f"Invalid '{param}': array too short. Expected an array with minimum length {least}, but got an array with "
                f"length {len(value)} instead.", "array_below_min_length")
    if kind == "too_long" and param and isinstance(value, list):
        return (f"Invalid '{param}': array too long. Expected an array with maximum length {ctx.get('max_length')}, but got "
                f"an array with length {len(value)} instead.", "array_above_max_length")
    if kind == "string_too_short" and param and value == "":
        return (f"Invalid '{param}': empty string. Expected a string with minimum length {ctx.get('min_length')}, but got an "
                "empty string instead.", "empty_string")
    if kind == "literal_error" and "expected" in ctx:
        if not isinstance(value, str) and param:  # its repr was the message: "Invalid value: None.", "{'a': 1}"
            choices = _choices(ctx["expected"], "or")
            return f"Invalid type for '{param}': expected one of {choices}, but got {json_type(value)} instead.", "invalid_type"
        return f"Invalid value: {shown(value)}. Supported values are: {_choices(ctx['expected'])}.", "invalid_value"
    if kind in _EXPECTED and param and alternatives == 1:
        return (f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {json_type(value)} instead.",
                "invalid_type")
    if param and alternatives > 1 and all(e["type"] in _EXPECTED for e in siblings):  # a union: pydantic named one member
        *head, last = dict.fromkeys(_EXPECTED[e["type"]] for e in siblings)
        expected = f"{', '.join(head)} or {last}"
        return f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.", "invalid_type"
    return None
