"""Text the CLI did not write (a stored manifest, a model's reply, a file name) never drives the terminal.

A manifest in a shared store, a Hub repo's chat template or a prompt-injected reply can hold rich
markup (``[/x]`` raised MarkupError: `xllm list` crashed; ``[link=...]`` drew a hyperlink) and escape
sequences (``ESC ]0;`` retitles the window, ``ESC ]52;`` writes the clipboard, ``CR`` hides what came
before on the line). Tables read no markup and show control characters as symbols; text echoed to a
terminal shows them as symbols too, while a pipe or file gets it byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from xllm_jupyter.cli.chat import stream_reply
from xllm_jupyter.cli.main import main
from xllm_jupyter.cli.render import terminal_safe
from xllm_jupyter.store import ModelStore
from xllm_jupyter.store.manifest import MANIFEST_NAME

HOSTILE = "local:/m [/x] [link=https://evil.example]here[/link] \x1b]0;pwned\x07 \x1b]52;c;cm0gLXJmIH4=\x07 ok"
TEMPLATE = "{{ messages }}\x1b[2J\rrm -rf ~\x08\x08"


@pytest.fixture
def hostile_home(tmp_path, tiny_llama_dir, monkeypatch):
    """A store holding a model whose manifest says hostile things."""
    home = tmp_path / "home"
    manifest = ModelStore(home).pull(str(tiny_llama_dir), "hostile")
    path = Path(manifest.path) / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(source=HOSTILE, template=TEMPLATE, parameters={"note": "[bold]\x1b[5mblink"})
    path.write_text(json.dumps(data))
    monkeypatch.setenv("XLLM_HOME", str(home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    return home


def test_xllm_list_shows_markup_and_escapes_as_text(hostile_home):
    result = CliRunner().invoke(main, ["list"], catch_exceptions=False, color=True)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "\x1b]" not in out
    joined = "".join(out.split())  # the SOURCE column folds a long value over lines
    assert "[/x]" in joined and "[link=https://evil.example]here[/link]" in joined  # as written, not read as markup
    assert "␛]0;pwned␇" in joined
    assert out.splitlines()[1].split()[:2] == ["hostile", "safetensors"]  # the long source cut neither


def _in_a_terminal(*args: str, env: dict[str, str]) -> str:
    """The output of ``xllm ARGS`` run with a pseudo-terminal as stdout."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xllm_jupyter.cli", *args], stdout=slave, stderr=subprocess.PIPE,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read().decode()
    return b"".join(chunks).decode("utf-8", "replace")


def test_xllm_show_in_a_terminal_acts_on_no_escape_but_a_pipe_keeps_every_byte(hostile_home):
    env = {**os.environ, "XLLM_HOME": str(hostile_home)}
    shown = _in_a_terminal("show", "hostile", env=env)
    assert "\x1b" not in shown and "\x08" not in shown
    assert "␛]52;c;cm0gLXJmIH4=␇" in shown and "[bold]␛[5mblink" in shown
    assert "{{ messages }}␛[2J" in shown and "rm -rf ~␈␈" in shown  # the excerpt's lines split at the CR
    template = _in_a_terminal("show", "hostile", "--template", env=env)
    assert "\x1b" not in template and "␛[2J␍rm -rf ~" in template
    piped = subprocess.run([sys.executable, "-m", "xllm_jupyter.cli", "show", "hostile", "--template"], env=env,
                           capture_output=True, check=True)
    assert piped.stdout.rstrip(b"\n").endswith(b"\rrm -rf ~\x08\x08")  # a file gets the template as stored


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Backend:
    """A chat backend whose reply is a prompt injection's escape sequences, split across chunks."""

    def stream_chat(self, messages, model, **params):
        def pieces():
            yield from ("Sure.\x1b]5", "2;c;ZXZpbA==\x07 \x1b[8mhidden", "\x1b[0m\r\nnext\x9b31m")

        return pieces()


def test_a_streamed_reply_on_a_terminal_sends_no_escape_sequence(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    text, interrupted = stream_reply(_Backend(), [], "m", {})
    shown = terminal.getvalue()
    assert not interrupted and text.startswith("Sure.\x1b]52")  # the reply itself (history) is kept as sent
    assert "\x1b" not in shown and "\x9b" not in shown and "\r" not in shown
    assert shown == "Sure.␛]52;c;ZXZpbA==␇ ␛[8mhidden␛[0m\nnext\ufffd31m\n"


def test_terminal_safe_keeps_text_tabs_and_newlines():
    plain = "héllo\tworld\n— ✓ 中文 $x$ [a](b)"
    assert terminal_safe(plain) == plain


@contextlib.contextmanager
def _error_server(status: int, message: str):
    """A server answering every GET and POST with ``status`` and an OpenAI error body of ``message``: its base URL."""
    import http.server
    import threading

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "model_not_found" if status == 404 else None}}).encode()

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815 - http.server's name

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_servers_error_message_reaches_the_terminal_without_escapes(monkeypatch):
    with _error_server(404, "no \x1b]52;c;ZXZpbA==\x07 such \x1b[2J model") as url:
        result = CliRunner().invoke(main, ["--url", url, "ps"])
    assert result.exit_code == 1 and "such" in result.output, result.output
    assert "\x1b" not in result.output and "␛]52;c;ZXZpbA==␇" in result.output


def test_the_interactive_chats_error_line_acts_on_no_escape(monkeypatch, capsys):
    """`xllm run`'s chat writes a failed turn's error and goes on; the server's message went to the terminal as sent,
    its escape sequences acting there (the one-line errors of every other command show them as symbols)."""
    from xllm_jupyter.cli import chat
    from xllm_jupyter.client import XllmClient

    lines = iter(["hi", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    with _error_server(400, "bad \x1b]0;pwned\x07 turn\x1b[2J") as url, XllmClient(url, "") as client:
        chat.interactive(client, "m", [], {})
    err = capsys.readouterr().err
    assert "Error: bad ␛]0;pwned␇ turn␛[2J" in err and "\x1b" not in err, err


def test_loading_a_model_named_with_markup_shows_the_name(monkeypatch, capsys):
    """`xllm run NAME` on a terminal spins "Loading NAME…" while the model loads: the name went in as rich markup, so
    `xllm run '[/x]'` ended in a MarkupError traceback before the server was asked, and `[bold]` vanished."""
    from xllm_jupyter.cli.chat import load_with_status

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich takes stderr for a terminal, and one that draws the spinner:
    monkeypatch.setenv("TERM", "xterm")  # not TERM=dumb (a CI runner's), where rich shows a transient status nowhere
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    asked = []

    class Loading:
        def load(self, name):
            asked.append(name)

    for name in ("[/x]", "[bold]m \x1b]0;t\x07"):
        load_with_status(Loading(), name)
    assert asked == ["[/x]", "[bold]m \x1b]0;t\x07"]
    err = capsys.readouterr().err
    assert "Loading [/x]" in err and "Loading [bold]m ␛]0;t␇" in err and "\x1b]0;" not in err
