"""XllmClient / AsyncXllmClient against the real standalone server serving the tiny Llama."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

import xllm_jupyter
from tests.helpers import free_port
from tests.server_fixtures import TINY
from xllm_jupyter.client import AsyncXllmClient, ServerUnavailable, XllmClient, resolve_base_url
from xllm_jupyter.client.base import root_url
from xllm_jupyter.core.errors import AuthenticationError, InvalidRequest, ModelNotFound, NotFound, XllmError
from xllm_jupyter.store.store import ModelStore

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture
def client(xllm_server):
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        yield c


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ------------------------------------------------------------------------ URLs
def test_base_url_defaults_and_env(monkeypatch):
    monkeypatch.delenv("XLLM_BASE_URL", raising=False)
    assert resolve_base_url() == "http://127.0.0.1:8900/v1"
    monkeypatch.setenv("XLLM_BASE_URL", "http://example.test:8888/lab-base/xllm/v1/")
    c = XllmClient()
    try:
        assert c.base_url == "http://example.test:8888/lab-base/xllm/v1"
        assert c.admin_url == "http://example.test:8888/lab-base/xllm/admin"
        assert c.root_url == "http://example.test:8888/lab-base/xllm"
    finally:
        c.close()
    # a pasted server root gets /v1, an explicit argument beats the environment
    assert resolve_base_url("127.0.0.1:9000") == "http://127.0.0.1:9000/v1"
    assert root_url("http://h:1/v1") == "http://h:1"


def test_a_url_of_another_scheme_is_refused_not_prefixed():
    """``ftp://x:1`` became ``http://ftp://x:1/v1``, so connecting said "no xllm server at http://ftp://x:1"."""
    for url in ("ftp://x:1", " ws://h:8900/v1", "file:///tmp/sock"):
        with pytest.raises(InvalidRequest, match=r"is not a server URL \(use http:// or https://\)") as info:
            resolve_base_url(url)
        assert info.value.param == "url" and "http://ftp" not in info.value.message
        with pytest.raises(InvalidRequest, match="is not a server URL"):
            XllmClient(url)
    assert resolve_base_url("HTTPS://h:1") == "HTTPS://h:1/v1"  # a scheme in capitals is still http(s)
    assert resolve_base_url("localhost:8900") == "http://localhost:8900/v1"  # host:port has no scheme


def test_api_key_from_env(monkeypatch, xllm_server):
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    with XllmClient() as c:
        assert any(m["id"] == TINY for m in c.models())


def test_a_client_for_another_server_does_not_send_the_environments_key(monkeypatch):
    """``XllmClient(url)`` without a key sent ``XLLM_API_KEY`` to any server; in a Jupyter kernel that is the Jupyter
    server's token (the extension exports it), so a client built for another server carried it there."""
    monkeypatch.setenv("XLLM_BASE_URL", "http://127.0.0.1:8888/lab/xllm/v1")
    monkeypatch.setenv("XLLM_API_KEY", "the-jupyter-token")

    def keys(make) -> list:
        made = [make("http://gpu-box:8900/v1"), make("http://127.0.0.1:8888/lab/xllm/v1/"), make(), make("http://x/v1", "k")]
        return made, [(c.api_key, c._http.headers.get("Authorization")) for c in made]

    with contextlib.ExitStack() as stack:
        made, sync_keys = keys(XllmClient)
        for c in made:
            stack.enter_context(c)

    async def main():
        made, async_keys = keys(AsyncXllmClient)
        for c in made:
            await c.aclose()
        return async_keys

    for found in (sync_keys, asyncio.run(main())):
        assert found == [(None, None), ("the-jupyter-token", "Bearer the-jupyter-token"),
                         ("the-jupyter-token", "Bearer the-jupyter-token"), ("k", "Bearer k")]


