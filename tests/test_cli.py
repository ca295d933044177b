"""The `xllm` CLI through its entry point: store commands, run/ps/stop on the live server, errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.helpers import free_port
from tests.server_fixtures import TINY
from xllm_jupyter.cli.main import main
from xllm_jupyter.client import XllmClient

XLLM = Path(sys.executable).parent / "xllm"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty store for this test only."""
    path = tmp_path / "home"
    monkeypatch.setenv("XLLM_HOME", str(path))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    return path


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def assert_clean_error(result, *needles: str) -> None:
    """Exit 1 with one readable line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err


# ------------------------------------------------------------------ entry point
def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("serve", "pull", "list", "show", "rm", "run", "ps", "stop"):
        assert f"  {cmd} " in result.output


def test_real_entry_point_subprocess(tmp_path):
    assert XLLM.exists(), "the package is not installed (pip install -e .): no xllm script"
    env = {**os.environ, "XLLM_HOME": str(tmp_path / "empty")}
    env.pop("XLLM_CONFIG", None)
    out = subprocess.run([str(XLLM), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "Usage: xllm" in out.stdout
    out = subprocess.run([str(XLLM), "list"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "No models yet" in out.stdout
    out = subprocess.run([str(XLLM), "show", "ghost"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: The model 'ghost' does not exist"


def test_usage_errors_exit_2():
    assert invoke("run").exit_code == 2
    assert invoke("no-such-command").exit_code == 2
    assert invoke("run", "m", "--temperature", "hot").exit_code == 2


# ------------------------------------------------------------------------ store
def test_list_wraps_a_long_source_and_cuts_no_name_or_format(home, tiny_llama_dir, tmp_path):
    # the row passed the console's 100 columns once pytest's temp dir reached pytest-1000: every no_wrap column
    # was cut, "safetensors" shown as "safetenso…"
    long_dir = tmp_path / ("a-rather-long-folder-name-" * 4)
    shutil.copytree(tiny_llama_dir, long_dir)  # a copy: the store records a link's target
    assert invoke("pull", str(long_dir), "--name", "mini-with-a-long-name").exit_code == 0

    out = invoke("list").stdout
    row = next(line for line in out.splitlines() if line.startswith("mini"))
    assert row.split()[:2] == ["mini-with-a-long-name", "safetensors"]
    assert "…" not in row
    assert "".join(line.strip() for line in out.splitlines()).count("a-rather-long-folder-name-") == 4  # all of it, folded


def test_pull_list_show_rm(home, tiny_llama_dir):
    result = invoke("pull", str(tiny_llama_dir), "--name", "mini")
    assert result.exit_code == 0, result.output
    assert "Pulled mini (safetensors" in result.stdout

    result = invoke("list")
    assert result.exit_code == 0
    assert "mini" in result.stdout and "safetensors" in result.stdout

    result = invoke("show", "mini")
    assert result.exit_code == 0
    out = result.stdout
    assert "name      mini" in out
    assert "format    safetensors" in out
    assert str(tiny_llama_dir) in out or "source" in out
    assert "model.safetensors" in out and "tokenizer.json" in out
    assert "template" in out and "im_start" in out  # SmolLM2's chat template excerpt

    # pulling again from the same source is a no-op, not an error
    assert invoke("pull", str(tiny_llama_dir), "--name", "mini").exit_code == 0

    result = invoke("rm", "mini", input="n\n")
    assert result.exit_code == 1  # declined: nothing removed
    assert "mini" in invoke("list").stdout

    result = invoke("rm", "mini", "-y")
    assert result.exit_code == 0 and "Removed mini" in result.stdout
    assert "No models yet" in invoke("list").stdout
    assert_clean_error(invoke("show", "mini"), "mini", "does not exist")
    assert_clean_error(invoke("rm", "mini", "-y"), "does not exist")


def test_pull_errors_are_one_line(home, tmp_path):
    assert_clean_error(invoke("pull", str(tmp_path / "nowhere")))
    assert_clean_error(invoke("show", "../etc"), "Invalid model name")


def test_pull_of_a_directory_of_several_ggufs_says_to_pull_one_file(home, tmp_path):
    """The advice was Hugging Face's spelling (``hf:ORG/REPO/FILE.gguf``), which names no local file."""
    quants = tmp_path / "quants"
    quants.mkdir()
    for name in ("model.Q4_K_M.gguf", "model.Q8_0.gguf"):
        (quants / name).write_bytes(b"GGUF")
    result = invoke("pull", str(quants))
    assert_clean_error(result, "Several GGUF files", "model.Q4_K_M.gguf", "pull one of them by its path")
    assert "hf:" not in result.stderr


