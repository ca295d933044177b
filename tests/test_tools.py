"""Function calling: request validation, prompts, grammars, parsers, and the real server with the openai SDK."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import llguidance
import openai
import pydantic
import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.core.errors import InvalidRequest
from xllm_jupyter.core.types import ChatMessage
from xllm_jupyter.openai.tool_parser import HERMES, LLAMA3, MISTRAL, StreamingToolParser, detect_family, parse_tool_calls
from xllm_jupyter.openai.tools import (
    MAX_PARALLEL_CALLS,
    parse_tool_config,
    prepare_messages,
    tool_constraint,
    tool_grammar,
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMES = ("get_weather", "add")


# ----------------------------------------------------------------- request side
def test_tool_config_validation():
    cfg = parse_tool_config(TOOLS, None, None)
    assert cfg.choice == "auto" and cfg.parallel and cfg.active and not cfg.constrained
    named = parse_tool_config(TOOLS, {"type": "function", "function": {"name": "add"}}, False)
    assert named.constrained and [t.name for t in named.callable_tools()] == ["add"] and not named.parallel
    assert not parse_tool_config(TOOLS, "none", None).active
    cases = [
        (([{"type": "function", "function": {"name": "bad name"}}], None), "tools[0].function.name"),
        (([{"type": "retrieval"}], None), "tools[0].type"),
        (([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None), "tools[0].function.parameters"),
        ((TOOLS, {"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        ((TOOLS, "sometimes"), "tool_choice"),
        ((None, "required"), "tool_choice"),
    ]
    for (tools, choice), param in cases:
        with pytest.raises(InvalidRequest) as info:
            parse_tool_config(tools, choice, None)
        assert info.value.param == param


def test_more_tools_than_openai_allows_is_a_400(client):
    """Validating tens of thousands of tools took seconds on the IOLoop (a quadratic duplicate check), for every user."""
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(129)]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, tools=many, max_tokens=1)
    assert info.value.param == "tools" and info.value.code == "array_above_max_length"
    assert len(parse_tool_config(many[:128], None, None).tools) == 128


@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_compiles_with_llguidance(parallel):
    cfg = parse_tool_config(TOOLS, "required", parallel)
    grammar = tool_grammar(cfg)
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar)) == ""
    assert tool_constraint(cfg).kind == "lark"
    named = tool_grammar(parse_tool_config(TOOLS, {"type": "function", "function": {"name": "add"}}, parallel))
    assert '\\"add\\"' in named and "get_weather" not in named
    assert tool_constraint(parse_tool_config(TOOLS, "auto", parallel)) is None


def test_grammar_admits_calls_and_rejects_others():
    """The grammar, run through llguidance's own matcher on bytes, accepts valid calls only."""
    from transformers import AutoTokenizer
    import llguidance.hf

    from tests.models import SMOLLM2_GGUF, smollm2_package_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_package_dir()), gguf_file=SMOLLM2_GGUF)
    lt = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.grammar_from("lark", tool_grammar(parse_tool_config(TOOLS, "required", True)))

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(lt, grammar)
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and not m.is_error() and m.is_accepting()

    one = '<tool_call>\n{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call>'
    assert accepts(one)
    assert accepts(one + "\n" + one.replace('"a":1', '"a":7'))
    # bounded: a small model that repeats its call cannot run to max_tokens
    assert accepts("\n".join([one] * MAX_PARALLEL_CALLS)) and not accepts("\n".join([one] * (MAX_PARALLEL_CALLS + 1)))
    named = llguidance.grammar_from("lark", tool_grammar(parse_tool_config(TOOLS, {"type": "function",
                                                                                  "function": {"name": "add"}}, True)))
    m = llguidance.LLMatcher(lt, named)
    assert m.consume_tokens(tok.encode(one, add_special_tokens=False)) and m.is_accepting()
    assert not m.consume_tokens(tok.encode("\n" + one, add_special_tokens=False))  # a named function: one call
    assert not accepts(one.replace('"add"', '"sub"'))
    assert not accepts(one.replace('"b":2', '"c":2'))
    assert not accepts("Sure! " + one)