def test_the_environments_key_goes_to_its_server_however_the_url_is_spelled(monkeypatch):
    """``env_key_for`` compared URLs as text: ``http://Host:80/xllm`` and ``HTTP://host/xllm/v1`` are the server
    ``XLLM_BASE_URL`` names, yet got no key (a 401). Another host, port, scheme or path still gets none: not even
    ``localhost`` for ``127.0.0.1`` (``::1`` may answer there), nor another user's path behind one hub proxy."""
    from xllm_jupyter.client.base import env_key_for

    monkeypatch.setenv("XLLM_API_KEY", "the-jupyter-token")
    monkeypatch.setenv("XLLM_BASE_URL", "http://Hub.example.org/user/alice/xllm/v1")
    same = ["http://hub.example.org:80/user/alice/xllm", "HTTP://HUB.EXAMPLE.ORG/user/alice/xllm/v1/",
            "hub.example.org/user/alice/xllm/", "http://hub.example.org/user/%61lice/xllm/v1"]
    other = ["https://hub.example.org/user/alice/xllm/v1", "http://hub.example.org:8080/user/alice/xllm/v1",
             "http://hub.example.org/user/bob/xllm/v1", "http://hub.example.org/user/Alice/xllm/v1",
             "http://hub.example.org.evil/user/alice/xllm/v1", "http://127.0.0.1/user/alice/xllm/v1"]
    assert [env_key_for(url) for url in same] == ["the-jupyter-token"] * len(same)
    assert [env_key_for(url) for url in other] == [None] * len(other)
    monkeypatch.setenv("XLLM_BASE_URL", "https://127.0.0.1:8888/xllm/v1")
    assert env_key_for("https://127.0.0.1:8888/xllm") == "the-jupyter-token"
    assert [env_key_for(u) for u in ("https://localhost:8888/xllm", "https://[::1]:8888/xllm", "https://127.0.0.1/xllm")] == [None] * 3
    monkeypatch.delenv("XLLM_BASE_URL")  # the default URL's server (https's default port is 443, http's 80)
    assert env_key_for("HTTP://127.0.0.1:8900") == "the-jupyter-token" and env_key_for("http://127.0.0.1:80/v1") is None
    monkeypatch.setenv("XLLM_BASE_URL", "ftp://h/v1")  # names no server: its key goes nowhere
    assert env_key_for("http://h/v1") is None
    monkeypatch.setenv("XLLM_BASE_URL", "http://xn--:8000/v1")  # a host httpx cannot decode: no server either
    assert env_key_for("http://xn--:8000/v1") is None and env_key_for("http://h/v1") is None
    with XllmClient("http://h:80/v1") as c:
        assert c.api_key is None


# ---------------------------------------------------------------- admin routes
def test_health_models_and_loaded(client):
    assert client.health()["status"] == "ok"
    assert TINY in [m["id"] for m in client.models()]
    loaded = {m["id"]: m for m in client.loaded()}
    assert loaded[TINY]["backend"] == "transformers"
    assert "details" in loaded[TINY]


def _read_timeouts():
    """A list of (path, read timeout) pairs and the sync and async httpx request hooks that fill it."""
    seen = []

    def record(request):
        seen.append((request.url.path, request.extensions["timeout"]["read"]))

    async def arecord(request):
        record(request)

    return seen, record, arecord


def test_a_load_may_take_longer_than_a_generation(xllm_server):
    """A load reads a big model off a slow disk, or waits for room behind models in use, and the server goes on with it
    whether or not its caller waits; it had a generation's 300 s, so `xllm run BIG` and `%xllm load` ended with "did
    not answer in time" while the model went on loading. It waits an hour now, or what the caller chose."""
    seen, record, arecord = _read_timeouts()

    for timeout, read in ((None, 3600.0), (7.0, 7.0)):
        kw = {} if timeout is None else {"timeout": timeout}
        with XllmClient(xllm_server.base_url, xllm_server.api_key, **kw) as c:
            c._http.event_hooks["request"].append(record)
            c.load(TINY)
            c.models()

        async def main():
            async with AsyncXllmClient(xllm_server.base_url, xllm_server.api_key, **kw) as c:
                c._http.event_hooks["request"].append(arecord)
                await c.load(TINY)

        asyncio.run(main())
        probe = 30.0 if timeout is None else timeout  # the listing keeps its quick timeout
        assert seen == [("/admin/models/load", read), ("/v1/models", probe), ("/admin/models/load", read)], seen
        seen.clear()


