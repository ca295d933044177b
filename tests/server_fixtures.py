"""Session fixtures: one real standalone server (own thread, own IOLoop) serving the tiny Llama.

The server runs the real Engine, the real transformers backend and the real Tornado
stack on an ephemeral port; tests talk to it with the real ``openai`` SDK and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from xllm_jupyter.core.config import AuthConfig, EngineConfig, ServerConfig, StoreConfig, XllmConfig
from xllm_jupyter.store.store import ModelStore

TINY = "tiny"
API_KEY = "sk-xllm-test-key"


@pytest.fixture(scope="session")
def xllm_home(tmp_path_factory, tiny_llama_dir) -> Path:
    """A temporary XLLM home whose store holds the tiny Llama as "tiny"."""
    home = tmp_path_factory.mktemp("xllm-home")
    ModelStore(home).pull(str(tiny_llama_dir), TINY)
    return home


@pytest.fixture(scope="session")
def tiny_catalog(xllm_home, tiny_llama_dir) -> Any:
    """The catalog the test servers resolve "tiny" with: the real store."""
    return ModelStore(xllm_home)


def make_test_config(home: Path, **server: Any) -> XllmConfig:
    """The config the test servers use: small limits so error paths are cheap to reach."""
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        port=0,
        api_keys=(API_KEY,),
        max_body_bytes=256 * 1024,
        max_tokens_limit=4096,
        max_n=4,
        keepalive_seconds=0.5,
    )
    values.update(server)
    return XllmConfig(
        server=ServerConfig(**values),
        engine=EngineConfig(default_model=TINY, max_batch_size=8, torch_threads=1),
        store=StoreConfig(home=home),
    )


@pytest.fixture(scope="module")
def smollm2_server(smollm2_home) -> Iterator["ServerInfo"]:
    """A standalone server on the session's smollm2 store (its GGUF converted once per run, shared with the backend
    tests): smollm2 the default model, batches of 8, 2 torch threads; one per test module that asks for it."""
    base = make_test_config(smollm2_home)
    config = XllmConfig(server=base.server, store=base.store,
                        engine=EngineConfig(default_model="smollm2", max_batch_size=8, torch_threads=2))
    with running_server(config, ModelStore(smollm2_home), "smollm2") as info:
        yield info


@dataclass
class ServerInfo:
    """A running standalone server: where it is, its key, and its engine."""

    root: str  # http://127.0.0.1:PORT
    base_url: str  # root + "/v1", what OpenAI clients take
    api_key: str
    engine: Any
    config: XllmConfig
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@contextlib.contextmanager
def loop_thread(setup: Callable[[], Awaitable[Any]], name: str, start_timeout: float) -> Iterator[tuple[Any, Any]]:
    """A new event loop on a thread of its own, running once ``setup()`` has run on it; yields (loop, what
    setup returned), or raises what setup raised; the loop is stopped and its thread joined at exit."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["result"] = loop.run_until_complete(setup())
        except BaseException as exc:  # reported to the caller below
            started["error"] = exc
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        pytest.fail(f"{name} did not start within {start_timeout:g} s")
    if "error" in started:
        raise started["error"]
    try:
        yield loop, started["result"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def running_server(config: XllmConfig, catalog: Any, model: str) -> Iterator[ServerInfo]:
    """A real standalone server on its own thread and IOLoop, with ``model`` loaded."""
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.standalone import start_server

    async def setup() -> tuple[Any, Any]:
        engine = Engine(config.engine, catalog=catalog)
        await engine.start()
        await engine.load(model)
        return await start_server(config, engine, port=0), engine

    with loop_thread(setup, "the test server", 300) as (loop, (server, engine)):
        info = ServerInfo(server.url, server.url + "/v1", API_KEY, engine, config, loop)
        try:
            yield info
        finally:

            async def teardown() -> None:
                await server.stop()
                await engine.stop()

            info.call(teardown(), timeout=60)


@contextlib.contextmanager
def tiny_server_of_its_own(tmp_path_factory: Any, tiny_llama_dir: Path, label: str) -> Iterator[ServerInfo]:
    """A server with its own store holding only "tiny" (loaded): pulls, loads and unloads there leave the
    session server alone."""
    home = tmp_path_factory.mktemp(label)
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    with running_server(make_test_config(home), store, TINY) as info:
        yield info


@contextlib.contextmanager
def templated_client(root: Path, templates: dict[str, str | None], load: str) -> Iterator[Any]:
    """An openai client of a server on a store under ``root`` of tiny Llamas, one per name in ``templates`` with that
    chat template (None: the tokenizer's own), ``load`` loaded."""
    import openai

    from tests.models import build_tiny_llama

    store = ModelStore(root / "home")
    for name, template in templates.items():
        model = build_tiny_llama(root / name)
        if template is not None:
            (model / "chat_template.jinja").write_text(template, encoding="utf-8")
        store.pull(str(model), name)
    with running_server(make_test_config(root / "home"), store, load) as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as client:
            yield client


def point_cli_at(info: ServerInfo, monkeypatch: Any) -> None:
    """Point the CLI (and the client's defaults) at ``info``'s server through the environment, its store as
    XLLM_HOME, no config file."""
    monkeypatch.setenv("XLLM_BASE_URL", info.base_url)
    monkeypatch.setenv("XLLM_API_KEY", info.api_key)
    monkeypatch.setenv("XLLM_HOME", str(info.config.store.home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)


@contextlib.contextmanager
def proxied_tiny_server(home: Path, catalog: Any, key: str, limit: int, window: float) -> Iterator[ServerInfo]:
    """A standalone server of "tiny" whose one API key is ``key``, behind a proxy on 127.0.0.1 (which names the
    client in X-Forwarded-For), allowing ``limit`` failed authentications per client in ``window`` seconds."""
    cfg = make_test_config(home, api_keys=(key,))
    cfg = dataclasses.replace(cfg, auth=AuthConfig(failed_auth_limit=limit, failed_auth_window_seconds=window,
                                                   trusted_proxies=("127.0.0.1",)))
    with running_server(cfg, catalog, TINY) as info:
        yield info


@pytest.fixture(scope="module")
def own_tiny_server(request, tmp_path_factory, tiny_llama_dir) -> Iterator[ServerInfo]:
    """One test module's server of its own (``tiny_server_of_its_own``): its loads, unloads and pulls leave the
    session server and the other modules alone."""
    with tiny_server_of_its_own(tmp_path_factory, tiny_llama_dir, request.module.__name__.rpartition(".")[2]) as info:
        yield info


@pytest.fixture(scope="session")
def xllm_server(tiny_catalog, xllm_home) -> Any:
    """ONE standalone server for the session, with "tiny" loaded."""
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as info:
        yield info


@pytest.fixture
def client(xllm_server) -> Iterator[Any]:
    """A sync openai SDK client for the session server, retries off so each error is seen once."""
    import openai

    with openai.OpenAI(base_url=xllm_server.base_url, api_key=xllm_server.api_key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def live(xllm_server, monkeypatch) -> Any:
    """The session server, as the environment names it to clients (``XLLM_BASE_URL``/``XLLM_API_KEY``)."""
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    return xllm_server


@pytest.fixture(scope="session")
def tiny_client(xllm_server) -> Iterator[Any]:
    """A sync xllm client for the session server."""
    from xllm_jupyter.client import XllmClient

    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        yield c


@pytest.fixture
def raw(xllm_server) -> Iterator[Any]:
    """An httpx client with the API key, for the wire bytes the SDK hides."""
    import httpx

    headers = {"Authorization": f"Bearer {xllm_server.api_key}"}
    with httpx.Client(base_url=xllm_server.root, headers=headers, timeout=120) as c:
        yield c


#: a hub user the stand-in hubs of ``running_hub_app`` return for a token they accept
HUB_ALICE = {"kind": "user", "name": "alice", "groups": [], "scopes": ["access:services!service=xllm"],
             "created": "2026-01-05T09:00:00.000000Z"}  # (a token that may read its own account: no lookup)


async def hub_api_reading_users(method: str, url: str, **_: Any) -> Any:
    """A stand-in hub API for the service's own requests: its token holds ``read:users`` (``GET /user``), and
    every user asked of ``GET /users/{name}`` has HUB_ALICE's creation time."""
    if url.endswith("/user"):
        return {"kind": "service", "name": "xllm", "scopes": ["access:services!service=xllm", "read:users"]}
    return {"kind": "user", "name": url.rsplit("/", 1)[-1], "created": HUB_ALICE["created"]}


@contextlib.contextmanager
def running_hub_app(config: XllmConfig, user_for_token: Any, hub_api: Any = hub_api_reading_users) -> Iterator[str]:
    """The hub service's app on a real port and its own IOLoop thread, the hub stood in for by
    ``user_for_token`` (async: token -> hub user model or None) and, for the service's own requests
    (its scopes, users' accounts), ``hub_api`` (HubAuth's ``_api_request``); yields the service's URL root."""
    import tornado.httpserver
    import tornado.testing

    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.app import make_hub_app, make_hub_auth

    auth = make_hub_auth({"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api"})

    async def lookup(token: str, sync: bool = True, **_: Any) -> Any:
        return await user_for_token(token)

    auth.user_for_token = lookup
    auth._api_request = hub_api
    async def setup() -> tuple[Any, int]:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_hub_app(config, Engine(config.engine), auth))
        server.add_sockets([sock])
        return server, port

    with loop_thread(setup, "the hub app", 30) as (loop, (server, port)):
        try:
            yield f"http://127.0.0.1:{port}/services/xllm"
        finally:
            loop.call_soon_threadsafe(server.stop)


#: ``engine.stream_interval_ms`` of a test server whose engine hands tokens over at random steps (``random_steps``)
RANDOM_STEPS_MS = 59_999.0


@contextlib.contextmanager
def random_steps(seed: int, chance: float = 0.4) -> Iterator[list[bool]]:
    """While open, an engine configured with ``stream_interval_ms=RANDOM_STEPS_MS`` hands each step's tokens over with
    probability ``chance`` (seeded), else keeps them for a later delta (the first and the last leave at once, as ever):
    deltas of one, a few or many tokens at random points, as a GPU's 16 ms interval groups them. Grouping bugs that
    per-token (0 ms) and whole-reply (60000 ms) delivery both miss show there. Yields each step's choice so far (a test
    can check the hook still reaches the runner). Other engines keep their pacing. ``XLLM_RANDOM_STEPS_SEED`` in the
    environment replaces ``seed`` (to loop a test over many groupings)."""
    import os
    import random

    from xllm_jupyter.engine import runner

    seed = int(os.environ.get("XLLM_RANDOM_STEPS_SEED", seed))
    real, rng, chosen = runner.paced_interval, random.Random(seed), []

    def paced(base: float, running: int) -> float:
        if base != RANDOM_STEPS_MS / 1000:
            return real(base, running)
        chosen.append(rng.random() < chance)  # (on the engine's thread; one runner a server)
        return 0.0 if chosen[-1] else float("inf")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "paced_interval", paced)
        yield chosen
