"""What a ChatWidget (and ``%%xllm``) user sees after a reply: failed questions back in the box, replies
rendered as Markdown, a reply cut off by a server that died kept, with a message that says so."""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.server_fixtures import TINY
from xllm_jupyter.notebook.safe_markdown import neutral_markdown
from xllm_jupyter.widgets import ChatWidget

XLLM = Path(sys.executable).parent / "xllm"


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


def test_a_reply_the_user_stopped_is_sent_back_with_the_next_turn(chat):
    # unlike one cut off by an error: the user chose to end it there (as in the JupyterLab panel and `xllm run`)
    w = chat(TINY, max_tokens=2000, params={"ignore_eos": True, "seed": 7})
    assert w.ask("Go on and on")
    assert wait_for(lambda: len(w.messages) == 2 and len(w.messages[1]["content"]) > 20), w.status.value
    w.stop()
    assert w.wait(30)
    reply = w.messages[1]["content"]
    assert w.request_messages() == [{"role": "user", "content": "Go on and on"}, {"role": "assistant", "content": reply}]
    assert "not sent back" not in w.transcript.value


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
    # read at text spacing (ipywidgets gives an HTML widget a control's 28 px line-height), headings scaled
    # to one message (a reply's "# Title" showed at page-title size)
    assert ".xllm-chat-transcript .widget-html-content{line-height:1.45}" in shown and ".xllm-md h1{font-size:1.3em}" in shown

    # a reply still streaming with an open fence shows as code already
    w.messages[1]["content"] = "```python\nx = 1"
    w._render()
    assert '<pre><code class="language-python">x = 1' in w.transcript.value


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def doomed_server(xllm_home):
    """A real `xllm serve` subprocess on the tiny model, for a test to kill mid-answer: its base URL and process."""
    port = free_port()
    env = {**os.environ, "XLLM_HOME": str(xllm_home), "OMP_NUM_THREADS": "1"}
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS", "XLLM_BASE_URL", "XLLM_MODEL"):
        env.pop(var, None)
    proc = subprocess.Popen([str(XLLM), "serve", "--port", str(port), "-m", TINY], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: proc.poll() is not None or _ready(base), 120) and proc.poll() is None, "xllm serve did not come up"
        yield base + "/v1", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_reply_cut_off_by_a_dead_server_is_kept_and_the_message_says_what_happened(doomed_server):
    base, proc = doomed_server
    w = ChatWidget(TINY, client=(base, None), max_tokens=2000, params={"ignore_eos": True})
    try:
        assert w.ask("Go on and on")
        assert wait_for(lambda: len(w.messages) == 2 and len(w.messages[1]["content"]) > 20), w.status.value
        proc.send_signal(signal.SIGKILL)
        assert w.wait(30)
        status = w.status.value
        # the text that streamed stays (the turn is not dropped), and the status says the server went away
        assert [m["role"] for m in w.messages] == ["user", "assistant"] and len(w.messages[1]["content"]) > 20
        assert "closed the connection" in status and "reply so far is kept" in status, status
        assert "no xllm server" not in status and "start one" not in status
        assert not w.busy and w.input.value == ""
        # ... but it is not sent back with the next turns (it would pass for the model's whole answer), nor its
        # question, as the JupyterLab panel and `xllm run` leave such a turn out; the transcript says why
        partial = w.messages[1]["content"]
        assert w.request_messages() == [] and json.loads(w.transcript_json())["messages"] == []
        w.system_prompt.value = "Be brief."
        w.messages.append({"role": "user", "content": "Next"})
        assert w.request_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Next"}]
        assert "not sent back to the model" in w.transcript.value and "not sent back to the model" in w.transcript_markdown()
        assert partial in w.transcript_markdown()
    finally:
        w.close()


def test_the_magic_says_the_server_dropped_the_answer(doomed_server, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from xllm_jupyter.magics import XllmMagics
    from xllm_jupyter.magics import ask as ask_module

    base, proc = doomed_server
    monkeypatch.setenv("XLLM_BASE_URL", base)  # as the extension tells its kernels
    monkeypatch.delenv("XLLM_API_KEY", raising=False)
    ip = InteractiveShell.instance()
    magics = XllmMagics(ip)
    ip.register_magics(magics)  # a fresh instance: nothing carried over from other tests
    # kill the server once the answer is streaming: the thread watches the magic's first display
    shown = threading.Event()
    killer = threading.Thread(target=lambda: shown.wait(60) and proc.send_signal(signal.SIGKILL), daemon=True)
    killer.start()
    grow = ask_module.Output.grow

    streamed: list[str] = []

    def grow_then_kill(self, text):
        streamed.append(text)
        grow(self, text)
        if len(text) > 20:
            shown.set()

    monkeypatch.setattr(ask_module.Output, "grow", grow_then_kill)
    with capture_output() as cap:
        # seeded (7: no end token in 2,000): a random seed could end the answer before it is killed
        ip.run_cell_magic("xllm", f"-m {TINY} -t 1 --max-tokens 2000 --seed 7", "Go on and on")
    killer.join(5)
    magics.state.close()
    assert shown.is_set()
    # everything that came stays shown (the last throttled update flushed), the error line below it
    # (the Markdown is the text with raw HTML and images neutralized: test_safe_markdown.py)
    assert cap.outputs[-1].data["text/markdown"] == neutral_markdown(streamed[-1]) and len(streamed[-1]) > 20
    assert "xllm: the xllm server at" in cap.stderr and "closed the connection" in cap.stderr, cap.stderr
    assert "Traceback" not in cap.stderr and "start one" not in cap.stderr


def test_the_transcript_follows_a_reply_longer_than_its_box(chat):
    # A scroll box keeps its offset as content grows: a plain one stayed at the top while a long reply
    # streamed below the fold. Laid out bottom-up (column-reverse), the browser anchors it at the end
    # (checked in chromium: scrollTop stays 0 = the bottom while scrollHeight grows 491 -> 883 px).
    w = chat(TINY)
    layout = w.transcript.layout
    assert layout.overflow == "auto" and layout.max_height
    assert layout.display == "flex" and layout.flex_flow == "column-reverse"


def test_compare_columns_cut_off_by_a_dead_server_keep_their_text(doomed_server):
    from xllm_jupyter.widgets import CompareWidget

    base, proc = doomed_server
    settings = [{"ignore_eos": True, "seed": 1}, {"ignore_eos": True, "seed": 2}]
    w = CompareWidget(TINY, settings=settings, prompt="Go on and on", max_tokens=2000, client=(base, None))
    try:
        assert w.run()
        assert wait_for(lambda: all(len(r.text) > 20 for r in w._records)), w.status.value
        proc.send_signal(signal.SIGKILL)
        assert w.wait(30)
        assert "2 failed" in w.status.value, w.status.value
        texts = w.result.texts
        for text, body in zip(texts, w._bodies):
            # the column still shows what streamed (escaped as it was while streaming), the error under it
            assert len(text) > 20 and html.escape(text) in body.value, body.value
            assert "closed the connection" in body.value, body.value
        shown = w.result._repr_html_()
        assert all(html.escape(t) in shown for t in texts) and "closed the connection" in shown
    finally:
        w.close()
