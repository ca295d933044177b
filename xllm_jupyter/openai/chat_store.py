"""Stored chat completions (``store: true``): retrieve, list, update metadata, delete, list their messages.

A chat completion created with ``store: true`` is kept as it was returned (a stream as the
completion its chunks make, same id), with the request's messages, its ``metadata``, model
and created time. The store is an ``OwnedStore``: bounded with fair eviction, and each
completion is its creator's alone (anyone else gets a 404, as for an id never stored).
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from ..core.errors import InvalidRequest, quoted
from .chat_assembly import Chunk, CompletionAssembler
from .offload import off_loop_if, parse_body
from .owned_store import OwnedStore, cursor_page, page_limit
from .protocol import ChatCompletionRequest, StrictModel, check_metadata
from .timings import Timed

#: query parameters of ``GET /v1/chat/completions`` that filter on metadata: ``metadata[key]=value``
_METADATA_QUERY = ("metadata[", "]")
#: how many deleted or evicted completions' places in the listing order are remembered, so a listing paged
#: ``after`` one of them goes on (the SDK's ``for c in list(): delete(c.id)``); about 100 bytes each
GONE_CURSORS = 4096


@dataclass
class StoredCompletion:
    """A chat completion as returned, with its request's messages and its metadata."""

    completion: dict[str, Any]
    messages: list[dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)
    #: the user who created it (None = anonymous); only they can read, update or delete it
    owner: str | None = None
    #: orders completions created in the same second (``created`` has whole seconds)
    seq: int = 0
    #: its size as JSON, without the metadata (measured once, off the IOLoop when large)
    nbytes: int = 0

    def view(self) -> dict[str, Any]:
        """The object retrieve, list and update return: the completion with its current metadata."""
        return {**self.completion, "metadata": dict(self.metadata)}

    def order_key(self) -> tuple[int, int]:
        """Sorts by ``created``, then by arrival."""
        return self.completion.get("created") or 0, self.seq


class CompletionStore(OwnedStore[StoredCompletion]):
    """A bounded map from completion id to StoredCompletion, evicting fairly between users (event-loop use only)."""

    kind = "Chat completion"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: id -> (owner, order key) of completions no longer stored, oldest first (at most GONE_CURSORS)
        self._gone: OrderedDict[str, tuple[str | None, tuple[int, int]]] = OrderedDict()

    def size(self, item: StoredCompletion) -> int:
        """Its measured size plus its metadata's (which updates change)."""
        return item.nbytes + sum(len(k) + len(v) for k, v in item.metadata.items())

    def forgotten(self, oid: str, item: StoredCompletion) -> None:
        """Remember where ``oid`` stood in the listing order: a page may still be asked for after it."""
        self._gone[oid] = (item.owner, item.order_key())
        self._gone.move_to_end(oid)
        if len(self._gone) > GONE_CURSORS:
            self._gone.popitem(last=False)

    def place(self, oid: str, owner: str | None) -> tuple[int, int] | None:
        """``owner``'s ``oid``'s order key, stored or recently deleted/evicted; None when unknown to them."""
        item = self.peek(oid, owner)
        if item is not None:
            return item.order_key()
        gone = self._gone.get(oid)
        return gone[1] if gone is not None and gone[0] == owner else None


class CompletionUpdate(StrictModel):
    """``POST /v1/chat/completions/{id}`` body: the new metadata (null clears it)."""

    metadata: dict[str, str] | None

    def check(self) -> None:
        """OpenAI's metadata bounds."""
        check_metadata(self.metadata)


