"""The `xllm` CLI as a person uses it: Modelfile settings without a server, piped stdin, slash
commands, Ctrl-C, a busy port, option placement, `rm` on a served model, relative Modelfile paths."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import free_port
from tests.server_fixtures import TINY
from xllm_jupyter.cli import chat
from xllm_jupyter.cli.main import main
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store.create import modelfile_of
from xllm_jupyter.store.store import ModelStore

XLLM = Path(sys.executable).parent / "xllm"

CREATED = """FROM tiny
PARAMETER temperature 0
PARAMETER num_predict 3
SYSTEM You answer in one word.
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
"""


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)


def one_error_line(result, code: int = 1) -> str:
    """The single ``Error: ...`` line of a failed command (no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    return err


def subprocess_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "XLLM_HOME": str(home), "OMP_NUM_THREADS": "1", "XLLM_ENGINE_TORCH_THREADS": "1"}
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS", "XLLM_BASE_URL"):
        env.pop(var, None)
    return env


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llama_dir):
    """A store of this test's own holding the tiny Llama as "tiny"; no server anywhere."""
    path = tmp_path / "home"
    ModelStore(path).pull(str(tiny_llama_dir), TINY)
    monkeypatch.setenv("XLLM_HOME", str(path))
    monkeypatch.setenv("XLLM_ENGINE_TORCH_THREADS", "1")
    monkeypatch.setenv("XLLM_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")  # nobody listens there
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    return path


# ------------------------------------------------ #1 the Modelfile without a server
def test_run_local_applies_the_modelfile(home, monkeypatch):
    from xllm_jupyter.client.local import LocalChat
    from xllm_jupyter.engine.engine import Engine

    ModelStore(home).create("terse", CREATED)
    seen: list[tuple[list[tuple[str, str]], int, float]] = []  # (prompt messages, max_tokens, temperature)
    prompts: list[list[tuple[str, str]]] = []
    encode, generate = Engine.encode_chat, Engine.generate

    async def encode_chat(self, name, messages, tools=None):
        prompts.append([(m.role, m.content) for m in messages])
        return await encode(self, name, messages, tools)

    def record(self, request):
        seen.append((prompts[-1], request.params.max_tokens, request.params.sampling.temperature))
        return generate(self, request)

    monkeypatch.setattr(Engine, "encode_chat", encode_chat)
    monkeypatch.setattr(Engine, "generate", record)
    shots = [("user", "Is Toronto in Canada?"), ("assistant", "yes")]

    result = invoke("run", "--local", "terse", "Say", "hi")
    assert result.exit_code == 0, result.output
    # SYSTEM, then the MESSAGE turns, then the prompt; temperature 0 and num_predict 3 as the defaults
    assert seen == [([("system", "You answer in one word."), *shots, ("user", "Say hi")], 3, 0.0)]
    with LocalChat() as local:
        spelled = [{"role": r, "content": c} for r, c in seen[0][0]]
        assert result.stdout == local.chat(spelled, TINY, temperature=0, max_tokens=3) + "\n"  # the same greedy reply
        # what the caller sets wins, and its own system prompt replaces SYSTEM
        local.chat([{"role": "system", "content": "Be loud."}, {"role": "user", "content": "Hi"}], "terse",
                   max_tokens=1, temperature=0.5)
        assert seen[-1] == ([("system", "Be loud."), *shots, ("user", "Hi")], 1, 0.5)


