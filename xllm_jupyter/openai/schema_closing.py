"""Close the objects of a JSON schema we enforce: no properties beyond the declared ones, unless it says so.

JSON Schema lets an object without ``additionalProperties`` hold any other key, and the grammar
compiler follows it: a small model, once its declared keys are written, invents more
(``"age_by_year": 12, "age_by_month": ...``) until ``max_tokens``, and the client's parser gets a cut
tool call (instructor, pydantic models from LangChain, LlamaIndex and LiteLLM send such schemas).
OpenAI's structured outputs only accept closed objects, and other servers' grammar engines close
them by default, so a client never relies on extra keys. An object that declares no ``properties``
(``{"type": "object"}``: any object) stays open, and so does anything that sets
``additionalProperties``, ``patternProperties`` or ``unevaluatedProperties`` or combines branches
with ``allOf`` (closing one branch would refuse the other branches' keys).
"""

from __future__ import annotations

from typing import Any

#: keywords whose value is one subschema / a list of them / a name -> subschema map (schema_formats.py walks them too)
SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "additionalItems")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN_MARKERS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` whose objects with declared ``properties`` refuse undeclared keys."""
    return _close(schema, closable=True)


def _close(node: Any, closable: bool) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _close(out[key], True)
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_close(s, True) for s in out[key]]
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close(s, True) for name, s in out[key].items()}
    if isinstance(out.get("allOf"), list):
        # a branch of allOf only sees its own keys: closing it would refuse its siblings'
        out["allOf"] = [_close(s, False) for s in out["allOf"]]
    if closable and isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_MARKERS):
        out["additionalProperties"] = False
    return out
