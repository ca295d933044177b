"""What the JSON routes make of bodies that are not plain UTF-8 JSON objects, through the session server.

Content-Type, Content-Encoding (gzip, zip bombs), duplicate keys, other encodings, bodies that are not
objects and NaN/Infinity literals: each is served the one documented way or refused with an
OpenAI-shaped 4xx saying what to send instead (docs/http-api.md, "Request bodies").
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import openai
import pytest

from xllm_jupyter.core.config import CacheConfig
from xllm_jupyter.core.errors import InvalidRequest, PayloadTooLarge
from xllm_jupyter.server import request_body
from xllm_jupyter.server.request_body import INLINE_INFLATE_BYTES, BodyReader

from .server_fixtures import TINY

#: seeded: tests count its two tokens, and an unseeded random model can end after one
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": 7}
BODY = json.dumps(CHAT).encode()
JSON = {"Content-Type": "application/json"}
GZIP = {**JSON, "Content-Encoding": "gzip"}
JSON_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def error_of(r, status: int) -> dict:
    """The OpenAI error object of ``r``, which must have ``status``."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_a_body_declared_as_another_media_type_is_a_415(raw, content_type):
    for path in (*JSON_ROUTES, "/admin/models/pull"):
        err = error_of(raw.post(path, content=BODY, headers={"Content-Type": content_type}), 415)
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


def test_the_sdk_sees_the_415_and_does_not_retry_it(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=TINY, messages=CHAT["messages"], max_tokens=2,
                                       extra_headers={"Content-Type": "text/plain"})
    assert caught.value.status_code == 415 and caught.value.body["code"] == "unsupported_media_type"


def test_a_charset_other_than_utf8_is_a_415(raw):
    for charset in ("latin-1", "utf-16"):
        err = error_of(raw.post("/v1/chat/completions", content=BODY,
                                headers={"Content-Type": f"application/json; charset={charset}"}), 415)
        assert charset in err["message"] and "UTF-8" in err["message"]


@pytest.mark.parametrize("headers", [{}, JSON, {"Content-Type": "application/json; charset=UTF-8"},
                                     {"Content-Type": "Application/JSON"}, {"Content-Type": "application/merge-patch+json"}])
def test_json_or_no_content_type_is_served(raw, headers):
    r = raw.post("/v1/chat/completions", content=BODY, headers=headers)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


def test_a_post_without_a_body_is_not_refused_for_its_type(raw):
    err = error_of(raw.post("/v1/chat/completions", content=b"", headers={"Content-Type": "text/plain"}), 400)
    assert err["code"] == "invalid_json" and "empty" in err["message"]


