"""``%xllm serve/create/cp/hub-service``: the terminal's verbs without a notebook twin say what to do instead,
while prompts that merely start with those words still go to the model (a real IPython shell, a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from IPython.utils.capture import capture_output

from tests.magic_shell import magic_shell, run, shown
from tests.server_fixtures import TINY
from xllm_jupyter.client import XllmClient
from xllm_jupyter.client.base import can_chat
from xllm_jupyter.magics.verbs import is_command


@pytest.fixture
def shell(live) -> Iterator[Any]:
    """IPython with a fresh %xllm pointed at the session server (as the extension's variables would)."""
    with magic_shell() as ip:
        yield ip


def models(live) -> list[str]:
    """The names the server lists now."""
    with XllmClient(live.base_url, live.api_key) as c:
        return sorted(m["id"] for m in c.models())


def test_terminal_verbs_are_commands_only_in_their_terminal_shape():
    commands = ["serve", "serve --port 8000 -m smollm2", "serve --host=0.0.0.0", "create mine",
                "create mine -f Modelfile", "create mine --file ./dir/Modelfile", "cp tiny tiny-copy", "hub-service"]
    prompts = ["serve dinner", "serve me a recipe for soup", "create a haiku about cats", "create mine please now",
               "cp a b c", "cp this file to the backup folder", "create mine -f", "serve --verbose now"]
    assert [line for line in commands if not is_command(line)] == []
    assert [line for line in prompts if is_command(line)] == []


def test_the_terminal_options_of_create_and_cp_keep_them_commands():
    """`xllm create`/`cp` take --url and --api-key, and every verb -h/--help: such a line was a prompt, so a key
    typed after --api-key went to the model (and into the notebook) as text."""
    commands = ["create mine -f Modelfile --api-key sk-secret", "create mine --url http://host:8900/v1",
                "cp tiny tiny-copy --url=http://host/v1 --api-key sk-secret", "create --help", "cp -h", "serve --help"]
    assert [line for line in commands if not is_command(line)] == []
    assert not is_command("create a haiku --help me")  # still a prompt past the terminal's shape


def test_serve_and_hub_service_say_what_to_do_instead(shell, live):
    before = models(live)
    for line in ("serve", f"serve --port 8000 -m {TINY}"):
        cap = run(shell, line)
        assert cap.stderr == ""
        text = shown(cap)
        assert text.startswith("This notebook already talks to an xllm server (`%xllm status` says which")
        assert "\n" not in text and cap.outputs[-1].metadata.get("xllm") is None  # one line, nothing asked
    text = shown(run(shell, "hub-service"))
    assert text.startswith("`xllm hub-service` is started by JupyterHub") and "\n" not in text
    assert models(live) == before


def test_create_and_cp_name_the_terminal_command_and_change_nothing(shell, live):
    before = models(live)
    cap = run(shell, f"cp {TINY} tiny-copied")
    assert cap.outputs == []
    assert cap.stderr == ("xllm: `%xllm cp` is not available from a notebook (the server has no HTTP route for it): "
                          f"run `xllm cp {TINY} tiny-copied` in a terminal where the server runs, as its user, "
                          "then `%xllm list`\n")
    cap = run(shell, "create mine -f 'my dir/Modelfile'")
    assert cap.stderr.startswith("xllm: `%xllm create` is not available from a notebook")
    assert "`xllm create mine -f 'my dir/Modelfile'`" in cap.stderr and cap.stderr.count("\n") == 1
    # a one-word line may have been a prompt: the line says how to ask it
    cap = run(shell, "create haiku")
    assert cap.stderr.endswith("(to ask the model this instead: `%xllm -- create haiku`)\n")
    assert "`xllm create NAME -f Modelfile`" in run(shell, "create").stderr
    assert "`xllm cp SOURCE DESTINATION`" in run(shell, "cp").stderr
    # the terminal command it spells out never repeats a key into the notebook's output
    for line in ("create mine -f Modelfile --api-key sk-secret", "cp a b --api-key=sk-secret"):
        cap = run(shell, line)
        assert "sk-secret" not in cap.stderr and "KEY` in a terminal" in cap.stderr and cap.outputs == [], cap.stderr
    cap = run(shell, "create --help")  # no "ask the model this" hint for an option
    assert "`xllm create --help`" in cap.stderr and "to ask the model" not in cap.stderr, cap.stderr
    assert models(live) == before


def test_prompts_starting_with_those_verbs_reach_the_model(shell):
    run(shell, "config temperature=0 max_tokens=2 format=text")
    for prompt in ("create a haiku about cats", "serve me a recipe for soup", "serve dinner",
                   "cp this file to the backup folder"):
        cap = run(shell, prompt)
        assert cap.stderr == "", (prompt, cap.stderr)
        meta = cap.outputs[-1].metadata.get("xllm") or {}
        assert meta.get("model") == TINY and meta["usage"]["completion_tokens"] <= 2, (prompt, meta)
    # an option first makes any line a prompt, as the hint says
    cap = run(shell, "-t 0.7 create haiku")
    assert cap.stderr == "" and cap.outputs[-1].metadata["xllm"]["model"] == TINY


def test_list_says_each_models_task(shell, live):
    """`%xllm list` marks the embedding model that sits among the chat models (`%xllm use` refuses it)."""
    with XllmClient(live.base_url, live.api_key) as c:
        entries = {m["id"]: m for m in c.models()}
    markdown = "\n".join(o.data["text/markdown"] for o in run(shell, "list").outputs if "text/markdown" in o.data)
    assert markdown.splitlines()[0] == "| MODEL | LOADED | BACKEND | CONTEXT | TASK |"
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in markdown.splitlines()[2:]}
    assert rows[TINY] == "chat"
    if "all-minilm" in entries:  # the packaged embedding model's wheel is installed here
        assert rows["all-minilm"] == "embedding"


