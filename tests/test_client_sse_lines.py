"""The client reads event-stream lines as the SSE spec splits them: at CR, LF or CRLF, and nowhere else.

httpx's ``iter_lines`` (which the clients used) splits like ``str.splitlines``: a streamed piece of text holding a
raw U+2028 or U+0085 (the server writes non-ASCII unescaped) cut its JSON in two, a "malformed stream event"; and a
line ended by a bare CR waited for more bytes, so a server ending lines in CR had its last piece held.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import pytest

from xllm_jupyter.client import AsyncXllmClient, XllmClient
from xllm_jupyter.client.sse_lines import SSELines


def _chunk(content: str, finish: str | None = None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


def _event(obj: dict, end: bytes) -> bytes:
    # as the server writes them: compact, non-ASCII unescaped
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + end + end


@pytest.fixture
def sse_server():
    """A real HTTP server streaming what the test sets: ``first`` at once, the rest once ``go`` is set (or after
    60 s, then ``waited_out`` says the client needed more bytes to read the first)."""
    state = {"first": b"", "rest": b"", "go": threading.Event(), "waited_out": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.end_headers()
            self.wfile.write(state["first"])
            self.wfile.flush()
            if not state["go"].wait(60):
                state["waited_out"].append(True)
            self.wfile.write(state["rest"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    state["go"].set()
    server.shutdown()
    server.server_close()


def test_text_with_unicode_line_separators_streams_whole(sse_server):
    text = "one\u2028two\u2029three\x85four"
    sse_server["first"] = _event(_chunk(text), b"\n") + _event(_chunk("", "stop"), b"\n") + b"data: [DONE]\n\n"
    sse_server["go"].set()
    with XllmClient(sse_server["url"], "") as c:
        assert "".join(c.stream_chat("hi", "m")) == text

    async def main():
        async with AsyncXllmClient(sse_server["url"], "") as c:
            return "".join([piece async for piece in c.stream_chat("hi", "m")])

    assert asyncio.run(main()) == text


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_line_ended_by_a_bare_cr_is_read_before_more_bytes_come(sse_server, asynchronous):
    first = _event(_chunk("Hel"), b"\r")
    sse_server["first"] = first[:-1]  # its data line's CR: the blank line that ends the event comes with the rest
    sse_server["rest"] = b"\r" + _event(_chunk("lo", "stop"), b"\r") + b"data: [DONE]\r\r"
    pieces: list[str] = []

    def seen(piece: str) -> None:
        pieces.append(piece)
        if piece == "Hel":
            sse_server["go"].set()  # the rest of the stream comes only once the first piece was read

    if asynchronous:
        async def main():
            async with AsyncXllmClient(sse_server["url"], "") as c:
                async for piece in c.stream_chat("hi", "m"):
                    seen(piece)

        asyncio.run(main())
    else:
        with XllmClient(sse_server["url"], "") as c:
            for piece in c.stream_chat("hi", "m"):
                seen(piece)
    assert pieces == ["Hel", "lo"] and sse_server["waited_out"] == []


def test_lines_split_at_cr_lf_and_crlf_in_any_pieces():
    stream = "a\r\nb\rc\n\rd\r\r\ne\u2028f\n"
    want = ["a", "b", "c", "", "d", "", "e\u2028f"]
    for size in range(1, len(stream) + 1):
        lines, got = SSELines(), []
        for i in range(0, len(stream), size):
            got += lines.feed(stream[i:i + size])
        assert got + lines.flush() == want, size
    lines = SSELines()
    assert (lines.feed("x\r"), lines.feed("\ny"), lines.flush()) == (["x"], [], ["y"])  # a CRLF cut in two is one end
