"""Chat's deprecated ``functions`` and ``function_call``, through the real server and the openai SDK: served as
api.openai.com serves them (replies carry ``message.function_call`` and ``finish_reason: "function_call"``, ``"stop"`` when named), where a
request with ``functions`` or a named ``function_call`` was a 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server_fixtures import TINY

MSG = [{"role": "user", "content": "Hi"}]
WEATHER = {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}
ADD = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                                     "required": ["a"], "additionalProperties": False}}
FUNCTIONS = [WEATHER, ADD]
SCHEMAS = {f["name"]: f["parameters"] for f in FUNCTIONS}
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("name", ["get_weather", "add"])
def test_a_named_function_call_is_forced_and_answered_as_function_call(client, name):
    """Even the random-weight model writes a valid call when the grammar forces it; it comes back in the legacy shape."""
    r = client.chat.completions.create(model=TINY, messages=MSG, functions=FUNCTIONS, function_call={"name": name},
                                       max_tokens=60, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # a named function's call, as api.openai.com finishes it
    assert choice.message.tool_calls is None and choice.message.content is None
    assert choice.message.function_call.name == name
    jsonschema.validate(json.loads(choice.message.function_call.arguments), SCHEMAS[name])


def test_a_named_function_call_streams_as_function_call_pieces(client):
    kw = dict(model=TINY, messages=MSG, functions=FUNCTIONS, function_call={"name": "get_weather"}, max_tokens=60, seed=2)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    name, arguments, finish, heads = None, "", None, 0
    for chunk in chunks:
        for c in chunk.choices:
            assert not c.delta.content and not c.delta.tool_calls  # no tool_calls, no raw markup as text
            piece = c.delta.function_call
            if piece is not None:
                if piece.name is not None:
                    assert name is None and arguments == ""  # the name comes first, once
                    name, heads = piece.name, heads + 1
                arguments += piece.arguments or ""
            finish = c.finish_reason or finish
    assert (name, heads, finish) == ("get_weather", 1, "stop")
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    full = client.chat.completions.create(**kw).choices[0].message.function_call
    assert (full.name, full.arguments) == (name, arguments)


def test_function_call_none_and_auto_with_functions(raw):
    """"none" keeps the functions from the model (as tool_choice "none" keeps tools); "auto" (the default) offers them."""
    def ask(**extra):
        r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    plain = ask()["usage"]["prompt_tokens"]
    offered = ask(functions=FUNCTIONS)
    assert offered["usage"]["prompt_tokens"] > plain
    assert ask(functions=FUNCTIONS, function_call="auto")["usage"]["prompt_tokens"] == offered["usage"]["prompt_tokens"]
    withheld = ask(functions=FUNCTIONS, function_call="none")
    assert withheld["usage"]["prompt_tokens"] == plain
    assert withheld["choices"][0]["finish_reason"] in ("stop", "length")
    assert "function_call" not in withheld["choices"][0]["message"]


def test_a_function_exchange_in_the_history_is_rendered_as_a_tool_exchange(client, raw):
    """An assistant ``function_call`` and the ``function`` message with its result are taken and shown to the model."""
    def history(result):
        return [*MSG, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": result}, {"role": "user", "content": "Thanks"}]

    def prompt_tokens(messages, **extra):
        r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": messages, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    short, long = prompt_tokens(history("21 C")), prompt_tokens(history("21 C, sunny, light wind from the west"))
    assert long > short  # the result is in the prompt
    assert prompt_tokens(history("21 C"), functions=FUNCTIONS) > short  # with the functions offered too
    # the SDK's own types, and the message it returned sent back as it is
    r = client.chat.completions.create(model=TINY, messages=MSG, functions=FUNCTIONS, function_call={"name": "add"},
                                       max_tokens=30, seed=3)
    sent_back = r.choices[0].message.model_dump()
    follow = [*MSG, sent_back, {"role": "function", "name": "add", "content": None}, {"role": "user", "content": "And?"}]
    again = client.chat.completions.create(model=TINY, messages=follow, functions=FUNCTIONS, max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length", "function_call")


FUNCTION_CALL = {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": '{"a": 1}'}}
RESULT = {"role": "function", "name": "add", "content": "1"}


@pytest.mark.parametrize(("messages", "at"), [
    ([*MSG, RESULT], 1),  # nothing before it called a function
    ([*MSG, FUNCTION_CALL, RESULT, {"role": "user", "content": "And?"}, RESULT], 4),  # that turn ended with the user
    ([*MSG, {"role": "assistant", "content": None, "tool_calls": [  # a tool call is answered by a tool message
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "1"}, RESULT], 3),
    ([*MSG, {"role": "assistant", "content": "Let me add."}, RESULT], 2),
])
def test_a_function_message_answering_no_function_call_is_taken_and_shown(client, messages, at):
    """api.openai.com takes a ``function`` result with no ``function_call`` before it (chat memories trim the call
    away, clients put context in one), unlike an orphan ``tool`` message: served, its content shown to the model."""
    long = [*messages[:at], {**RESULT, "content": "1 " * 40}, *messages[at + 1:]]
    with_tool_calls = any(m.get("tool_calls") for m in messages)  # a 400 beside functions, as at api.openai.com
    for extra in ({},) if with_tool_calls else ({}, {"functions": FUNCTIONS}):
        short_reply, long_reply = (client.chat.completions.create(model=TINY, messages=m, max_tokens=1, seed=0,
                                                                   extra_body=extra) for m in (messages, long))
        assert short_reply.choices[0].finish_reason in ("stop", "length")
        assert long_reply.usage.prompt_tokens - short_reply.usage.prompt_tokens >= 39


def test_function_results_after_their_call_are_taken(client):
    """Right after the call, after another result of it, and beside tool results of the same assistant message."""
    both = {"role": "assistant", "content": None, "function_call": FUNCTION_CALL["function_call"], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "2"}
    for history in ([*MSG, FUNCTION_CALL, RESULT], [*MSG, FUNCTION_CALL, RESULT, RESULT],
                    [*MSG, FUNCTION_CALL, RESULT, {"role": "user", "content": "And?"}, FUNCTION_CALL, RESULT],
                    [*MSG, both, RESULT, tool], [*MSG, both, tool, RESULT],
                    # an agent's calls one after another (old LangChain agents), a call after a tool exchange, and
                    # an assistant call message whose content is "" (not null) or that has a null tool_calls
                    [*MSG, FUNCTION_CALL, RESULT, FUNCTION_CALL, RESULT], [*MSG, both, tool, RESULT, FUNCTION_CALL, RESULT],
                    [*MSG, {**FUNCTION_CALL, "content": ""}, RESULT], [*MSG, {**FUNCTION_CALL, "tool_calls": None}, RESULT]):
        r = client.chat.completions.create(model=TINY, messages=history, max_tokens=1)
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"function_call": {"name": "get_weather"}}, "function_call", "invalid_value"),  # no functions: api.openai.com's 400
    ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call", "invalid_value"),
    ({"functions": FUNCTIONS, "function_call": {}, "tools": TOOLS}, "functions", "invalid_value"),
    ({"functions": FUNCTIONS, "tool_choice": "auto"}, "tool_choice", "invalid_value"),
    ({"functions": FUNCTIONS, "function_call": {"nam": "add"}}, "function_call.name", "missing_required_parameter"),
    ({"functions": FUNCTIONS, "function_call": "sometimes"}, "function_call", "invalid_value"),
    ({"functions": [{"parameters": {"type": "object"}}]}, "functions[0].name", "missing_required_parameter"),
    ({"functions": [WEATHER, WEATHER]}, "functions[1].name", "invalid_value"),
    ({"functions": [WEATHER, "add"]}, "functions[1]", "invalid_type"),
    ({"functions": [{"name": "f", "parameters": {"type": "array"}}]}, "functions[0].parameters", "invalid_function_parameters"),
    ({"functions": {"name": "f"}}, "functions", "invalid_type"),
    ({"functions": [ADD, {"name": "bad", "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a)\\1"}},
                                                      "required": ["a"]}}], "function_call": {"name": "bad"}},
     "functions[1].parameters", "invalid_function_parameters"),  # the grammar engine's refusal, named
    ({"function_call": "sometimes"}, "function_call", "invalid_value"),
    ({"function_call": 5}, "function_call", "invalid_type"),
    ({"messages": [*MSG, {"role": "function", "content": "21"}]}, "messages[1].name", "missing_required_parameter"),
    ({"messages": [*MSG, {"role": "assistant", "function_call": {"name": "a b", "arguments": "{}"}}]},
     "messages[1].function_call.name", "invalid_value"),
])
def test_what_cannot_be_served_is_a_400_naming_the_legacy_param(raw, extra, param, code):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert "tools" not in err["message"] or param in ("functions", "tool_choice"), err  # said in the request's terms


@pytest.mark.parametrize("value", ["none", "auto"])
def test_function_call_none_and_auto_are_served_without_functions(client, raw, value):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, function_call=value)
    assert r.choices[0].finish_reason in ("stop", "length")
    # as older agent code sends it beside tools (raw JSON: the SDK's types keep the two apart)
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "tools": TOOLS,
                                               "function_call": value})
    assert r.status_code == 200, r.text


def test_function_call_none_keeps_tools_uncalled_as_tool_choice_none(raw):
    """With tool_choice unset, "none" asks what tool_choice "none" asks: the tools are not offered (the prompt shows)."""
    def prompt_tokens(**extra):
        body = {"model": TINY, "messages": MSG, "max_tokens": 1, "tools": TOOLS, **extra}
        r = raw.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    offered, withheld = prompt_tokens(), prompt_tokens(tool_choice="none")
    assert offered > withheld
    assert prompt_tokens(function_call="none") == withheld
    assert prompt_tokens(function_call="auto") == offered
    assert prompt_tokens(function_call="none", tool_choice="auto") == offered  # tool_choice, when given, decides


def test_a_stored_streamed_function_call_keeps_its_shape(client):
    """A stored completion assembled from its stream has the ``function_call`` the stream carried."""
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, functions=FUNCTIONS, function_call={"name": "add"},
                                                 max_tokens=30, seed=4, stream=True, store=True))
    kept = client.chat.completions.retrieve(chunks[0].id).choices[0]
    assert kept.finish_reason == "stop" and kept.message.function_call.name == "add"


@pytest.mark.parametrize(("extra", "message"), [
    ({"functions": [{"name": "tools"}, {"name": "tools"}]}, "Duplicate function name 'tools' in 'functions'"),
    ({"functions": [{"name": "my-tools"}], "function_call": {"name": "my-tool_choice"}},
     "'function_call' names function 'my-tool_choice', which is not in 'functions'"),
    ({"functions": FUNCTIONS, "function_call": "tools"}, "Invalid value: 'tools'. Supported values are: 'none' and 'auto'."),
    ({"functions": [{"name": "f", "parameters": {"type": "object", "properties": {"tools": {"type": "strnig"}}}}]},
     "In context=('properties', 'tools', 'type')"),
])
def test_an_error_in_legacy_terms_quotes_the_clients_own_names_as_sent(raw, extra, message):
    """Only the tool checks' names for the params become the legacy ones: a function, a ``function_call`` value or a
    schema property called "tools" or "tool_choice" is quoted as the client wrote it (it was rewritten too)."""
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()


def test_parallel_tool_calls_true_with_functions_is_a_400_as_at_api_openai_com(client):
    """A reply to ``functions`` holds one ``function_call``, so asking for parallel calls cannot be served (api.openai.com
    refuses ``parallel_tool_calls`` without ``tools``); ``false`` asks for what is served anyway."""
    kw = dict(model=TINY, messages=MSG, functions=FUNCTIONS, function_call={"name": "add"}, max_tokens=30, seed=5)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(parallel_tool_calls=True, **kw)
    assert info.value.body["param"] == "parallel_tool_calls"
    assert "only allowed when 'tools' are specified" in info.value.body["message"]
    r = client.chat.completions.create(parallel_tool_calls=False, **kw)
    assert r.choices[0].message.function_call.name == "add"


def test_tool_calls_in_the_history_of_a_functions_request_are_a_400_as_at_api_openai_com(client, raw):
    """api.openai.com refuses a past ``tool_calls`` when ``functions`` are given, naming the message; without
    ``functions`` (or with ``tools``) the same history is served."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "2"}, {"role": "user", "content": "And?"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=history, functions=FUNCTIONS, max_tokens=1)
    assert (info.value.body["param"], info.value.body["code"]) == ("messages[1].tool_calls", None)
    assert "'tool_calls' cannot be used when 'functions' are present" in info.value.body["message"]
    for extra in ({}, {"tools": [{"type": "function", "function": ADD}]}, {"functions": []}):
        r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": history, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
