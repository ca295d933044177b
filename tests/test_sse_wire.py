"""SSE bytes on the wire, read over a plain socket: HTTP/1.1 chunk framing (events written
straight to the stream after the headers) and HTTP/1.0 (no chunking, the ordinary flush)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

from .helpers import streamed_chat_request
from .server_fixtures import TINY


def _request(server, version: str, max_tokens: int) -> bytes:
    """POST a streamed chat over a raw socket; the whole response as bytes."""
    url = urlparse(server.root)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(streamed_chat_request(server, TINY, max_tokens, version))
        parts = []
        while data := sock.recv(65536):
            parts.append(data)
    return b"".join(parts)


def _dechunk(body: bytes) -> tuple[bytes, int]:
    """Decode chunked transfer encoding strictly; (payload, number of chunks)."""
    out, pos, count = [], 0, 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        start = eol + 2
        assert body[start + size : start + size + 2] == b"\r\n", "chunk not followed by CRLF"
        if size == 0:
            assert body[start:] == b"\r\n", "bytes after the last chunk"
            return b"".join(out), count
        out.append(body[start : start + size])
        count += 1
        pos = start + size + 2


def _events(payload: bytes) -> list[str]:
    assert payload.endswith(b"\n\n")
    return [e.decode() for e in payload.split(b"\n\n")[:-1]]


def _check_chat_events(events: list[str], max_tokens: int) -> None:
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_http11_stream_is_well_formed_chunks(xllm_server):
    raw = _request(xllm_server, "HTTP/1.1", 12)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    payload, chunks = _dechunk(body)
    events = _events(payload)
    _check_chat_events(events, 12)
    assert chunks >= 2  # events left as they were made, not in one piece at the end
    for piece in body.split(b"\r\n"):  # no chunk splits an event: each chunk ends on an event boundary
        if piece.startswith(b"data: "):
            assert piece.endswith(b"\n\n")


def test_http10_stream_without_chunking(xllm_server):
    raw = _request(xllm_server, "HTTP/1.0", 9)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200"
    assert b"transfer-encoding" not in head.lower()
    _check_chat_events(_events(body), 9)


def test_partial_socket_sends_leave_every_byte_in_order():
    """Events go straight to the socket while nothing is queued, the rest through the IOStream: with a
    reader that takes nothing for a while (small socket buffers, sends coming back partial or refused)
    every chunk still arrives whole and in order, and the stream's byte counters (what stalls.bytes_sent
    reads) count each byte once."""
    import asyncio
    import time

    from tornado.iostream import IOStream

    from xllm_jupyter.server.sse import EventStreamWriter, socket_sender

    class Handler:  # what the writer uses of a RequestHandler once the headers are out
        def __init__(self):
            self._write_buffer: list[bytes] = []

        def write(self, data: bytes) -> None:
            self._write_buffer.append(data)

    events = [b"data: " + (b"%05d" % i) * (20 + i % 300) + b"\n\n" for i in range(200)]

    async def run() -> tuple[bytes, int, int, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        reader = socket.create_connection(listener.getsockname())
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_side, _ = listener.accept()
        listener.close()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = IOStream(server_side)
        handler = Handler()
        writer = EventStreamWriter(handler, 0, lambda: None)
        writer._direct, writer._send = stream, socket_sender(stream)  # noqa: SLF001 - as push() sets them after the headers
        assert writer._send is not None  # noqa: SLF001
        received = bytearray()

        def read_all() -> None:
            time.sleep(0.3)  # nothing read meanwhile: the buffers fill and sends come back partial or refused
            while data := reader.recv(1 << 16):
                received.extend(data)

        reading = asyncio.get_running_loop().run_in_executor(None, read_all)
        for event in events:
            handler.write(event)
            writer.push()
            await asyncio.sleep(0.002)
        await writer.drain()
        writer.close()
        counts = stream._total_write_index, stream._total_write_done_index  # noqa: SLF001
        stream.close()
        await asyncio.wait_for(reading, 30)
        reader.close()
        return bytes(received), *counts, len(received)

    received, queued, done, total = asyncio.run(run())
    payload, chunks = _dechunk(received + b"0\r\n\r\n")
    assert payload == b"".join(events) and chunks == len([c for c in _chunk_sizes(received)])
    assert queued == done == total  # every byte counted once, whichever way it left


def _chunk_sizes(body: bytes) -> list[int]:
    """The sizes of the HTTP chunks in ``body`` (no terminating chunk)."""
    sizes, pos = [], 0
    while pos < len(body):
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        sizes.append(size)
        pos = eol + 2 + size + 2
    return sizes

def test_socket_sender_only_for_a_plain_tcp_stream():
    """The raw socket send is used for a plain IOStream only (TLS and other streams keep IOStream.write)."""
    from tornado.iostream import IOStream, SSLIOStream

    from xllm_jupyter.server.sse import socket_sender

    a, b = socket.socketpair()
    with a, b:
        plain = IOStream(a)
        assert socket_sender(plain) == a.send
        tls = SSLIOStream.__new__(SSLIOStream)  # (not connected: only its type matters)
        tls.socket = b
        assert socket_sender(tls) is None
        assert socket_sender(object()) is None
