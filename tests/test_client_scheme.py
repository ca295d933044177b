"""A URL of the wrong scheme says so: https:// against a plain HTTP server, http:// against a TLS one."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading

import httpx
import pytest
from click.testing import CliRunner
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from tests.server_fixtures import TINY, loop_thread
from xllm_jupyter.cli.main import main
from xllm_jupyter.client import AsyncXllmClient, XllmClient
from xllm_jupyter.client.base import ServerUnavailable, WrongScheme

#: the TLS handshake against a plain server never ends: a short connect timeout makes that a fast failure
QUICK = httpx.Timeout(10.0, connect=1.0)


class Health(RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


def _serving(ssl_options: ssl.SSLContext | None):
    async def setup() -> tuple[HTTPServer, int]:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([("/health", Health)]), ssl_options=ssl_options)
        server.add_sockets(sockets)
        return server, sockets[0].getsockname()[1]

    return loop_thread(setup, "a test HTTP server", 30)


def _errors(url: str) -> list[ServerUnavailable]:
    out = []
    with XllmClient(url, timeout=QUICK) as client, pytest.raises(ServerUnavailable) as sync:
        client.health()
    out.append(sync.value)

    async def probe() -> None:
        async with AsyncXllmClient(url, timeout=QUICK) as client:
            await client.health()

    with pytest.raises(ServerUnavailable) as aio:
        asyncio.run(probe())
    return [*out, aio.value]


def test_https_against_a_plain_http_server_says_use_http():
    # the server reads the TLS hello as the start of a request and waits: "did not answer in time" and nothing more
    with _serving(None) as (_loop, (_server, port)):
        assert XllmClient(f"http://127.0.0.1:{port}", timeout=QUICK).health() == {"status": "ok"}
        for error in _errors(f"https://127.0.0.1:{port}"):
            assert isinstance(error, WrongScheme) and "use http://" in error.message, error.message


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_http_against_a_tls_server_says_use_https(tmp_path, xllm_home, monkeypatch):
    # a TLS server resets a plain request: read as "closed the connection … (did it stop or restart?)", and
    # `xllm run` said "No xllm server at URL" while running the model in-process
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    with _serving(ctx) as (_loop, (_server, port)):
        for error in _errors(f"http://127.0.0.1:{port}"):
            assert isinstance(error, WrongScheme) and "use https://" in error.message, error.message
        monkeypatch.setenv("XLLM_HOME", str(xllm_home))
        monkeypatch.delenv("XLLM_CONFIG", raising=False)
        result = CliRunner().invoke(main, ["--url", f"http://127.0.0.1:{port}/v1", "run", TINY, "hi", "-t", "0",
                                           "--max-tokens", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "use https://" in result.stderr and "in this process" in result.stderr and "No xllm server" not in result.stderr


def test_http_answered_with_a_tls_alert_says_use_https():
    # some TLS servers answer a plain request with an alert record: not an HTTP status line
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        for _ in range(2):  # the sync client's request, then the async one's
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"\x15\x03\x01\x00\x02\x02\x46")  # fatal alert: protocol_version

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        for error in _errors(f"http://127.0.0.1:{port}"):
            assert isinstance(error, WrongScheme) and "use https://" in error.message, error.message
    finally:
        thread.join(10)
        listener.close()


def test_a_plain_http_stream_reset_mid_answer_is_no_scheme_problem():
    # the server answered in HTTP (headers and a first chunk), then reset the connection (killed, a proxy gave up):
    # "if it serves HTTPS, use https://" sent the user to change a URL that had just worked
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got_first = threading.Event()
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'

    def answer() -> None:
        for _ in range(2):  # the sync client's stream, then the async one's
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(event), event))
                got_first.wait(30)  # the client has the first chunk: now reset (linger 0 sends RST)
                got_first.clear()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    errors: list[ServerUnavailable] = []
    try:
        with XllmClient(url, timeout=QUICK) as client, pytest.raises(ServerUnavailable) as sync:
            for _chunk in client.stream_chunks([{"role": "user", "content": "hi"}], "m"):
                got_first.set()
        errors.append(sync.value)

        async def stream() -> None:
            async with AsyncXllmClient(url, timeout=QUICK) as client:
                async for _chunk in client.stream_chunks([{"role": "user", "content": "hi"}], "m"):
                    got_first.set()

        with pytest.raises(ServerUnavailable) as aio:
            asyncio.run(stream())
        errors.append(aio.value)
    finally:
        got_first.set()
        thread.join(10)
        listener.close()
    for error in errors:
        assert not isinstance(error, WrongScheme) and "https://" not in error.message, error.message
        assert "stop or restart" in error.message, error.message
