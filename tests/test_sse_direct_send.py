"""SSE events sent straight to the socket (server/sse.py socket_sender) against a real server and raw sockets:
concurrent slow readers, clients that reset mid-stream, and a second response on the same keep-alive
connection all see whole, well-framed chunks in order (no timed assertions)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from urllib.parse import urlparse

from .helpers import streamed_chat_request, wait_idle
from .server_fixtures import TINY


def _post(server, sock: socket.socket, max_tokens: int, keep_alive: bool = True) -> None:
    sock.sendall(streamed_chat_request(server, TINY, max_tokens, keep_alive=keep_alive))


class _Reader:
    """Reads one chunked HTTP/1.1 response at a time off a socket, optionally slowly."""

    def __init__(self, sock: socket.socket, pause: float = 0.0, size: int = 65536):
        self.sock, self.pause, self.size = sock, pause, size
        self.buf = b""
        self.got = 0  # bytes read so far (for the failure message)
        self.start = time.monotonic()

    def _more(self) -> None:
        if self.pause:
            time.sleep(self.pause)
        data = self.sock.recv(self.size)
        assert data, f"the server closed the connection after {self.got} bytes, {time.monotonic() - self.start:.0f} s"
        self.got += len(data)
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower()
        return head

    def chunk(self) -> bytes:
        size = int(self._line(), 16)
        data = self._take(size)
        assert self._take(2) == b"\r\n", "chunk not followed by CRLF"
        return data

    def response(self) -> list[dict]:
        """The rest of the response after its head: its chat chunks, checked, [DONE] last."""
        payload = b""
        while data := self.chunk():
            assert data.endswith(b"\n\n"), "a chunk that splits an event"
            payload += data
        assert not self.buf, "bytes after the last chunk"  # (the zero chunk's CRLF was taken by chunk())
        events = payload.split(b"\n\n")[:-1]
        assert events[-1] == b"data: [DONE]"
        return [json.loads(e[len(b"data: "):]) for e in events[:-1]]


def _check(chunks: list[dict], max_tokens: int) -> None:
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["id"] == chunks[0]["id"] for c in chunks)


def _connect(server, rcvbuf: int | None = None) -> socket.socket:
    url = urlparse(server.root)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # (before connect: the window is set then)
    sock.settimeout(120)
    sock.connect((url.hostname, url.port))
    return sock


def test_slow_readers_resetting_clients_and_keep_alive_reuse_at_once(xllm_server, monkeypatch):
    """Slow readers (tiny receive windows: the server's sends come back partial or refused), clients that reset
    mid-stream, and fast readers that reuse their connection for a second stream, all at the same time."""
    from xllm_jupyter.server import sse

    sends: list[tuple[int, int]] = []  # (taken, offered) per direct send; -1: refused or failed
    real_sender = sse.socket_sender

    def recording_sender(stream):
        send = real_sender(stream)
        if send is None:
            return None

        def recorded(data: bytes) -> int:
            try:
                taken = send(data)
            except OSError:
                sends.append((-1, len(data)))
                raise
            sends.append((taken, len(data)))
            return taken
        return recorded

    monkeypatch.setattr(sse, "socket_sender", recording_sender)
    engine = xllm_server.engine
    assert wait_idle(engine)
    cancelled = engine.stats().cancelled
    errors: list[BaseException] = []
    results: dict[str, list] = {"slow": [], "reuse": [], "reset": []}

    def slow(tokens: int) -> None:
        with _connect(xllm_server, rcvbuf=2048) as sock:
            _post(xllm_server, sock, tokens)
            reader = _Reader(sock, pause=0.002, size=512)
            reader.head()
            results["slow"].append((reader.response(), tokens))

    def reuse(tokens: int) -> None:
        with _connect(xllm_server) as sock:
            reader = _Reader(sock)
            for _ in range(2):  # the second response on the same connection must start clean
                _post(xllm_server, sock, tokens)
                reader.head()
                results["reuse"].append((reader.response(), tokens))

    def reset() -> None:
        with _connect(xllm_server) as sock:
            _post(xllm_server, sock, 1900)
            reader = _Reader(sock)
            reader.head()
            for _ in range(3):
                reader.chunk()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        results["reset"].append(True)

    def guarded(target, *args):
        def run():
            try:
                target(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append((target.__name__, exc))
        return threading.Thread(target=run)

    threads = [guarded(slow, 300) for _ in range(3)] + [guarded(reuse, 40) for _ in range(3)]
    threads += [guarded(reset) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(results["slow"]) == 3 and len(results["reuse"]) == 6 and len(results["reset"]) == 3
    for chunks, tokens in results["slow"] + results["reuse"]:
        _check(chunks, tokens)
    assert sends and any(taken == offered for taken, offered in sends)  # the direct path was taken
    print("direct sends:", len(sends), "partial:", sum(0 < t < o for t, o in sends), "refused/failed:",
          sum(t <= 0 for t, _ in sends))
    assert wait_idle(engine), engine.stats()
    assert engine.stats().cancelled >= cancelled + 3, (cancelled, engine.stats())  # the reset clients' were stopped
    # and the server still streams whole responses afterwards
    with _connect(xllm_server) as sock:
        _post(xllm_server, sock, 12, keep_alive=False)
        reader = _Reader(sock)
        reader.head()
        _check(reader.response(), 12)


def test_an_event_sent_to_a_reset_connection_tells_the_writer_the_client_left():
    """The client reset the connection and the loop has not noticed yet: the next event's send fails (the direct
    send, then IOStream.write's), the stream closes, and the writer reports the client gone (on_closed runs,
    write_all returns False) instead of a stream that ended well."""
    import asyncio

    from tornado.iostream import IOStream

    from xllm_jupyter.server.sse import EventStreamWriter, socket_sender

    class Handler:  # what the writer uses of a RequestHandler once the headers are out
        def __init__(self):
            self._write_buffer: list[bytes] = []

        def write(self, data: bytes) -> None:
            self._write_buffer.append(data)

    async def events():
        for i in range(3):
            await asyncio.sleep(0)  # not ready at once: each event is pushed while the writer waits for the next
            yield {"i": i}

    failures: list[OSError] = []

    async def run() -> tuple[bool, int, bool]:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        listener.close()
        stream = IOStream(server_side)
        handler = Handler()
        left: list[bool] = []
        writer = EventStreamWriter(handler, 0, lambda: left.append(True))
        send = socket_sender(stream)
        assert send is not None

        def recorded(data: bytes) -> int:
            try:
                return send(data)
            except OSError as exc:
                failures.append(exc)
                raise

        writer._direct, writer._send = stream, recorded  # noqa: SLF001 - as push() sets them after the headers
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # an RST, which the server side meets on its next send
        ok = await writer.write_all(events())
        writer.close()
        closed = stream.closed()
        stream.close()
        return ok, len(left), closed

    ok, left, closed = asyncio.run(run())
    assert failures and isinstance(failures[0], (ConnectionResetError, BrokenPipeError))  # the direct send met it
    assert closed
    assert left == 1
    assert ok is False


async def test_over_tls_events_go_through_the_ssl_stream_and_arrive_whole(tmp_path):
    """A TLS connection (Jupyter with --certfile) must never get the raw socket send: the events would leave
    unencrypted and break the TLS record stream. Real TLS server and client: every event arrives, in order."""
    import asyncio
    import ssl
    import subprocess

    from tornado.httpserver import HTTPServer
    from tornado.iostream import SSLIOStream
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from xllm_jupyter.server.sse import SSE_HEADERS, EventStreamWriter

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    writers: list[EventStreamWriter] = []

    class Events(RequestHandler):
        async def get(self) -> None:
            for name, value in SSE_HEADERS.items():
                self.set_header(name, value)
            writer = EventStreamWriter(self, 0, lambda: None)
            writers.append(writer)

            async def chunks():
                for i in range(60):
                    await asyncio.sleep(0)  # each pushed on its own, as tokens are
                    yield {"i": i, "pad": "x" * 400}

            await writer.write_all(chunks())
            writer.close()
            self.finish()

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server = HTTPServer(Application([("/events", Events)]), ssl_options=server_ctx)
    server.add_sockets(sockets)

    def fetch() -> list[dict]:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=60) as plain:
            with ctx.wrap_socket(plain) as sock:
                sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reader = _Reader(sock)
                reader.head()
                payload = b""
                while data := reader.chunk():
                    payload += data
                events = payload.split(b"\n\n")[:-1]
                assert events[-1] == b"data: [DONE]"
                return [json.loads(e[len(b"data: "):]) for e in events[:-1]]

    try:
        got = await asyncio.get_running_loop().run_in_executor(None, fetch)
    finally:
        server.stop()
        await server.close_all_connections()
    assert [c["i"] for c in got] == list(range(60)) and all(c["pad"] == "x" * 400 for c in got)
    (writer,) = writers
    assert isinstance(writer._direct, SSLIOStream) and writer._send is None  # noqa: SLF001 - chunks via SSLIOStream.write
