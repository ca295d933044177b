"""Request checks api.openai.com makes, with its messages, params and codes: tool exchanges in a history,
names, message content, and the Responses API's function call outputs. Real server, real SDK, raw httpx."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY

USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALLS = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def bad_chat(client, messages, **kw) -> openai.BadRequestError:
    """The 400 the SDK raises for ``messages``."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=messages, max_tokens=2, **kw)
    return info.value


def test_tool_message_without_tool_call_id(client):
    err = bad_chat(client, [USER, CALLS, {"role": "tool", "content": "21 C"}], tools=TOOLS)
    assert err.status_code == 400 and err.param == "messages[2].tool_call_id" and err.code is None
    assert err.body["message"] == "Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'."


def test_tool_message_that_answers_no_call(client):
    err = bad_chat(client, [USER, RESULT])
    assert err.param == "messages[1].role" and err.code is None
    # api.openai.com's own words, its spelling included: clients match on them
    assert err.body["message"] == "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
    # after a turn that ended with a user message, a tool message is as lost
    err = bad_chat(client, [USER, CALLS, RESULT, {"role": "user", "content": "and Rome?"}, dict(RESULT, tool_call_id="call_2")])
    assert err.param == "messages[4].role"


def test_tool_message_answering_an_id_that_was_not_called(client):
    err = bad_chat(client, [USER, CALLS, dict(RESULT, tool_call_id="call_9")])
    assert err.param == "messages[2].tool_call_id" and err.code is None
    assert err.body["message"] == "Invalid parameter: 'tool_call_id' of 'call_9' not found in 'tool_calls' of previous message."


@pytest.mark.parametrize("after", [[], [{"role": "user", "content": "well?"}]], ids=["last", "then-user"])
def test_tool_calls_left_unanswered(client, after):
    second = dict(CALL, id="call_2")
    err = bad_chat(client, [USER, dict(CALLS, tool_calls=[CALL, second]), RESULT, *after])
    assert err.param == "messages[1].role" and err.code is None
    assert err.body["message"] == ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                           "'tool_call_id'. The following tool_call_ids did not have response messages: call_2")


def test_a_complete_exchange_is_served(client, raw):
    """Parallel calls answered in any order, then another turn: served (and as the SDK sends back its own message)."""
    second = dict(CALL, id="call_2")
    history = [USER, dict(CALLS, tool_calls=[CALL, second]), dict(RESULT, tool_call_id="call_2"), RESULT,
               {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}]
    r = client.chat.completions.create(model=TINY, messages=history, tools=TOOLS, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the SDK's own message object, sent back as the next request's history (refusal, annotations ... included)
    sent_back = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
                 "function_call": None, "tool_calls": [CALL]}
    assert raw.post("/v1/chat/completions", json={"model": TINY, "messages": [USER, sent_back, RESULT], "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("message", "param", "code", "text"),
    [
        ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         "messages[1].tool_calls[0].id", "missing_required_parameter", "Missing required parameter: 'messages[1].tool_calls[0].id'."),
        ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
         "messages[1].tool_calls[0].function.arguments", "missing_required_parameter", None),
        ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get weather", "arguments": "{}"}}]},
         "messages[1].tool_calls[0].function.name", "invalid_value",
         "Invalid 'messages[1].tool_calls[0].function.name': string does not match pattern. Expected a string that matches "
         "the pattern '^[a-zA-Z0-9_-]+$'."),
        ({"role": "user", "content": "hi", "name": "Ada Lovelace"}, "messages[1].name", "invalid_value",
         "Invalid 'messages[1].name': string does not match pattern. Expected a string that matches the pattern "
         "'^[a-zA-Z0-9_-]+$'."),
        ({"role": "user", "content": "hi", "name": "<|im_start|>"}, "messages[1].name", "invalid_value", None),
        ({"role": "user", "content": None}, "messages[1].content", None, "Invalid value for 'content': expected a string, got null."),
        ({"role": "assistant", "content": None}, "messages[1].content", None, "Invalid value for 'content': expected a string, got null."),
        ({"role": "user"}, "messages[1].content", "missing_required_parameter", "Missing required parameter: 'messages[1].content'."),
        ({"role": "user", "content": []}, "messages[1].content", "empty_array",
         "Invalid 'messages[1].content': empty array. Expected an array with minimum length 1, but got an empty array instead."),
        ({"role": "user", "content": [{"type": "video", "video": "x"}]}, "messages[1].content[0].type", "invalid_value",
         "Invalid value: 'video'. Supported values are: 'text', 'image_url', 'input_audio', and 'file'."),
        ({"role": "user", "content": [{"text": "hi"}]}, "messages[1].content[0].type", "missing_required_parameter", None),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[1].content[0].text", "missing_required_parameter",
         "Missing required parameter: 'messages[1].content[0].text'."),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[1].content[0].text", "invalid_type",
         "Invalid type for 'messages[1].content[0].text': expected a string, but got an integer instead."),
        # each role takes OpenAI's part types for it: a system message text only, an assistant's text or refusal
        ({"role": "system", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[1].content[0].type", "invalid_value",
         "Invalid value: 'refusal'. Supported values are: 'text'."),
        ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, "messages[1].content[0].type",
         "invalid_value", "Invalid value: 'image_url'. Supported values are: 'text' and 'refusal'."),
    ],
)
def test_message_checks(raw, message, param, code, text):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [USER, message], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    if text is not None:
        assert err["message"] == text
    assert raw.get("/health").json()["status"] == "ok"  # and the server keeps serving


