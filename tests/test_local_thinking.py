"""``xllm run --local`` (the engine in this process, no server) shows a reasoning model's thinking as ``xllm run``
against a server does: under "Thinking..." until "...done thinking.", ``--hidethinking`` hides it, and only the answer
goes back with the conversation. The model is a tiny Llama rewired into a fixed chain of tokens (each token's
successor is set by its weights alone), so what it writes, ``<think>plan</think>The``, never depends on sampling."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.server_fixtures import make_test_config, running_server
from tests.test_cli_thinking import TEMPLATE
from tests.test_reasoning import SPECIAL
from xllm_jupyter.cli import chat
from xllm_jupyter.cli.main import main

#: the reply the chain writes after the prompt's last token (the template's line break after "assistant")
CHAIN = ("Ċ", "<think>", "plan", "</think>", "The", "<|im_end|>")
SHOWN = "Thinking...\nplan\n...done thinking.\n\nThe\n"


def build_chain_model(out, chain=CHAIN, special=SPECIAL, template=TEMPLATE):
    """A random tiny Llama whose layers add nothing and whose head maps each ``chain`` token to the next one
    (``special``: tokens added as special ones; ``template``: its chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.models import build_tiny_llama

    build_tiny_llama(out, special=special, tie_word_embeddings=False)
    ids = AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids(list(chain))
    model = LlamaForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is the token's own embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for dim, (token, successor) in enumerate(zip(ids, ids[1:])):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(dim), 64).float()
            model.lm_head.weight[successor, dim] = 20.0  # a logit of 160 against 0 for every other token
    model.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with "chain" (its store is the one ``--local`` reads too)."""
    from xllm_jupyter.store.store import ModelStore

    root = tmp_path_factory.mktemp("local-thinking")
    store = ModelStore(root / "home")
    store.pull(str(build_chain_model(root / "chain")), "chain")
    with running_server(make_test_config(root / "home"), store, "chain") as info:
        yield info


@pytest.fixture
def local_home(server, monkeypatch):
    monkeypatch.setenv("XLLM_HOME", str(server.config.store.home))
    monkeypatch.setenv("XLLM_ENGINE_TORCH_THREADS", "1")
    monkeypatch.delenv("XLLM_CONFIG", raising=False)


def _run(server, *args):
    return CliRunner().invoke(main, ["--url", server.base_url, "--api-key", server.api_key, "run", *args],
                              catch_exceptions=False)


@pytest.mark.parametrize("hide", [False, True])
def test_run_local_shows_the_thinking_as_against_a_server(server, local_home, hide):
    flags = ["--hidethinking"] if hide else []
    served = _run(server, "chain", *flags, "--temperature", "1", "Hi")
    local = _run(server, "chain", "--local", *flags, "--temperature", "1", "Hi")
    assert (served.exit_code, local.exit_code) == (0, 0), served.output + local.output
    assert served.stdout == local.stdout == ("The\n" if hide else SHOWN)


def test_run_local_says_a_reply_all_thinking_spent_every_token_as_against_a_server(server, local_home):
    # 2 tokens: "<think>" and "plan"; the same note on stderr both ways (the in-process engine knew no finish reason)
    served = _run(server, "chain", "--max-tokens", "2", "Hi")
    local = _run(server, "chain", "--local", "--max-tokens", "2", "Hi")
    assert served.stdout == local.stdout == "Thinking...\nplan\n"
    note = "(the model spent all 2 tokens thinking and gave no answer: raise --max-tokens)\n"
    assert served.stderr.endswith(note) and local.stderr.endswith(note)


def test_local_chat_sends_back_the_answers_alone(local_home, monkeypatch):
    from xllm_jupyter.client.local import LocalChat

    sent = []

    class Recording(LocalChat):
        def stream_chat(self, messages, model, **params):
            sent.append([dict(m) for m in messages])
            return super().stream_chat(messages, model, **params)

    lines = iter(["first", "second", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    with Recording() as backend:
        chat.interactive(backend, "chain", [], {})
        assert backend.chat([{"role": "user", "content": "Hi"}], "chain") == "The"  # without thinking=True the thinking is left out, as the client's
    assert sent[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "The"},
                       {"role": "user", "content": "second"}]


def _served_and_local(server, **params):
    """(thinking, answer) of one greedy JSON reply from "chain", from the server and in-process."""
    from xllm_jupyter.client import XllmClient
    from xllm_jupyter.client.local import LocalChat
    from xllm_jupyter.client.thinking import Thinking

    params = {"response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 8, **params}

    def parts(backend):
        pieces = list(backend.stream_chat([{"role": "user", "content": "Hi"}], "chain", thinking=True, **params))
        return ("".join(p for p in pieces if isinstance(p, Thinking)),
                "".join(p for p in pieces if not isinstance(p, Thinking)))

    with XllmClient(server.base_url, server.api_key) as client:
        served = parts(client)
    with LocalChat() as local:
        return served, parts(local)


def test_a_format_applies_after_the_thinking_in_process_as_on_a_server(server, local_home):
    """``--format json`` in-process: the model thinks first and the JSON grammar applies after its thinking, as the
    server applies it (``Reasoning.around``); the same greedy request gives the same thinking and answer both ways."""
    served, local = _served_and_local(server)
    assert local == served
    assert served[0] == "plan" and served[1].startswith("{")  # the JSON grammar took over after the thinking


def test_thinking_turned_off_keeps_a_format_from_the_first_token_in_process_as_on_a_server(server, local_home):
    """A request that turns thinking off (``thinking: false``, DeepSeek-V3.1's flag, which this template does not
    read, as Magistral's reads neither) keeps the format from the first token in-process too: ``Reasoning.of`` reads
    the request's template variables there as the server reads them, so neither thinks."""
    served, local = _served_and_local(server, chat_template_kwargs={"thinking": False})
    assert local == served
    assert served[0] == "" and served[1].startswith("{")  # the chain's <think> was masked from the first token
