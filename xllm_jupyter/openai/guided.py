"""vLLM's structured-output fields -> the constraint a chat or legacy completion is decoded under.

Clients written for vLLM constrain the output with ``structured_outputs`` (an object with one of ``json``,
``regex``, ``choice``, ``grammar``, ``json_object``) or with the older top-level ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar``. They were dropped as unknown fields, so such a
client got unconstrained text. The rules are vLLM's:

- one kind at most: two of them, in either spelling, are a 400 (vLLM's "only one kind" error); a kind is any key
  that is not null, ``json_object: false`` too (vLLM counts it, then fails the request: here a 400 naming it);
- a ``structured_outputs`` object naming no kind (only options, or every kind null) is a 400, as vLLM's "must use
  one kind";
- ``response_format`` json_schema beside a vLLM JSON schema: ``response_format``'s schema is used (vLLM writes it
  over the same slot; clients send both as mirrors); beside any other kind, or json_object beside any, a 400;
- options that change nothing here are accepted (JSON is compact and client objects are closed already; there is
  one grammar engine); ``whitespace_pattern`` would change the JSON and ``structural_tag`` is not implemented: 400;
- ``grammar`` is Lark or GBNF (llama.cpp's, which xgrammar's EBNF follows), read by llguidance's converter in the
  backend; what it cannot read is a 400 naming the field, not a guess.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ..core.errors import InvalidRequest, Unsupported
from ..core.types import Constraint
from .schema_errors import json_type
from .structured import constraint_from_response_format

#: the top-level fields, by the ``structured_outputs`` key each stands for
GUIDED_FIELDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
#: ``structured_outputs`` keys that pick a kind of constraint
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
#: options accepted as no-ops, with their JSON type: what they ask for is what this server does anyway
_NO_OPS = {"disable_any_whitespace": bool, "disable_additional_properties": bool, "disable_fallback": bool}
#: options that would change the output, refused rather than ignored
_REFUSED = ("whitespace_pattern",)
_TYPE_WORDS = {bool: "a boolean", str: "a string"}


class Requested(NamedTuple):
    """The constraint a request asks for (None: plain text) and the field errors about it name."""

    constraint: Constraint | None
    param: str


def _type_error(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
                          param=param, code="invalid_type")


def _asked(extra: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(param, kind, value)`` of each kind of constraint the vLLM fields ask for; their options checked."""
    asked = [(field, kind, extra[field]) for kind, field in GUIDED_FIELDS.items() if extra.get(field) is not None]
    for field in ("guided_whitespace_pattern",):
        if extra.get(field) is not None:
            raise Unsupported(f"'{field}' is not supported by this server (its JSON has no free whitespace)", param=field)
    backend = extra.get("guided_decoding_backend")  # which grammar engine: there is one here
    if backend is not None and not isinstance(backend, str):
        raise _type_error("guided_decoding_backend", "a string", backend)
    outputs = extra.get("structured_outputs")
    if outputs is None:
        return asked
    if not isinstance(outputs, dict):
        raise _type_error("structured_outputs", "an object", outputs)
    kinds = len(asked)
    for key, value in outputs.items():
        param = f"structured_outputs.{key}"
        if value is None:
            continue
        if key in _NO_OPS:
            if not isinstance(value, _NO_OPS[key]):
                raise _type_error(param, _TYPE_WORDS[_NO_OPS[key]], value)
        elif key in _REFUSED or key == "structural_tag":
            raise Unsupported(f"'{param}' is not supported by this server", param=param)
        elif key == "json_object":
            if not isinstance(value, bool):
                raise _type_error(param, "a boolean", value)
            asked.append((param, key, value))  # false too: vLLM counts any non-null kind (then fails it)
        elif key in _KINDS:
            asked.append((param, key, value))
        else:  # a typo or a newer option: ignoring it could leave the output unconstrained
            raise InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if len(asked) == kinds:  # vLLM's 400: the object names no kind (only options, or every kind null)
        raise InvalidRequest("'structured_outputs' must name one kind of constraint (json, regex, choice, grammar or "
                             "json_object), but none is given.", param="structured_outputs")
    return asked


def _constraint(param: str, kind: str, value: Any) -> Constraint:
    """The constraint one vLLM field asks for; a 400 naming ``param`` when its value is malformed."""
    if kind == "json_object":
        if not value:  # vLLM takes it as a kind, then fails the request: no constraint is what it asks for
            raise InvalidRequest(f"'{param}' is false, which asks for no constraint: leave 'structured_outputs' out "
                                 "for plain text.", param=param)
        return Constraint("json_object")
    if kind == "json":
        schema = value
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                schema = json.loads(value)
            except ValueError:
                raise InvalidRequest(f"'{param}' is not valid JSON", param=param) from None
        if not isinstance(schema, dict):
            raise _type_error(param, "a JSON schema object", value)
        # the schema treated as response_format's (closed objects, unenforced formats dropped, one cache key)
        return constraint_from_response_format({"type": "json_schema", "json_schema": {"schema": schema}}, param=param)  # type: ignore[return-value]
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise _type_error(param, "an array of strings", value)
        if not value:
            raise InvalidRequest(f"'{param}' must name at least one choice", param=param)
        # each choice a Lark literal: JSON string escapes are Lark's, so any text is matched as it is
        return Constraint("lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    if kind == "grammar" and not value.strip():
        raise InvalidRequest(f"'{param}' is empty", param=param)
    return Constraint("regex" if kind == "regex" else "grammar", value)


def requested_constraint(response_format: Any, extra: dict[str, Any] | None) -> Requested:
    """The constraint ``response_format`` or vLLM's fields in ``extra`` (a body's unknown fields) ask for."""
    answer = constraint_from_response_format(response_format)
    asked = _asked(extra or {})
    if not asked:
        return Requested(answer, "response_format")
    if len(asked) > 1:
        raise InvalidRequest(f"Only one kind of structured output can be asked for, but '{asked[0][0]}' and "
                             f"'{asked[1][0]}' were both given.", param=asked[1][0])
    param, kind, value = asked[0]
    mine = _constraint(param, kind, value)
    if answer is None:
        return Requested(mine, param)
    if answer.kind == "json_schema" and kind == "json":
        return Requested(answer, "response_format")  # as vLLM: response_format's schema takes the same slot
    raise InvalidRequest(f"Only one kind of structured output can be asked for, but 'response_format' and '{param}' "
                         "were both given.", param=param)
