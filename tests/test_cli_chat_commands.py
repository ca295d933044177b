"""`xllm run`'s chat commands as `ollama run` has them: /set parameter, /set system, /show, /load, /save and /? set|show
(they were "Unknown command" or /set's usage line). Real CLI against a real server of the module's own, whose store
is XLLM_HOME; the requests the chat sends are recorded on their way to the real client."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.server_fixtures import TINY, point_cli_at
from xllm_jupyter.cli import chat
from xllm_jupyter.cli.main import main
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store import ModelStore
from xllm_jupyter.store.create import modelfile_of


@pytest.fixture
def own(own_tiny_server, monkeypatch):
    """The module's server, as the environment names it, its store as XLLM_HOME; stdin is a person typing."""
    point_cli_at(own_tiny_server, monkeypatch)
    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True)
    return own_tiny_server


@pytest.fixture
def sent(monkeypatch):
    """Each request the chat sends: (model, messages, params)."""
    seen = []
    real = XllmClient.stream_chat

    def recording(self, messages, model=None, **params):
        seen.append((model, [dict(m) for m in messages], dict(params)))
        return real(self, messages, model, **params)

    monkeypatch.setattr(XllmClient, "stream_chat", recording)
    return seen


def chat_with(model: str, *lines: str, args: tuple[str, ...] = ()):
    result = CliRunner().invoke(main, ["run", model, "-t", "0", "--max-tokens", "2", *args],
                                input="".join(f"{line}\n" for line in (*lines, "/bye")), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_set_parameter_sets_the_requests_sampling(own, sent):
    result = chat_with(TINY, "/set parameter temperature 0.5", "/set parameter temperature 3", "/set parameter num_predict 3",
                       "/set parameter repeat_penalty 0", "/set parameter top_k 7",
                       "/set parameter repeat_penalty 1.1", "/set parameter stop END stop", "/set parameter seed x",
                       "/set parameter num_ctx 4096", "/set parameter bogus 1", "/set parameter", "hello")
    params = sent[0][2]
    assert (params["temperature"], params["max_tokens"], params["top_k"], params["repetition_penalty"], params["stop"]) \
        == (0.5, 3, 7, 1.1, ["END", "stop"])
    assert "seed" not in params
    err = result.stderr
    for said in ("Set parameter 'temperature' to '0.5'", "Set parameter 'num_predict' to '3'",
                 "Set parameter 'stop' to 'END, stop'", "Couldn't set parameter: expects an integer",
                 "Couldn't set parameter: 'num_ctx' is a Modelfile parameter xllm keeps but does not apply",
                 "Couldn't set parameter: unknown parameter 'bogus'", "Available parameters:",
                 # past the API's range (Ollama's is wider): every answer after it was a 400
                 "Couldn't set parameter: temperature: input should be less than or equal to 2",
                 "Couldn't set parameter: repeat_penalty: input should be greater than 0"):
        assert said in err, err


def test_set_system_takes_the_system_messages_place(own, sent):
    result = chat_with(TINY, "/set system Talk  like a pirate.", "hello", "/clear", "again", "/show system",
                       args=("-s", "be brief"))
    assert sent[0][1] == [{"role": "system", "content": "Talk  like a pirate."}, {"role": "user", "content": "hello"}]
    assert sent[1][1] == [{"role": "system", "content": "Talk  like a pirate."}, {"role": "user", "content": "again"}]
    assert "Set system message." in result.stderr and "Cleared session context." in result.stderr
    assert result.stdout.endswith("Talk  like a pirate.\n")  # /show system: this chat's


def test_show_prints_the_models_parts(own, sent):
    store = ModelStore(own.config.store.home)
    store.create("tuned", f"FROM {TINY}\nPARAMETER temperature 0.3\nSYSTEM Be kind.\n")
    result = chat_with("tuned", "/show modelfile", "/show system", "/show parameters", "/show info", "/show bogus",
                       "/set parameter top_p 0.5", "/show parameters", "/? show", "/? set")
    out = result.stdout
    assert f"FROM {TINY}" not in out and "FROM tuned" in out  # the Modelfile that re-creates it, as `xllm show`'s
    assert "Be kind.\n" in out and "temperature" in out and "name      tuned" in out
    assert "User defined parameters:\ntop_p               0.5\nModel defined parameters:\n" in out
    assert "/show modelfile" in result.stderr and "/set parameter NAME VALUE" in result.stderr  # bogus, /? show, /? set
    assert sent == []


def test_load_chats_with_another_model(own, sent):
    ModelStore(own.config.store.home).create("other", f"FROM {TINY}\n")
    result = chat_with(TINY, "hello", "/load other", "again", "/load nothere", "more", args=("-s", "be brief"))
    assert [model for model, _, _ in sent] == [TINY, "other", "other"]  # a failed /load keeps the model it had
    assert [m["content"] for m in sent[0][1]] == ["be brief", "hello"]
    assert [m["content"] for m in sent[1][1]] == ["be brief", "again"]  # a new conversation, the system message kept
    assert [m["role"] for m in sent[2][1]] == ["system", "user", "assistant", "user"]
    assert "Loading model 'other'" in result.stderr and "Error:" in result.stderr and "nothere" in result.stderr


def test_save_keeps_the_session_as_a_model(own, sent):
    result = chat_with(TINY, "/set system be brief", "/set parameter temperature 0.25", "/set parameter stop END",
                       "hello", "/save kept")
    assert "Created new model 'kept'" in result.stderr
    reply = result.stdout[:-1]  # (the answer, then the line's end)
    settings = modelfile_of(ModelStore(own.config.store.home).show("kept"))
    assert settings.from_ == TINY and settings.system == "be brief"
    assert settings.parameters == {"temperature": 0.25, "stop": ["END"]}
    assert [(m.role, m.content) for m in settings.messages] == [("user", "hello"), ("assistant", reply.strip())]


def test_set_system_takes_a_block_of_several_lines(own, sent):
    """`/set system \"\"\"...` runs to the line ending in \"\"\", as in `ollama run` (its lines went to the model as messages)."""
    chat_with(TINY, '/set system """You are', "", 'a pirate."""', "hello", '/set system """Be brief."""', "again")
    assert sent[0][1] == [{"role": "system", "content": "You are\n\na pirate."}, {"role": "user", "content": "hello"}]
    assert sent[1][1][0] == {"role": "system", "content": "Be brief."} and len(sent) == 2


def test_save_keeps_the_models_own_turns_before_the_chats(own, sent):
    """A model with MESSAGE lines: the server puts its turns before each chat's, and a new model's MESSAGE lines replace
    its base's, so /save writes them first; the saved model's chats began with this chat's turns alone."""
    store = ModelStore(own.config.store.home)
    store.create("fewshot", f"FROM {TINY}\nMESSAGE user What is 1+1?\nMESSAGE assistant 2.\n")
    result = chat_with("fewshot", "hello", "/save kept2")
    reply = result.stdout[:-1].strip()
    settings = modelfile_of(store.show("kept2"))
    assert [(m.role, m.content) for m in settings.messages] == [
        ("user", "What is 1+1?"), ("assistant", "2."), ("user", "hello"), ("assistant", reply)]
    assert sent[0][1] == [{"role": "user", "content": "hello"}]  # (the model's turns are the server's to add)
