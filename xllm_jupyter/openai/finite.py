"""Non-finite numbers (NaN, Infinity, 1e400) anywhere in a parsed request body: a 400 naming where.

Python's JSON (and pydantic's) read ``NaN`` and ``Infinity``, and a literal past a double's range
becomes infinity. Typed number fields refuse them (``allow_inf_nan=False``); free-form ones (schemas,
tool parameters, unknown fields) kept them, and the Responses API echoed them into 200 bodies that no
strict JSON parser (JavaScript's, the openai Node SDK's) reads.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

from ..core.errors import InvalidRequest, quoted

#: what a non-finite number can be written as: NaN, Infinity, or a literal past float's range (1e400, 400 digits); a
#: match (strings hold these too) only means the parsed request is searched
_MAY_BE_NON_FINITE = re.compile(rb"NaN|Infinity|[eE][+-]?[0-9]{3}|[0-9]{300}")


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


def check_finite(req: Any, body: bytes | str) -> None:
    """400 when the request parsed from ``body`` holds a NaN or infinite number anywhere."""
    if not _MAY_BE_NON_FINITE.search(body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body):
        return
    where = non_finite_at(req)
    if where is not None:
        raise InvalidRequest(f"Invalid value for '{quoted(where, 200)}': numbers must be finite (NaN and Infinity are not "
                             "JSON numbers).", param=where)
