"""Handing a paced delivery to an event loop without giving the step thread's GIL away.

``loop.call_soon_threadsafe`` wakes the loop by sending a byte on its self-pipe, and
``socket.send`` releases the GIL. The woken IOLoop takes it at once and keeps it while it
encodes and writes the delivery, and the step thread, which needs the GIL for its next
kernel launches, waits all that time: py-spy put 4.5% of the step thread's wall time at
1 stream there (benchmarks/results/ttft_stand_in.md). ``call_soon_keeping_gil`` queues the
callback the same way and writes the wake-up byte with the GIL held, so the step thread
goes on launching and the IOLoop runs while the step waits on the device, which releases
the GIL anyway. Only paced deliveries go this way: a request's first delta, its end and its
errors still wake the loop at once (time to first token).

It needs what ``call_soon_threadsafe`` itself uses of a selector event loop (``_call_soon``
and the self-pipe ``_csock``) and a C ``write`` callable through ``ctypes.PyDLL``; anything
else (another loop class, Windows) falls back to ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import ctypes
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