# --------------------------------------------------------------------- server
def test_run_one_shot_streams_the_answer(live):
    result = invoke("run", TINY, "Say", "hi", "-t", "0", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "No xllm server" not in result.stderr
    with XllmClient(live.base_url, live.api_key) as c:
        expected = c.chat([{"role": "user", "content": "Say hi"}], TINY, temperature=0, max_tokens=8)
    assert result.stdout == expected + "\n"


@pytest.fixture
def tty(monkeypatch):
    """stdin is a terminal (CliRunner's is not): `run` without a prompt chats interactively."""
    from xllm_jupyter.cli import chat

    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True, raising=False)


def test_run_interactive_keeps_history(live, tty):
    result = invoke("run", TINY, "-t", "0", "--max-tokens", "4", input="hello\n\nagain\n/bye\nnot sent\n")
    assert result.exit_code == 0, result.output
    # hello, the blank line, again, /bye; "not sent" is never read. stdout is not a terminal: prompts go to stderr
    assert result.stderr.count(">>> ") == 4 and ">>>" not in result.stdout
    assert "/bye" in result.stderr  # the help line


def test_interactive_sends_the_whole_conversation(live, monkeypatch):
    """Each turn carries the earlier turns (recorded around the real client)."""
    from xllm_jupyter.cli import chat

    sent = []

    class Recording(XllmClient):
        def stream_chat(self, messages, model=None, **params):
            sent.append([dict(m) for m in messages])
            return super().stream_chat(messages, model, **params)

    lines = iter(["first", "/clear", "second", "third", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda: next(lines))
    history = [{"role": "system", "content": "be brief"}]
    with Recording(live.base_url, live.api_key) as backend:
        chat.interactive(backend, TINY, history, {"max_tokens": 3, "temperature": 0})
    assert [m["content"] for m in sent[0]] == ["be brief", "first"]
    assert [m["content"] for m in sent[1]] == ["be brief", "second"]  # /clear kept only the system prompt
    roles = [m["role"] for m in sent[2]]
    assert roles == ["system", "user", "assistant", "user"] and sent[2][-1]["content"] == "third"


def test_run_interactive_eof_exits(live, tty):
    result = invoke("run", TINY, "--max-tokens", "2", input="")
    assert result.exit_code == 0 and ">>> " in result.stderr


def test_run_unknown_model_is_a_clean_error(live):
    assert_clean_error(invoke("run", "nope", "hi"), "The model 'nope' does not exist")
    assert_clean_error(invoke("run", "nope"), "The model 'nope' does not exist")  # interactive: fails before the prompt


def test_wrong_api_key_is_a_clean_error(live):
    assert_clean_error(invoke("--api-key", "wrong", "ps"), "XLLM_API_KEY")


def test_the_environments_key_goes_only_to_the_server_it_names(xllm_server, monkeypatch):
    """`xllm --url OTHER ...` in a Jupyter terminal (the extension exports XLLM_BASE_URL and XLLM_API_KEY, its token) sent
    the Jupyter token to OTHER: click read XLLM_API_KEY as --api-key. The CLI now keeps XllmClient's rule: the
    variable's key only for the server XLLM_BASE_URL names; --api-key always goes."""
    monkeypatch.setenv("XLLM_BASE_URL", f"http://127.0.0.1:{free_port()}/xllm/v1")  # "the Jupyter server"
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)  # its token, which happens to open OTHER too
    for args in (("--url", xllm_server.base_url, "ps"), ("ps", "--url", xllm_server.base_url)):
        assert_clean_error(invoke(*args), "missing API key", "XLLM_API_KEY goes only to the server XLLM_BASE_URL names")
    assert invoke("ps", "--url", xllm_server.base_url, "--api-key", xllm_server.api_key).exit_code == 0
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url.upper().replace("/V1", ""))  # the same server, spelled so
    assert invoke("--url", xllm_server.base_url, "ps").exit_code == 0
    assert invoke("ps").exit_code == 0
    assert_clean_error(invoke("ps", "--api-key", "wrong"), "check --api-key / XLLM_API_KEY")


