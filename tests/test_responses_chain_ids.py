"""Duplicate item ids across a ``previous_response_id`` chain part of which was deleted: the stored conversation
still holds the deleted response's items (each response keeps its whole conversation), so an item of it sent again
is still doubled in the prompt unless refused as on an intact chain."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.response_store import ResponseStore, StoredResponse


def test_an_item_of_a_deleted_response_of_the_chain_sent_again_is_still_a_400(client):
    first = client.responses.create(model=TINY, input=[{"role": "user", "content": "a", "id": "msg_chain_first"}],
                                    max_output_tokens=2)
    second = client.responses.create(model=TINY, previous_response_id=first.id, input="b", max_output_tokens=2)
    client.responses.delete(first.id)  # the second keeps the first's turn in its conversation all the same
    resent = [o.model_dump(exclude_none=True) for o in first.output]
    for items in (resent, [{"role": "user", "content": "a", "id": "msg_chain_first"}]):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=TINY, previous_response_id=second.id, max_output_tokens=1,
                                    input=[{"role": "user", "content": "c"}, *items])
        body = exc.value.body
        assert body["param"] == "input[1].id" and body["message"].startswith(f"Duplicate item found with id '{items[0]['id']}'")
    # a new item is still served, after the deletion
    third = client.responses.create(model=TINY, previous_response_id=second.id, input="c", max_output_tokens=1)
    assert third.status in ("completed", "incomplete")



def test_the_ids_a_response_keeps_of_its_chain_count_against_the_stores_bytes():
    # each response keeps its chain's item ids; once the responses that held them are deleted (or evicted), a
    # client's ids live on in that set only: counted there, or a chain deleted as it grows holds unbounded memory
    store = ResponseStore(capacity=100, max_bytes=300_000)
    ids = frozenset(f"msg_{i}_" + "x" * 100_000 for i in range(4))  # sent in responses of the chain deleted since
    store.put("resp_a", StoredResponse({"id": "resp_a"}, owner="u"))
    store.put("resp_b", StoredResponse({"id": "resp_b"}, item_ids=ids, owner="u"))
    assert store.nbytes > 400_000  # the ids' 400 kB, not 48 bytes an id
    assert store.peek("resp_a", owner="u") is None and store.peek("resp_b", owner="u") is not None  # over the bound
