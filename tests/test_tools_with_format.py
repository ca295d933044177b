"""Tools the model may call together with a ``response_format``: it may call a tool or answer in the format.

pydantic-ai (``NativeOutput`` with tools), the OpenAI Agents SDK (``output_type`` with tools), dspy's
``JSONAdapter(use_native_function_calling=True)`` and LangChain agents with a provider response format send
``tools`` (``tool_choice`` auto) and a JSON ``response_format`` in one request: the tool round trip comes first,
the structured answer last. The format's grammar alone made a tool call impossible. The bodies below are the
ones those libraries send, replayed with the openai SDK (the libraries are not test dependencies).
"""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.core.types import Constraint
from xllm_jupyter.openai.tool_calling import ToolCalling
from xllm_jupyter.openai.tool_parser import HERMES
from xllm_jupyter.openai.tools import calls_or_answer, parse_tool_config

pytest.importorskip("llguidance")

#: SmolLM2's "<": the first token of a ``<tool_call>`` block, and no JSON answer's first token
LT = 44
PICK = {"type": "function", "function": {"name": "pick", "description": "Pick a side.", "parameters": {
    "type": "object", "properties": {"side": {"enum": ["heads", "tails"]}}, "required": ["side"],
    "additionalProperties": False}}}
# pydantic-ai's NativeOutput(Person) (chat) and the Agents SDK's output_type (Responses' text.format)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON, "strict": True}}
MSG = [{"role": "user", "content": "Pick a side, then tell me about Bob, 32."}]


def test_a_tool_call_is_possible_beside_a_json_schema_format(client):
    """The model leaning to ``<`` (the random model chooses nothing by itself) calls the tool: the grammar admits it."""
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[PICK], response_format=FORMAT, n=2, seed=1,
                                       parallel_tool_calls=False, max_tokens=60, logit_bias={str(LT): 100})
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "pick" and json.loads(call.function.arguments)["side"] in ("heads", "tails"), call


def test_a_tool_call_is_possible_beside_json_object_streamed(client):
    """``json_object`` (instructor's JSON modes with tools, LangChain's json_mode) and a stream: the call streams as one."""
    stream = client.chat.completions.create(model=TINY, messages=MSG, tools=[PICK], response_format={"type": "json_object"},
                                            seed=2, parallel_tool_calls=False, max_tokens=60, logit_bias={str(LT): 100},
                                            stream=True)
    names, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            names += [tc.function.name for tc in choice.delta.tool_calls or () if tc.function and tc.function.name]
            finish = choice.finish_reason or finish
    assert names == ["pick"] and finish == "tool_calls"


def test_an_answer_beside_tools_still_follows_the_format(client):
    """The other branch: an answer in text is the format's JSON, as before (tool calls, when chosen, are well formed)."""
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[PICK], response_format=FORMAT, n=4, seed=3,
                                       max_tokens=60, logit_bias={str(LT): -100})
    for choice in r.choices:
        assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
        out = json.loads(choice.message.content)
        assert set(out) == {"name", "age"}, out


def test_tool_choice_none_leaves_only_the_format(client):
    """``tool_choice: none`` shows no tools: the format alone decides, even for a model leaning to ``<``."""
    r = client.chat.completions.create(model=TINY, messages=MSG, tools=[PICK], tool_choice="none", response_format=FORMAT,
                                       seed=4, max_tokens=60, logit_bias={str(LT): 100})
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert set(json.loads(r.choices[0].message.content)) == {"name", "age"}


def test_a_tool_schema_the_grammar_cannot_compile_leaves_the_format_alone(raw):
    """A tool schema the grammar cannot take, beside a format, is no 400: the format alone applies, as it did before
    calls were admitted beside it (an agent with such a tool kept working); a forced call to it is still the 400."""
    bad = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}, "required": ["x"]}}}
    body = {"model": TINY, "messages": MSG, "tools": [bad], "response_format": FORMAT, "max_tokens": 60, "seed": 5,
            "logit_bias": {str(LT): 100}}
    r = raw.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls"), choice
    assert set(json.loads(choice["message"]["content"])) == {"name", "age"}, choice
    forced = raw.post("/v1/chat/completions", json={**body, "tool_choice": "required"})
    assert forced.status_code == 400, forced.text
    err = forced.json()["error"]
    assert err["param"] == "tools[0].function.parameters" and "odd" in err["message"], err


