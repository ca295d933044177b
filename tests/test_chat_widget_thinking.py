"""``ChatWidget`` and a reasoning model: the thinking shows folded and dim above the reply (open while no answer has
come), escaped as model text, and never goes back to the model with the conversation nor into the exports. The random
tiny model thinks and answers by a grammar over the marker tokens (``params``: sent with every request). Real server."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_thinking import ANSWER, server  # noqa: F401 (the module's server fixture)
from xllm_jupyter.widgets import ChatWidget


@pytest.fixture
def widget(server):  # noqa: F811
    grammar = server.grammar.replace("plan it", "a <b> plan")
    w = ChatWidget("think", client=(server.base_url, server.api_key), max_tokens=48,
                   params={"guided_grammar": grammar, "seed": 1})
    yield w
    w.close()


def test_the_thinking_shows_folded_above_the_reply_and_is_not_sent_back(widget):
    assert widget.ask("Hi") and widget.wait(60)
    assert widget.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}]
    shown = widget.transcript.value
    folded = ('<details><summary style="opacity:0.7">Thinking</summary>'
              '<div style="opacity:0.7;white-space:pre-wrap">a &lt;b&gt; plan</div></details>')
    assert folded in shown and shown.index(folded) < shown.index(ANSWER)
    assert "a <b> plan" not in shown
    assert widget.request_messages() == widget.messages  # the answer alone goes back
    assert "plan" not in widget.transcript_markdown() and json.loads(widget.transcript_json())["messages"] == widget.messages
    widget.clear()
    assert widget._thinking == {}


def test_a_reply_that_only_thought_keeps_its_thinking_on_screen_and_is_not_sent_back(server):  # noqa: F811
    # every token goes to the thinking (max tokens): the block streamed open must not vanish when the reply ends
    grammar = server.grammar.replace("plan it", "a plan that goes on and on and on and on")
    w = ChatWidget("think", client=(server.base_url, server.api_key), max_tokens=6,
                   params={"guided_grammar": grammar, "seed": 1})
    try:
        assert w.ask("Hi") and w.wait(60)
        assert w.last.finish_reason == "length" and w._thinking
        shown = w.transcript.value
        assert '<details open><summary style="opacity:0.7">Thinking</summary>' in shown and "a plan" in shown
        # why, as %%xllm and `xllm run` say it
        said = "the model spent all 6 tokens thinking and gave no answer: raise max tokens; not sent back to the model"
        assert said in shown and "…" not in shown
        assert w.request_messages() == [] and said in w.transcript_markdown()
        # the next question goes alone: neither the thought-only reply nor its question is sent back
        w.params = {"guided_grammar": server.grammar, "seed": 1}
        w.max_tokens.value = 48
        assert w.ask("Again") and w.wait(60)
        assert w.request_messages() == [{"role": "user", "content": "Again"}, {"role": "assistant", "content": ANSWER}]
    finally:
        w.close()
