"""%%xllm through a real IPython InteractiveShell against the live server."""

from __future__ import annotations

import time

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from tests.server_fixtures import TINY
from xllm_jupyter.client import XllmClient
from xllm_jupyter.magics import XllmMagics, interpolate


@pytest.fixture
def shell(xllm_server, monkeypatch):
    """IPython with `%load_ext xllm_jupyter`, pointed at the live server like a kernel would be."""
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "xllm_jupyter")
    yield ip
    for name in ("topic", "answer"):
        ip.user_ns.pop(name, None)


def expected(server, prompt: str, max_tokens: int, system: str | None = None) -> str:
    """What the server answers for ``prompt`` (greedy, so the magic must show exactly this)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with XllmClient(server.base_url, server.api_key) as c:
        return c.chat(messages, TINY, temperature=0, max_tokens=max_tokens)


def final_markdown(cap) -> str:
    """The text/markdown of the last display update."""
    rich = [o for o in cap.outputs if "text/markdown" in o.data]
    assert rich, "the magic displayed nothing"
    return rich[-1].data["text/markdown"]


def test_interpolate_keeps_unknown_names():
    ns = {"topic": "cats", "n": 3}
    assert interpolate("Tell me about {topic} in {n} lines, {unknown}!", ns) == "Tell me about cats in 3 lines, {unknown}!"
    assert interpolate("{missing:>5} {missing.attr} {missing[0]}", {}) == "{missing:>5} {missing.attr} {missing[0]}"
    # not a template (code with braces): sent untouched
    assert interpolate("def f(): return {}", ns) == "def f(): return {}"
    assert interpolate("unbalanced { brace", ns) == "unbalanced { brace"
    assert interpolate("{{literal}} {topic}", ns) == "{literal} cats"


def test_cell_streams_markdown_with_interpolation(shell, xllm_server):
    shell.user_ns["topic"] = "dogs"
    with capture_output() as cap:
        result = shell.run_cell_magic("xllm", f"-m {TINY} -t 0 --max-tokens 24", "Write about {topic} and {nobody}\n")
    assert result is None  # nothing noisy echoed as Out[]
    # the server saw "{topic}" filled and "{nobody}" kept as-is
    assert final_markdown(cap) == expected(xllm_server, "Write about dogs and {nobody}", 24)
    updates = [o for o in cap.outputs if o.update]
    assert cap.outputs[0].update is False and updates, "expected one display, then in-place updates"
    assert cap.stderr == ""


def test_default_model_system_prompt_and_out_variable(shell, xllm_server):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-s 'You are terse.' -t 0 --max-tokens 6 -o answer", "Hello")
    want = expected(xllm_server, "Hello", 6, system="You are terse.")
    assert final_markdown(cap) == want
    assert shell.user_ns["answer"] == want


def test_line_magic(shell, xllm_server):
    with capture_output() as cap:
        shell.run_line_magic("xllm", f"-m {TINY} -t 0 --max-tokens 5 Say hi")
    assert final_markdown(cap) == expected(xllm_server, "Say hi", 5)


def test_terminal_ipython_prints_text(shell, xllm_server, capsys):
    # a plain InteractiveShell has no updatable displays: the answer is printed as it streams
    shell.run_cell_magic("xllm", f"-m {TINY} -t 0 --max-tokens 5", "Say hi")
    assert capsys.readouterr().out == expected(xllm_server, "Say hi", 5) + "\n"


def test_errors_are_short_messages(shell):
    with capture_output() as cap:
        result = shell.run_cell_magic("xllm", "-m no-such-model", "hi")
    assert result is None
    assert cap.stderr.strip() == "xllm: The model 'no-such-model' does not exist"
    assert "Traceback" not in cap.stdout + cap.stderr
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} -t 9", "hi")
    assert cap.stderr.startswith("xllm: ") and "temperature" in cap.stderr
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY}", "   \n")
    assert "nothing to ask" in cap.stderr


def test_no_server_is_a_short_message(shell, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("XLLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY}", "hi")
    assert cap.stderr.startswith("xllm: no xllm server at")


def test_interrupt_closes_the_stream_and_the_server_cancels(shell, xllm_server, monkeypatch):
    """Ctrl-C in the middle of a stream: "(interrupted)" shows and the server cancels the job."""
    real = XllmClient.stream_chat

    def interrupted_after_three(self, *args, **kw):
        stream = real(self, *args, **kw)
        for i, piece in enumerate(stream):
            if i == 3:
                raise KeyboardInterrupt  # what SIGINT does inside a blocking read
            yield piece

    monkeypatch.setattr(XllmClient, "stream_chat", interrupted_after_three)
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} --max-tokens 1500", "Tell me a long story")
    assert final_markdown(cap).endswith("*(interrupted)*")
    deadline = time.monotonic() + 10
    while engine.stats(TINY).cancelled <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats(TINY).cancelled > before


def test_magics_class_registers(shell):
    assert "xllm" in shell.magics_manager.magics["cell"]
    assert "xllm" in shell.magics_manager.magics["line"]
    assert any(isinstance(m, XllmMagics) for m in shell.magics_manager.registry.values())


def test_in_a_real_kernel(xllm_server, monkeypatch):
    """A real ipykernel (via nbclient): the answer arrives as Markdown display data, updated in place."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)  # what the extension exports
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext xllm_jupyter\ntopic = 'owls'"),
        nbformat.v4.new_code_cell(f"%%xllm -m {TINY} -t 0 --max-tokens 16\nA poem about {{topic}}"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[1].outputs
    assert [o.output_type for o in outputs] == ["display_data"], outputs
    # nbclient applies update_display_data to the original output, so it holds the final text
    assert outputs[0].data["text/markdown"] == expected(xllm_server, "A poem about owls", 16)
    assert nb.cells[1].execution_count is not None
