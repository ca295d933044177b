"""``xllm run`` and a reasoning model: its thinking shows before the answer between "Thinking..." and "...done
thinking." as ``ollama run`` shows it (``--hidethinking``: not at all), the conversation sends back the answers alone,
and ``--think``/``--think=false``/``/set think|nothink`` reach the template as ``chat_template_kwargs``. A random tiny
model is made to think by a grammar over the marker tokens (``guided_grammar``), or greedily inside a block that the
template opened (a created model with a seed samples it repeatably). Real server, real client."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.server_fixtures import make_test_config, running_server
from tests.test_reasoning import SPECIAL, THINK
from xllm_jupyter.cli import chat
from xllm_jupyter.cli.main import main
from xllm_jupyter.client import XllmClient

#: Qwen3's switch: ``enable_thinking`` false closes an empty block in the prompt, true opens one (the reply starts
#: inside it, as DeepSeek-R1's template always does); not given, neither
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% elif enable_thinking is defined %}<think>\n{% endif %}{% endif %}"
)
ANSWER = "The answer."
THOUGHT_AND_ANSWER = f"Thinking...\nplan it\n...done thinking.\n\n{ANSWER}\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with "think", and a grammar that makes it think "plan it" and answer "The answer."."""
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    root = tmp_path_factory.mktemp("cli-thinking")
    model = build_tiny_llama(root / "think", special=SPECIAL)
    (model / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    start, end = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(list(THINK))
    store = ModelStore(root / "home")
    store.pull(str(model), "think")
    # greedy, the random model writes blank lines (which a thinking block trims away): "seeded" samples, repeatably
    store.create("seeded", "FROM think\nPARAMETER seed 1\nPARAMETER temperature 1\n")
    with running_server(make_test_config(root / "home"), store, "think") as info:
        info.grammar = f'start: <[{start}]> "\\nplan it\\n" <[{end}]> "\\n\\n{ANSWER}"'
        yield info


@pytest.fixture
def client(server):
    with XllmClient(server.base_url, server.api_key) as c:
        yield c


def _params(server):
    return {"guided_grammar": server.grammar, "max_tokens": 48, "seed": 1}


@pytest.mark.parametrize("verbose", [False, True])
def test_the_thinking_shows_before_the_answer_and_is_not_the_reply(server, client, capsys, verbose):
    stats = chat.ReplyStats() if verbose else None
    assert chat.stream_reply(client, [{"role": "user", "content": "Hi"}], "think", _params(server), stats) == (ANSWER, False)
    assert capsys.readouterr().out == THOUGHT_AND_ANSWER  # off a terminal: plain text, no escape sequences
    assert chat.stream_reply(client, [{"role": "user", "content": "Hi"}], "think", _params(server), stats,
                             hide_thinking=True) == (ANSWER, False)
    assert capsys.readouterr().out == f"{ANSWER}\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_a_reply_all_thinking_says_the_model_spent_every_token_thinking(server, client, capsys, verbose):
    # 3 tokens: the opening marker and two of the thinking's; the block stays open, and stderr says why no answer came
    # (it printed the thinking and ended there), as %%xllm and ChatWidget say it
    stats = chat.ReplyStats() if verbose else None
    assert chat.stream_reply(client, [{"role": "user", "content": "Hi"}], "think", {**_params(server), "max_tokens": 3},
                             stats) == ("", False)
    out, err = capsys.readouterr()
    assert out.startswith("Thinking...\nplan") and "done thinking" not in out
    assert "(the model spent all 3 tokens thinking and gave no answer: raise --max-tokens)\n" in err
    assert client.last_finish_reason == "length" and client.last_usage["completion_tokens"] == 3
    assert client.last_usage["completion_tokens_details"]["reasoning_tokens"] == 3  # all of them the thinking's
    # an answer after the thinking: no such note
    chat.stream_reply(client, [{"role": "user", "content": "Hi"}], "think", _params(server), stats)
    assert "gave no answer" not in capsys.readouterr().err


def test_the_thinking_is_dim_on_a_terminal(server, client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    chat.stream_reply(client, [{"role": "user", "content": "Hi"}], "think", _params(server))
    out = capsys.readouterr().out
    bold, dim, end = "\x1b[1m", "\x1b[2m", "\x1b[0m"
    # each piece is styled and reset (Ctrl-C leaves no dim behind); how the stream cuts the pieces may vary
    assert out.replace(f"{end}{dim}", "") == (f"{bold}{dim}Thinking...\nplan it{end}{bold}{dim}\n...done thinking.\n\n{end}"
                                             f"{ANSWER}\n")


def test_the_conversation_sends_back_the_answers_alone(server, client, monkeypatch):
    sent = []

    class Recording(XllmClient):
        def stream_chat(self, messages, model=None, **params):
            sent.append([dict(m) for m in messages])
            return super().stream_chat(messages, model, **params)

    lines = iter(["first", "second", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    with Recording(server.base_url, server.api_key) as backend:
        chat.interactive(backend, "think", [], _params(server))
    assert sent[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": ANSWER},
                       {"role": "user", "content": "second"}]


def _run(server, *args, input=None):
    return CliRunner().invoke(main, ["--url", server.base_url, "--api-key", server.api_key, "run", *args],
                              input=input, catch_exceptions=False)


def test_think_flags_switch_the_templates_thinking(server):
    # --think opens a block in the prompt: the reply is all thinking (3 tokens), shown under "Thinking..."
    thinking = _run(server, "seeded", "--think", "--max-tokens", "3", "Hi")
    assert thinking.exit_code == 0, thinking.output
    assert thinking.stdout.startswith("Thinking...\n") and "done thinking" not in thinking.stdout
    hidden = _run(server, "seeded", "--think", "--hidethinking", "--max-tokens", "3", "Hi")
    assert (hidden.exit_code, hidden.stdout) == (0, "\n")
    # --think=false closes an empty block there: the reply is the answer; --think=low is on, its effort sent along
    off = _run(server, "seeded", "--think=false", "--max-tokens", "3", "Hi")
    assert off.exit_code == 0 and "Thinking" not in off.stdout and off.stdout.strip()
    assert _run(server, "seeded", "--think=low", "--max-tokens", "3", "Hi").stdout == thinking.stdout
    assert _run(server, "seeded", "--max-tokens", "3", "Hi").stdout != thinking.stdout  # not given: neither
    bad = _run(server, "seeded", "--think=maybe", "Hi")
    assert bad.exit_code == 2 and "--think" in bad.stderr


def _sent(server, monkeypatch, *args):
    """What `xllm run seeded ARGS` sent: (exit code, its messages, its chat_template_kwargs)."""
    seen = []
    real = XllmClient.stream_chat

    def recording(self, messages, model=None, **params):
        seen.append(([dict(m) for m in messages], params.get("chat_template_kwargs")))
        return real(self, messages, model, **params)

    monkeypatch.setattr(XllmClient, "stream_chat", recording)
    result = _run(server, "seeded", "--max-tokens", "1", *args)
    assert result.exit_code == 0, result.output
    return seen[0] if seen else None


@pytest.mark.parametrize("args, messages, kwargs", [
    # a word after a bare --think that is no value of it is the prompt's, as in `ollama run --think why?` (it was
    # taken as --think's value: a usage error)
    (["--think", "why?"], [{"role": "user", "content": "why?"}], {"enable_thinking": True}),
    (["--think", "Why", "not?"], [{"role": "user", "content": "Why not?"}], {"enable_thinking": True}),
    (["hi", "--think"], [{"role": "user", "content": "hi"}], {"enable_thinking": True}),
    # one of its values, whatever its case, is its value
    (["--think", "HIGH", "why?"], [{"role": "user", "content": "why?"}], {"enable_thinking": True, "reasoning_effort": "high"}),
    (["--think", "false", "why?"], [{"role": "user", "content": "why?"}], {"enable_thinking": False}),
    # another option's value, or a word after --, is never --think
    (["-s", "--think", "why?"], [{"role": "system", "content": "--think"}, {"role": "user", "content": "why?"}], None),
    (["--", "--think", "why?"], [{"role": "user", "content": "--think why?"}], None),
])
def test_a_word_after_a_bare_think_is_the_prompt(server, monkeypatch, args, messages, kwargs):
    assert _sent(server, monkeypatch, *args) == (messages, kwargs)


def test_set_think_and_nothink_in_the_chat(server, monkeypatch):
    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True, raising=False)
    seen = []
    real = XllmClient.stream_chat

    def recording(self, messages, model=None, **params):
        seen.append(params.get("chat_template_kwargs"))
        return real(self, messages, model, **params)

    monkeypatch.setattr(XllmClient, "stream_chat", recording)
    result = _run(server, "seeded", "--max-tokens", "3",
                  input="/set think\none\n/set nothink\ntwo\n/set think high\nthree\n/set think maybe\n/bye\n")
    assert result.exit_code == 0, result.output
    assert seen == [{"enable_thinking": True}, {"enable_thinking": False},
                    {"enable_thinking": True, "reasoning_effort": "high"}]
    assert result.stdout.count("Thinking...\n") == 2
    assert "Set 'think' mode." in result.stderr and "Set 'nothink' mode." in result.stderr
    assert "Set 'think' mode to 'high'." in result.stderr and "Use /set" in result.stderr  # `maybe`: the usage line


def test_think_false_reaches_the_template_in_process_too(server, monkeypatch):
    """Without a server the engine in this process renders the template with the same variables (it refused
    ``chat_template_kwargs`` as an unsupported parameter)."""
    monkeypatch.setenv("XLLM_HOME", str(server.config.store.home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    off = _run(server, "seeded", "--local", "--think=false", "--max-tokens", "3", "Hi")
    on = _run(server, "seeded", "--local", "--think", "--max-tokens", "3", "Hi")
    assert (off.exit_code, on.exit_code) == (0, 0), off.output + on.output
    assert off.stdout == _run(server, "seeded", "--think=false", "--max-tokens", "3", "Hi").stdout != on.stdout
