"""How a kernel finds the engine: connect() > XLLM_BASE_URL > the JupyterHub service > a private server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.client import (
    ServerLocation,
    discovery,
    find_server,
    get_async_client,
    get_client,
    locate,
)
from xllm_jupyter.client.base import ServerUnavailable
from xllm_jupyter.core.errors import AuthenticationError, XllmError

HUB_TOKEN = "hub-user-token"


@pytest.fixture(autouse=True)
def clean_discovery(monkeypatch) -> Iterator[None]:
    """No connect() choice and no discovery variables leak into or out of a test."""
    for key in ("XLLM_BASE_URL", "XLLM_API_KEY", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN", "XLLM_HUB_SERVICE", "XLLM_MODEL"):
        monkeypatch.delenv(key, raising=False)
    discovery.disconnect()
    yield
    discovery.disconnect()


class FakeHub:
    """A real HTTP server answering the hub's ``GET /hub/api/services/<name>`` for one token."""

    def __init__(self, services: dict[str, Any]):
        self.services = services
        self.seen: list[tuple[str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.seen.append((self.path, self.headers.get("Authorization")))
                name = self.path.removeprefix("/hub/api/services/")
                if self.headers.get("Authorization") != f"token {HUB_TOKEN}":
                    status, body = 403, {"status": 403, "message": "Forbidden"}
                elif isinstance(hub.services.get(name), int):  # the status the hub (or its proxy) answers now
                    status, body = hub.services[name], {"status": hub.services[name], "message": "unavailable"}
                elif name in hub.services:
                    status, body = 200, hub.services[name]
                else:
                    status, body = 404, {"status": 404, "message": "Not Found"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/hub/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    h = FakeHub({
        "xllm": {"kind": "service", "name": "xllm", "url": "http://gpu-node:8900", "prefix": "/hub-base/services/xllm/"},
        "named-only": {"kind": "service", "name": "named-only", "admin": False},  # a token without read:services
    })
    yield h
    h.close()


def test_nothing_configured_finds_nothing():
    assert find_server({}) is None
    with pytest.raises(XllmError, match="no xllm server found"):
        locate(start_local=False)


def test_the_extension_variables():
    loc = find_server({"XLLM_BASE_URL": "http://127.0.0.1:8888/base/xllm/v1/", "XLLM_API_KEY": "jupyter-token"})
    assert loc == ServerLocation("http://127.0.0.1:8888/base/xllm/v1", "jupyter-token", "extension")
    assert "jupyter-token" not in repr(loc)  # never printed in an output or a log
    assert find_server({"XLLM_BASE_URL": "127.0.0.1:8900"}) == ServerLocation("http://127.0.0.1:8900/v1", None, "extension")


def test_the_hub_service(hub):
    env = {"JUPYTERHUB_API_URL": hub.api_url, "JUPYTERHUB_API_TOKEN": HUB_TOKEN, "JUPYTERHUB_BASE_URL": "/hub-base/"}
    loc = find_server(env)
    assert loc == ServerLocation("http://gpu-node:8900/hub-base/services/xllm/v1", HUB_TOKEN, "hub")
    assert hub.seen == [("/hub/api/services/xllm", f"token {HUB_TOKEN}")]
    assert find_server(env) == loc and len(hub.seen) == 1  # cached: cells do not each ask the hub
    # XLLM_BASE_URL (the extension in this very server) wins over the hub
    assert find_server({**env, "XLLM_BASE_URL": "http://127.0.0.1:1/v1"}).source == "extension"
    # a service model without url/prefix (token lacks read:services): the public hub URL and the usual prefix
    named = {**env, "XLLM_HUB_SERVICE": "named-only", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/hub-base/hub/"}
    assert find_server(named) == ServerLocation("https://hub.example.org/hub-base/services/named-only/v1", HUB_TOKEN, "hub")


def test_hub_failures_are_skipped_quietly(hub, caplog):
    caplog.set_level(logging.DEBUG, logger="xllm_jupyter.client")
    base = {"JUPYTERHUB_API_URL": hub.api_url, "JUPYTERHUB_API_TOKEN": HUB_TOKEN}
    assert find_server({**base, "JUPYTERHUB_API_TOKEN": "wrong"}) is None  # 403
    assert find_server({**base, "XLLM_HUB_SERVICE": "absent"}) is None  # 404
    assert find_server({**base, "XLLM_HUB_SERVICE": "named-only"}) is None  # no URL and no public hub URL known
    assert find_server({"JUPYTERHUB_API_URL": hub.api_url}) is None  # no token: not even asked
    assert len(hub.seen) == 3
    assert any("no hub service" in r.message for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_hub_that_does_not_answer_is_retried_and_starts_no_private_engine(hub, monkeypatch):
    """A hub restarting (refused, or its proxy's 503) is not "no service": taken for one (and kept for a minute), the
    kernel started a private engine beside the hub's, loading the default model in the user's server."""
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:9/hub/api")  # nothing listens: the hub is down
    with pytest.raises(ServerUnavailable, match="did not answer the look-up of its xllm service"):
        locate(start_local=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api_url)
    service = hub.services["xllm"]
    hub.services["xllm"] = 503  # up again, behind a proxy that has no route to it yet
    with pytest.raises(ServerUnavailable, match="it answered 503"):
        locate(start_local=False)
    assert discovery._local is None  # no private server was started
    hub.services["xllm"] = service
    assert locate(start_local=False).source == "hub"  # the next cell finds the service: nothing kept the failure


def test_connect_wins_and_is_verified(xllm_server):
    loc = discovery.connect(xllm_server.base_url, xllm_server.api_key)
    assert loc == ServerLocation(xllm_server.base_url, xllm_server.api_key, "connect")
    assert find_server({"XLLM_BASE_URL": "http://127.0.0.1:1/v1"}) == loc  # over the extension's variables
    import xllm_jupyter

    assert xllm_jupyter.connect is discovery.connect  # the notebook-facing name
    with get_client() as c:
        assert c.chat("Hi", TINY, max_tokens=3, temperature=0)
    with pytest.raises(AuthenticationError, match="refused the token"):
        discovery.connect(xllm_server.base_url, "wrong-token")
    with pytest.raises(XllmError, match="no xllm server at http://127.0.0.1:9"):
        discovery.connect("http://127.0.0.1:9/v1")
    assert find_server({}) == loc  # failed attempts keep the working choice
    discovery.disconnect()
    assert find_server({}) is None


def test_connect_to_a_url_of_another_scheme_says_so():
    """It said "no xllm server at http://ftp://x:1": the client put http:// in front of any scheme."""
    import xllm_jupyter

    for connect in (discovery.connect, xllm_jupyter.connect):
        with pytest.raises(XllmError, match=r"^'ftp://x:1' is not a server URL \(use http:// or https://\)$"):
            connect("ftp://x:1")
    assert find_server({}) is None  # nothing was connected


def test_connect_without_url_uses_what_discovery_finds(xllm_server, monkeypatch):
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    assert discovery.connect() == ServerLocation(xllm_server.base_url, xllm_server.api_key, "connect")


def test_connect_to_the_url_the_environment_names_takes_its_key(xllm_server, monkeypatch):
    """`%xllm connect URL` where no token can be asked says to set XLLM_BASE_URL and XLLM_API_KEY: connecting to that
    URL then sent no key at all (a 401), though the key is the one XLLM_BASE_URL's server takes."""
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    assert discovery.connect(xllm_server.base_url + "/") == ServerLocation(xllm_server.base_url, xllm_server.api_key,
                                                                           "connect")
    monkeypatch.setenv("XLLM_BASE_URL", "http://127.0.0.1:9/v1")  # another server's key: not sent here
    with pytest.raises(AuthenticationError):
        discovery.connect(xllm_server.base_url)


def test_connect_without_a_token_says_none_was_sent(xllm_server, monkeypatch):
    """`%xllm connect URL` to a server XLLM_BASE_URL does not name sends no token (XLLM_API_KEY is held back); the 401
    read "refused the token", sending the user to check a token that never went."""
    monkeypatch.setenv("XLLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    with pytest.raises(AuthenticationError, match=r"needs a token and none was sent \(XLLM_API_KEY goes only to the "
                                                  r"server XLLM_BASE_URL names\): pass one") as info:
        discovery.connect(xllm_server.base_url)
    assert "refused" not in info.value.message
    monkeypatch.delenv("XLLM_API_KEY")
    with pytest.raises(AuthenticationError, match="needs a token and none was sent: pass one"):
        discovery.connect(xllm_server.base_url)
    with pytest.raises(AuthenticationError, match="refused the token"):
        discovery.connect(xllm_server.base_url, "wrong")


def test_the_key_is_never_sent_to_another_server(xllm_server, monkeypatch):
    # XLLM_API_KEY belongs to XLLM_BASE_URL: a client for a connect()ed server must not fall back to it
    monkeypatch.setenv("XLLM_API_KEY", "the-jupyter-token")
    client = discovery.client_for(ServerLocation(xllm_server.base_url, None, "connect"))
    assert "authorization" not in {k.lower() for k in client._http.headers}
    client.close()


def test_private_server_when_nothing_is_found(xllm_home, monkeypatch, caplog, capsys):
    """No connect, no variables, no hub: a private `xllm serve` child for this process, stopped on request."""
    from xllm_jupyter.magics.session import MagicState

    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.setenv("XLLM_MODEL", TINY)
    monkeypatch.setenv("XLLM_ENGINE_TORCH_THREADS", "1")
    monkeypatch.setenv("XLLM_SERVER_API_KEYS", "inherited-key")  # the private server must not take it
    caplog.set_level(logging.WARNING, logger="xllm_jupyter.client")
    try:
        loc = MagicState().locate()  # as %%xllm finds it: the notice is the magic's own stderr line
        assert loc.source == "in-process" and loc.private and loc.base_url.startswith("http://127.0.0.1:")
        assert loc.api_key and loc.api_key.startswith("sk-xllm-private-")
        assert locate() == loc and find_server() == loc  # started once
        said = capsys.readouterr().err.splitlines()
        assert said == [f"xllm: {discovery.PRIVATE_START_NOTICE}"] and "kernel (process) only" in said[0]
        assert not [r for r in caplog.records if "private" in r.message]  # said once, not again in the log
        with get_client() as c:
            assert TINY in [m["id"] for m in c.loaded()]  # XLLM_MODEL was loaded at start
            assert c.chat("Hi", TINY, max_tokens=3, temperature=0)

        async def ask() -> str:
            async with get_async_client() as ac:
                return await ac.chat("Hi", TINY, max_tokens=3, temperature=0)

        assert asyncio.run(ask())
        # loopback only, and the random key is required
        import httpx

        assert httpx.get(loc.base_url + "/models").status_code == 401
        assert httpx.get(loc.base_url + "/models", headers={"Authorization": "Bearer inherited-key"}).status_code == 401
        process = discovery._local.process
        # the key is not on the command line, where any local user reads it (ps, /proc)
        assert loc.api_key not in " ".join(process.args)
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            assert loc.api_key.encode() not in f.read()
    finally:
        discovery.stop_local()
    assert process.poll() is not None
    assert find_server({}) is None


def test_private_server_sends_nothing_to_a_port_another_process_took(xllm_home, monkeypatch):
    """Another local user binding the picked port before the child does must not receive the key or prompts."""
    seen: list[str] = []

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # answers ready, as a fake xllm would
            seen.append(str(self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.setenv("XLLM_ENGINE_DEFAULT_MODEL", "")
    monkeypatch.setattr(discovery, "_free_port", lambda: impostor.server_address[1])
    try:
        with pytest.raises(XllmError, match="another process took port"):
            locate()
        assert seen == [] and discovery._local is None
    finally:
        impostor.shutdown()
        impostor.server_close()
        discovery.stop_local()
