"""In-memory store of Responses API results, for retrieve, delete, input_items and continuation.

One store per server process, bounded and owned per user as ``owned_store.OwnedStore``
describes: a forgotten response, or another user's, reads as unknown (404).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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

    def size(self, item: StoredResponse) -> int:
        """The response, its input items and its conversation, as JSON, and its set of item ids."""
        # a set's slot per id (~48 bytes each, as many as the chain's items) and the id itself: the ids of a deleted or
        # evicted response of the chain live on in this set only (a client's id may be megabytes long)
        return (len(json.dumps([item.response, item.input_items, item.conversation], default=str))
                + sum(48 + len(i) for i in item.item_ids))
