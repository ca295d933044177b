"""JSON-schema formats the grammar engine does not enforce: ignored outside strict mode, refused in it, as api.openai.com."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import openai
import pydantic
import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.schema_formats import ENFORCED_FORMATS, drop_unenforced_formats

#: formats real clients send that llguidance does not know (pydantic's bytes, SecretStr, Path, Json; OpenAPI; JSON Schema)
UNENFORCED = ["binary", "password", "path", "file-path", "directory-path", "json-string", "uri-reference", "base64",
              "regex", "idn-email", "iri", "byte", "int32"]
MSG = [{"role": "user", "content": "Hi"}]


def _schema(fmt: str) -> dict:
    return {"type": "object", "properties": {"b": {"type": "string", "format": fmt}}, "required": ["b"]}


def _compiles(schema: dict) -> bool:
    failed, _ = llguidance.LLMatcher.validate_grammar_with_warnings(llguidance.grammar_from("json_schema", json.dumps(schema)))
    return not failed


def test_the_enforced_formats_are_the_ones_the_engine_knows():
    """The list the server keeps matches the installed llguidance: an upgrade that learns a format is noticed."""
    for fmt in ENFORCED_FORMATS:
        assert _compiles(_schema(fmt)), fmt
    for fmt in UNENFORCED:
        assert not _compiles(_schema(fmt)), fmt
        assert _compiles(drop_unenforced_formats(_schema(fmt))), fmt


def test_only_format_keywords_the_engine_cannot_enforce_are_dropped():
    schema = {"type": "object", "properties": {
        "format": {"type": "string", "format": "binary"},  # a property named "format" stays
        "when": {"type": "string", "format": "date-time"},
        "each": {"type": "array", "items": {"anyOf": [{"type": "string", "format": "path"}, {"type": "null"}]}},
        "all": {"allOf": [{"$ref": "#/$defs/S"}]}},
        "$defs": {"S": {"type": "string", "format": "password"}}}
    before = json.dumps(schema)
    out = drop_unenforced_formats(schema)
    assert json.dumps(schema) == before  # the client's schema is not changed
    assert out["properties"]["format"] == {"type": "string"} and out["properties"]["when"]["format"] == "date-time"
    assert out["properties"]["each"]["items"]["anyOf"][0] == {"type": "string"}
    assert out["$defs"]["S"] == {"type": "string"}
    plain = {"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}}
    assert drop_unenforced_formats(plain) is plain


class _Upload(pydantic.BaseModel):
    """What LangChain's with_structured_output(method="function_calling") sends for such a model (not strict)."""

    data: bytes
    where: Path
    secret: pydantic.SecretStr
    extra: pydantic.Json[int]


@pytest.mark.parametrize("fmt", UNENFORCED)
def test_a_format_the_engine_does_not_know_constrains_only_the_type(client, fmt):
    """It was a 400 'Unknown format' for a forced tool and for response_format; OpenAI takes it outside strict mode."""
    tool = {"type": "function", "function": {"name": "g", "parameters": _schema(fmt)}}
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[tool], tool_choice="required", max_tokens=24)
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    rf = {"type": "json_schema", "json_schema": {"name": "g", "schema": _schema(fmt), "strict": False}}
    r = client.chat.completions.create(model=TINY, messages=MSG, response_format=rf, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_pydantic_model_with_bytes_path_secret_and_json_fields_can_be_forced(client):
    tool = {"type": "function", "function": {"name": "upload", "description": "Upload", "parameters": _Upload.model_json_schema()}}
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[tool], max_tokens=48,
                                       tool_choice={"type": "function", "function": {"name": "upload"}})
    assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=2,
                                text={"format": {"type": "json_schema", "name": "up", "schema": _Upload.model_json_schema()}})
    assert r.status in ("completed", "incomplete")


def test_strict_mode_refuses_a_format_it_cannot_enforce_in_openais_words(client):
    """OpenAI's strict mode refuses it; here too, saying which format and where (was the engine's 'Unknown format')."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g", "strict": True, "parameters": _schema("binary")}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, tools=tools, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "g"}})
    err = info.value.body
    assert err["param"] == "tools[1].function.parameters" and err["code"] == "invalid_function_parameters"
    assert err["message"] == "Invalid schema for function 'g': In context=('properties', 'b'), 'binary' is not a valid format."
    rf = {"type": "json_schema", "json_schema": {"name": "g", "schema": _schema("path"), "strict": True}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, response_format=rf, max_tokens=2)
    assert info.value.body["param"] == "response_format"
    assert "In context=('properties', 'b'), 'path' is not a valid format." in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=TINY, input="Hi", max_output_tokens=2, tool_choice="required",
                                tools=[{"type": "function", "name": "g", "strict": True, "parameters": _schema("binary")}])
    assert info.value.body["param"] == "tools[0].parameters" and "'binary' is not a valid format" in info.value.body["message"]
    # a strict tool the model only may call is never compiled: nothing to lose, served as before
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=tools[1:], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # a format the engine enforces is kept, strict or not
    rf = {"type": "json_schema", "json_schema": {"name": "g", "schema": _schema("uuid"), "strict": True}}
    r = client.chat.completions.create(model=TINY, messages=MSG, response_format=rf, max_tokens=60)
    if r.choices[0].finish_reason == "stop":
        assert len(json.loads(r.choices[0].message.content)["b"]) == 36
