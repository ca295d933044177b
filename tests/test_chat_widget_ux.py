"""What a ChatWidget user sees after a reply: failed questions back in the box, replies rendered as Markdown."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.widgets import ChatWidget


@pytest.fixture
def endpoint(xllm_server):
    return (xllm_server.base_url, xllm_server.api_key)


@pytest.fixture
def chat(endpoint):
    """A ChatWidget on the tiny model, closed (ending its thread) after the test."""
    made = []

    def build(*args, **kwargs):
        w = ChatWidget(*args, client=endpoint, **kwargs)
        made.append(w)
        return w

    yield build
    for w in made:
        w.close()


def test_a_failed_question_goes_back_into_the_box(chat):
    # unknown model: the server's 404
    w = chat("no-such-model")
    w.input.value = "A long question I typed with care"
    w.send_button.click()
    assert w.wait(30)
    assert "Error:" in w.status.value and "no-such-model" in w.status.value
    assert w.messages == [] and w.input.value == "A long question I typed with care"

    # a prompt past the model's context: the server's 400, after a turn that worked
    w = chat(TINY, max_tokens=2, temperature=0.0)
    assert w.ask("One") and w.wait(60)
    long = "word " * 5000
    w.input.value = long
    w.send_button.click()
    assert w.wait(60)
    assert "Error:" in w.status.value and "context length" in w.status.value, w.status.value
    assert w.input.value == long.rstrip()
    assert [m["content"] for m in w.messages if m["role"] == "user"] == ["One"]


def test_a_question_stopped_before_any_text_goes_back_but_not_after_clear(chat):
    w = chat(TINY, max_tokens=400, params={"ignore_eos": True})
    assert w.ask("Tell me everything")
    w.stop()  # before the first token: nothing was answered
    assert w.wait(30)
    assert "Stopped" in w.status.value and w.messages == []
    assert w.input.value == "Tell me everything"

    # text typed meanwhile is never overwritten
    assert w.ask("First")
    w.input.value = "Second, typed while it ran"
    w.stop()
    assert w.wait(30)
    assert w.input.value == "Second, typed while it ran"

    # Clear forgets the question as well
    w.input.value = ""
    assert w.ask("Forget me")
    w.clear()
    assert w.messages == [] and w.input.value == "" and "Cleared" in w.status.value


def test_replies_are_rendered_as_markdown_and_raw_html_is_escaped(chat):
    w = chat(TINY)
    w.messages = [
        {"role": "user", "content": "Show **code** <b>"},
        {"role": "assistant", "content": "Here:\n\n```python\ndef f():\n    return 1\n```\n\n- *one*\n- <script>alert(1)</script>"},
    ]
    w._render()
    shown = w.transcript.value
    # the reply: a code block, a list, emphasis; its raw HTML shown as text, never injected
    assert '<pre><code class="language-python">def f():\n    return 1\n</code></pre>' in shown
    assert "<li><em>one</em></li>" in shown
    assert "<script>" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    # what the user typed is shown as typed, not as Markdown
    assert "Show **code** &lt;b&gt;" in shown

    # a reply still streaming with an open fence shows as code already
    w.messages[1]["content"] = "```python\nx = 1"
    w._render()
    assert '<pre><code class="language-python">x = 1' in w.transcript.value
