"""The Jupyter server extension: real ServerApp (pytest-jupyter), real engine, the openai SDK.

``jp_base_url`` is ``/a%40b/``, so any place that forgets base_url (or re-quotes it)
shows up as a 404 here. The test bodies are coroutines run on ``jp_asyncio_loop``
explicitly: the server lives on that loop, and pytest-asyncio's auto mode would
otherwise run them on a loop of its own, where the server never answers.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time

import httpx
import openai
import pytest

from tests.server_fixtures import TINY

pytest_plugins = ("pytest_jupyter.jupyter_server",)

MSG = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def jp_server_config(xllm_home):
    """Extension on, unauthenticated access off (unauthenticated routes must be marked)."""
    return {
        "ServerApp": {
            # terminals is off: its websocket route trips the JupyterServerAuthWarning-as-error filter
            "jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
            "allow_unauthenticated_access": False,
        },
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 4, "max_body_bytes": 65536},
    }


@pytest.fixture
def xllm(jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop):
    """URL, token and extension app of a started server (the fixture does not run the start hooks)."""
    token = jp_serverapp.identity_provider.token
    app = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    (ext,) = app
    return {
        "url": f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm/v1",
        "root": f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm",
        "token": token,
        "app": ext,
        "serverapp": jp_serverapp,
        "run": jp_asyncio_loop.run_until_complete,
    }


def on_server_loop(body):
    """Turn ``async def test(xllm)`` into a sync test that runs it on the server's loop."""

    def test(xllm):
        xllm["run"](body(xllm))

    test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
    return test


async def start(xllm) -> None:
    """What ServerApp.start_ioloop schedules once the loop runs: the extensions' start hooks."""
    await xllm["serverapp"]._post_start()


@on_server_loop
async def test_openai_sdk_with_jupyter_token(xllm):
    await start(xllm)
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
        ids = [m.id async for m in c.models.list()]
        assert TINY in ids
        r = await c.chat.completions.create(model=TINY, messages=MSG, max_tokens=5)
        assert r.id.startswith("chatcmpl-") and r.usage.completion_tokens <= 5
        stream = await c.chat.completions.create(
            model=TINY, messages=MSG, max_tokens=5, stream=True, stream_options={"include_usage": True},
            seed=7,  # seeded: an unseeded random model can draw an end token first, and the text checked is empty
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(model="missing", messages=MSG)
        assert info.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model=TINY, messages=MSG, temperature=9)
        assert info.value.param == "temperature"


@on_server_loop
async def test_responses_api_under_jupyter(xllm):
    await start(xllm)
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
        # seeded: an unseeded random model can draw an end token first, and the deltas checked are empty
        async with c.responses.stream(model=TINY, input="Hi", max_output_tokens=3, extra_body={"seed": 7}) as stream:
            deltas = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        r = await c.responses.create(model=TINY, input="Hi", max_output_tokens=3)
        assert deltas and (await c.responses.retrieve(r.id)).output_text == r.output_text
        await c.responses.delete(r.id)  # DELETE passes Jupyter's auth and authorizer
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(r.id)


