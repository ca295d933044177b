"""Auth bases for the Jupyter extension: Jupyter's own token/cookie auth and authorizer.

``Authorization: token <t>`` and ``Authorization: Bearer <t>`` both work, so the OpenAI
SDK with ``api_key=<jupyter token>`` needs nothing else. Token-authenticated requests
skip XSRF; cookie-authenticated browser POSTs still need ``X-XSRFToken``. A request
without valid credentials is a 401 ``invalid_api_key`` (Jupyter's own API answers 403),
so OpenAI clients raise ``AuthenticationError``; 403 stays for users who may not do it.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated, authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..core.errors import AuthenticationError, PayloadTooLarge, PermissionDenied
from .edge import RequestIdMixin, declares_body
from .handlers import admin_required


class AllowOnOptionsMixin:
    """Jupyter's own OPTIONS answer (``APIHandler.options``, anonymous), plus the route's ``Allow``."""

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        """An OPTIONS that declares a body is a 413 on its head: it is answered without credentials, so a body
        would be read for anyone (a body route buffered up to ``max_body_bytes`` of it); then Jupyter's checks."""
        if self.request.method == "OPTIONS" and declares_body(self.request.headers):  # type: ignore[attr-defined]
            raise PayloadTooLarge("An OPTIONS request takes no body.")
        result = super().prepare(*args, **kwargs)  # type: ignore[misc]
        if result is not None:
            await result

    @allow_unauthenticated
    def options(self, *args: Any, **kwargs: Any) -> None:
        """Jupyter's CORS answer with the methods the route serves (none named off the routes)."""
        if getattr(self, "route", "other") != "other":
            self.set_header("Allow", ", ".join(self.allowed_methods))  # type: ignore[attr-defined]
        super().options(*args, **kwargs)  # type: ignore[misc]


class JupyterXllmHandler(RequestIdMixin, AllowOnOptionsMixin, ExtensionHandlerMixin, APIHandler):
    """Authenticated and authorized on the ``xllm`` resource (GET = read, POST and DELETE = write)."""

    auth_resource = "xllm"

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        """Jupyter's checks, with "no credentials" as a 401 (Jupyter raises 403 for every refusal)."""
        try:
            await super().prepare(*args, **kwargs)
        except web.HTTPError as exc:
            if exc.status_code == 403 and self.current_user is None:
                raise _no_credentials() from None
            raise

    def get_login_url(self) -> str:
        """No login page for API routes: "no credentials" is a 401 here too.

        With Jupyter's default ``allow_unauthenticated_access=True`` prepare() lets the request
        through and ``@web.authenticated`` asks for this URL on GET, where APIHandler raises 403.
        """
        if not self.current_user:
            raise _no_credentials()
        return super().get_login_url()

    @web.authenticated
    @authorized
    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        self.check_admin()
        await self.serve("get", *args, **kwargs)

    @web.authenticated
    @authorized
    async def post(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        self.check_admin()
        await self.serve("post", *args, **kwargs)

    @web.authenticated
    @authorized
    async def delete(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        self.check_admin()
        await self.serve("delete", *args, **kwargs)

    @web.authenticated
    @authorized
    async def head(self, *args: Any, **kwargs: Any) -> None:
        """A GET route's status and headers, no body (Tornado leaves it out); a 405 on the other routes.

        Served as its GET (HEAD is allowed exactly where GET is): forwarded to the hub service as a GET too, so
        the ``Content-Length`` Tornado sets is the body's, as a HEAD answer's should be.
        """
        self.check_admin()
        await self.serve("get", *args, **kwargs)

    @web.authenticated
    @authorized
    async def put(self, *args: Any, **kwargs: Any) -> None:
        """No xllm route takes PUT or PATCH: a 405 naming the route's methods (a 404 off the routes), once the
        caller is known (the anonymous get a 401). Never forwarded to the hub service: there is nothing to serve."""
        self.check_admin()
        await self.dispatch(self.request.method.lower(), *args, **kwargs)  # type: ignore[attr-defined]

    patch = put

    def check_admin(self) -> None:
        """``/admin/*``, ``/metrics`` and removing a model are the server owner's: a user the server is shared with gets a 403."""
        # the identity provider may know several users (a JupyterHub server shared with others): they use
        # the API, but every user's usage, and pulling, loading and unloading, stay the owner's (usage.caller_of)
        if admin_required(self) and not self.caller.admin:  # type: ignore[attr-defined]
            raise PermissionDenied("Only this Jupyter server's owner may call admin endpoints.")

    async def serve(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Serve an authorized request: the route mixin here (the extension's base may send it elsewhere)."""
        await self.dispatch(method, *args, **kwargs)  # type: ignore[attr-defined]

    #: APIHandler.finish forces JSON unless told otherwise (RequestMixin.finish_event_stream passes these)
    event_stream_finish = {"set_content_type": "text/event-stream; charset=utf-8"}
    #: the keyword of APIHandler.finish that keeps another content type (ops.finish_typed)
    content_type_option = "set_content_type"


def _no_credentials() -> AuthenticationError:
    return AuthenticationError("Missing or invalid Jupyter token. Pass it as 'Authorization: Bearer <token>' "
                               "(the OpenAI SDK's api_key).")


class JupyterPublicHandler(RequestIdMixin, AllowOnOptionsMixin, ExtensionHandlerMixin, APIHandler):
    """Unauthenticated (only ``/health``)."""

    auth_resource = "xllm"

    @allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("get", *args, **kwargs)  # type: ignore[attr-defined]

    @allow_unauthenticated
    async def head(self, *args: Any, **kwargs: Any) -> None:
        """GET's status and headers, no body."""
        await self.dispatch("head", *args, **kwargs)  # type: ignore[attr-defined]

    async def caller_known(self) -> bool:
        """True when the request carried this server's credentials (token or login cookie)."""
        return self.current_user is not None
