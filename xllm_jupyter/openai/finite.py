"""Non-finite numbers (NaN, Infinity, 1e400) anywhere in a parsed request body: a 400 naming where.

Python's JSON (and pydantic's) read ``NaN`` and ``Infinity``, and a literal past a double's range
becomes infinity. Typed number fields refuse them (``allow_inf_nan=False``); free-form ones (schemas,
tool parameters, unknown fields) kept them, and the Responses API echoed them into 200 bodies that no
strict JSON parser (JavaScript's, the openai Node SDK's) reads.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from ..core.errors import InvalidRequest, quoted


def non_finite_at(req: Any) -> str | None:
    """Where ``req`` (a parsed request) holds a NaN or infinite float, as a param path; None when it holds none.

    Typed number fields refuse them already (``allow_inf_nan=False``); free-form ones (schemas, tool parameters,
    unknown fields) kept them, and the Responses API echoed them into bodies no strict JSON parser reads.
    """
    stack: list[tuple[Any, str]] = [(req, "")]
    while stack:  # a loop, not recursion: a free-form value may be nested as deep as the parser allows
        value, path = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return path or None
        elif isinstance(value, BaseModel):
            fields = {**value.__dict__, **(value.model_extra or {})}
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in fields.items())
        elif isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return None


def check_finite(req: Any, written: bool) -> None:
    """400 when ``req`` holds a NaN or infinite number anywhere; searched only when its body ``written`` one.

    ``written`` comes from the strict pass over the body (``json_body.strict_parse``), which notes NaN, Infinity
    and overflowing literals as it parses; a regular expression over the body did this at 25-45 µs per KB (most of
    what parsing a big request cost) and had to search the request for every "e123" in its text.
    """
    if not written:
        return
    where = non_finite_at(req)
    if where is not None:
        raise InvalidRequest(f"Invalid value for '{quoted(where, 200)}': numbers must be finite (NaN and Infinity are not "
                             "JSON numbers).", param=where)
