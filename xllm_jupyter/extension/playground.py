"""``POST {base_url}xllm/playground``: start (once) the Gradio playground inside the Jupyter
server process and return its URL, for the JupyterLab panel's "Open playground" command.

Jupyter-only: the standalone server has no notebook UI to open it from. Gradio is
imported on the first request, never when the extension loads. The playground talks to
this server's own API with the address and token the extension found at start, so its
URLs carry its secret path (the only way in): this Jupyter-authenticated answer is what
hands them out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ..core.errors import EngineError, Overloaded, PermissionDenied, XllmError
from ..server.handlers import BodyMixin
from ..server.routes import handler_class

log = logging.getLogger("xllm_jupyter.extension")

#: attribute of the server's XllmContext that holds the running Playground (one per server)
PLAYGROUND_ATTR = "playground"
#: settings key of this server's own API location ({"XLLM_BASE_URL", "XLLM_API_KEY"}), set by the extension
#: at start: on a hub with the xllm service it is not exported to the environment (kernels use the hub's)
LOCAL_API_KEY = "xllm_local_api"


class PlaygroundMixin(BodyMixin):
    """``POST /playground``: ``{"url", "local_url", "model"}`` of the running playground (URLs with its secret)."""

    async def handle_post(self) -> None:
        """Start the playground unless it runs already; answer with where it is."""
        if not self.caller.admin:
            # it relays every chat with the owner's token: whoever holds its URL acts as the server's owner
            raise PermissionDenied("Only this Jupyter server's owner may open its playground (it acts as the owner).")
        # kept on the context, which the extension app shares with the handlers' settings
        context = self.xllm
        lock = context.__dict__.setdefault("_playground_lock", asyncio.Lock())
        async with lock:
            running = getattr(context, PLAYGROUND_ATTR, None)
            if running is None or running.closed:
                running = await asyncio.to_thread(_launch, self.settings.get(LOCAL_API_KEY) or os.environ)
                setattr(context, PLAYGROUND_ATTR, running)
        # The URLs are credentials: no cache may keep them.
        self.set_header("Cache-Control", "no-store")
        self.write_json({"url": running.url, "local_url": running.local_url, "model": running.model})


def _launch(api: Any) -> Any:
    """Start the playground against this server's API, ``api`` holding its XLLM_BASE_URL/XLLM_API_KEY (runs on a worker thread)."""
    base_url = api.get("XLLM_BASE_URL")
    if not base_url:
        raise Overloaded("The playground needs this server's API address, which is not exported when Jupyter "
                         "listens on a UNIX socket; run xllm_jupyter.playground() in a notebook instead.",
                         code="playground_unavailable")
    try:
        from ..client import XllmClient
        from ..playground import launch
    except ImportError as exc:  # gradio is an optional dependency
        raise Overloaded(f"The playground is not available: {exc.name or exc} is not installed (pip install gradio).",
                         code="playground_unavailable") from None
    client = XllmClient(base_url, api.get("XLLM_API_KEY") or None)
    try:
        return launch(client=client, inline=False)
    except XllmError:
        raise
    except Exception as exc:  # noqa: BLE001 - a Gradio failure becomes one clear error, not a traceback
        # its text may name files: the log keeps it, the answer only says what kind of failure
        log.warning("the playground could not start: %s", exc)
        raise EngineError(f"The playground could not start ({type(exc).__name__}); the server log says why") from None
    finally:
        client.close()


def playground_routes(prefix: str, base: type) -> list[tuple[str, type, dict[str, Any]]]:
    """The route, to be placed before the prefix's catch-all 404."""
    handler = handler_class(PlaygroundMixin, base)
    handler.route = "/playground"  # type: ignore[attr-defined]  # the metrics label
    return [(prefix.rstrip("/") + "/playground", handler, {})]


def close_playground(context: Any) -> None:
    """Stop the playground of ``context`` (an XllmContext) if one was started (the extension's shutdown)."""
    running = getattr(context, PLAYGROUND_ATTR, None)
    if running is not None:
        setattr(context, PLAYGROUND_ATTR, None)
        running.close()


__all__ = ["PLAYGROUND_ATTR", "PlaygroundMixin", "close_playground", "playground_routes"]
