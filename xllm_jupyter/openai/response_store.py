"""In-memory store of Responses API results, for retrieve, delete, input_items and continuation.

One store per server process; bounded so a long-running server cannot grow without
limit: past ``capacity`` the least recently used response is forgotten, after which
it reads as unknown (404), exactly like one that was never stored.

Each response belongs to the user who created it: for anyone else it reads as
unknown too (404, not 403, so ids of other users' responses reveal nothing).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import NotFound

#: how many responses a server remembers by default
DEFAULT_CAPACITY = 1000


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


class ResponseStore:
    """A bounded LRU map from response id to StoredResponse (event-loop use only)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, stored: StoredResponse) -> None:
        """Remember ``stored``; evicts the least recently used entry when full."""
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str, param: str | None = None, owner: str | None = None) -> StoredResponse:
        """``owner``'s stored response, or NotFound (404) naming ``param``."""
        stored = self._items.get(rid)
        if stored is None or stored.owner != owner:
            raise NotFound(f"Response with id '{rid}' not found.", param=param)
        self._items.move_to_end(rid)
        return stored

    def delete(self, rid: str, owner: str | None = None) -> None:
        """Forget ``owner``'s ``rid``; NotFound when they have no such response."""
        self.get(rid, owner=owner)
        del self._items[rid]