@on_server_loop
async def test_stored_chat_completions_under_jupyter(xllm):
    await start(xllm)
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
        r = await c.chat.completions.create(model=TINY, messages=MSG, max_tokens=3, store=True, metadata={"k": "v"})
        assert (await c.chat.completions.retrieve(r.id)).choices[0].message.content == r.choices[0].message.content
        assert [x.id async for x in c.chat.completions.list(metadata={"k": "v"})] == [r.id]
        # POST and DELETE on the stored completion pass Jupyter's auth and authorizer
        assert (await c.chat.completions.update(r.id, metadata={"k": "w"})).metadata == {"k": "w"}
        assert [m.content async for m in c.chat.completions.messages.list(r.id)] == ["Say something."]
        assert (await c.chat.completions.delete(r.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.retrieve(r.id)


@on_server_loop
async def test_stream_content_type_and_token_header(xllm):
    await start(xllm)
    # max_tokens 1: the whole stream fits before the first flush, so the headers leave with
    # finish(), where Jupyter's APIHandler set JSON (profile()'s one-token warm-up failed on it)
    for max_tokens in (3, 1):
        body = {"model": TINY, "messages": MSG, "max_tokens": max_tokens, "stream": True}
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(xllm["url"] + "/chat/completions", json=body, headers={"Authorization": f"token {xllm['token']}"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream"), (max_tokens, r.headers["content-type"])
        assert r.text.endswith("data: [DONE]\n\n")


@on_server_loop
async def test_metrics_keep_prometheus_content_type_under_jupyter(xllm):
    """APIHandler.finish labelled /xllm/metrics application/json, which Prometheus 3 refuses to scrape (the API fuzzer's
    strict-JSON check found a JSON-labelled body that was not JSON)."""
    await start(xllm)
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.get(xllm["root"] + "/metrics", headers={"Authorization": f"token {xllm['token']}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    assert "# TYPE xllm_requests" in r.text


@on_server_loop
async def test_no_token_is_refused(xllm):
    await start(xllm)
    async with httpx.AsyncClient(timeout=30) as c:
        # no credentials is a 401, as OpenAI clients expect (Jupyter's own API would say 403)
        r = await c.post(xllm["url"] + "/chat/completions", json={"model": TINY, "messages": MSG})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        r = await c.get(xllm["url"] + "/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.get(xllm["root"] + "/health")  # the one public route
        assert r.status_code == 200
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key="not-the-token", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=TINY, messages=MSG)


@on_server_loop
async def test_every_response_has_a_request_id(xllm):
    """The openai SDK's ``request_id`` (``X-Request-ID``) was None under Jupyter; the standalone server always set it."""
    await start(xllm)
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
        raw = await c.chat.completions.with_raw_response.create(model=TINY, messages=MSG, max_tokens=1)
        assert len(raw.request_id or "") == 32 and raw.parse().usage.completion_tokens == 1
        with pytest.raises(openai.NotFoundError) as info:
            await c.models.retrieve("missing")
        first = info.value.request_id
        with pytest.raises(openai.NotFoundError) as info:
            await c.models.retrieve("missing")
        assert len(first or "") == 32 and info.value.request_id not in (None, first)  # one per request
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(xllm["url"] + "/models", headers={"Authorization": "Bearer wrong", "X-Request-ID": "trace-7"})
        assert r.status_code == 401 and r.headers["X-Request-ID"] == "trace-7"  # the client's own id, as standalone
        r = await c.get(xllm["root"] + "/health", headers={"X-Request-ID": "bad id!"})
        assert r.status_code == 200 and len(r.headers["X-Request-ID"]) == 32  # not a safe token: a fresh one


@on_server_loop
async def test_head_answers_where_get_does_and_a_405_names_the_methods(xllm):
    """HEAD on a GET route is GET's headers without the body (it was a 405 on every /xllm route); a 405 carries
    Allow; a path no route has is a 404 for every method (PUT was a 405 naming GET and POST)."""
    await start(xllm)
    token = {"Authorization": f"Bearer {xllm['token']}"}
    async with httpx.AsyncClient(timeout=30) as c:
        for url, headers in ((xllm["root"] + "/health", {}), (xllm["url"] + "/models", token)):
            got, head = await c.get(url, headers=headers), await c.head(url, headers=headers)
            assert (head.status_code, head.content) == (200, b""), (url, head.status_code)
            assert head.headers["content-type"] == got.headers["content-type"] and head.headers.get("x-request-id")
        c.cookies.clear()
        assert (await c.head(xllm["url"] + "/models")).status_code == 401  # HEAD still needs the token
        r = await c.put(xllm["url"] + "/chat/completions", headers=token, json={})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST, OPTIONS"
        r = await c.head(xllm["url"] + "/embeddings", headers=token)
        assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS"
        r = await c.put(xllm["url"] + "/nothing", headers=token, json={})
        assert r.status_code == 404 and "allow" not in r.headers
        # Jupyter answers OPTIONS itself (anonymously, APIHandler.options): Allow lists it and is sent with it
        # (Allow named no OPTIONS, and Jupyter's answer had no Allow)
        r = await c.options(xllm["url"] + "/chat/completions")
        assert r.status_code in (200, 204) and r.headers["allow"] == "GET, HEAD, POST, OPTIONS"
        assert r.headers.get("x-request-id")
        r = await c.options(xllm["root"] + "/health")
        assert r.status_code in (200, 204) and r.headers["allow"] == "GET, HEAD, OPTIONS"
        assert "allow" not in (await c.options(xllm["url"] + "/nothing")).headers


async def _answer_to_a_head_declaring_a_body(url: str, method: str, length: int) -> bytes:
    """Send a head announcing ``length`` body bytes and 1000 of them: the answer's first bytes (b"" if none came,
    the server still reading)."""
    import asyncio

    host, path = url.split("//", 1)[1].split("/", 1)
    reader, writer = await asyncio.open_connection(*host.split(":"))
    writer.write(f"{method} /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + b"{" * 1000)
    try:
        return await asyncio.wait_for(reader.read(4096), 20)
    except asyncio.TimeoutError:
        return b""
    finally:
        writer.close()


@on_server_loop
async def test_an_anonymous_options_with_a_body_is_refused_before_it_is_read(xllm):
    """OPTIONS is answered without credentials (Jupyter's own APIHandler.options), so a body it declared was read for
    anyone: a body route buffered up to max_body_bytes of it. Now a 413 on the head; POST is a 401 on its head."""
    await start(xllm)
    for path in ("/chat/completions", "/models"):
        reply = await _answer_to_a_head_declaring_a_body(xllm["url"] + path, "OPTIONS", 60000)  # under the 64 KiB cap
        assert reply.startswith(b"HTTP/1.1 413"), (path, reply[:300])
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    reply = await _answer_to_a_head_declaring_a_body(xllm["url"] + "/chat/completions", "POST", 60000)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:300]
    async with httpx.AsyncClient(timeout=30) as c:  # no body: Jupyter's answer as before
        r = await c.options(xllm["url"] + "/chat/completions")
        assert r.status_code in (200, 204) and r.headers["allow"] == "GET, HEAD, POST, OPTIONS"


@on_server_loop
async def test_environment_exported(xllm):
    await start(xllm)
    assert os.environ["XLLM_BASE_URL"] == xllm["url"]
    assert os.environ["XLLM_API_KEY"] == xllm["token"]
    async with openai.AsyncOpenAI(base_url=os.environ["XLLM_BASE_URL"], api_key=os.environ["XLLM_API_KEY"], max_retries=0) as c:
        assert (await c.models.retrieve(TINY)).id == TINY


@on_server_loop
async def test_preload_and_admin(xllm):
    ext = xllm["app"]
    assert ext.xllm_config.engine.max_batch_size == 4
    await start(xllm)
    await ext._start_task  # the background preload of the default model
    assert ext.engine.is_loaded(TINY)
    headers = {"Authorization": f"Bearer {xllm['token']}"}
    async with httpx.AsyncClient(timeout=60, headers=headers) as c:
        data = (await c.get(xllm["root"] + "/admin/models")).json()["data"]
        assert [m["id"] for m in data] == [TINY]
        assert data[0]["max_batch_size"] == 4
        r = await c.post(xllm["url"] + "/chat/completions", content=b"{" + b" " * 70000 + b"}")
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = await c.get(xllm["root"] + "/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert ext.current_activity() is False


@on_server_loop
async def test_stop_extension_stops_engine(xllm):
    ext = xllm["app"]
    await start(xllm)
    await ext._start_task
    assert ext.engine.is_loaded(TINY)
    await ext.stop_extension()
    assert not ext.engine.is_loaded(TINY)
    assert "XLLM_BASE_URL" not in os.environ


def _serve(handler: type) -> http.server.ThreadingHTTPServer:
    """``handler`` on an ephemeral loopback port, served from a daemon thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server: http.server.ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


class _HubApi:
    """A stand-in for the JupyterHub REST API: ``GET /hub/api/services/xllm`` for one token, 403 for others.

    While ``down`` is set it answers 503, as a hub's proxy does while the hub restarts.
    """

    def __init__(self, token: str, service_url: str = "http://127.0.0.1:1") -> None:
        outer = self
        self.requests: list[str] = []
        self.down = False

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                ok = self.path == "/hub/api/services/xllm" and self.headers.get("Authorization") == f"token {token}"
                body = json.dumps({"name": "xllm", "kind": "service", "prefix": "/services/xllm/", "url": service_url}
                                  if ok else {"status": 403, "message": "Action is not authorized with current scopes"})
                status = 503 if outer.down else 200 if ok else 403
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hub/api"

    def close(self) -> None:
        _stop(self.server)


class _Service:
    """A stand-in hub xllm service that records what reaches it; its stream holds its second half until released.

    ``GET .../v1/models`` lists one model; ``POST .../v1/chat/completions`` streamed sends one chunk, then only
    keepalive comments until ``release`` is set (``gone`` is set when a write finds the client left);
    not streamed, it answers a 429 with Retry-After.
    """

    def __init__(self) -> None:
        outer = self
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []  # (method, path, headers, body)
        self.release, self.gone = threading.Event(), threading.Event()
        self.break_off = threading.Event()  # set: the stream's connection drops after the first chunk (a crash)
        self.cut_event = b""  # with break_off: the start of the next event, sent before the drop (a crash mid-write)
        self.bytewise = False  # set: the stream is written one byte at a time
        self.sent = bytearray()  # the stream's bytes as written
        self.load_seconds = 0.0  # how long ``POST .../admin/models/load`` takes before its answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.seen.append(("GET", self.path, dict(self.headers), b""))
                self._json(200, {"object": "list", "data": [{"id": "hub-model", "object": "model", "created": 0,
                                                             "owned_by": "hub"}], "xllm": {"server_version": "9.9.9"}})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.seen.append(("POST", self.path, dict(self.headers), body))
                if self.path.endswith("/admin/models/load"):  # a big model's load: the answer comes late
                    time.sleep(outer.load_seconds)
                    self._json(200, {"id": "hub-model", "object": "model", "loaded": True})
                    return
                if not json.loads(body).get("stream"):
                    self._json(429, {"error": {"message": "Slow down", "type": "rate_limit_error", "param": None,
                                               "code": "rate_limit_exceeded"}}, {"Retry-After": "7"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                if outer.break_off.is_set():  # a body that ends short of its length: the connection broke
                    self.send_header("Content-Length", "100000")
                self.end_headers()
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "hub-model",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
                try:
                    self._send(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    if outer.break_off.is_set():
                        if outer.cut_event:
                            self._send(outer.cut_event)
                        return
                    while not outer.release.wait(0.05):
                        self._send(b": keepalive\n\n")
                    chunk["choices"][0].update(delta={"content": "lo"}, finish_reason="stop")
                    self._send(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
                except OSError:  # the forwarding server closed the connection
                    outer.gone.set()

            def _send(self, data: bytes) -> None:
                outer.sent += data
                for piece in [data[i:i + 1] for i in range(len(data))] if outer.bytewise else [data]:
                    self.wfile.write(piece)
                    self.wfile.flush()

            def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(json.dumps(obj).encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.release.set()
        _stop(self.server)


@pytest.fixture
def service():
    """The hub's xllm service (a recording stand-in)."""
    svc = _Service()
    yield svc
    svc.close()


@pytest.fixture
def hub_api(monkeypatch, service):
    """A single-user server's environment on a hub whose xllm service this server's token may read."""
    api = _HubApi("server-token", service.url)
    monkeypatch.setenv("JUPYTERHUB_API_URL", api.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-token")
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    yield api
    api.close()


def test_on_a_hub_with_the_xllm_service_kernels_are_not_pointed_at_this_server(xllm, hub_api):
    """Before: XLLM_BASE_URL (which beats hub discovery) sent every kernel to a per-user engine with its own model."""

    async def body() -> None:
        ext = xllm["app"]
        await start(xllm)
        await ext._start_task
        assert hub_api.requests == ["/hub/api/services/xllm"]
        assert "XLLM_BASE_URL" not in os.environ and "XLLM_API_KEY" not in os.environ
        assert not ext.engine.is_loaded(TINY)  # no per-user copy of the default model at start
        # the playground knows this server's API (forwarded to the service like the panel's calls)
        assert xllm["serverapp"].web_app.settings["xllm_local_api"]["XLLM_BASE_URL"] == xllm["url"]
        async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
            assert [m.id async for m in c.models.list()] == ["hub-model"]
        assert not ext.engine.is_loaded(TINY)

    xllm["run"](body())


def test_a_hub_without_the_service_for_this_token_keeps_the_exported_address(xllm, hub_api, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "token-without-read-services")

    async def body() -> None:
        ext = xllm["app"]
        await start(xllm)
        await ext._start_task
        assert hub_api.requests == ["/hub/api/services/xllm"]  # asked, refused (403): this server's API it is
        assert os.environ["XLLM_BASE_URL"] == xllm["url"]
        assert ext.engine.is_loaded(TINY)

    xllm["run"](body())


def test_a_hub_that_did_not_answer_at_start_is_asked_again_and_no_model_is_loaded_meanwhile(xllm, hub_api, monkeypatch):
    """Before: a hub API that did not answer at start (restarting, or slower than the lookup under a burst of
    spawns) left the server on its own engine for good: it loaded the default model and kernels used it."""
    import asyncio

    from xllm_jupyter.client import discovery
    from xllm_jupyter.magics.session import MagicState

    hub_api.down = True
    auth = {"Authorization": f"token {xllm['token']}"}

    async def body() -> None:
        ext = xllm["app"]
        await start(xllm)
        await ext._start_task
        assert hub_api.requests == ["/hub/api/services/xllm"]
        # kernels come here meanwhile (never a private engine of their own), and nothing is loaded here
        assert os.environ["XLLM_BASE_URL"] == xllm["url"]
        async with httpx.AsyncClient(headers=auth, timeout=30) as h:
            r = await h.get(xllm["url"] + "/models")
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "hub_unavailable" and r.json()["error"]["type"] == "server_error"
            assert (await h.get(xllm["root"] + "/health")).json() == {"status": "ok", "engine": "waiting-for-hub"}
            # a kernel started meanwhile (its XLLM_BASE_URL: this server): no version yet, and none remembered
            kernel_env = {key: os.environ[key] for key in ("XLLM_BASE_URL", "XLLM_API_KEY")}
            assert await asyncio.to_thread(state.about, None) == {}
            assert len(hub_api.requests) == 1  # asked at most every RETRY_SECONDS
            monkeypatch.setattr("xllm_jupyter.extension.hub_link.RETRY_SECONDS", 0.0)
            assert (await h.get(xllm["url"] + "/models")).status_code == 503  # asked again: still down
            assert len(hub_api.requests) == 2
            hub_api.down = False
            r = await h.get(xllm["url"] + "/models")
            assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["hub-model"]
            assert len(hub_api.requests) == 3
            assert "XLLM_BASE_URL" not in os.environ  # kernels started from now on find the service themselves
            assert (await h.get(xllm["root"] + "/health")).json() == {"status": "ok", "engine": "hub-service"}
            assert (await h.get(xllm["url"] + "/models")).status_code == 200
            assert len(hub_api.requests) == 3  # settled: not asked again
            for key, value in kernel_env.items():  # that kernel's environment still points here
                monkeypatch.setenv(key, value)
            assert await asyncio.to_thread(state.about, None) == {"server_version": "9.9.9"}  # the service's
            assert state.location is not None and state.location.source == "extension"
        assert not ext.engine.loaded_models(include_loading=True)

    state = MagicState()
    try:
        xllm["run"](body())
    finally:
        state.close()
        discovery.disconnect()


def test_a_hub_that_answers_later_without_the_service_settles_on_this_servers_engine(xllm, hub_api, monkeypatch):
    from xllm_jupyter.extension import hub_link

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "token-without-read-services")
    monkeypatch.setattr(hub_link, "RETRY_SECONDS", 0.0)
    hub_api.down = True

    async def body() -> None:
        ext = xllm["app"]
        await start(xllm)
        await ext._start_task
        assert not ext.engine.loaded_models(include_loading=True)
        hub_api.down = False  # now it answers: 403, this token may not read the service
        async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0, timeout=60) as c:
            r = await c.chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
            assert r.usage.completion_tokens > 0  # this server's own engine
        await ext._preload_task
        assert ext.engine.is_loaded(TINY) and os.environ["XLLM_BASE_URL"] == xllm["url"]
        assert len(hub_api.requests) == 2
        async with httpx.AsyncClient(timeout=30) as h:
            health = (await h.get(xllm["root"] + "/health")).json()
        # the 403: this server's token lacks the read scope, which only a restart of the server can mend
        assert health.pop("hub").startswith("this server's JupyterHub token may not look up the hub's xllm service")
        assert health == {"status": "ok", "engine": "local"}

    xllm["run"](body())


def test_this_servers_api_forwards_to_the_hub_service_chunk_by_chunk_with_the_server_token_only(xllm, hub_api, service):
    """The panel's streamed chat: each chunk as the service sends it, a client that leaves closes the upstream
    request, an error passes through unchanged, and upstream sees this server's hub token, never Jupyter's."""
    import asyncio

    token = xllm["token"]
    headers = {"Authorization": f"token {token}", "Cookie": f"_xsrf=x; jupyter-token={token}", "X-XSRFToken": "x",
               "X-Request-ID": "req-7", "Connection": "keep-alive, X-Private", "X-Private": token}
    chat = {"model": "hub-model", "messages": MSG, "stream": True}

    async def first_event(lines) -> str:
        async for line in lines:
            if line.startswith("data:"):
                return line
        raise AssertionError("the stream ended without an event")

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(base_url=xllm["url"], timeout=30) as h:
            async with h.stream("POST", "/chat/completions", json=chat, headers=headers) as r:
                assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                lines = r.aiter_lines()
                first = await asyncio.wait_for(first_event(lines), 10)
                assert json.loads(first[5:])["choices"][0]["delta"]["content"] == "Hel"
                assert not service.release.is_set()  # arrived while the service still holds the rest back
                service.release.set()
                rest = [line async for line in lines if line.startswith("data:")]
                assert json.loads(rest[0][5:])["choices"][0]["finish_reason"] == "stop" and rest[-1] == "data: [DONE]"
            service.release.clear()
            async with h.stream("POST", "/chat/completions", json=chat, headers=headers) as r:
                await asyncio.wait_for(first_event(r.aiter_lines()), 10)
            for _ in range(100):  # the client left: the forwarded request must be closed too
                if service.gone.is_set():
                    break
                await asyncio.sleep(0.05)
            assert service.gone.is_set()
            r = await h.post("/chat/completions", json={**chat, "stream": False}, headers=headers)
            assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
            assert r.json()["error"] == {"message": "Slow down", "type": "rate_limit_error", "param": None,
                                         "code": "rate_limit_exceeded"}
            too_big = await h.post("/chat/completions", content=b"x" * 70000, headers=headers)
            assert too_big.status_code == 413  # this server's body limit, before anything is sent upstream
            # a dot segment would climb out of the service's prefix (to the hub API through the proxy)
            assert (await h.get("/models/%2E%2E/%2e%2e/%2E%2E/hub/api/users", headers=headers)).status_code == 404

    xllm["run"](body())
    assert not xllm["app"].engine.is_loaded(TINY)
    posts = [(path, seen_headers, sent) for method, path, seen_headers, sent in service.seen if method == "POST"]
    assert [path for path, _, _ in posts] == ["/services/xllm/v1/chat/completions"] * 3
    for _, seen_headers, sent in posts:
        assert seen_headers["Authorization"] == "token server-token" and seen_headers["X-Request-ID"] == "req-7"
        assert not any(token in value for value in seen_headers.values())  # no Jupyter token, cookie or private header
        assert {"Cookie", "X-XSRFToken", "X-Private"}.isdisjoint(seen_headers)
        assert json.loads(sent)["model"] == "hub-model"


def test_a_token_in_the_query_never_goes_upstream(xllm, hub_api, service):
    """Jupyter takes its token in the URL too (``?token=``): the forward sent the query on as it came, so the Jupyter
    token (on a hub: the user's hub token, which the service, where tokens in URLs are allowed, takes before the
    Authorization header) reached the service. Only this server's own token goes upstream, the rest of the query does."""
    token = xllm["token"]

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(base_url=xllm["url"], timeout=30) as h:
            for query in (f"token={token}&limit=2", f"limit=2&TOKEN=x&%74oken={token}&tok%20en=1", f"token={token}"):
                r = await h.get(f"/models?{query}")
                assert r.status_code == 200 and r.json()["data"][0]["id"] == "hub-model", (query, r.text)

    xllm["run"](body())
    paths = [path for method, path, _, _ in service.seen if method == "GET"]
    assert paths == ["/services/xllm/v1/models?limit=2", "/services/xllm/v1/models?limit=2&TOKEN=x&tok%20en=1",
                     "/services/xllm/v1/models"], paths
    assert all(token not in str(headers) for _, _, headers, _ in service.seen)


def test_a_header_with_bytes_past_ascii_is_forwarded_as_sent(xllm, hub_api, service):
    """A User-Agent (or Accept, Content-Type) holding a byte past ASCII ("Zoë's notebook" in UTF-8): the forward
    built its upstream request from Tornado's latin-1 reading of it, which httpx refuses to encode (ASCII only), and
    the request was a 500 instead of being forwarded."""
    agent = "Zoë's notebook/1.0".encode()

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(base_url=xllm["url"], timeout=30) as h:
            r = await h.get("/models", headers=[(b"Authorization", f"token {xllm['token']}".encode()), (b"User-Agent", agent)])
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "hub-model", r.text

    xllm["run"](body())
    assert [headers["User-Agent"].encode("latin-1") for method, _, headers, _ in service.seen if method == "GET"] == [agent]


def test_a_url_with_raw_bytes_past_ascii_reaches_the_service_as_the_same_bytes(xllm, hub_api, service):
    """curl sends a URL as typed (``?metadata[topic]=café`` in raw UTF-8), and this server's own engine reads it as
    UTF-8; the forward rebuilt the URL from Tornado's latin-1 reading of those bytes, which httpx encoded again as
    UTF-8, so the service was asked about "cafÃ©" (a filter matched nothing, a model id named another model)."""
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(xllm["url"])

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(f"GET {url.path}/models?topic=".encode() + "café".encode() + b"&a=%C3%A9 HTTP/1.1\r\n"
                     + f"Host: {url.netloc}\r\nAuthorization: token {xllm['token']}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]

    xllm["run"](body())
    assert [path for method, path, _, _ in service.seen if method == "GET"] == ["/services/xllm/v1/models?topic=caf%C3%A9&a=%C3%A9"]


@pytest.mark.parametrize("cut_event", [b"", b'data: {"id": "c1", "object": "chat.completion.chunk", "choi'],
                         ids=["between events", "mid event"])
def test_a_forwarded_stream_the_service_breaks_off_ends_in_an_error_event(xllm, hub_api, service, cut_event):
    """The service dropped the connection mid-stream (stopped, restarted): this server ended its own stream as if it
    were whole, so the openai SDK, the magics and widgets took the first piece for the whole answer.

    Mid event (a crash with a write half sent): the error event was written straight after the half, and the two read
    as one malformed event, a JSON error in the openai SDK and "malformed stream event" in XllmClient, not the
    OpenAI-shaped error that says what happened."""
    from xllm_jupyter.client import AsyncXllmClient
    from xllm_jupyter.core.errors import XllmError

    service.break_off.set()
    service.cut_event = cut_event

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with openai.AsyncOpenAI(base_url=xllm["url"], api_key=xllm["token"], max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(model="hub-model", messages=MSG, stream=True)
            pieces = []
            with pytest.raises(openai.APIError, match="broke off before the answer was complete") as info:
                async for chunk in stream:
                    pieces.append(chunk.choices[0].delta.content)
            assert pieces == ["Hel"] and info.value.code == "hub_service_unavailable"
        async with AsyncXllmClient(xllm["url"], xllm["token"]) as client:
            pieces = []
            with pytest.raises(XllmError, match="broke off"):
                async for piece in client.stream_chat(MSG, "hub-model"):
                    pieces.append(piece)
            assert pieces == ["Hel"]

    xllm["run"](body())


def test_a_forwarded_model_load_may_take_longer_than_a_generations_read_timeout(xllm, hub_api, service, monkeypatch):
    """A load through this server waited for the service's answer only as long as any request (900 s), while the client
    waits up to an hour for a load: a big model's load ended in a 503 "could not be reached" and a hub re-lookup.
    Here (timeouts scaled down) the pool's read timeout is 0.3 s and the service's load takes 1.5 s."""
    from xllm_jupyter.extension import hub_forward, hub_link

    monkeypatch.setattr(hub_link, "TIMEOUT", httpx.Timeout(0.3, connect=10.0, pool=30.0))
    monkeypatch.setattr(hub_forward, "LONG_TIMEOUT", httpx.Timeout(30.0, connect=10.0, pool=30.0), raising=False)
    service.load_seconds = 1.5

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(headers={"Authorization": f"token {xllm['token']}"}, timeout=60) as c:
            r = await c.post(f"{xllm['root']}/admin/models/load", json={"model": "hub-model"})
            assert r.status_code == 200 and r.json()["loaded"] is True, r.text

    xllm["run"](body())


def test_a_forwarded_stream_written_a_byte_at_a_time_arrives_exactly_as_sent(xllm, hub_api, service):
    """Each event is held until its end comes: bytes that arrive one by one leave whole, none lost or repeated."""
    service.bytewise = True
    service.release.set()  # the whole stream at once: its two chunks and [DONE]

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(timeout=30) as h:
            async with h.stream("POST", xllm["url"] + "/chat/completions", headers={"Authorization": f"token {xllm['token']}"},
                                json={"model": "hub-model", "messages": MSG, "stream": True}) as r:
                got = b"".join([piece async for piece in r.aiter_raw()])
        assert got == bytes(service.sent) and got.endswith(b"data: [DONE]\n\n") and got.count(b"data:") == 3, got

    xllm["run"](body())


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r"])  # (CR-ended lines were held to the stream's end)
def test_the_relay_cuts_a_stream_in_any_pieces_into_whole_events(sep):
    """The relay's cutter, fed a byte at a time (and in uneven pieces): what it lets out is whole events, in order."""
    import random

    from xllm_jupyter.extension.hub_forward import EventCutter

    events = [b": keepalive" + sep, b"data: " + b"x" * 5000 + sep, b'data: {"a": 1}' + sep, b"data: [DONE]" + sep]
    stream = b"".join(events)
    cutter = EventCutter()
    assert [out for i in range(len(stream)) if (out := cutter.feed(stream[i:i + 1]))] == events
    assert not cutter.held
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), 12))
        cutter = EventCutter()
        pieces = [cutter.feed(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        assert b"".join(pieces) == stream and not cutter.held
        assert all(p.endswith(sep) for p in pieces if p), pieces  # never half an event
    cutter = EventCutter()  # the start of an event is held until its end comes
    assert (cutter.feed(b"data: 1" + sep + b"data: 2"), bytes(cutter.held)) == (b"data: 1" + sep, b"data: 2")
    assert (cutter.feed(sep[:1]), cutter.feed(sep[1:])) == (b"", b"data: 2" + sep)


def test_a_hub_service_that_cannot_be_reached_is_a_503_to_retry(xllm, monkeypatch):
    """The hub names the service, but its url answers nothing: an OpenAI-shaped 503, and still no local model."""
    api = _HubApi("server-token")  # the service's url: port 1, where nothing listens
    monkeypatch.setenv("JUPYTERHUB_API_URL", api.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-token")

    async def body() -> None:
        await start(xllm)
        await xllm["app"]._start_task
        async with httpx.AsyncClient(timeout=30) as h:
            r = await h.get(xllm["url"] + "/models", headers={"Authorization": f"token {xllm['token']}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "hub_service_unavailable"

    try:
        xllm["run"](body())
    finally:
        api.close()
    assert not xllm["app"].engine.is_loaded(TINY)