# ------------------------------------------------------------- #4 piped stdin
def test_piped_stdin_goes_before_the_prompt(live, monkeypatch):
    sent = []
    real = XllmClient.stream_chat

    def recording(self, messages, model=None, **params):
        sent.append([dict(m) for m in messages])
        return real(self, messages, model, **params)

    monkeypatch.setattr(XllmClient, "stream_chat", recording)
    result = invoke("run", TINY, "Summarize", "this.", "-t", "0", "--max-tokens", "3", input="The cat sat.\nIt was happy.\n")
    assert result.exit_code == 0, result.output
    assert sent == [[{"role": "user", "content": "The cat sat.\nIt was happy.\n\nSummarize this."}]]
    assert ">>>" not in result.output and "/bye" not in result.stderr  # answered once, no chat loop
    with XllmClient(live.base_url, live.api_key) as c:
        assert result.stdout == c.chat(sent[0], TINY, temperature=0, max_tokens=3) + "\n"

    # no prompt: all of stdin is the one question, not one turn per line
    sent.clear()
    result = invoke("run", TINY, "--max-tokens", "2", input="line one\nline two\n")
    assert result.exit_code == 0, result.output
    assert sent == [[{"role": "user", "content": "line one\nline two"}]]
    assert ">>>" not in result.output

    # nothing at all on stdin and no prompt: the model is loaded, nothing is asked
    sent.clear()
    result = invoke("run", TINY, input="")
    assert result.exit_code == 0 and sent == [] and result.stdout == ""


def test_interactive_prompt_stays_out_of_redirected_stdout(live, monkeypatch):
    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True, raising=False)  # a person at the keyboard, stdout to a file
    result = invoke("run", TINY, "-t", "0", "--max-tokens", "2", input="hello\n/bye\n")
    assert result.exit_code == 0, result.output
    assert ">>>" not in result.stdout and result.stderr.count(">>> ") == 2


# -------------------------------------------------------- #16 slash commands
def test_unknown_slash_commands_are_not_sent(live, monkeypatch):
    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True, raising=False)
    sent = []
    real = XllmClient.stream_chat

    def recording(self, messages, model=None, **params):
        sent.append(messages[-1]["content"])
        return real(self, messages, model, **params)

    monkeypatch.setattr(XllmClient, "stream_chat", recording)
    result = invoke("run", TINY, "--max-tokens", "2", input="/bogus thing\n/?\n/help\nhello\n/bye\n")
    assert result.exit_code == 0, result.output
    assert sent == ["hello"]
    assert "Unknown command '/bogus'" in result.stderr and "/clear" in result.stderr and "/bye" in result.stderr
    assert result.stderr.count("/? shows this help") == 3  # on entry, then for /? and /help


# ------------------------------------------------------------- #15 Ctrl-C
def test_ctrl_c_during_pull_exits_130(home, tiny_llama_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelStore, "pull", interrupted)
    result = invoke("pull", str(tiny_llama_dir), "--name", "other")
    assert result.exit_code == 130
    assert result.stderr.strip() == "(interrupted)" and "Aborted" not in result.output


