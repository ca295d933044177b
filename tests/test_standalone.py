"""The standalone server: keyless loopback mode, API keys, `serve`, and the SSE writer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.server_fixtures import TINY, make_test_config
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.core.hosts import is_loopback
from xllm_jupyter.server.auth import ApiKeyAuth
from xllm_jupyter.server.sse import EventStreamWriter
from xllm_jupyter.server.standalone import listen_host, start_server

ROOT = Path(__file__).resolve().parents[1]


def test_api_key_auth_uses_hashes():
    auth = ApiKeyAuth(["k1", "k2"])
    assert auth.enabled
    assert auth.check("Bearer k2") and auth.check("bearer k1")
    assert not auth.check("Bearer k3") and not auth.check("k1") and not auth.check(None) and not auth.check("Bearer ")
    assert "k1" not in repr(vars(auth))
    assert ApiKeyAuth([]).check(None)


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "192.168.1.4", "example.com"))


def test_no_key_forces_loopback(caplog, tmp_path):
    config = make_test_config(tmp_path, api_keys=(), host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.server"):
        assert listen_host(config) == "127.0.0.1"
    assert "No API key" in caplog.text and "127.0.0.1" in caplog.text
    keyed = make_test_config(tmp_path, host="0.0.0.0")
    assert listen_host(keyed) == "0.0.0.0"


async def test_an_empty_api_key_is_no_key(caplog, tiny_catalog, tmp_path):
    """``xllm serve --host 0.0.0.0 --api-key "$KEY"`` with KEY unset: the empty key counted as a key for the loopback
    rule, so the server listened on every interface, and logged "API key required", with no key checked at all."""
    for keys in ([""], ["", ""]):
        config = make_test_config(tmp_path, api_keys=tuple(keys), host="0.0.0.0")
        with caplog.at_level(logging.WARNING, logger="xllm_jupyter.server"):
            assert listen_host(config) == "127.0.0.1"
        assert "No API key" in caplog.text
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        assert server.host == "127.0.0.1" and not server.auth_enabled
    finally:
        await server.stop()
        await engine.stop()


def test_blank_api_keys_are_no_key_and_keys_are_stripped(caplog, tmp_path):
    """A blank key (``api_keys: ["  "]``) counted as a key: the server listened on every interface and said "API key
    required", though the key a request sends is stripped and never matched it. A key with spaces or a newline
    around it (a YAML block scalar) matched no request; it matches the key without them."""
    config = make_test_config(tmp_path, api_keys=("  ", "\n"), host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.server"):
        assert listen_host(config) == "127.0.0.1"
    assert "No API key" in caplog.text
    assert not ApiKeyAuth(["  "], [" "]).enabled
    auth = ApiKeyAuth([" k1\n"], ["\tk2 "])
    assert auth.identify("Bearer k1").role == "user" and auth.identify("Bearer k2").role == "admin"


async def test_keyless_server_serves_loopback_only(tiny_catalog, tmp_path):
    config = make_test_config(tmp_path, api_keys=(), host="0.0.0.0")
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        assert server.host == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert not server.auth_enabled
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.get("/v1/models")  # no key needed
            assert r.status_code == 200 and TINY in [m["id"] for m in r.json()["data"]]
            # a DNS-rebinding page reaches us with a foreign Host: refused
            r = await c.get("/v1/models", headers={"Host": "evil.example:80"})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
            # a browser page on another origin cannot POST to the keyless server
            r = await c.post("/v1/chat/completions", json={}, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403
            r = await c.get("/health")
            assert r.status_code == 200
    finally:
        await server.stop()
        await engine.stop()


async def test_every_interface_spelled_0_serves_any_host_with_keys(tiny_catalog, tmp_path):
    """``xllm serve --host 0 --api-key K`` listens on every IPv4 address (``getaddrinfo`` reads "0" as 0.0.0.0), but
    only the strings "0.0.0.0"/"::"/"" counted as every interface: the Host check then served the name "0" alone and
    refused every LAN client (and localhost) with a 403, and the printed URL was http://0:PORT."""
    from tests.server_fixtures import API_KEY
    from xllm_jupyter.core.hosts import unspecified_address
    from xllm_jupyter.server.edge import EdgePolicy

    for spelling in ("0", "00", "::0", "[::]", "0:0::0", "0.0.0.0."):
        assert EdgePolicy((), (), spelling, any_host_ok=True).host_allowed("192.168.1.4:8000"), spelling
        assert not EdgePolicy((), (), spelling, any_host_ok=False).host_allowed("192.168.1.4"), spelling
    assert unspecified_address("127.0.0.1") is None and unspecified_address("localhost") is None
    keyless = make_test_config(tmp_path, api_keys=(), host="0")
    assert listen_host(keyless) == "127.0.0.1"  # without keys, still loopback only
    config = make_test_config(tmp_path, host="0")
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            r = await c.get("/v1/models", headers={"Host": f"192.168.1.4:{server.port}"})
            assert r.status_code == 200, r.text
            assert (await c.get("/v1/models")).status_code == 200
    finally:
        await server.stop()
        await engine.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_server_on_every_ipv6_address_gives_a_url_that_answers(tiny_catalog, tmp_path):
    """``xllm serve --host ::`` listens on IPv6 only (Tornado sets IPV6_V6ONLY), yet it logged
    ``listening on http://127.0.0.1:PORT``, where nothing answers."""
    config = make_test_config(tmp_path, host="::")
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        assert server.url == f"http://[::1]:{server.port}"
        async with httpx.AsyncClient(base_url=server.url) as c:
            assert (await c.get("/health")).status_code == 200
    finally:
        await server.stop()
        await engine.stop()


