"""A stop string that cuts a tool call: the reply keeps the call as far as it got and says ``stop``, never that the
call is complete (``tool_calls`` / ``function_call``), as a ``max_tokens`` cut says ``length``. Real server, real SDK."""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.chat_assembly import CompletionAssembler
from xllm_jupyter.openai.tool_calling import ToolDeltas
from xllm_jupyter.openai.tool_parser import HERMES, StreamingToolParser

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
NAMED = {"type": "function", "function": {"name": "add"}}
MSG = [{"role": "user", "content": "Add 2 and 3."}]
# "}" can only come at the end of the arguments object in a call to add: every forced call is cut inside it
BASE = dict(model=TINY, messages=MSG, max_tokens=60, seed=4)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _assembled(stream) -> dict:
    done = CompletionAssembler()
    for chunk in stream:
        done.add(chunk.model_dump(exclude_unset=True))
    return done.completion()


def test_a_forced_call_cut_by_a_stop_string_is_partial_and_finishes_stop(client):
    whole = client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, **BASE).choices[0]
    assert whole.finish_reason == "tool_calls" and _is_json(whole.message.tool_calls[0].function.arguments)
    cut = client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, stop=["}"], **BASE).choices[0]
    call = cut.message.tool_calls[0]
    # was finish_reason "tool_calls" with these arguments, which are no JSON: a client could not tell the call was cut
    assert cut.finish_reason == "stop"
    assert call.function.name == "add" and not _is_json(call.function.arguments)
    assert whole.message.tool_calls[0].function.arguments.startswith(call.function.arguments)
    streamed = _assembled(client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, stop=["}"], stream=True, **BASE))
    choice = streamed["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": call.function.arguments}


def test_a_legacy_forced_function_call_cut_by_a_stop_string_finishes_stop(client):
    functions = [t["function"] for t in TOOLS]
    kw = dict(functions=functions, function_call={"name": "add"}, stop=["}"], **BASE)
    cut = client.chat.completions.create(**kw).choices[0]
    assert cut.finish_reason == "stop"  # was "function_call"
    assert cut.message.function_call.name == "add" and not _is_json(cut.message.function_call.arguments)
    streamed = _assembled(client.chat.completions.create(stream=True, **kw))["choices"][0]
    assert streamed["finish_reason"] == "stop"
    assert streamed["message"]["function_call"] == {"name": "add", "arguments": cut.message.function_call.arguments}


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_n_is_judged_on_its_own_stop(client, stream):
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stop=["}"], n=2, **BASE)
    result = client.chat.completions.create(stream=stream, **kw)
    choices = _assembled(result)["choices"] if stream else [c.model_dump() for c in result.choices]
    assert len(choices) == 2
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        assert all(not _is_json(c["function"]["arguments"]) for c in choice["message"]["tool_calls"])


def test_a_stop_string_that_never_matches_leaves_the_call_complete(client):
    r = client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, stop=["zzz"], **BASE).choices[0]
    assert r.finish_reason == "tool_calls" and _is_json(r.message.tool_calls[0].function.arguments)


def test_a_stored_stream_cut_by_a_stop_string_is_stored_as_streamed(client):
    chunks = list(client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, stop=["}"], stream=True, store=True, **BASE))
    stored = client.chat.completions.retrieve(chunks[0].id).choices[0]
    assert stored.finish_reason == "stop" and not _is_json(stored.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_function_call_cut_by_a_stop_string_is_an_incomplete_item(client, stream):
    tool = {"type": "function", "name": "add", "parameters": ADD}
    kw = dict(model=TINY, input="Add 2 and 3.", tools=[tool], tool_choice={"type": "function", "name": "add"},
              max_output_tokens=60, extra_body={"stop": ["}"], "seed": 4})
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        assert events[-1].type == "response.completed"
        done = [e.item for e in events if e.type == "response.output_item.done"]
        assert [i.status for i in done] == ["incomplete"]  # was "completed"
        r = events[-1].response
    else:
        r = client.responses.create(**kw)
    # the response ended as the client asked (completed: it has no reason for a stop string); the call did not
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    assert calls[0].status == "incomplete" and not _is_json(calls[0].arguments)
    assert client.responses.retrieve(r.id).output[-1].status == "incomplete"


def test_an_unforced_reply_a_stop_string_cut_after_its_call_finishes_stop():
    """A model's own complete call, then a second one that the stop string cut: the reply was cut, so it does not
    claim to be complete tool calls (the random tiny model writes no unforced calls, so the real parser is fed)."""
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 3'
    for cut, reason in ((True, "stop"), (False, "tool_calls")):
        deltas = ToolDeltas(StreamingToolParser(["add"], HERMES), parallel=True).deltas(text, "stop", cut)
        calls = [f for d, _ in deltas for f in d.get("tool_calls", ())]
        assert [f["function"]["name"] for f in calls if "id" in f] == ["add"]
        assert deltas[-1][1] == reason


def test_coalesced_deltas_keep_the_stop_string_mark():
    """Deltas merged for a slow reader (stream_interval) keep the last one's mark with its finish."""
    from xllm_jupyter.core.types import ChoiceDelta, FinishReason
    from xllm_jupyter.engine.delivery import coalesce

    merged = coalesce([ChoiceDelta(0, "a", (1,)), ChoiceDelta(0, "b", (2,), (), FinishReason.STOP, True)])
    assert merged == [ChoiceDelta(0, "ab", (1, 2), (), FinishReason.STOP, True)]
