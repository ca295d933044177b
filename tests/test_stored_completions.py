"""Stored chat completions (``store: true``) through the real openai SDK against the real server.

create(store=True, metadata=...) then retrieve / list (filters, cursor paging) / update /
delete / messages.list; a streamed stored completion; store false; bad metadata; and
ownership (another API key's user gets 404s) on a second real server with two keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any, Iterator

import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_tools import MSG as ASK
from tests.test_tools import TOOLS
from xllm_jupyter.core.config import CacheConfig, QuotaConfig
from xllm_jupyter.openai.cache import ResponseCache

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _tag() -> str:
    """A metadata value unique to one test, so listings see only that test's completions (the server is shared)."""
    return uuid.uuid4().hex[:12]


def _create(client: Any, run: str, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 3)
    return client.chat.completions.create(model=TINY, messages=MSGS, store=True, metadata={"run": run, **kw.pop("meta", {})}, **kw)


def test_a_stored_completion_is_retrieved_as_returned_with_its_metadata(client):
    run = _tag()
    c = _create(client, run, meta={"topic": "colours"}, n=2, temperature=1.0)
    got = client.chat.completions.retrieve(c.id)
    assert got.id == c.id and got.object == "chat.completion"
    assert got.model == c.model == TINY and got.created == c.created
    assert [ch.message.content for ch in got.choices] == [ch.message.content for ch in c.choices] and len(got.choices) == 2
    assert [ch.finish_reason for ch in got.choices] == [ch.finish_reason for ch in c.choices]
    assert got.usage.completion_tokens == c.usage.completion_tokens > 0
    assert got.metadata == {"run": run, "topic": "colours"}


def test_list_filters_by_model_and_metadata_and_pages_with_after_and_order(client):
    run = _tag()
    ids = [_create(client, run, meta={"i": str(i)}).id for i in range(3)]
    _create(client, _tag())  # another run: never listed below
    listed = client.chat.completions.list(metadata={"run": run})
    assert [c.id for c in listed.data] == ids  # oldest first by default
    assert listed.has_more is False
    assert [c.id for c in client.chat.completions.list(metadata={"run": run}, order="desc").data] == ids[::-1]
    assert [c.id for c in client.chat.completions.list(metadata={"run": run, "i": "1"}).data] == [ids[1]]
    assert client.chat.completions.list(metadata={"run": run}, model="no-such-model").data == []
    assert [c.id for c in client.chat.completions.list(metadata={"run": run}, model=TINY).data] == ids

    first = client.chat.completions.list(metadata={"run": run}, limit=2)
    assert [c.id for c in first.data] == ids[:2] and first.has_more is True
    second = client.chat.completions.list(metadata={"run": run}, limit=2, after=first.data[-1].id)
    assert [c.id for c in second.data] == ids[2:] and second.has_more is False
    back = client.chat.completions.list(metadata={"run": run}, limit=2, order="desc", after=ids[2])
    assert [c.id for c in back.data] == [ids[1], ids[0]] and back.has_more is False
    # the SDK's auto-paging walks every page by last id
    assert [c.id for c in client.chat.completions.list(metadata={"run": run}, limit=1)] == ids


def test_list_wire_shape_and_bad_paging_parameters(raw, client):
    run = _tag()
    c = _create(client, run)
    body = raw.get("/v1/chat/completions", params={"metadata[run]": run, "limit": 1}).json()
    assert body["object"] == "list" and body["first_id"] == body["last_id"] == c.id and body["has_more"] is False
    assert body["data"][0]["metadata"] == {"run": run}
    empty = raw.get("/v1/chat/completions", params={"metadata[run]": _tag()}).json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                          ({"order": "sideways"}, "order"), ({"after": "chatcmpl-none"}, "after")):
        r = raw.get("/v1/chat/completions", params=params)
        assert r.status_code == 400, params
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_update_replaces_the_metadata(client):
    run = _tag()
    c = _create(client, run, meta={"old": "1"})
    updated = client.chat.completions.update(c.id, metadata={"run": run, "new": "2"})
    assert updated.id == c.id and updated.metadata == {"run": run, "new": "2"}
    assert updated.choices[0].message.content == c.choices[0].message.content
    assert client.chat.completions.retrieve(c.id).metadata == {"run": run, "new": "2"}
    assert [x.id for x in client.chat.completions.list(metadata={"run": run, "new": "2"}).data] == [c.id]
    assert client.chat.completions.list(metadata={"run": run, "old": "1"}).data == []
    assert client.chat.completions.update(c.id, metadata=None).metadata == {}