def test_a_format_schema_the_grammar_cannot_compile_beside_tools_is_its_own_400(raw):
    """A bad ``response_format`` schema beside tools gets the 400 it gets alone, not the Lark grammar quoted."""
    bad = {"type": "json_schema", "json_schema": {"name": "P", "schema": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}, "required": ["x"]}}}
    body = {"model": TINY, "messages": MSG, "response_format": bad, "max_tokens": 5}
    alone = raw.post("/v1/chat/completions", json=body)
    beside = raw.post("/v1/chat/completions", json={**body, "tools": [PICK]})
    assert alone.status_code == beside.status_code == 400, beside.text
    assert beside.json() == alone.json() and "lark" not in beside.text, beside.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_repeated_call_beside_a_format_ends_the_reply(client, stream):
    """A call the model may make repeats under this grammar as a forced one does (only calls can follow it): the reply
    ends at the repeat with its calls (finish ``tool_calls``), not at ``max_tokens`` (``length``, which ``parse()``
    and openai-agents over Responses raise on)."""
    kw = dict(model=TINY, messages=MSG, tools=[PICK], response_format=FORMAT, n=2, temperature=0, max_tokens=80,
              logit_bias={str(LT): 100}, stream_options={"include_usage": True} if stream else None)
    if not stream:
        r = client.chat.completions.create(**kw)
        got = [(c.finish_reason, [(t.function.name, t.function.arguments) for t in c.message.tool_calls or ()],
                c.message.content) for c in r.choices]
        used = r.usage.completion_tokens
    else:
        calls, content, finish, used = [{}, {}], ["", ""], [None, None], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            used = chunk.usage.completion_tokens if chunk.usage else used
            for c in chunk.choices:
                content[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
                for tc in c.delta.tool_calls or ():
                    name, args = calls[c.index].get(tc.index, ("", ""))
                    calls[c.index][tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
        got = [(finish[i], [calls[i][k] for k in sorted(calls[i])], content[i] or None) for i in range(2)]
    for finish_reason, made, content in got:
        assert finish_reason == "tool_calls" and made and content is None, got
        assert len(set(made)) == len(made) and all(name == "pick" for name, _ in made), got
    assert used < 2 * 80, used  # both choices ended before their budget


@pytest.mark.parametrize("template, widened", [
    (None, True),  # no template tools: our Hermes fallback prompt
    ("{{ tools }}<tool_call>", True),  # Qwen/Hermes
    ("{{ tools }}[TOOL_CALLS]", False),  # Mistral
    ("{{ tools }}<|python_tag|>ipython", False),  # Llama 3.1
])
def test_only_hermes_calls_join_the_format(template, widened):
    """The grammar writes Hermes blocks: a template asking for other call markup keeps the format alone (as serving
    decides it); ``none`` and forced choices never widen it (the forced grammar wins in serving)."""
    answer = Constraint("json_schema", json.dumps(PERSON))
    for choice, expect in (("auto", widened), ("none", False), ("required", False)):
        tools = ToolCalling(parse_tool_config([PICK], choice, None), template)
        got = calls_or_answer(tools.cfg, answer, tools.family == HERMES)
        assert (got is not answer) == expect and (got.kind == "lark") == expect, (choice, got)


def test_a_repeat_ending_the_output_finishes_tool_calls_in_the_full_reply_as_in_the_stream():
    """The token closing the repeated call may be the last one max_tokens allows: the stream ends the reply there with
    its calls (finish ``tool_calls``), and the full reply says the same, not ``length``."""
    tools = ToolCalling(parse_tool_config([PICK], "auto", None), None)
    tools.bound = True  # beside a format (serving sets it)
    call = '<tool_call>\n{"name": "pick", "arguments": {"side": "heads"}}\n</tool_call>'
    message, reason = tools.message(call + "\n" + call, "length")
    streamed = tools.streamer().deltas(call + "\n" + call, "length")
    assert streamed[-1][1] == reason == "tool_calls", (streamed, reason)
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"side": "heads"}]
