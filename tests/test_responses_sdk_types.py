"""The Responses API's wire objects, validated in full against the openai SDK's own pydantic types.

The SDK parses leniently (a missing required field reads as None), so ``client.responses.create`` succeeding says
little: here every Response, streamed event and input item is validated strictly by the type the SDK declares for it.
"""

from __future__ import annotations

import json
import time
import typing

import openai
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.server_fixtures import TINY

#: a schema the tiny model's constrained output completes within the budget (so a ``completed`` response)
OK_FORMAT = {"format": {"type": "json_schema", "name": "ok", "strict": True, "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
                          "additionalProperties": False}}

#: event type -> the SDK's class for it (ResponseStreamEvent is a union on ``type``)
_EVENT_TYPES = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
                for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}

BODIES = {
    "text": {"input": "Hi", "max_output_tokens": 4, "instructions": "Be brief.", "metadata": {"k": "v"}},
    "completed": {"input": "JSON please", "text": OK_FORMAT, "max_output_tokens": 40, "temperature": 0},
    "unnamed format": {"input": "JSON please", "max_output_tokens": 40, "temperature": 0,
                       "text": {"format": {k: v for k, v in OK_FORMAT["format"].items() if k != "name"}}},
    "logprobs": {"input": "Hi", "max_output_tokens": 3, "include": ["message.output_text.logprobs"], "top_logprobs": 2},
    "call": {"input": "Weather?", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
             "max_output_tokens": 60, "temperature": 0, "parallel_tool_calls": False},
    # a function_call item with status incomplete in a completed response
    "cut call": {"input": "Weather?", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
                 "max_output_tokens": 60, "temperature": 0, "parallel_tool_calls": False, "stop": ['"}']},
}


