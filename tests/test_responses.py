"""The Responses API end to end: real server, real tiny Llama, the real openai SDK."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent
from pydantic import TypeAdapter

from tests.helpers import is_json
from tests.server_fixtures import TINY

EVENT_ORDER_HEAD = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
EVENT_ORDER_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]




#: seeded sampling: reproducible, and more varied text than greedy decoding of random weights
SEEDED = dict(temperature=1.0, max_output_tokens=16, extra_body={"seed": 1234})


def _stop_for(client, **kw) -> tuple[str, str]:
    """A stop string the seeded output contains, and the (non-empty) text that stop leaves."""
    full = client.responses.create(model=TINY, **SEEDED, **kw).output_text
    for k in range(2, len(full) - 3):
        stop = full[k : k + 3]
        if stop.strip() and full.find(stop) >= 2:
            return stop, full[: full.find(stop)]
    raise AssertionError(f"the seeded output has nothing to cut at: {full!r}")


# ------------------------------------------------------------------------ create
def test_create_string_input(client):
    r = client.responses.create(model=TINY, input="Say something.", max_output_tokens=5, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == TINY
    assert r.output_text
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].text == r.output_text
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 5
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0
    # random weights run to the budget: incomplete, with the reason
    if u.output_tokens == 5:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert msg.status == "incomplete"
    assert r.error is None and r.max_output_tokens == 5 and r.temperature == 0 and r.store is True


def test_create_message_list_and_instructions(client):
    base = client.responses.create(model=TINY, input="Hello", max_output_tokens=2, extra_body={"seed": 7})
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there."}]},
        {"role": "user", "content": "Again"},
    ]
    # seeded: an unseeded random model ends at once about 1 run in 25,000, with no text
    r = client.responses.create(model=TINY, input=items, instructions="You are a test.", max_output_tokens=2, metadata={"k": "v"},
                                extra_body={"seed": 7})
    assert r.output_text and r.instructions == "You are a test." and r.metadata == {"k": "v"}
    assert r.usage.input_tokens > base.usage.input_tokens + 10  # every item reached the prompt
    # metadata is stored with the response: OpenAI's bounds (64-character keys, 512-character values) hold
    for bad in ({"k": "v" * 513}, {"k" * 65: "v"}):
        with pytest.raises(openai.BadRequestError, match="metadata"):
            client.responses.create(model=TINY, input="Hello", max_output_tokens=2, metadata=bad)
    # only the text settings the server honours are echoed and stored
    r = client.responses.create(model=TINY, input="Hello", max_output_tokens=2,
                                text={"format": {"type": "text"}, "junk": "x" * 1000})
    assert r.text.format.type == "text" and "junk" not in r.text.model_dump()


def test_completed_status_with_stop(client):
    stop, cut = _stop_for(client, input="Tell me a story.")
    r = client.responses.create(model=TINY, input="Tell me a story.", temperature=1.0, max_output_tokens=16, extra_body={"seed": 1234, "stop": [stop]})
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output_text == cut and r.output[0].status == "completed"


# --------------------------------------------------------------------- streaming
def test_stream_events(client, raw):
    stream = client.responses.create(model=TINY, input="Say something.", max_output_tokens=6, temperature=0, stream=True)
    events = list(stream)
    types = [e.type for e in events]
    assert types[:4] == EVENT_ORDER_HEAD
    assert types[-4:-1] == EVENT_ORDER_TAIL and types[-1] in ("response.completed", "response.incomplete")
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text == events[-4].text
    assert final.usage.output_tokens <= 6 and final.usage.input_tokens > 0
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    # the wire: typed events with matching `event:` lines and no [DONE]
    with raw.stream("POST", "/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 2, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    blocks = [b for b in body.split("\n\n") if b.strip() and not b.startswith(":")]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert json.loads(data_line[len("data: "):])["type"] == event_line[len("event: "):]
    assert "[DONE]" not in body


def test_stream_helper_final_response(client):
    stop, cut = _stop_for(client, input="Write a poem.")
    with client.responses.stream(model=TINY, input="Write a poem.", temperature=1.0, max_output_tokens=16, extra_body={"seed": 1234, "stop": [stop]}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == deltas == cut
    # the stored copy is the same response
    assert client.responses.retrieve(final.id).output_text == cut


# ------------------------------------------------------------ store and continue
def test_retrieve_delete_and_input_items(client):
    r = client.responses.create(model=TINY, input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}], max_output_tokens=2)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    items = client.responses.input_items.list(r.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["one", "two"]
    assert [i.content[0].text for i in client.responses.input_items.list(r.id).data] == ["two", "one"]  # desc by default
    d = client.responses.delete(r.id)
    assert d is None or getattr(d, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_delete_body(raw, client):
    r = client.responses.create(model=TINY, input="x", max_output_tokens=1)
    resp = raw.delete(f"/v1/responses/{r.id}")
    assert resp.status_code == 200
    assert resp.json() == {"id": r.id, "object": "response.deleted", "deleted": True}


def test_store_false_is_not_retrievable(client):
    r = client.responses.create(model=TINY, input="secret", max_output_tokens=2, store=False, extra_body={"seed": 7})
    assert r.output_text and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as exc:  # as api.openai.com: a 400, not the retrieve's 404
        client.responses.create(model=TINY, input="more", previous_response_id=r.id, max_output_tokens=2)
    assert (exc.value.body["param"], exc.value.body["code"]) == ("previous_response_id", "previous_response_not_found")


def test_previous_response_id_continues(client):
    seeded = {"extra_body": {"seed": 7}}  # an unseeded random model can draw an end token first: cont's text empty
    first = client.responses.create(model=TINY, input="My name is Ada and I like long walks.", max_output_tokens=4,
                                    instructions="Be kind.", **seeded)
    alone = client.responses.create(model=TINY, input="What is my name?", max_output_tokens=4)
    cont = client.responses.create(model=TINY, input="What is my name?", previous_response_id=first.id, max_output_tokens=4,
                                   **seeded)
    assert cont.previous_response_id == first.id and cont.output_text
    # the earlier turn's input and output are in the prompt (instructions are not carried over)
    earlier = first.usage.input_tokens + first.usage.output_tokens
    assert cont.usage.input_tokens >= alone.usage.input_tokens + earlier - 12  # 12: the system turn not repeated
    assert cont.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    # and chains keep growing
    third = client.responses.create(model=TINY, input="And again?", previous_response_id=cont.id, max_output_tokens=2)
    assert third.usage.input_tokens > cont.usage.input_tokens


# ------------------------------------------------------------------------ errors
def test_errors(client, raw):
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="no-such-model", input="x")
    assert exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input="x", previous_response_id="resp_unknown")
    # api.openai.com's answer, which agent loops branch on (status and code) to resend the whole conversation
    assert exc.value.status_code == 400 and exc.value.body == {
        "message": "Previous response with id 'resp_unknown' not found.", "type": "invalid_request_error",
        "param": "previous_response_id", "code": "previous_response_not_found"}
    cases = [
        ({"model": TINY}, "input"),
        ({"model": TINY, "input": 5}, "input"),
        ({"model": TINY, "input": ["hi"]}, "input[0]"),  # an item that is not an object (was "should be a valid string")
        ({"model": TINY, "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": TINY, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"model": TINY, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": TINY, "input": "x", "max_output_tokens": 10**7}, "max_output_tokens"),
        ({"model": TINY, "input": "x", "temperature": 3}, "temperature"),
        ({"model": TINY, "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": TINY, "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"model": TINY, "input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
        ({"model": TINY, "input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]}, "input[0].summary[0].text"),
        ({"model": TINY, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": TINY, "input": "x", "include": ["file_search_call.results"]}, "include[0]"),
        ({"model": TINY, "input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort"),  # (no effort in the template)
    ]
    for body, param in cases:
        resp = raw.post("/v1/responses", json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["param"] == param, (body, resp.json())
    # a chat limit's message names the Responses parameter, as its param does
    resp = raw.post("/v1/responses", json={"model": TINY, "input": "x", "max_output_tokens": 10**7})
    assert "max_output_tokens" in resp.json()["error"]["message"] and "max_completion" not in resp.json()["error"]["message"]
    for path in ("/v1/responses/resp_nope", "/v1/responses/resp_nope/input_items"):
        resp = raw.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "invalid_request_error"
    assert raw.delete("/v1/responses/resp_nope").status_code == 404
    # the server keeps serving
    assert client.responses.create(model=TINY, input="still there?", max_output_tokens=1).output_text is not None


def test_text_format_json_schema(client):
    """``text.format`` json_schema reaches chat's constrained decoding: the output matches the schema."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}}
    r = client.responses.create(model=TINY, input="JSON please", text=fmt, max_output_tokens=40, temperature=0)
    assert r.status == "completed", r.output_text
    assert isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.text.format.type == "json_schema" and r.text.format.name == "x"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input="x", text={"format": {"type": "json_schema", "name": "x"}})
    assert exc.value.body["param"] == "text.format.schema"