def test_a_gzip_body_is_inflated_and_served(raw):
    packed = gzip.compress(BODY)
    for headers in (GZIP, {**JSON, "Content-Encoding": "x-gzip"}, {**JSON, "Content-Encoding": "identity, gzip"}):
        r = raw.post("/v1/chat/completions", content=packed, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text

    def dribble():  # chunked, in pieces smaller than gzip's header
        for i in range(0, len(packed), 7):
            yield packed[i:i + 7]

    r = raw.post("/v1/chat/completions", content=dribble(), headers=GZIP)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    legacy = json.dumps({"model": TINY, "prompt": "Hi", "max_tokens": 2, "seed": 7}).encode()
    r = raw.post("/v1/completions", content=gzip.compress(legacy), headers=GZIP)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_a_gzip_body_of_several_members_is_read_whole(raw, xllm_server):
    """RFC 1952: a gzip file is a series of members (``cat a.gz b.gz``; Python's gzip.decompress reads them all); the
    body was a 400 'data after its end'. The cap holds for all of them together."""
    packed = gzip.compress(BODY[:10]) + gzip.compress(BODY[10:40]) + gzip.compress(BODY[40:])
    assert gzip.decompress(packed) == BODY
    r = raw.post("/v1/chat/completions", content=packed, headers=GZIP)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = raw.post("/v1/chat/completions", content=(packed[i:i + 3] for i in range(0, len(packed), 3)), headers=GZIP)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text  # chunked: magic split too
    limit = xllm_server.config.server.max_body_bytes
    half = gzip.compress(b"a" * (limit // 2 + 1))
    err = error_of(raw.post("/v1/chat/completions", content=half + half, headers=GZIP), 413)
    assert "decompress" in err["message"]


def test_a_gzip_bomb_is_a_413_and_the_server_goes_on(raw, xllm_server):
    limit = xllm_server.config.server.max_body_bytes
    bomb = gzip.compress(b'{"model": "tiny", "pad": "' + b"a" * (64 * limit) + b'"}')
    assert len(bomb) < limit  # the wire size passes the cap; only what it inflates to does not
    err = error_of(raw.post("/v1/chat/completions", content=bomb, headers=GZIP), 413)
    assert err["code"] == "request_too_large" and "decompress" in err["message"]
    assert raw.post("/v1/chat/completions", content=BODY, headers=JSON).status_code == 200


def test_a_gzip_body_is_inflated_off_the_ioloop(raw, xllm_server, monkeypatch):
    """Each 64 KiB read of a gzip body may inflate to the whole cap in one call (0.1 s and more for 4 MiB, seconds
    for a larger cap), and it ran on the IOLoop, stalling every stream; a chunk that could inflate past
    INLINE_INFLATE_BYTES now inflates on a worker thread. A small gzip body stays on the loop (no thread hop)."""
    import threading

    async def loop_thread() -> int:
        return threading.get_ident()

    loop_ident = xllm_server.call(loop_thread())
    fed: list[tuple[int, int]] = []  # (chunk size, thread)
    feed = BodyReader.feed

    def recording(self, chunk):
        if self._inflater is not None:
            fed.append((len(chunk), threading.get_ident()))
        return feed(self, chunk)

    monkeypatch.setattr(BodyReader, "feed", recording)
    limit = xllm_server.config.server.max_body_bytes
    assert INLINE_INFLATE_BYTES == 1024 * 1024
    # the session server's cap (256 KiB) is below the 1 MiB a chunk may inflate to on the loop: scaled with it
    monkeypatch.setattr(request_body, "INLINE_INFLATE_BYTES", limit // 2)
    small = gzip.compress(BODY)
    assert len(small) * 1032 <= limit // 2
    big = gzip.compress(b'{"model": "tiny", "pad": "' + b"a" * (limit - 100) + b'"}')  # a few hundred bytes
    r = raw.post("/v1/chat/completions", content=big, headers=GZIP)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text  # read whole, then refused
    assert fed and all(thread != loop_ident for _, thread in fed), fed
    fed.clear()
    r = raw.post("/v1/chat/completions", content=small, headers=GZIP)
    assert r.status_code == 200 and fed and all(thread == loop_ident for _, thread in fed), fed
    err = error_of(raw.post("/v1/chat/completions", content=gzip.compress(b" " * (2 * limit)), headers=GZIP), 413)
    assert "decompress" in err["message"]  # the off-loop feed's 413 is answered as the inline one was


def test_the_reader_stops_inflating_at_the_cap():
    """A 1 GB bomb (about 1 MB of gzip) costs at most the cap's worth of inflating, not a gigabyte."""
    limit = 64 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    reader = BodyReader(limit, "gzip", lambda: PayloadTooLarge("too large"))
    with pytest.raises(PayloadTooLarge, match="decompress"):
        for _ in range(1024):  # each piece: 1 MiB of zeros, about 1 KB on the wire
            reader.feed(packer.compress(b"0" * 2**20) + packer.flush(zlib.Z_SYNC_FLUSH))
    assert limit < reader.size <= limit + 1


@pytest.mark.parametrize("body, text", [
    (b"not gzip at all", "not valid gzip"),
    (gzip.compress(BODY)[:-12], "ends before"),
    (gzip.compress(BODY) + b"{}", "after its end"),
])
def test_a_broken_gzip_body_is_a_400(raw, body, text):
    err = error_of(raw.post("/v1/chat/completions", content=body, headers=GZIP), 400)
    assert err["code"] == "invalid_body" and text in err["message"]


@pytest.mark.parametrize("coding", ["br", "deflate", "zstd", "gzip, gzip"])
def test_another_content_encoding_is_a_415_not_read_as_plain_json(raw, coding):
    """A body whose coding was ignored was read as if it were not compressed (``br`` over plain JSON: a 200)."""
    err = error_of(raw.post("/v1/chat/completions", content=BODY, headers={**JSON, "Content-Encoding": coding}), 415)
    assert err["code"] == "unsupported_media_type" and "gzip" in err["message"]


def test_auth_comes_before_the_body_checks(raw, xllm_server):
    """Who may call is decided first: a caller without a key learns nothing about what its body would get."""
    import httpx

    with httpx.Client(base_url=xllm_server.root) as anonymous:
        r = anonymous.post("/v1/chat/completions", content=b"x" * 1000, headers={"Content-Type": "text/plain",
                                                                             "Content-Encoding": "br"})
    assert r.status_code == 401
    r = raw.post("/v1/chat/completions", content=b"x" * 1000, headers={**JSON, "Content-Encoding": "br"})
    assert r.status_code == 415 and r.headers.get("Connection") != "close"  # the body was read: the connection stays


@pytest.mark.parametrize("body", [
    b'{"model": "nope", "model": "%s", "messages": [{"role": "user", "content": "Hi"}]}' % TINY.encode(),
    b'{"model": "%s", "model": "nope", "messages": [{"role": "user", "content": "Hi"}]}' % TINY.encode(),
])
def test_a_key_given_twice_is_a_400_whichever_comes_last(raw, body):
    """Before, the last "model" won for the request while a check reading the first would have seen another."""
    err = error_of(raw.post("/v1/chat/completions", content=body, headers=JSON), 400)
    assert err["code"] == "duplicate_key" and err["param"] == "model"


def test_a_nested_key_given_twice_is_a_400_on_every_json_route(raw):
    twice = b'{"model": "%s", "messages": [{"role": "user", "content": "a", "content": "b"}]}' % TINY.encode()
    assert error_of(raw.post("/v1/chat/completions", content=twice, headers=JSON), 400)["param"] == "content"
    for path, body in (("/v1/completions", b'{"model": "t", "prompt": "a", "prompt": "b"}'),
                       ("/v1/embeddings", b'{"model": "t", "input": "a", "input": "b"}'),
                       ("/v1/responses", b'{"model": "t", "input": [{"role": "user", "role": "user", "content": "x"}]}'),
                       ("/admin/models/pull", b'{"model": "a", "model": "b"}'),
                       ("/admin/models/load", b'{"model": "a", "model": "b"}')):
        err = error_of(raw.post(path, content=body, headers=JSON), 400)
        assert err["code"] == "duplicate_key", path


def test_the_response_cache_never_answers_a_body_the_request_parser_refuses():
    from xllm_jupyter.openai.cache import ResponseCache

    cache = ResponseCache(CacheConfig(enabled=True))
    made: list[bytes] = []

    async def produce(body: bytes) -> dict:
        from xllm_jupyter.openai.json_body import strict_json

        made.append(body)
        strict_json(body)  # what the serving layer's parse_request does first
        return {"id": "chatcmpl-1"}

    async def identity(name: str) -> str:
        return "weights"

    async def run() -> None:
        await cache.serve("chat", b'{"model": "m", "seed": 1, "temperature": 0}', produce, identity)
        with pytest.raises(InvalidRequest, match="more than once"):  # the same request by last-wins: was a hit
            await cache.serve("chat", b'{"model": "x", "model": "m", "seed": 1, "temperature": 0}', produce, identity)

    asyncio.run(run())
    assert len(made) == 2


@pytest.mark.parametrize("encode, where", [
    (lambda b: b.replace(b"Hi", b"H\xe9"), "byte"),  # latin-1
    (lambda b: b.decode().encode("utf-16"), "byte 0"),
    (lambda b: b.replace(b"Hi", b"\xed\xa0\x80"), "byte"),  # an encoded surrogate: not UTF-8
])
def test_a_body_that_is_not_utf8_says_so(raw, encode, where):
    for path in ("/v1/chat/completions", "/admin/models/pull"):
        err = error_of(raw.post(path, content=encode(BODY), headers=JSON), 400)
        assert err["code"] == "invalid_json" and "not valid UTF-8" in err["message"] and where in err["message"]


def test_a_utf8_byte_order_mark_is_ignored(raw):
    r = raw.post("/v1/chat/completions", content=b"\xef\xbb\xbf" + BODY, headers=JSON)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


def test_malformed_json_says_where(raw):
    err = error_of(raw.post("/v1/chat/completions", content=b'{"model": "tiny",\n "messages": [}', headers=JSON), 400)
    assert err["code"] == "invalid_json" and "line 2" in err["message"]


@pytest.mark.parametrize("body, where", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', "hex escape at line 1 column"),
    (b'{"model": "tiny", "messages": ' + b"[" * 300 + b"]" * 300 + b"}", "recursion limit exceeded at line 1"),
])
def test_json_that_python_reads_but_the_request_parser_does_not_says_where(raw, body, where):
    """A lone surrogate escape (not a character) and nesting past 200 levels were "could not parse", no more."""
    err = error_of(raw.post("/v1/chat/completions", content=body, headers=JSON), 400)
    assert err["code"] == "invalid_json" and where in err["message"], err["message"]


def test_an_integer_past_pythons_digit_limit_is_a_400_not_a_500(raw):
    """json.loads raises a plain ValueError (not JSONDecodeError) for an int of 4301+ digits: it was a 500 "retry"
    (which the SDK retries) on every JSON route and the pull route."""
    huge = b"1" + b"0" * 5000
    for path in (*JSON_ROUTES, "/admin/models/pull"):
        body = b'{"model": "' + TINY.encode() + b'", "input": "x", "prompt": "x", "max_tokens": ' + huge + b"}"
        err = error_of(raw.post(path, content=body, headers=JSON), 400)
        assert err["code"] == "invalid_json" and "digits" in err["message"], (path, err)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"chat"', b"null", b"3", b"true"])
def test_a_body_that_is_not_an_object_is_a_400(raw, body):
    for path in JSON_ROUTES:
        err = error_of(raw.post(path, content=body, headers=JSON), 400)
        assert err["code"] == "invalid_json" and "JSON object" in err["message"], path


@pytest.mark.parametrize("path, field, literal", [
    ("/v1/chat/completions", "temperature", "NaN"),
    ("/v1/chat/completions", "top_p", "Infinity"),
    ("/v1/chat/completions", "frequency_penalty", "-Infinity"),
    ("/v1/completions", "presence_penalty", "NaN"),
    ("/v1/responses", "temperature", "Infinity"),
])
def test_nan_and_infinity_name_their_param(raw, path, field, literal):
    base = dict(CHAT) if "chat" in path else {"model": TINY, "prompt": "Hi"} if path == "/v1/completions" else {
        "model": TINY, "input": "Hi"}
    body = json.dumps(base)[:-1] + f', "{field}": {literal}}}'
    err = error_of(raw.post(path, content=body.encode(), headers=JSON), 400)
    assert err["param"] == field and "finite" in err["message"], err


@pytest.mark.parametrize("body, written", [
    (b'{"a": NaN}', True), (b'{"a": [1, -Infinity]}', True), (b'{"a": {"b": 1e400}}', True),
    (b'{"a": -1e400}', True), (b'{"a": 1' + b"0" * 400 + b'.5}', True),
    (b'{"a": "NaN Infinity 1e400 e123"}', False), (b'{"a": 1e-400, "b": 1' + b"0" * 400 + b'}', False),
    (b'{"a": 0.5, "b": 1.7976931348623157e308}', False),
])
def test_the_strict_pass_notes_non_finite_numbers_as_it_parses(body, written):
    """Replaced a regular expression over the whole body (25-45 µs per KB, most of a big chat's parse), which also
    matched such words in any string; NaN/Infinity/overflow in a free-form field is then searched for and named."""
    from xllm_jupyter.openai.json_body import strict_json, strict_parse

    assert strict_parse(body)[1] is written
    assert strict_parse(body.decode())[1] is written
    assert json.dumps(strict_parse(body)[0]) == json.dumps(strict_json(body))


def test_a_float_literal_past_a_doubles_range_in_a_free_form_field_names_it(raw):
    body = json.dumps(CHAT)[:-1] + ', "x-extra": {"v": [1' + "0" * 400 + '.0]}, "note": "NaN e999"}'
    err = error_of(raw.post("/v1/chat/completions", content=body.encode(), headers=JSON), 400)
    assert err["param"] == "x-extra.v[0]" and "finite" in err["message"], err
    fine = json.dumps({**CHAT, "note": "NaN Infinity e999 " + "9" * 400})
    assert raw.post("/v1/chat/completions", content=fine.encode(), headers=JSON).status_code == 200
