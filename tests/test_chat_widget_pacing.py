"""ChatWidget's streamed renders keep pace with what they cost: a long reply, whose Markdown takes longer to
render than the render interval, must not keep the kernel rendering all the time (the notebook froze)."""

from __future__ import annotations

import types

from tests.server_fixtures import TINY
from xllm_jupyter.widgets import ChatWidget
from xllm_jupyter.widgets import chat as chat_module


def test_a_long_reply_is_rendered_less_often_as_its_renders_get_slower(xllm_server, monkeypatch):
    w = ChatWidget(TINY, client=(xllm_server.base_url, xllm_server.api_key), max_tokens=300, temperature=0.0, params={"ignore_eos": True})
    try:
        # a clock that never reads the machine's: the reply's text arrives at 1 ms a character, and rendering it
        # as Markdown costs 0.1 ms a character (3 KB: 300 ms, as a 31 KB reply took on a real kernel)
        spent = {"render": 0.0, "renders": 0}
        real_markdown = chat_module.markdown_html

        def arrived() -> float:
            return 0.001 * sum(len(m["content"]) for m in w.messages if m["role"] == "assistant")

        def slow_markdown(text: str) -> str:
            spent["render"] += 0.0001 * len(text)
            spent["renders"] += 1
            return real_markdown(text)

        monkeypatch.setattr(chat_module, "time", types.SimpleNamespace(monotonic=lambda: arrived() + spent["render"]))
        monkeypatch.setattr(chat_module, "markdown_html", slow_markdown)
        assert w.ask("Tell me a long story") and w.wait(120)
        assert "300 tokens" in w.status.value, w.status.value
        reply = w.messages[-1]["content"]
        elapsed = arrived() + spent["render"]
        # the stream was still shown as it grew, but rendering took at most a fifth of the time (every piece
        # was rendered once a render took longer than the 50 ms interval: most of the time)
        assert spent["renders"] > 5, spent
        assert spent["render"] <= elapsed / (1 + chat_module.RENDER_BACKOFF) + 2 * 0.0001 * len(reply), (spent, elapsed)
        # the end of the reply is always shown, whole
        assert w.transcript.value.endswith(real_markdown(reply) + "</div>")
    finally:
        w.close()


def test_clear_resets_the_render_backoff_of_the_conversation_it_forgets(xllm_server, monkeypatch):
    """After a long reply the next streamed render could be seconds away (RENDER_BACKOFF times its last render):
    Clear kept that wait, so the first reply of the fresh conversation was not shown as it streamed."""
    w = ChatWidget(TINY, client=(xllm_server.base_url, xllm_server.api_key), max_tokens=8, temperature=0.0,
                   params={"ignore_eos": True})
    try:
        # a clock that stands still: a streamed render happens only where the backoff has passed (0 at first)
        monkeypatch.setattr(chat_module, "time", types.SimpleNamespace(monotonic=lambda: 100.0))
        rendered: list[str] = []
        real_markdown = chat_module.markdown_html

        def recording(text: str) -> str:
            rendered.append(text)
            return real_markdown(text)

        monkeypatch.setattr(chat_module, "markdown_html", recording)

        def renders_of_a_reply() -> int:
            rendered.clear()
            assert w.ask("Tell me a story") and w.wait(120)
            reply = w.messages[-1]["content"]
            assert reply
            return sum(1 for text in rendered if text and reply.startswith(text))

        first = renders_of_a_reply()  # its first piece, then the whole reply at its end
        w.clear()
        assert renders_of_a_reply() == first
    finally:
        w.close()
