"""In-memory store of Responses API results, for retrieve, delete, input_items and continuation.

One store per server process, bounded and owned per user as ``owned_store.OwnedStore``
describes: a forgotten response, or another user's, reads as unknown (404). Its input and output
items can be found by id too, for ``item_reference`` inputs (item_references.py), by the same rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from .owned_store import DEFAULT_CAPACITY, DEFAULT_MAX_BYTES, OwnedStore

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_MAX_BYTES", "ResponseStore", "StoredResponse"]


@dataclass
class StoredResponse:
    """A finished response with what is needed to continue from it.

    ``conversation`` holds chat wire messages (history + this input + the output, never
    ``instructions``, which OpenAI does not carry over to the next turn).
    """

    response: dict[str, Any]
    input_items: list[dict[str, Any]] = field(default_factory=list)
    conversation: list[dict[str, Any]] = field(default_factory=list)
    #: the ids of every item of ``conversation`` (the chain's inputs and outputs, then this one's): an item sent again
    #: with ``previous_response_id`` is a 400, also where a response of the chain was deleted since (its turn is here)
    item_ids: frozenset[str] = frozenset()
    #: the user who created it (None = anonymous); only they can read, continue or delete it
    owner: str | None = None


class ResponseStore(OwnedStore[StoredResponse]):
    """A bounded map from response id to StoredResponse, evicting fairly between users (event-loop use only)."""

    kind = "Response"

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(capacity, max_bytes)
        #: (owner, item id) -> (response id, the item), or where several stored responses hold that id, {response id:
        #: item} (latest last). The item itself, so a lookup is O(1): a scan of the response's items made 50,000
        #: references to one response's items seconds to minutes on the IOLoop. Every holder, so deleting the latest
        #: still finds the item in an earlier one: a client sending its history again with ids puts the same item in
        #: every turn's input. A tuple for the one holder most ids have (a dict each doubled the index's memory).
        self._holders: dict[tuple[str | None, str], tuple[str, dict[str, Any]] | dict[str, dict[str, Any]]] = {}

    def put(self, oid: str, item: StoredResponse) -> None:
        """Remember ``item`` and where its items are (unless it was evicted at once, being too large)."""
        super().put(oid, item)
        if self.peek(oid, item.owner) is item:
            for it in _items(item):
                key = (item.owner, it["id"])
                held = self._holders.get(key)
                if held is None:
                    self._holders[key] = (oid, it)
                elif isinstance(held, tuple):
                    self._holders[key] = {held[0]: held[1], oid: it}
                else:
                    held[oid] = it

    def forgotten(self, oid: str, item: StoredResponse) -> None:
        """Its items are no longer found through it (an earlier response holding the same id still finds them)."""
        for it in _items(item):
            key = (item.owner, it["id"])
            held = self._holders.get(key)
            if isinstance(held, dict):
                held.pop(oid, None)
                if len(held) == 1:
                    self._holders[key] = next(iter(held.items()))
            if isinstance(held, tuple) and held[0] == oid or held == {}:
                del self._holders[key]

    def find_item(self, iid: str, owner: str | None) -> dict[str, Any] | None:
        """``owner``'s stored input or output item ``iid`` (the latest response's, for an id sent again), or None
        (another user's items are never found)."""
        held = self._holders.get((owner, iid))
        if held is None:
            return None
        return held[1] if isinstance(held, tuple) else next(reversed(held.values()))

    def size(self, item: StoredResponse) -> int:
        """The response, its input items and its conversation, as JSON, and its set of item ids."""
        # a set's slot per id (~48 bytes each, as many as the chain's items) and the id itself: the ids of a deleted or
        # evicted response of the chain live on in this set only (a client's id may be megabytes long)
        return (len(json.dumps([item.response, item.input_items, item.conversation], default=str))
                + sum(48 + len(i) for i in item.item_ids))


def _items(stored: StoredResponse) -> Iterator[dict[str, Any]]:
    """The input and output items of ``stored``, each with an id."""
    yield from stored.input_items
    yield from (o for o in stored.response.get("output") or () if isinstance(o, dict) and isinstance(o.get("id"), str))
