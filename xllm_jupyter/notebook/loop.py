"""An asyncio loop on a daemon thread, so sync code (and widgets) can drive async streams.

Inside Jupyter the kernel's own loop already runs on the main thread, so neither
``asyncio.run`` nor ``run_until_complete`` work there; a private loop on its own thread
works everywhere, keeps the kernel responsive, and lets a stop button cancel a stream
from the main thread (cancelling the task closes its HTTP stream, which cancels the
generation on the server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """One event loop running on a daemon thread until ``close()``."""

    def __init__(self, name: str = "xllm-notebook"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""
        return self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; ``cancel()`` on the returned future cancels the task."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what still runs, stop the loop and join its thread."""
        if self.loop.is_closed():
            return
        if self.loop.is_running():

            async def cancel_all() -> None:
                # as asyncio.run does: cancel the tasks, then close the async generators
                # still open (httpx's line iterators, left suspended after [DONE]): collected
                # after the loop closed, one would schedule its aclose on a dead loop
                # ("Task was destroyed but it is pending!" under a notebook cell)
                def others() -> list[asyncio.Task]:
                    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

                tasks = others()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.loop.shutdown_asyncgens()
                await asyncio.sleep(0)  # one collected meanwhile queued its aclose: let that become a task
                await asyncio.gather(*others(), return_exceptions=True)

            try:
                self.submit(cancel_all()).result(timeout)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError):
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, inside Jupyter or not.

    Ctrl-C (a kernel interrupt) cancels the coroutine, which closes its HTTP streams.
    """
    bg = BackgroundLoop()
    try:
        future = bg.submit(coro)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise
    finally:
        bg.close()
