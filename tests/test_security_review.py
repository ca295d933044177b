"""Findings of the adversarial security review (session 27), each pinned by a real server test."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from jupyter_server.auth.identity import IdentityProvider, User

from tests import test_extension as extension_tests  # its stand-ins for the hub API and the hub service
from tests.server_fixtures import make_test_config
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.standalone import start_server

pytest_plugins = ("pytest_jupyter.jupyter_server",)

EVIL = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}


async def test_keyless_server_with_wildcard_cors_still_refuses_other_sites(tiny_catalog, tmp_path, caplog):
    """``http.cors_origins: ["*"]`` on a keyless (loopback, everyone-is-admin) server must not hand every web page
    the server: any site the local user visited could pull local paths into the store, unload models, and
    read the stored chat completions. A keyless server trusts only origins listed by name."""
    base = make_test_config(tmp_path, api_keys=())
    config = dataclasses.replace(base, http=dataclasses.replace(base.http, cors_origins=("*",)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    with caplog.at_level("WARNING", logger="xllm_jupyter.server"):
        server = await start_server(config, engine, port=0)
    try:
        assert "cors_origins" in caplog.text  # the operator learns the wildcard is ignored, and why
        async with httpx.AsyncClient(base_url=server.url) as c:
            body = '{"model": "tiny", "messages": []}'  # a 400 once past the origin check: nothing runs
            for path in ("/v1/chat/completions", "/admin/models/pull", "/admin/models/unload"):
                r = await c.post(path, content=body, headers={**EVIL, "Content-Type": "text/plain"})
                assert r.status_code == 403, (path, r.status_code, r.text)
                assert r.json()["error"]["type"] == "permission_error"
            # a read of the local user's data is not shared with the page either
            r = await c.get("/v1/chat/completions", headers=EVIL)
            assert "Access-Control-Allow-Origin" not in r.headers
            r = await c.options("/v1/chat/completions", headers={**EVIL, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 403
            # the local user's own requests (no browser headers, or this server's own origin) are served
            r = await c.post("/v1/chat/completions", content=body)
            assert r.status_code == 400
            r = await c.post("/v1/chat/completions", content=body, headers={"Origin": server.url})
            assert r.status_code == 400
    finally:
        await server.stop()
        await engine.stop()


async def test_keyed_server_keeps_wildcard_cors(tiny_catalog, tmp_path):
    """With API keys the key is the guard: ``["*"]`` lets any page call with its key, as documented."""
    base = make_test_config(tmp_path)
    config = dataclasses.replace(base, http=dataclasses.replace(base.http, cors_origins=("*",)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.options("/v1/chat/completions", headers={**EVIL, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 204
            r = await c.get("/v1/models", headers=EVIL)  # no key: refused, but the page may read why
            assert r.status_code == 401 and r.headers.get("Access-Control-Allow-Origin") == "*"
    finally:
        await server.stop()
        await engine.stop()


# ------------------------------------------------------------- the Jupyter extension with several users
# A JupyterHub single-user server can be shared (JupyterHub 5 sharing, granular jupyter_server scopes):
# its identity provider then names each real user, and only the server's owner is the extension's admin.


TOKENS = {"alice-token": "alice", "bob-token": "bob"}


class TwoUsersProvider(IdentityProvider):
    """Two hub-like users, told apart by their token (as JupyterHub's provider tells hub users apart)."""

    async def get_user(self, handler):
        """The user whose token the request carries."""
        scheme, _, token = (handler.request.headers.get("Authorization") or "").partition(" ")
        name = TOKENS.get(token.strip()) if scheme.lower() in ("token", "bearer") else None
        if name is None:
            return None
        handler._token_authenticated = True
        return User(name)


@pytest.fixture
def jp_server_config(xllm_home):
    """The extension on a server whose owner is alice, shared with bob."""
    return {
        "ServerApp": {
            "jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
            "identity_provider_class": f"{__name__}.TwoUsersProvider",
        },
        "XllmApp": {"home": str(xllm_home), "preload": False},
    }


def test_a_shared_servers_admin_routes_are_its_owners(jp_serverapp, jp_fetch, jp_asyncio_loop, monkeypatch):
    """Bob, let into alice's server, read every user's usage and counts (/admin/usage, /metrics) and could
    pull, load and unload models: the extension never checked ``admin_only``. Now only the owner may."""
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    from tornado.httpclient import HTTPClientError

    async def call(token, method, *path, body=None):
        try:
            r = await jp_fetch("xllm", *path, method=method, body=body, headers={"Authorization": f"token {token}"})
            return r.code, r.body
        except HTTPClientError as exc:
            return exc.code, exc.response.body if exc.response else b""

    async def scenario():
        for method, path, body in (("GET", ("admin", "usage"), None), ("GET", ("metrics",), None),
                                   ("GET", ("admin", "stats"), None), ("GET", ("admin", "models"), None),
                                   ("POST", ("admin", "models", "unload"), b'{"model": "tiny"}'),
                                   ("POST", ("admin", "models", "pull"), b'{"model": "/etc"}'),
                                   # its URLs relay chats with the owner's token: another way to act as the owner
                                   ("POST", ("playground",), b"")):
            code, text = await call("bob-token", method, *path, body=body)
            assert code == 403, (path, code, text)
            assert json.loads(text)["error"]["type"] == "permission_error"
        code, text = await call("alice-token", "GET", "admin", "usage")
        assert code == 200 and json.loads(text)["object"] == "list"
        code, _ = await call("bob-token", "GET", "v1", "models")  # bob still uses the API itself
        assert code == 200

    jp_asyncio_loop.run_until_complete(scenario())




@pytest.fixture
def service():
    """The hub's xllm service (a recording stand-in)."""
    svc = extension_tests._Service()
    yield svc
    svc.close()


@pytest.fixture
def hub_api(monkeypatch, service):
    """A single-user server's environment on a hub whose xllm service this server's token may read."""
    api = extension_tests._HubApi("server-token", service.url)
    monkeypatch.setenv("JUPYTERHUB_API_URL", api.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-token")
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    yield api
    api.close()


def test_a_shared_server_forwards_only_its_owners_requests_to_the_hub_service(jp_serverapp, jp_fetch, jp_asyncio_loop,
                                                                            monkeypatch, hub_api, service):
    """Forwarded requests carry the server's own hub token, so the service answers them as the owner: bob, let
    into alice's server, used alice's quota and read alice's stored chat completions and responses there.
    Now only the owner's requests are forwarded; others get a 403 and nothing reaches the service."""
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    from tornado.httpclient import HTTPClientError

    async def scenario():
        await jp_serverapp._post_start()  # the extension's start hook: asks the (stand-in) hub, finds the service
        for path in (("v1", "models"), ("v1", "chat", "completions"), ("v1", "responses", "resp_1")):
            try:
                r = await jp_fetch("xllm", *path, headers={"Authorization": "token bob-token"})
                code, text = r.code, r.body
            except HTTPClientError as exc:
                code, text = exc.code, exc.response.body
            assert code == 403, (path, code, text)
            assert json.loads(text)["error"]["type"] == "permission_error"
        assert service.seen == []  # nothing of bob's went upstream as alice
        r = await jp_fetch("xllm", "v1", "models", headers={"Authorization": "token alice-token"})
        assert r.code == 200 and json.loads(r.body)["data"][0]["id"] == "hub-model"
        assert [(m, p) for m, p, _, _ in service.seen] == [("GET", "/services/xllm/v1/models")]

    jp_asyncio_loop.run_until_complete(scenario())
