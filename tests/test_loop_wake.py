"""engine/loop_wake.py: a paced delivery reaches an idle event loop from the step thread, as call_soon_threadsafe's would."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from xllm_jupyter.engine import loop_wake
from xllm_jupyter.engine.loop_wake import call_soon_keeping_gil


def test_the_gil_keeping_write_is_there_on_this_platform():
    # (the fallback would pass every other test here while never taking the fast path)
    assert loop_wake._write is not None


async def test_a_callback_from_another_thread_wakes_the_idle_loop_with_its_arguments():
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, int, bool]] = []
    woken: list[bool] = []  # per call: did the callback run while the calling thread waited (a generous 20 s)?

    def on_loop(word: str, number: int, ran: threading.Event) -> None:
        seen.append((word, number, threading.current_thread() is threading.main_thread()))
        ran.set()

    def later(i: int, ran: threading.Event) -> None:
        time.sleep(0.05)  # the loop is asleep in select by then with nothing else to do: only the byte on
        call_soon_keeping_gil(loop, on_loop, "token", i, ran)  # its self-pipe can wake it
        woken.append(ran.wait(20))

    for i in range(5):
        ran = threading.Event()
        thread = threading.Thread(target=later, args=(i, ran))
        thread.start()
        # (a wake-up that never comes: this loop sleeps until the thread has given up, then its join returns)
        await loop.run_in_executor(None, thread.join)
        assert woken[-1], "the loop did not wake up for the callback"
    assert seen == [("token", i, True) for i in range(5)]


def test_a_closed_loop_refuses_as_call_soon_threadsafe_does():
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError):
        call_soon_keeping_gil(loop, print)
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(print)


def test_a_loop_without_a_self_pipe_gets_call_soon_threadsafe():
    class OtherLoop:  # e.g. a proactor loop, uvloop: not a selector loop
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def call_soon_threadsafe(self, callback, *args):
            self.calls.append((callback, args))

    other = OtherLoop()
    call_soon_keeping_gil(other, print, 1, 2)  # type: ignore[arg-type]
    assert other.calls == [(print, (1, 2))]


def test_a_loop_in_debug_mode_gets_call_soon_threadsafe(monkeypatch):
    loop = asyncio.new_event_loop()
    try:
        loop.set_debug(True)
        calls = []
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda cb, *args: calls.append((cb, args)))
        call_soon_keeping_gil(loop, print, "x")
        assert calls == [(print, ("x",))]
    finally:
        loop.close()


async def test_the_waker_runs_posts_from_another_thread_in_order_whichever_way_they_woke_the_loop():
    """A loop's waker is its one channel from the step thread: paced (GIL-keeping) and urgent posts run in the
    order they were posted, on the loop's thread, those posted while a wake-up was pending included."""
    from xllm_jupyter.engine.loop_wake import LoopWaker, waker_for

    loop = asyncio.get_running_loop()
    waker = waker_for(loop)
    assert isinstance(waker, LoopWaker) and waker_for(loop) is waker  # one per loop
    seen: list[tuple[int, bool]] = []
    done = threading.Event()

    def on_loop(i: int) -> None:
        seen.append((i, threading.current_thread() is threading.main_thread()))
        if i == 299:
            done.set()

    def post_all() -> None:
        for i in range(300):
            waker.post(on_loop, (i,), i % 3 != 0)
            if i % 50 == 0:
                time.sleep(0.01)  # the loop goes idle in between: later posts must wake it again

    thread = threading.Thread(target=post_all)
    thread.start()
    await loop.run_in_executor(None, thread.join)
    assert await loop.run_in_executor(None, done.wait, 20), "the loop did not run every post"
    assert seen == [(i, True) for i in range(300)]


def test_the_waker_of_a_closed_loop_refuses_and_its_pipe_is_closed_with_the_loop():
    import gc
    import os

    from xllm_jupyter.engine.loop_wake import LoopWaker, waker_for

    loop = asyncio.new_event_loop()

    async def make() -> LoopWaker:
        return waker_for(asyncio.get_running_loop())  # type: ignore[return-value]

    waker = loop.run_until_complete(make())
    fds = {fd: os.fstat(fd).st_ino for fd in (waker._r, waker._w)}  # noqa: SLF001
    loop.close()
    with pytest.raises(RuntimeError):
        waker.post(print, ())
    del waker, loop, make
    gc.collect()
    for fd, inode in fds.items():  # closed (or the number reused by something else since)
        try:
            assert os.fstat(fd).st_ino != inode
        except OSError:
            pass


def test_a_waker_asked_for_off_the_loop_thread_uses_call_soon_threadsafe():
    from xllm_jupyter.engine.loop_wake import ThreadsafeWaker, waker_for

    loop = asyncio.new_event_loop()
    try:
        waker = waker_for(loop)  # not running here: add_reader would be unsafe, so no pipe of its own
        assert isinstance(waker, ThreadsafeWaker)
        ran = []
        waker.post(ran.append, ("x",))
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert ran == ["x"]
    finally:
        loop.close()
