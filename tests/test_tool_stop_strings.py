"""A stop string that cuts a tool call: the reply keeps the call as far as it got and says ``stop``, never that the
call is complete (``tool_calls`` / ``function_call``), as a ``max_tokens`` cut says ``length``. One that matches after
complete calls (at a call's closing tag) leaves calls to run: ``tool_calls``. Real server, real SDK."""

from __future__ import annotations

import json

import pytest

from tests.helpers import assembled, is_json
from tests.server_fixtures import TINY
from xllm_jupyter.openai.tool_calling import ToolCalling, ToolDeltas
from xllm_jupyter.openai.tool_parser import HERMES, StreamingToolParser
from xllm_jupyter.openai.tools import parse_tool_config

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
NAMED = {"type": "function", "function": {"name": "add"}}
#: one forced call that finishes "tool_calls" when complete (a named one finishes "stop" either way, as at OpenAI)
ONE = dict(tool_choice="required", parallel_tool_calls=False)
MSG = [{"role": "user", "content": "Add 2 and 3."}]
# "}" can only come at the end of the arguments object in a call to add: every forced call is cut inside it
BASE = dict(model=TINY, messages=MSG, max_tokens=60, seed=4)


def test_a_forced_call_cut_by_a_stop_string_is_partial_and_finishes_stop(client):
    whole = client.chat.completions.create(tools=TOOLS, **ONE, **BASE).choices[0]
    assert whole.finish_reason == "tool_calls" and is_json(whole.message.tool_calls[0].function.arguments)
    cut = client.chat.completions.create(tools=TOOLS, **ONE, stop=["}"], **BASE).choices[0]
    call = cut.message.tool_calls[0]
    # was finish_reason "tool_calls" with these arguments, which are no JSON: a client could not tell the call was cut
    assert cut.finish_reason == "stop"
    assert call.function.name == "add" and not is_json(call.function.arguments)
    assert whole.message.tool_calls[0].function.arguments.startswith(call.function.arguments)
    streamed = assembled(client.chat.completions.create(tools=TOOLS, **ONE, stop=["}"], stream=True, **BASE))
    choice = streamed["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": call.function.arguments}


def test_a_legacy_forced_function_call_cut_by_a_stop_string_finishes_stop(client):
    functions = [t["function"] for t in TOOLS]
    kw = dict(functions=functions, function_call={"name": "add"}, stop=["}"], **BASE)
    cut = client.chat.completions.create(**kw).choices[0]
    assert cut.finish_reason == "stop"  # was "function_call"
    assert cut.message.function_call.name == "add" and not is_json(cut.message.function_call.arguments)
    streamed = assembled(client.chat.completions.create(stream=True, **kw))["choices"][0]
    assert streamed["finish_reason"] == "stop"
    assert streamed["message"]["function_call"] == {"name": "add", "arguments": cut.message.function_call.arguments}


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_n_is_judged_on_its_own_stop(client, stream):
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stop=["}"], n=2, **BASE)
    result = client.chat.completions.create(stream=stream, **kw)
    choices = assembled(result)["choices"] if stream else [c.model_dump() for c in result.choices]
    assert len(choices) == 2
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        assert all(not is_json(c["function"]["arguments"]) for c in choice["message"]["tool_calls"])


def test_a_stop_string_that_never_matches_leaves_the_call_complete(client):
    r = client.chat.completions.create(tools=TOOLS, **ONE, stop=["zzz"], **BASE).choices[0]
    assert r.finish_reason == "tool_calls" and is_json(r.message.tool_calls[0].function.arguments)


