"""`xllm ls` and `xllm rm A B C` as Ollama has them, through the real CLI against a real server of its own."""

from __future__ import annotations

from tests.server_fixtures import TINY
from tests.test_cli_ollama_flags import invoke, loaded, own  # noqa: F401 (own: the fixture, shared)
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store import ModelStore


def test_ls_is_list(own):  # noqa: F811
    """`ollama ls` is `ollama list`: `xllm ls` was "No such command"."""
    listed = invoke("list")
    assert listed.exit_code == 0 and TINY in listed.stdout
    result = invoke("ls")
    assert result.exit_code == 0, result.output
    assert result.stdout == listed.stdout
    assert "  ls " not in invoke("--help").stdout  # an alias, not a second command in the list


def test_rm_removes_several_models_and_stops_at_the_first_that_fails(own, tiny_llama_dir):  # noqa: F811
    """`ollama rm A B C` removes each in turn and stops at the first that fails (those before it stay removed);
    `xllm rm` took one name. Each is unloaded from the server first."""
    store = ModelStore(own.config.store.home)
    for name in ("rm-a", "rm-b", "rm-c"):
        store.pull(str(tiny_llama_dir), name)
    with XllmClient(own.base_url, own.api_key) as c:
        c.load("rm-a")
        c.load("rm-b")
    result = invoke("rm", "rm-a", "ghost", "rm-b", "-y")
    assert result.exit_code == 1 and result.stdout == "Removed rm-a\n", result.output
    assert result.stderr.strip() == "Error: The model 'ghost' does not exist"
    assert not store.exists("rm-a") and "rm-a" not in loaded(own)
    assert store.exists("rm-b") and "rm-b" in loaded(own)  # after the failure: untouched

    result = invoke("rm", "rm-b", "rm-c", input="y\nn\n")  # asked for each; a no stops there
    assert result.exit_code == 1 and "Remove rm-b? [y/N]" in result.stdout and "Removed rm-b" in result.stdout
    assert "Remove rm-c? [y/N]" in result.stdout and "Aborted!" in result.stderr
    assert not store.exists("rm-b") and "rm-b" not in loaded(own) and store.exists("rm-c")

    result = invoke("rm", "-y", "rm-c")
    assert result.exit_code == 0 and result.stdout == "Removed rm-c\n"
    assert invoke("rm").exit_code == 2  # a name is still required
    assert [m.name for m in store.list()] == [TINY]