def test_fallback_prompt_and_history_for_templates_without_tools():
    cfg = parse_tool_config(TOOLS, "auto", None)
    history = [
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", None, tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}],
                    reasoning_content="Paris first."),
        ChatMessage("tool", "21 C", tool_call_id="call_1"),
    ]
    msgs, tools = prepare_messages(history, cfg, native=False)
    assert msgs[2].reasoning_content == "Paris first."  # its thinking kept for the template, as its calls are
    assert tools is None
    assert msgs[0].role == "system" and "<tools>" in msgs[0].content and '"get_weather"' in msgs[0].content
    assert msgs[2].role == "assistant" and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in msgs[2].content
    assert msgs[3].role == "user" and "<tool_response>\n21 C\n</tool_response>" == msgs[3].content
    native, native_tools = prepare_messages(history, cfg, native=True)
    assert native_tools[0]["function"]["name"] == "get_weather"
    assert native[1].tool_calls[0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}  # templates want objects
    none_msgs, none_tools = prepare_messages(history[:1], parse_tool_config(TOOLS, "none", None), native=False)
    assert none_tools is None and none_msgs == history[:1]


# A minimal Qwen-style template that renders tools and tool-call history itself.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_tools_reach_a_native_chat_template(tiny_llama_dir, tmp_path):
    """A template that knows tools gets them (and objects for arguments); SmolLM2's gets the fallback."""
    from pathlib import Path

    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.transformers import TransformersBackend
    from xllm_jupyter.openai.tool_calling import ToolCalling

    class Req:
        tools, tool_choice, parallel_tool_calls = TOOLS, None, None

    history = [
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", None, tool_calls=[{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]),
        ChatMessage("tool", "3 C", tool_call_id="c1"),
    ]
    # a private copy (its own template file): the tokenizer of files in use is shared, and this test changes its template
    private = Path(tmp_path) / "t"
    shutil.copytree(tiny_llama_dir, private)
    with open(private / "chat_template.jinja", "a", encoding="utf-8") as f:
        f.write("{# this test's own copy #}")
    model = TransformersBackend().load(ModelSpec(name="t", path=private, options=BackendOptions(device="cpu")))
    try:
        fallback = ToolCalling.from_request(Req, model)
        assert not fallback.native
        prompt = model.render_chat(*fallback.prompt(history)[:1])
        assert "<tools>" in prompt and "<tool_response>\n3 C\n</tool_response>" in prompt and '"city": "Oslo"' in prompt
        model.tokenizer.chat_template = NATIVE_TEMPLATE
        native = ToolCalling.from_request(Req, model)
        assert native.native and native.family == HERMES
        messages, tools = native.prompt(history)
        prompt = model.render_chat(messages, tools=tools)
        assert "<tools>get_weather;add;</tools>" in prompt and "<tool_call>get_weather:Oslo</tool_call>" in prompt
        assert "<|im_start|>tool\n3 C" in prompt
    finally:
        model.unload()


# ---------------------------------------------------------------- response side
def test_family_detection():
    assert detect_family("{% if tools %}<tool_call>{% endif %}") == HERMES
    assert detect_family("<|python_tag|>{{ tools }}") == LLAMA3
    assert detect_family("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]") == MISTRAL
    assert detect_family(None) == HERMES