def test_a_stored_stream_cut_by_a_stop_string_is_stored_as_streamed(client):
    chunks = list(client.chat.completions.create(tools=TOOLS, tool_choice=NAMED, stop=["}"], stream=True, store=True, **BASE))
    stored = client.chat.completions.retrieve(chunks[0].id).choices[0]
    assert stored.finish_reason == "stop" and not is_json(stored.message.tool_calls[0].function.arguments)


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
    assert calls[0].status == "incomplete" and not is_json(calls[0].arguments)
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

    merged = coalesce([ChoiceDelta(0, "a", (1,)), ChoiceDelta(0, "b", (2,), (), FinishReason.STOP, '"}')])
    assert merged == [ChoiceDelta(0, "ab", (1, 2), (), FinishReason.STOP, '"}')] and merged[0].stop_string
    merged = coalesce([ChoiceDelta(0, "a", (1,)), ChoiceDelta(0, "", (2,), (), FinishReason.STOP, 2)])  # a stop token
    assert merged[0].stop_reason == 2 and merged[0].stop_string


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kw", [
    dict(tools=TOOLS, tool_choice=NAMED),
    dict(tools=TOOLS, tool_choice="required", n=2),
    dict(functions=[t["function"] for t in TOOLS], function_call={"name": "add"}),
], ids=["named", "required n=2", "legacy"])
def test_a_stop_string_at_a_complete_calls_closing_tag_leaves_calls_to_run(client, kw, stream):
    """``stop: ["</tool_call>"]`` ends a forced reply after its call's arguments: the call is complete, as the same
    reply without the stop string has it, and the reply says so (it said ``stop``: agent loops that run calls on
    ``tool_calls`` / ``function_call`` dropped a complete call)."""
    legacy = "functions" in kw
    whole = client.chat.completions.create(**BASE, **kw).choices
    result = client.chat.completions.create(stop=["</tool_call>"], stream=stream, **BASE, **kw)
    cut = assembled(result)["choices"] if stream else [c.model_dump() for c in result.choices]
    for w, c in zip(whole, cut):
        w = w.model_dump()
        if legacy:
            assert c["message"]["function_call"] == w["message"]["function_call"]
        else:
            # (a parallel reply ends at its first call's closing tag: that call, complete)
            got = [t["function"] for t in c["message"]["tool_calls"]]
            assert got and got == [t["function"] for t in w["message"]["tool_calls"]][:len(got)]
        # (a call forced by name finishes "stop" either way, as at api.openai.com: docs/tools.md)
        assert c["finish_reason"] == ("tool_calls" if kw.get("tool_choice") == "required" else "stop")


def _reply(tc: ToolCalling, text: str, stream: bool) -> tuple[list[tuple[str, str]], str]:
    """The calls and finish_reason of ``text`` ended by a stop string: the full response's, or the stream's, fed
    a character at a time."""
    if not stream:
        message, reason = tc.message(text, "stop", True)
        return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])], reason
    deltas, out = tc.streamer(), []
    for ch in text:
        out += deltas.deltas(ch, None)
    out += deltas.deltas("", "stop", True)
    calls: dict[int, list[str]] = {}
    for delta, _ in out:
        for frag in delta.get("tool_calls", []):
            call = calls.setdefault(frag["index"], [frag["function"].get("name"), ""])
            call[1] += frag["function"].get("arguments") or ""
    return [tuple(calls[i]) for i in sorted(calls)], out[-1][1]


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
LLAMA = '{"name": "add", "parameters": {"a": 1, "b": 2}}'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("choice", "text", "reason"), [
    # the closing tag (or part of it) cut: complete calls, as the model's own end gives them
    ("auto", CALL.removesuffix("</tool_call>"), "tool_calls"),
    ("auto", CALL.removesuffix("call>"), "tool_calls"),
    ("auto", CALL + "\n" + CALL.replace("1", "5").removesuffix("\n</tool_call>"), "tool_calls"),
    ("auto", "<|python_tag|>" + LLAMA, "tool_calls"),
    ("required", CALL.removesuffix("\n</tool_call>"), "tool_calls"),
    ("required", CALL + "\n", "tool_calls"),
    # cut inside a call: inside its arguments, or a later call's opening
    ("auto", CALL + "\n" + CALL[:40], "stop"),
    ("auto", CALL + "\n<tool_c", "stop"),
    ("auto", "<|python_tag|>" + LLAMA + "; " + LLAMA[:20], "stop"),
    ("required", CALL[:50], "stop"),
    ("required", CALL[:CALL.index("}}")], "stop"),  # (stop "}}")
    ("required", CALL + "\n<tool_call>\n{\"na", "stop"),
])
def test_a_reply_a_stop_string_ended_says_tool_calls_only_when_no_call_was_cut(choice, text, reason, stream):
    """The full response and the stream judge the text the stop string left alike: complete calls (only a closing
    tag cut) are calls to run, a call cut in its middle makes the reply ``stop``."""
    tc = ToolCalling(parse_tool_config(TOOLS, choice, None), None)
    calls, got = _reply(tc, text, stream)
    assert got == reason and calls
    if reason == "tool_calls":  # the calls the model's own end of the same text gives
        message, _ = tc.message(text, "stop")
        assert all(isinstance(json.loads(a), dict) for _, a in calls)
        assert [(n, json.loads(a)) for n, a in calls] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def test_the_stream_and_the_full_response_agree_wherever_a_stop_string_cuts():
    """Every prefix of a reply of calls is a text a stop string may leave: both paths give the same calls and
    finish_reason, ``tool_calls`` only over complete arguments."""
    text = CALL + "\n" + CALL.replace("1", "7") + "\nDone."
    for choice in ("auto", "required"):
        tc = ToolCalling(parse_tool_config(TOOLS, choice, None), None)
        for end in range(len(text) + 1):
            full, streamed = _reply(tc, text[:end], False), _reply(tc, text[:end], True)
            assert full == streamed, (choice, end)
            if full[1] == "tool_calls":
                assert all(isinstance(json.loads(a), dict) for _, a in full[0]), (choice, end)