def test_delete_forgets_it(client, raw):
    c = _create(client, _tag())
    r = raw.delete(f"/v1/chat/completions/{c.id}")
    assert r.status_code == 200 and r.json() == {"object": "chat.completion.deleted", "id": c.id, "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(c.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(c.id)
    d = _create(client, _tag())
    deleted = client.chat.completions.delete(d.id)
    assert deleted.deleted is True and deleted.id == d.id and deleted.object == "chat.completion.deleted"


def test_messages_list_returns_the_request_messages_with_ids(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Another.", "name": "ada"}]
    c = client.chat.completions.create(model=TINY, messages=messages, store=True, max_tokens=2)
    page = client.chat.completions.messages.list(c.id)
    assert [m.id for m in page.data] == [f"{c.id}-{i}" for i in range(4)]
    assert [m.role for m in page.data] == ["system", "user", "assistant", "user"]
    assert [m.content for m in page.data] == ["Be brief.", "Name a colour.", "Red.", "Another."]
    assert page.data[1].content_parts is not None and [p.text for p in page.data[1].content_parts] == ["Name ", "a colour."]
    assert page.data[0].content_parts is None and page.data[3].name == "ada"
    two = client.chat.completions.messages.list(c.id, limit=2, order="desc")
    assert [m.content for m in two.data] == ["Another.", "Red."] and two.has_more is True
    rest = client.chat.completions.messages.list(c.id, limit=2, order="desc", after=two.data[-1].id)
    assert [m.content for m in rest.data] == ["Name a colour.", "Be brief."] and rest.has_more is False
    assert [m.id for m in client.chat.completions.messages.list(c.id, limit=1)] == [f"{c.id}-{i}" for i in range(4)]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list("chatcmpl-unknown")


def test_messages_list_renders_only_the_page(client, monkeypatch):
    """A page of a long stored history copies only its own messages into wire objects (GETs are not metered and
    run on the IOLoop: a 200,000-message history cost 0.3 s per page when every message was copied first)."""
    from xllm_jupyter.openai import chat_store

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(41)]
    c = client.chat.completions.create(model=TINY, messages=turns, store=True, max_tokens=1)
    rendered: list[int] = []
    real = chat_store.store_message

    def counting(cid, index, message):
        rendered.append(index)
        return real(cid, index, message)

    monkeypatch.setattr(chat_store, "store_message", counting)
    page = client.chat.completions.messages.list(c.id, limit=3, order="desc", after=f"{c.id}-30")
    assert [m.content for m in page.data] == ["m29", "m28", "m27"] and page.has_more is True
    assert [m.id for m in page.data] == [f"{c.id}-{i}" for i in (29, 28, 27)]
    assert rendered == [29, 28, 27]  # the page only, not all 41
    rendered.clear()
    last = client.chat.completions.messages.list(c.id, limit=5, after=f"{c.id}-38")
    assert [m.content for m in last.data] == ["m39", "m40"] and last.has_more is False and last.last_id == f"{c.id}-40"
    assert rendered == [39, 40]
    with pytest.raises(openai.BadRequestError):  # an id of no message of this completion is no cursor
        client.chat.completions.messages.list(c.id, after=f"{c.id}-41")


def test_a_streamed_stored_completion_is_retrieved_with_the_same_id_and_content(client, raw):
    run = _tag()
    stream = client.chat.completions.create(model=TINY, messages=MSGS, store=True, metadata={"run": run}, stream=True,
                                            max_tokens=6, n=2, temperature=1.0)
    texts, ids, finish, usage_chunks = ["", ""], set(), [None, None], 0
    for chunk in stream:
        ids.add(chunk.id)
        usage_chunks += chunk.usage is not None  # not asked for: none, though the stored completion counts usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert len(ids) == 1 and usage_chunks == 0
    got = client.chat.completions.retrieve(ids.pop())
    assert [ch.message.content for ch in got.choices] == texts and [ch.index for ch in got.choices] == [0, 1]
    assert [ch.finish_reason for ch in got.choices] == finish
    assert got.object == "chat.completion" and got.usage.completion_tokens > 0
    assert got.metadata == {"run": run}
    # with usage asked for, the stream's usage chunk and the stored usage agree
    chunks = list(client.chat.completions.create(model=TINY, messages=MSGS, store=True, stream=True, max_tokens=4,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert client.chat.completions.retrieve(chunks[0].id).usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_a_streamed_stored_tool_call_is_the_completion_the_full_request_returns(client):
    """The stored stream's tool calls are put together from their fragments: the same as the non-streamed reply."""
    kw = dict(model=TINY, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=2, store=True)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    got = client.chat.completions.retrieve(chunks[0].id).choices[0]
    want = full.choices[0]
    assert want.message.tool_calls and got.finish_reason == want.finish_reason == "tool_calls"
    assert got.message.content is None and want.message.content is None
    assert [(t.function.name, t.function.arguments) for t in got.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in want.message.tool_calls]
    first_ids = [f.id for ch in chunks for c in ch.choices for f in c.delta.tool_calls or () if f.id]
    assert [t.id for t in got.message.tool_calls] == first_ids and all(t.type == "function" for t in got.message.tool_calls)


def test_a_streamed_stored_completion_keeps_every_tokens_logprobs(client):
    chunks = list(client.chat.completions.create(model=TINY, messages=MSGS, store=True, stream=True, max_tokens=5,
                                                 logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}))
    streamed = [(t.token, t.logprob) for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    got = client.chat.completions.retrieve(chunks[0].id).choices[0].logprobs.content
    assert len(streamed) == 5 and [(t.token, t.logprob) for t in got] == streamed
    assert all(len(t.top_logprobs) == 2 for t in got)


def test_without_store_nothing_is_kept(client, raw):
    run = _tag()
    for store in (False, None):
        kw = {} if store is None else {"store": store}
        c = client.chat.completions.create(model=TINY, messages=MSGS, max_tokens=2, metadata={"run": run}, **kw)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(c.id)
    assert client.chat.completions.list(metadata={"run": run}).data == []
    r = raw.get("/v1/chat/completions/chatcmpl-nothing")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "not_found" and "chatcmpl-nothing" in err["message"]
    for call in (lambda: raw.post("/v1/chat/completions/chatcmpl-nothing", json={"metadata": {}}),
                 lambda: raw.delete("/v1/chat/completions/chatcmpl-nothing"),
                 lambda: raw.get("/v1/chat/completions/chatcmpl-nothing/messages")):
        assert call().status_code == 404


def test_bad_metadata_is_a_400_naming_it(client, raw):
    cases = [({f"k{i}": "v" for i in range(17)}, "metadata"), ({"k" * 65: "v"}, "metadata." + "k" * 64),
             ({"k": "v" * 513}, "metadata.k"), ({"k": 1}, "metadata.k")]
    for metadata, param in cases:
        r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSGS, "store": True, "max_tokens": 1,
                                                    "metadata": metadata})
        assert r.status_code == 400, metadata
        assert r.json()["error"]["param"] == param, r.json()
    c = _create(client, _tag())
    for metadata, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.update(c.id, metadata=metadata)
        assert exc.value.body["param"] == param
    r = raw.post(f"/v1/chat/completions/{c.id}", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    assert r.json()["error"]["param"] == "metadata"
    assert raw.post(f"/v1/chat/completions/{c.id}", content=b"{not json").status_code == 400
    assert client.chat.completions.retrieve(c.id).metadata["run"]  # unchanged by the refusals
    # sixteen pairs of the longest keys and values are fine
    fine = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    ok = client.chat.completions.create(model=TINY, messages=MSGS, store=True, metadata=fine, max_tokens=1)
    assert client.chat.completions.retrieve(ok.id).metadata == fine


def test_the_response_cache_never_replays_a_stored_completion():
    """A stored completion is a new object with its own id, even for a request the cache could answer."""
    cache = ResponseCache(CacheConfig(enabled=True))
    made: list[str] = []

    async def produce(body: bytes) -> dict[str, Any]:
        made.append(body.decode())
        return {"id": f"chatcmpl-{len(made)}"}

    async def identity(model: str) -> str:
        return "digest"

    async def twice(body: bytes) -> list[str]:
        return [(await cache.serve("chat", body, produce, identity))["id"] for _ in range(2)]

    stored = b'{"model": "m", "messages": [], "temperature": 0, "store": true}'
    assert asyncio.run(twice(stored)) == ["chatcmpl-1", "chatcmpl-2"]
    assert asyncio.run(twice(stored.replace(b"true", b"false"))) == ["chatcmpl-3", "chatcmpl-3"]  # cached as before


# ------------------------------------------------------------------ ownership
ALICE, BOB = "sk-alice-stored", "sk-bob-stored"


@pytest.fixture(scope="module")
def two_users(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server with two user keys (each key is its own user) and a daily quota one generation spends."""
    config = dataclasses.replace(make_test_config(xllm_home, api_keys=(ALICE, BOB)), quotas=QuotaConfig(tokens_per_day=1))
    with running_server(config, tiny_catalog, TINY) as info:
        yield info


def test_another_users_stored_completion_is_a_404(two_users):
    with openai.OpenAI(base_url=two_users.base_url, api_key=ALICE, max_retries=0) as alice, \
            openai.OpenAI(base_url=two_users.base_url, api_key=BOB, max_retries=0) as bob:
        c = alice.chat.completions.create(model=TINY, messages=MSGS, store=True, metadata={"who": "alice"}, max_tokens=2)
        for call in (lambda: bob.chat.completions.retrieve(c.id),
                     lambda: bob.chat.completions.update(c.id, metadata={"who": "bob"}),
                     lambda: bob.chat.completions.messages.list(c.id),
                     lambda: bob.chat.completions.delete(c.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert bob.chat.completions.list().data == []
        with pytest.raises(openai.BadRequestError):  # alice's id is no cursor in bob's listing either
            bob.chat.completions.list(after=c.id)
        with pytest.raises(openai.RateLimitError):  # alice's daily quota is spent ...
            alice.chat.completions.create(model=TINY, messages=MSGS, max_tokens=1)
        # ... yet reading her stored completions queues no generation, so it is not refused
        assert [x.id for x in alice.chat.completions.list().data] == [c.id]
        assert alice.chat.completions.retrieve(c.id).metadata == {"who": "alice"}  # untouched
        assert alice.chat.completions.delete(c.id).deleted
