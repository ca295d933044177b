"""On a JupyterHub with the xllm service: this server's ``{base_url}xllm/`` API answers from the service.

The JupyterLab panel, the playground and any OpenAI client pointed at the user's server
then use the hub's one shared engine instead of loading a model into the user's home.
Requests are still authenticated (and their bodies capped) by Jupyter as before; upstream
they carry only this server's own ``JUPYTERHUB_API_TOKEN`` (``access:services!service=xllm``),
so the service serves, meters and authorizes them as the server's owner. The Jupyter token
or cookie never leaves this server. ``/health`` and ``/health/ready`` (this server's own
liveness), the playground and unknown paths stay local.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, unquote_plus

import httpx
from jupyter_server.utils import url_path_join
from tornado.iostream import StreamClosedError

from ..core.errors import NotFound, Overloaded, PermissionDenied, quoted
from ..server.edge import REQUEST_ID_HEADER, request_id_for
from ..server.handlers import BodyMixin
from ..server.jupyter import JupyterXllmHandler
from ..server.routes import ROUTES
from ..server.sse import sse_event
from .hub_link import HUB, WAITING, HubLink, Upstream

log = logging.getLogger("xllm_jupyter.extension")

#: the 503 code of a forward that found the service not answering
UNREACHABLE = "hub_service_unavailable"
#: settings key of the HubLink that says where the API routes are served (absent: this server's engine serves them)
HUB_LINK_KEY = "xllm_hub_link"
#: the shared routes forwarded (route labels as routes.build_routes sets them); public ones stay local
FORWARDED_ROUTES = frozenset(path for path, _, public in ROUTES if not public)
#: request headers passed upstream: what the API reads or a client names itself with. Never
#: Authorization, Cookie or X-XSRFToken (this server's credentials), nor hop-by-hop headers
REQUEST_HEADERS = ("Accept", "Content-Type", "User-Agent", "X-Request-ID")
#: response headers passed back: the body's type, caching and retry advice, the request id, a 405's methods
RESPONSE_HEADERS = ("Content-Type", "Cache-Control", "Retry-After", "X-Should-Retry", "X-Request-ID", "X-Accel-Buffering",
                    "Allow")
#: admin routes that may take long before their answer (a big model's load, waiting for room; a pull hashing big files)
LONG_ROUTES = frozenset({"/admin/models/load", "/admin/models/pull"})
#: their read timeout: as long as the client's own wait for a load (client/base.py LOAD_TIMEOUT); the pool's 900 s
#: ended a load that took longer in a 503 "could not be reached", and sent the hub a needless re-lookup
LONG_TIMEOUT = httpx.Timeout(3600.0, connect=10.0, pool=30.0)
class HubForwardingHandler(JupyterXllmHandler):
    """The extension's auth base: authorized requests for the shared routes go to the hub service when one is set."""

    async def serve(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Forward to the hub service, or serve here (no service, or a local route)."""
        link: HubLink | None = self.settings.get(HUB_LINK_KEY)
        state = await link.resolve() if link is not None and self.route in FORWARDED_ROUTES else None  # type: ignore[attr-defined]
        if state == WAITING:  # the hub has not said whether it runs the service: no model here meanwhile
            raise Overloaded("This Jupyter server waits for the JupyterHub xllm service (the hub API has not "
                             "answered yet); retry in a few seconds.", code="hub_unavailable")
        if state is None or link is None:  # no hub link, or a local route
            await super().serve(method, *args, **kwargs)
            return
        if link.state != HUB or link.upstream is None:  # (the state now: resolve's answer may be a step old)
            # counted from here, with no await since the check: a switch to the hub service (a re-check that
            # finds it) unloads this server's models only once the requests they serve have ended
            with link.serving_locally():
                await super().serve(method, *args, **kwargs)
            return
        if not self.caller.admin:  # type: ignore[attr-defined]
            # upstream the request carries this server's own token, so the service would serve it as the owner
            # (their quota, their stored chats and responses): a user the server is shared with uses their own
            raise PermissionDenied("This Jupyter server forwards to the JupyterHub xllm service as its owner, so it "
                                   "serves only its owner: use the xllm API of your own server or your hub token.")
        self._dispatched = True  # Tornado has read (and capped) the body by now
        upstream = link.upstream
        try:
            # a client that leaves cancels the task: the upstream connection closes and the service cancels the job
            with upstream.in_use():
                await self._cancellable(self._forward(upstream, method))  # type: ignore[attr-defined]
        except Overloaded as exc:
            if exc.code == UNREACHABLE:  # the hub may know a new URL for it (the client's retry goes there)
                link.service_unreachable(upstream)
            raise

    def _upstream_url(self, upstream: Upstream) -> str:
        local = url_path_join(self.base_url, "xllm") + "/"
        path = self.request.path[len(local):] if self.request.path.startswith(local) else ""
        # a '..' segment would climb out of the service's prefix once the URL is normalized (to the
        # hub's API, when the service is reached through the proxy): no route of ours has one
        if any(unquote(segment) in (".", "..") for segment in path.split("/")):
            raise NotFound(f"Unknown endpoint: {self.request.method} {quoted(self.request.path)}")
        # never a token: Jupyter takes its own in the URL, and the service, where tokens in URLs are allowed,
        # takes one there before the Authorization header that carries this server's
        kept = [part for part in self.request.query.split("&") if unquote_plus(part.split("=", 1)[0]) != "token"]
        query = "&".join(part for part in kept if part)
        # percent-encoded as the client sent it; a byte past ASCII (curl sends a URL as typed) escaped as that byte:
        # Tornado reads the request line as latin-1, and httpx would encode those characters again as UTF-8
        tail = path + (f"?{query}" if query else "")
        return upstream.service.root + "".join(c if c < "\x80" else f"%{ord(c):02X}" for c in tail)

    async def _forward(self, upstream: Upstream, method: str) -> None:
        url = self._upstream_url(upstream)
        # as the bytes the client sent (Tornado reads them as latin-1): httpx encodes a str value as ASCII only, and a
        # User-Agent holding "ë" made the request a 500
        headers: dict[str, str | bytes] = {name: self.request.headers[name].encode("latin-1")
                                           for name in REQUEST_HEADERS if name in self.request.headers}
        # the id this server gave the request (the client's own, or a fresh one): the service's logs and answer use it
        headers[REQUEST_ID_HEADER] = self._xllm_request_id or request_id_for(None)
        body = self.body if method == "post" and isinstance(self, BodyMixin) else None
        timeout = LONG_TIMEOUT if self.route in LONG_ROUTES else httpx.USE_CLIENT_DEFAULT  # type: ignore[attr-defined]
        request = upstream.client.build_request(method.upper(), url, headers=headers, content=body, timeout=timeout)
        try:
            response = await upstream.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(upstream, exc) from None
        try:
            await self._relay(response)
        except httpx.HTTPError as exc:  # a JSON answer cut off (a stream ends itself): nothing was written yet
            raise _unreachable(upstream, exc) from None
        finally:
            await response.aclose()

    async def _relay(self, response: httpx.Response) -> None:
        self.set_status(response.status_code, response.reason_phrase or None)
        for name in RESPONSE_HEADERS:
            if name in response.headers:
                self.set_header(name, response.headers[name])
        content_type = response.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            body = await response.aread()
            self.finish(body, set_content_type=content_type)
            return
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None and hasattr(stream, "set_nodelay"):
            stream.set_nodelay(True)  # small events: no Nagle delay (as server/handlers.stream_events)
        # an event leaves whole, its start held until its end comes: a half relayed and then an error
        # event read as one malformed event (a JSON error in the openai SDK), not as the error
        events = EventCutter()
        try:
            async for chunk in response.aiter_raw():
                whole = events.feed(chunk)
                if whole:
                    self.write(whole)
                    await self.flush()  # each event leaves now; a slow client slows only its own upstream read
        except StreamClosedError:  # the client left: closing the response (caller) closes the upstream connection
            return
        except httpx.HTTPError as exc:  # the service went away mid-stream (stopped, restarted, crashed)
            log.warning("xllm: the hub service's stream broke off: %s", exc)
            events.held.clear()  # a half event: dropped (an event is whole or not sent)
            # an error event, as the service sends for a failure of its own: a stream that just ended passed for
            # the whole answer in the openai SDK, the magics, the widgets and the playground
            self.write(sse_event(Overloaded("The JupyterHub xllm service's stream broke off before the answer was "
                                            "complete (did the service stop or restart?); retry.",
                                            code=UNREACHABLE).to_openai()))
        self.finish(bytes(events.held) or None, set_content_type=content_type)


class EventCutter:
    """A byte stream's whole server-sent events, chunk by chunk: the start of an event whose end has not come is held."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = bytearray()  # the start of an event whose end has not come yet

    def feed(self, chunk: bytes) -> bytes:
        """The events ``chunk`` completes, whole (b"" where none ends in it); what follows the last is held."""
        if not self.held:  # (most chunks: whole events, nothing copied)
            cut = _events_end(chunk, 0)
            self.held += chunk[cut:]
            return chunk[:cut]
        # only the new bytes are searched, and the 3 before them where a separator may begin: a long event in
        # small chunks was joined and searched again whole at each one (quadratic in the event's size)
        start = max(len(self.held) - 3, 0)
        self.held += chunk
        cut = _events_end(self.held, start)
        whole = bytes(self.held[:cut])
        del self.held[:cut]
        return whole


def _events_end(data: bytes | bytearray, start: int) -> int:
    """Where the last whole server-sent event in ``data`` ends, from a separator starting at ``start`` or later (0: none).

    Lines end in LF, CRLF or a bare CR (the SSE spec allows each): a stream of CR-ended lines was held whole until
    it ended. (The bytes are relayed as they came: where they are cut only decides when they leave.)
    """
    lf, crlf, cr = data.rfind(b"\n\n", start), data.rfind(b"\r\n\r\n", start), data.rfind(b"\r\r", start)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0, cr + 2 if cr >= 0 else 0)


def _unreachable(upstream: Upstream, exc: Exception) -> Overloaded:
    """The 503 for a service that did not answer (the cause goes to the log)."""
    log.warning("xllm: the hub service at %s did not answer: %s", upstream.service.root, exc)
    return Overloaded("The JupyterHub xllm service could not be reached from this server; retry later.",
                      code=UNREACHABLE)


__all__ = ["EventCutter", "FORWARDED_ROUTES", "HUB_LINK_KEY", "HubForwardingHandler"]
