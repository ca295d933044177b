"""A request body as the JSON routes read it: capped, gzip inflated under the same cap, JSON only.

The cap (``server.max_body_bytes``) holds for the bytes on the wire and for what they inflate
to: a gzip body is inflated a bounded slice at a time and refused the moment its output passes
the cap, so a small "zip bomb" costs at most the cap's worth of inflating.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, Awaitable, Callable, Mapping

from ..core.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType, XllmError, quoted

#: content codings a body may be sent in (``x-gzip`` is the old name of ``gzip``)
GZIP_CODINGS = frozenset({"gzip", "x-gzip"})
#: the two bytes every gzip member starts with
_GZIP_MAGIC = b"\x1f\x8b"
#: the most deflate inflates one byte to (RFC 1951's longest match in one bit): what a chunk may cost to inflate
_MAX_RATIO = 1032
#: worst-case bytes a gzip chunk may inflate to on the IOLoop; more goes to a worker thread (about 1-2 ms)
INLINE_INFLATE_BYTES = 1024 * 1024
#: a JSON media type: ``application/json`` or a ``+json`` type (``application/merge-patch+json``)
_JSON_SUFFIX = "+json"


def check_media_type(content_type: str | None) -> None:
    """Refuse a body declared as something other than UTF-8 JSON (415); no Content-Type at all is read as JSON.

    A client that forgot the header (curl ``-d`` sends form-encoded) learns why, rather than the body
    being read as something it said it is not.
    """
    if content_type is None or not content_type.strip():
        return
    media, *params = (part.strip() for part in content_type.split(";"))
    media = media.lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith(_JSON_SUFFIX)):
        raise UnsupportedMediaType(f"Unsupported Content-Type '{quoted(media)}': send the body as JSON with "
                                   "'Content-Type: application/json'.", param=None)
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"Unsupported charset '{quoted(value.strip())}': JSON bodies must be UTF-8.")


def _coding(content_encoding: str | None) -> str:
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return "identity"
    if len(codings) == 1 and codings[0] in GZIP_CODINGS:
        return "gzip"
    raise UnsupportedMediaType(f"Unsupported Content-Encoding '{quoted(', '.join(codings))}': send the body "
                               "uncompressed or gzip-compressed.")


class BodyReader:
    """Collects a body chunk by chunk, inflating gzip; raises PayloadTooLarge past ``limit`` bytes at once.

    A body refused for its type, its coding or broken gzip is only counted (for the cap) and raises
    when ``body()`` is asked for: after the route's own auth and admin checks, which come first.
    """

    def __init__(self, limit: int, content_encoding: str | None, too_large: Callable[[], PayloadTooLarge],
                 content_type: str | None = None):
        self.limit = limit
        self._too_large = too_large
        self._parts: list[bytes] = []
        self._fed = False
        self._inflater: Any = None
        self.size = 0  # bytes kept (inflated ones for a gzip body)
        self._wire = 0  # bytes read, once the body is refused
        #: why the body is refused (raised by ``body()``), None while it is fine
        self.refused: XllmError | None = None
        try:
            check_media_type(content_type)
            if _coding(content_encoding) == "gzip":
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except XllmError as exc:
            self.refused = exc

    @classmethod
    def for_request(cls, headers: Mapping[str, str], limit: int, too_large: Callable[[], PayloadTooLarge]) -> BodyReader:
        """A reader for the request with ``headers``; a declared length past ``limit`` raises at once."""
        length = headers.get("Content-Length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise InvalidRequest("Invalid Content-Length header") from None
            if size > limit:
                raise too_large()
        has_body = length not in (None, "0") or "Transfer-Encoding" in headers  # only a body that is there has a type
        return cls(limit, headers.get("Content-Encoding"), too_large, headers.get("Content-Type") if has_body else None)

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._parts = []
            exc = self._too_large()
            if self._inflater is not None:
                exc = PayloadTooLarge(exc.message.rstrip(".") + " once decompressed (Content-Encoding: gzip).")
            raise exc
        self._parts.append(data)

    def _refuse(self, message: str) -> None:
        self.refused = InvalidRequest(message, code="invalid_body")
        self._parts = []

    def feed(self, chunk: bytes) -> None:
        """Add ``chunk`` as it came off the wire."""
        self._fed = self._fed or bool(chunk)
        if self.refused is not None:
            self._wire += len(chunk)
            if self._wire > self.limit:
                raise self._too_large()
            return
        if self._inflater is None:
            self._keep(chunk)
            return
        data = chunk
        try:
            while data:
                if self._inflater.eof:
                    # a gzip body is a series of members (RFC 1952 2.2, as `cat a.gz b.gz` makes): what follows one
                    # must start the next, anything else is trailing data
                    if not _GZIP_MAGIC.startswith(data[:len(_GZIP_MAGIC)]):
                        self._refuse("The gzip request body has data after its end.")
                        return
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                inflater = self._inflater
                # at most one byte past what the cap still allows: enough to know it is over
                self._keep(inflater.decompress(data, self.limit - self.size + 1))
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
        except zlib.error:
            self._refuse("The request body is not valid gzip data (Content-Encoding: gzip).")

    def take(self, chunk: bytes, refuse: Callable[[XllmError], None]) -> Awaitable[None] | None:
        """``feed(chunk)``, handing what it raises to ``refuse``. A gzip chunk that may inflate past
        ``INLINE_INFLATE_BYTES`` (a 64 KiB read: up to the whole cap, 0.1 s and more of the IOLoop's time for a
        4 MiB one) is fed on a worker thread instead: the awaitable returned, which the server waits for before
        it reads on (Tornado's flow control for ``data_received``), so one feed runs at a time."""
        worst = min(len(chunk) * _MAX_RATIO, self.limit - self.size + 1)
        if self._inflater is not None and self.refused is None and worst > INLINE_INFLATE_BYTES:
            return self._take_off_loop(chunk, refuse)
        try:
            self.feed(chunk)
        except XllmError as exc:
            refuse(exc)
        return None

    async def _take_off_loop(self, chunk: bytes, refuse: Callable[[XllmError], None]) -> None:
        try:
            await asyncio.to_thread(self.feed, chunk)
        except XllmError as exc:
            refuse(exc)

    def body(self) -> bytes:
        """The whole body (inflated), or the error that refuses it (a gzip body cut short included)."""
        if self.refused is None and self._inflater is not None and self._fed and not self._inflater.eof:
            self._refuse("The gzip request body ends before its data does.")
        if self.refused is not None:
            raise self.refused
        return b"".join(self._parts)


__all__ = ["BodyReader", "GZIP_CODINGS", "INLINE_INFLATE_BYTES", "check_media_type"]