@pytest.mark.parametrize(
    ("family", "text", "content", "calls"),
    [
        (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         "Let me check.", [("get_weather", {"city": "Paris"})]),
        (HERMES, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call> ',
         None, [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
        (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),  # no closing tag
        (HERMES, '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
        (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
        (LLAMA3, 'Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 5, "b": 6}} done',
         "Sure: done", [("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 6})]),
        (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]',
         None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
        (MISTRAL, '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, [("add", {"a": 1, "b": 2})]),  # marker stripped
        (LLAMA3, 'The set {"name": "x"} is fine [1, 2].', 'The set {"name": "x"} is fine [1, 2].', []),
    ],
)
def test_parsers(family, text, content, calls):
    out = parse_tool_calls(text, NAMES, family)
    assert out.content == content
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls
    assert len({c.id for c in out.calls}) == len(calls) and all(c.id.startswith("call_") for c in out.calls)


def _stream(parser: StreamingToolParser, text: str, step: int) -> tuple[str, list]:
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    content = "".join(e.content for e in events if e.content is not None)
    calls: dict[int, list] = {}
    for e in events:
        if e.id is not None:
            assert e.index not in calls and e.name and e.arguments == ""
            calls[e.index] = [e.name, ""]
        elif e.arguments is not None:
            calls[e.index][1] += e.arguments
    return content, [(i, name, json.loads(args)) for i, (name, args) in sorted(calls.items())]


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streaming_parser_holds_back_markup(step):
    text = 'Checking <tool_c> now.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = _stream(StreamingToolParser(NAMES, HERMES), text, step)
    assert content == "Checking <tool_c> now.\n"
    assert calls == [(0, "add", {"a": 1, "b": 2}), (1, "get_weather", {"city": "Oslo"})]
    if step == 1:
        events = []
        parser = StreamingToolParser(NAMES, HERMES, held=True)
        for ch in text[text.index("<tool_call>"):]:
            events += parser.feed(ch)
        args = [e for e in events if e.index == 0 and e.arguments]
        assert len(args) > 5 and "".join(e.arguments for e in args) == '{"a": 1, "b": 2}'
    plain = "No tools needed <tool here."
    assert _stream(StreamingToolParser(NAMES, HERMES), plain, step) == (plain, [])
    llama = ' {"name": "add", "parameters": {"a": 4, "b": 2}}'
    assert _stream(StreamingToolParser(NAMES, LLAMA3), llama, step) == ("", [(0, "add", {"a": 4, "b": 2})])
    assert _stream(StreamingToolParser(NAMES, LLAMA3), plain, step) == (plain, [])


# ------------------------------------------------------------ the real server

def _check_calls(calls, only: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert only is None or call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(
    ("choice", "only"),
    [("required", None), ({"type": "function", "function": {"name": "add"}}, "add")],
)
def test_forced_tool_calls(client, choice, only):
    """Even the random-weight model must produce valid calls when the grammar forces them."""
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=200, seed=1)
    choice0 = r.choices[0]
    # a call forced by name finishes "stop", as api.openai.com finishes it; required ones "tool_calls"
    assert choice0.finish_reason == ("stop" if only else "tool_calls")
    assert choice0.message.content is None
    _check_calls(choice0.message.tool_calls, only)


def test_forced_tool_calls_streaming(client):
    chunks = list(client.chat.completions.create(
        model=TINY, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=200, seed=2, stream=True))
    calls: dict[int, dict] = {}
    finish, pieces = None, 0
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.content is None  # as the full response's content: null
    for chunk in chunks:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        assert not c.delta.content  # no raw markup leaks as text
        for frag in c.delta.tool_calls or []:
            assert frag.index is not None
            if frag.index not in calls:
                assert frag.id and frag.type == "function" and frag.function.name
                calls[frag.index] = {"id": frag.id, "name": frag.function.name, "arguments": frag.function.arguments or ""}
            else:
                assert frag.id is None and frag.type is None and frag.function.name is None
                calls[frag.index]["arguments"] += frag.function.arguments
                pieces += 1
        finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert sorted(calls) == list(range(len(calls))) and calls
    # arguments follow each header (how many pieces the first call's come in depends on the engine's
    # pacing; tests/test_tool_stream_agreement.py checks they stream as generated)
    assert pieces >= len(calls)
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    # the same request without streaming gives the same calls
    full = client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=200, seed=2)
    assert [(t.function.name, t.function.arguments) for t in full.choices[0].message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls.values()
    ]


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_streamed_logprobs_with_tools_match_the_full_response(client, choice):
    """With tools, the stream carries every token's logprobs (those of held-back text on the next chunk), as the
    full response does; they were missing from the stream."""
    kw = dict(model=TINY, messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=12, seed=3, logprobs=True, top_logprobs=1)
    full = client.chat.completions.create(**kw)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw)
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens
    assert [e.token for e in streamed] == [e.token for e in full.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full.choices[0].logprobs.content], abs=1e-3)


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=TINY, messages=MSG, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1
        _check_calls(r.choices[0].message.tool_calls)


def test_tool_result_conversation_and_none(client):
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "21 degrees and sunny"},
    ]
    r = client.chat.completions.create(model=TINY, messages=history, tools=TOOLS, max_tokens=8, seed=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.completion_tokens >= 1
    r = client.chat.completions.create(model=TINY, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, seed=0)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_errors(client, xllm_server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.status_code == 400 and info.value.param == "tool_choice"
    bad_tools = [
        [{"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}],
        [{"type": "function"}],
        {"type": "function", "function": {"name": "f"}},
    ]
    for tools in bad_tools:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=TINY, messages=MSG, tools=tools)
        assert info.value.status_code == 400 and info.value.param.startswith("tools")
    # not a JSON Schema: OpenAI's invalid_function_parameters, forced or not
    broken = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 7}}}}}]
    r = httpx.post(xllm_server.base_url + "/chat/completions", headers={"Authorization": f"Bearer {xllm_server.api_key}"},
                   json={"model": TINY, "messages": MSG, "tools": broken, "tool_choice": "required", "stream": True}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_function_parameters"
    # a JSON Schema llguidance cannot compile is a 400 when it must be enforced
    dangling = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}, "required": ["x"]}}}]
    r = httpx.post(xllm_server.base_url + "/chat/completions", headers={"Authorization": f"Bearer {xllm_server.api_key}"},
                   json={"model": TINY, "messages": MSG, "tools": dangling, "tool_choice": "required", "stream": True}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters", r.text[:300]
    assert client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2).choices  # still serving


