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
