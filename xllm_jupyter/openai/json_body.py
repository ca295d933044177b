"""The JSON rules every request body meets before a handler reads it: UTF-8, well-formed, each key once.

Bodies are read by more than one parser (pydantic for the request, ``json`` for the response
cache's key, a proxy or filter in front of the server). On a duplicated key each keeps one of the
values, not always the same one, and a check reading one value while the model reads another is how
filters get bypassed; so a body naming a key twice in any object is refused (no JSON encoder writes
one), and every reader sees the same request.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from ..core.errors import InvalidRequest, quoted

#: the UTF-8 byte order mark some Windows tools write first (RFC 8259 lets a parser ignore it)
UTF8_BOM = b"\xef\xbb\xbf"


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def without_bom(body: bytes | str) -> bytes | str:
    """``body`` without a leading UTF-8 byte order mark."""
    if isinstance(body, bytes):
        return body[len(UTF8_BOM):] if body.startswith(UTF8_BOM) else body
    return body[1:] if body.startswith("\ufeff") else body


def strict_json(body: bytes | str) -> Any:
    """``body`` parsed, or InvalidRequest: not UTF-8, not JSON (with where), too deep, or a key given twice.

    NaN and Infinity literals parse here; the request models refuse them where a number is
    expected, naming the parameter (``finite.py``).
    """
    return strict_parse(body)[0]


def strict_parse(body: bytes | str) -> tuple[Any, bool]:
    """``strict_json(body)``, and whether the body writes a non-finite number: NaN, Infinity or a float literal past
    a double's range (1e400). Noted as the parser meets them, so no second pass over the body looks for them."""
    body = without_bom(body)
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start}): send JSON encoded as "
                                 "UTF-8.", code="invalid_json") from None
    else:
        text = body
    non_finite: list[str] = []

    def constant(name: str) -> float:  # only NaN, Infinity and -Infinity come here
        non_finite.append(name)
        return float(name)

    def number(literal: str) -> float:  # every literal with a fraction or exponent: a Python call each, ~0.1 µs
        value = float(literal)
        if math.isinf(value):
            non_finite.append(literal)
        return value

    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=constant, parse_float=number)
    except _DuplicateKey as dup:
        param = quoted(dup.key)
        raise InvalidRequest(f"The request body gives the key '{param}' more than once; send each key once.",
                             param=param, code="duplicate_key") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest("We could not parse the JSON body of your request: "
                             f"{exc.msg} (line {exc.lineno}, column {exc.colno}). The body must be valid JSON.",
                             code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply to parse.", code="invalid_json") from None
    except ValueError:  # an integer literal past Python's digit limit (int_max_str_digits): not a 500
        raise InvalidRequest("We could not parse the JSON body of your request: it holds an integer of more than "
                             f"{sys.get_int_max_str_digits()} digits.", code="invalid_json") from None
    return value, bool(non_finite)


__all__ = ["UTF8_BOM", "strict_json", "strict_parse", "without_bom"]
