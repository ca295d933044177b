"""`xllm serve`: the OpenAI-compatible API on a plain Tornado server, outside Jupyter."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..core.config import XllmConfig
from ..core.errors import ListenError, Overloaded
from ..core.hosts import is_loopback, unspecified_address
from .app import make_app
from .auth import ApiKeyAuth
from .handlers import CONTEXT_KEY
from .auth_failures import FAILURES_KEY, proxy_matcher
from .connections import ConnectionGuard, GuardedHTTPServer, default_max_connections
from .head_limit import HARD_LIMIT

log = logging.getLogger("xllm_jupyter.server")

#: Tornado's own body cap; ours (server.max_body_bytes) is enforced by the handlers,
#: which stream bodies, so this only has to stay above it
_TORNADO_MAX_BODY = 1 << 30
#: how long a shutdown waits for requests in flight to end before it closes their connections
DRAIN_SECONDS = 3.0


@dataclass
class RunningServer:
    """A listening standalone server."""

    host: str
    port: int
    url: str
    http_server: HTTPServer
    auth_enabled: bool

    def stop_listening(self) -> None:
        """Take no new connections; requests already in are served on (``stop`` ends them)."""
        self.http_server.stop()

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """Stop listening, give requests in flight a moment to end (less once ``hurry`` is set), close open
        connections."""
        await stop_http_server(self.http_server, hurry=hurry)

    @property
    def context(self) -> Any:
        """The handlers' shared XllmContext."""
        return self.http_server.request_callback.settings[CONTEXT_KEY]  # type: ignore[attr-defined]


def asks_for_keys(config: XllmConfig) -> bool:
    """True when the server checks API keys: an empty one (``--api-key "$UNSET"``) is none, as ApiKeyAuth skips it."""
    return ApiKeyAuth(config.server.api_keys, config.auth.admin_keys).enabled


def listen_host(config: XllmConfig, host: str | None = None) -> str:
    """The address to bind: without API keys only loopback is allowed."""
    host = config.server.host if host is None else host
    if not asks_for_keys(config) and not is_loopback(host):
        log.warning(
            "No API key is configured, so xllm will not listen on %r: listening on 127.0.0.1 only. "
            "Set XLLM_API_KEYS (or server.api_keys in config.yaml) to serve other hosts.",
            host,
        )
        return "127.0.0.1"
    return host


def _url_host(host: str) -> str:
    every = unspecified_address(host)
    if every is not None:  # IPv6 "::" is IPv6 only (Tornado sets IPV6_V6ONLY): nothing answers on 127.0.0.1
        return "[::1]" if every.version == 6 else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def stop_http_server(http_server: HTTPServer, drain_seconds: float = DRAIN_SECONDS,
                           hurry: asyncio.Event | None = None) -> None:
    """Stop listening; let requests in flight end (up to ``drain_seconds``, or until ``hurry`` is set), then close
    open connections, waiting at most 5 s for them; then save usage.

    With the engine stopped first (``shutdown_engine``), a generation in flight has just failed with a
    503: the drain lets its handler write that (a stream's error event and its end) instead of the
    client seeing a cut connection.
    """
    http_server.stop()
    settings = getattr(http_server.request_callback, "settings", {})
    failures = settings.get(FAILURES_KEY)
    if failures is not None:
        await failures.close()  # requests waiting their turn past the failed-auth cap end now, not at their turn
    context = settings.get(CONTEXT_KEY)
    if context is not None and not await _drained(context, drain_seconds, hurry):
        log.warning("closing %d request(s) still in flight", context.active)
    try:
        await asyncio.wait_for(http_server.close_all_connections(), timeout=5)
    except asyncio.TimeoutError:
        log.warning("some connections did not close within 5 s")
    if context is not None:
        await asyncio.to_thread(context.close)  # the last usage save writes a file: off the loop


async def _drained(context: Any, seconds: float, hurry: asyncio.Event | None) -> bool:
    """``context.wait_idle(seconds)``, ended early (False) once ``hurry`` is set."""
    if hurry is None:
        return await context.wait_idle(seconds)
    idle = asyncio.ensure_future(context.wait_idle(seconds))
    cut = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({idle, cut}, return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    if not idle.done():
        idle.cancel()
        return False
    return idle.result()


def stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, hurry: asyncio.Event) -> Callable[[], None]:
    """Make SIGINT/SIGTERM set ``stop``; one more during the shutdown (a second Ctrl-C) sets ``hurry`` and gives the
    signals back to Python, so a third interrupts. Returns what removes the handlers.

    The handlers stay through the shutdown: a second Ctrl-C raised KeyboardInterrupt wherever the loop was
    (mid-drain, mid-write), which cancelled the rest of the shutdown, the last usage save included.
    """
    signals = (signal.SIGINT, signal.SIGTERM)

    def remove() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    def received() -> None:
        if stop.is_set():
            log.warning("stopping now: requests still in flight are cut (once more interrupts)")
            hurry.set()
            remove()
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, received)
    return remove


def cancel_pulls(engine: Any) -> None:
    """Stop the pulls in flight in ``engine``'s store (a start-up model's first-use pull, ``POST /admin/models/pull``):
    each ends within seconds, leaving nothing in the store, so a shutdown never waits for a download or conversion."""
    cancel = getattr(getattr(engine, "catalog", None), "cancel_pulls", None)
    if cancel is not None and cancel():
        log.info("stopped the model pulls in flight")