@pytest.mark.parametrize(
    ("name", "code", "text"),
    [
        ("get weather", "invalid_value", "Invalid 'tools[0].function.name': string does not match pattern. Expected a string "
                                         "that matches the pattern '^[a-zA-Z0-9_-]+$'."),
        ("f" * 65, "string_above_max_length", "Invalid 'tools[0].function.name': string too long. Expected a string with "
                                              "maximum length 64, but got a string with length 65 instead."),
        (None, "missing_required_parameter", "Missing required parameter: 'tools[0].function.name'."),
        (5, "invalid_type", "Invalid type for 'tools[0].function.name': expected a string, but got an integer instead."),
    ],
)
def test_tool_name_checks(client, name, code, text):
    fn = {"parameters": {"type": "object"}} if name is None else {"name": name, "parameters": {"type": "object"}}
    err = bad_chat(client, [USER], tools=[{"type": "function", "function": fn}])
    assert (err.param, err.code, err.body["message"]) == ("tools[0].function.name", code, text)


@pytest.mark.parametrize(
    ("extra", "param", "code", "text"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value",
         "Invalid value: 'sometimes'. Supported values are: 'none', 'auto', and 'required'."),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value",
         "Invalid value: 'retrieval'. Supported values are: 'function' and 'custom'."),
        ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools[0].type", "unsupported_parameter", None),
        ({"tools": [{"function": {"name": "f"}}]}, "tools[0].type", "missing_required_parameter",
         "Missing required parameter: 'tools[0].type'."),
        ({"tools": ["get_weather"]}, "tools[0]", "invalid_type",
         "Invalid type for 'tools[0]': expected an object, but got a string instead."),
    ],
)
def test_tool_option_checks(raw, extra, param, code, text):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [USER], "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code)
    if text is not None:
        assert err["message"] == text


# ------------------------------------------------------------------ Responses API
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
FC = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
FCO = {"type": "function_call_output", "call_id": "call_1", "output": "21"}


def bad_response(client, items) -> openai.BadRequestError:
    """The 400 the SDK raises for Responses ``input`` items."""
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=TINY, input=items, tools=[WEATHER], max_output_tokens=2)
    return info.value


def test_responses_function_call_output_without_its_call(client):
    err = bad_response(client, [{"role": "user", "content": "hi"}, dict(FCO, call_id="call_7")])
    assert (err.param, err.code) == ("input", None)
    assert err.body["message"] == "No tool call found for function call output with call_id call_7."


def test_responses_function_call_without_its_output(client):
    err = bad_response(client, [{"role": "user", "content": "hi"}, FC, dict(FC, call_id="call_2"), FCO])
    assert (err.param, err.code) == ("input", None)
    assert err.body["message"] == "No tool output found for function call call_2."


def test_responses_stored_call_must_be_answered(client):
    """A stored response that ended in a call is continued with its output; a plain message instead is a 400."""
    first = client.responses.create(model=TINY, input="Weather?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40, temperature=0)
    call = next(o for o in first.output if o.type == "function_call")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=TINY, previous_response_id=first.id, input="and now?", max_output_tokens=2)
    assert info.value.body["message"] == f"No tool output found for function call {call.call_id}." and info.value.param == "input"
    ok = client.responses.create(model=TINY, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=2,
                                 input=[dict(FCO, call_id=call.call_id)])
    assert ok.status in ("completed", "incomplete")


