"""Responses ``item_reference`` input items: the caller's stored items, sent by id (the Vercel AI SDK sends them).

They were a 400 "not supported yet". Another key's item reads as unknown (404), its text never shown.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig

ALICE, BOB = "sk-alice-key", "sk-bob-key"


@pytest.fixture(scope="module")
def keyed(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server with two user keys."""
    config = make_test_config(xllm_home, api_keys=(ALICE, BOB))
    config = dataclasses.replace(config, auth=AuthConfig(admin_keys=("sk-admin-key",)))
    with running_server(config, tiny_catalog, TINY) as info:
        yield info


@pytest.fixture(scope="module")
def http(keyed) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed.root, timeout=120) as c:
        yield c


def _post(http: httpx.Client, key: str, path: str, body: dict) -> httpx.Response:
    return http.post(path, headers={"Authorization": f"Bearer {key}"}, json={"model": TINY, **body})


def _stored(http: httpx.Client, key: str, **body: Any) -> dict:
    r = _post(http, key, "/v1/responses", {"max_output_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_reference_sends_the_stored_item_in_its_place(http):
    first = _stored(http, ALICE, input=[{"role": "user", "content": "the launch code is 4711"}])
    items = http.get(f"/v1/responses/{first['id']}/input_items", headers={"Authorization": f"Bearer {ALICE}"}).json()
    asked, answered = items["data"][0], first["output"][0]
    then = {"role": "user", "content": "repeat it"}
    refs = [{"type": "item_reference", "id": asked["id"]}, {"id": answered["id"]}, then]  # (type is optional in the SDK)
    explicit = [{"role": "user", "content": "the launch code is 4711"},
                {"role": "assistant", "content": answered["content"][0]["text"]}, then]
    counted = [_post(http, ALICE, "/v1/responses/input_tokens", {"input": i}).json() for i in (refs, explicit)]
    assert counted[0]["input_tokens"] == counted[1]["input_tokens"] > 0, counted
    second = _stored(http, ALICE, input=refs)
    listed = http.get(f"/v1/responses/{second['id']}/input_items?order=asc",
                      headers={"Authorization": f"Bearer {ALICE}"}).json()["data"]
    assert [(i["id"], i["role"]) for i in listed[:2]] == [(asked["id"], "user"), (answered["id"], "assistant")]
    assert listed[0]["content"][0]["text"] == "the launch code is 4711"
    # the second response's items can be referenced in turn, streamed too
    s = _post(http, ALICE, "/v1/responses", {"input": [{"type": "item_reference", "id": second["output"][0]["id"]}],
                                             "max_output_tokens": 2, "stream": True})
    assert s.status_code == 200 and ("response.completed" in s.text or "response.incomplete" in s.text), s.text


def test_another_keys_item_is_unknown(http):
    first = _stored(http, ALICE, input="the launch code is 0000")
    for ref in (first["output"][0]["id"], http.get(f"/v1/responses/{first['id']}/input_items",
                                                   headers={"Authorization": f"Bearer {ALICE}"}).json()["data"][0]["id"]):
        for path in ("/v1/responses", "/v1/responses/input_tokens"):
            r = _post(http, BOB, path, {"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": ref}],
                                        "max_output_tokens": 2})
            assert r.status_code == 404, r.text
            assert r.json()["error"]["param"] == "input[1].id" and "launch code" not in r.text
            assert r.json()["error"]["message"] == f"Item with id '{ref}' not found."


