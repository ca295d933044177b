"""HTTP hardening for the standalone server: Host check, CORS, gzip, request ids, access log.

Everything here runs before a route handler exists (``XllmApplication.find_handler``)
or after it wrote its headers (output transforms), so the route mixins and auth bases
stay unaware of it. In Jupyter, Jupyter's own ``allow_origin`` settings apply instead.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any

import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.web import GZipContentEncoding, OutputTransform, RequestHandler

from ..core.config import XllmConfig
from ..core.errors import NotFound, PayloadTooLarge, PermissionDenied, quoted
from ..core.hosts import host_name, is_loopback, unspecified_address
from .context import CONTEXT_KEY
from .errors import error_response
from .logging_setup import request_id_var
from .sse import dumps

access_log = logging.getLogger("xllm_jupyter.access")
log = logging.getLogger("xllm_jupyter.server")

#: header carrying the request id both ways
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
#: ``Allow`` of an OPTIONS on a server with API keys, whatever its path: every method some route answers
_ANY_ROUTE_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID"
#: response headers a browser client may read: the request id and the retry advice
_EXPOSE_HEADERS = "X-Request-ID, Retry-After, x-should-retry"
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
#: at most this many requested header names are granted (a preflight asking for more gets the base list)
_MAX_REQUESTED_HEADERS = 32


def allowed_headers(requested: str | None) -> str:
    """The preflight's ``Access-Control-Allow-Headers``: the base list plus the header names asked for.

    The origin is already trusted, and OpenAI's SDKs send their own headers (``x-stainless-*``,
    ``OpenAI-Organization``, ``OpenAI-Beta``) with every request: a fixed list made browsers
    refuse every SDK call. Only well-formed names are echoed, so nothing odd is reflected.
    """
    names = [n.strip() for n in (requested or "").split(",") if n.strip()]
    if not names or len(names) > _MAX_REQUESTED_HEADERS or not all(_HEADER_NAME.fullmatch(n) for n in names):
        return _ALLOW_HEADERS
    base = {h.strip().lower() for h in _ALLOW_HEADERS.split(",")}
    extra = list(dict.fromkeys(n.lower() for n in names if n.lower() not in base))
    return ", ".join([_ALLOW_HEADERS, *extra])


def request_id_for(header: str | None) -> str:
    """The client's id when it is a safe token (<= 128 of ``[A-Za-z0-9._-]``), else a fresh uuid4 hex."""
    if header and _VALID_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def declares_body(headers: HTTPHeaders) -> bool:
    """True when a request's head announces a body (``Transfer-Encoding``, or a ``Content-Length`` other than 0)."""
    return bool(headers.get("Transfer-Encoding")) or headers.get("Content-Length", "0").strip() not in ("", "0")


class RequestIdMixin:
    """``X-Request-ID`` on every response, errors included, for handler bases of apps other than the standalone
    ``XllmApplication`` (Jupyter, the hub service): the openai SDK's ``request_id``, and the id on log records."""

    _xllm_request_id: str | None = None

    def set_default_headers(self) -> None:
        """The base's defaults plus the id; Tornado calls this again when an error clears the headers."""
        super().set_default_headers()  # type: ignore[misc]
        if self._xllm_request_id is None:  # first call, from __init__: in the context the handler's task copies
            request = self.request  # type: ignore[attr-defined]
            self._xllm_request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
            request.xllm_request_id = self._xllm_request_id  # log_access's line carries it too
            request_id_var.set(self._xllm_request_id)
        self.set_header(REQUEST_ID_HEADER, self._xllm_request_id)  # type: ignore[attr-defined]


class EdgePolicy:
    """Which origins may call from a browser and which ``Host`` names are served.

    ``any_host_ok``: API keys are on, so the key (not the Host or the page's origin) guards the server.
    """

    def __init__(self, cors_origins: Iterable[str], allowed_hosts: Iterable[str], bound_host: str, any_host_ok: bool):
        #: API keys are on: an anonymous OPTIONS learns nothing of the route table (``PreflightHandler.options``)
        self.keyed = any_host_ok
        origins = tuple(o.rstrip("/") for o in cors_origins if o)
        if origins == ("*",) and not any_host_ok:
            # keyless, the local caller may do everything: "*" would hand that to every web page the user
            # visits (pull local paths, unload, read stored chats). Only origins named one by one are trusted
            log.warning("http.cors_origins ['*'] is ignored on a server without API keys: list the browser "
                        "origins that may call it by name, or set server.api_keys")
            origins = ()
        self.cors_any = origins == ("*",)
        # exact string matches only: "https://a.example" never admits "https://a.example.evil"
        self.cors_origins = frozenset() if self.cors_any else frozenset(origins)
        hosts = {host_name(h) for h in allowed_hosts if h.strip()}
        # unless the admin lists the names, loopback names and addresses are served
        self.loopback = not hosts
        if not hosts:
            if unspecified_address(bound_host) is not None:  # "0", "::0" too, not only "0.0.0.0" and "::"
                if any_host_ok:
                    # bound to every interface with API keys on: the key, not the name, is the guard
                    hosts.add("*")
            else:
                hosts.add(host_name(bound_host))
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts)

    @property
    def cors_enabled(self) -> bool:
        """True when any browser origin is configured."""
        return self.cors_any or bool(self.cors_origins)

    def origin_allowed(self, origin: str | None) -> bool:
        """True when ``origin`` may read responses (exact match, or the list is ``["*"]``)."""
        if not origin:
            return False
        return self.cors_any or origin in self.cors_origins

    def host_allowed(self, host_header: str | None) -> bool:
        """True when the request's ``Host`` names this server (guards against DNS rebinding)."""
        if self.any_host:
            return True
        name = host_name(host_header or "")
        return name in self.hosts or (self.loopback and is_loopback(name))