def test_responses_item_missing_call_id(raw):
    r = raw.post("/v1/responses", json={"model": TINY, "input": [{"type": "function_call_output", "output": "21"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("input[0].call_id", "missing_required_parameter")
    assert err["message"] == "Missing required parameter: 'input[0].call_id'."


# ------------------------------------------------------- schema errors, every endpoint
@pytest.mark.parametrize(
    ("path", "body", "param", "code", "text"),
    [
        ("/v1/chat/completions", {"n": 0}, "n", "integer_below_min_value",
         "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
        ("/v1/chat/completions", {"top_p": 1.5}, "top_p", "decimal_above_max_value",
         "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
        ("/v1/chat/completions", {"temperature": "hot"}, "temperature", "invalid_type",
         "Invalid type for 'temperature': expected a decimal, but got a string instead."),
        ("/v1/chat/completions", {"seed": 1.5}, "seed", "invalid_type",
         "Invalid type for 'seed': expected an integer, but got a decimal instead."),
        ("/v1/chat/completions", {"stop": ["a", 7]}, "stop[1]", "invalid_type",
         "Invalid type for 'stop[1]': expected a string, but got an integer instead."),
        ("/v1/chat/completions", {"messages": []}, "messages", "empty_array",
         "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value",
         "Invalid value: 'robot'. Supported values are: 'system', 'developer', 'user', 'assistant', 'tool', and 'function'."),
        ("/v1/chat/completions", {"model": ""}, "model", "empty_string",
         "Invalid 'model': empty string. Expected a string with minimum length 1, but got an empty string instead."),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs", "integer_above_max_value",
         "Invalid 'logprobs': integer above maximum value. Expected a value <= 5, but got 6 instead."),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo", "invalid_type",
         "Invalid type for 'echo': expected a boolean, but got a string instead."),
        ("/v1/completions", {"prompt": "x", "suffix": 5}, "suffix", "invalid_type",
         "Invalid type for 'suffix': expected a string, but got an integer instead."),
        ("/v1/completions", {"prompt": "x", "seed": 2**63}, "seed", "integer_above_max_value",
         f"Invalid 'seed': integer above maximum value. Expected a value <= {2**63 - 1}, but got {2**63} instead."),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions", "integer_below_min_value",
         "Invalid 'dimensions': integer below minimum value. Expected a value >= 1, but got 0 instead."),
        ("/v1/responses", {"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "invalid_value",
         "Invalid value: 'tool'. Supported values are: 'user', 'system', 'developer', and 'assistant'."),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text",
         "missing_required_parameter", "Missing required parameter: 'input[0].content[0].text'."),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value",
         "Invalid value: 'int8'. Supported values are: 'float' and 'base64'."),
        ("/v1/responses", {"input": "x", "top_logprobs": 21}, "top_logprobs", "integer_above_max_value",
         "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead."),
    ],
)
def test_schema_errors_in_openai_words(raw, path, body, param, code, text):
    base = {"model": TINY} if path in ("/v1/completions", "/v1/embeddings", "/v1/responses") else {"model": TINY, "messages": [USER]}
    r = raw.post(path, json={**base, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": text, "type": "invalid_request_error", "param": param, "code": code}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "x" * 200_000, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [USER], "tool_choice": "y" * 200_000}, "tool_choice"),
    ("/v1/responses", {"input": [{"role": "z" * 200_000, "content": "hi"}]}, "input[0].role"),
])
def test_an_invalid_value_is_quoted_short(raw, path, body, param):
    """The message repeats the start of an offending value, not all of it (a 200 kB string came back whole)."""
    r = raw.post(path, json={"model": TINY, **body})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith("Invalid value: '")
    assert "…" in err["message"] and len(err["message"]) < 400, len(err["message"])


def test_completions_suffix_and_echo(raw):
    """A non-empty suffix is refused as unsupported (fill-in-the-middle), with echo too; an empty or null suffix asks
    for nothing and is served, and so is echo (tests/test_echo.py)."""
    for extra, param in (({"suffix": "}"}, "suffix"), ({"echo": True, "suffix": "}"}, "suffix")):
        r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == "unsupported_parameter"
    for extra in ({"suffix": ""}, {"suffix": None}, {"echo": False}, {"echo": True}):
        assert raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 2, **extra}).status_code == 200