def test_an_answer_not_streamed_may_take_longer_than_a_stream_waits_between_events(xllm_server):
    """A request not streamed gets nothing back until its whole answer is made: a model load first (minutes for a big
    one), a wait in the queue of a shared engine, then every token (a long answer on a CPU). It had 300 s, a gap a
    stream's keep-alives never leave, so `xllm_jupyter.chat(...)` (not streamed by default) and `%%xllm --no-stream`
    ended in "did not answer in time" and the server dropped the work. It waits as a load does (an hour), or what
    the caller chose; a stream keeps its 300 s between events."""
    seen, record, arecord = _read_timeouts()

    for timeout, read in ((None, 3600.0), (7.0, 7.0)):
        kw = {} if timeout is None else {"timeout": timeout}
        with XllmClient(xllm_server.base_url, xllm_server.api_key, **kw) as c:
            c._http.event_hooks["request"].append(record)
            xllm_jupyter.chat("Hi", TINY, client=c, max_tokens=1)
            list(c.stream_chat("Hi", TINY, max_tokens=1))

        async def main():
            async with AsyncXllmClient(xllm_server.base_url, xllm_server.api_key, **kw) as c:
                c._http.event_hooks["request"].append(arecord)
                await c.chat("Hi", TINY, max_tokens=1)

        asyncio.run(main())
        stream = 300.0 if timeout is None else timeout
        path = "/v1/chat/completions"
        assert seen == [(path, read), (path, stream), (path, read)], seen
        seen.clear()


def test_unload_and_load(client):
    try:
        assert client.unload(TINY)["unloaded"] is True
        assert TINY not in [m["id"] for m in client.loaded()]
        assert client.unload(TINY)["unloaded"] is False
    finally:
        client.load(TINY)
    assert TINY in [m["id"] for m in client.loaded()]


def test_default_model_is_first_loaded(client, monkeypatch):
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    assert client.default_model() == TINY
    monkeypatch.setenv("XLLM_MODEL", "other")
    assert client.default_model() == "other"


def test_a_chat_without_a_model_uses_the_default(client, xllm_server, monkeypatch):
    """As xllm_jupyter.chat does: no model given is default_model(), sync and async, streamed or not (it was a 400)."""
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    assert client.chat_completion("Hi", max_tokens=2, temperature=0)["model"] == TINY
    assert "".join(client.stream_chat("Hi", max_tokens=2, temperature=0))

    async def ask() -> str:
        async with AsyncXllmClient(xllm_server.base_url, xllm_server.api_key) as ac:
            return await ac.chat("Hi", max_tokens=2, temperature=0)

    assert asyncio.run(ask())


# ------------------------------------------------------------------- the store
def test_pull_streams_progress_then_the_manifest(client, tiny_llama_dir, xllm_home):
    """A pull into the session server's store (removed again): progress events, then success with the manifest."""
    try:
        *progress, result = client.pull(str(tiny_llama_dir), name="tiny-pulled")
        assert result["status"] == "success" and result["id"] == "tiny-pulled" and result["size"] > 0
        assert progress and all(e["status"] != "success" and "completed" in e for e in progress), progress
        assert result["digest"] and client.manifest("tiny-pulled")["digest"] == result["digest"]
        # a local source is named, never its path on the server
        assert result["source"] == client.manifest("tiny-pulled")["source"] == "local:" + tiny_llama_dir.resolve().name
        assert "tiny-pulled" in [m["id"] for m in client.models()]
    finally:
        with contextlib.suppress(ModelNotFound):
            ModelStore(xllm_home).rm("tiny-pulled")
    assert client.manifest()["server_version"] == xllm_jupyter.__version__
    # pulling what the store already holds (same files, same name) changes nothing: the path is compared with the
    # stored copy (its files hashed: "verify" progress), then success with the stored model as it was
    before = client.manifest(TINY)
    *checked, done = client.pull(str(tiny_llama_dir), name=TINY)
    assert {e["status"] for e in checked} <= {"verify"} and done["status"] == "success"
    assert (done["digest"], done["created"]) == (before["digest"], before["created"])


def test_pull_and_manifest_errors(client, xllm_server, tmp_path):
    with pytest.raises(XllmError, match="nothing-here") as info:
        list(client.pull(str(tmp_path / "nothing-here")))
    assert 400 <= info.value.status < 500
    with pytest.raises(NotFound):
        client.manifest("no-such-model")
    # a server without the pull route (here: a prefix no route has) says so rather than "404"
    with XllmClient(xllm_server.root + "/older/v1", xllm_server.api_key) as older:
        with pytest.raises(NotFound, match="cannot pull models"):
            list(older.pull("smollm2"))
    # the route's own 404 (a base model the store lacks) is the server's error, not "older than this client"
    with pytest.raises(ModelNotFound, match="base model 'no-such-base'") as info:
        list(client.pull("smollm2", name="never-pulled", base="no-such-base"))
    assert info.value.param == "base"

    async def pull_async() -> None:
        async with AsyncXllmClient(xllm_server.base_url, xllm_server.api_key) as aclient:
            async for _ in aclient.pull("smollm2", name="never-pulled", base="no-such-base"):
                pass

    with pytest.raises(ModelNotFound, match="base model 'no-such-base'"):
        asyncio.run(pull_async())


