"""A request whose URL and headers are too long gets 414 or 431 with an OpenAI error body, not a cut connection.

Tornado reads a request's head (request line and headers) up to ``max_header_size`` and, past it,
closes the connection without a response: the openai SDK reports a connection error and retries it.
The standalone server (and the hub service) let Tornado read up to ``HARD_LIMIT`` and refuse a head
over ``LIMIT`` (Tornado's default, so nothing served before is refused now) themselves, before any
route or authentication runs. Past ``HARD_LIMIT`` the connection is still cut: a head that large is no
client's honest mistake, and reading it costs memory per connection. Jupyter's own HTTPServer keeps
Tornado's behaviour (docs/http-api.md).
"""

from __future__ import annotations

import logging
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer

from ..core.errors import RequestHeadTooLarge, UriTooLong
from .errors import error_response
from .sse import dumps

log = logging.getLogger("xllm_jupyter.server")

#: the largest request head served: Tornado's own default ``max_header_size``
LIMIT = 64 * 1024
#: what Tornado may read of a head before it cuts the connection (the most a connection's head costs)
HARD_LIMIT = 1024 * 1024


def head_size(start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> int:
    """About the bytes of the head as sent: the request line and each ``Name: value`` line with their line ends."""
    size = len(start_line.method) + len(start_line.path) + len(start_line.version) + 4
    return size + sum(len(name) + len(value) + 4 for name, value in headers.get_all())


def refusal(start_line: httputil.RequestStartLine, size: int) -> RequestHeadTooLarge:
    """414 when the URL is the larger part of the head, else 431."""
    if len(start_line.path) > size - len(start_line.path):
        return UriTooLong(f"The request URL is too long ({len(start_line.path):,} bytes; the URL and headers "
                          f"together may have at most {LIMIT:,}).")
    return RequestHeadTooLarge(f"The request headers are too large ({size:,} bytes with the URL; at most "
                               f"{LIMIT:,}).")


class HeadLimitedHTTPServer(HTTPServer):
    """Tornado's HTTPServer, answering a head over ``LIMIT`` with 414/431 (construct it with ``max_header_size=HARD_LIMIT``)."""

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        """The application's delegate, behind the head check."""
        return _HeadCheck(super().start_request(server_conn, request_conn), request_conn)


class _HeadCheck(httputil.HTTPMessageDelegate):
    """Passes a request on to ``delegate`` unless its head is over ``LIMIT``; then answers it alone."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, connection: httputil.HTTPConnection) -> None:
        self._delegate = delegate
        self._connection = connection
        self._refused = False

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        """Refuse an over-large head; pass any other on."""
        size = head_size(start_line, headers)
        if size <= LIMIT:
            return self._delegate.headers_received(start_line, headers)
        self._refused = True  # the application never hears of this request
        status, body, _ = error_response(refusal(start_line, size))
        data = dumps(body).encode()
        log.info("refused a request whose head is %d bytes (at most %d): %d", size, LIMIT, status)
        reason = httputil.responses[status]
        # finished before its body is read, Tornado closes the connection once this is sent: say so
        self._connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", status, reason),
            httputil.HTTPHeaders({"Content-Type": "application/json", "Content-Length": str(len(data)),
                                  "Connection": "close"}),
            data,
        )
        self._connection.finish()
        return None

    def data_received(self, chunk: bytes) -> Any:
        """A refused request's body is dropped."""
        return None if self._refused else self._delegate.data_received(chunk)

    def finish(self) -> None:
        """Pass the end of the request on (unless refused)."""
        if not self._refused:
            self._delegate.finish()

    def on_connection_close(self) -> None:
        """Pass the closed connection on (unless refused: the application never saw the request)."""
        if not self._refused:
            self._delegate.on_connection_close()


__all__ = ["HARD_LIMIT", "LIMIT", "HeadLimitedHTTPServer", "head_size", "refusal"]
