"""The openai SDK's higher-level helpers against the real server: ``.stream()``, ``.parse()`` and friends.

Each test drives the session server (tiny Llama) with the real SDK the way its helpers are used,
and checks what the helper hands its caller.
"""

from __future__ import annotations

import json

import openai
import pytest

#: a tool whose only valid arguments are ``{"unit":"celsius"}``: every call the grammar forces is the same call
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius"]}}, "required": ["unit"]}}}
#: SmolLM2's end tokens (<|endoftext|>, <|im_start|>, <|im_end|>) banned: the forced grammar cannot end
#: after one call, so the model writes the same call again, as small models forced to call a tool do
NO_END = {"0": -100, "1": -100, "2": -100}
ASK = [{"role": "user", "content": "Weather?"}]


def _calls(message) -> list[tuple[str, str]]:
    return [(t.function.name, t.function.arguments) for t in message.tool_calls or []]


def _same_call(a: tuple[str, str], b: tuple[str, str]) -> bool:
    try:
        return a[0] == b[0] and json.loads(a[1]) == json.loads(b[1])
    except ValueError:  # a call cut short is not a repeat (yet)
        return False


def test_a_forced_repeat_cut_by_max_tokens_is_not_sent_and_ends_the_reply(client):
    """A forced reply that writes its call again ends at the repeat with ``tool_calls``, one call, at every
    ``max_completion_tokens``: the repeat cut before its closing tag was sent as a second, identical call
    (the client runs it twice) with finish ``length`` (``parse()`` raises), and a repeat completed in the
    engine's last step kept finish ``length`` too. Streamed (the SDK's ``.stream()`` helper) and not."""
    one = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         max_completion_tokens=200, temperature=0)
    assert one.choices[0].finish_reason == "tool_calls" and _calls(one.choices[0].message) == [("get_weather", '{"unit":"celsius"}')]
    per_call = one.usage.completion_tokens
    cut_second, after = False, []
    for budget in range(per_call, 2 * per_call + 4):
        args = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", logit_bias=NO_END,
                    max_completion_tokens=budget, temperature=0)
        full = client.chat.completions.create(**args)
        calls, finish = _calls(full.choices[0].message), full.choices[0].finish_reason
        if len(calls) < 2 and not cut_second:
            assert finish == "length", budget  # still in the first call, or between the calls
            continue  # (the stream agrees there too: tests/test_tool_stream_agreement.py; this keeps the test short)
        done: list = []
        try:
            with client.chat.completions.stream(**args) as stream:
                done += [e for e in stream if e.type == "tool_calls.function.arguments.done"]
                streamed = stream.get_final_completion().choices[0]
        except openai.LengthFinishReasonError as exc:  # the helper refuses a reply cut by max_tokens
            streamed = exc.completion.choices[0]
        assert (_calls(streamed.message), streamed.finish_reason) == (calls, finish), budget
        assert len(done) == len(calls), budget
        assert not any(_same_call(a, b) for i, a in enumerate(calls) for b in calls[i + 1:]), (budget, calls)
        if len(calls) == 2:  # the second call cut short: as far as it got, finish length
            cut_second = True
            assert finish == "length", budget
        elif cut_second:  # past it the second call is whole, a repeat: dropped, and the reply is complete
            after.append(budget)
            assert (calls, finish) == ([("get_weather", '{"unit":"celsius"}')], "tool_calls"), budget
    assert cut_second and after, "the budgets never reached a second call"
    # the Responses API reads the same finish: completed, one function_call item
    r = client.responses.create(model="tiny", input="Weather?", tools=[{"type": "function", **WEATHER["function"]}],
                                tool_choice="required", max_output_tokens=after[0], temperature=0,
                                extra_body={"logit_bias": NO_END})
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"], (r.status, r.output)


def test_verbosity_other_than_the_default_is_refused_on_both_apis(client):
    """``text.verbosity`` on Responses was accepted and ignored (chat's ``verbosity`` was a 400 even at OpenAI's
    default): a level that would change the output is a 400 naming it on both, the default ``medium`` is fine."""
    for level in ("low", "high"):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="tiny", input="hi", max_output_tokens=2, text={"verbosity": level})
        assert (info.value.code, info.value.param) == ("unsupported_parameter", "text.verbosity")
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=2, verbosity=level)
        assert (info.value.code, info.value.param) == ("unsupported_parameter", "verbosity")
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, text={"verbosity": "medium"}, extra_body={"seed": 7})
    c = client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=2, verbosity="medium", seed=7)
    assert r.usage.output_tokens == 2 and c.usage.completion_tokens == 2


