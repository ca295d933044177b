"""A pool of worker threads of its own for work that can block for minutes: loads, warm-ups, unloads, pulls.

asyncio's default pool has ``cpu_count + 4`` threads (6 on 2 CPUs) and the whole server shares it for
short work: resolving a model's name, tokenizing a prompt, checking a constraint. A load sits on its
thread for as long as it reads weights, waits for another load's turn (``backends/load_lock.py``) or
compiles, and a pull for as long as it downloads and converts. Six of those at once, on that pool,
held every thread, and a chat with a model already loaded waited for them: the whole server stalled.
They run here instead, each on a thread of its own (threads are made as work comes, and idle ones reused).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: the most slow calls at once; more queue among themselves (each waits on a load, a file or another thread)
SLOW_WORKERS = 64

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def slow_executor() -> ThreadPoolExecutor:
    """The process's pool for slow work (made on first use)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SLOW_WORKERS, thread_name_prefix="xllm-slow")
        return _pool


async def run_slow(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` on a slow-work thread, as ``asyncio.to_thread`` runs it on the default pool."""
    call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)  # (to_thread's context copy)
    return await asyncio.get_running_loop().run_in_executor(slow_executor(), call)
