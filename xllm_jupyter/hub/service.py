"""Run the hub service: listen where the hub says (``JUPYTERHUB_SERVICE_URL``), serve until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tornado.httpserver import HTTPServer

from ..core.config import XllmConfig, load_config
from ..core.errors import ConfigError
from ..server.standalone import listen, shutdown_engine, stop_http_server, stop_signals
from .app import make_hub_app, make_hub_auth, service_prefix

log = logging.getLogger("xllm_jupyter.hub")

#: where a service listens when the hub gives no URL (an external service sets its own)
DEFAULT_URL = "http://127.0.0.1:8910"
#: the service's own defaults, under config.yaml and ``XLLM_*``: a hub is shared by definition, so the
#: fairness reserve holds while one user is alone too (a user who arrives later never waits for the end
#: of someone else's generation). JupyterHub's proxy usually reaches the service over loopback: the client
#: is then the address the proxy forwards (else every user would share the proxy's address, and one token
#: guesser's failures would lock all of them out: auth_failures.py)
HUB_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"quotas": {"reserve_when_alone": True},
                                                "auth": {"trusted_proxies": ["127.0.0.1", "::1"]}}


def load_hub_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> XllmConfig:
    """The service's config: ``load_config`` with ``HUB_DEFAULTS`` under config.yaml and the environment."""
    return load_config(path, env, defaults=HUB_DEFAULTS)



@dataclass
class RunningService:
    """A listening hub service."""

    url: str  # http://host:port (the prefix comes on top)
    prefix: str
    http_server: HTTPServer

    def stop_listening(self) -> None:
        """Take no new connections; requests already in are served on (``stop`` ends them)."""
        self.http_server.stop()

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """Stop listening, give requests in flight a moment to end (less once ``hurry`` is set), close open
        connections."""
        await stop_http_server(self.http_server, hurry=hurry)


def bind_address(env: Mapping[str, str]) -> tuple[str, int]:
    """``(host, port)`` from ``JUPYTERHUB_SERVICE_URL`` (managed services get it from the hub)."""
    url = env.get("JUPYTERHUB_SERVICE_URL") or DEFAULT_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", ""):
        raise ConfigError(f"JUPYTERHUB_SERVICE_URL is {url!r}: the xllm service serves plain http:// only (TLS is the "
                          "proxy's job; with JupyterHub's internal_ssl give the service an http:// url, see "
                          "docs/jupyterhub.md, 'Internal TLS')")
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        raise ConfigError(f"JUPYTERHUB_SERVICE_URL has no valid port: {url!r}") from None
    return parts.hostname or "127.0.0.1", port or 80


async def start_hub_service(config: XllmConfig, engine: Any, env: Mapping[str, str] | None = None, *, port: int | None = None) -> RunningService:
    """Listen and serve ``engine`` as the hub service described by ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    host, bound = bind_address(env)
    app = make_hub_app(config, engine, make_hub_auth(env))
    server, actual = listen(app, config, host, bound if port is None else port)
    shown = f"[{host}]" if ":" in host else host
    return RunningService(f"http://{shown}:{actual}", service_prefix(env), server)


async def run_hub_service(config: XllmConfig, env: Mapping[str, str] | None = None) -> None:
    """Build store and engine, serve as a hub service until SIGINT/SIGTERM, then stop cleanly."""
    from ..engine.engine import Engine
    from ..store.store import ModelStore

    store = ModelStore(config.store.home)
    store.check_home()  # a home that is a file: an error now, not a service with no models
    engine = Engine(config.engine, catalog=store, quotas=config.quotas)
    await engine.start()
    try:
        service = await start_hub_service(config, engine, env)
    except BaseException:  # a bad URL or a busy port: the engine's threads must not keep the process up
        await engine.stop()
        raise
    log.info("xllm hub service listening on %s%s (OpenAI API: %sv1)", service.url, service.prefix, service.prefix)
    # as `xllm serve`: a second Ctrl-C cuts the drain (usage is still saved), a third interrupts
    stop, hurry = asyncio.Event(), asyncio.Event()
    remove_signals = stop_signals(asyncio.get_running_loop(), stop, hurry)
    model = config.engine.default_model

    async def preload() -> None:
        if not model:
            return
        try:
            await engine.load(model)
            log.info("model %s loaded", model)
        except Exception as exc:  # noqa: BLE001 - a missing default model must not take the service down
            log.warning("default model %s was not loaded: %s", model, getattr(exc, "message", exc))

    task = asyncio.ensure_future(preload())
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        service.stop_listening()  # first: a request arriving now would load a model into a stopping engine
        await shutdown_engine(engine)
        await service.stop(hurry)
        remove_signals()