def test_asking_an_unknown_model_names_the_servers_chat_models(shell, live):
    with XllmClient(live.base_url, live.api_key) as c:
        names = [m["id"] for m in c.models() if can_chat(m)]
    cap = run(shell, "-m no-such-model -t 0 --max-tokens 2 Hi")
    assert cap.stderr == (f"xllm: The model 'no-such-model' does not exist — chat models: {', '.join(names)} "
                          "(`%xllm use MODEL` picks one for this notebook)\n"), cap.stderr
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-m no-such-model --max-tokens 2", "Hi")
    assert cap.stderr.startswith("xllm: The model 'no-such-model' does not exist — chat models: ") and TINY in cap.stderr


def test_every_verb_is_a_command_only_in_its_shape():
    """`help`, `use`, `connect`... won over any prompt that began with them: "help me write a haiku" showed the help,
    "use a metaphor to explain recursion" tried to switch the model."""
    commands = ["", "help", "help use", "help hub-service", "use", f"use {TINY}", "use no-such-model", "use smollm2:latest",
                "use HuggingFaceTB/SmolLM2-135M-Instruct", "show hf.co/org/repo:Q4_K_M", "use {no_such_variable}",
                "show {m.name}", "config {setting}",
                "list", "ps", "status", "load tiny", "unload tiny", "rm tiny", "rm tiny tiny-copy", "load", "config",
                "config temperature=0 'system=Be terse, please.'", "connect", "connect http://127.0.0.1:8900/v1",
                "connect 127.0.0.1:8900", "connect localhost:8900 --token", "connect --token sk-x", "connect https://hub/xllm",
                "connect [::1]:8900", "pull smollm2", "pull HuggingFaceTB/SmolLM2-135M-Instruct --revision main --force",
                "pull ./my-lora --name my-lora --base tiny", "pull '/data/my models/x' --convert",
                "pull https://huggingface.co/org/repo", "pull hf.co/org/repo", "pull --help", "use -h",
                "status --help"]
    prompts = ["help me write a haiku about rain", "help?", "use a metaphor to explain recursion", "use tiny?",
               "list three colours", "list {things}", "use {} or {0}", "status of the project", "connect the dots", "connect everything",
               "config files in yaml", "load the data from a csv", "pull yourself together", "rm -rf explained",
               "ps I love you", "help help me", "pull Bob's", "pull strings?", "-- help", "-- use tiny", "-t 0.5 use a metaphor"]
    assert [line for line in commands if not is_command(line)] == []
    assert [line for line in prompts if is_command(line)] == []


def test_prompts_that_start_with_a_verb_reach_the_model(shell):
    run(shell, "config temperature=0 max_tokens=2 format=text")
    for prompt in ("help me write a haiku about rain", "use a metaphor to explain recursion", "list three colours",
                   "connect the dots", "-- help", f"-- use {TINY}"):
        cap = run(shell, prompt)
        assert cap.stderr == "", (prompt, cap.stderr)
        meta = cap.outputs[-1].metadata.get("xllm") or {}
        assert meta.get("model") == TINY and meta["usage"]["completion_tokens"] <= 2, (prompt, meta)
    assert shown(run(shell, "use")) == "No default model set: the server's default is used."  # no switch happened


def test_well_formed_verb_lines_keep_their_behaviour(shell):
    assert shown(run(shell, f"use {TINY}")) == f"Using {TINY} for %%xllm in this notebook"
    cap = run(shell, "use no-such-model")  # one model-name-shaped word: a command, which says the name is unknown
    assert cap.stderr == ("xllm: the server has no model 'no-such-model' (see `%xllm list`, or `%xllm pull`) "
                          "(to ask the model this instead: `%xllm -- use no-such-model`)\n"), cap.stderr
    assert cap.outputs == []
    # a pull's source is no store name, but the line means `use`: it was asked of the model
    cap = run(shell, "use HuggingFaceTB/SmolLM2-135M-Instruct")
    assert cap.stderr.startswith("xllm: the server has no model 'HuggingFaceTB/SmolLM2-135M-Instruct' (see `%xllm list`")
    assert cap.outputs == []
    # a `{name}` the notebook lacks (a kernel restarted) stays as written: still a `use` line, which names it
    cap = run(shell, "use {no_such_variable}")
    assert cap.stderr.startswith("xllm: the server has no model '{no_such_variable}' (see `%xllm list`"), cap.stderr
    assert cap.outputs == []
    assert shown(run(shell, "help use")) == "%xllm use [MODEL]                       default model for this notebook (no MODEL: show it)"
    assert shown(run(shell, "pull --help")).startswith("%xllm pull SOURCE [--name N]")
    assert "%xllm [options] -- PROMPT" in shown(run(shell, "help"))
    # not a prompt either (an option the question does not take): the verb's own error
    assert run(shell, "ps --bogus").stderr == "xllm: %xllm ps: unrecognized arguments: --bogus\n"
    assert run(shell, "help me -x").stderr.startswith("xllm: %xllm help: no command 'me'")
