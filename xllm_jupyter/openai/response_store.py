"""In-memory store of Responses API results, for retrieve, delete, input_items and continuation.

One store per server process; bounded so a long-running server cannot grow without
limit: past ``capacity`` responses or ``max_bytes`` of them, a response is forgotten,
after which it reads as unknown (404), exactly like one that was never stored. The one
forgotten is the least recently used of the user who holds the most bytes, so one user
storing much (or large) pushes out their own responses, not everyone else's.

Each response belongs to the user who created it: for anyone else it reads as
unknown too (404, not 403, so ids of other users' responses reveal nothing).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import NotFound

#: how many responses a server remembers by default
DEFAULT_CAPACITY = 1000
#: and how many bytes of them (as JSON) at most
DEFAULT_MAX_BYTES = 256 * 2**20


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
    """A bounded map from response id to StoredResponse, evicting fairly between users (event-loop use only)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_bytes: int = DEFAULT_MAX_BYTES):
        self.capacity = max(1, capacity)
        self.max_bytes = max(1, max_bytes)
        self._items: dict[str, StoredResponse] = {}
        self._sizes: dict[str, int] = {}
        self._by_owner: dict[str | None, OrderedDict[str, None]] = {}  # each owner's ids, least recent first
        self._owner_bytes: dict[str | None, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, stored: StoredResponse) -> None:
        """Remember ``stored``; evicts (fairly, see the module) while over the count or byte bound."""
        if rid in self._items:
            self._forget(rid)
        size = len(json.dumps([stored.response, stored.input_items, stored.conversation], default=str))
        self._items[rid], self._sizes[rid] = stored, size
        self._by_owner.setdefault(stored.owner, OrderedDict())[rid] = None
        self._owner_bytes[stored.owner] = self._owner_bytes.get(stored.owner, 0) + size
        self.nbytes += size
        while len(self._items) > self.capacity or (self.nbytes > self.max_bytes and len(self._items) > 1):
            heaviest = max(self._owner_bytes, key=self._owner_bytes.__getitem__)
            self._forget(next(iter(self._by_owner[heaviest])))

    def get(self, rid: str, param: str | None = None, owner: str | None = None) -> StoredResponse:
        """``owner``'s stored response, or NotFound (404) naming ``param``."""
        stored = self._items.get(rid)
        if stored is None or stored.owner != owner:
            raise NotFound(f"Response with id '{rid}' not found.", param=param)
        self._by_owner[owner].move_to_end(rid)
        return stored

    def delete(self, rid: str, owner: str | None = None) -> None:
        """Forget ``owner``'s ``rid``; NotFound when they have no such response."""
        self.get(rid, owner=owner)
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        stored, size = self._items.pop(rid), self._sizes.pop(rid)
        ids = self._by_owner[stored.owner]
        del ids[rid]
        self._owner_bytes[stored.owner] -= size
        self.nbytes -= size
        if not ids:  # an owner with nothing stored is no candidate for eviction
            del self._by_owner[stored.owner], self._owner_bytes[stored.owner]
