"""Server-sent events for Tornado handlers: cheap encoding, coalesced flushes, keepalives.

Per-token overhead is what limits small-model throughput, so the writer avoids work
per chunk: one prebuilt JSON encoder, no flush while the next chunk is already
waiting (several ready deltas leave in one write), at most one flush in flight, after
the headers plain HTTP/1.1 chunks written straight to the IOStream (``direct_stream``)
instead of ``RequestHandler.flush``'s futures (and, while the stream has nothing queued,
straight to its socket: ``socket_sender``), and a keepalive timer that only looks at a
timestamp instead of wrapping every wait in a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
import types
from typing import Any, AsyncIterator, Callable

from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import GZipContentEncoding, OutputTransform

from .stalls import StallWatch


def _compact_encoder() -> Callable[[Any], str]:
    """Compact JSON, as ``JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode``.

    That method builds the C encoder afresh on every call (a quarter of a small chunk's encoding
    time, paid per event); the one built here once is the same encoder with the same settings,
    so the bytes are the same. Where the C encoder is missing or takes other arguments, the
    method itself.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    try:  # the arguments JSONEncoder.iterencode passes it for these settings (markers None: no circular check)
        c_encode = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
        if "".join(c_encode({"a": [1.5, None, "\u00e9"]}, 0)) != encoder.encode({"a": [1.5, None, "\u00e9"]}):
            return encoder.encode
    except TypeError:
        return encoder.encode
    join = "".join
    return lambda obj: join(c_encode(obj, 0))


_encode = _compact_encoder()

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keepalive\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(obj: Any) -> bytes:
    """One ``data:`` event holding ``obj`` as compact JSON."""
    return b"data: " + _encode(obj).encode("utf-8") + b"\n\n"


def typed_sse_event(obj: Any) -> bytes:
    """One ``event: <type>`` + ``data:`` event, as the Responses API streams them."""
    return b"event: " + obj["type"].encode("utf-8") + b"\ndata: " + _encode(obj).encode("utf-8") + b"\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON (the same encoder the events use)."""
    return _encode(obj)


def direct_stream(handler: Any) -> Any:
    """The IOStream that events can be written to as HTTP chunks directly, or None.

    ``RequestHandler.flush`` costs three futures and their callbacks per write, paid per
    token per stream. Once the headers are out, a chunked HTTP/1.1 response whose output
    transforms leave body chunks alone (no gzip) can skip it: the bytes on the wire are
    the same. Anything else (another connection type, HTTP/1.0, compression) returns None
    and keeps the ordinary ``flush``.
    """
    conn = getattr(getattr(handler, "request", None), "connection", None)
    if not isinstance(conn, HTTP1Connection) or not getattr(conn, "_chunking_output", False):
        return None
    if not getattr(handler, "_headers_written", False) or not isinstance(getattr(handler, "_write_buffer", None), list):
        return None
    for transform in getattr(handler, "_transforms", None) or ():
        if isinstance(transform, GZipContentEncoding):
            if getattr(transform, "_gzipping", True):
                return None
        elif type(transform).transform_chunk is not OutputTransform.transform_chunk:
            return None
    return conn.stream


def socket_sender(stream: Any) -> Callable[[bytes], int] | None:
    """``stream``'s plain socket ``send``, when events may skip ``IOStream.write`` while nothing is queued; else None.

    ``IOStream.write`` makes a Future per call and a done callback that the event loop runs
    in a turn of its own: per token per stream, one more loop iteration, and (the loop polls
    its selector each turn, releasing the GIL) one more GIL hand-off with a step thread that
    is launching its kernels. With the stream's buffer empty, the same bytes can go to the
    socket at once; what it does not take goes through ``IOStream.write`` as before.
    Only a plain TCP ``IOStream`` (not TLS) whose byte counters are where this module
    keeps them up to date (``stalls.bytes_sent`` reads them) qualifies.
    """
    if type(stream) is not IOStream or getattr(stream, "socket", None) is None:
        return None
    if not all(isinstance(getattr(stream, name, None), int) for name in ("_total_write_index", "_total_write_done_index")):
        return None
    return stream.socket.send


@types.coroutine
def _resume(step: Any, yielded: Any) -> Any:
    """Finish awaiting ``step`` whose first ``send(None)`` already yielded ``yielded``.

    This is ``yield from`` picking up half-way: futures go to the running task, results
    and exceptions (cancellation included) go back into ``step``.
    """
    while True:
        try:
            value = yield yielded
        except BaseException as exc:  # thrown in by the task, e.g. CancelledError
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = step.send(value)
        except StopIteration as stop:
            return stop.value


