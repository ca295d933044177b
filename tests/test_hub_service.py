"""xllm as a JupyterHub service, against a real JupyterHub on loopback.

The hub runs as a subprocess (sqlite in tmp_path, DummyAuthenticator, an in-memory
proxy class so no configurable-http-proxy is needed); xllm is registered as an external
service and runs in this process, serving the tiny Llama. Tests talk to the service
port directly with hub tokens created through the hub's REST API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.browser import stop_process
from tests.helpers import free_port
from tests.real_hub import HUB_CONFIG_HEAD
from tests.server_fixtures import TINY, make_test_config
from xllm_jupyter.core.config import CacheConfig, HubConfig, QuotaConfig

pytest.importorskip("jupyterhub")

pytest_plugins = ("pytest_jupyter.jupyter_server",)

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
SERVICE_TOKEN = "xllm-service-token-0123456789abcdef"
USERS = ("alice", "bob", "carol", "dave")
ACCESS = ["access:services!service=xllm", "read:services!service=xllm"]
MANAGED_ACCESS = "access:services!service=xllm-managed"
MSG = [{"role": "user", "content": "Hi"}]


HUB_CONFIG = HUB_CONFIG_HEAD + '''c.JupyterHub.cleanup_servers = False
c.JupyterHub.services = [
    {{"name": "xllm", "url": "http://127.0.0.1:{service_port}", "api_token": "{service_token}", "oauth_no_confirm": True}},
    {{"name": "test-admin", "api_token": "{admin_token}"}},
    # managed: the hub runs `python -m xllm_jupyter.hub` itself and passes the JUPYTERHUB_* variables
    {{"name": "xllm-managed", "url": "http://127.0.0.1:{managed_port}", "command": {command!r},
      "environment": {managed_env!r}}},
]
c.JupyterHub.load_roles = [
    # every user may use the xllm service and look it up (what kernels need for discovery)
    {{"name": "user", "scopes": ["self", "access:services!service=xllm", "read:services!service=xllm",
                                "access:services!service=xllm-managed"]}},
    {{"name": "test-admin", "services": ["test-admin"],
      "scopes": ["admin:users", "admin:groups", "tokens", "access:services", "read:services"]}},
]
'''


@dataclasses.dataclass
class Hub:
    """The running hub and the xllm service registered with it."""

    api: str  # http://127.0.0.1:HUB/hub/api
    service_root: str  # http://127.0.0.1:SVC/services/xllm
    tokens: dict[str, str]
    context: Any  # the service's XllmContext
    loop: asyncio.AbstractEventLoop
    managed_root: str  # the hub-managed service (python -m xllm_jupyter.hub)

    def openai(self, user: str) -> openai.OpenAI:
        """An OpenAI SDK client with ``user``'s hub token."""
        return openai.OpenAI(base_url=self.service_root + "/v1", api_key=self.tokens[user], max_retries=0, timeout=120)

    def http(self, token: str | None) -> httpx.Client:
        """An httpx client for the service, with ``Authorization: token <token>`` when given."""
        headers = {"Authorization": f"token {token}"} if token else {}
        return httpx.Client(base_url=self.service_root, headers=headers, timeout=120)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail("jupyterhub exited early:\n" + log.read()[-3000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"jupyterhub did not answer {url} within {timeout} s")


def _start_service(config: Any, catalog: Any, env: dict[str, str], port: int) -> tuple[Any, ...]:
    """The xllm hub service on its own thread and IOLoop, with the tiny model loaded."""
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.service import start_hub_service

    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def setup() -> None:
        engine = Engine(config.engine, catalog=catalog)
        await engine.start()
        await engine.load(TINY)
        started["engine"] = engine
        started["service"] = await start_hub_service(config, engine, env, port=port)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(setup())
        except BaseException as exc:  # noqa: BLE001 - reported to the fixture
            started["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="xllm-hub-service", daemon=True)
    thread.start()
    return loop, thread, started, ready


@pytest.fixture(scope="module")
def hub(tmp_path_factory, xllm_home, tiny_catalog) -> Iterator[Hub]:
    """A real JupyterHub with xllm as an external service, four users and their tokens."""
    tmp = tmp_path_factory.mktemp("hub")
    hub_port, svc_port, managed_port = free_port(), free_port(), free_port()
    managed_env = {"XLLM_HOME": str(xllm_home), "XLLM_MODEL": TINY, "XLLM_ENGINE_TORCH_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "XLLM_CONFIG": str(tmp / "no-config.yaml")}
    (tmp / "jupyterhub_config.py").write_text(textwrap.dedent(HUB_CONFIG.format(
        tmp=tmp, hub_port=hub_port, proxy_port=free_port(), service_port=svc_port, managed_port=managed_port,
        service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN, command=[sys.executable, "-m", "xllm_jupyter.hub"],
        managed_env=managed_env,
    )))
    log = open(tmp / "hub.log", "w+")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{hub_port}/hub/api"
    cfg = make_test_config(xllm_home)
    config = dataclasses.replace(
        cfg,
        engine=dataclasses.replace(cfg.engine, max_batch_size=4),
        cache=CacheConfig(enabled=True),
        quotas=QuotaConfig(group_tokens_per_day=("limited=1",), metrics_max_users=10),
        hub=HubConfig(admin_groups=("xllm-admins",)),
    )
    env = {
        "JUPYTERHUB_API_URL": api,
        "JUPYTERHUB_API_TOKEN": SERVICE_TOKEN,
        "JUPYTERHUB_SERVICE_NAME": "xllm",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/xllm/",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{svc_port}",
    }
    loop, thread, started, ready = _start_service(config, tiny_catalog, env, svc_port)
    try:
        _wait_http(api + "/", proc, 90, log)
        if not ready.wait(120):
            pytest.fail("the xllm hub service did not start")
        if "error" in started:
            raise started["error"]
        admin = httpx.Client(base_url=api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30)
        with admin:
            assert admin.post("/users", json={"usernames": list(USERS)}).status_code == 201
            assert admin.post("/groups/xllm-admins", json={"users": ["carol"]}).status_code == 201
            assert admin.post("/groups/limited", json={"users": ["dave"]}).status_code == 201
            tokens = {}
            for user in USERS:
                r = admin.post(f"/users/{user}/tokens", json={"scopes": [*ACCESS, MANAGED_ACCESS], "note": "xllm test"})
                assert r.status_code == 201, r.text
                tokens[user] = r.json()["token"]
            r = admin.post("/users/alice/tokens", json={"scopes": ["read:users:activity!user"], "note": "no access"})
            assert r.status_code == 201, r.text
            tokens["alice-no-access"] = r.json()["token"]
        service = started["service"]
        context = service.http_server.request_callback.settings["xllm_context"]
        yield Hub(api, f"http://127.0.0.1:{svc_port}/services/xllm", tokens, context, loop,
                  f"http://127.0.0.1:{managed_port}/services/xllm-managed")
    finally:
        managed_pid = _managed_pid(api)
        if "service" in started:
            async def teardown() -> None:
                await started["service"].stop()
                await started["engine"].stop()

            asyncio.run_coroutine_threadsafe(teardown(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        stop_process(proc)
        _stop_pid(managed_pid)  # the hub stops its managed services on exit; this only covers a crash
        log.close()


def _managed_pid(api: str) -> int | None:
    """The pid of the managed service, as the hub reports it."""
    try:
        r = httpx.get(api + "/services/xllm-managed", headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=10)
        return r.json().get("pid") or None
    except (httpx.HTTPError, ValueError):
        return None


def _stop_pid(pid: int | None) -> None:
    """SIGTERM ``pid`` (our hub's child) if it is still running, and give it a moment."""
    import os
    import signal

    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return


# ---------------------------------------------------------------- auth
def test_two_users_are_served_with_their_hub_tokens(hub):
    for user in ("alice", "bob"):
        with hub.openai(user) as c:
            r = c.chat.completions.create(model=TINY, messages=MSG, max_tokens=3, temperature=1.0)
            assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0
            assert c.models.list().data[0].id == TINY


def test_a_token_without_the_access_scope_gets_403_and_no_token_401(hub):
    with hub.http(hub.tokens["alice-no-access"]) as c:
        r = c.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 403
        assert r.json()["error"]["type"] == "permission_error" and "access:services!service=xllm" in r.json()["error"]["message"]
    with hub.http(None) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200  # the public route stays public
    with hub.http("not-a-real-token") as c:
        assert c.get("/v1/models").status_code == 401


def test_the_browser_page_redirects_into_hub_oauth_and_greets_token_users(hub):
    with hub.http(None) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 302
        assert "/hub/api/oauth2/authorize" in r.headers["Location"] and "client_id=service-xllm" in r.headers["Location"]
    with hub.http(hub.tokens["alice"]) as c:
        r = c.get("/")
        assert r.status_code == 200 and "alice" in r.text and "/services/xllm/v1" in r.text
        # another site cannot frame it
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'self'" and r.headers["X-Frame-Options"] == "SAMEORIGIN"
        # behind a hub served over TLS, configurable-http-proxy forwards plain http with X-Forwarded-Proto
        # (appending its own hop): the page showed users an http:// API URL
        r = c.get("/", headers={"X-Forwarded-Proto": "https,http"})
        assert f"<code>https://{c.base_url.netloc.decode()}/services/xllm/v1</code>" in r.text
        assert "<code>http://" in c.get("/", headers={"X-Forwarded-Proto": "gopher"}).text  # not a scheme: ignored
    with hub.http(hub.tokens["alice-no-access"]) as c:
        assert c.get("/").status_code == 403


def test_kernels_find_the_service_through_the_hub_api(hub):
    discovery = pytest.importorskip("xllm_jupyter.client.discovery")
    found = discovery.find_server({"JUPYTERHUB_API_URL": hub.api, "JUPYTERHUB_API_TOKEN": hub.tokens["bob"]})
    assert found is not None and found.source == "hub"
    assert found.base_url == hub.service_root + "/v1"
    with openai.OpenAI(base_url=found.base_url, api_key=found.api_key, max_retries=0) as c:
        assert c.chat.completions.create(model=TINY, messages=MSG, max_tokens=2).usage.completion_tokens > 0


def test_a_single_user_servers_extension_sees_the_hub_service_with_the_docs_token_scopes(hub):
    """The extension asks the real hub whether to leave kernels to the service (docs/jupyterhub.md)."""
    from xllm_jupyter.extension.hub_lookup import find_hub_service

    def ask(**env: str) -> Any:
        return asyncio.run(find_hub_service({"JUPYTERHUB_API_URL": hub.api, **env}))

    found = ask(JUPYTERHUB_API_TOKEN=hub.tokens["bob"])  # read:services!service=xllm
    assert (found.name, found.root, found.token) == ("xllm", hub.service_root + "/", hub.tokens["bob"])
    assert hub.tokens["bob"] not in repr(found)
    assert ask(JUPYTERHUB_API_TOKEN=hub.tokens["bob"], XLLM_HUB_SERVICE="xllm-managed") is None  # no read scope
    assert ask(JUPYTERHUB_API_TOKEN=hub.tokens["alice-no-access"]) is None  # 403
    assert ask(JUPYTERHUB_API_TOKEN="not-a-real-token") is None
    assert asyncio.run(find_hub_service({"JUPYTERHUB_API_TOKEN": hub.tokens["bob"]})) is None  # not on a hub


def test_the_extensions_lookup_tells_a_hub_without_the_service_from_one_that_has_not_answered(hub):
    """A 403 or 404 is final (this server's own engine); a hub that does not answer is asked again later."""
    from xllm_jupyter.extension.hub_lookup import lookup_hub_service

    def ask(api: str = hub.api, **env: str) -> Any:
        return asyncio.run(lookup_hub_service({"JUPYTERHUB_API_URL": api, **env}))

    found = ask(JUPYTERHUB_API_TOKEN=hub.tokens["bob"])
    assert found.final and found.service is not None and found.service.root == hub.service_root + "/"
    refused = ask(JUPYTERHUB_API_TOKEN=hub.tokens["alice-no-access"])
    assert (refused.service, refused.final) == (None, True) and "403" in refused.reason
    missing = ask(JUPYTERHUB_API_TOKEN=ADMIN_TOKEN, XLLM_HUB_SERVICE="no-such-service")  # may read any service
    assert (missing.service, missing.final) == (None, True) and "404" in missing.reason
    down = ask(f"http://127.0.0.1:{free_port()}/hub/api", JUPYTERHUB_API_TOKEN=hub.tokens["bob"])
    assert (down.service, down.final) == (None, False)
    assert hub.tokens["bob"] not in down.reason + found.reason


def test_xllm_status_shows_a_non_admin_user_the_server_version(hub, monkeypatch):
    """Before: ``%xllm status`` read the version from /admin/models/manifest, a 403 for anyone but the service's
    admins, so hub users saw no version. /v1/models now carries it, and nothing of the admins' figures."""
    import xllm_jupyter
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from xllm_jupyter.client import discovery
    from xllm_jupyter.magics import XllmMagics

    with hub.http(hub.tokens["bob"]) as h:
        body = h.get("/v1/models").json()
        assert body["xllm"] == {"server_version": xllm_jupyter.__version__} and set(body) == {"object", "data", "xllm"}
        assert h.get("/admin/models/manifest").status_code == 403  # still the admins'
        assert h.get("/admin/stats").status_code == 403
    for name in ("XLLM_BASE_URL", "XLLM_API_KEY", "XLLM_MODEL", "XLLM_HUB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["bob"])
    discovery.disconnect()
    ip = InteractiveShell.instance()
    magics = XllmMagics(ip)
    ip.register_magics(magics)
    try:
        with capture_output() as cap:
            ip.run_line_magic("xllm", "status")
    finally:
        discovery.disconnect()
        magics.state.close()
    text = "\n".join(str(o.data.get("text/plain", "")) for o in cap.outputs)
    assert "the JupyterHub service" in text and TINY in text
    assert "server version" in text and xllm_jupyter.__version__ in text


# ------------------------------------------- a user's Jupyter server on the hub
@pytest.fixture
def jp_server_config(xllm_home):
    """The xllm extension in a Jupyter server (pytest-jupyter), as in a hub user's single-user server."""
    return {
        "ServerApp": {"jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_body_bytes": 65536},
    }


@pytest.fixture
def bobs_server(hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Bob's Jupyter server with the xllm extension, its JUPYTERHUB_API_TOKEN scoped as the doc's server_token_scopes.

    What the hub service's API handlers see is recorded: (path, request headers) of each request.
    """
    from xllm_jupyter.hub.app import HubXllmHandler

    monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["bob"])
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    seen: list[tuple[str, dict[str, str]]] = []
    prepare = HubXllmHandler.prepare

    async def recording_prepare(self: Any) -> None:
        seen.append((self.request.path, dict(self.request.headers)))
        await prepare(self)

    monkeypatch.setattr(HubXllmHandler, "prepare", recording_prepare)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    jp_asyncio_loop.run_until_complete(jp_serverapp._post_start())  # the start hooks: the hub lookup
    jp_asyncio_loop.run_until_complete(ext._start_task)
    return {"url": f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm", "token": jp_serverapp.identity_provider.token,
            "ext": ext, "seen": seen, "run": jp_asyncio_loop.run_until_complete}


def test_a_user_servers_xllm_api_answers_from_the_hub_service(hub, bobs_server):
    """The panel's routes in a hub user's server: the hub's one engine, as bob; no model in bob's server.

    Before: the server's own engine answered (and loaded the model into the user's home on first use).
    """
    url, token, ext, seen = bobs_server["url"], bobs_server["token"], bobs_server["ext"], bobs_server["seen"]
    bad = {"model": TINY, "messages": MSG, "temperature": 9}
    with hub.openai("bob") as c, hub.http(hub.tokens["bob"]) as h:  # the service's own answers, asked directly
        models, direct = [m.id for m in c.models.list()], h.post("/v1/chat/completions", json=bad)
    assert direct.status_code == 400 and direct.json()["error"]["param"] == "temperature"
    seen.clear()

    async def body() -> None:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=120) as c:
            assert [m.id async for m in c.models.list()] == models  # the service's order (its loaded model first)
            r = await c.chat.completions.create(model=TINY, messages=MSG, max_tokens=3, temperature=1.0)
            assert r.usage.completion_tokens > 0
            stream = await c.chat.completions.create(model=TINY, messages=MSG, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
            assert len(chunks) >= 3
            with pytest.raises(openai.NotFoundError) as info:
                await c.chat.completions.create(model="missing", messages=MSG)
            assert info.value.code == "model_not_found"
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"}, timeout=120) as h:
            forwarded = await h.post("/v1/chat/completions", json=bad)  # the upstream's error unchanged
            assert (forwarded.status_code, forwarded.json()) == (direct.status_code, direct.json())
            stats = await h.get("/admin/stats")  # the service decides, as bob (not one of its admins)
            assert stats.status_code == 403 and stats.json()["error"]["type"] == "permission_error"
            assert (await h.get("/health")).json() == {"status": "ok", "engine": "hub-service"}  # local, says who serves
            assert (await h.get("/nowhere")).status_code == 404
            assert (await httpx.AsyncClient().get(url + "/v1/models")).status_code == 401  # still Jupyter's auth

    bobs_server["run"](body())
    assert not ext.engine.is_loaded(TINY) and not ext.engine.loaded_models(include_loading=True)
    forwarded = [headers for path, headers in seen if path.startswith("/services/xllm/v1/")]
    assert len(forwarded) >= 5
    for headers in forwarded:  # this server's hub token only; the Jupyter token and cookies stay here
        assert headers["Authorization"] == f"token {hub.tokens['bob']}"
        assert not any(token in value for value in headers.values()) and "Cookie" not in headers
    assert any(path == "/services/xllm/admin/stats" for path, _ in seen)


def test_a_forwarded_405_keeps_its_allow_and_the_request_id_is_the_same_on_both_sides(hub, bobs_server):
    """A 405 from the service lost its ``Allow`` on the way back through the user's server; the service's answers
    had no ``X-Request-ID`` of their own, and the id the user's server gave a request never reached the service."""
    url, token, seen = bobs_server["url"], bobs_server["token"], bobs_server["seen"]
    seen.clear()

    async def body() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"}, timeout=120) as h:
            r = await h.delete("/v1/chat/completions")  # forwarded: the service's 405
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
            assert r.headers.get("allow") == "GET, HEAD, POST, OPTIONS"
            r = await h.get("/v1/embeddings", headers={"X-Request-ID": "trace-42"})
            assert r.status_code == 405 and r.headers.get("allow") == "POST, OPTIONS"
            assert r.headers["x-request-id"] == "trace-42"
            r = await h.get("/v1/models")
            assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
            return r.headers["x-request-id"]

    rid = bobs_server["run"](body())
    upstream = [headers.get("X-Request-Id") for path, headers in seen if path == "/services/xllm/v1/models"]
    assert upstream == [rid]  # the service logged and answered the id the client got
    with hub.http(hub.tokens["bob"]) as h:  # and the service itself answers with one
        assert len(h.get("/v1/models").headers.get("x-request-id", "")) == 32


def test_a_user_server_started_while_the_hub_api_was_down_forwards_once_the_hub_answers(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop, monkeypatch):
    """Before: the one lookup at start failed, so the server kept its own engine (and loaded the model) for good."""
    monkeypatch.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{free_port()}/hub/api")  # nothing listens
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["bob"])
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    url, token = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm", jp_serverapp.identity_provider.token

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"}, timeout=120) as h:
            waiting = await h.get("/v1/models")
            assert waiting.status_code == 503 and waiting.json()["error"]["code"] == "hub_unavailable"
            monkeypatch.setattr("xllm_jupyter.extension.hub_link.RETRY_SECONDS", 0.0)  # no waiting in a test
            monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api)  # the hub is back
            models = await h.get("/v1/models")
            assert models.status_code == 200 and TINY in [m["id"] for m in models.json()["data"]]
            assert (await h.get("/health")).json()["engine"] == "hub-service"

    jp_asyncio_loop.run_until_complete(body())
    assert not ext.engine.loaded_models(include_loading=True) and "XLLM_BASE_URL" not in os.environ


# ----------------------------------------------------------- isolation
def test_a_user_cannot_read_continue_or_delete_another_users_response(hub):
    with hub.openai("alice") as alice, hub.openai("bob") as bob:
        r = alice.responses.create(model=TINY, input="secret plans", max_output_tokens=2)
        for call in (
            lambda: bob.responses.retrieve(r.id),
            lambda: bob.responses.input_items.list(r.id),
            lambda: bob.responses.delete(r.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as exc:  # what an unknown id gets (api.openai.com's 400)
            bob.responses.create(model=TINY, input="and?", previous_response_id=r.id, max_output_tokens=2)
        assert exc.value.body["code"] == "previous_response_not_found"
        assert alice.responses.retrieve(r.id).id == r.id  # still there, still alice's
        alice.responses.delete(r.id)


def test_a_user_cannot_read_list_update_or_delete_another_users_stored_chat_completion(hub):
    with hub.openai("alice") as alice, hub.openai("bob") as bob:
        c = alice.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, store=True, metadata={"who": "alice"})
        for call in (
            lambda: bob.chat.completions.retrieve(c.id),
            lambda: bob.chat.completions.update(c.id, metadata={"who": "bob"}),
            lambda: bob.chat.completions.messages.list(c.id),
            lambda: bob.chat.completions.delete(c.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert c.id not in [x.id for x in bob.chat.completions.list()]
        assert [x.id for x in alice.chat.completions.list(metadata={"who": "alice"})] == [c.id]  # under /services/xllm/
        assert alice.chat.completions.delete(c.id).deleted


def test_a_token_the_service_never_saw_is_served_from_an_address_a_guesser_capped(hub):
    """Bob, behind the same NAT as alice (one client address), guesses tokens past the failed-auth cap; alice then
    makes a new token at the real hub and calls from that address: it was a 429 until the window ended (the
    service had never seen the token); now it is checked after the guesses ahead of it."""
    limit = hub.context.config.auth.failed_auth_limit
    nat = httpx.HTTPTransport(local_address="127.0.0.77")
    with httpx.Client(base_url=hub.service_root, transport=nat, timeout=120) as shared:
        for i in range(limit):
            assert shared.get("/v1/models", headers={"Authorization": f"token bob-guess-{i:032x}"}).status_code == 401
        with httpx.Client(base_url=hub.api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30) as admin:
            r = admin.post("/users/alice/tokens", json={"scopes": ACCESS, "note": "new, behind the NAT"})
            assert r.status_code == 201, r.text
            fresh = r.json()["token"]
        r = shared.get("/v1/models", headers={"Authorization": f"token {fresh}"})
        assert r.status_code == 200, r.text
        r = shared.get("/v1/models", headers={"Authorization": "token bob-guess-more"})
        assert r.status_code == 401  # a guess is still refused, after its turn


def test_the_response_cache_never_serves_one_user_anothers_answer(hub):
    cache = hub.context.serving.cache
    body = {"model": TINY, "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 3, "temperature": 0}
    with hub.http(hub.tokens["alice"]) as a, hub.http(hub.tokens["bob"]) as b:
        first = a.post("/v1/chat/completions", json=body).json()
        hits = cache.hits
        assert a.post("/v1/chat/completions", json=body).json()["id"] == first["id"]  # alice: a hit
        assert cache.hits == hits + 1
        other = b.post("/v1/chat/completions", json=body).json()
        assert other["id"] != first["id"] and cache.hits == hits + 1  # bob: generated afresh


# ------------------------------------------------------------ fairness
def _stream(hub: Hub, user: str, max_tokens: int, events: list, tag: str) -> None:
    with hub.openai(user) as c:
        stream = c.chat.completions.create(model=TINY, messages=MSG, max_tokens=max_tokens, temperature=1.0,
                                           stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                events.append(("first", tag))
        events.append(("done", tag))


def _timed(hub: Hub, user: str, max_tokens: int) -> float:
    start = time.perf_counter()
    with hub.openai(user) as c:
        c.chat.completions.create(model=TINY, messages=MSG, max_tokens=max_tokens, temperature=1.0, extra_body={"ignore_eos": True})
    return time.perf_counter() - start


def test_one_users_flood_leaves_another_users_latency_bounded(hub):
    flood, b_tokens, a_tokens = 6, 4, 128
    unloaded = min(_timed(hub, "bob", b_tokens) for _ in range(2))
    events: list = []
    threads = [threading.Thread(target=_stream, args=(hub, "alice", a_tokens, events, f"a{i}")) for i in range(flood)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len({tag for kind, tag in list(events) if kind == "first"}) < 3:  # batch 4: alice holds 3 slots
        assert time.monotonic() < deadline, "alice's streams did not start"
        time.sleep(0.005)
    loaded = _timed(hub, "bob", b_tokens)
    events.append(("done", "bob"))
    for t in threads:
        t.join(120)
    done = [tag for kind, tag in events if kind == "done"]
    assert done[0] == "bob", f"bob waited behind alice's flood: {done}"
    print(f"\nbob's latency: unloaded {unloaded * 1000:.0f} ms, with alice flooding {flood} streams {loaded * 1000:.0f} ms")
    assert loaded < 10 * unloaded + 2.0  # generous: without fairness bob waits for a whole 128-token stream


def test_only_the_services_admins_may_delete_a_model(hub):
    """``DELETE /v1/models/{id}`` (the SDK's ``models.delete``) removes from the service's store: its admins' (it
    was a 405 for everyone); the route's GET stays everyone's."""
    with hub.openai("bob") as bob:
        assert bob.models.retrieve(TINY).id == TINY
        with pytest.raises(openai.PermissionDeniedError) as caught:
            bob.models.delete(TINY)
        assert caught.value.body["type"] == "permission_error" and "admins" in caught.value.body["message"]
    with hub.openai("carol") as carol:  # in group xllm-admins: past the check, to the store (no such model)
        with pytest.raises(openai.NotFoundError) as caught:
            carol.models.delete("no-such-model")
        assert caught.value.body["code"] == "model_not_found"
        assert carol.models.retrieve(TINY).id == TINY  # still there


# ------------------------------------------------- quotas, usage, metrics
def test_group_quota_admin_usage_and_per_user_metrics(hub):
    with hub.openai("dave") as dave:  # group "limited": 1 token per day
        dave.chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
        with pytest.raises(openai.RateLimitError, match="Daily token quota"):
            dave.chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
    with hub.http(hub.tokens["alice"]) as c:
        assert c.get("/admin/usage").status_code == 403  # not an xllm admin
        assert c.get("/metrics").status_code == 403  # nor may she read the other users' counts there
    with hub.http(hub.tokens["carol"]) as c:  # in group xllm-admins
        metrics = c.get("/metrics").text
        r = c.get("/admin/usage")
        assert r.status_code == 200
        rows = {row["user"]: row for row in r.json()["data"]}
    assert 'xllm_user_tokens_total{kind="completion",user="alice"}' in metrics
    assert rows["alice"]["completion_tokens"] > 0 and rows["bob"]["requests"] > 0
    assert rows["dave"]["groups"] == ["limited"] and rows["dave"]["rejected"] == {"tokens_per_day": 1}
    assert rows["dave"]["limits"] == {"max_concurrent": 0, "tokens_per_day": 1}


# ------------------------------------------------------ managed by the hub
def test_the_hub_runs_the_service_itself_as_a_managed_service(hub):
    deadline = time.monotonic() + 120
    while True:  # the hub started it at its own start; it loads the model in the background
        try:
            if httpx.get(hub.managed_root + "/health/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the managed xllm service did not become ready"
        time.sleep(0.5)
    with openai.OpenAI(base_url=hub.managed_root + "/v1", api_key=hub.tokens["alice"], max_retries=0, timeout=120) as c:
        assert c.chat.completions.create(model=TINY, messages=MSG, max_tokens=2).usage.completion_tokens > 0
    with hub.http(hub.tokens["alice-no-access"]) as c:
        r = c.get(hub.managed_root + "/v1/models")
        assert r.status_code == 403
        # the hub hands a managed service two access scopes; either one is enough, and the message says so
        # (it said "needs the scope access:services, access:services!service=..." as if both were needed)
        assert r.json()["error"]["message"].endswith(
            "needs one of the scopes access:services, access:services!service=xllm-managed.")
    with hub.http(hub.tokens["alice"]) as c:
        # ?token= counts only where the hub allows tokens in URLs (JUPYTERHUB_ALLOW_TOKEN_IN_URL, off by default)
        r = c.get(hub.managed_root + "/v1/models", params={"token": hub.tokens["alice"]}, headers={"Authorization": ""})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_browser_logs_in_through_hub_oauth_and_sees_its_page(hub):
    """The whole OAuth dance: service -> hub authorize -> hub login -> callback -> page (cookies, no token)."""
    hub_origin = hub.api.split("/hub/api")[0]
    svc_origin = hub.service_root.split("/services/")[0]

    def absolute(location: str) -> str:
        if location.startswith("http"):
            return location
        return (hub_origin if location.startswith("/hub/") else svc_origin) + location

    with httpx.Client(timeout=60) as browser:  # one cookie jar, like a browser (cookies ignore ports)
        r = browser.get(hub.service_root + "/")
        for _ in range(12):
            if r.status_code not in (301, 302, 303):
                break
            url = absolute(r.headers["Location"])
            if "/hub/login" in url:
                form = browser.get(url)
                xsrf = browser.cookies.get("_xsrf") or ""
                assert form.status_code == 200
                r = browser.post(url, data={"username": "bob", "password": "pw", "_xsrf": xsrf})
            else:
                r = browser.get(url)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        assert "Signed in as <b>bob</b>" in r.text
        assert "Sequences generating now: 0; waiting for a batch slot: 0" in r.text  # bob's own, nobody else's


@pytest.mark.parametrize("problem", ["busy port", "not http", "bad port"])
def test_a_setup_mistake_is_one_line_and_exit_1(problem, xllm_home, monkeypatch, capsys):
    """A busy port or a malformed JUPYTERHUB_SERVICE_URL: one `xllm hub service:` line, no traceback."""
    from xllm_jupyter.hub.__main__ import main as hub_main

    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", SERVICE_TOKEN)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        url = {"busy port": f"http://127.0.0.1:{busy.getsockname()[1]}", "not http": "https://127.0.0.1:8910",
               "bad port": "http://127.0.0.1:99999"}[problem]
        monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", url)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            assert hub_main([]) == 1
        finally:  # main() logs to this test's captured stderr, which closes with the test
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
    err = capsys.readouterr().err.strip()
    # (other tests' servers still run in this process: their log lines may land here too)
    said = [line for line in err.splitlines() if line.startswith("xllm hub service: ")]
    assert "Traceback" not in err and len(said) == 1, err
    err = said[0]
    assert {"busy port": "cannot listen on 127.0.0.1:", "bad port": "no valid port",
            "not http": "serves plain http:// only (TLS is the proxy's job; with JupyterHub's internal_ssl"}[problem] in err


def test_a_hub_users_lab_panel_shows_the_shared_engine_without_its_admin_figures(hub, tmp_path, xllm_home):
    """Bob's JupyterLab on the hub: the panel's routes answer from the hub service, where bob is no admin.

    ``admin/stats`` is a 403 for him there: the panel shows the models the service lists and a working
    quick chat, with no memory, rate, queue or Load/Unload (it said "offline" with an empty chat before).
    """
    from tests.browser import chromium, jupyter_lab, open_xllm_panel, require_browser

    require_browser()
    config = {"XllmApp": {"default_model": TINY, "home": str(xllm_home)}}
    env = {"JUPYTERHUB_API_URL": hub.api, "JUPYTERHUB_API_TOKEN": hub.tokens["bob"]}
    with jupyter_lab(tmp_path / "lab", config=config, env=env, name="hub-panel-browser") as lab, chromium() as context:
        page = context.new_page()
        panel, errors = open_xllm_panel(page, lab)
        page.wait_for_selector(f'#xllm-panel .xllm-Model[data-model="{TINY}"]', timeout=120_000)
        status = panel.locator(".xllm-Panel-status")
        assert status.inner_text() == "Ready (shared engine)"
        assert "admins" in (status.get_attribute("title") or "")
        assert panel.locator(".xllm-Model-action:visible").count() == 0
        assert panel.locator(".xllm-Gauge").count() == 0
        assert panel.locator(".xllm-Panel-queue").inner_text() == "–"

        assert panel.locator(".xllm-Chat-model").input_value() == TINY
        box = panel.locator(".xllm-Chat-input")
        box.fill("Say hello.")
        box.press("Enter")
        page.wait_for_selector("#xllm-panel .xllm-Chat-turn.xllm-mod-assistant:not(.xllm-mod-pending)", timeout=120_000)
        assert panel.locator(".xllm-Chat-error").count() == 0
        assert panel.locator(".xllm-Chat-turn.xllm-mod-assistant .xllm-Chat-text").last.inner_text().strip()
        assert not errors, errors
    log = lab.log.read_text()
    assert f"model {TINY} loaded" not in log  # bob's own server loaded nothing: the hub's engine answered