def test_stored_completions_can_be_deleted_or_retagged_while_the_sdk_pages_through_them(client):
    """``for c in client.chat.completions.list(...): delete(c.id)`` (or ``update`` out of the filter): the SDK
    asks for the next page ``after`` the last id of the previous one, which is gone or no longer matches;
    that was a 400 after the first page, so the loop stopped there. The cursor is a place in the order."""
    def store(n: int, tag: str) -> list[str]:
        return [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"{tag} {i}"}],
                                               max_completion_tokens=1, store=True, metadata={"sweep": tag}).id
                for i in range(n)]

    ids = store(7, "delete")
    seen = []
    for completion in client.chat.completions.list(limit=3, metadata={"sweep": "delete"}):
        seen.append(completion.id)
        client.chat.completions.delete(completion.id)
    assert seen == ids and client.chat.completions.list(metadata={"sweep": "delete"}).data == []

    ids = store(7, "retag")
    seen = []
    for completion in client.chat.completions.list(limit=3, order="desc", metadata={"sweep": "retag"}):
        seen.append(completion.id)
        client.chat.completions.update(completion.id, metadata={"sweep": "done"})
    assert seen == ids[::-1]
    done = {c.id for c in client.chat.completions.list(limit=100, metadata={"sweep": "done"})}
    assert set(ids) <= done
    # a cursor the caller never had is still a 400 naming it
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.list(after="chatcmpl-never-stored")
    assert info.value.param == "after"


def test_a_page_after_an_evicted_completion_goes_on():
    """The store's bound evicts the oldest completions; a listing paged after one of them continues from its
    place (only for its owner: to anyone else the id is unknown, a 400)."""
    from xllm_jupyter.openai.chat_store import CompletionStore, StoredCompletion, StoredCompletions

    stored = StoredCompletions(CompletionStore(capacity=3))
    for i in range(5):
        cid = f"chatcmpl-{i}"
        stored.store.put(cid, StoredCompletion({"id": cid, "created": 1, "model": "m"}, [], owner="ann", seq=i))
    assert [c["id"] for c in stored.list({}, user="ann")["data"]] == ["chatcmpl-2", "chatcmpl-3", "chatcmpl-4"]
    page = stored.list({"after": "chatcmpl-0", "limit": "2"}, user="ann")
    assert [c["id"] for c in page["data"]] == ["chatcmpl-2", "chatcmpl-3"] and page["has_more"]
    assert [c["id"] for c in stored.list({"after": "chatcmpl-3", "order": "desc"}, user="ann")["data"]] == ["chatcmpl-2"]
    with pytest.raises(Exception) as info:
        stored.list({"after": "chatcmpl-0"}, user="bob")
    assert getattr(info.value, "status", None) == 400 and info.value.param == "after"


def test_responses_cancel_says_why_it_cannot(client):
    """``client.responses.cancel(id)`` was a 404 "Unknown endpoint" (as if the id were unknown); a stored response
    is now a 400 saying only background responses can be cancelled, an unknown id the usual 404."""
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.cancel(r.id)
    assert "background" in info.value.message and info.value.body["type"] == "invalid_request_error"
    assert client.responses.retrieve(r.id).status == r.status  # untouched
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.cancel("resp_never")
    assert missing.value.code == "not_found" and "resp_never" in missing.value.message


def test_responses_tool_choice_in_chat_shape_says_name_is_missing(client):
    """A chat-shaped named ``tool_choice`` (``{"type": "function", "function": {"name": ...}}``) on the Responses
    API was refused as "tool_choice of type 'function' is not supported", wrongly: the flat shape with ``name``
    works. It is a 400 naming the missing ``tool_choice.name``, as api.openai.com's."""
    tools = [{"type": "function", **WEATHER["function"]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input="Weather?", tools=tools, max_output_tokens=40,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert (info.value.code, info.value.param) == ("missing_required_parameter", "tool_choice.name")
    assert "not supported" not in info.value.message
    r = client.responses.create(model="tiny", input="Weather?", tools=tools, max_output_tokens=40,
                                tool_choice={"type": "function", "name": "get_weather"})
    assert [(o.type, o.name) for o in r.output] == [("function_call", "get_weather")]