class EventStreamWriter:
    """Writes an async iterator of chunk dicts to a Tornado handler as SSE.

    ``handler`` needs ``write(bytes)`` and ``flush() -> Future``. ``on_closed`` runs once
    when a flush finds the client gone, so the caller can cancel the generation.
    ``encode`` turns a chunk into event bytes; ``done`` ends the stream (b"" for none).
    ``stall_seconds`` (> 0): a client whose socket takes none of a pending write for that long
    is disconnected (``stalls.StallWatch``; ``on_closed`` runs).
    """

    def __init__(
        self,
        handler: Any,
        keepalive_seconds: float,
        on_closed: Callable[[], None],
        encode: Callable[[Any], bytes] = sse_event,
        done: bytes = DONE,
        stall_seconds: float = 0.0,
    ):
        self.handler = handler
        self.encode = encode
        self.done = done
        self.keepalive = keepalive_seconds
        self.on_closed = on_closed
        self.closed = False
        self._inflight: asyncio.Future | None = None
        self._dirty = False
        self._last = time.monotonic()
        self._direct: Any = None  # the IOStream once direct_stream() allows it (after the headers)
        self._send: Callable[[bytes], int] | None = None  # its socket's send, when socket_sender() allows it
        self._direct_checked = False
        self._timer: asyncio.TimerHandle | None = None
        if keepalive_seconds > 0:
            self._timer = asyncio.get_running_loop().call_later(keepalive_seconds, self._tick)
        self._stall = StallWatch(handler, stall_seconds, self._write_pending, self._mark_closed)

    # ------------------------------------------------------------------ flushing
    def push(self) -> None:
        """Send what is buffered: start a flush now, or right after the one in flight."""
        if self.closed:
            return
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            self._dirty = True  # _flushed starts the next flush when this one lands
            return
        self._dirty = False
        self._last = time.monotonic()
        if self._direct is not None:
            self._write_direct()
            return
        fut = self.handler.flush()
        self._inflight = fut
        fut.add_done_callback(self._flushed)
        if not self._direct_checked:  # the first flush sent the headers: decided once
            self._direct_checked = True
            self._direct = direct_stream(self.handler)
            if self._direct is not None:
                self._send = socket_sender(self._direct)

    def _write_direct(self) -> None:
        """What ``flush`` would send, as one HTTP chunk straight to the stream."""
        buf = self.handler._write_buffer
        if not buf:
            return
        data = b"".join(buf)
        buf.clear()
        stream = self._direct
        if stream.closed():
            self._mark_closed()
            return
        chunk = b"%x\r\n%s\r\n" % (len(data), data)
        send = self._send
        if send is not None and not stream.writing():  # nothing queued before it: the socket first
            try:
                sent = send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:  # the client is gone: IOStream.write below meets the error again and closes
                sent = 0
            # counted as IOStream counts what it sends (stalls.bytes_sent reads them; write futures compare them)
            stream._total_write_index += sent
            stream._total_write_done_index += sent
            if sent == len(chunk):
                return
            chunk = chunk[sent:]
        fut = stream.write(chunk)
        if stream.writing():  # the socket took only part: wait for the rest before the next write
            self._inflight = fut
            fut.add_done_callback(self._flushed)

    def _flushed(self, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self._mark_closed()
        elif self._dirty:
            self.push()

    def _write_pending(self) -> bool:
        inflight = self._inflight
        return inflight is not None and not inflight.done()

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_closed()

    async def drain(self) -> None:
        """Wait until everything written so far has reached the socket."""
        while not self.closed:
            fut = self._inflight
            if fut is not None and not fut.done():
                try:
                    await fut
                except StreamClosedError:
                    self._mark_closed()
                    return
                continue
            if not self._dirty:
                return
            self.push()

    def _tick(self) -> None:
        # Runs on the loop; while the writer waits for tokens nothing else writes, so a
        # comment line cannot land inside an event.
        if self.closed:
            return
        idle = time.monotonic() - self._last
        if idle >= self.keepalive and (self._inflight is None or self._inflight.done()):
            self.handler.write(KEEPALIVE)
            self.push()
            idle = 0.0
        self._timer = asyncio.get_running_loop().call_later(max(self.keepalive - idle, 0.05), self._tick)

    def close(self) -> None:
        """Stop the keepalive and stall timers."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stall.stop()

    # ------------------------------------------------------------------- writing
    async def write_all(self, stream: AsyncIterator[Any]) -> bool:
        """Write every chunk then the end marker (``[DONE]`` for chat); False when the client left first.

        Each next chunk is polled without suspending: when it is already there it is
        buffered with the previous ones, and only when we would have to wait does the
        buffer go out. Exceptions from ``stream`` propagate to the caller.
        """
        write = self.handler.write
        encode = self.encode
        it = stream.__aiter__()
        while not self.closed:
            step = it.__anext__()
            try:
                yielded = step.send(None)
            except StopIteration as ready:
                write(encode(ready.value))
                continue
            except StopAsyncIteration:
                break
            self.push()  # the next chunk is not ready: send what we have while we wait
            try:
                chunk = await _resume(step, yielded)
            except StopAsyncIteration:
                break
            write(encode(chunk))
        if self.closed:
            return False
        if self.done:
            write(self.done)
        await self.drain()
        return not self.closed

    async def write_error(self, body: dict[str, Any]) -> None:
        """An error after the stream started: one ``data: {"error": ...}`` event."""
        if self.closed:
            return
        self.handler.write(sse_event(body))
        await self.drain()
