"""The one place exceptions become OpenAI-shaped HTTP error bodies.

Only ``XllmError`` messages reach clients; anything else is a 500 with a generic
message, its details going to the log. Tornado ``HTTPError``s (405 from routing, 403
from Jupyter's auth) are mapped onto the same shape so every error reads alike.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado.web import HTTPError

from ..core.errors import AuthenticationError, Overloaded, PullStopped, RateLimited, XllmError

log = logging.getLogger("xllm_jupyter.server")

#: OpenAI error ``type`` and ``code`` for statuses that come from Tornado or Jupyter, not from us
_HTTP_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "The request is malformed."),
    401: ("invalid_request_error", "invalid_api_key", "Missing or invalid credentials."),
    403: ("permission_error", "permission_denied", "You are not allowed to do this."),
    404: ("invalid_request_error", "not_found", "Not found."),
    405: ("invalid_request_error", "method_not_allowed", "This method is not allowed on this endpoint."),
    413: ("invalid_request_error", "request_too_large", "The request body is too large."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Too many requests."),
    503: ("server_error", "overloaded", "The server is not ready; retry later."),
}

#: seconds a client should wait before retrying a 503 ``overloaded`` (sent as ``Retry-After``)
OVERLOADED_RETRY_AFTER = 1
#: 503 codes that a retry cannot fix (the model is too big for this server): no ``Retry-After``
PERMANENT_503 = frozenset({"model_does_not_fit"})

#: the openai SDKs' own header: "false" stops their automatic retry of a 5xx
NO_RETRY_HEADER = "x-should-retry"

GENERIC_500 = "The server had an error while processing your request. Retry the request."


def error_response(exc: BaseException | None, status: int = 500) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, extra headers)`` for ``exc``; ``status`` is used when ``exc`` says nothing."""
    headers: dict[str, str] = {}
    if isinstance(exc, XllmError):
        if isinstance(exc, AuthenticationError):
            headers["WWW-Authenticate"] = 'Bearer realm="xllm"'
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
        elif isinstance(exc, Overloaded) and exc.code not in PERMANENT_503:
            # busy now, fine soon (queue full, no room while others' models are in use, loading): clients
            # (the openai SDK included) wait this long before their retry instead of their own guess
            headers["Retry-After"] = str(OVERLOADED_RETRY_AFTER)
        if (isinstance(exc, Overloaded) and exc.code in PERMANENT_503) or (exc.status >= 500 and exc.client_safe):
            # the same request fails the same way again: the openai SDKs retry every 5xx (twice by
            # default) unless this header says not to
            headers[NO_RETRY_HEADER] = "false"
        if exc.status == 500 and not exc.client_safe:
            # a server-side failure: never leak its message, which may name paths or internals
            # (503 "busy/not ready" messages are written for clients and stay)
            return exc.status, _body(GENERIC_500, "server_error", None, exc.code), headers
        return exc.status, exc.to_openai(), headers
    if isinstance(exc, HTTPError):
        status = exc.status_code
    if status >= 500 or status not in _HTTP_ERRORS:
        code = "server_error" if status >= 500 else "http_error"
        return status, _body(GENERIC_500 if status >= 500 else "Request failed.", "server_error" if status >= 500 else "invalid_request_error", None, code), headers
    kind, code, message = _HTTP_ERRORS[status]
    return status, _body(message, kind, None, code), headers


def _body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def log_error(exc: BaseException | None, request_summary: str) -> None:
    """Log client mistakes briefly and server failures with their traceback."""
    if isinstance(exc, XllmError) and exc.status < 500:
        log.info("%s -> %d %s", request_summary, exc.status, exc.code)
    elif isinstance(exc, (Overloaded, PullStopped)):
        # busy, unloaded mid-request, shutting down (a pull it stopped too): expected, and its message says it all
        log.warning("%s -> %d %s: %s", request_summary, exc.status, exc.code, exc.message)
    elif isinstance(exc, HTTPError) and exc.status_code < 500:
        log.info("%s -> %d", request_summary, exc.status_code)
    elif exc is not None:
        log.error("%s failed", request_summary, exc_info=exc)
