"""A chat reply forced to call one named function finishes ``stop``, as api.openai.com (and vLLM) finish it: a
named ``tool_choice`` (or a legacy named ``function_call``) gives ``finish_reason: "stop"`` with its call, in full
replies and streams; ``required`` and ``auto`` calls keep ``tool_calls``. Real server, real SDK, seeded tiny model."""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.tool_calling import ToolDeltas
from xllm_jupyter.openai.tool_parser import HERMES, StreamingToolParser

ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
BASE = dict(model=TINY, messages=[{"role": "user", "content": "Add 2 and 3."}], max_tokens=60, seed=4)


def _stream(client, **kw) -> tuple[list[str | None], dict[int, str]]:
    """Each choice's finish_reason and its call's assembled arguments, from a stream."""
    finish: list[str | None] = [None] * kw.get("n", 1)
    args: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for frag in c.delta.tool_calls or ():
                args[c.index] = args.get(c.index, "") + (frag.function.arguments or "")
            if c.delta.function_call is not None:
                args[c.index] = args.get(c.index, "") + (c.delta.function_call.arguments or "")
            finish[c.index] = c.finish_reason or finish[c.index]
    return finish, args


@pytest.mark.parametrize("n", [1, 3])
def test_a_named_tool_choice_finishes_stop(client, n):
    kw = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, n=n, **BASE)
    r = client.chat.completions.create(**kw)
    for choice in r.choices:
        call = choice.message.tool_calls[0]
        json.loads(call.function.arguments)  # complete
        # was "tool_calls"; stop_reason (vLLM's) stays null: no stop string ended it
        assert (choice.finish_reason, choice.model_extra["stop_reason"], call.function.name) == ("stop", None, "add")
    finish, args = _stream(client, **kw)
    assert finish == ["stop"] * n  # was "tool_calls"
    assert [args[i] for i in range(n)] == [c.message.tool_calls[0].function.arguments for c in r.choices]


def test_required_and_named_differ_only_in_the_finish(client):
    """``required`` with a single tool forces the same call: it finishes ``tool_calls`` (full and streamed)."""
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **BASE)
    assert client.chat.completions.create(**kw).choices[0].finish_reason == "tool_calls"
    assert _stream(client, **kw)[0] == ["tool_calls"]


def test_a_legacy_named_function_call_finishes_stop(client):
    kw = dict(functions=[t["function"] for t in TOOLS], function_call={"name": "add"}, **BASE)
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "stop" and choice.message.function_call.name == "add"  # was "function_call"
    finish, args = _stream(client, **kw)
    assert finish == ["stop"] and args[0] == choice.message.function_call.arguments


def test_unnamed_calls_keep_their_finish():
    """Calls the model chose (auto; the random model writes none itself, so the parser is fed) still say so."""
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    for legacy, reason in ((False, "tool_calls"), (True, "function_call")):
        assert ToolDeltas(StreamingToolParser(["add"], HERMES), True, legacy).deltas(text, "stop")[-1][1] == reason
    assert ToolDeltas(StreamingToolParser(["add"], HERMES), True, named=True).deltas(text, "stop")[-1][1] == "stop"