class _EdgeHandler(RequestHandler):
    """Answers that are decided before routing; errors leave OpenAI-shaped."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """OpenAI error body; the connection is not reused since the body was never read."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        status, body, headers = error_response(exc, status_code)
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        self.set_header("Connection", "close")
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(body))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """The access log line says enough for a refused request."""

    def on_finish(self) -> None:
        """Count the request in ``xllm_requests_total`` as every routed one is (``endpoint="other"``: never routed)."""
        context = self.settings.get(CONTEXT_KEY)
        if context is not None:
            context.metrics.record_request("other", self.get_status())


@tornado.web.stream_request_body
class ForbiddenHostHandler(_EdgeHandler):
    """A request whose ``Host`` this server does not answer to: 403."""

    def prepare(self) -> None:
        """Refuse before reading any body."""
        raise PermissionDenied("This server does not answer to the requested Host name.")

    def data_received(self, chunk: bytes) -> None:
        """Never reached: prepare refuses first."""


@tornado.web.stream_request_body
class UnknownMethodHandler(_EdgeHandler):
    """A method no route takes (TRACE, PROPFIND, ...) on a server with API keys: 405 alike on every path.

    Tornado refuses such a method before the key is asked for, and the route's 405 named its own methods (the
    catch-all's every method): the route table for anyone without a key, as an OPTIONS was (``PreflightHandler``).
    """

    SUPPORTED_METHODS = ()  # Tornado's own 405, before ``prepare``

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The 405, with the ``Allow`` an anonymous OPTIONS gets on every path."""
        self.set_header("Allow", _ANY_ROUTE_METHODS)
        super().write_error(status_code, **kwargs)

    def data_received(self, chunk: bytes) -> None:
        """Never reached: refused on the head."""


@tornado.web.stream_request_body
class PreflightHandler(_EdgeHandler):
    """``OPTIONS``: 204 with the route's ``Allow`` (404 off the routes); with an ``Origin``, a CORS preflight
    (the allowed methods/headers too), 403 for an origin not allowed. Never needs the API key, as in Jupyter.

    With API keys on, the answer is the same for every path (204, ``Allow`` naming every method the API answers
    somewhere): a route's own ``Allow`` and the 404 off the routes told anyone without a key which paths exist,
    which every other method keeps behind the key (its 401 comes before the 404). No key is checked here: a check
    that changed the answer would be a way round the failed-auth cap (auth_failures.py).
    """

    #: the methods of the route asked about (``None``: no route has the path); set by ``XllmApplication``
    route_methods: tuple[str, ...] | None = None

    def initialize(self, route_methods: tuple[str, ...] | None = None) -> None:
        """Remember the route's methods (``Allow``)."""
        self.route_methods = route_methods

    def prepare(self) -> None:
        """Refuse a foreign origin, and any body (413), before reading a byte of it."""
        policy: EdgePolicy = self.settings[POLICY_KEY]
        origin = self.request.headers.get("Origin")
        if self.request.method != "OPTIONS" or (origin is not None and not policy.origin_allowed(origin)):
            raise PermissionDenied("This origin is not allowed to call this server (CORS).")
        # no key is asked here, so a body is never read: declared, it is refused on the head (413), as the hub
        # service's body-less pages do (read and dropped, anyone could make the server take in up to 1 GiB)
        if declares_body(self.request.headers):
            raise PayloadTooLarge("An OPTIONS request takes no body.")

    def options(self, *args: Any) -> None:
        """204 with the route's methods, and what the origin may send.

        Answered here, after the (empty) body, not in ``prepare``: a response finished before the
        body was read makes Tornado close the connection, and the browser's request right after
        the preflight then met a reset connection.
        """
        policy: EdgePolicy = self.settings[POLICY_KEY]
        if policy.keyed:
            self.set_header("Allow", _ANY_ROUTE_METHODS)  # alike on every path: no key, no route table
        elif self.route_methods is not None:
            self.set_header("Allow", ", ".join(self.route_methods))
        if self.request.headers.get("Origin") is None:  # a plain OPTIONS (no browser asking): only what is served
            if self.route_methods is None and not policy.keyed:
                raise NotFound(f"Unknown endpoint: OPTIONS {quoted(self.request.path)}")
            self.set_status(204)
            self.finish()
            return
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", _ALLOW_METHODS)
        self.set_header("Access-Control-Allow-Headers", allowed_headers(self.request.headers.get("Access-Control-Request-Headers")))
        # the answer depends on the headers asked for: caches must not reuse it for other requests
        self.add_header("Vary", "Access-Control-Request-Headers")
        self.set_header("Access-Control-Max-Age", "600")
        self.finish()

    def data_received(self, chunk: bytes) -> None:
        """Never reached: ``prepare`` refuses a body first."""


