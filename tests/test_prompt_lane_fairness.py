"""The huge-prompt lane shares its threads out user by user: one user's burst does not hold up another user.

The lane (engine/prompt_lane.py) has two threads. A FIFO let one user's burst of huge prompts take both and
another user's huge prompt waited until the whole burst was encoded; now it waits for one of them. Encodes are
held on events here, so "which prompt got the next free thread" is seen, not timed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.engine.prompt_lane import BIG_PROMPT_CHARS, PromptLane

ALICE, BOB = "sk-lane-alice", "sk-lane-bob"
FILLER = " word" * (BIG_PROMPT_CHARS // 5 + 10)  # over the lane's threshold (the tiny model's context then says 400)


class HeldEncodes:
    """Wraps a tokenizer's ``encode``: a text starting with a ``MARK-<name>`` waits inside until that name is released."""

    def __init__(self, encode: Any):
        self.encode = encode
        self.entered: list[str] = []  # names, in the order their encodes started
        self.releases: dict[str, threading.Event] = {}
        self.changed = threading.Condition()
        self.opened = False  # release_all was called: nothing is held any more

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        if text.startswith("MARK-"):
            name = text.split()[0][5:]
            with self.changed:
                release = self.releases.setdefault(name, threading.Event())
                if self.opened:
                    release.set()
                self.entered.append(name)
                self.changed.notify_all()
            release.wait(60)  # (a bound only so a broken test cannot hang the run)
        return self.encode(text, *args, **kwargs)

    def wait_entered(self, count: int) -> list[str]:
        """The names entered once ``count`` have."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.entered) >= count, 60), self.entered
            return list(self.entered)

    def release(self, name: str) -> None:
        with self.changed:
            self.releases.setdefault(name, threading.Event()).set()

    def release_all(self) -> None:
        with self.changed:
            self.opened = True
            for event in self.releases.values():
                event.set()


@pytest.fixture(scope="module")
def two_users(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server with two user keys (each key is its own user)."""
    with running_server(make_test_config(xllm_home, api_keys=(ALICE, BOB)), tiny_catalog, TINY) as info:
        yield info


def _waiting(server: Any, count: int) -> None:
    """Until ``count`` huge prompts wait in the lane (polled: the requests get there on their own)."""
    lane = server.engine._prompts
    for _ in range(6000):
        if lane.waiting() == count:
            return
        threading.Event().wait(0.01)
    pytest.fail(f"{lane.waiting()} huge prompts wait in the lane, not {count}")


def test_another_users_huge_prompt_goes_next_not_after_a_whole_burst(two_users, monkeypatch):
    tokenizer = two_users.engine._runners[TINY].model.chat.tokenizer
    held = HeldEncodes(tokenizer.encode)
    monkeypatch.setattr(tokenizer, "encode", held)
    statuses: dict[str, int] = {}

    def post(key: str, name: str) -> None:
        body = {"model": TINY, "prompt": f"MARK-{name}" + FILLER, "max_tokens": 1}
        r = httpx.post(two_users.base_url + "/completions", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {key}"})
        statuses[name] = r.status_code

    burst = [threading.Thread(target=post, args=(ALICE, f"a{i}")) for i in range(4)]
    threads = list(burst)
    try:
        for t in burst:
            t.start()
        first_two = held.wait_entered(2)  # both lane threads hold one of Alice's prompts
        _waiting(two_users, 2)  # and her other two wait for them
        bob = threading.Thread(target=post, args=(BOB, "b"))
        threads.append(bob)
        bob.start()
        _waiting(two_users, 3)
        held.release(first_two[0])
        # one thread is free: Bob's prompt gets it (a FIFO gave it to Alice's third, then her fourth)
        assert held.wait_entered(3)[2] == "b"
        assert all(name.startswith("a") for name in first_two)
    finally:
        held.release_all()
        for t in threads:
            t.join(60)
    assert statuses == {**{f"a{i}": 400 for i in range(4)}, "b": 400}  # each was tokenized, then too long


def test_a_huge_prompt_cancelled_while_waiting_never_runs_and_frees_its_turn():
    """The client left while its prompt waited in the lane: its work is skipped, and the next one's still runs."""

    async def scenario() -> list[str]:
        lane = PromptLane(workers=1, threshold=0)
        ran: list[str] = []
        gate = threading.Event()

        def work(name: str) -> str:
            if name == "first":
                gate.wait(60)
            ran.append(name)
            return name

        first = asyncio.ensure_future(lane.run(1, work, "first", user="u"))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(lane.run(1, work, "gone", user="v"))
        later = asyncio.ensure_future(lane.run(1, work, "later", user="w"))
        while lane.waiting() != 2:
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert lane.waiting() == 1
        gate.set()
        assert await first == "first" and await later == "later"
        lane.close()
        return ran

    assert asyncio.run(scenario()) == ["first", "later"]


def test_one_user_alone_keeps_their_order():
    """With one user the lane is a FIFO: their prompts start in the order they came."""

    async def scenario() -> list[int]:
        lane = PromptLane(workers=1, threshold=0)
        started: list[int] = []
        gate = threading.Event()

        def work(i: int) -> None:
            if i == 0:
                gate.wait(60)
            started.append(i)

        calls = [asyncio.ensure_future(lane.run(1, work, 0, user="u"))]
        await asyncio.sleep(0)
        calls += [asyncio.ensure_future(lane.run(1, work, i, user="u")) for i in range(1, 5)]
        while lane.waiting() != 4:
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*calls)
        lane.close()
        return started

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
