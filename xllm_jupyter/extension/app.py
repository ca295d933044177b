"""The Jupyter server extension: one shared engine behind ``{base_url}xllm/v1``.

Traits (``c.XllmApp.<name>``) are mapped onto the core config as overrides, so
config.yaml and ``XLLM_*`` variables still apply underneath them. The engine is built
in ``initialize_settings`` (no model work), started after the IOLoop runs, and the
default model loads in the background: a request arriving meanwhile waits for it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Float, Integer, Unicode

from ..core.config import XllmConfig, load_config
from ..core.errors import StoreError
from ..server.handlers import CONTEXT_KEY, HEALTH_FACTS_KEY, XllmContext
from ..server.jupyter import JupyterPublicHandler
from ..server.routes import build_routes
from ..server.standalone import cancel_pulls, shutdown_engine
from .hub_forward import HUB_LINK_KEY, HubForwardingHandler
from .hub_link import HUB, LOCAL, HubLink
from .playground import LOCAL_API_KEY, close_playground, playground_routes

#: the routes' prefix under the server's base_url
PREFIX = "/xllm"


class XllmApp(ExtensionApp):
    """Serves the OpenAI-compatible API of one shared engine inside Jupyter Server."""

    name = "xllm"

    default_model = Unicode(None, allow_none=True, help="Default model (engine.default_model): loaded at start, used by the notebook front-ends when no model is named.").tag(config=True)
    preload = Bool(True, help="Load the default model in the background right after the server starts.").tag(config=True)
    home = Unicode(None, allow_none=True, help="Model store directory (default: XLLM_HOME or the XDG data dir).").tag(config=True)
    max_batch_size = Integer(None, allow_none=True, help="Most sequences decoded together per model.").tag(config=True)
    max_body_bytes = Integer(None, allow_none=True, help="Largest accepted request body, in bytes.").tag(config=True)
    config_file = Unicode(None, allow_none=True, help="config.yaml to read (default: XLLM_CONFIG, else <XLLM_HOME>/config.yaml).").tag(config=True)
    defer_to_hub = Bool(True, help="In a JupyterHub single-user server whose hub runs the xllm service: export no XLLM_BASE_URL (kernels then use the hub service), load no model, and forward this server's xllm API (panel, playground) to the service. While the hub API does not answer, wait for it (503, no model) and ask again on the next request.").tag(config=True)
    hub_recheck_seconds = Float(300.0, help="With defer_to_hub: when the hub said it has no xllm service for this server (403, 404), ask it again about this often (0: never), in the background; once the service appears, this server forwards to it and unloads its own models when the requests they serve have ended. A service found is asked about as often: once the hub no longer shows it (removed), this server's own engine serves again.").tag(config=True)

    engine: Any = None
    xllm_config: XllmConfig | None = None
    _start_task: asyncio.Future | None = None
    _preload_task: asyncio.Future | None = None
    _retire_task: asyncio.Future | None = None
    _hub_link: HubLink | None = None
    _exported: dict[str, str]

    def build_config(self) -> XllmConfig:
        """The core config with this app's traits applied on top."""
        return load_config(
            Path(self.config_file).expanduser() if self.config_file else None,
            overrides={
                "engine": {"default_model": self.default_model, "max_batch_size": self.max_batch_size},
                "server": {"max_body_bytes": self.max_body_bytes},
                "store": {"home": self.home},
            }
        )

    def initialize_settings(self) -> None:
        """Build (not start) the engine and hand the handlers their context."""
        from ..engine.engine import Engine
        from ..store.store import ModelStore

        self.xllm_config = config = self.build_config()
        store = ModelStore(config.store.home)
        try:
            store.check_home()
        except StoreError as exc:  # logged, not raised: the hub's xllm service may still serve these kernels
            self.log.error("xllm: %s; this server's own engine has no models", exc.message)
        self.engine = Engine(config.engine, catalog=store, quotas=config.quotas)
        self.settings[CONTEXT_KEY] = XllmContext(self.engine, config)
        self._exported = {}

    def initialize_handlers(self) -> None:
        """The shared route table under ``/xllm`` (ExtensionApp prepends base_url)."""
        # Jupyter-only route (gradio is imported on its first request); before the catch-all 404
        # the base forwards the shared routes to the hub's xllm service once start finds one
        self.handlers.extend(playground_routes(PREFIX, HubForwardingHandler))
        self.handlers.extend(build_routes(PREFIX, HubForwardingHandler, JupyterPublicHandler))

    # --------------------------------------------------------------- lifecycle
    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """After the IOLoop starts: ask the hub whether its xllm service serves here, export the API location, start the engine."""
        link = None
        if self.defer_to_hub:
            link = self._hub_link = HubLink(os.environ, self._hub_settled, self.hub_recheck_seconds)
            serverapp.web_app.settings[HUB_LINK_KEY] = link  # handlers read the web app's settings
            # (the advice names a scope and a restart, nothing of the hub's address or this server's set-up)
            serverapp.web_app.settings[HEALTH_FACTS_KEY] = lambda: {"engine": link.state,
                                                                    **({"hub": link.advice} if link.advice else {})}
            await link.resolve()  # the first lookup; a hub that does not answer is asked again on demand
        state = link.state if link is not None else LOCAL
        # XLLM_BASE_URL would win over hub discovery in every kernel: each user would get a private engine
        # and model copy instead of the hub's shared one (docs/jupyterhub.md). While the hub has not
        # answered it is exported all the same: kernels then come here (this server forwards once the hub
        # answers) instead of starting a private server of their own
        self._export_env(serverapp, export=state != HUB)
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start_engine(preload=state == LOCAL))

    def _hub_settled(self, link: HubLink) -> None:
        """The hub answered: log the decision, and act on it when it came after the start (a request asked)."""
        if link.state == HUB:
            assert link.upstream is not None
            self.log.info("xllm: the JupyterHub service %r at %s serves this hub: kernels use it and this server's "
                          "xllm API forwards to it (c.XllmApp.defer_to_hub)", link.upstream.service.name,
                          link.upstream.service.root)
            # kernels started from now on find the service themselves; earlier ones reach it through this server
            self._withdraw_env()
            if self._start_task is not None and (self._retire_task is None or self._retire_task.done()):
                # a switch (the engine has started): its models go once the requests they serve have ended
                self._retire_task = asyncio.ensure_future(self._retire_local_engine(link))
            return
        log = self.log.warning if link.fault else self.log.info
        again = (f"; the hub is asked again every {link.recheck_seconds:g} s or so (c.XllmApp.hub_recheck_seconds)"
                 if link.rechecking else "")
        log("xllm: no JupyterHub xllm service for this server (%s): its own engine serves%s%s", link.reason, again,
            f". Note: {link.advice}" if link.advice else "")
        if self._start_task is None:
            return  # settled at the start: the start exports the variables and loads the model
        if self.serverapp is not None and not self._exported:  # a switch back from the service (it was removed)
            self._export_env(self.serverapp)  # kernels started from now on come here again
        if self._preload_task is None or self._preload_task.done():  # settled after the start: load now
            self._preload_task = asyncio.ensure_future(self._load_default())

    async def _retire_local_engine(self, link: HubLink) -> None:
        """After a switch to the hub service: unload this server's models once the requests they serve have ended."""
        # asyncio.wait, not gather: cancelling this (at stop) must not cancel the start, which stop awaits itself
        pending = [t for t in (self._start_task, self._preload_task) if t is not None and not t.done()]
        if pending:
            await asyncio.wait(pending)
        await link.local_drained()
        if link.state != HUB:  # the service went again before (this server's engine serves on)
            return
        names = [m.name for m in self.engine.loaded_models()]
        for name in names:
            try:
                await self.engine.unload(name)
            except Exception as exc:  # noqa: BLE001 - the service serves either way; the memory stays taken
                self.log.warning("xllm: %s was not unloaded from this server: %s", name, exc)
        if names:
            self.log.info("xllm: unloaded %s from this server: the JupyterHub service serves it", ", ".join(names))

    async def _start_engine(self, preload: bool = True) -> None:
        await self.engine.start()
        if self.preload and preload:
            await self._load_default()

    async def _load_default(self) -> None:
        model = self.xllm_config.engine.default_model if self.xllm_config else None
        if not (self.preload and model):
            return
        if self._start_task is not None and asyncio.current_task() is not self._start_task:
            await self._start_task  # the engine runs first
        retire = self._retire_task
        if retire is not None and not retire.done():  # back from the service while its unloads still ran
            await asyncio.wait([retire])  # (wait, not await: cancelling this must not cancel that)
        try:
            await self.engine.load(model)
            self.log.info("xllm: model %s loaded", model)
        except Exception as exc:  # a missing default model must not take the server down
            self.log.warning("xllm: default model %s was not loaded: %s", model, getattr(exc, "message", exc))

    async def stop_extension(self) -> None:
        """Cancel the background start, stop the engine, withdraw the exported variables."""
        if self.engine is not None:
            cancel_pulls(self.engine)  # the default model's first-use pull must not hold Jupyter's exit for minutes
        for task in (self._retire_task, self._preload_task, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._start_task = self._preload_task = self._retire_task = None
        link, self._hub_link = self._hub_link, None
        if self.serverapp is not None:
            self.serverapp.web_app.settings.pop(HUB_LINK_KEY, None)
            self.serverapp.web_app.settings.pop(HEALTH_FACTS_KEY, None)
        if link is not None:
            await link.close()
        # Gradio's server thread is joined (up to 15 s): never on the IOLoop, which other extensions still use
        await asyncio.to_thread(close_playground, self.settings.get(CONTEXT_KEY))
        if self.settings.get(CONTEXT_KEY) is not None:
            await asyncio.to_thread(self.settings[CONTEXT_KEY].close)  # last usage save (quotas.usage_file)
        if self.engine is not None:
            await shutdown_engine(self.engine)  # open generations end with a 503 'shutting down', not 'unloaded'
        self._withdraw_env()

    def _withdraw_env(self) -> None:
        """Take back the variables ``_export_env`` set (unless something else changed them since)."""
        for key, value in getattr(self, "_exported", {}).items():
            if os.environ.get(key) == value:
                del os.environ[key]
        self._exported = {}

    def current_activity(self) -> bool:
        """True while generating, so idle culling leaves a busy server alone."""
        if self.engine is None:
            return False
        stats = self.engine.stats()
        return bool(stats.running or stats.queued)

    def _export_env(self, serverapp: Any, export: bool = True) -> None:
        """Kernels started after this inherit XLLM_BASE_URL and XLLM_API_KEY (with ``export``; the playground always learns them)."""
        if serverapp.sock:
            self.log.info("xllm: server listens on a UNIX socket; XLLM_BASE_URL not exported")
            return
        host = _connect_host(serverapp.ip or "")
        scheme = "https" if serverapp.certfile else "http"
        url = f"{scheme}://{host}:{serverapp.port}" + url_path_join(serverapp.base_url, "xllm", "v1")
        values = {"XLLM_BASE_URL": url}
        token = getattr(serverapp.identity_provider, "token", "") or ""
        if token:
            values["XLLM_API_KEY"] = token
        # the playground talks to this server's API either way; handlers read the web app's settings (a copy of ours)
        serverapp.web_app.settings[LOCAL_API_KEY] = dict(values)
        if export:
            os.environ.update(values)
            self._exported = values
        self.log.info("xllm: OpenAI-compatible API at %s", url)


def _connect_host(ip: str) -> str:
    """Where a kernel on this machine reaches a server listening on ``ip`` (``ServerApp.ip``), for a URL.

    Loopback for every interface or localhost; else the address itself: a server on one address
    (``--ip=$(hostname)``, as cluster guides have it) does not answer on 127.0.0.1, and kernels sent
    there could not reach the engine, nor could the playground.
    """
    if ip in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if ip == "::":
        return "[::1]"
    return f"[{ip}]" if ":" in ip else ip