def _sse(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("case", sorted(BODIES))
def test_every_wire_object_validates_as_its_sdk_type(raw, case):
    """A response, its retrieved copy, its input items and every event of the same request streamed validate as the
    SDK's types. ``usage.input_tokens_details`` lacked ``cache_write_tokens`` (required there) on the old code."""
    body = {"model": TINY, **BODIES[case]}
    resp = raw.post("/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    TypeAdapter(Response).validate_python(resp.json())
    rid = resp.json()["id"]
    TypeAdapter(Response).validate_python(raw.get(f"/v1/responses/{rid}").json())
    for item in raw.get(f"/v1/responses/{rid}/input_items").json()["data"]:
        TypeAdapter(ResponseItem).validate_python(item)
    events = _sse(raw.post("/v1/responses", json={**body, "stream": True}).text)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    for event in events:
        TypeAdapter(_EVENT_TYPES[event["type"]]).validate_python(event)


def test_usage_reads_as_numbers_in_the_sdk(client):
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=3)
    details = r.usage.input_tokens_details
    assert details.cache_write_tokens == 0 and details.cached_tokens == 0  # was None: not sent
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert client.responses.retrieve(r.id).usage.input_tokens_details.cache_write_tokens == 0
    with client.responses.stream(model=TINY, input="Hi", max_output_tokens=40, text=OK_FORMAT, temperature=0) as s:
        final = s.get_final_response()
    assert final.usage.input_tokens_details.cache_write_tokens == 0


def test_completed_at_is_set_on_completed_responses_only(client):
    """``completed_at`` (the SDK's Response field, "only present when the status is completed") was never sent."""
    before = int(time.time())
    r = client.responses.create(model=TINY, input="JSON please", text=OK_FORMAT, max_output_tokens=40, temperature=0)
    assert r.status == "completed"
    assert r.completed_at is not None and before <= r.created_at <= r.completed_at <= time.time()
    assert client.responses.retrieve(r.id).completed_at == r.completed_at
    cut = client.responses.create(model=TINY, input="Hi", max_output_tokens=2, extra_body={"seed": 7})  # (unseeded: can end first)
    assert cut.status == "incomplete" and cut.completed_at is None
    with client.responses.stream(model=TINY, input="JSON please", text=OK_FORMAT, max_output_tokens=40, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    assert events[0].response.completed_at is None and events[1].response.completed_at is None  # still in progress
    assert final.status == "completed" and final.completed_at >= final.created_at
    assert client.responses.retrieve(final.id).completed_at == final.completed_at



def test_an_unnamed_json_schema_format_is_shown_with_the_name_it_was_given(client):
    """OpenAI requires ``text.format.name``; this server serves a format without one and named it "response" for the
    constraint, but echoed the format unnamed, which the SDK's type does not allow (``r.text.format.name`` was None)."""
    fmt = {k: v for k, v in OK_FORMAT["format"].items() if k != "name"}
    r = client.responses.create(model=TINY, input="JSON please", text={"format": fmt}, max_output_tokens=40, temperature=0)
    assert r.status == "completed" and json.loads(r.output_text)["ok"] in (True, False)
    assert r.text.format.type == "json_schema" and r.text.format.name == "response" and r.text.format.strict is True
    assert client.responses.retrieve(r.id).text.format.name == "response"
    named = client.responses.create(model=TINY, input="JSON please", text=OK_FORMAT, max_output_tokens=40, temperature=0)
    assert named.text.format.name == "ok"


class Weather(BaseModel):
    city: str


def test_a_chat_shaped_tool_in_create_says_responses_tools_are_flat(client):
    """``openai.pydantic_function_tool()`` makes chat's nested tool; ``responses.parse`` flattens it, ``create`` sends
    it as is: the 400 (OpenAI's words) now also says what shape is wanted."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input="Weather?", tools=[openai.pydantic_function_tool(Weather)], max_output_tokens=1)
    body = exc.value.body
    assert body["param"] == "tools[0].name" and body["code"] == "missing_required_parameter"
    assert body["message"].startswith("Missing required parameter: 'tools[0].name'.") and "flat" in body["message"]


def test_prompt_cache_and_safety_hints_are_typed_and_echoed(client):
    """``prompt_cache_key``, ``prompt_cache_retention`` and ``safety_identifier`` (Response fields in the SDK) were
    accepted whatever their type and never shown back."""
    hints = dict(prompt_cache_key="chat-42", prompt_cache_retention="24h", safety_identifier="user-hash")
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1, **hints)
    assert (r.prompt_cache_key, r.prompt_cache_retention, r.safety_identifier) == ("chat-42", "24h", "user-hash")
    assert client.responses.retrieve(r.id).safety_identifier == "user-hash"
    plain = client.responses.create(model=TINY, input="Hi", max_output_tokens=1)
    assert plain.prompt_cache_key is None and plain.safety_identifier is None
    for name, bad in (("prompt_cache_key", 5), ("safety_identifier", ["x"]), ("prompt_cache_retention", "forever")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={name: bad})
        assert exc.value.body["param"] == name


def test_include_on_retrieve_and_input_items_is_checked(client, raw):
    """``retrieve(id, include=[...])`` and ``input_items.list(id, include=[...])`` ignored ``include``: a value this server
    cannot honour was a 200 there while create answers 400. The SDK sends ``include[]=a&include[]=b``: each is checked."""
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1)
    logprobs = ["message.output_text.logprobs"]
    assert client.responses.retrieve(r.id, include=logprobs).id == r.id
    assert len(client.responses.input_items.list(r.id, include=logprobs).data) == 1
    for call in (lambda inc: client.responses.retrieve(r.id, include=inc),
                 lambda inc: client.responses.input_items.list(r.id, include=inc)):
        with pytest.raises(openai.BadRequestError) as exc:
            call([*logprobs, "file_search_call.results"])
        assert exc.value.body["param"] == "include[1]" and "file_search_call.results" in exc.value.body["message"]
    assert raw.get(f"/v1/responses/{r.id}?include=web_search_call.results").status_code == 400
    assert raw.get("/v1/responses/resp_unknown?include=bogus").status_code == 404  # unknown first, as before
