"""A load whose wait is cancelled (``Engine.stop`` at a server's exit) still unloads its thread's model once the
load ends, even when the event loop has closed by then.

``engine.loading._load_on_a_thread`` cannot stop the thread, so a cancelled wait hands the model to an unload
when it arrives. That was a callback on an asyncio task: a Jupyter server (or a test) closing its loop right after
``stop()`` never ran it, the model stayed loaded, and the task was destroyed pending ("Task was destroyed but it
is pending! ... run_slow() ... _unload_when_loaded", seen after tests/test_extension.py).
"""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from xllm_jupyter.engine import loading

#: a fail-safe for a wait that never ends, not a timing assertion
NEVER = 30


class _Model:
    def __init__(self, unloaded: threading.Event):
        self.unloaded = unloaded

    def prepare_constraints(self) -> None:
        """Nothing to prepare."""

    def unload(self) -> None:
        self.unloaded.set()


class _HeldBackend:
    """Loads a model once ``release`` is set."""

    name = "held-for-test_load_cancel_at_exit"

    def __init__(self) -> None:
        self.started, self.release, self.unloaded = threading.Event(), threading.Event(), threading.Event()

    def load(self, spec: object) -> _Model:
        self.started.set()
        self.release.wait(NEVER)
        return _Model(self.unloaded)


def test_a_cancelled_load_is_unloaded_when_it_ends_after_the_loop_closed(caplog):
    backend = _HeldBackend()

    async def cancel_the_wait() -> None:
        wait = asyncio.ensure_future(loading._load_on_a_thread(backend, None))  # type: ignore[arg-type]
        assert await asyncio.to_thread(backend.started.wait, NEVER)
        wait.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wait

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(cancel_the_wait())
    finally:
        loop.close()  # before the load ends, as a server's exit right after Engine.stop()
    backend.release.set()
    assert backend.unloaded.wait(NEVER), "the cancelled load's model was never unloaded"
    gc.collect()
    assert "Task was destroyed but it is pending" not in caplog.text