# ------------------------------------------------------------------------ chat
def test_chat_and_stream_agree(client):
    messages = [{"role": "user", "content": "Say hello"}]
    text = client.chat(messages, TINY, **GREEDY, ignore_eos=True)
    assert isinstance(text, str) and text
    pieces = list(client.stream_chat(messages, TINY, **GREEDY, ignore_eos=True))
    assert len(pieces) > 1  # really streamed, not one blob
    assert "".join(pieces) == text


def test_stream_chunks_with_usage(client):
    chunks = list(client.stream_chunks("hi", TINY, max_tokens=5, temperature=0, ignore_eos=True, stream_options={"include_usage": True}))
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length"


def test_closing_a_stream_cancels_on_the_server(client, xllm_server):
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    stream = client.stream_chat("Tell me a long story", TINY, max_tokens=1500, temperature=0, ignore_eos=True)
    next(stream)  # the first piece comes alone; the rest may come together (engine.stream_interval_ms)
    stream.close()
    assert wait_for(lambda: engine.stats(TINY).cancelled > before), "the server did not cancel the job"
    assert wait_for(lambda: engine.stats(TINY).running == 0)


# ---------------------------------------------------------------------- errors
def test_unknown_model_is_model_not_found(client):
    with pytest.raises(ModelNotFound) as info:
        client.chat("hi", "no-such-model")
    assert "no-such-model" in info.value.message
    assert info.value.status == 404
    with pytest.raises(ModelNotFound):
        list(client.stream_chat("hi", "no-such-model"))
    with pytest.raises(ModelNotFound):
        client.load("no-such-model")


def test_bad_parameter_is_invalid_request(client):
    with pytest.raises(InvalidRequest) as info:
        client.chat("hi", TINY, temperature=7)
    assert info.value.status == 400
    assert info.value.param == "temperature"


def test_wrong_key_is_authentication_error(xllm_server):
    with XllmClient(xllm_server.base_url, "wrong-key") as c:
        with pytest.raises(AuthenticationError) as info:
            c.models()
    assert info.value.status == 401 and info.value.message


def test_no_server_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with XllmClient(url) as c:
        with pytest.raises(ServerUnavailable) as info:
            c.models()
        assert "no xllm server at http://127.0.0.1:" in info.value.message
        assert "xllm serve" in info.value.message
        with pytest.raises(XllmError):
            list(c.stream_chat("hi", "m"))


# ----------------------------------------------------------------------- async
def test_async_client(xllm_server, tiny_llama_dir):
    async def main():
        async with AsyncXllmClient(xllm_server.base_url, xllm_server.api_key) as c:
            assert (await c.health())["status"] == "ok"
            assert TINY in [m["id"] for m in await c.models()]
            assert TINY in [m["id"] for m in await c.loaded()]
            text = await c.chat("Say hello", TINY, **GREEDY, ignore_eos=True)
            pieces = [p async for p in c.stream_chat("Say hello", TINY, **GREEDY, ignore_eos=True)]
            assert "".join(pieces) == text
            # two streams at once: both finish
            results = await asyncio.gather(*(c.chat(f"n{i}", TINY, max_tokens=4, temperature=0) for i in range(2)))
            assert all(isinstance(r, str) for r in results)
            with pytest.raises(ModelNotFound):
                async for _ in c.stream_chat("hi", "no-such-model"):
                    pass
            events = [e async for e in c.pull(str(tiny_llama_dir), name=TINY)]
            assert events[-1]["status"] == "success" and events[-1]["id"] == TINY
            assert (await c.manifest(TINY))["digest"] == events[-1]["digest"]

    asyncio.run(main())


def test_async_no_server():
    async def main():
        async with AsyncXllmClient(f"http://127.0.0.1:{free_port()}/v1") as c:
            with pytest.raises(ServerUnavailable):
                await c.health()

    asyncio.run(main())


