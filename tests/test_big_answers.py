"""Large non-streamed answers (logprobs) leave in pieces, so encoding them never holds the IOLoop.

One request with ``n`` 4 and ``top_logprobs`` 20 answers MBs of JSON; encoded in one call and
gzipped in one transform, it froze the shared server (every user, ``/health``) for 0.7-1 s per
14 MB before, and the defaults allow 16 x 8,192 tokens.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.server_fixtures import TINY
from xllm_jupyter.server.json_pieces import PIECE_CHARS, json_fragments, write_json_in_pieces
from xllm_jupyter.server.sse import dumps

BIG = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "n": 4, "max_tokens": 400,
       "logprobs": True, "top_logprobs": 20, "temperature": 1.0, "ignore_eos": True}


def test_fragments_join_to_the_same_json():
    cases = [{}, [], [[]], {"k": []}, "é\u2028", 1.5, None, {1: 2, "a": True}, (1, 2),
             {"a": [1] * 200, "b": {"c": [{"x": i, "y": [i] * 3} for i in range(130)], "d": None}, "e": "x"},
             [1, [2, [3] * 70]]]
    for case in cases:
        assert "".join(json_fragments(case)) == dumps(case), case


def test_a_large_answer_leaves_in_pieces_and_parses_whole(raw):
    r = raw.post("/v1/chat/completions", json=BIG, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200, r.text
    # before: one Content-Length body, encoded in one piece on the IOLoop
    assert r.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.headers
    assert len(r.content) > 2 * PIECE_CHARS
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["content"]) == 400 for c in body["choices"])
    assert all(len(e["top_logprobs"]) == 20 for c in body["choices"] for e in c["logprobs"]["content"])
    assert body["usage"]["completion_tokens"] == 1600


def test_pieces_are_gzipped_as_one_stream(raw):
    with raw.stream("POST", "/v1/chat/completions", json=BIG, headers={"Accept-Encoding": "gzip"}) as r:
        assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
        packed = b"".join(r.iter_raw())
    body = json.loads(gzip.decompress(packed))
    assert len(body["choices"]) == 4 and body["usage"]["completion_tokens"] == 1600


def test_a_small_answer_still_has_a_content_length(raw):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2}, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)


class _BigAnswer(tornado.web.RequestHandler):
    """Answers a ~20 MB logprobs-shaped object through write_json_in_pieces, noting the ticker's count at each write."""

    payload: dict = {}
    ticks: list[int] = [0]  # loop turns the ticker has seen
    seen: list[int] = []  # ticks[0] at each write

    def write(self, chunk) -> None:
        type(self).seen.append(self.ticks[0])
        super().write(chunk)

    async def get(self) -> None:
        await write_json_in_pieces(self, self.payload, stall_seconds=60)


async def test_the_ioloop_turns_while_a_large_answer_is_written():
    entry = {"token": "tok", "logprob": -1.25, "bytes": [116, 111, 107],
             "top_logprobs": [{"token": f"t{j}", "logprob": -2.5, "bytes": [116, 49]} for j in range(20)]}
    _BigAnswer.payload = {"choices": [{"index": c, "logprobs": {"content": [dict(entry) for _ in range(6000)]}}
                                      for c in range(4)]}
    _BigAnswer.ticks, _BigAnswer.seen = [0], []
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(tornado.web.Application([(r"/big", _BigAnswer)], compress_response=True))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    stop = False

    async def ticker() -> None:
        # one count per loop turn: counted, not timed (gaps in seconds measured the machine's load:
        # with other processes busy a 5 ms sleep came back after 0.25-1.3 s, the old bound)
        while not stop:
            await asyncio.sleep(0)
            _BigAnswer.ticks[0] += 1

    task = asyncio.ensure_future(ticker())
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.get(f"http://127.0.0.1:{port}/big", headers={"Accept-Encoding": "gzip"})
    finally:
        stop = True
        await task
        server.stop()
    assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
    assert r.text == dumps(_BigAnswer.payload) and len(r.text) > 20_000_000
    # one json call plus one gzip over 20 MB held the loop ~1 s in one write: now ~80 pieces, and the loop
    # (every other request) gets a turn between each two of them
    seen = _BigAnswer.seen
    assert len(seen) >= 20_000_000 // PIECE_CHARS, len(seen)
    assert all(later > earlier for earlier, later in zip(seen, seen[1:])), seen