# ------------------------------------------------------------------------- tools
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": False},
}
FORCED = {"type": "function", "name": "get_weather"}


def test_forced_function_call_and_its_output(client):
    r = client.responses.create(model=TINY, input="Weather?", tools=[WEATHER], tool_choice=FORCED, max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("fc_")
    assert json.loads(calls[0].arguments)["unit"] in ("c", "f")
    assert r.tools[0].name == "get_weather"
    # hand the result back: a function_call_output continues the stored turn
    follow = client.responses.create(
        model=TINY,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}],
        tools=[WEATHER],
        max_output_tokens=3,
    )
    assert follow.output_text is not None and follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    kinds = [i.type for i in client.responses.input_items.list(follow.id).data]
    assert kinds == ["function_call_output"]
    # the same turn given explicitly (function_call item + output) also works
    explicit = client.responses.create(
        model=TINY,
        input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"unit": "c"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "21"},
        ],
        tools=[WEATHER],
        max_output_tokens=2,
    )
    assert explicit.usage.input_tokens > 0


def test_function_call_streams(client):
    with client.responses.stream(model=TINY, input="Weather?", tools=[WEATHER], tool_choice=FORCED, max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    call = next(o for o in final.output if o.type == "function_call")
    assert deltas == done.arguments == call.arguments and json.loads(call.arguments)["unit"] in ("c", "f")
    assert final.status == "completed" and types[-1] == "response.completed"


def _items_in_order(events) -> list:
    """Each output item's events, checked to come one item at a time (added, deltas, done, then the next)."""
    current, items = None, []
    for e in events:
        index = getattr(e, "output_index", None)
        if e.type == "response.output_item.added":
            assert current is None and index == len(items), [x.type for x in events]  # the previous item is done
            current = index
        elif e.type == "response.output_item.done":
            assert index == current
            items.append(e.item)
            current = None
        elif index is not None:
            assert index == current, e.type  # deltas only for the open item
    assert current is None
    return items


def test_output_items_stream_one_at_a_time(client):
    """Several function calls stream as OpenAI streams items: each is done before the next is added, and
    the item a max_output_tokens cut falls in is the only incomplete one, streamed or not."""
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "name": name, "parameters": city} for name in ("get_weather", "get_time")]
    several = cut_after_a_call = 0
    for seed in range(6):
        kw = dict(model=TINY, input="Weather?", tools=tools, tool_choice="required", max_output_tokens=80,
                  temperature=1.0, extra_body={"seed": seed})
        events = list(client.responses.create(stream=True, **kw))
        items = _items_in_order(events)
        final = events[-1].response
        assert [i.id for i in items] == [o.id for o in final.output]
        # a cut reply was cut inside its last item, unless that is a call with complete arguments (cut after it)
        cut = final.status == "incomplete" and not (final.output[-1].type == "function_call" and is_json(final.output[-1].arguments))
        assert [o.status for o in final.output] == ["completed"] * (len(items) - 1) + ["incomplete" if cut else "completed"]
        assert [o.status for o in client.responses.create(**kw).output] == [o.status for o in final.output]
        several += len(items) > 1
        cut_after_a_call += final.status == "incomplete" and not cut
    assert several and cut_after_a_call, "no seed gave several calls, or a cut after a complete call: pick other seeds"


