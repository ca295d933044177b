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
    #: the user who created it (None = anonymous); only they can read, continue or delete it
    owner: str | None = None


class ResponseStore(OwnedStore[StoredResponse]):
    """A bounded map from response id to StoredResponse, evicting fairly between users (event-loop use only)."""

    kind = "Response"

    def chain_item_ids(self, rid: str, owner: str | None) -> set[str]:
        """The ids of the input and output items of ``rid`` and of the responses it continues (as far as they are
        still stored), looked up without counting as a use."""
        ids: set[str] = set()
        seen: set[str] = set()
        current: str | None = rid
        while current is not None and current not in seen:
            seen.add(current)
            stored = self.peek(current, owner=owner)
            if stored is None:
                break
            ids.update(item["id"] for item in stored.input_items)
            ids.update(item["id"] for item in stored.response["output"])
            current = stored.response.get("previous_response_id")
        return ids

    def size(self, item: StoredResponse) -> int:
        """The response, its input items and its conversation, as JSON."""
        return len(json.dumps([item.response, item.input_items, item.conversation], default=str))
