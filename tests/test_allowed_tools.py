"""``tool_choice`` of type ``allowed_tools`` (chat: nested under ``allowed_tools``; Responses: flat), through the
real ``openai`` SDK against the session server's random-weight tiny Llama: only the listed tools are shown to the
model, parsed and (mode ``required``) forced by the grammar; names outside ``tools`` are a 400 naming the param."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .server_fixtures import TINY

EMPTY = {"type": "object", "properties": {}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
SCHEMAS = {"get_weather": CITY, "get_time": EMPTY, "get_news": CITY}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} for a city", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's shape
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


def allowed(mode: str, *names: str) -> dict:
    """A chat ``allowed_tools`` tool choice."""
    return {"type": "allowed_tools",
            "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": n}} for n in names]}}


@pytest.mark.parametrize("names", [("get_news",), ("get_time", "get_news")])
def test_mode_required_calls_only_the_allowed_tools(client, names):
    seen: set[str] = set()
    for seed in range(3):
        r = client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice=allowed("required", *names),
                                           max_tokens=200, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name in names, (seed, call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            seen.add(call.function.name)
    assert seen <= set(names)


def test_mode_required_streams_only_the_allowed_tools(client):
    names = []
    for chunk in client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, stream=True, max_tokens=200,
                                                seed=4, tool_choice=allowed("required", "get_time")):
        for c in chunk.choices:
            assert not c.delta.content
            names += [f.function.name for f in c.delta.tool_calls or [] if f.function and f.function.name]
    assert names and set(names) == {"get_time"}


def test_mode_auto_shows_the_model_only_the_allowed_tools(client):
    """The prompt of tools [a, b, c] restricted to [b] is the prompt of tools [b] alone."""
    def prompt_tokens(**kw):
        return client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, seed=0, **kw).usage.prompt_tokens

    restricted = prompt_tokens(tools=TOOLS, tool_choice=allowed("auto", "get_time"))
    alone = prompt_tokens(tools=[TOOLS[1]], tool_choice="auto")
    everything = prompt_tokens(tools=TOOLS, tool_choice="auto")
    assert restricted == alone < everything
    two = prompt_tokens(tools=TOOLS, tool_choice=allowed("auto", "get_weather", "get_news"))
    assert two == prompt_tokens(tools=[TOOLS[0], TOOLS[2]]) < everything
    # auto: the model may answer in text; any call it makes is one of the allowed
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice=allowed("auto", "get_time"),
                                       max_tokens=30, seed=1)
    assert all(c.function.name == "get_time" for c in r.choices[0].message.tool_calls or [])


@pytest.mark.parametrize(("choice", "param"), [
    (allowed("required", "get_time", "get_nothing"), "tool_choice.allowed_tools.tools[1].function.name"),
    (allowed("sometimes", "get_time"), "tool_choice.allowed_tools.mode"),
    (allowed("auto"), "tool_choice.allowed_tools.tools"),
    ({"type": "allowed_tools"}, "tool_choice.allowed_tools"),
    ({"type": "allowed_tools", "allowed_tools": []}, "tool_choice.allowed_tools"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "custom", "custom": {"name": "x"}}]}},
     "tool_choice.allowed_tools.tools[0].type"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function"}]}},
     "tool_choice.allowed_tools.tools[0].function.name"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": "get_time"}}, "tool_choice.allowed_tools.tools"),
])
def test_bad_allowed_tools_are_400s_naming_the_param(client, choice, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=5)
    err = caught.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "Traceback" not in err["message"]


def test_allowed_tools_without_tools_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=MSG, tool_choice=allowed("required", "get_time"), max_tokens=5)
    assert caught.value.body["param"] == "tool_choice.allowed_tools.tools[0].function.name"


# ------------------------------------------------------------------ the Responses API (flat shapes)
def flat(mode: str, *names: str) -> dict:
    """A Responses ``allowed_tools`` tool choice."""
    return {"type": "allowed_tools", "mode": mode, "tools": [{"type": "function", "name": n} for n in names]}


def test_responses_mode_required_calls_only_the_allowed_tools(client):
    r = client.responses.create(model=TINY, input="Weather in Paris?", tools=FLAT_TOOLS,
                                tool_choice=flat("required", "get_news"), max_output_tokens=200)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and {c.name for c in calls} == {"get_news"}
    jsonschema.validate(json.loads(calls[0].arguments), CITY)
    # the response echoes the tool choice, parsed by the SDK as its allowed-tools type
    assert type(r.tool_choice).__name__ == "ToolChoiceAllowed"
    assert r.tool_choice.mode == "required" and r.tool_choice.tools == [{"type": "function", "name": "get_news"}]


def test_responses_stream_with_allowed_tools(client):
    with client.responses.stream(model=TINY, input="Weather in Paris?", tools=FLAT_TOOLS, max_output_tokens=200,
                                 tool_choice=flat("required", "get_time")) as stream:
        done = [e.item for e in stream if e.type == "response.output_item.done"]
        final = stream.get_final_response()
    assert [i.name for i in done if i.type == "function_call"] == [
        i.name for i in final.output if i.type == "function_call"] and done
    assert {i.name for i in final.output if i.type == "function_call"} == {"get_time"}


def test_responses_input_tokens_count_only_the_allowed_tools(client):
    count = client.responses.input_tokens.count
    restricted = count(model=TINY, input="Hi", tools=FLAT_TOOLS, tool_choice=flat("auto", "get_time")).input_tokens
    assert restricted == count(model=TINY, input="Hi", tools=[FLAT_TOOLS[1]]).input_tokens
    assert restricted < count(model=TINY, input="Hi", tools=FLAT_TOOLS).input_tokens


@pytest.mark.parametrize(("choice", "param"), [
    (flat("required", "get_time", "get_nothing"), "tool_choice.tools[1].name"),
    (flat("never", "get_time"), "tool_choice.mode"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "server_label": "deepwiki"}]},
     "tool_choice.tools[0].type"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function"}]}, "tool_choice.tools[0].name"),
])
def test_responses_bad_allowed_tools_are_400s_in_responses_terms(client, choice, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=TINY, input="Hi", tools=FLAT_TOOLS, tool_choice=choice, max_output_tokens=5)
    err = caught.value.body
    assert err["param"] == param, err
    assert "allowed_tools" not in err["message"] and ".function" not in err["message"], err
