"""Input and output item ids of the Responses API: made fresh, or the client's own, and never two alike in a response."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY


def test_item_ids_are_distinct_random_hex(client):
    """Every id the server makes is its prefix and 128 random bits (32 hex digits), none repeated."""
    turn = [{"role": "user", "content": f"m{i}"} for i in range(40)]
    r = client.responses.create(model=TINY, input=turn, max_output_tokens=1)
    ids = [i.id for i in client.responses.input_items.list(r.id, limit=100).data] + [r.id, r.output[0].id]
    assert len(set(ids)) == len(ids) == 42
    for rid in ids:
        prefix, _, digits = rid.partition("_")
        assert prefix in ("msg", "resp") and len(digits) == 32 and int(digits, 16) >= 0


def test_a_client_id_is_kept_and_pages_by_it(client):
    fc = {"type": "function_call", "id": "fc_mine", "call_id": "call_1", "name": "f", "arguments": "{}"}
    out = {"type": "function_call_output", "call_id": "call_1", "output": "1"}
    r = client.responses.create(model=TINY, input=[{"role": "user", "content": "a", "id": "msg_mine"}, fc, out],
                                max_output_tokens=1)
    ids = [i.id for i in client.responses.input_items.list(r.id, order="asc", limit=1)]  # the SDK pages by id
    assert ids[:2] == ["msg_mine", "fc_mine"] and len(ids) == 3 and ids[2].startswith("fco_")


def test_a_repeated_input_item_id_is_a_400(client):
    """Two input items with one id made ``input_items.list`` auto-pagination loop forever (the cursor found the first of
    them again and again): now a 400 naming the second, as api.openai.com's "Duplicate item found"."""
    again = {"type": "message", "role": "user", "content": "again", "id": "msg_same"}
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input=[{"role": "user", "content": "x"}, again, again], max_output_tokens=1)
    assert exc.value.body["param"] == "input[2].id" and "msg_same" in exc.value.body["message"]
    assert exc.value.body["message"].startswith("Duplicate item found with id")
    call = {"type": "function_call", "id": "msg_same", "call_id": "c", "name": "f", "arguments": "{}"}
    with pytest.raises(openai.BadRequestError) as exc:  # across item types too
        client.responses.create(model=TINY, input=[again, call, {"type": "function_call_output", "call_id": "c", "output": "1"}],
                                max_output_tokens=1)
    assert exc.value.body["param"] == "input[1].id"


def test_an_input_item_id_that_is_not_a_string_is_a_400(client):
    """A non-string id was silently replaced by a fresh one."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input=[{"role": "user", "content": "x", "id": 5}], max_output_tokens=1)
    assert exc.value.body["param"] == "input[0].id" and exc.value.body["code"] == "invalid_type"
    r = client.responses.create(model=TINY, input=[{"role": "user", "content": "x", "id": None}], max_output_tokens=1)
    assert client.responses.input_items.list(r.id).data[0].id.startswith("msg_")


def test_resending_an_item_of_the_continued_conversation_is_a_400(client):
    """With ``previous_response_id`` the stored conversation is put in front already: an item of it sent again (the
    previous output appended to the input, as when a whole history is kept client-side too) was silently doubled in
    the prompt; api.openai.com answers "Duplicate item found" and so does this server now, across the whole chain."""
    first = client.responses.create(model=TINY, input=[{"role": "user", "content": "a", "id": "msg_first"}], max_output_tokens=2)
    second = client.responses.create(model=TINY, previous_response_id=first.id, input="b", max_output_tokens=2)
    resent = [o.model_dump(exclude_none=True) for o in first.output]
    for prev, items in ((first.id, resent), (second.id, resent), (second.id, [{"role": "user", "content": "a", "id": "msg_first"}])):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=TINY, previous_response_id=prev, max_output_tokens=1,
                                    input=[{"role": "user", "content": "c"}, *items])
        body = exc.value.body
        assert body["param"] == "input[1].id" and body["message"].startswith(f"Duplicate item found with id '{items[0]['id']}'")
    # the same items without previous_response_id are a whole conversation given inline: served
    inline = client.responses.create(model=TINY, max_output_tokens=1, input=[{"role": "user", "content": "a", "id": "msg_first"},
                                                                             *resent, {"role": "user", "content": "c"}])
    assert inline.status in ("completed", "incomplete")