def test_unknown_unstored_and_malformed_references(http):
    unstored = _stored(http, ALICE, input="not kept", store=False)
    for ref in ("msg_nope", unstored["output"][0]["id"]):
        r = _post(http, ALICE, "/v1/responses", {"input": [{"type": "item_reference", "id": ref}]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "input[0].id", r.text
    for ref, code in ((None, "missing_required_parameter"), (5, "invalid_type")):
        r = _post(http, ALICE, "/v1/responses", {"input": [{"type": "item_reference", "id": ref}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].id", r.text
        assert r.json()["error"]["code"] == code


def test_a_deleted_responses_items_are_no_longer_found(http):
    first = _stored(http, ALICE, input="gone soon")
    assert http.delete(f"/v1/responses/{first['id']}", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
    r = _post(http, ALICE, "/v1/responses", {"input": [{"type": "item_reference", "id": first["output"][0]["id"]}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "input[0].id", r.text


def test_the_store_forgets_where_evicted_items_were():
    """The item index shrinks with the store (it held every id ever stored otherwise)."""
    from xllm_jupyter.openai.response_store import ResponseStore, StoredResponse

    store = ResponseStore(capacity=2)
    for n in range(5):
        item = {"id": f"msg_{n}", "type": "message", "role": "user", "content": []}
        store.put(f"resp_{n}", StoredResponse({"output": [{"id": f"out_{n}", "type": "message"}]}, [item], owner="a"))
    assert [store.find_item(f"msg_{n}", "a") is not None for n in range(5)] == [False, False, False, True, True]
    assert store.find_item("out_4", "a")["id"] == "out_4" and store.find_item("out_4", "b") is None
    assert len(store._holders) == 4


def test_deleting_the_latest_holder_still_finds_the_item_in_an_earlier_response(http):
    """A referenced item is held by the response that referenced it too; deleting that one lost it in the first
    (the index kept only the latest holder), though the first response is still stored."""
    first = _stored(http, ALICE, input="the launch code is 4711")
    ref = {"type": "item_reference", "id": first["output"][0]["id"]}
    second = _stored(http, ALICE, input=[ref])
    assert http.delete(f"/v1/responses/{second['id']}", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
    r = _post(http, ALICE, "/v1/responses", {"input": [ref], "max_output_tokens": 2})
    assert r.status_code == 200, r.text


def test_many_references_to_one_responses_items_are_looked_up_in_constant_time():
    """Each lookup scanned the holding response's items: 20,000 references to the items of a response of 20,000
    (a 0.6 MB body each) took seconds on the IOLoop (quadratic; minutes at 50,000)."""
    import time

    from xllm_jupyter.openai.item_references import resolve_references
    from xllm_jupyter.openai.response_items import message_item
    from xllm_jupyter.openai.response_store import ResponseStore, StoredResponse

    store = ResponseStore()
    items = [message_item("user", "") for _ in range(20_000)]
    store.put("resp_1", StoredResponse({"output": []}, items, owner="a"))
    refs = [{"type": "item_reference", "id": it["id"]} for it in items]
    started = time.perf_counter()
    resolved, size = resolve_references(refs, lambda iid: store.find_item(iid, "a"))
    assert time.perf_counter() - started < 1.5  # ~0.03 s; ~7 s before
    assert [it["id"] for it in resolved] == [it["id"] for it in items]
    assert size == sum(len(it["id"]) + len("message") + len("user") + len("completed") for it in items)


def test_the_item_index_finds_the_latest_stored_holder_after_any_puts_and_deletes():
    """Against a model: the item of that id in the latest stored response of that owner holding one (random puts,
    replacements, evictions and deletes; ids repeated across responses and owners)."""
    import random

    from xllm_jupyter.openai.response_store import ResponseStore, StoredResponse

    rnd = random.Random(1)
    for _ in range(200):
        store = ResponseStore(capacity=rnd.randint(1, 6))
        for step in range(40):
            if rnd.random() < 0.7 or not len(store):
                ins = {f"i{rnd.randint(0, 5)}": step for _ in range(rnd.randint(0, 3))}
                outs = [{"id": f"i{rnd.randint(0, 5)}", "out": step}] if rnd.random() < 0.5 else []
                store.put(f"r{rnd.randint(0, 8)}", StoredResponse({"output": outs}, [{"id": i, "in": s} for i, s in ins.items()],
                                                                  owner=rnd.choice(["a", "b", None])))
            else:
                oid, held = rnd.choice(store.owned(rnd.choice(["a", "b", None])) or store.owned("a") or store.owned("b")
                                       or store.owned(None))
                store.delete(oid, owner=held.owner)
            for owner in ("a", "b", None):
                for iid in (f"i{n}" for n in range(6)):
                    expected = None
                    for stored in store._items.values():  # (oldest put first)
                        if stored.owner == owner:
                            expected = next((it for it in [*stored.input_items, *stored.response["output"]][::-1]
                                             if it["id"] == iid), expected)
                    assert store.find_item(iid, owner) is expected
