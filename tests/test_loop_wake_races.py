"""engine/loop_wake.py LoopWaker under the races a real step thread meets: a post landing while the loop
runs the waker, a loop closed with posts still queued, many loops made and dropped (no timed assertions)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import weakref

from xllm_jupyter.engine import loop_wake
from xllm_jupyter.engine.loop_wake import LoopWaker, waker_for


async def _ran(event: threading.Event) -> bool:
    # waits on a worker thread, so that the loop stays free to run what was posted (a generous 20 s: a hang guard)
    return await asyncio.get_running_loop().run_in_executor(None, event.wait, 20)


def _post_from_a_thread(waker: LoopWaker, callback, args: tuple, keep_gil: bool = False) -> None:
    thread = threading.Thread(target=waker.post, args=(callback, args, keep_gil))
    thread.start()
    thread.join()


async def test_a_post_that_lands_while_the_loop_reads_the_pipe_does_not_strand_the_next_one(monkeypatch):
    """The step thread can post (and write its wake-up byte) after the loop's run of the waker began and before
    it read the pipe: that read takes the byte, the run takes the post; the next post must still wake the loop."""
    loop = asyncio.get_running_loop()
    waker = waker_for(loop)
    assert isinstance(waker, LoopWaker)
    seen: list[str] = []
    second_ran, third_ran = threading.Event(), threading.Event()
    real_read = loop_wake._read if loop_wake._read is not None else None
    raced: list[bool] = []

    def read_after_a_post(fd, buf, size):
        if not raced:  # once: the first run of the waker, at the worst moment
            raced.append(True)
            _post_from_a_thread(waker, lambda: (seen.append("second"), second_ran.set()), (), True)
        if real_read is not None:
            return real_read(fd, buf, size)
        try:
            return len(os.read(fd, size))
        except BlockingIOError:
            return -1

    monkeypatch.setattr(loop_wake, "_read", read_after_a_post)
    _post_from_a_thread(waker, seen.append, ("first",), True)
    assert await _ran(second_ran), "the racing post never ran"
    _post_from_a_thread(waker, lambda: (seen.append("third"), third_ran.set()), (), True)
    assert await _ran(third_ran), "a post after the race never woke the loop (a lost wake-up)"
    assert seen == ["first", "second", "third"]


async def test_posts_from_two_threads_at_once_all_run_in_each_threads_order():
    """Two posting threads (the step thread and a failure path) against a busy loop: nothing lost, each in order."""
    loop = asyncio.get_running_loop()
    waker = waker_for(loop)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    count = 3000
    done = {name: threading.Event() for name in seen}

    def on_loop(name: str, i: int) -> None:
        seen[name].append(i)
        if i == count - 1:
            done[name].set()

    def post_all(name: str) -> None:
        for i in range(count):
            waker.post(on_loop, (name, i), i % 2 == 0)

    threads = [threading.Thread(target=post_all, args=(name,)) for name in seen]
    for thread in threads:
        thread.start()
    for _ in range(200):  # keep the loop busy with turns of its own meanwhile
        await asyncio.sleep(0)
    for thread in threads:
        await loop.run_in_executor(None, thread.join)
    for name in seen:
        assert await _ran(done[name]), f"thread {name}'s posts did not all run"
        assert seen[name] == list(range(count))


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def test_a_loop_closed_with_posts_still_queued_is_freed_and_its_pipe_closed():
    """A delivery holds its request's handle, which holds the loop: queued when the loop closed (a kernel's
    asyncio.run ending, a test's loop), it must not keep the loop and the pipe alive for the process's life."""
    loop = asyncio.new_event_loop()

    async def make() -> LoopWaker:
        return waker_for(asyncio.get_running_loop())  # type: ignore[return-value]

    waker = loop.run_until_complete(make())
    assert isinstance(waker, LoopWaker)
    pipe = {fd: _inode(fd) for fd in (waker._r, waker._w)}
    waker.post(print, (loop,))  # never run: the loop closes first
    loop.close()
    freed = weakref.ref(loop)
    del loop, waker, make
    gc.collect()
    assert freed() is None, "the closed loop is still alive"
    for fd, inode in pipe.items():
        assert _inode(fd) != inode, "the waker's pipe is still open"


def test_many_loops_made_and_dropped_leave_no_pipes_open():
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def use_one() -> None:
        waker = waker_for(asyncio.get_running_loop())
        ran = asyncio.get_running_loop().create_future()
        threading.Thread(target=waker.post, args=(ran.set_result, (asyncio.get_running_loop(),))).start()
        await ran

    asyncio.run(use_one())  # (the first run may open what stays open anyway: executors, the selector module)
    gc.collect()
    before = open_fds()
    for _ in range(200):
        asyncio.run(use_one())
    gc.collect()
    assert open_fds() - before < 10


def test_the_pipe_is_not_closed_at_exit_under_a_step_thread_still_posting():
    """At interpreter exit the (daemon) step thread may still post: closing the pipe then could let its number be
    reused by a file that the wake-up byte would land in. The OS closes it with the process instead."""
    loop = asyncio.new_event_loop()
    try:
        async def make() -> LoopWaker:
            return waker_for(asyncio.get_running_loop())  # type: ignore[return-value]

        waker = loop.run_until_complete(make())
        assert waker._finalizer.atexit is False
    finally:
        loop.close()
