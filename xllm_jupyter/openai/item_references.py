"""Responses ``item_reference`` input items: a stored item named by its id, sent in its place.

Clients that keep responses stored send an earlier turn's items as ``{"type": "item_reference", "id": ...}`` (the
Vercel AI SDK's openai provider does for every stored output) instead of the items themselves; the openai SDK's
type makes ``type`` optional, so a bare ``{"id": ...}`` is one too. Each is looked up among the caller's own stored
responses, inputs and outputs alike (``ResponseStore.find_item``); another user's item, or one forgotten, reads as
unknown: a 404 naming ``input[i].id``, as api.openai.com answers an id it does not know.
"""

from __future__ import annotations

from typing import Any, Callable

from ..core.errors import NotFound, quoted
from .schema_errors import check_present_string

#: the keys an item reference may have (a message or call item has more)
_REFERENCE_KEYS = frozenset({"type", "id"})


def is_reference(item: Any) -> bool:
    """True for an ``item_reference`` input item, typed or (``type`` left out or null) bare."""
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "id" in item and item.keys() <= _REFERENCE_KEYS)


def resolve_references(value: Any, find: Callable[[str], dict[str, Any] | None]) -> tuple[Any, int]:
    """``value`` (a Responses ``input``) with each item reference replaced by the item ``find`` returns for its id
    (NotFound (404) naming ``input[i].id`` where it returns None; ``value`` itself when it holds none), and about how
    many characters of text the referenced items hold.

    The items are the store's own, not copies: ``normalize_input`` only reads them, building new ones. The text size
    says whether the work on them belongs off the IOLoop as a big body's does: a body of a few KiB can name stored
    items holding hundreds of MiB.
    """
    if not isinstance(value, list) or not any(is_reference(item) for item in value):
        return value, 0
    out, size = list(value), 0
    for i, item in enumerate(out):
        if not is_reference(item):
            continue
        iid = item.get("id")
        check_present_string(iid, f"input[{i}].id")
        found = find(iid)
        if found is None:
            raise NotFound(f"Item with id '{quoted(iid)}' not found.", param=f"input[{i}].id")
        out[i] = found
        size += _text_size(found)
    return out, size


def _text_size(item: dict[str, Any]) -> int:
    """The characters of a stored item's strings and its content parts' text (its size, near enough)."""
    parts = item.get("content")
    text = sum(len(p.get("text") or "") for p in parts if isinstance(p, dict)) if isinstance(parts, list) else 0
    return text + sum(len(v) for v in item.values() if isinstance(v, str))
