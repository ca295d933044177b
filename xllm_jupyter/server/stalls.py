"""Disconnect clients that stop reading their response.

Generation never waits for a reader (one slow client must not hold up the batch), so the
bytes of a client that reads nothing pile up in server memory: a stream's events in the
handler, a finished answer in the connection's buffer. With the socket left open the
request would never end either, keeping its concurrency slots and quota. ``StallWatch``
closes such a connection once its socket has taken no byte of a pending write for
``server.connection_timeout_seconds``; a slow reader that keeps taking bytes is never cut.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Any, Callable

try:  # POSIX: bytes still in a socket's send queue
    import fcntl
    import termios

    _OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
except ImportError:  # Windows
    _OUTQ = None

log = logging.getLogger("xllm_jupyter.server")


def bytes_sent(handler: Any) -> int | None:
    """How many response bytes have left this server for the client so far, or None when unknown.

    Tornado's IOStream counts what the socket took; less what still sits in the kernel's send
    queue (``TIOCOUTQ``, where the platform has it) that is what the client's TCP accepted, so
    a client that reads slowly shows progress even while its socket's buffer stays full.
    """
    stream = getattr(getattr(getattr(handler, "request", None), "connection", None), "stream", None)
    taken = getattr(stream, "_total_write_done_index", None)
    if not isinstance(taken, int):
        return None
    sock = getattr(stream, "socket", None)
    if _OUTQ is None or sock is None:
        return taken
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed meanwhile, or not a TCP socket
        return taken
    return taken - queued


class StallWatch:
    """Closes ``handler``'s connection when ``pending()`` stays true with no byte sent for ``seconds``.

    Checks every ``seconds / 2`` (one timer per response, nothing per write); ``on_stall`` runs after
    the close. ``stop()`` ends the watch; it also ends by itself once the connection is closed.
    """

    def __init__(self, handler: Any, seconds: float, pending: Callable[[], bool], on_stall: Callable[[], None] | None = None):
        self.handler = handler
        self.seconds = seconds
        self._pending = pending
        self._on_stall = on_stall
        self._since = time.monotonic()
        self._seen = bytes_sent(handler)
        self._timer: asyncio.TimerHandle | None = None
        self.stalled = False
        # without a count of the bytes sent (Tornado's stream no longer has it) a slow reader that keeps
        # reading would look stalled: watch nothing rather than cut readers who are still reading
        if seconds > 0 and self._seen is not None:
            self._arm()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.seconds / 2, self._check)

    def _check(self) -> None:
        self._timer = None
        now, sent = time.monotonic(), bytes_sent(self.handler)
        if not self._pending() or sent != self._seen:
            self._since, self._seen = now, sent  # nothing owed, or the client took some: not stalled
        elif now - self._since >= self.seconds:
            self._drop()
            return
        self._arm()

    def _drop(self) -> None:
        self.stalled = True
        log.info("closing a connection whose client read nothing for %.0f s", self.seconds)
        conn = getattr(getattr(self.handler, "request", None), "connection", None)
        if conn is not None:
            conn.close()  # frees the unsent bytes; the handler's close callback (cancel, release) runs too
        if self._on_stall is not None:
            self._on_stall()

    def stop(self) -> None:
        """End the watch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def watch_finish(handler: Any, done: "asyncio.Future[Any] | None", seconds: float) -> None:
    """Close ``handler``'s connection if the answer ``done`` tracks (``finish()``'s future) stalls unsent."""
    if seconds <= 0 or done is None or done.done():
        return
    watch = StallWatch(handler, seconds, lambda: not done.done())
    done.add_done_callback(lambda _: watch.stop())
