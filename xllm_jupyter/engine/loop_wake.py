"""Handing the step thread's deliveries to an event loop: few wake-ups, and the GIL kept where it helps.

``loop.call_soon_threadsafe`` wakes the loop by sending a byte on its self-pipe, and
``socket.send`` releases the GIL. The woken IOLoop takes it at once and keeps it while it
encodes and writes the delivery, and the step thread, which needs the GIL for its next
kernel launches, waits all that time: py-spy put 4.5% of the step thread's wall time at
1 stream there (benchmarks/results/ttft_stand_in.md). ``call_soon_keeping_gil`` queues the
callback the same way and writes the wake-up byte with the GIL held, so the step thread
goes on launching and the IOLoop runs while the step waits on the device, which releases
the GIL anyway. Only paced deliveries go this way: a request's first delta, its end and its
errors still wake the loop at once (time to first token).

``LoopWaker`` (``waker_for``) does the same through a pipe of its own, which the runner uses
for every delivery to a loop: the loop reads its self-pipe until it is empty (two ``recv``
calls per wake-up, each releasing the GIL, each a hand-off the launching step thread pays
for), where the waker's one read keeps the GIL; and while a wake-up is pending no second
byte is written at all. When the loop had nothing else queued, the readers a delivery wakes
(their task steps) run in the same turn (``_run_woken``), not after one more selector poll,
which releases the GIL too.

It needs what ``call_soon_threadsafe`` itself uses of a selector event loop (``_call_soon``
and the self-pipe ``_csock``; ``add_reader``) and C ``write``/``read`` callable through
``ctypes.PyDLL``; anything else (another loop class, Windows) falls back to
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import threading
import weakref
from asyncio.selector_events import BaseSelectorEventLoop
from collections.abc import Callable
from typing import Any


def _gil_keeping_write() -> Callable[[int, bytes, int], int] | None:
    """libc's ``write`` called with the GIL held (``PyDLL``); None where there is none."""
    try:
        write = ctypes.PyDLL(None).write
    except (OSError, TypeError, AttributeError):  # no process-wide symbol table (Windows) or no write
        return None
    write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t
    return write


_write = _gil_keeping_write()


def _gil_keeping_read() -> Callable[[int, Any, int], int] | None:
    """libc's ``read`` called with the GIL held (``PyDLL``); None where there is none."""
    try:
        read = ctypes.PyDLL(None).read
    except (OSError, TypeError, AttributeError):
        return None
    read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    read.restype = ctypes.c_ssize_t
    return read


_read = _gil_keeping_read()


def call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """``loop.call_soon_threadsafe(callback, *args)``, as a function (the runner picks one of the two)."""
    loop.call_soon_threadsafe(callback, *args)


