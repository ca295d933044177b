"""A user server follows the hub's config when an admin changes it: a service added later, its URL mended, or
the service removed.

A real JupyterHub (tests/real_hub.py) first runs without the service; bob's Jupyter server (pytest-jupyter,
the xllm extension) hears 404 at start and serves from its own engine. The admin adds the service to the
config and restarts the hub; the server's background re-check finds it, forwards new requests, lets the
request in flight in its own engine finish there, and only then unloads its model. A server that
forwards to a URL it cannot reach asks the hub again and follows the URL the admin mends. A server that
forwards to the service goes back to its own engine once the admin removes the service and restarts the hub.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import textwrap
import threading
from typing import Any

import httpx
import pytest

from tests.helpers import free_port
from tests.real_hub import HubProcess
from tests.server_fixtures import TINY

pytest.importorskip("jupyterhub")

pytest_plugins = ("pytest_jupyter.jupyter_server",)

ADMIN_TOKEN = "recheck-admin-token-0123456789abcdef"
XLLM_SCOPES = ["access:services!service=xllm", "read:services!service=xllm"]
MSG = [{"role": "user", "content": "Say something."}]

#: the config's services and roles; the xllm service is the admin's later addition
HUB_TAIL = textwrap.dedent('''
    c.JupyterHub.services = [{xllm}{{"name": "test-admin", "api_token": "{admin}"}}]
    c.JupyterHub.load_roles = [
        {{"name": "user", "scopes": ["self", *{scopes!r}]}},
        {{"name": "test-admin", "services": ["test-admin"], "scopes": ["admin:users", "tokens"]}},
    ]
''')


class _Service(http.server.ThreadingHTTPServer):
    """The hub's xllm service, as far as this test needs it: ``GET .../v1/models`` lists "hub-model"; with
    ``?hold=1`` it answers once ``release`` is set (``holding`` is set meanwhile)."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.holding, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.authorizations.append(self.headers.get("Authorization", ""))
                path, _, query = self.path.partition("?")
                if query == "hold=1":
                    outer.holding.set()
                    outer.release.wait(120)
                found = path == "/services/xllm/v1/models"
                body = {"object": "list", "data": [{"id": "hub-model", "object": "model", "created": 0, "owned_by": "hub"}]}
                data = json.dumps(body if found else {"error": {"message": "no", "type": "invalid_request_error",
                                                                 "param": None, "code": None}}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def hub(tmp_path):
    """A real hub; ``begin(service_url)`` starts it (None: no xllm service yet) and returns bob's server token,
    ``tail(service_url)`` is the config's end for a restart, ``service`` the reachable stand-in."""
    service = _Service()
    proc = HubProcess(tmp_path)

    def tail(url: str | None) -> str:
        xllm = f'{{"name": "xllm", "url": "{url}"}}, ' if url else ""
        return HUB_TAIL.format(xllm=xllm, admin=ADMIN_TOKEN, scopes=XLLM_SCOPES)

    def begin(url: str | None) -> str:
        proc.start(tail(url))
        with httpx.Client(base_url=proc.api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30) as admin:
            assert admin.post("/users", json={"usernames": ["bob"]}).status_code == 201
            # as the hub makes a server's token with the doc's server_token_scopes (its note marks it as one)
            r = admin.post("/users/bob/tokens", json={"scopes": [*XLLM_SCOPES, "users:activity!user"],
                                                       "note": "Server at /user/bob/"})
            assert r.status_code == 201, r.text
        return r.json()["token"]

    try:
        yield {"proc": proc, "begin": begin, "tail": tail, "service": service,
               "url": f"http://127.0.0.1:{service.server_port}"}
    finally:
        service.release.set()
        proc.stop()
        service.shutdown()
        service.server_close()


@pytest.fixture
def jp_server_config(xllm_home):
    """Bob's server: the xllm extension, re-checking a "no" from the hub every fraction of a second."""
    return {
        "ServerApp": {"jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "hub_recheck_seconds": 0.3},
    }


def test_a_server_told_no_service_switches_to_it_once_the_admin_adds_it_and_restarts_the_hub(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Before: the 404 at start stood for the server's life; its own engine served until the user restarted it."""
    token = _bobs_server_env(hub, None, monkeypatch)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm"
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}

    async def engine_says(h: httpx.AsyncClient, engine: str) -> None:
        while (await h.get("/health")).json()["engine"] != engine:
            await asyncio.sleep(0.1)

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        assert ext.engine.is_loaded(TINY) and os.environ["XLLM_BASE_URL"] == root + "/v1"  # the 404: its own engine
        release = asyncio.Event()
        generate = ext.engine.generate

        async def held(request: Any):  # a generation that is in flight in this server's engine during the switch
            async for n, event in _numbered(generate(request)):
                yield event
                if n == 0:
                    await release.wait()

        monkeypatch.setattr(ext.engine, "generate", held)
        chat = {"model": TINY, "messages": MSG, "max_tokens": 6, "stream": True}
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=120) as h:
            assert (await h.get("/health")).json()["engine"] == "local"
            async with h.stream("POST", "/v1/chat/completions", json=chat) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                while not (await anext(lines)).startswith("data:"):
                    pass
                await asyncio.to_thread(hub["proc"].restart, hub["tail"](hub["url"]))  # the admin adds the service
                await asyncio.wait_for(engine_says(h, "hub-service"), 60)
                models = await h.get("/v1/models")  # a new request: the hub's service answers it, as bob
                assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["hub-model"]
                assert hub["service"].authorizations[-1] == f"token {token}"
                assert "XLLM_BASE_URL" not in os.environ  # kernels started from now on find the service
                assert ext.engine.is_loaded(TINY)  # not unloaded under the request still generating here
                release.set()
                rest = [line async for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
            done = [json.loads(line[5:]) for line in rest[:-1]]
            assert done[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            await asyncio.wait_for(ext._retire_task, 60)
        assert not ext.engine.loaded_models(include_loading=True)  # unloaded once that request ended

    jp_asyncio_loop.run_until_complete(body())


def test_a_server_forwarding_to_a_url_it_cannot_reach_follows_the_url_the_admin_mends(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Before: the URL found at start stood for the server's life; after the admin mended it (a 127.0.0.1 that
    the user containers cannot reach, say) and restarted the hub, every request still got 503."""
    from xllm_jupyter.extension import hub_link

    dead = f"http://127.0.0.1:{free_port()}"
    _bobs_server_env(hub, dead, monkeypatch)
    monkeypatch.setattr(hub_link, "RETRY_SECONDS", 0.0)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    ext.hub_recheck_seconds = 0.0  # the forward's own ask, not the periodic re-check (which follows a move too)
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm"
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        link = ext._hub_link
        first = link.upstream
        assert link.state == "hub-service" and first.service.root == dead + "/services/xllm/"
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=60) as h:
            r = await h.get("/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] == "hub_service_unavailable"
            await asyncio.to_thread(hub["proc"].restart, hub["tail"](hub["url"]))  # the admin mends the URL
            assert (await h.get("/v1/models")).status_code == 503  # this one finds the URL gone: the hub is asked
            await asyncio.wait_for(_until(lambda: link.upstream is not first), 30)
            r = await h.get("/v1/models")  # the client's retry
            assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["hub-model"]
        assert link.upstream.service.root == hub["url"] + "/services/xllm/"
        await asyncio.wait_for(_until(lambda: first.client.is_closed), 10)  # the old pool, unused, is closed
        assert not ext.engine.loaded_models(include_loading=True)

    jp_asyncio_loop.run_until_complete(body())


def test_a_server_forwarding_to_the_service_serves_from_its_own_engine_once_the_admin_removes_it(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Before: the service found at start stood for the server's life; once the admin removed it (and restarted
    the hub), every request got 503 until the user restarted their server. The request forwarded when the
    admin removes it still gets the service's answer."""
    _bobs_server_env(hub, hub["url"], monkeypatch)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm"
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}
    service = hub["service"]

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        link = ext._hub_link
        first = link.upstream
        assert link.state == "hub-service" and first is not None
        assert not ext.engine.loaded_models(include_loading=True) and "XLLM_BASE_URL" not in os.environ
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=120) as h:
            held = asyncio.ensure_future(h.get("/v1/models", params={"hold": "1"}))  # forwarded, answered later
            await asyncio.to_thread(service.holding.wait, 60)
            await asyncio.to_thread(hub["proc"].restart, hub["tail"](None))  # the admin removes the service
            await asyncio.wait_for(_until(lambda: link.state == "local"), 60)
            assert (await h.get("/health")).json()["engine"] == "local"
            assert os.environ["XLLM_BASE_URL"] == root + "/v1"  # kernels started from now on come here
            r = await h.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 3, "seed": 7})
            assert r.status_code == 200, r.text  # this server's engine answers (was a 503 until a restart)
            assert r.json()["model"] == TINY and r.json()["usage"]["completion_tokens"] == 3
            models = await h.get("/v1/models")
            assert models.status_code == 200 and TINY in [m["id"] for m in models.json()["data"]]
            assert "hub-model" not in [m["id"] for m in models.json()["data"]]
            assert not first.client.is_closed  # the forwarded request still uses its pool
            service.release.set()
            r = await held
            assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["hub-model"]
        await asyncio.wait_for(_until(lambda: first.client.is_closed), 10)  # closed once that request ended
        await asyncio.wait_for(_until(lambda: ext.engine.is_loaded(TINY)), 60)  # the default model, loaded again

    jp_asyncio_loop.run_until_complete(body())