@pytest.fixture
def not_xllm():
    """A real HTTP server that is not xllm: HTML at /page, a redirect at /moved, an HTML 404 at /missing."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            if self.path.startswith("/moved"):
                self.send_response(302)
                self.send_header("Location", "/login")
                self.end_headers()
                return
            body = b"<html><body>Jupyter login</body></html>"
            self.send_response(404 if self.path.startswith("/missing") else 200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_that_is_not_xllm_is_a_clear_error(not_xllm):
    with XllmClient(not_xllm + "/page/v1") as c:
        with pytest.raises(XllmError, match="did not answer like an xllm server"):
            c.models()
        with pytest.raises(XllmError, match="did not answer like an xllm server"):
            list(c.stream_chat("hi", "m"))
    with XllmClient(not_xllm + "/moved/v1") as c:
        with pytest.raises(XllmError, match="redirected to /login"):
            c.health()
    with XllmClient(not_xllm + "/missing/v1") as c:
        with pytest.raises(XllmError) as info:
            c.models()
        assert info.value.status == 404
        assert info.value.message == f"HTTP 404 Not Found from {not_xllm}/missing/v1/models (is this the xllm API URL?)"


@pytest.fixture
def cut_short_stream():
    """A real HTTP server whose chat stream sends one piece and then ends without ``[DONE]``: what a Tornado proxy
    (jupyter-server-proxy, a Jupyter server forwarding to a hub service) sends when its upstream fails mid-answer."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")  # then the response ends (HTTP/1.0)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_stream_that_ends_without_done_is_an_error_not_a_whole_answer(cut_short_stream, monkeypatch):
    """A stream cut short passed for the whole answer: `%%xllm`, `xllm run`, the widgets and `chat(stream=True)` showed
    its first pieces as if the model had finished. The pieces that came are kept; then the error says what happened."""
    from IPython.utils.capture import capture_output

    from tests.magic_shell import magic_shell

    pieces = []
    with XllmClient(cut_short_stream, "") as c:
        with pytest.raises(ServerUnavailable, match="ended before the answer was complete"):
            for piece in c.stream_chat("hi", "m"):
                pieces.append(piece)
    assert pieces == ["Hel"]

    async def main():
        async with AsyncXllmClient(cut_short_stream, "") as c:
            with pytest.raises(ServerUnavailable, match="ended before the answer was complete"):
                async for piece in c.stream_chat("hi", "m"):
                    pieces.append(piece)

    asyncio.run(main())
    assert pieces == ["Hel", "Hel"]
    from xllm_jupyter.client import discovery

    discovery.disconnect()  # no connect() left by an earlier test in this process: the variable names the server
    monkeypatch.setenv("XLLM_BASE_URL", cut_short_stream)
    monkeypatch.delenv("XLLM_API_KEY", raising=False)
    with magic_shell() as shell, capture_output() as cap:
        shell.run_cell_magic("xllm", "-m m", "hi")
    assert "Hel" in str(cap.outputs[-1].data.get("text/markdown")), cap.outputs
    assert cap.stderr.startswith("xllm: the stream from the xllm server at") and "ended before" in cap.stderr, cap.stderr


def test_xllm_run_puts_a_broken_streams_error_under_the_partial_reply(cut_short_stream, capsys):
    """`xllm run`: the error of a stream that broke off mid-answer was written on the partial reply's last line."""
    from xllm_jupyter.cli.chat import stream_reply

    with XllmClient(cut_short_stream, "") as c:
        with pytest.raises(ServerUnavailable, match="ended before the answer was complete"):
            stream_reply(c, [{"role": "user", "content": "hi"}], "m", {})
    assert capsys.readouterr().out == "Hel\n"


def test_xllm_runs_chat_goes_on_after_a_stream_cut_short(cut_short_stream, capsys, monkeypatch):
    """The interactive `xllm run` ended, conversation and all, when a stream broke off (a server or proxy restarting):
    it re-raised ServerUnavailable. Now the partial reply stays on screen with the error under it, the chat goes on,
    and the broken turn is not sent again (its partial reply would pass for a whole answer)."""
    from xllm_jupyter.cli import chat

    sent = []

    class Recording(XllmClient):
        def stream_chat(self, messages, model=None, **params):
            sent.append([dict(m) for m in messages])
            return super().stream_chat(messages, model, **params)

    lines = iter(["hi", "again", "/bye"])
    monkeypatch.setattr(chat, "_read_line", lambda *prompt: next(lines))
    history = [{"role": "system", "content": "be brief"}]
    with Recording(cut_short_stream, "") as c:
        chat.interactive(c, "m", history, {})
    out, err = capsys.readouterr()
    assert out == "Hel\nHel\n"
    assert err.count("Error: the stream from the xllm server at") == 2 and "ended before the answer was complete" in err
    assert [[m["content"] for m in turn] for turn in sent] == [["be brief", "hi"], ["be brief", "again"]]
    assert history == [{"role": "system", "content": "be brief"}]
