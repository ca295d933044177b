"""OpenAI ``response_format`` -> a core ``Constraint`` the backend enforces while decoding.

Shapes accepted (the Chat Completions wire format, and the flat one the Responses API
uses under ``text.format``):

- ``{"type": "text"}`` or absent: no constraint;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}``
  (or ``{"type": "json_schema", "name": ..., "schema": {...}}``): output matches the schema.
  The schema is enforced token by token whether ``strict`` is true or false; an object with
  declared ``properties`` and no ``additionalProperties`` admits no other key (schema_closing.py). A ``format`` the
  grammar engine does not enforce constrains nothing beyond its type, unless ``strict`` is true: then it is a 400, as
  api.openai.com answers (schema_formats.py).

Anything else is a 400 naming ``param``. Whether the schema itself compiles is checked
separately, by the model's grammar compiler (``Engine.check_constraint``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..core.errors import InvalidRequest
from ..core.types import Constraint
from .schema_closing import close_objects
from .schema_errors import json_type, shown
from .schema_formats import check_strict_formats, drop_unenforced_formats

#: OpenAI's rule for a response format's ``name``: letters, digits, ``_`` and ``-``, at most 64
FORMAT_NAME_PATTERN, MAX_FORMAT_NAME = "^[a-zA-Z0-9_-]+$", 64
_FORMAT_NAME = re.compile(FORMAT_NAME_PATTERN)


def check_format_name(name: Any, param: str) -> None:
    """400 in api.openai.com's words unless ``name`` (when given) is a string of 1-64 of ``[a-zA-Z0-9_-]``."""
    if name is None:
        return  # OpenAI requires it; clients that leave it out are served (it only labels the format)
    if not isinstance(name, str):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string, but got {json_type(name)} instead.", param=param,
                             code="invalid_type")
    if not name:
        raise InvalidRequest(f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty "
                             "string instead.", param=param, code="empty_string")
    if len(name) > MAX_FORMAT_NAME:
        raise InvalidRequest(f"Invalid '{param}': string too long. Expected a string with maximum length {MAX_FORMAT_NAME}, "
                             f"but got a string with length {len(name)} instead.", param=param, code="string_above_max_length")
    if not _FORMAT_NAME.match(name):
        raise InvalidRequest(f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
                             f"'{FORMAT_NAME_PATTERN}'.", param=param, code="invalid_value")


def constraint_from_response_format(value: Any, *, param: str = "response_format") -> Constraint | None:
    """The constraint ``value`` asks for, or None for plain text; InvalidRequest on a bad shape."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    # each shape error names the field at fault, as api.openai.com does (the SDK's BadRequestError.param)
    if kind is None:
        raise InvalidRequest(f"Missing required parameter: '{param}.type'.", param=f"{param}.type",
                             code="missing_required_parameter")
    if kind != "json_schema":
        raise InvalidRequest(f"Invalid value: {shown(kind)}. Supported values are: 'text', 'json_object', and "
                             "'json_schema'.", param=f"{param}.type", code="invalid_value")
    nested = "json_schema" in value or "schema" not in value  # chat's shape, or the flat one Responses uses
    where = f"{param}.json_schema" if nested else param
    body = value.get("json_schema") if nested else value
    if body is None:
        raise InvalidRequest(f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter")
    if not isinstance(body, dict):
        raise InvalidRequest(f"Invalid type for '{where}': expected an object, but got {json_type(body)} instead.",
                             param=where, code="invalid_type")
    check_format_name(body.get("name"), f"{where}.name")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(f"Invalid type for '{where}.strict': expected a boolean, but got {json_type(strict)} "
                             "instead.", param=f"{where}.strict", code="invalid_type")
    schema = body.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{where}.schema' must be a JSON schema object", param=f"{where}.schema")
    if strict:
        name = body.get("name")
        check_strict_formats(schema, "response_format" + (f" {shown(name)}" if name is not None else ""), param, "invalid_value")
    # sorted keys: equal schemas share one compiled grammar in the backend's cache
    closed = close_objects(drop_unenforced_formats(schema))
    return Constraint("json_schema", json.dumps(closed, sort_keys=True, separators=(",", ":")))
