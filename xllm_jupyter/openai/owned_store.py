"""A bounded in-memory map of objects that each belong to one user, and one page of a listing.

The core of the Responses store and the chat completions store. Bounded so a long-running
server cannot grow without limit: past ``capacity`` objects or ``max_bytes`` of them, an
object is forgotten, after which it reads as unknown (404), exactly like one never stored.
The one forgotten is the least recently used of the user who holds the most objects (past
``capacity``) or the most bytes (past ``max_bytes``), so one user storing many or large objects
pushes out their own, not everyone else's.

Each object belongs to the user who created it: for anyone else it reads as unknown too
(404, not 403, so ids of other users' objects reveal nothing).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Generic, Protocol, TypeVar

from ..core.errors import InvalidRequest, NotFound, quoted

#: how many objects a store remembers by default
DEFAULT_CAPACITY = 1000
#: and how many bytes of them (as JSON) at most
DEFAULT_MAX_BYTES = 256 * 2**20
#: the largest page a listing returns (OpenAI's limit)
MAX_PAGE = 100


class Owned(Protocol):
    """What a store keeps: anything that names its owner (None = anonymous)."""

    owner: str | None


T = TypeVar("T", bound=Owned)


class OwnedStore(Generic[T]):
    """A bounded map from id to an owned object, evicting fairly between users (event-loop use only).

    Subclasses say how big an object is (``size``) and what the 404 calls it (``kind``).
    """

    #: names the object in "not found" messages
    kind = "Object"

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_bytes: int = DEFAULT_MAX_BYTES):
        self.capacity = max(1, capacity)
        self.max_bytes = max(1, max_bytes)
        self._items: dict[str, T] = {}
        self._sizes: dict[str, int] = {}
        self._by_owner: dict[str | None, OrderedDict[str, None]] = {}  # each owner's ids, least recent first
        self._owner_bytes: dict[str | None, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def size(self, item: T) -> int:
        """What ``item`` counts against ``max_bytes`` (its JSON size, say)."""
        raise NotImplementedError

    def put(self, oid: str, item: T) -> None:
        """Remember ``item``; evicts (fairly, see the module) while over the count or byte bound."""
        if oid in self._items:
            self._forget(oid)
        size = self.size(item)
        self._items[oid], self._sizes[oid] = item, size
        self._by_owner.setdefault(item.owner, OrderedDict())[oid] = None
        self._owner_bytes[item.owner] = self._owner_bytes.get(item.owner, 0) + size
        self.nbytes += size
        while len(self._items) > self.capacity or (self.nbytes > self.max_bytes and len(self._items) > 1):
            # over the count: the owner of the most objects gives one up; over the bytes: the owner of the most
            # bytes (by bytes alone, a user storing many tiny objects pushed out another's one large object)
            weight = (lambda o: len(self._by_owner[o])) if len(self._items) > self.capacity else self._owner_bytes.__getitem__
            self._forget(next(iter(self._by_owner[max(self._by_owner, key=weight)])))

    def get(self, oid: str, param: str | None = None, owner: str | None = None) -> T:
        """``owner``'s object ``oid``, or NotFound (404) naming ``param``."""
        item = self._items.get(oid)
        if item is None or item.owner != owner:
            raise NotFound(f"{self.kind} with id '{quoted(oid)}' not found.", param=param)
        self._by_owner[owner].move_to_end(oid)
        return item

    def delete(self, oid: str, owner: str | None = None) -> None:
        """Forget ``owner``'s ``oid``; NotFound when they have no such object."""
        self.get(oid, owner=owner)
        self._forget(oid)

    def owned(self, owner: str | None) -> list[tuple[str, T]]:
        """``owner``'s ids and objects (least recently used first; use does not change by listing)."""
        return [(oid, self._items[oid]) for oid in self._by_owner.get(owner, ())]

    def peek(self, oid: str, owner: str | None = None) -> T | None:
        """``owner``'s object ``oid`` or None, without counting as a use (listings look items up this way)."""
        item = self._items.get(oid)
        return item if item is not None and item.owner == owner else None

    def forgotten(self, oid: str, item: T) -> None:
        """Called when ``oid`` is deleted or evicted (or replaced by a new ``put``); nothing to do here."""

    def _forget(self, oid: str) -> None:
        item, size = self._items.pop(oid), self._sizes.pop(oid)
        self.forgotten(oid, item)
        ids = self._by_owner[item.owner]
        del ids[oid]
        self._owner_bytes[item.owner] -= size
        self.nbytes -= size
        if not ids:  # an owner with nothing stored is no candidate for eviction
            del self._by_owner[item.owner], self._owner_bytes[item.owner]


def page_limit(query: Mapping[str, str], default: int = 20) -> int:
    """The ``limit`` query parameter: an integer from 1 to 100 (400 naming ``limit`` otherwise)."""
    raw = query.get("limit")
    try:
        limit = default if raw is None else int(raw)
    except ValueError:
        raise InvalidRequest("'limit' must be an integer", param="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}", param="limit")
    return limit


def cursor_page(items: Sequence[Any], limit: int, order: str, after: str | None, what: str,
                ident: Callable[[Any], str] = itemgetter("id"), render: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """One page of ``items`` (oldest first) as an OpenAI cursor list.

    ``order`` is ``asc`` or ``desc``; ``after`` the last id of the previous page (400 when it is
    not among ``items``, whose kind ``what`` names in the message). ``ident`` reads an item's id;
    ``render``, when given, makes the wire object of each item on the page (only those).
    """
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [ident(i) for i in ordered]
        if after not in ids:
            raise InvalidRequest(f"No {what} with id '{quoted(after)}'", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page if render is None else [render(i) for i in page],
        "first_id": ident(page[0]) if page else None,
        "last_id": ident(page[-1]) if page else None,
        "has_more": len(ordered) > limit,
    }