def test_a_forward_that_finds_the_service_gone_asks_the_hub_and_serves_locally_once_it_was_removed(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Without periodic re-checks (``hub_recheck_seconds = 0``): a forward that finds the service not answering
    asks the hub, and its 404 (the admin removed the service) puts this server back on its own engine for the
    client's retry. Before, the 503 stood until the server restarted."""
    from xllm_jupyter.extension import hub_link

    _bobs_server_env(hub, f"http://127.0.0.1:{free_port()}", monkeypatch)  # a service that no longer answers
    monkeypatch.setattr(hub_link, "RETRY_SECONDS", 0.0)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    ext.hub_recheck_seconds = 0.0
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm"
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        link = ext._hub_link
        assert link.state == "hub-service" and not link.rechecking
        await asyncio.to_thread(hub["proc"].restart, hub["tail"](None))  # the admin removes the service
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=120) as h:
            r = await h.get("/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] == "hub_service_unavailable"
            await asyncio.wait_for(_until(lambda: link.state == "local"), 30)
            r = await h.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "seed": 7})
            assert r.status_code == 200, r.text  # the client's retry: this server's engine answers
            assert r.json()["usage"]["completion_tokens"] == 2
        assert link.upstream is None and not link.rechecking
        assert os.environ["XLLM_BASE_URL"] == root + "/v1"

    jp_asyncio_loop.run_until_complete(body())


def _bobs_server_env(hub: dict, service_url: str | None, monkeypatch: pytest.MonkeyPatch) -> str:
    """Start the hub (with the xllm service at ``service_url``) and give bob's server its hub variables."""
    token = hub["begin"](service_url)
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub["proc"].api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    return token


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)


async def _numbered(events: Any):
    n = 0
    async for event in events:
        yield n, event
        n += 1