@pytest.mark.parametrize("tornado_has_protection", [True, False])
async def test_keyless_server_refuses_cross_site_writes_on_any_tornado(tiny_catalog, tmp_path, monkeypatch,
                                                                      tornado_has_protection):
    """Keyless mode trusts whoever reaches loopback, so a web page's POST (a text/plain 'simple' request needs
    no preflight) must be refused by the server itself: Tornado < 6.6 has no cross-origin check of its own."""
    if not tornado_has_protection:
        monkeypatch.setattr(tornado.web.RequestHandler, "_cross_origin_protection", lambda self: None, raising=False)
    allowed = "http://notebook.example"
    base = make_test_config(tmp_path, api_keys=())
    config = dataclasses.replace(base, http=dataclasses.replace(base.http, cors_origins=(allowed,)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    body = '{"model": "tiny", "messages": []}'  # a 400 once past the origin check: nothing runs
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            for headers in ({"Origin": "http://evil.example"},
                            {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
                            {"Origin": "http://localhost:8888", "Sec-Fetch-Site": "same-site"},  # another local app
                            {"Origin": "null"}):  # a sandboxed frame or a file:// page
                for path in ("/v1/chat/completions", "/admin/models/pull", "/admin/models/unload", "/no/such/route"):
                    r = await c.post(path, content=body, headers={**headers, "Content-Type": "text/plain"})
                    assert r.status_code == 403, (path, headers, r.status_code, r.text)
                    assert r.json()["error"]["type"] == "permission_error"
            for headers in ({}, {"Origin": server.url}, {"Sec-Fetch-Site": "same-origin", "Origin": server.url},
                            {"Sec-Fetch-Site": "none"}, {"Origin": allowed, "Sec-Fetch-Site": "cross-site"}):
                r = await c.post("/v1/chat/completions", content=body, headers=headers)
                assert r.status_code == 400, (headers, r.status_code, r.text)  # served (the origin is this server or allowed)
            r = await c.get("/v1/models", headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
            assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers  # a read it cannot see
    finally:
        await server.stop()
        await engine.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_until_sigterm(xllm_home):
    port = _free_port()
    env = {
        **os.environ,
        "XLLM_HOME": str(xllm_home),
        "XLLM_CONFIG": str(xllm_home / "no-config.yaml"),
        "XLLM_SERVER_PORT": str(port),
        "XLLM_API_KEYS": "sk-serve-test",
        "XLLM_SERVER_HOST": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    code = "from xllm_jupyter.core.config import load_config\nfrom xllm_jupyter.server.standalone import serve\nserve(load_config(), ['tiny'])\n"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health/ready").status_code == 200:  # the preloaded TINY is in
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        with openai.OpenAI(base_url=base + "/v1", api_key="sk-serve-test", max_retries=0) as c:
            r = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert r.usage.completion_tokens <= 3
        # a stream in flight at SIGTERM ends with an error event and a clean end, not a cut connection
        body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900,
                "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer sk-serve-test"}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if len(events) == 2:  # the role chunk and the first token's (later ones may come together)
                    proc.send_signal(signal.SIGTERM)
        assert '"code":"overloaded"' in events[-1] and "shutting down" in events[-1], events[-3:]
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert f"listening on http://127.0.0.1:{port}" in out
        assert "API key required" in out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_fails_for_a_missing_model(tmp_path):
    env = {**os.environ, "XLLM_HOME": str(tmp_path), "XLLM_CONFIG": str(tmp_path / "c.yaml"), "XLLM_SERVER_PORT": "0"}
    code = "from xllm_jupyter.core.config import load_config\nfrom xllm_jupyter.server.standalone import serve\nserve(load_config(), ['not-here'])\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ModelNotFound" in proc.stderr and "not-here" in proc.stderr


# ---------------------------------------------------------------- the SSE writer
class _SlowStreamHandler(tornado.web.RequestHandler):
    """Streams chat chunks with gaps (to see keepalives) and bursts (to see coalescing)."""

    flushes = 0

    def flush(self, *args, **kwargs):
        type(self).flushes += 1
        return super().flush(*args, **kwargs)

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        gone = []
        writer = EventStreamWriter(self, 0.05, lambda: gone.append(True))

        def chunk(text: str) -> dict:
            return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}

        async def chunks():
            yield chunk("a")
            await asyncio.sleep(0.3)  # idle: keepalives go out
            for i in range(20):  # a burst that is ready at once: few flushes
                yield chunk(str(i))
            await asyncio.sleep(0.01)
            yield {**chunk(""), "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}

        try:
            await writer.write_all(chunks())
        finally:
            writer.close()
        self.finish()

    post = get


async def test_sse_keepalive_and_coalescing():
    _SlowStreamHandler.flushes = 0  # a class counter: counted from here, so the test can be repeated
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(tornado.web.Application([(r"/v1/chat/completions", _SlowStreamHandler)]))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/v1/chat/completions")
        text = r.text
        assert text.count(": keepalive\n\n") >= 2
        assert text.endswith("data: [DONE]\n\n")
        assert text.count("data: ") == 23
        # 23 events and the keepalives, but the burst of 20 left in a few writes
        assert _SlowStreamHandler.flushes < 12

        # the SDK reads through the comment lines
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(model="m", messages=[], stream=True)
            got = [c.choices[0].delta.content async for c in stream]
        assert got[:2] == ["a", "0"] and got[-1] is None
    finally:
        server.stop()
