"""Chat completions, legacy completions and models on the wire, validated by the openai SDK's own pydantic types in
strict mode (the SDK itself parses leniently: a missing field reads as None), and the request fields the SDK types
that were taken whatever their type. The Responses API's objects have tests/test_responses_sdk_types.py."""

from __future__ import annotations

import json

import openai
import pytest
from openai.pagination import SyncPage
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.server_fixtures import TINY

MSG = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
    "additionalProperties": False}, "strict": True}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 4}}, "required": ["tz"]}}}

CHATS = {
    "text": {"stop": ["\n"], "seed": 1},
    "n and logprobs": {"n": 2, "logprobs": True, "top_logprobs": 2},
    "parallel calls": {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": True, "max_tokens": 80},
    "named call": {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                   "max_tokens": 60},
    "legacy function call": {"functions": [WEATHER["function"], TIME["function"]], "function_call": {"name": "get_weather"},
                             "max_tokens": 60},
    # a stop string inside the forced call's arguments: finish_reason stop over partial arguments
    "call cut by a stop string": {"tools": [WEATHER], "tool_choice": "required", "stop": ['"}'], "max_tokens": 60,
                                  "logprobs": True},
    "json schema": {"max_tokens": 30, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"], "additionalProperties": False}}}},
}


def _events(r) -> list[dict]:
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("case", sorted(CHATS))
def test_chat_completions_and_chunks_validate_strictly(raw, case):
    body = {"model": TINY, "messages": MSG, "max_tokens": 6, **CHATS[case]}
    r = raw.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json(), strict=True)
    chunks = _events(raw.post("/v1/chat/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_completions_and_models_validate_strictly(raw):
    for extra in ({"logprobs": 2, "n": 2}, {"best_of": 2}, {"prompt": [[1, 2], [3]]}, {"echo": True}):
        r = raw.post("/v1/completions", json={"model": TINY, "prompt": "Hello", "max_tokens": 3, **extra})
        assert r.status_code == 200, r.text
        Completion.model_validate(r.json(), strict=True)
    SyncPage[Model].model_validate(raw.get("/v1/models").json(), strict=True)
    Model.model_validate(raw.get(f"/v1/models/{TINY}").json(), strict=True)


@pytest.mark.parametrize("bad", ["yes", 1, ["x"]])
def test_stream_options_include_obfuscation_is_typed(client, bad):
    """The SDK types ``stream_options.include_obfuscation`` as a boolean for chat and Responses; Responses took any
    ``stream_options`` at all (a string was a 200), chat any ``include_obfuscation``."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=TINY, input="Hi", max_output_tokens=1, stream=True,
                                stream_options={"include_obfuscation": bad})
    assert caught.value.body["param"] == "stream_options.include_obfuscation"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={"stream_options": bad})
    assert caught.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, stream=True,
                                       stream_options={"include_obfuscation": bad})
    assert caught.value.body["param"] == "stream_options.include_obfuscation"


def test_a_boolean_include_obfuscation_is_served(client):
    events = list(client.responses.create(model=TINY, input="Hi", max_output_tokens=2, stream=True,
                                          stream_options={"include_obfuscation": False}))
    assert events[-1].type in ("response.completed", "response.incomplete")
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, stream=True, seed=7,
                                                 stream_options={"include_obfuscation": True, "include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize(("response_format", "param", "code"), [
    ({"type": "xml"}, "response_format.type", "invalid_value"),
    ({"type": "json_schema"}, "response_format.json_schema", "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict", "invalid_type"),
])
def test_a_malformed_response_format_names_the_field_at_fault(client, response_format, param, code):
    """api.openai.com names the nested field (``response_format.type``); every shape error here said
    ``response_format``, while the same errors under Responses' ``text.format`` named theirs."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, response_format=response_format)
    assert (caught.value.body["param"], caught.value.body["code"]) == (param, code)


@pytest.mark.parametrize(("path", "field", "empty"), [
    ("/v1/chat/completions", "reasoning_effort", []),
    ("/v1/chat/completions", "functions", {}),
    ("/v1/chat/completions", "audio", []),
    ("/v1/responses", "background", ""),
    ("/v1/responses", "max_tool_calls", []),
    ("/v1/responses", "reasoning", ""),
    ("/v1/responses", "prompt", []),
])
def test_an_unsupported_field_of_the_wrong_type_is_a_400_even_when_empty(raw, path, field, empty):
    """What this server cannot honour is a 400 unless it asks for nothing ("" / [] / {}); an empty value of a type
    the SDK does not give the field was taken as asking for nothing (a 200), where api.openai.com answers invalid_type."""
    body = ({"messages": MSG, "max_tokens": 1} if "chat" in path else {"input": "Hi", "max_output_tokens": 1})
    r = raw.post(path, json={"model": TINY, **body, field: empty})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (field, "invalid_type")
    asks_nothing = {"reasoning_effort": None, "functions": [], "audio": None, "background": False, "max_tool_calls": None,
                    "reasoning": {}, "prompt": None}[field]
    assert raw.post(path, json={"model": TINY, **body, field: asks_nothing}).status_code == 200


def test_a_forced_tool_whose_schema_the_grammar_engine_refuses_is_named(raw):
    """With ``tool_choice`` required or named, the tools' schemas are compiled into one Lark grammar: a schema the
    grammar engine refuses was a 400 with ``param: "tools"`` quoting that grammar (``start: call ... %json{...}``); now
    the tool at fault is named as OpenAI names a bad schema, and the grammar stays inside."""
    ok = {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}}
    bad = {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(a)\\1"}}, "required": ["a"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "bad"}}):
        r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "tools": [ok, bad],
                                                   "tool_choice": choice})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("tools[1].function.parameters", "invalid_function_parameters"), err
        assert err["message"].startswith("Invalid schema for function 'bad': ") and "backreference" in err["message"]
        assert "start:" not in err["message"] and "%json" not in err["message"]
    r = raw.post("/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 2, "tool_choice": "required",
                                        "tools": [{"type": "function", **bad["function"]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].parameters", r.text
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "tools": [ok, bad],
                                               "tool_choice": {"type": "function", "function": {"name": "ok"}}})
    assert r.status_code == 200, r.text  # only the tools the grammar may call are compiled


@pytest.mark.parametrize(("path", "body", "param", "got"), [
    ("/v1/embeddings", {"input": "Hi", "encoding_format": 5}, "encoding_format", "an integer"),  # null is float
    ("/v1/chat/completions", {"messages": [{"role": None, "content": "Hi"}]}, "messages[0].role", "null"),
    ("/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "Hi"}]}, "messages[0].role", "an object"),
    ("/v1/chat/completions", {"messages": MSG, "service_tier": True}, "service_tier", "a boolean"),
])
def test_a_value_of_another_type_for_an_enum_field_says_its_json_type(raw, path, body, param, got):
    """The message was Python's repr of the value: "Invalid value: None.", "Invalid value: {'a': 1}."."""
    r = raw.post(path, json={"model": TINY, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["code"]) == (param, "invalid_type"), err
    assert err["message"].startswith(f"Invalid type for '{param}': expected one of '") and err["message"].endswith(
        f", but got {got} instead."), err
    assert "None" not in err["message"] and "True" not in err["message"]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": [{"content": "Hi"}]}, "input[0].role", "missing_required_parameter"),
    ({"input": [{"role": 7, "content": "Hi"}]}, "input[0].role", "invalid_type"),
    ({"input": [{"type": 5, "role": "user", "content": "Hi"}]}, "input[0].type", "invalid_type"),
    ({"input": "Hi", "tools": [{"name": "f"}]}, "tools[0].type", "missing_required_parameter"),
    ({"input": "Hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"name": "f"}}, "tool_choice.type",
     "missing_required_parameter"),
])
def test_a_responses_field_left_out_is_named_as_missing(raw, body, param, code):
    """These said "Invalid value: None. Supported values are: ...", "Tools of type None are not supported"."""
    r = raw.post("/v1/responses", json={"model": TINY, "max_output_tokens": 1, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["code"]) == (param, code), err
    assert "None" not in err["message"]


def test_a_responses_message_item_with_a_null_type_is_a_message(raw):
    """``EasyInputMessage(...).model_dump()`` writes ``"type": null``; it was refused as an item of type None."""
    r = raw.post("/v1/responses", json={"model": TINY, "max_output_tokens": 1,
                                        "input": [{"role": "user", "content": "Hi", "type": None}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"tool_choice": 5}, "tool_choice", "invalid_type"),
    ({"stop": 5}, "stop", "invalid_type"),
    ({"tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function.name", "invalid_type"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function", "missing_required_parameter"),
    ({"tool_choice": {"function": {"name": "f"}}}, "tool_choice.type", "missing_required_parameter"),
    ({"tool_choice": {"type": "web"}}, "tool_choice.type", "invalid_value"),
])
def test_a_wrong_tool_choice_or_union_type_names_the_field_and_its_types(raw, extra, param, code):
    """A union field of another type read "Invalid value for 'stop': Input should be a valid string." (pydantic's words,
    one member named); tool_choice's shape errors all said ``param: "tool_choice"``."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1, "tools": tools, **extra})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["code"]) == (param, code), err
    if param in ("tool_choice", "stop"):
        assert err["message"] == f"Invalid type for '{param}': expected a string or {'an object' if param == 'tool_choice' else 'an array'}, but got an integer instead."


def test_a_tools_strict_flag_of_another_type_is_a_400(raw):
    """The SDK types ``function.strict`` as a boolean; ``"strict": "yes"`` was a 200 (Responses' flat tools too)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": "yes"}}
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1, "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.strict", r.text
    r = raw.post("/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 1,
                                        "tools": [{"type": "function", **tool["function"]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].strict", r.text
    tool["function"]["strict"] = False
    assert raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1,
                                                  "tools": [tool]}).status_code == 200


def test_responses_stream_options_need_stream_as_chat(client):
    """Chat refuses ``stream_options`` without ``stream: true`` (api.openai.com's 400); Responses took it silently."""
    for create in (lambda **kw: client.responses.create(model=TINY, input="Hi", max_output_tokens=16, **kw),
                   lambda **kw: client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, **kw)):
        for stream in ({}, {"stream": False}):
            with pytest.raises(openai.BadRequestError) as caught:
                create(extra_body={"stream_options": {"include_obfuscation": False}}, **stream)
            assert caught.value.body["param"] == "stream_options"
            assert caught.value.body["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    # null is no stream_options at all, and with stream: true they are served
    assert client.responses.create(model=TINY, input="Hi", max_output_tokens=16, extra_body={"stream_options": None}).id
    events = list(client.responses.create(model=TINY, input="Hi", max_output_tokens=16, stream=True,
                                          stream_options={"include_obfuscation": False}))
    assert events[-1].type in ("response.completed", "response.incomplete")  # the tiny model may hit the token cap