def interrupted(home: Path, code: str, marker: str, settle: float = 0.0) -> tuple[int, str, str]:
    """Run ``code`` in a child, send SIGINT once it prints ``marker`` on stderr (and ``settle`` s more);
    its exit status, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while marker not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"the child exited before {marker}"
        time.sleep(settle)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_ctrl_c_while_loading_in_process_exits_130(home):
    """A real `xllm run --local` interrupted (SIGINT) while the model loads on its worker thread."""
    code = (
        "import sys, time\n"
        "from xllm_jupyter.backends import transformers as t\n"
        "real = t.TransformersBackend.load\n"
        "def slow(self, spec):\n"
        "    print('LOADING', file=sys.stderr, flush=True)\n"
        "    time.sleep(2)\n"
        "    return real(self, spec)\n"
        "t.TransformersBackend.load = slow\n"
        "from xllm_jupyter.cli.main import main\n"
        "main(['run', '--local', 'tiny', 'hi', '--max-tokens', '2'], prog_name='xllm')\n"
    )
    returncode, out, err = interrupted(home, code, "LOADING")
    assert returncode == 130, err
    assert "(interrupted)" in err
    assert "Task was destroyed" not in err and "Aborted" not in err and "Traceback" not in err, err
    assert out == ""



def test_ctrl_c_while_generating_in_process_exits_130(home):
    """`xllm run --local` (also the fallback when no server answers) interrupted while it waits for the next
    token: a clean 130 and "(interrupted)"; it died with "aclose(): asynchronous generator is already running"."""
    code = (
        "import asyncio, sys\n"
        "from xllm_jupyter.engine import engine as e\n"
        "real = e.Engine.generate\n"
        "async def slow(self, request):\n"
        "    async for event in real(self, request):\n"
        "        print('GENERATING', file=sys.stderr, flush=True)\n"
        "        yield event\n"
        "        await asyncio.sleep(0.5)\n"
        "e.Engine.generate = slow\n"
        "from xllm_jupyter.cli.main import main\n"
        "main(['run', '--local', 'tiny', 'hi', '--max-tokens', '200'], prog_name='xllm')\n"
    )
    returncode, out, err = interrupted(home, code, "GENERATING", settle=0.2)  # inside the half-second wait
    assert returncode == 130, err
    assert "(interrupted)" in err
    assert "Traceback" not in err and "already running" not in err and "was destroyed" not in err, err

# ------------------------------------------------------- #7 a busy port
def test_serve_on_a_busy_port_is_one_line(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([str(XLLM), "serve", "--port", str(port)], capture_output=True, text=True, timeout=120,
                             env=subprocess_env(home))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
                      "(is another xllm serve running? use --port)"], out.stderr


# --------------------------------------------- #8 the client's key before serve
def test_group_api_key_before_serve_is_a_usage_error(home, monkeypatch):
    from xllm_jupyter.server import standalone

    served = []
    monkeypatch.setattr(standalone, "serve", lambda config, models: served.append(config.server.api_keys))
    result = invoke("--api-key", "secret", "serve", "--port", str(free_port()))
    assert result.exit_code == 2 and served == []
    assert "xllm serve --api-key KEY" in result.stderr and "does not protect the server" in result.stderr
    # serve's own --api-key says what the server requires; XLLM_API_KEY is a client's key, not an error
    assert invoke("--api-key", "secret", "serve", "--api-key", "k2").exit_code == 0
    assert invoke("serve", env={"XLLM_API_KEY": "client-key"}).exit_code == 0
    assert served == [("k2",), ()]


# ----------------------------------------------- #17 --url after the command
def test_url_and_key_after_the_subcommand(xllm_server, monkeypatch):
    for var in ("XLLM_BASE_URL", "XLLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    where = ["--url", xllm_server.base_url, "--api-key", xllm_server.api_key]
    result = invoke("ps", *where)
    assert result.exit_code == 0, result.output
    assert TINY in result.stdout
    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert invoke("--url", dead, "ps", *where).exit_code == 0  # after the command wins over before it
    result = invoke("run", TINY, "hi", "--max-tokens", "2", *where)
    assert result.exit_code == 0 and "No xllm server" not in result.stderr, result.output
    err = one_error_line(invoke("stop", "ghost", *where))
    assert "ghost" in err
    assert "XLLM_API_KEY" in one_error_line(invoke("ps", "--url", xllm_server.base_url, "--api-key", "wrong"))


# ------------------------------------------------- #9 rm on a served model
def test_rm_unloads_the_model_from_a_running_server(xllm_server, xllm_home, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    store = ModelStore(xllm_home)
    store.pull(str(tiny_llama_dir), "doomed", force=True)
    where = ["--url", xllm_server.base_url, "--api-key", xllm_server.api_key]
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        try:
            c.load("doomed")
            assert "doomed" in [m["id"] for m in c.loaded()]
            result = invoke("rm", "doomed", "-y", *where)
            assert result.exit_code == 0 and "Removed doomed" in result.stdout, result.output
            assert result.stderr == ""
            assert "doomed" not in [m["id"] for m in c.loaded()]
            assert "doomed" not in [m["id"] for m in c.models()]
            # not loaded there: removed without a word
            store.pull(str(tiny_llama_dir), "doomed")
            result = invoke("rm", "doomed", "-y", *where)
            assert result.exit_code == 0 and result.stderr == "", result.output
            # no server: removed without a word
            store.pull(str(tiny_llama_dir), "doomed")
            result = invoke("rm", "doomed", "-y", "--url", f"http://127.0.0.1:{free_port()}/v1")
            assert result.exit_code == 0 and result.stderr == "", result.output
            assert "doomed" not in [m.name for m in store.list()]
        finally:
            if "doomed" in [m.name for m in store.list()]:
                store.rm("doomed")
            c.load(TINY)


def test_re_creating_a_loaded_model_serves_its_new_settings(xllm_server, xllm_home, tmp_path, monkeypatch):
    """The server reads a model's Modelfile settings when it loads it: re-created, it is unloaded, so the next
    request loads the new version (num_predict 2, then 5)."""
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    where = ["--url", xllm_server.base_url, "--api-key", xllm_server.api_key]
    modelfile = tmp_path / "Modelfile"
    messages = [{"role": "user", "content": "hi"}]
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        try:
            for num_predict in (2, 5):
                modelfile.write_text(f"FROM {TINY}\nPARAMETER num_predict {num_predict}\n")
                result = invoke("create", "brief", "-f", str(modelfile), *where)
                assert result.exit_code == 0 and "Note:" not in result.stderr, result.output  # (progress on stderr)
                body = c.chat_completion(messages, "brief", temperature=0, ignore_eos=True)
                assert body["usage"]["completion_tokens"] == num_predict
        finally:
            c.unload("brief")
            ModelStore(xllm_home).rm("brief")


# -------------------------------------- #11 relative paths in a Modelfile
def test_relative_from_resolves_against_the_modelfile(home, tiny_llama_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    os.symlink(tiny_llama_dir, project / "weights")
    (project / "models" / "Modelfile").write_text("FROM ../weights\nPARAMETER seed 7\nADAPTER ./lora\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither path exists from here
    result = invoke("create", "rel", "-f", str(project / "models" / "Modelfile"))
    assert result.exit_code == 0, result.output
    made = modelfile_of(ModelStore(home).show("rel"))
    assert made.from_ == str(project / "weights") and made.adapters == [str(project / "models" / "lora")]
    assert made.parameters == {"seed": 7}

    (project / "models" / "Missing").write_text("FROM ../nowhere\n")
    err = one_error_line(invoke("create", "nope", "-f", str(project / "models" / "Missing")))
    assert err == f"Error: No such local model directory or .gguf file: {project / 'nowhere'}"
    # the same Modelfile on stdin: relative to the current directory, and the error names the path as written
    err = one_error_line(invoke("create", "nope", "-f", "-", input="FROM ../nowhere\n"))
    assert err == "Error: No such local model directory or .gguf file: ../nowhere"
    assert one_error_line(invoke("pull", "./not/here")) == "Error: No such local model directory or .gguf file: ./not/here"


# -------------------------------------------------- #14 the flag's name
def test_name_taken_by_another_source_names_the_flag(home, tiny_llama_dir, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, other)
    err = one_error_line(invoke("pull", str(other), "--name", TINY))
    assert "--force" in err
    assert invoke("pull", str(other), "--name", TINY, "--force").exit_code == 0


def test_pull_bars_show_a_conversion_in_steps_not_bytes(capsys):
    """A GGUF conversion reports 3 steps: the bar says 2/3 steps, never '3 bytes' and a speed."""
    from xllm_jupyter.cli.store_cmds import PullBar, _progress
    from xllm_jupyter.store.progress import PullProgress

    with _progress() as progress:
        bar = PullBar(progress)
        bar(PullProgress("download", "tokenizer.json", 2_000_000, 2_000_000))
        bar(PullProgress("download", "model.gguf", 2_000_000, 2_000_000))
        bar(PullProgress("convert", "model.gguf", 2, 3, unit="steps"))  # the same file's line, now in steps
    err = capsys.readouterr().err
    download, convert = (line for line in err.splitlines() if ".gguf" in line or ".json" in line)
    assert "download tokenizer.json" in download and "2.0/2.0 MB" in download
    assert "convert model.gguf" in convert and "2/3 steps" in convert
    assert "bytes" not in convert and "/s" not in convert


# ------------------------------------------------------------- the REPL in a real terminal
def test_repl_in_a_terminal_block_messages_and_ctrl_c_at_the_prompt(live):
    """`xllm run` on a pty: a \"\"\" block of several lines is one message (it was one per line), and Ctrl-C at
    the prompt drops the line and keeps the session (it ended it, exit 0, and lost the conversation)."""
    pexpect = pytest.importorskip("pexpect")
    stats = live.engine.stats
    child = pexpect.spawn(str(XLLM), ["run", TINY, "-t", "0", "--max-tokens", "2"], env=dict(os.environ),
                          encoding="utf-8", timeout=60, dimensions=(24, 200))
    try:
        child.expect(">>> ")
        before = stats(TINY).completed
        child.sendline('"""')
        child.expect_exact("... ", timeout=20)
        child.sendline("first line")
        child.expect_exact("... ", timeout=20)
        child.sendline('second line"""')
        child.expect(">>> ")
        deadline = time.monotonic() + 10
        while stats(TINY).completed == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats(TINY).completed == before + 1  # one request for the three lines
        child.send("half a line")
        child.sendintr()
        child.expect_exact("/bye or Ctrl-D exits", timeout=20)
        child.expect(">>> ")
        assert child.isalive()
        child.sendline("/?")
        child.expect_exact('"""', timeout=20)  # the help names the block syntax
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert stats(TINY).completed == before + 1  # neither the half line nor /? reached the model


