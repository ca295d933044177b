"""``%%xllm`` and a reasoning model: the thinking shows apart, above the answer (a quoted "Thinking" block in
Markdown, "Thinking..." / "...done thinking." in plain text), never in the answer that ``--out`` stores and the
conversation keeps. The random tiny model thinks "plan it" and answers "The answer." by a grammar over the marker
tokens, added to each request the magic sends (the real client and server). Real server."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from tests.test_cli_thinking import ANSWER, server  # noqa: F401 (the module's server fixture)
from xllm_jupyter.client import XllmClient
from xllm_jupyter.magics import XllmMagics
from xllm_jupyter.magics.render import Reply, thought_only

PLAIN = f"Thinking...\nplan it\n...done thinking.\n\n{ANSWER}"


@pytest.fixture
def shell(server, monkeypatch):  # noqa: F811
    """IPython with the magic pointed at the server; each request the magic streams or sends carries the grammar."""
    monkeypatch.setenv("XLLM_BASE_URL", server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", server.api_key)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    sent = []
    for name in ("stream_chunks", "chat_completion"):
        real = getattr(XllmClient, name)

        def with_grammar(self, messages, model=None, _real=real, **params):
            sent.append([dict(m) for m in messages])
            return _real(self, messages, model, guided_grammar=server.grammar, **params)

        monkeypatch.setattr(XllmClient, name, with_grammar)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "xllm_jupyter")
    magics = XllmMagics(ip)
    ip.register_magics(magics)
    ip.sent = sent
    yield ip
    magics.state.close()
    ip.user_ns.pop("answer", None)


@pytest.mark.parametrize("stream", ["", "--no-stream"])
def test_the_thinking_shows_above_the_answer_and_is_not_kept(shell, stream):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m think --chat --max-tokens 48 --out answer {stream}", "Hi")
    shown = [o.data for o in cap.outputs if "text/markdown" in o.data][-1]
    assert shown["text/markdown"] == f"> *Thinking*\n>\n> plan it\n\n{ANSWER}"
    assert shown["text/plain"] == PLAIN
    assert shell.user_ns["answer"] == ANSWER
    with capture_output():
        shell.run_cell_magic("xllm", "-m think --chat --max-tokens 48", "Again")
    assert shell.sent[-1][1] == {"role": "assistant", "content": ANSWER}  # the answer alone goes back


def test_a_terminal_prints_the_thinking_before_the_answer(shell, monkeypatch, capsys):
    monkeypatch.setattr("xllm_jupyter.magics.ask.rich_frontend", lambda shell: False)
    shell.run_cell_magic("xllm", "-m think --max-tokens 48 --out answer", "Hi")
    assert capsys.readouterr().out == PLAIN + "\n" and shell.user_ns["answer"] == ANSWER


@pytest.mark.parametrize("stream", ["", "--no-stream"])
def test_a_reply_all_thinking_says_the_model_spent_every_token_thinking(shell, stream):
    # 3 tokens: the opening marker and two of the thinking's, as ChatWidget and `xllm run` say it
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m think --max-tokens 3 --out answer {stream}", "Hi")
    shown = [o.data for o in cap.outputs if "text/markdown" in o.data][-1]["text/markdown"]
    assert shown.startswith("> *Thinking*\n>\n> plan")
    assert shown.endswith("*(the model spent all 3 tokens thinking and gave no answer: raise --max-tokens)*")


def test_a_reply_all_thinking_says_no_answer_came():
    note = thought_only("stop", {"completion_tokens": 9})
    assert note == "*(the model stopped after its thinking and gave no answer)*"
    assert thought_only("length") == "*(the model spent every token thinking and gave no answer: raise --max-tokens)*"
    reply = Reply("markdown")
    reply.thinking, reply.note = "still *going*", note
    bundle = reply._repr_mimebundle_()
    assert bundle["text/markdown"].startswith("> *Thinking*\n>\n> still") and bundle["text/markdown"].endswith(note)
    assert bundle["text/plain"] == f"Thinking...\nstill *going*\n...done thinking.\n\n\n{note.strip('*')}"
    code = Reply("code", "x = 1")
    code.thinking = "plan"
    assert code._repr_mimebundle_()["text/plain"] == "x = 1"  # the code alone, for copying
