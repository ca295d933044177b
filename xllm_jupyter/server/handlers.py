"""Request logic as mixins, shared by every auth base (Jupyter, API key, later the hub).

A route's concrete handler class is ``type(name, (RouteMixin, AuthBase), {})`` (see
``routes.py``). Mixins implement ``handle_get``/``handle_post``; the auth base defines
``get``/``post`` with its own decorators and calls them, so the request logic never
knows how the caller was authenticated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from tornado.web import HTTPError

from .. import __version__
from ..core.errors import NotFound, PayloadTooLarge, XllmError, quoted
from .context import CONTEXT_KEY, HEALTH_FACTS_KEY, XllmContext
from .errors import error_response, log_error
from .json_pieces import write_json_in_pieces
from .limits import charge_left, charge_response, metered, open_stream_tally
from .metrics import open_token_clock
from .request_body import BodyReader
from .sse import SSE_HEADERS, EventStreamWriter, dumps
from .stalls import watch_finish

log = logging.getLogger("xllm_jupyter.server")

#: routes admitted against the caller's per-user quotas (server/usage.py): they queue engine work
METERED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})


def admin_required(handler: Any) -> bool:
    """True when ``handler``'s request needs an admin: an admin route (``admin_only``), or one of the route's
    admin methods (``ADMIN_METHODS``: ``DELETE /v1/models/{id}`` removes from the store, its GET is anyone's)."""
    method = (handler.request.method or "").upper()
    return bool(getattr(handler, "admin_only", False)) or method in getattr(handler, "ADMIN_METHODS", ())


def generates(route: str, method: str) -> bool:
    """True for a request that queues engine work (a POST to a metered route); reads of stored objects do not."""
    return method.lower() == "post" and route in METERED_ROUTES


class VerbDispatchMixin:
    """GET/POST/DELETE handed to the route mixin's ``dispatch``, for plain Tornado handler bases."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("get", *args, **kwargs)  # type: ignore[attr-defined]

    async def post(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("post", *args, **kwargs)  # type: ignore[attr-defined]

    async def delete(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("delete", *args, **kwargs)  # type: ignore[attr-defined]

    async def head(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin: its GET, whose body Tornado leaves out."""
        await self.dispatch("head", *args, **kwargs)  # type: ignore[attr-defined]

    async def put(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin: a 405 naming the route's methods (a 404 off the routes)."""
        await self.dispatch("put", *args, **kwargs)  # type: ignore[attr-defined]

    async def patch(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin: a 405 naming the route's methods (a 404 off the routes)."""
        await self.dispatch("patch", *args, **kwargs)  # type: ignore[attr-defined]

    async def options(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin: 204 with ``Allow`` (a 404 off the routes)."""
        await self.dispatch("options", *args, **kwargs)  # type: ignore[attr-defined]


class RequestMixin:
    """Shared plumbing: JSON replies, OpenAI-shaped errors, cancel-on-disconnect, SSE."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET",)
    #: methods of this route that only admins may call (a whole admin route sets ``admin_only`` instead)
    ADMIN_METHODS: tuple[str, ...] = ()
    #: the methods this route serves (routes.handler_class puts SUPPORTED_METHODS, with HEAD wherever GET is,
    #: here and lets Tornado pass every method, so that an unserved one is refused only after authentication)
    allowed_methods: tuple[str, ...] = ("GET", "HEAD")
    # Every route streams its body (routes.py applies @stream_request_body) so Tornado
    # never buffers a body on its own: GET routes drop it, BodyMixin caps it.
    _work_task: asyncio.Task | None = None
    _client_gone = False
    _dispatched = False
    #: the metrics label for this route (routes.py sets it to the route's path)
    route = "other"

    async def dispatch(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Run the route's ``handle_<method>``; auth bases call this from get/post."""
        self._dispatched = True  # Tornado has read the whole body by now
        if method.upper() not in self.allowed_methods:
            raise HTTPError(405)
        method = "get" if method == "head" else method  # Tornado sends HEAD's status and headers, never its body
        context = self.xllm
        context.metrics.in_flight.inc()
        context.active += 1
        ticket = None
        try:
            if generates(self.route, method):
                ticket = context.usage.admit(self.caller)  # per-user quotas (429)
            await getattr(self, "handle_" + method)(*args, **kwargs)
        finally:
            context.metrics.in_flight.dec()
            context.active -= 1
            if ticket is not None:
                context.usage.release(ticket)

    async def handle_options(self, *args: Any, **kwargs: Any) -> None:
        """204 naming the route's methods (the hub service; standalone and Jupyter answer OPTIONS before routing)."""
        self.set_header("Allow", ", ".join(self.allowed_methods))  # type: ignore[attr-defined]
        self.set_status(204)  # type: ignore[attr-defined]
        self.finish()  # type: ignore[attr-defined]

    @property
    def caller(self) -> Any:
        """Who is calling (``usage.Caller``): set by the hub base, else the API key id or Jupyter user."""
        found = getattr(self, "xllm_caller", None)
        if found is None:
            from .usage import caller_of

            found = self.xllm_caller = caller_of(self)
        return found

    def on_finish(self) -> None:
        """Count every finished request, refused ones included, by route and status."""
        super().on_finish()  # type: ignore[misc]
        context = self.settings.get(CONTEXT_KEY)  # type: ignore[attr-defined]
        if context is not None:
            context.metrics.record_request(self.route, self.get_status())  # type: ignore[attr-defined]

    def data_received(self, chunk: bytes) -> None:
        """Bodies on body-less routes are read and dropped."""

    @property
    def query(self) -> dict[str, str]:
        """The query parameters, each its last value (``limit``, ``order``, ``metadata[key]`` ...)."""
        req = self.request  # type: ignore[attr-defined]
        return {name: self.get_query_argument(name) for name in req.query_arguments}  # type: ignore[attr-defined]

    @property
    def xllm(self) -> XllmContext:
        """The context the app was built with."""
        return self.settings[CONTEXT_KEY]  # type: ignore[attr-defined]

    # --------------------------------------------------------------- replies
    def write_json(self, obj: Any, status: int = 200) -> None:
        """Finish with a JSON body."""
        self.set_status(status)  # type: ignore[attr-defined]
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        done = self.finish(dumps(obj))  # type: ignore[attr-defined]
        # a client that reads none of a large answer must not hold its bytes (and the connection) for good
        watch_finish(self, done, self.xllm.config.server.connection_timeout_seconds)

    async def write_large_json(self, obj: Any) -> None:
        """``write_json`` for answers that can be tens of MB (logprobs): sent in pieces, the IOLoop free between them."""
        await write_json_in_pieces(self, obj, self.xllm.config.server.connection_timeout_seconds)

    def finish_event_stream(self) -> Any:
        """Finish an SSE response, keeping its content type.

        A short stream (one token) is still unflushed here, so its headers leave with
        ``finish``; a base whose ``finish`` sets a content type of its own (Jupyter's
        APIHandler sets JSON) names the options that keep it in ``event_stream_finish``.
        It is an attribute of the base, not an override: this mixin comes first in the MRO.
        """
        return self.finish(**getattr(self, "event_stream_finish", {}))  # type: ignore[attr-defined]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error, ours or Tornado's/Jupyter's, leaves as an OpenAI error body."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        status, body, headers = error_response(exc, status_code)
        if not self._dispatched:
            # Refused before the body was read (auth, 405, 413): Tornado closes the
            # connection after this response, so tell the client not to reuse it.
            headers["Connection"] = "close"
        headers.update({"Allow": ", ".join(self.allowed_methods)} if status == 405 else {})  # RFC 9110: 405 names them
        self.set_status(status)  # type: ignore[attr-defined]
        for name, value in headers.items():
            self.set_header(name, value)  # type: ignore[attr-defined]
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(dumps(body))  # type: ignore[attr-defined]

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """Client mistakes are one log line; only server failures get a traceback."""
        req = self.request  # type: ignore[attr-defined]
        log_error(value, f"{req.method} {req.path}")

    # ----------------------------------------------------- disconnect handling
    def on_connection_close(self) -> None:
        """The client left: cancel whatever generation this request is running."""
        super().on_connection_close()  # type: ignore[misc]
        self._client_left()

    def _client_left(self) -> None:
        if self._client_gone:
            return
        self._client_gone = True
        task = self._work_task
        if task is not None and not task.done():
            task.cancel()  # unwinds through the engine iterator, which cancels the jobs

    async def _cancellable(self, work: Awaitable[Any]) -> tuple[bool, Any]:
        """Await ``work``, cancelled if the client disconnects; (False, None) when it did."""
        self._work_task = asyncio.current_task()
        try:
            return True, await work
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            self._work_task.uncancel()  # type: ignore[union-attr]
            return False, None
        finally:
            self._work_task = None

    async def respond(self, work: Awaitable[dict[str, Any] | AsyncIterator[dict[str, Any]]], **writer_options: Any) -> None:
        """Run a serving call; write its dict as JSON or stream its chunks as SSE."""
        start = time.perf_counter()
        open_stream_tally()  # before the work: tasks it starts (a stream's first engine step) count into it
        open_token_clock(self.route)  # (as do their tokens' arrival times)
        ok, result = await self._cancellable(work)
        if not ok:
            charge_left(self)  # the client left before the answer: what it used still counts (auth.tokens_per_minute)
            # nginx's 499 (client closed request): the access log and xllm_requests_total read it as no answer, not a 200
            self.set_status(499, "Client Closed Request")  # type: ignore[attr-defined]
            return
        metrics = self.xllm.metrics
        if isinstance(result, dict):
            charge_response(self, result)
            await self.write_large_json(result)
        else:
            # a stream with its own way of failing (the Responses API's typed events) says how
            failure = getattr(result, "failure_events", None)
            await self.stream_events(metrics.timed_stream(self.route, metered(self, result), start), failure, **writer_options)
        metrics.observe_duration(self.route, time.perf_counter() - start)

    async def stream_events(self, stream: AsyncIterator[dict[str, Any]], failure: Callable[[dict[str, Any]], list[Any]] | None = None,
                            **writer_options: Any) -> None:
        """Write chunks as server-sent events; errors after the start become an error event.

        ``writer_options`` (``encode``, ``done``) pick another event framing, e.g. typed events;
        ``failure(body)``, when given, turns the OpenAI error body into the events that end the
        stream (else one ``data: {"error": ...}`` event, as chat and completions send).
        """
        for name, value in SSE_HEADERS.items():
            self.set_header(name, value)  # type: ignore[attr-defined]
        stream_socket = getattr(self.request.connection, "stream", None)  # type: ignore[attr-defined]
        if stream_socket is not None and hasattr(stream_socket, "set_nodelay"):
            # each event is a small write: without this, Nagle holds an event back until the
            # client ACKs the previous one (up to its 40 ms delayed-ACK timer)
            stream_socket.set_nodelay(True)
        server = self.xllm.config.server
        writer = EventStreamWriter(self, server.keepalive_seconds, self._client_left,
                                   stall_seconds=server.connection_timeout_seconds, **writer_options)
        try:
            await self._cancellable(writer.write_all(stream))
        except Exception as exc:
            req = self.request  # type: ignore[attr-defined]
            log_error(exc, f"{req.method} {req.path} (stream)")
            _, body, _ = error_response(exc)
            if failure is None:
                await writer.write_error(body)
            elif not writer.closed:
                for event in failure(body):
                    self.write(writer.encode(event))  # type: ignore[attr-defined]
                await writer.drain()
        finally:
            writer.close()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # idempotent; cancels the engine jobs if we stopped early
        try:
            self.finish_event_stream()
        except Exception:  # the client is gone; there is nobody to finish for
            log.debug("could not finish an event stream", exc_info=True)


class BodyMixin(RequestMixin):
    """Reads a capped JSON request body (request_body.py): 413 from Content-Length before reading, and while
    reading or inflating; 415 for a body declared as another media type or coding."""

    SUPPORTED_METHODS: tuple[str, ...] = ("POST",)
    _reader: BodyReader | None = None
    _body: bytes | None = None
    _body_refused = False

    async def prepare(self) -> None:
        """Auth (the base's prepare) first, then the Content-Length check."""
        result = super().prepare()  # type: ignore[misc]
        if result is not None:
            await result
        if self._finished:  # type: ignore[attr-defined]
            return
        self._reader = BodyReader.for_request(self.request.headers, self._body_limit, self._too_large)  # type: ignore[attr-defined]

    @property
    def _body_limit(self) -> int:
        return self.xllm.config.server.max_body_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the server's limit of {self._body_limit} bytes.")

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """Collect body bytes; past the limit (also once inflated: off the IOLoop, BodyReader.take) answer 413 at once."""
        if self._body_refused or self._finished or self._reader is None:  # type: ignore[attr-defined]
            return None
        return self._reader.take(chunk, self._refuse_body)

    def _refuse_body(self, exc: XllmError) -> None:
        self._body_refused, self._reader = True, None
        if not self._finished:  # type: ignore[attr-defined]  (a chunk inflated off the loop: it may have ended since)
            self.send_error(exc.status, exc_info=(type(exc), exc, None))  # type: ignore[attr-defined]

    async def dispatch(self, method: str, *args: Any, **kwargs: Any) -> None:
        """A POST body refused for its type, coding or gzip data is a 415/400 before any work (after auth)."""
        if method == "post":
            self._dispatched = True  # the body was read: the connection may be reused after the error
            self.body  # noqa: B018 - raises the refusal
        await super().dispatch(method, *args, **kwargs)

    @property
    def body(self) -> bytes:
        """The whole request body (inflated when it came gzip-compressed)."""
        if self._body is None:
            self._body = self._reader.body() if self._reader is not None else b""
        return self._body


# ------------------------------------------------------------------ route mixins
class ModelsMixin(RequestMixin):
    """``GET /v1/models``."""

    async def handle_get(self) -> None:
        """List models, and the server's version (any caller may read it; ``/admin/models/manifest`` is the admins')."""
        listing = await self.xllm.serving.list_models(self.caller.user, admin=self.caller.admin)
        self.write_json({**listing, "xllm": {"server_version": __version__}})


class ChatCompletionsMixin(BodyMixin):
    """``POST /v1/chat/completions``, and ``GET``: the caller's stored chat completions."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "POST")

    async def handle_post(self) -> None:
        """Chat completion, streamed or not."""
        await self.respond(self.xllm.serving.chat_completion(self.body, user=self.caller.user,
                                                             manages=self.caller.admin))

    async def handle_get(self) -> None:
        """One page of the caller's stored chat completions (``model``, ``metadata[k]``, ``after``, ``limit``, ``order``)."""
        self.write_json(self.xllm.serving.stored.list(self.query, user=self.caller.user))


class CompletionsMixin(BodyMixin):
    """``POST /v1/completions``."""

    async def handle_post(self) -> None:
        """Legacy text completion, streamed or not."""
        await self.respond(self.xllm.serving.completion(self.body, user=self.caller.user, manages=self.caller.admin))


class AdminModelsMixin(RequestMixin):
    """``GET /admin/models``: what is loaded, with memory, load and batching facts."""

    async def handle_get(self) -> None:
        """Loaded models."""
        self.write_json(self.xllm.serving.admin_models())


class AdminLoadMixin(BodyMixin):
    """``POST /admin/models/load`` with ``{"model": name}``."""

    async def handle_post(self) -> None:
        """Load a model and return its info."""
        self.write_json(await self.xllm.serving.admin_load(self.body))


class AdminUnloadMixin(BodyMixin):
    """``POST /admin/models/unload`` with ``{"model": name}``."""

    async def handle_post(self) -> None:
        """Unload a model."""
        self.write_json(await self.xllm.serving.admin_unload(self.body))


class HealthMixin(RequestMixin):
    """``GET /health``: unauthenticated liveness for load balancers and the CLI."""

    async def handle_get(self) -> None:
        """200 while every runner thread is alive, else 503 (no model names: this route needs no key)."""
        healthy = self.xllm.engine.healthy
        facts = self.settings.get(HEALTH_FACTS_KEY)  # type: ignore[attr-defined]
        body = {"status": "ok" if healthy else "unhealthy", **(facts() if facts is not None else {})}
        self.write_json(body, 200 if healthy else 503)


class NotFoundMixin(RequestMixin):
    """Anything else under the prefix: an OpenAI-shaped 404."""

    #: every method: a path no route has is a 404 whatever the method (a 405's Allow would name methods it lacks)
    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "POST", "DELETE", "PUT", "PATCH")

    async def handle_get(self, *args: Any) -> None:
        """404."""
        raise NotFound(f"Unknown endpoint: {self.request.method} {quoted(self.request.path)}")  # type: ignore[attr-defined]

    handle_post = handle_delete = handle_put = handle_patch = handle_options = handle_get


__all__ = [
    "CONTEXT_KEY",
    "HEALTH_FACTS_KEY",
    "XllmContext",
    "RequestMixin",
    "BodyMixin",
    "ModelsMixin",
    "ChatCompletionsMixin",
    "CompletionsMixin",
    "AdminModelsMixin",
    "AdminLoadMixin",
    "AdminUnloadMixin",
    "HealthMixin",
    "NotFoundMixin",
]