async def shutdown_engine(engine: Any) -> None:
    """Stop ``engine`` (its store's pulls first), failing what it still generates with a 503 saying the server is
    shutting down."""
    cancel_pulls(engine)
    await engine.stop(Overloaded("The server is shutting down; retry the request later"))


async def start_server(config: XllmConfig, engine: Any, *, host: str | None = None, port: int | None = None) -> RunningServer:
    """Listen on ``host:port`` (port 0: an ephemeral port) and serve ``engine``."""
    host = listen_host(config, host)
    port = config.server.port if port is None else port
    app = make_app(config, engine)
    server, bound = listen(app, config, host, port)
    url = f"http://{_url_host(host)}:{bound}"
    return RunningServer(host=host, port=bound, url=url, http_server=server, auth_enabled=asks_for_keys(config))


def listen(app: Any, config: XllmConfig, host: str, port: int) -> tuple[HTTPServer, int]:
    """Serve ``app`` on ``host:port`` (0: ephemeral); returns the server and its port. ListenError if the bind fails."""
    try:
        sockets = bind_sockets(port, address=host or None)
    except OSError as exc:
        raise listen_error(host, port, exc) from None
    timeout = config.server.connection_timeout_seconds  # slow or stalled clients must not hold connections
    # a head too long for us is answered 414/431 (head_limit.py); Tornado alone would cut the connection
    server = GuardedHTTPServer(app, max_body_size=max(_TORNADO_MAX_BODY, config.server.max_body_bytes * 2),
                               idle_connection_timeout=timeout, body_timeout=timeout, max_header_size=HARD_LIMIT)
    # half-sent requests held open by one client must not use up the process's sockets (connections.py)
    server.guard = ConnectionGuard(config.server.max_connections or default_max_connections(),
                                   config.server.max_connections_per_client, proxy_matcher(config.auth.trusted_proxies))
    context = app.settings.get(CONTEXT_KEY)
    if context is not None:  # /metrics: connections open now, and those refused on arrival (answered 429/503)
        context.metrics.connections = server.guard
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """A one-line ListenError for a failed bind (the CLI prints it, no traceback)."""
    where = (f"[{host}]" if ":" in host else host or "*") + f":{port}"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"cannot listen on {where}: {reason} (is another xllm serve running? use --port)")
    return ListenError(f"cannot listen on {where}: {reason}")


async def _preload(engine: Any, names: Sequence[str], required: bool, pending: set[str] | None = None) -> None:
    """Load ``names`` in turn; each leaves ``pending`` (what /health/ready waits for) once it is done."""
    await engine.start()
    for name in names:
        try:
            await engine.load_any(name)  # an embedding model too (`-m smollm2 -m all-minilm`: chat and RAG)
            log.info("model %s loaded", name)
        except Exception as exc:
            if required:
                raise
            # the default model is a convenience: a fresh machine without it still serves
            log.warning("default model %s was not loaded: %s", name, getattr(exc, "message", exc))
        finally:
            if pending is not None:
                pending.discard(name)


async def run_server(config: XllmConfig, models: Sequence[str] = ()) -> None:
    """Build store and engine, serve until SIGINT/SIGTERM, then stop cleanly."""
    from ..engine.engine import Engine
    from ..store.store import ModelStore

    store = ModelStore(config.store.home)
    store.check_home()  # a home that is a file: an error now, not a server with no models
    engine = Engine(config.engine, catalog=store, quotas=config.quotas)
    server = await start_server(config, engine)
    log.info("xllm is listening on %s (OpenAI API: %s/v1)", server.url, server.url)
    log.info("authentication: %s", "API key required" if server.auth_enabled else "off (no API key set; loopback only)")
    names = list(models) or ([config.engine.default_model] if config.engine.default_model else [])
    stop, hurry = asyncio.Event(), asyncio.Event()
    remove_signals = stop_signals(asyncio.get_running_loop(), stop, hurry)
    # /health/ready says "Still loading" until every model named here is loaded, the ones not begun yet too
    server.context.startup_pending = set(names)
    preload = asyncio.ensure_future(_preload(engine, names, required=bool(models), pending=server.context.startup_pending))
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({preload, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if preload.done() and preload.exception() is not None:
            raise preload.exception()  # type: ignore[misc]
        await waiter
        log.info("shutting down")
    finally:
        cancel_pulls(engine)  # a start-up model still being pulled: its load ends at once, not when the pull does
        for task in (preload, waiter):
            task.cancel()
        await asyncio.gather(preload, waiter, return_exceptions=True)
        server.stop_listening()  # first: a request arriving now would load a model into a stopping engine
        await shutdown_engine(engine)
        await server.stop(hurry)
        remove_signals()


def serve(config: XllmConfig, models: list[str]) -> None:
    """Serve until interrupted (the CLI's `xllm serve`); ``models`` are loaded at start."""
    from .logging_setup import setup_logging

    setup_logging(config.http)  # http.log_format/log_file/rotation; request ids on every line
    asyncio.run(run_server(config, models))