def test_completions_best_of_over_the_limit_names_best_of(client):
    """best_of asks for the candidates: over the server's limit (4 here) the error names it, not n."""
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt="x", best_of=5, max_tokens=2)
    assert info.value.param == "best_of" and "best_of is too large" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt="x", n=5, max_tokens=2)
    assert info.value.param == "n"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_size_and_keys_as_openai_checks_them(raw, path):
    """At most 1024 entries, as api.openai.com; keys plain decimal token ids (int() took " 5", "5_0" and other scripts'
    digits), and a 5,000-digit key is quoted short (the whole key came back in the message)."""
    base = {"model": TINY, "max_tokens": 1, **({"prompt": "x"} if path == "/v1/completions" else {"messages": [USER]})}
    r = raw.post(path, json={**base, "logit_bias": {str(i): -1 for i in range(1025)}})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"] == {
        "message": "Invalid 'logit_bias': too many properties. Expected an object with at most 1024 properties, but got "
                   "an object with 1025 properties instead.",
        "type": "invalid_request_error", "param": "logit_bias", "code": "object_above_max_properties"}
    assert raw.post(path, json={**base, "logit_bias": {str(i): -1 for i in range(1024)}}).status_code == 200
    for key in (" 5", "+5", "5_0", "\u0665", "-1", "1.0", ""):
        r = raw.post(path, json={**base, "logit_bias": {key: 1}})
        assert r.status_code == 400, (key, r.text[:300])
        err = r.json()["error"]
        assert err["param"] == "logit_bias" and err["message"].startswith("Invalid key in 'logit_bias': "), err
    r = raw.post(path, json={**base, "logit_bias": {"9" * 5000: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text[:300]
    assert len(r.json()["error"]["message"]) < 200 and "…" in r.json()["error"]["message"]
    assert raw.post(path, json={**base, "logit_bias": {"05": 1}}).status_code == 200  # a decimal id with a leading zero is an id


LONG = "q" * 5000


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [USER, CALLS, {"role": "tool", "tool_call_id": LONG, "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [USER], "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": LONG}}}),
    ("/v1/chat/completions", {"messages": [USER], "response_format": {"type": LONG}}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": LONG, "text": "x"}]}]}),
    ("/v1/responses", {"input": [{"type": LONG}]}),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": LONG}}}),
    ("/v1/responses", {"input": "x", "include": [LONG]}),
    ("/v1/responses", {"input": "x", "tools": [{"type": LONG}]}),
    ("/v1/responses", {"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": LONG}}),
], ids=["tool_call_id", "tool_choice-name", "response_format-type", "content-part-type", "input-item-type", "text-format-type",
        "include", "tool-type", "tool_choice-type"])
def test_every_echoed_value_is_quoted_short(raw, path, body):
    """The API fuzzer (benchmarks/fuzz_api.py) found these messages repeating a 5,000-character value whole."""
    r = raw.post(path, json={"model": TINY, "max_tokens" if path.endswith("completions") else "max_output_tokens": 2, **body})
    assert r.status_code == 400, r.text[:300]
    message = r.json()["error"]["message"]
    assert len(message) < 400 and "q" * 40 in message and "…" in message, message[:500]


@pytest.mark.parametrize("description", [False, 0, [], {}])
def test_a_tool_description_of_another_type_is_refused(client, description):
    """``or ""`` turned a falsy description of any type into none; OpenAI refuses it as invalid_type."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": description, "parameters": {"type": "object"}}}
    err = bad_chat(client, [USER], tools=[tool])
    assert err.param == "tools[0].function.description" and err.code == "invalid_type"
    assert "expected a string" in err.body["message"]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(("name", "code"), [("", "empty_string"), ("a b", "invalid_value"), ("\u0000", "invalid_value"),
                                            ("\U0001f600", "invalid_value"), ("a" * 65, "string_above_max_length"), (5, "invalid_type")])
def test_a_response_format_name_follows_openais_rule(raw, name, code):
    """A json_schema name is 1-64 of [a-zA-Z0-9_-] on api.openai.com; NUL, spaces, emoji and 5,000 characters were taken."""
    chat = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [USER], "max_tokens": 2, "response_format": {
        "type": "json_schema", "json_schema": {"name": name, "schema": SCHEMA}}})
    resp = raw.post("/v1/responses", json={"model": TINY, "input": "hi", "max_output_tokens": 2, "text": {"format": {
        "type": "json_schema", "name": name, "schema": SCHEMA}}})
    for r, param in ((chat, "response_format.json_schema.name"), (resp, "text.format.name")):
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == code and len(err["message"]) < 200, err
    for fmt in ({"name": "my-format_1", "schema": SCHEMA}, {"schema": SCHEMA}):  # a missing name is served, as before
        assert raw.post("/v1/chat/completions", json={"model": TINY, "messages": [USER], "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": fmt}}).status_code == 200


def _with_breakpoint(breakpoint) -> list[dict]:
    """A user message whose text part carries ``prompt_cache_breakpoint``."""
    return [{"role": "user", "content": [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": breakpoint}]}]


@pytest.mark.parametrize(
    ("breakpoint", "param", "code", "text"),
    [
        ("yes", "messages[0].content[0].prompt_cache_breakpoint", "invalid_type",
         "Invalid type for 'messages[0].content[0].prompt_cache_breakpoint': expected an object, but got a string instead."),
        (True, "messages[0].content[0].prompt_cache_breakpoint", "invalid_type", None),
        ({}, "messages[0].content[0].prompt_cache_breakpoint.mode", "missing_required_parameter",
         "Missing required parameter: 'messages[0].content[0].prompt_cache_breakpoint.mode'."),
        ({"mode": "implicit"}, "messages[0].content[0].prompt_cache_breakpoint.mode", "invalid_value",
         "Invalid value: 'implicit'. Supported values are: 'explicit'."),
        ({"mode": "explicit", "ttl": 30}, "messages[0].content[0].prompt_cache_breakpoint.ttl", "invalid_type",
         "Invalid type for 'messages[0].content[0].prompt_cache_breakpoint.ttl': expected a string, but got an integer instead."),
        ({"mode": "explicit", "ttl": "1h"}, "messages[0].content[0].prompt_cache_breakpoint.ttl", "invalid_value",
         "Invalid value: '1h'. Supported values are: '30m' and '12h'."),
    ],
)
def test_prompt_cache_breakpoint_is_typed(client, breakpoint, param, code, text):
    """A content part's ``prompt_cache_breakpoint`` (the SDK's ``{"mode": "explicit", "ttl"?}``) was taken as anything."""
    err = bad_chat(client, _with_breakpoint(breakpoint))
    assert (err.status_code, err.param, err.code, err.type) == (400, param, code, "invalid_request_error"), err.body
    if text is not None:
        assert err.body["message"] == text


def test_a_well_formed_prompt_cache_breakpoint_is_accepted(client):
    for breakpoint in ({"mode": "explicit"}, {"mode": "explicit", "ttl": "12h"}, None):
        reply = client.chat.completions.create(model=TINY, messages=_with_breakpoint(breakpoint), max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
    # the Responses API's input_text parts carry the same field, checked the same way
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=TINY, max_output_tokens=16, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "1d"}}]}])
    assert (info.value.param, info.value.code) == ("input[0].content[0].prompt_cache_breakpoint.ttl", "invalid_value")


def test_top_k_above_int32_is_refused_and_vocab_sized_is_off(client):
    # top_k at or over the vocabulary is no top-k; past int32 no backend can take it, so it is a 400 naming top_k
    err = bad_chat(client, [USER], extra_body={"top_k": 2**70})
    assert err.status_code == 400 and err.param == "top_k"
    err = bad_chat(client, [USER], extra_body={"top_k": 2**31})
    assert err.param == "top_k"
    done = client.chat.completions.create(model=TINY, messages=[USER], max_tokens=2, extra_body={"top_k": 2**31 - 1})
    assert done.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=TINY, input="hi", max_output_tokens=16, extra_body={"top_k": 2**70})
    assert info.value.param == "top_k"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_stop_string_is_at_most_512_characters(raw, path):
    """Matching a stop string holds back up to its length of text and builds an automaton of it (matching cost the
    runner's step thread the square of that per token before: two 1M-character stops with a logit_bias forcing
    "aaaa" took ~100 ms a token there), so a longer stop is a 400, in OpenAI's words for a long string."""
    base = {"model": TINY, "max_tokens": 1, **({"prompt": "x"} if path == "/v1/completions" else {"messages": [USER]})}
    if path == "/v1/responses":  # (``stop`` is one of its chat extensions)
        base = {"model": TINY, "input": "x", "max_output_tokens": 16}
    for stop in ("s" * 513, ["a", "b" * 100_000]):
        r = raw.post(path, json={**base, "stop": stop})
        assert r.status_code == 400, r.text[:300]
        got = len(stop) if isinstance(stop, str) else 100_000
        assert r.json()["error"] == {
            "message": "Invalid 'stop': string too long. Expected a string with maximum length 512, but got a string "
                       f"with length {got} instead.",
            "type": "invalid_request_error", "param": "stop", "code": "string_above_max_length"}
    assert raw.post(path, json={**base, "stop": ["s" * 512] * 4}).status_code == 200
