"""Is a tool's ``parameters`` a JSON Schema at all? The structural check api.openai.com makes.

OpenAI answers 400 ``invalid_function_parameters`` when a function's parameters break the
JSON Schema meta-schema (``"properties": 5``, ``"type": 7``, ``"required": "x"``), forced or
not; without this check such a tool was accepted here unless forced (only the grammar
build looked at it). Only the shape of the keywords that hold schemas, names or numbers is
checked, never what a schema means: any schema a real client sends keeps working, and no
JSON Schema library is needed at run time.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import InvalidRequest

#: JSON Schema's type names
SIMPLE_TYPES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
#: keywords whose value is one schema
_ONE = ("additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
#: keywords whose value maps names to schemas
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
#: keywords whose value is a non-empty array of schemas
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
#: keywords whose value is a count
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
#: keywords whose value is a number
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
#: keywords whose value is a string
_STRINGS = ("$ref", "pattern", "format", "title", "description", "$schema", "$id", "$anchor")


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(schema: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """The first (path, problem) in ``schema``, or None when its shape is a JSON Schema."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]  # (no recursion: schemas nest deep)
    while stack:
        path, node = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            return path, f"{_shown(node)} is not of type 'object', 'boolean'"
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or any(not isinstance(k, str) or k not in SIMPLE_TYPES for k in kinds) or len(set(map(str, kinds))) != len(kinds):
                return path + ("type",), f"{_shown(kind)} is not a JSON Schema type (one of {', '.join(sorted(SIMPLE_TYPES))}, or an array of them)"
        required = node.get("required")
        if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
            return path + ("required",), f"{_shown(required)} is not an array of strings"
        enum = node.get("enum")
        if enum is not None and not isinstance(enum, list):
            return path + ("enum",), f"{_shown(enum)} is not of type 'array'"
        for key in _COUNTS:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                return path + (key,), f"{_shown(value)} is not a non-negative integer"
        for key in _NUMBERS:
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return path + (key,), f"{_shown(value)} is not of type 'number'"
        for key in _STRINGS:
            value = node.get(key)
            if value is not None and not isinstance(value, str):
                return path + (key,), f"{_shown(value)} is not of type 'string'"
        for key in _ONE:
            if key in node:
                stack.append((path + (key,), node[key]))
        for key in _MAP:
            if key in node:
                value = node[key]
                if not isinstance(value, dict):
                    return path + (key,), f"{_shown(value)} is not of type 'object'"
                stack.extend((path + (key, str(name)), sub) for name, sub in value.items())
        for key in _LIST:
            if key in node:
                value = node[key]
                if not isinstance(value, list) or not value:
                    return path + (key,), f"{_shown(value)} is not a non-empty array"
                stack.extend((path + (key, str(i)), sub) for i, sub in enumerate(value))
        if "items" in node:
            items = node["items"]
            # (an array of schemas is draft 7's tuple form, still sent by older clients)
            subs = items if isinstance(items, list) else [items]
            stack.extend((path + ("items", str(i)) if isinstance(items, list) else path + ("items",), sub) for i, sub in enumerate(subs))
    return None


def check_parameters(schema: dict[str, Any], name: str, param: str) -> None:
    """Raise OpenAI's ``invalid_function_parameters`` 400 when ``schema`` is not a JSON Schema."""
    found = _problems(schema)
    if found is not None:
        path, problem = found
        where = "(" + ", ".join(repr(p) for p in path) + ("," if len(path) == 1 else "") + ")"
        raise InvalidRequest(f"Invalid schema for function {name!r}: In context={where}, {problem}.",
                             param=param, code="invalid_function_parameters")
