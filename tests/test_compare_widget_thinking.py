"""``CompareWidget`` and a reasoning model: each column shows its thinking folded and dim above the answer (open while
no answer has come), escaped as model text; the compared texts (diff, ``result``) keep the answers alone. The random
tiny model thinks and answers by a grammar over the marker tokens (a seed in each column's settings). Real server."""

from __future__ import annotations

import json

from tests.test_cli_thinking import ANSWER, server  # noqa: F401 (the module's server fixture)
from xllm_jupyter.widgets import CompareWidget

_FOLDED = '<summary style="opacity:0.7">Thinking</summary><div style="opacity:0.7;white-space:pre-wrap">'


def _widget(server, thought: str, max_tokens: int) -> CompareWidget:  # noqa: F811
    grammar = server.grammar.replace("plan it", thought)
    settings = [{"guided_grammar": grammar, "seed": 1}, {"guided_grammar": grammar, "seed": 2}]
    return CompareWidget("think", settings=settings, prompt="Hi", max_tokens=max_tokens,
                         client=(server.base_url, server.api_key))


def test_each_column_shows_its_thinking_folded_above_the_answer(server):  # noqa: F811
    w = _widget(server, "a <b> plan", 48)
    try:
        assert w.run() and w.wait(60)
        assert w.result.texts == [ANSWER, ANSWER]  # the compared text is the answer alone
        for body in w._bodies:
            shown = body.value
            folded = f"<details>{_FOLDED}a &lt;b&gt; plan</div></details>"
            assert folded in shown and shown.index(folded) < shown.index(ANSWER) and "a <b> plan" not in shown
        assert "plan" not in w.diff_view.value
        assert all(json.dumps(r.pieces).count("plan") == 0 for r in w.result.records)
    finally:
        w.close()


def test_a_column_that_only_thought_keeps_its_thinking_open(server):  # noqa: F811
    w = _widget(server, "a plan that goes on and on and on and on", 6)
    try:
        assert w.run() and w.wait(60)
        assert w.result.texts == ["", ""]
        assert all("6 tokens" in foot.value for foot in w._footers)  # the thinking counts in the column's tokens
        for body in w._bodies:
            assert f"<details open>{_FOLDED}a plan" in body.value and "no answer came after the thinking" in body.value
    finally:
        w.close()
