"""engine/loop_wake.py: a delivery that wakes a waiting reader runs the reader in the same loop turn (no
second selector poll, which releases the GIL: one more hand-off per token with the step thread), and never
ahead of callbacks the loop had already queued."""

from __future__ import annotations

import asyncio
import threading


def _counting_loop() -> tuple[asyncio.AbstractEventLoop, list[int]]:
    """A new selector loop whose selector polls are counted."""
    loop = asyncio.new_event_loop()
    polls = [0]
    selector = loop._selector  # noqa: SLF001 - what the loop polls each turn
    real = selector.select

    def counting(timeout=None):
        polls[0] += 1
        return real(timeout)

    selector.select = counting
    return loop, polls


def test_a_reader_woken_by_a_delivery_runs_before_the_loop_polls_again():
    from xllm_jupyter.engine.loop_wake import LoopWaker, waker_for

    loop, polls = _counting_loop()

    async def main() -> list[tuple[int, int]]:
        waker = waker_for(loop)
        assert isinstance(waker, LoopWaker)
        seen = []
        for _ in range(20):
            fut = loop.create_future()
            at_delivery: list[int] = []

            def deliver(fut=fut, at_delivery=at_delivery) -> None:
                at_delivery.append(polls[0])
                fut.set_result(None)

            thread = threading.Thread(target=waker.post, args=(deliver, (), True))
            thread.start()
            await fut
            seen.append((at_delivery[0], polls[0]))
            thread.join()
        return seen

    try:
        seen = loop.run_until_complete(main())
    finally:
        loop.close()
    assert all(resumed == delivered for delivered, resumed in seen), seen


def test_a_woken_reader_never_overtakes_callbacks_queued_before_the_delivery():
    """Callbacks the loop queued before the delivery (for this turn or the next) run first, as the loop's own
    order has them."""
    from xllm_jupyter.engine.loop_wake import waker_for

    loop, _ = _counting_loop()
    order: list[str] = []

    async def main() -> None:
        waker = waker_for(loop)
        fut = loop.create_future()
        posted = threading.Event()

        def deliver() -> None:
            order.append("delivery")
            fut.set_result(None)

        def post() -> None:
            waker.post(deliver, (), True)
            posted.set()

        def both_at_once() -> None:  # runs on the loop: the delivery's wake-up is pending when this returns
            thread = threading.Thread(target=post)
            thread.start()
            thread.join()
            # next turn runs this before the delivery (queued before the poll that sees the wake-up); what it
            # queues is for the turn after, and must run before the reader the delivery wakes
            loop.call_soon(loop.call_soon, order.append, "queued earlier")
            # and this one is due in that same turn, queued behind the delivery: the loop runs it, not the waker
            loop.call_later(0, order.append, "timer")

        loop.call_soon(both_at_once)
        await fut
        order.append("reader")
        assert posted.is_set()
        await asyncio.sleep(0.05)  # (queues nothing at once: a turn that ran more handles than it counted would fail)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert order == ["delivery", "timer", "queued earlier", "reader"], order


def test_a_reader_woken_as_the_loop_stops_runs_when_the_loop_runs_again():
    """A delivery that stops the loop (or lands as it stops) leaves the readers it woke for the loop's next run,
    as the loop's own turn would have."""
    from xllm_jupyter.engine.loop_wake import waker_for

    loop, _ = _counting_loop()
    order: list[str] = []

    async def make():
        return waker_for(loop)

    async def reader(fut: asyncio.Future) -> None:
        await fut
        order.append("reader")

    try:
        waker = loop.run_until_complete(make())
        fut = loop.create_future()
        task = loop.create_task(reader(fut))
        loop.run_until_complete(asyncio.sleep(0.01))  # the reader waits on its future

        def deliver() -> None:
            fut.set_result(None)
            loop.stop()

        thread = threading.Thread(target=waker.post, args=(deliver, (), True))
        thread.start()
        thread.join()
        loop.run_forever()  # returns after the turn that ran the delivery
        order.append("stopped")
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert order == ["stopped", "reader"], order


def test_in_debug_mode_a_slow_woken_reader_is_named_by_the_loop_not_charged_to_the_waker(caplog):
    """Debug mode switched on after the waker was made: the loop runs the woken readers itself, so its
    slow-callback warning names the slow reader's task, not ``LoopWaker._run``."""
    import logging
    import time

    from xllm_jupyter.engine.loop_wake import LoopWaker, waker_for

    loop, _ = _counting_loop()

    async def slow_reader(fut: asyncio.Future) -> None:
        await fut
        time.sleep(0.15)  # a blocking step: what debug mode is there to find

    async def main() -> None:
        waker = waker_for(loop)
        assert isinstance(waker, LoopWaker)
        loop.set_debug(True)
        loop.slow_callback_duration = 0.1
        fut = loop.create_future()
        task = loop.create_task(slow_reader(fut))
        await asyncio.sleep(0.01)  # the reader waits on its future
        thread = threading.Thread(target=waker.post, args=(fut.set_result, (None,), True))
        thread.start()
        thread.join()
        await task

    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    slow = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing")]
    # (main's own step may be slow too on a loaded machine: only the reader's and the waker's matter)
    assert any("slow_reader" in m for m in slow) and not any("LoopWaker" in m for m in slow), slow
