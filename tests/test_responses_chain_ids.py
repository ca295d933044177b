"""Duplicate item ids across a ``previous_response_id`` chain part of which was deleted: the stored conversation
still holds the deleted response's items (each response keeps its whole conversation), so an item of it sent again
is still doubled in the prompt unless refused as on an intact chain."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY


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
