"""A harmony (gpt-oss) reply whose first message names its recipient before its channel (`` to=functions.X<|channel|>
commentary json<|message|>...``): gpt-oss's own template writes a past call that way (``<|start|>assistant
to=functions.X<|channel|>commentary json<|message|>``) after the prompt's ``<|start|>assistant``, so the model may too.
It was read as text not in the format: the call was lost and its markers' text was the content. Servers and fixtures
of tests/test_harmony.py (each token its own delta, or many in one); real openai SDK."""

from __future__ import annotations

import json

from tests.test_harmony import ARGS, _no_markup, ask, served, streamed  # noqa: F401 (served: the fixture)
from tests.test_mistral_v11_tools import TOOLS
from xllm_jupyter.openai.harmony import HarmonyParser

#: a call in the role section, then (a second reply) the answer after it
ROLE_CALL = ('" to=functions.weather"', "<|channel|>", '"commentary json"', "<|message|>", json.dumps(ARGS))
TEXT = ' to=functions.weather<|channel|>commentary json<|message|>' + ARGS + "<|call|>"


def test_the_parser_reads_a_recipient_before_the_channel_however_the_text_is_split():
    for cut in range(len(TEXT) + 1):
        parser = HarmonyParser({"weather"})
        pieces = parser.feed(TEXT[:cut]) + parser.feed(TEXT[cut:], final=True)
        assert "".join(t for k, t in pieces if k == "call") == "weather", (cut, pieces)
        assert "".join(t for k, t in pieces if k == "arguments") == ARGS, (cut, pieces)
        assert not [t for k, t in pieces if k == "content"], (cut, pieces)
    # only the first header may begin there; a reply of plain text that begins with "to" is still that text
    assert HarmonyParser().feed("to", final=True) == [("content", "to")]
    assert HarmonyParser().feed("tomorrow, yes", final=True) == [("content", "tomorrow, yes")]


def test_a_call_with_its_recipient_before_its_channel_is_a_tool_call(served):  # noqa: F811 - the fixture
    r = ask(served, ROLE_CALL, tools=TOOLS)
    message, choice = r.choices[0].message, r.choices[0]
    assert (message.content, choice.finish_reason) == (None, "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("weather", ARGS)]
    thought, content, calls, reason, _, deltas = streamed(served, ROLE_CALL, tools=TOOLS)
    assert (thought, content, reason) == ("", "", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("weather", ARGS)]
    _no_markup(deltas)