def test_run_without_server_runs_in_process(xllm_home, xllm_server, monkeypatch):
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = invoke("--url", url, "run", TINY, "hi", "-t", "0", "--max-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "No xllm server at" in result.stderr and "in this process" in result.stderr
    # the same weights, greedy: the in-process engine answers exactly what the server does
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        expected = c.chat("hi", TINY, temperature=0, max_tokens=6)
    assert result.stdout == expected + "\n"


def test_ps_and_stop(live):
    result = invoke("ps")
    assert result.exit_code == 0, result.output
    assert "NAME" in result.stdout and TINY in result.stdout and "transformers" in result.stdout
    try:
        result = invoke("stop", TINY)
        assert result.exit_code == 0 and f"Stopped {TINY}" in result.stdout
        assert TINY not in invoke("ps").stdout.replace("NAME", "")
        assert_clean_error(invoke("stop", TINY), "not loaded")
        assert_clean_error(invoke("stop", "ghost"), "ghost")
    finally:
        with XllmClient(live.base_url, live.api_key) as c:
            c.load(TINY)


def test_ps_says_when_a_load_waits_for_room():
    from xllm_jupyter.cli.main import _mode

    # /admin/models' shape for a model still loading: the runtime facts are in details
    row = {"id": "b", "state": "loading", "details": {"state": "loading", "waiting_for_room": True}}
    assert _mode({**row["details"], **row}) == "loading, waiting for room"
    assert _mode({"state": "loading", "waiting_for_room": False}) == "loading"


def test_no_server_for_ps_is_a_clean_error():
    result = invoke("--url", f"http://127.0.0.1:{free_port()}/v1", "ps")
    assert_clean_error(result, "no xllm server at", "xllm serve")


def test_serve_subprocess(xllm_home):
    """`xllm serve` for real: listens, loads the model, answers, stops on SIGINT."""
    port = free_port()
    env = {**os.environ, "XLLM_HOME": str(xllm_home), "OMP_NUM_THREADS": "1"}
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS", "XLLM_BASE_URL"):
        env.pop(var, None)
    proc = subprocess.Popen([str(XLLM), "serve", "--port", str(port), "-m", TINY, "--api-key", "k1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health/ready", timeout=2).status_code == 200:  # -m TINY is loaded
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        else:
            pytest.fail("xllm serve did not come up")
        with XllmClient(base + "/v1", "k1") as c:
            assert c.chat("hi", TINY, max_tokens=3) is not None
        env_cli = {"XLLM_BASE_URL": base + "/v1", "XLLM_API_KEY": "k1"}
        result = CliRunner().invoke(main, ["ps"], env=env_cli)
        assert result.exit_code == 0 and TINY in result.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read()[-2000:]


def test_rm_says_it_waits_for_another_process_working_on_the_model(home, tiny_llama_dir):
    """`xllm rm` behind another process's pull or removal of the name waited without a word, as if it hung."""
    import threading

    from xllm_jupyter.store.atomic import FileLock
    from xllm_jupyter.store.names import name_to_dirname, validate_name
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), "mini")
    env = {**os.environ, "XLLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}  # no server there
    env.pop("XLLM_API_KEY", None)
    lock = FileLock(store.locks / f"{name_to_dirname(validate_name('mini'))}.lock")
    lock.acquire()
    # (let go in any case after a minute: the old code printed nothing, and the test must end to fail)
    fallback = threading.Timer(60, lock.release)
    fallback.start()
    try:
        proc = subprocess.Popen([str(XLLM), "rm", "-y", "mini"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        line = proc.stderr.readline()
        assert line.startswith("Waiting for another xllm process working on mini"), line
        assert proc.poll() is None and store.exists("mini")  # still waiting, nothing removed
    finally:
        fallback.cancel()
        lock.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Removed mini" in out and not store.exists("mini")
