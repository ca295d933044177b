"""A forced call's ``arguments`` are a JSON object also when the tool's ``parameters`` name no type (``{}``, or
``properties`` alone, as some MCP servers and clients send them): the grammar let the random model write an array, a
string or a number there, which a client passing the arguments as keyword arguments cannot call. Real server, real
SDK, seeded tiny model."""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.tools import args_schema


@pytest.mark.parametrize("parameters", [{}, {"properties": {"a": {"type": "integer"}}}], ids=["empty", "properties only"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_arguments_are_an_object_whatever_the_schema_leaves_open(client, parameters, stream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    kw = dict(model=TINY, messages=[{"role": "user", "content": "x"}], tools=tools, n=4, seed=2, max_tokens=40,
              tool_choice={"type": "function", "function": {"name": "f"}})
    if stream:
        args: dict[int, str] = {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                for frag in c.delta.tool_calls or ():
                    args[c.index] = args.get(c.index, "") + (frag.function.arguments or "")
        got = [args[i] for i in range(4)]
    else:
        got = [c.message.tool_calls[0].function.arguments for c in client.chat.completions.create(**kw).choices]
    for text in got:
        assert text.startswith("{"), got  # (an array, a string or a number before; a cut object may not parse)
        if text.endswith("}"):
            assert isinstance(json.loads(text), dict)


def test_a_declared_type_is_kept():
    assert args_schema({})["type"] == "object"
    assert args_schema({"type": "object", "properties": {}})["type"] == "object"
