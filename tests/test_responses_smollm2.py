"""The Responses API on real text: the packaged SmolLM2 served over HTTP, driven with the openai SDK's Responses calls."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from xllm_jupyter.store.store import ModelStore

from .server_fixtures import make_test_config, running_server

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def client(smollm2_home):
    """An openai SDK client for a standalone server with the session's SmolLM2 loaded."""
    import openai

    with running_server(make_test_config(smollm2_home), ModelStore(smollm2_home), MODEL) as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=300) as c:
            yield c


def test_a_previous_response_id_chain_remembers(client):
    first = client.responses.create(model=MODEL, instructions="Answer in one short sentence.", temperature=0,
                                    input="My name is Zorblax. Say hello to me.", max_output_tokens=30)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, temperature=0, max_output_tokens=10,
                                     input="What is my name? Reply with just the name.")
    assert "Zorblax" in second.output_text and second.instructions is None
    # the whole stored turn went in front: more input than the first turn's input and output together
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    counted = client.responses.input_tokens.count(model=MODEL, previous_response_id=first.id,
                                                  input="What is my name? Reply with just the name.")
    assert counted.input_tokens == second.usage.input_tokens


def test_parse_fills_a_pydantic_model(client):
    r = client.responses.parse(model=MODEL, input="Extract: Alice is 31 years old.", text_format=Person,
                               max_output_tokens=60, temperature=0)
    assert r.status == "completed" and r.output_parsed == Person(name="Alice", age=31)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Person"


def test_a_function_call_round_trip(client):
    call = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER],
                                   tool_choice="required", max_output_tokens=60, temperature=0)
    (fc,) = [o for o in call.output if o.type == "function_call"]
    assert call.status == "completed" and fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
    done = client.responses.create(model=MODEL, previous_response_id=call.id, tools=[WEATHER], max_output_tokens=20,
                                   temperature=0, input=[{"type": "function_call_output", "call_id": fc.call_id,
                                                          "output": "Sunny, 25 C"}])
    assert done.output_text and [i.type for i in client.responses.input_items.list(done.id)] == ["function_call_output"]
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        done_args = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert done_args == [final.output[0].arguments] and json.loads(done_args[0]) == {"city": "Oslo"}