def _measured(req: ChatCompletionRequest, completion: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The request's messages as wire dicts, and their size with the completion's as JSON."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    return messages, len(json.dumps(messages)) + len(json.dumps(completion))


def store_message(cid: str, index: int, message: dict[str, Any]) -> dict[str, Any]:
    """A stored request message as ``messages.list`` returns it: an id, and text parts joined into ``content``.

    ``content_parts`` holds a content array as sent (null for string content), as OpenAI's does.
    """
    content = message.get("content")
    parts = None
    if isinstance(content, list):
        parts = content
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "".join(texts) if texts else None
    out = {**message, "id": f"{cid}-{index}", "content": content, "content_parts": parts}
    out.setdefault("name", None)
    return out


class StoredCompletions:
    """The stored-completion routes over a CompletionStore (no HTTP here)."""

    def __init__(self, store: CompletionStore | None = None):
        self.store = store if store is not None else CompletionStore()  # an empty store is falsy (__len__)
        self._seq = itertools.count()

    # ------------------------------------------------------------------ create
    async def keep(self, completion: dict[str, Any], req: ChatCompletionRequest, user: str | None, big: bool) -> None:
        """Store a finished ``completion`` of ``req`` for ``user`` (sized off the IOLoop when ``big``)."""
        heavy = big or bool(req.logprobs)  # a big request, or token logprobs: megabytes of JSON to measure
        messages, nbytes = await off_loop_if(heavy, _measured, req, completion)
        stored = StoredCompletion(completion, messages, dict(req.metadata or {}), user, next(self._seq), nbytes)
        self.store.put(completion["id"], stored)

    async def recording(self, chunks: AsyncIterator[Chunk], req: ChatCompletionRequest, user: str | None,
                        big: bool) -> AsyncIterator[Chunk]:
        """Pass a stream's chunks through and store the completion they make once it ends normally.

        ``chunks`` always carries usage (so the stored completion has it); unless the client asked
        for it (``stream_options.include_usage``), the usage fields and chunk are not passed on.
        """
        assembler = CompletionAssembler()
        client_usage = req.include_usage
        try:
            async for chunk in chunks:
                if isinstance(chunk, Timed):  # (the stream's end: with_timings, outside, puts them on its last chunk)
                    yield chunk
                    continue
                assembler.add(chunk)
                if not client_usage:
                    if not chunk["choices"]:
                        continue  # the usage chunk, which the client did not ask for
                    chunk.pop("usage", None)
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        # reached only when the stream finished: errors and early closes store nothing
        await self.keep(assembler.completion(), req, user, big)

    # ----------------------------------------------------------- stored objects
    def retrieve(self, cid: str, user: str | None = None) -> dict[str, Any]:
        """``GET /v1/chat/completions/{id}``; 404 when unknown, deleted, not stored or another user's."""
        return self.store.get(cid, owner=user).view()

    async def update(self, cid: str, body: bytes, user: str | None = None) -> dict[str, Any]:
        """``POST /v1/chat/completions/{id}``: replace the metadata, return the completion."""
        req: CompletionUpdate = await parse_body(CompletionUpdate, body)
        stored = self.store.get(cid, owner=user)  # after the (maybe off-loop) parse: a delete meanwhile stays a delete
        stored.metadata = dict(req.metadata or {})
        self.store.put(cid, stored)  # re-measured: metadata counts against the store's bytes
        return stored.view()

    def delete(self, cid: str, user: str | None = None) -> dict[str, Any]:
        """``DELETE /v1/chat/completions/{id}`` (``user``'s own completions only)."""
        self.store.delete(cid, owner=user)
        return {"object": "chat.completion.deleted", "id": cid, "deleted": True}

    def list(self, query: Mapping[str, str], user: str | None = None) -> dict[str, Any]:
        """``GET /v1/chat/completions``: ``user``'s stored completions by created time, one page.

        Filters: ``model`` and ``metadata[key]=value`` (all must match); paging: ``after``,
        ``limit`` (default 20, at most 100), ``order`` (``asc``, the default, or ``desc``).
        """
        limit = page_limit(query)
        start, end = _METADATA_QUERY
        wanted = {k[len(start):-len(end)]: v for k, v in query.items() if k.startswith(start) and k.endswith(end)}
        model = query.get("model")
        found = [(cid, s) for cid, s in self.store.owned(user)
                 if (model is None or s.completion.get("model") == model)
                 and all(s.metadata.get(k) == v for k, v in wanted.items())]
        found.sort(key=lambda pair: pair[1].order_key())
        order, after = query.get("order", "asc"), query.get("after")
        if after is not None:
            # the cursor is a place in the order, not a member of the page: the completion it names may have been
            # deleted or no longer match the filters since (updated), as when a client deletes or re-tags what it pages
            place = self.store.place(after, user)
            if place is None:
                raise InvalidRequest(f"No stored chat completion with id '{quoted(after)}'", param="after")
            found = [p for p in found if (p[1].order_key() > place if order != "desc" else p[1].order_key() < place)]
        # only the page's completions are copied into wire objects: a listing of 1,000 costs no 1,000 copies
        return cursor_page(found, limit, order, None, "stored chat completion", ident=itemgetter(0),
                           render=lambda pair: pair[1].view())

    def messages(self, cid: str, query: Mapping[str, str], user: str | None = None) -> dict[str, Any]:
        """``GET /v1/chat/completions/{id}/messages``: the request's messages with ids, one page."""
        limit = page_limit(query)
        stored = self.store.get(cid, owner=user)
        # pages over the messages' indices (ints: no per-message object for the collector to walk), and only the
        # page's messages are copied into wire objects: a 200,000-message history took 0.3 s a page, now 10 ms
        messages = stored.messages
        return cursor_page(range(len(messages)), limit, query.get("order", "asc"), query.get("after"),
                           "message in this chat completion", ident=lambda i: f"{cid}-{i}",
                           render=lambda i: store_message(cid, i, messages[i]))


__all__ = ["CompletionStore", "StoredCompletion", "StoredCompletions", "store_message"]
