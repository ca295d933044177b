"""Clients that stop reading their answer, through a real standalone server.

Generation never waits for a reader, so a client that keeps its socket open and reads
nothing would otherwise hold its request (slots, quota, memory for every event) forever.
``server.connection_timeout_seconds`` (1 s here) bounds how long a pending write may go
without the socket taking a byte; a slow reader that keeps reading is served to the end.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server

#: n x max_tokens x top_logprobs: several MB of events, more than loopback's socket buffers hold
BIG = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "n": 4, "max_tokens": 1500,
       "logprobs": True, "top_logprobs": 20, "temperature": 1.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stall_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server that drops a connection whose client read nothing for 1 s."""
    with running_server(make_test_config(xllm_home, connection_timeout_seconds=1.0), tiny_catalog, TINY) as info:
        yield info


def _send(info: Any, body: dict[str, Any]) -> socket.socket:
    """A raw connection that sent ``body`` and reads nothing (a small receive buffer)."""
    port = int(info.root.rsplit(":", 1)[1])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + API_KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


def _in_flight(info: Any) -> float:
    """Requests the server is handling, the metrics request itself not counted."""
    text = httpx.get(info.root + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return float(re.search(r"^xllm_requests_in_flight (\S+)$", text, re.M).group(1)) - 1


def _read_to_end(s: socket.socket, timeout: float = 10) -> tuple[bytes, bool]:
    """Everything the socket still gives, and whether the server closed it (False: it went quiet)."""
    s.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := s.recv(1 << 20):
            got += chunk
    except TimeoutError:
        return bytes(got), False
    except ConnectionResetError:
        pass
    return bytes(got), True


def _wait_idle(info: Any, seconds: float = 200) -> bool:
    """Poll until nothing is in flight or running (the deadline is generous: a loaded CI machine generates
    an unread answer's several MB of logprobs in minutes, not the ~10 s it takes when idle)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _in_flight(info) == 0 and not info.engine.stats().running:
            return True
        time.sleep(0.5)
    return False


def test_a_stream_nobody_reads_is_dropped_and_its_generation_cancelled(stall_server):
    s = _send(stall_server, {**BIG, "stream": True})
    try:
        # before the fix the handler waited for the socket forever, holding the request after its generation
        assert _wait_idle(stall_server), "the unread stream still holds its request"
        got, closed = _read_to_end(s)
    finally:
        s.close()
    assert closed and got.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in got
    assert httpx.get(stall_server.root + "/health", timeout=10).status_code == 200  # and it serves on


def test_an_answer_nobody_reads_is_dropped(stall_server):
    s = _send(stall_server, BIG)
    try:
        assert _wait_idle(stall_server)
        time.sleep(2.5)  # the answer sits unsent past the timeout
        got, closed = _read_to_end(s)
    finally:
        s.close()
    # a large answer goes out chunked (server/json_pieces.py): closed before its last chunk
    assert closed and got.startswith(b"HTTP/1.1 200") and not got.endswith(b"0\r\n\r\n"), (closed, got[-20:])


def test_a_slow_reader_that_keeps_reading_is_not_dropped(stall_server):
    s = _send(stall_server, {**BIG, "stream": True})
    got = bytearray()
    try:
        s.settimeout(10)
        started = time.monotonic()
        while time.monotonic() - started < 8:  # far slower than generation: the server's writes wait on us
            chunk = s.recv(8192)
            assert chunk, "the server closed a connection whose client kept reading"
            got += chunk
            time.sleep(0.2)
        assert _in_flight(stall_server) == 1  # still being served
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in got  # it was far from done


def test_a_watch_that_cannot_count_bytes_sent_cuts_no_one():
    import asyncio

    from xllm_jupyter.server.stalls import StallWatch, bytes_sent

    class Bare:  # a handler whose connection has no byte count (another server, a changed Tornado)
        request = None

    async def watch() -> StallWatch:
        return StallWatch(Bare(), 0.2, lambda: True)

    w = asyncio.run(watch())
    assert bytes_sent(Bare()) is None and w._timer is None and not w.stalled  # noqa: SLF001 - never armed