def test_ps_against_a_server_that_never_answers_fails_in_time(monkeypatch):
    """A port that accepts and never answers (a stuck process): `xllm ps` says the server did not answer
    in time after the probe timeout; it waited the 300 s a generation may take."""
    import threading

    import httpx

    from xllm_jupyter.client import base

    monkeypatch.setattr(base, "PROBE_TIMEOUT", httpx.Timeout(1.0, connect=5.0), raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections are accepted by the kernel; nobody answers them
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        results: list = []
        worker = threading.Thread(target=lambda: results.append(invoke("--url", url, "ps")), daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(15)
        elapsed = time.monotonic() - started
    worker.join(15)  # closing the listener ends a request the old code was still waiting on
    assert elapsed < 10, f"`xllm ps` was still waiting after {elapsed:.0f} s"
    assert "did not answer in time" in one_error_line(results[0])


def test_a_reply_stopped_before_its_first_word_leaves_no_turn(live, monkeypatch):
    """Ctrl-C before any text came: the question and an empty answer were kept and sent with every later turn
    (SmolLM2 then rambled); now that turn is dropped, as the ChatWidget drops it."""
    sent = []

    class Interrupted(XllmClient):
        def stream_chat(self, messages, model=None, **params):
            sent.append([dict(m) for m in messages])
            if len(sent) == 1:  # the person presses Ctrl-C while the first answer is still on its way
                def stopped():
                    raise KeyboardInterrupt
                    yield ""

                return stopped()
            return super().stream_chat(messages, model, **params)

    lines = iter(["first", "second", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    with Interrupted(live.base_url, live.api_key) as backend:
        chat.interactive(backend, TINY, [], {"max_tokens": 2, "temperature": 0})
    assert [m["content"] for m in sent[1]] == ["second"]


def test_a_conversation_grown_past_the_context_says_clear_shortens_it(live, monkeypatch, capsys):
    """`xllm run`'s chat sends the whole conversation: once it outgrew the model's context every turn failed with the
    server's "reduce the length of the messages", which a chat cannot do but by /clear, and the error did not say so."""
    long = "word " * 1200  # about 1,200 tokens: one fits the tiny Llama's 2,048, two do not
    lines = iter([long * 2, long, long, "/clear", long, "/bye"])  # a first message alone too long: /clear cannot help
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    with XllmClient(live.base_url, live.api_key) as backend:
        chat.interactive(backend, TINY, [], {"max_tokens": 1, "temperature": 0})
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and all("maximum context length" in e for e in errors), errors
    assert "/clear" not in errors[0] and errors[1].endswith("(/clear forgets the conversation so far)")