# Schemas real clients send: the openai SDK's pydantic tools ($defs, $ref, anyOf with null,
# strict additionalProperties), instructor's, draft 7's tuple items, a bare object.
class _Address(pydantic.BaseModel):
    city: str
    zip: str | None = None


class _Order(pydantic.BaseModel):
    items: list[str]
    ship_to: _Address
    priority: int = pydantic.Field(default=1, ge=1, le=5)


VALID_PARAMETERS = [
    openai.pydantic_function_tool(_Order)["function"]["parameters"],
    _Order.model_json_schema(),
    {"type": "object"},
    {},
    {"type": "object", "properties": {"type": {"type": "string"}, "properties": {"type": "object"}}},
    {"type": "object", "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "number"}]},
                                      "any": True, "tag": {"type": ["string", "null"], "enum": ["a", None]}},
     "required": ["pair"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maxLength": 3, "format": "int32",
                                            "not": {"const": 3}, "oneOf": [{"multipleOf": 2}, {"multipleOf": 3}]}}},
    TOOLS[0]["function"]["parameters"],
]

INVALID_PARAMETERS = [
    ({"type": "object", "properties": 5}, "('properties',)"),
    ({"type": "object", "properties": {"a": {"type": 7}}}, "('properties', 'a', 'type')"),
    ({"type": "object", "properties": {"a": {"type": "text"}}}, "('properties', 'a', 'type')"),
    ({"type": "object", "required": "x"}, "('required',)"),
    ({"type": "object", "properties": {"a": 5}}, "('properties', 'a')"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "minLength": -1}}}},
     "('properties', 'a', 'items', 'minLength')"),
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "('properties', 'a', 'anyOf')"),
    ({"type": "object", "definitions": {"A": {"enum": "x"}}}, "('definitions', 'A', 'enum')"),
]


def test_parameters_that_are_not_a_json_schema_are_refused_like_openai(client):
    """``properties: 5`` and friends were accepted unless the tool was forced; OpenAI answers 400 invalid_function_parameters."""
    def is_schema(schema: object) -> bool:  # (the test's premise: under draft 2020-12 or draft 7)
        for meta in (jsonschema.Draft202012Validator, jsonschema.Draft7Validator):
            try:
                meta.check_schema(schema)
                return True
            except jsonschema.SchemaError:
                pass
        return False

    for schema in VALID_PARAMETERS:
        assert is_schema(schema), schema
        cfg = parse_tool_config([{"type": "function", "function": {"name": "f", "parameters": schema}}], None, None)
        assert cfg.tools[0].parameters == schema
    for schema, context in INVALID_PARAMETERS:
        assert not is_schema(schema), schema
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        with pytest.raises(InvalidRequest) as info:
            parse_tool_config([TOOLS[0], tool], None, None)
        assert info.value.code == "invalid_function_parameters" and info.value.param == "tools[1].function.parameters"
        assert info.value.message.startswith("Invalid schema for function 'f': In context=" + context), info.value.message
    # over the wire, chat and Responses, not forced
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": "city"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    assert err.value.status_code == 400 and err.value.code == "invalid_function_parameters"
    assert err.value.param == "tools[0].function.parameters"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=TINY, input="hi", max_output_tokens=16,
                                tools=[{"type": "function", "name": "f", "parameters": schema}])
    assert err.value.code == "invalid_function_parameters" and err.value.param == "tools[0].parameters"
    for bad, code in (([], "invalid_type"), ({"type": "array"}, "invalid_function_parameters")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1,
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": bad}}])
        assert err.value.code == code and err.value.param == "tools[0].function.parameters"
    # a valid client schema still gets an answer
    answer = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, tools=[
        {"type": "function", "function": {"name": "f", "parameters": VALID_PARAMETERS[0]}}])
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
