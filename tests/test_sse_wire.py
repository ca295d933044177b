"""SSE bytes on the wire, read over a plain socket: HTTP/1.1 chunk framing (events written
straight to the stream after the headers) and HTTP/1.0 (no chunking, the ordinary flush)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

from .server_fixtures import TINY


def _request(server, version: str, max_tokens: int) -> bytes:
    """POST a streamed chat over a raw socket; the whole response as bytes."""
    body = json.dumps({
        "model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    url = urlparse(server.root)
    head = (f"POST /v1/chat/completions {version}\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(head + body)
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