class EdgeHeaders(OutputTransform):
    """Adds ``X-Request-ID`` and the CORS response headers to every response, errors included."""

    def __init__(self, request: HTTPServerRequest):
        self.request = request

    def transform_first_chunk(self, status_code: int, headers: HTTPHeaders, chunk: bytes, finishing: bool) -> tuple[int, HTTPHeaders, bytes]:
        """Set the headers once, on the first flush."""
        rid = getattr(self.request, "xllm_request_id", None)
        if rid:
            headers[REQUEST_ID_HEADER] = rid
        policy: EdgePolicy | None = getattr(self.request, "xllm_policy", None)
        if policy is not None and policy.cors_enabled:
            origin = self.request.headers.get("Origin")
            if not policy.cors_any:
                # the answer depends on Origin: shared caches must not mix origins
                headers.add("Vary", "Origin")
            if policy.origin_allowed(origin):
                headers["Access-Control-Allow-Origin"] = "*" if policy.cors_any else origin  # type: ignore[assignment]
                headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
        return status_code, headers, chunk


class JsonGzip(GZipContentEncoding):
    """Tornado's gzip, but never for server-sent events (they would be buffered and compressed)."""

    MIN_LENGTH = 512

    def _compressible_type(self, ctype: str) -> bool:
        if ctype.startswith("text/event-stream"):
            return False
        return super()._compressible_type(ctype)


#: settings key of the EdgePolicy
POLICY_KEY = "xllm_edge_policy"


class XllmApplication(tornado.web.Application):
    """The standalone app: assigns request ids and applies the Host and CORS policy before routing."""

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
        """Tag the request, then route refused hosts and preflights to their own handlers."""
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        request.xllm_request_id = rid  # type: ignore[attr-defined]
        policy: EdgePolicy = self.settings[POLICY_KEY]
        request.xllm_policy = policy  # type: ignore[attr-defined]
        # set in the connection's context: the handler's task copies it, so every log
        # record the handler and the serving code emit for this request carries the id
        request_id_var.set(rid)
        if not policy.host_allowed(request.host):
            return self.get_handler_delegate(request, ForbiddenHostHandler)
        if request.method == "OPTIONS":
            return self.get_handler_delegate(request, PreflightHandler, {"route_methods": self._route_methods(request)})
        if policy.keyed and request.method not in _EdgeHandler.SUPPORTED_METHODS:
            return self.get_handler_delegate(request, UnknownMethodHandler)  # no key, no route table
        return super().find_handler(request, **kwargs)

    def _route_methods(self, request: HTTPServerRequest) -> tuple[str, ...] | None:
        """The methods the route for ``request``'s path answers; ``None`` when only the 404 catch-all takes it."""
        for rule in self.wildcard_router.rules:
            if rule.matcher.match(request) is not None:
                target = rule.target
                if not isinstance(target, type) or getattr(target, "route", "other") == "other":
                    return None  # the catch-all (or no route handler): a path no route has
                return tuple(getattr(target, "allowed_methods", ()))
        return None


def log_access(handler: RequestHandler) -> None:
    """One access-log line per request, with its id, method, path, status and duration."""
    status = handler.get_status()
    req = handler.request
    duration_ms = round(1000.0 * req.request_time(), 2)
    level = logging.INFO if status < 500 else logging.ERROR
    extra = {
        "request_id": getattr(req, "xllm_request_id", None),
        "method": req.method,
        "path": req.path,
        "status": status,
        "duration_ms": duration_ms,
    }
    access_log.log(level, "%s %s %d %.2fms", req.method, req.path, status, duration_ms, extra=extra)


def edge_settings(config: XllmConfig, any_host_ok: bool) -> dict[str, Any]:
    """The Tornado settings that turn the edge policy on for ``config``."""
    policy = EdgePolicy(config.http.cors_origins, config.http.allowed_hosts, config.server.host, any_host_ok)
    return {POLICY_KEY: policy, "log_function": log_access}


def edge_transforms(config: XllmConfig) -> list[type[OutputTransform]]:
    """Output transforms: gzip (JSON only) when ``http.compress``, then the edge headers."""
    return ([JsonGzip] if config.http.compress else []) + [EdgeHeaders]


__all__ = [
    "REQUEST_ID_HEADER",
    "EdgePolicy",
    "RequestIdMixin",
    "XllmApplication",
    "declares_body",
    "edge_settings",
    "edge_transforms",
    "log_access",
    "request_id_for",
]