def test_a_stream_that_fails_midway_ends_with_typed_events(client, raw, xllm_server):
    """Unloading the model under a streamed response: the stream ends with an ``error`` event and
    ``response.failed`` (typed, numbered on), which the SDK raises as APIError; nothing is stored."""
    body = {"model": TINY, "input": "Go on.", "max_output_tokens": 1900, "stream": True, "ignore_eos": True}
    with raw.stream("POST", "/v1/responses", json=body) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line == "event: response.output_text.delta":
                break
        assert raw.post("/admin/models/unload", json={"model": TINY}).json()["unloaded"] is True
        rest = "\n".join(lines)
    blocks = [b for b in rest.split("\n\n") if b.strip() and not b.startswith(":")]
    error, failed = (json.loads(b.split("\ndata: ", 1)[1]) for b in blocks[-2:])
    assert blocks[-2].startswith("event: error\n") and blocks[-1].startswith("event: response.failed\n")
    assert error["type"] == "error" and error["code"] == "overloaded" and "was unloaded" in error["message"]
    assert failed["sequence_number"] == error["sequence_number"] + 1
    # the response's error.code is one of OpenAI's (an enum in the SDK; it was "overloaded"), the event's this server's
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"
    assert "was unloaded" in failed["response"]["error"]["message"]
    # its output holds the text streamed before the failure (it had the open message's empty start), cut there
    data = [json.loads(line[len("data: "):]) for line in rest.split("\n") if line.startswith("data: ")]
    streamed = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    (message,) = failed["response"]["output"]
    assert streamed and message["content"][0]["text"] == streamed and message["status"] == "incomplete"
    TypeAdapter(ResponseErrorEvent).validate_python(error)  # strictly the SDK's types (it parses leniently)
    TypeAdapter(ResponseFailedEvent).validate_python(failed)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(failed["response"]["id"])
    # the SDK raises it, as it does for chat
    stream = client.responses.create(model=TINY, input="Go on.", max_output_tokens=1900, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it), next(it)
    assert raw.post("/admin/models/unload", json={"model": TINY}).json()["unloaded"] is True
    with pytest.raises(openai.APIError) as info:
        for _ in it:
            pass
    assert info.value.code == "overloaded"
    assert client.responses.create(model=TINY, input="still there?", max_output_tokens=1).output_text is not None


def test_output_text_logprobs(client):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: each output token's logprob, on the
    output_text part and on the stream's deltas (joining to the text); nothing without it."""
    kw = dict(model=TINY, input="Say something.", max_output_tokens=6, temperature=0, top_logprobs=2)
    r = client.responses.create(include=["message.output_text.logprobs"], **kw)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens and "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs) and r.top_logprobs == 2
    events = list(client.responses.create(include=["message.output_text.logprobs"], stream=True, **kw))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in done.logprobs] == [lp.token for lp in part.logprobs]
    assert [lp.model_dump() for lp in events[-1].response.output[0].content[0].logprobs] == [lp.model_dump() for lp in done.logprobs]
    assert client.responses.create(**kw).output[0].content[0].logprobs is None
    # what a client asks for with every store=false request (reasoning items' encrypted content) is none here
    r = client.responses.create(model=TINY, input="x", max_output_tokens=1, store=False, include=["reasoning.encrypted_content"],
                                reasoning={"effort": None})
    assert r.output_text is not None