def call_soon_keeping_gil(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """``loop.call_soon_threadsafe(callback, *args)``, the wake-up written without releasing the GIL.

    RuntimeError when the loop is closed, as ``call_soon_threadsafe`` raises.
    """
    csock = getattr(loop, "_csock", None)
    if _write is None or csock is None or not isinstance(loop, BaseSelectorEventLoop) or loop.get_debug():
        loop.call_soon_threadsafe(callback, *args)
        return
    if loop.is_closed():
        raise RuntimeError("Event loop is closed")
    loop._call_soon(callback, args, None)  # what call_soon_threadsafe queues (a deque append: thread-safe)
    # the GIL is held from the check above to here, so the loop cannot close its self-pipe in between; a full
    # pipe (-1, EAGAIN: the socket is non-blocking) means a wake-up is pending already, as call_soon_threadsafe
    # ignores it too
    _write(csock.fileno(), b"\0", 1)


class ThreadsafeWaker:
    """Posts callbacks with ``call_soon_threadsafe`` (``keep_gil``: ``call_soon_keeping_gil``), for loops
    ``LoopWaker`` cannot serve."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # (weak, as LoopWaker's)

    def post(self, callback: Callable[..., Any], args: tuple, keep_gil: bool = False) -> None:
        """Run ``callback(*args)`` on the loop soon; RuntimeError when the loop is closed."""
        loop = self._loop()
        if loop is None:
            raise RuntimeError("Event loop is closed")
        (call_soon_keeping_gil if keep_gil else call_soon_threadsafe)(loop, callback, *args)


class LoopWaker:
    """Runs callbacks posted from other threads on one selector event loop, in order, woken through its own pipe.

    Made on the loop's thread (``add_reader``). ``post`` may be called from any thread; the
    callbacks run on the loop in the order they were posted.
    """

    _BUF_SIZE = 4096

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # (weak: the loop is a key of _wakers, whose values must not keep it alive)
        self._queue: collections.deque = collections.deque()
        self._armed = False  # a wake-up byte is in the pipe (or about to be) and the loop has not run since
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._buf = ctypes.create_string_buffer(self._BUF_SIZE)
        # with the loop (its selector holds us until then); not at exit, where a daemon step thread may still post
        # and a number closed under it could be reused by a file that its wake-up byte would land in
        self._finalizer = weakref.finalize(self, _close_pipe, self._r, self._w)
        self._finalizer.atexit = False
        loop.add_reader(self._r, self._run)

    def post(self, callback: Callable[..., Any], args: tuple, keep_gil: bool = False) -> None:
        """Run ``callback(*args)`` on the loop soon (``keep_gil``: wake it without releasing the GIL).

        RuntimeError when the loop is closed, as ``call_soon_threadsafe`` raises.
        """
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("Event loop is closed")
        self._queue.append((callback, args))  # before the check: the loop clears _armed before it empties the queue
        if self._armed:
            return  # the loop has yet to run for the byte already written: it takes this one too
        self._armed = True
        if keep_gil and _write is not None:
            _write(self._w, b"\0", 1)  # -1 (a full pipe) means wake-ups are pending anyway
            return
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass
        except OSError:  # the pipe is gone: the loop was closed meanwhile
            raise RuntimeError("Event loop is closed") from None

    def _run(self) -> None:
        # Runs on the loop. The pipe is read before the flag is cleared: cleared first, a post landing between the
        # two (flag down: it raises it and writes a byte) would have its byte taken by this read while its flag
        # stayed up, and every later post would count on a wake-up that never comes. Posts before the clearing
        # write nothing and are in the queue taken below; posts after it write a byte of their own.
        if _read is not None:
            _read(self._r, self._buf, self._BUF_SIZE)  # (-1: EAGAIN, a byte some earlier run already took)
        else:
            try:
                os.read(self._r, self._BUF_SIZE)
            except BlockingIOError:
                pass
        self._armed = False
        loop = self._loop()
        ready = getattr(loop, "_ready", None)
        # nothing else waits to run, now or next turn; and not in debug mode (set after the waker was made), where
        # the loop times each handle it runs: run here, a slow reader's time would be charged to this one
        idle = type(ready) is collections.deque and not ready and not loop.get_debug()
        queue = self._queue
        for _ in range(len(queue)):  # what is there now; later posts have written their own byte
            callback, args = queue.popleft()
            try:
                callback(*args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                if loop is not None:
                    loop.call_exception_handler({"message": "Exception in a callback posted to the loop",
                                                      "exception": exc})
        if idle:
            _run_woken(loop, ready)


def _run_woken(loop: Any, ready: collections.deque) -> None:
    """Run now the handles the deliveries just queued (the woken readers' task steps), in their order.

    The loop would run them in its next turn, after polling its selector once more (a system
    call that releases the GIL: one more hand-off per token with a step thread that wants
    it). Only when they are all the loop has queued (``ready`` was empty before the
    deliveries), so no earlier callback is overtaken; handles these queue wait for the next turn,
    and all wait once the loop is stopping (they run when it runs again, as they would have).
    """
    for _ in range(len(ready)):
        if loop._stopping:
            return
        handle = ready.popleft()
        if not handle._cancelled:
            handle._run()


def _close_pipe(r: int, w: int) -> None:
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


# Values are weak too: a waker's queue can hold deliveries whose handles hold the loop (posted as it closed), and
# a strong value would keep its own key, the loop and the pipe alive for good. An open loop's selector holds its
# LoopWaker (add_reader), so it stays one per loop while the loop is open.
_wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.ref[LoopWaker | ThreadsafeWaker]]" = (
    weakref.WeakKeyDictionary()
)
_wakers_lock = threading.Lock()


def waker_for(loop: asyncio.AbstractEventLoop) -> LoopWaker | ThreadsafeWaker:
    """The waker for ``loop`` (one per loop; call it on that loop's thread, where a ``LoopWaker`` is made)."""
    with _wakers_lock:
        ref = _wakers.get(loop)
        waker = ref() if ref is not None else None
        if waker is None:
            waker = _new_waker(loop)
            _wakers[loop] = weakref.ref(waker)
    return waker


def _new_waker(loop: asyncio.AbstractEventLoop) -> LoopWaker | ThreadsafeWaker:
    """A ``LoopWaker`` for a running selector loop of this thread, else (or when it cannot be made) a ``ThreadsafeWaker``."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not loop or not isinstance(loop, BaseSelectorEventLoop) or loop.get_debug() or loop.is_closed():
        return ThreadsafeWaker(loop)
    if os.name != "posix":  # Windows' select() takes sockets only, not a pipe
        return ThreadsafeWaker(loop)
    try:
        return LoopWaker(loop)
    except (OSError, NotImplementedError, ValueError):  # out of file descriptors, a selector without add_reader
        return ThreadsafeWaker(loop)
