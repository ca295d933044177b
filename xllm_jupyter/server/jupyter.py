"""Auth bases for the Jupyter extension: Jupyter's own token/cookie auth and authorizer.

``Authorization: token <t>`` and ``Authorization: Bearer <t>`` both work, so the OpenAI
SDK with ``api_key=<jupyter token>`` needs nothing else. Token-authenticated requests
skip XSRF; cookie-authenticated browser POSTs still need ``X-XSRFToken``.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated, authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web


class JupyterXllmHandler(ExtensionHandlerMixin, APIHandler):
    """Authenticated and authorized on the ``xllm`` resource (GET = read, POST and DELETE = write)."""

    auth_resource = "xllm"

    @web.authenticated
    @authorized
    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("get", *args, **kwargs)  # type: ignore[attr-defined]

    @web.authenticated
    @authorized
    async def post(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("post", *args, **kwargs)  # type: ignore[attr-defined]

    @web.authenticated
    @authorized
    async def delete(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("delete", *args, **kwargs)  # type: ignore[attr-defined]

    def finish_event_stream(self) -> Any:
        """APIHandler.finish forces JSON unless told otherwise."""
        return self.finish(set_content_type="text/event-stream; charset=utf-8")


class JupyterPublicHandler(ExtensionHandlerMixin, APIHandler):
    """Unauthenticated (only ``/health``)."""

    auth_resource = "xllm"

    @allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("get", *args, **kwargs)  # type: ignore[attr-defined]
