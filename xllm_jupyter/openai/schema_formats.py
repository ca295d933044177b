"""JSON-schema ``format`` values the grammar engine does not enforce: ignored as api.openai.com ignores them, or refused
where it refuses them.

llguidance enforces ten string formats and fails to compile a schema holding any other ("Unknown format: binary").
Pydantic writes such formats for ordinary fields (``bytes`` -> ``binary``, ``SecretStr`` -> ``password``, ``Path`` ->
``path``, ``Json`` -> ``json-string``), and OpenAPI and MCP tool schemas carry ``uri-reference``, ``byte``, ``int32``
and the like, so a forced tool or ``response_format`` built from them was a 400 here. api.openai.com takes them
outside strict mode (a format is an annotation there), so one this engine cannot enforce constrains nothing beyond
its type: it is dropped before compiling. In strict mode OpenAI refuses every format outside its short list
(``'binary' is not a valid format``), so ``strict: true`` with one we cannot enforce stays a 400, in OpenAI's words;
a format we do enforce (``uri``, which OpenAI's strict list lacks) is kept: strict never loses a constraint silently.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..core.errors import InvalidRequest
from .schema_closing import SUBSCHEMA, SUBSCHEMA_LISTS, SUBSCHEMA_MAPS
from .schema_errors import shown

#: the formats llguidance 1.9 enforces (tests/test_schema_formats.py checks the list against the installed engine)
ENFORCED_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})

Path = tuple[str, ...]


def _subschemas(node: dict[str, Any], path: Path) -> Iterator[tuple[Path, Any]]:
    """Each direct subschema of ``node`` with its path (keywords that hold schemas only: a property named
    ``format`` is no keyword)."""
    for key in SUBSCHEMA:
        if isinstance(node.get(key), dict):
            yield path + (key,), node[key]
    for key in (*SUBSCHEMA_LISTS, "allOf"):
        if isinstance(node.get(key), list):
            yield from ((path + (key, str(i)), sub) for i, sub in enumerate(node[key]))
    for key in SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            yield from ((path + (key, str(name)), sub) for name, sub in node[key].items())


def _unenforced(node: Any) -> bool:
    fmt = node.get("format")
    return isinstance(fmt, str) and fmt not in ENFORCED_FORMATS  # (another type still fails to compile, as before)


def first_unenforced_format(schema: Any) -> tuple[Path, str] | None:
    """The path and value of the first ``format`` in ``schema`` the grammar engine does not enforce, or None."""
    stack: list[tuple[Path, Any]] = [((), schema)]  # (no recursion: schemas nest deep)
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        if _unenforced(node):
            return path, node["format"]
        stack.extend(reversed(list(_subschemas(node, path))))
    return None


def drop_unenforced_formats(schema: Any) -> Any:
    """``schema`` without the ``format`` values the grammar engine does not enforce (the schema itself when it has
    none; else a copy, the client's schema untouched)."""
    if first_unenforced_format(schema) is None:
        return schema
    return _dropped(schema)


def _dropped(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k != "format" or not _unenforced(node)}
    for key in SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _dropped(out[key])
    for key in (*SUBSCHEMA_LISTS, "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [_dropped(s) for s in out[key]]
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _dropped(s) for name, s in out[key].items()}
    return out


def check_strict_formats(schema: Any, what: str, param: str, code: str) -> None:
    """400 in api.openai.com's words when strict ``schema`` holds a format the grammar engine does not enforce;
    ``what`` names the schema as OpenAI does (``function 'f'``, ``response_format 'name'``)."""
    found = first_unenforced_format(schema)
    if found is None:
        return
    path, fmt = found
    where = "(" + ", ".join(repr(p) for p in path) + ("," if len(path) == 1 else "") + ")"
    raise InvalidRequest(f"Invalid schema for {what}: In context={where}, {shown(fmt)} is not a valid format.", param=param,
                         code=code)
