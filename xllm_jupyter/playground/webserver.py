"""Serve the Gradio app under its secret path: uvicorn on a background thread, optional share tunnel.

``Blocks.launch()`` serves an app at ``/`` to anyone who can connect; mounting the Blocks
under ``/{secret}`` in our own FastAPI app, behind ``Guard``, makes the URL the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import XllmError
from ..core.hosts import unspecified_address
from .guard import Guard
from .links import LINK_GUARD_HEAD
from .stopping import stamp_arrival

#: how long the server may take to bind and run Gradio's startup events
START_TIMEOUT_S = 30.0
#: what uvicorn logs when its graceful shutdown ends open streams (an open page's) by cancelling them
_SHUTDOWN_CANCEL = "Cancel %s running task(s), timeout graceful shutdown exceeded"


class ShutdownNoise(logging.Filter):
    """Turns uvicorn's reports of the streams our own ``close()`` cancelled into debug lines.

    A browser tab still showing the app holds event streams open; uvicorn cancels them after
    its graceful wait and logged an error with a CancelledError traceback for each, which a
    kernel prints under the cell that called ``close()``. Nothing failed: the app was closed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        cancelled = exc is not None and issubclass(exc, asyncio.CancelledError)
        if record.msg == _SHUTDOWN_CANCEL or cancelled:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None  # the traceback is uvicorn's own, not a fault
        return True


def quiet_shutdown_logs() -> None:
    """Install ``ShutdownNoise`` on uvicorn's error logger (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ShutdownNoise) for f in logger.filters):
        logger.addFilter(ShutdownNoise())


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (bound here so a taken port is an error, not a log line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn binds: connections of a closed app lingering in TIME_WAIT don't block reuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def public_path(root: str | None) -> str:
    """The path part of a root path or URL (``""`` without one): what the proxy strips."""
    if not root:
        return ""
    return (urlsplit(root).path if root.startswith(("http://", "https://")) else root).rstrip("/")


def guarded_app(
    blocks: Any, *, secret: str, host: str, root: str | None, allowed_hosts: tuple[str, ...]
) -> Guard:
    """The ASGI app serving ``blocks`` only at ``/{secret}/`` and only for expected Hosts."""
    import gradio
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    # No docs/openapi routes: nothing but the mount answers.
    parent = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # A CORS policy on the parent turns Gradio's own off (it echoes a foreign Origin when
    # the Host is not a loopback name, which is exactly a DNS-rebinding request). The app
    # only ever calls itself, so no origin is allowed.
    parent.add_middleware(CORSMiddleware, allow_origins=[])
    prefix = public_path(root)
    gradio.mount_gradio_app(
        parent,
        blocks,
        path=f"/{secret}",
        # Gradio's app sets this as the ASGI root_path its routes are matched under, so it
        # must be the prefix the Guard puts back plus the mount path; Gradio builds its links
        # from it.
        # (A full URL, which Gradio would use as is, breaks that matching: the request's
        # Host and X-Forwarded-* headers give the links' scheme and host instead.)
        root_path=f"{prefix}/{secret}",
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        # model text is rendered by Gradio in the page: the guard keeps its links to the web
        head=LINK_GUARD_HEAD,
    )
    is_url = bool(root) and root.startswith(("http://", "https://"))
    extra = allowed_hosts + ((urlsplit(root).hostname or "",) if is_url else ())
    # stamped: Stop reaches a chat turn still in Gradio's queue when the turn was sent before it
    return Guard(stamp_arrival(parent), secret=secret, host=host, allowed_hosts=extra, root_path=prefix)


class WebServer:
    """uvicorn serving one ASGI app on a bound socket from a daemon thread; ``close()`` frees the port."""

    def __init__(self, app: Any, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(
            app,
            # No access log: every request line carries the secret path.
            access_log=False,
            log_level="warning",
            # Leave the host process's logging (a Jupyter server's) as it is.
            log_config=None,
            loop="asyncio",
            lifespan="on",
            # An open SSE stream must not hold close() up for long.
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        quiet_shutdown_logs()
        self.sock = sock
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="xllm-playground", daemon=True
        )

    def start(self) -> None:
        """Run the server and wait until it serves (raises XllmError if it stops instead)."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise XllmError("the playground's web server did not start (see the log above)")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop serving, wait for the thread and release the socket (idempotent)."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
            if self.thread.is_alive():  # a stuck connection: stop waiting for it
                self.server.force_exit = True
                self.thread.join(timeout=5)
        self.sock.close()


def open_share_tunnel(blocks: Any, host: str, port: int) -> tuple[str, Any]:
    """(public ``https://….gradio.live`` URL, the tunnel) forwarding to ``host:port``.

    What ``launch(share=True)`` does, done for our own server: Gradio's share servers relay
    every path to this port, so the app stays behind its secret path there too.
    """
    from gradio import networking, tunneling

    before = list(tunneling.CURRENT_TUNNELS)
    every = unspecified_address(host)
    local = host if every is None else "::1" if every.version == 6 else "127.0.0.1"
    try:
        address = networking.setup_tunnel(local, port, blocks.share_token, None, None)
    except Exception as exc:  # noqa: BLE001 - no network, a blocked binary: one clear error
        raise XllmError(f"the playground could not open a Gradio share link: {exc}") from None
    # setup_tunnel keeps the tunnel in a module list; ours is the one it just added.
    tunnel = next((t for t in tunneling.CURRENT_TUNNELS if t not in before), None)
    url = "https://" + address.split("://", 1)[-1].rstrip("/")
    return url, tunnel


def close_tunnel(tunnel: Any) -> None:
    """Stop a share tunnel from ``open_share_tunnel`` (None: nothing to do)."""
    if tunnel is not None:
        with contextlib.suppress(Exception):
            tunnel.kill()


__all__ = ["WebServer", "bind", "close_tunnel", "guarded_app", "open_share_tunnel", "public_path"]
