"""Small helpers several test modules share (kept here so there is one copy of each)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse


class Clock:
    """A clock the test moves by hand (``clock.now += seconds``), for code that takes a ``clock`` callable."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A TCP port nothing listens on right now (for "no server there" checks and subprocess servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_idle(engine: Any, timeout: float = 60.0) -> bool:
    """Poll until nothing runs or waits (generous: what the tests tell apart is counted, not timed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.queued == 0:
            return True
        time.sleep(0.02)
    return False


def streamed_chat_request(server: Any, model: str, max_tokens: int, version: str = "HTTP/1.1",
                          keep_alive: bool = False) -> bytes:
    """The bytes of a streamed greedy chat POST (usage included) to ``server`` (a test server's info), for raw sockets."""
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    url = urlparse(server.root)
    return (f"POST /v1/chat/completions {version}\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode() + body


def changed_copy(model: Path, dest: Path) -> Path:
    """``dest``: a copy of the model folder ``model`` with one file more (another digest, still a loadable model)."""
    dest.mkdir()
    for f in model.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    (dest / "extra.json").write_text("{}")
    return dest


def is_json(text: str) -> bool:
    """Whether ``text`` parses as JSON (a tool call's arguments: complete, or cut short)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def assembled(stream: Any) -> dict:
    """A streamed chat completion (the openai SDK's chunks) put together as the whole completion's dict."""
    from xllm_jupyter.openai.chat_assembly import CompletionAssembler

    done = CompletionAssembler()
    for chunk in stream:
        done.add(chunk.model_dump(exclude_unset=True))
    return done.completion()


def dirs_in(path: Path) -> list[str]:
    """The names of the folders directly in ``path``, sorted ([] when ``path`` is no folder)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


@contextlib.contextmanager
def public_site_recorder(monkeypatch: Any) -> Iterator[tuple[str, list[str]]]:
    """(base URL, paths it was asked for) of a local HTTP site that Gradio's URL checks take for a public one:
    a stand-in for any site on the web that a reply's URL could tell something to."""
    import http.server
    import threading

    import safehttpx

    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"png")

        def log_message(self, *args: object) -> None:
            pass

    async def as_if_public(host: str) -> str:
        return "127.0.0.1"

    monkeypatch.setattr(safehttpx, "async_validate_url", as_if_public)
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{site.server_port}", hits
    finally:
        site.shutdown()
        site.server_close()


@contextlib.contextmanager
def json_answering_server(status: int, body: bytes) -> Iterator[int]:
    """A real HTTP server on an ephemeral port answering every GET and POST with ``status`` and the JSON ``body``
    (a stand-in for a hub API that refuses); yields its port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answering(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815 (http.server's name)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
