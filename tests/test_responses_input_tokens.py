"""``client.responses.input_tokens.count``: a create's ``usage.input_tokens``, known before sending (real server, tiny Llama)."""

from __future__ import annotations

import re
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server

#: about 1,200 tokens of the tiny model's tokenizer: two of them overflow its 2,048-token context
LONG = "alpha beta gamma delta " * 300
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
OTHER_KEY = "sk-input-tokens-other"


def _created(client: Any, **body: Any) -> Any:
    """A real (short) create with ``body``."""
    return client.responses.create(model=TINY, max_output_tokens=2, temperature=0, **body)


def _counted(client: Any, **body: Any) -> int:
    """The count for ``body``, checked to be the SDK's typed object."""
    r = client.responses.input_tokens.count(model=TINY, **body)
    assert r.object == "response.input_tokens" and isinstance(r.input_tokens, int)
    return r.input_tokens


def _prompt_tokens_metric(raw: Any) -> float:
    """The server's ``xllm_prompt_tokens_total`` for the tiny model (every prompt it ran)."""
    text = raw.get("/metrics").text
    found = re.search(r'^xllm_prompt_tokens_total\{model="tiny"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("body", [
    {"input": "Name a colour."},
    {"instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Name a colour."},
    ]},
    {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "auto"},
    {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
], ids=["string", "messages+instructions", "tools", "forced-tool"])
def test_count_equals_the_usage_of_a_create(client, body):
    counted = _counted(client, **body)
    assert counted == _created(client, **body).usage.input_tokens
    assert counted > 3


def test_instructions_and_tools_are_counted(client):
    plain = _counted(client, input="Weather in Paris?")
    assert _counted(client, input="Weather in Paris?", instructions="Be brief. " * 20) > plain + 20
    assert _counted(client, input="Weather in Paris?", tools=[WEATHER]) > plain


def test_previous_response_id_chain_is_counted(client):
    first = _created(client, instructions="Be brief.", input="Name a colour.")
    body = {"input": "Another one?", "previous_response_id": first.id}
    counted = _counted(client, **body)
    # the stored conversation (without the first turn's instructions) comes in front of the new input
    assert counted > _counted(client, input="Another one?")
    assert counted == _created(client, **body).usage.input_tokens


def test_count_generates_nothing_and_stores_nothing(client, raw):
    before = _prompt_tokens_metric(raw)
    # generation-only fields are accepted (the SDK sends whatever extra_body adds)
    r = raw.post("/v1/responses/input_tokens", json={
        "model": TINY, "input": "Name a colour.", "max_output_tokens": 5, "temperature": 0.3, "top_p": 0.9,
        "store": True, "stream": False, "metadata": {"k": "v"}, "personality": "friendly", "parallel_tool_calls": True,
    })
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "response.input_tokens", "input_tokens": _counted(client, input="Name a colour.")}
    assert _prompt_tokens_metric(raw) == before  # no prompt was run through the model


def test_truncation_auto_counts_what_create_sends(client):
    first = _created(client, input=LONG)
    body = {"input": LONG, "previous_response_id": first.id}
    whole = _counted(client, **body)
    ctx = client.models.retrieve(TINY).model_dump().get("context_length") or 2048
    assert whole > ctx  # an over-long prompt is still counted: knowing its size is the point
    with pytest.raises(openai.BadRequestError):
        _created(client, **body)  # while create refuses it ("disabled" is the default)
    fitted = _counted(client, truncation="auto", **body)
    assert fitted < whole
    assert fitted == _created(client, truncation="auto", **body).usage.input_tokens


@pytest.mark.parametrize("body, error, param", [
    ({"model": "no-such-model", "input": "hi"}, openai.NotFoundError, None),
    ({"model": TINY}, openai.BadRequestError, "input"),
    ({"input": "hi"}, openai.BadRequestError, "model"),
    ({"model": TINY, "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": "x"}]}, openai.BadRequestError, "tools"),
    ({"model": TINY, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     openai.BadRequestError, "text.format"),
    ({"model": TINY, "input": "hi", "previous_response_id": "resp_unknown"}, openai.BadRequestError, "previous_response_id"),
    ({"model": TINY, "input": "hi", "conversation": "conv_1"}, openai.BadRequestError, "conversation"),
    ({"model": TINY, "input": "hi", "reasoning": {"effort": "high"}}, openai.BadRequestError, "reasoning"),
    ({"model": TINY, "input": "hi", "tools": [{"type": "web_search"}]}, openai.BadRequestError, "tools[0].type"),
    ({"model": TINY, "input": "hi", "truncation": "sometimes"}, openai.BadRequestError, "truncation"),
    ({"model": TINY, "input": [{"type": "function_call_output", "call_id": "call_1", "output": "x"}]},
     openai.BadRequestError, "input"),
], ids=["unknown-model", "no-input", "no-model", "bad-tool-parameters", "bad-schema", "unknown-previous", "conversation", "reasoning", "built-in-tool", "bad-truncation",
        "orphan-tool-output"])
def test_errors_are_the_same_as_create(client, body, error, param):
    with pytest.raises(error) as counted:
        client.responses.input_tokens.count(**body)
    with pytest.raises(error) as created:
        client.responses.create(max_output_tokens=2, **body)
    assert counted.value.status_code == created.value.status_code
    assert counted.value.body == created.value.body  # the same OpenAI-shaped error
    assert set(counted.value.body) >= {"message", "type", "param", "code"}
    if param is not None:
        assert counted.value.body["param"].startswith(param)


def test_route_is_not_taken_for_a_response_id(raw):
    assert raw.get("/v1/responses/input_tokens").status_code == 405
    assert httpx.post(raw.base_url.join("/v1/responses/input_tokens"), json={"model": TINY, "input": "hi"}).status_code == 401


#: a created model whose Modelfile puts a system prompt and a first exchange in front of every conversation
MARIO = """FROM tiny
SYSTEM You are Mario from Super Mario Bros.
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
"""


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, tiny_llama_dir) -> Iterator[Any]:
    """A server with two user keys (so two users) and a store of its own: "tiny", and "mario" created from it."""
    from xllm_jupyter.store.store import ModelStore

    home = tmp_path_factory.mktemp("input-tokens-home")
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.create("mario", MARIO)
    with running_server(make_test_config(home, api_keys=(API_KEY, OTHER_KEY)), store, TINY) as info:
        yield info


def _sdk(server: Any, key: str) -> Any:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def test_another_users_previous_response_id_reads_as_unknown(own_server):
    with _sdk(own_server, API_KEY) as owner, _sdk(own_server, OTHER_KEY) as other:
        first = _created(owner, input="Name a colour.")
        assert _counted(owner, input="Another one?", previous_response_id=first.id) > 0
        with pytest.raises(openai.BadRequestError) as exc:  # the 400 an unknown id gets (api.openai.com's)
            other.responses.input_tokens.count(model=TINY, input="Another one?", previous_response_id=first.id)
        assert (exc.value.body["param"], exc.value.body["code"]) == ("previous_response_id", "previous_response_not_found")


def test_a_modelfiles_system_prompt_and_messages_are_counted(own_server):
    with _sdk(own_server, API_KEY) as c:
        counted = c.responses.input_tokens.count(model="mario", input="Name a colour.").input_tokens
        assert counted == c.responses.create(model="mario", input="Name a colour.", max_output_tokens=2).usage.input_tokens
        assert counted > c.responses.input_tokens.count(model=TINY, input="Name a colour.").input_tokens
