"""Worker-thread pools of their own, off asyncio's shared one, for work that can block for long.

asyncio's default pool has ``cpu_count + 4`` threads (6 on 2 CPUs) and the whole server shares it for
short work: resolving a model's name, tokenizing a prompt, checking a constraint. A load sits on its
thread for as long as it reads weights, waits for another load's turn (``backends/load_lock.py``) or
compiles, and a pull for as long as it downloads and converts. Six of those at once, on that pool,
held every thread, and a chat with a model already loaded waited for them: the whole server stalled.
They run on ``run_slow``'s pool instead (threads are made as work comes, and idle ones reused); huge
prompts have a ``ThreadLane`` of their own too (engine/prompt_lane.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: the most slow calls at once; more queue among themselves (each waits on a load, a file or another thread)
SLOW_WORKERS = 64


class ThreadLane:
    """A thread pool made on first use: ``run`` awaits a call on it as ``asyncio.to_thread`` does on the default."""

    def __init__(self, workers: int, name: str):
        self.workers, self.name = workers, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        """The lane's pool (made now if it has none)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            return self._pool

    async def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``work(*args, **kwargs)`` on one of the lane's threads, in a copy of this context (as to_thread runs it)."""
        call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor(), call)

    def submit(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """``work(*args, **kwargs)`` started on one of the lane's threads, in a copy of this context: its
        ``concurrent.futures`` future, whose callbacks run when the work ends whether or not a loop still runs."""
        return self.executor().submit(contextvars.copy_context().run, work, *args, **kwargs)

    def close(self) -> None:
        """Let the lane's threads end once their work is done (a later call makes a new pool)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


_slow = ThreadLane(SLOW_WORKERS, "xllm-slow")


def slow_executor() -> ThreadPoolExecutor:
    """The process's pool for slow work (made on first use)."""
    return _slow.executor()


async def run_slow(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` on a slow-work thread, as ``asyncio.to_thread`` runs it on the default pool."""
    return await _slow.run(work, *args, **kwargs)


def submit_slow(work: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """``work(*args, **kwargs)`` started on a slow-work thread; its ``concurrent.futures`` future (see ``ThreadLane.submit``)."""
    return _slow.submit(work, *args, **kwargs)
