"""Making room for a load: which idle models to unload, waiting for busy ones, and turns on the GPU.

A load that needs the room of models in use waits for their requests to end (``engine.load_wait_seconds``)
rather than being refused while another user's model is busy, and new requests for those models wait behind
it (``_behind_swaps``): users who want different models take turns instead of the busier one locking the
other out. GPU loads run one at a time (``_gpu_turn``), each making its room inside its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable

from ..backends import released_tokenizers, torch_device
from ..core.errors import Overloaded
from .manager import MemoryBudget, Residency, shares_room

log = logging.getLogger(__name__)

#: how often a load waiting for models in use to go idle looks again
ROOM_POLL_SECONDS = 0.1


class SwapMixin:
    """Engine methods that make room for a load and order loads; the Engine owns the state they use."""

    _runners: dict[str, Any]
    _res: dict[str, Residency]
    _budget: MemoryBudget
    _gpu_loads: asyncio.Lock
    _load_wait: float
    _held: Counter[str]
    _room_waits: set[str]
    # ResidencyMixin's
    _idle: Callable[[str, float], bool]
    _memory_records: Callable[[], dict[str, Residency]]
    _evict: Callable[[str], Any]
    # LoadingMixin's
    _reserved: Callable[[str, int], contextlib.AbstractAsyncContextManager]

    @contextlib.asynccontextmanager
    async def _room_turn(self, name: str, needed: int, device: str, gpus: tuple[int, ...] | None,
                         settled: Callable[[], bool] | None = None) -> AsyncIterator[None]:
        """Wait for room (``_await_room``), then hold the GPU turn with the room made (``_make_room``).

        Another load can take the room this one waited for (two loads counted the same idle model,
        or the model just evicted was asked for again by a request already under way): it waits for
        room again, until ``engine.load_wait_seconds`` from its first wait have passed, rather than
        a 503 while the users of two models that do not fit together take turns. ``settled()`` true
        in the turn: no room is made (the model was loaded meanwhile; the body sees that too).
        """
        deadline = time.monotonic() + self._load_wait
        while True:
            await self._await_room(name, needed, device, gpus, deadline)  # models in use free room when their requests end
            async with self._gpu_turn(device):
                if settled is None or not settled():
                    try:
                        await self._make_room(name, needed, device, gpus)
                    except Overloaded as exc:
                        if exc.code != "insufficient_memory" or self._load_wait <= 0:
                            raise
                        if time.monotonic() >= deadline:
                            raise _waited(exc, self._load_wait) from None
                        log.info("another load took the room %s waited for; waiting again", name)
                        continue
                yield
                return

    def _gpu_turn(self, device: str) -> contextlib.AbstractAsyncContextManager:
        """One GPU load at a time, from its room check to its last weight: loads share the PCIe link and the
        disk anyway, a backend measures its model as the change in the process's GPU memory (another load
        would blur it), and a room check measured on the device must not count what another load is about
        to take as free."""
        return self._gpu_loads if device == "cuda" else contextlib.nullcontext()

    async def _plan_room(self, name: str, needed: int, device: str, gpus: tuple[int, ...] | None) -> list[str]:
        """The idle models to unload so ``needed`` bytes fit now (``MemoryBudget.plan``); Overloaded if none do."""
        now = time.time()
        idle = [n for n in self._runners if self._idle(n, now)]
        room = None
        if device == "cuda" and not self._budget.budgets.get(device):
            room = await asyncio.to_thread(torch_device.cuda_room_bytes, gpus)
        try:
            victims = self._budget.plan(name, needed, device, self._memory_records(), idle, device_room=room, gpus=gpus)
        except Overloaded as exc:
            if exc.code == "insufficient_memory":  # (not for a model that can never fit: no pressure then)
                await self._drop_released(device)
            raise
        if victims:
            await self._drop_released(device)
        return victims

    @staticmethod
    async def _drop_released(device: str) -> None:
        """Short of CPU memory: the tokenizers kept for reloads (released_tokenizers.py; not charged to the budget)
        go before any model does."""
        if device == "cpu" and len(released_tokenizers.RELEASED):
            await asyncio.to_thread(released_tokenizers.RELEASED.clear)  # (freeing a tokenizer takes ms of GIL)

    async def _await_room(self, name: str, needed: int, device: str, gpus: tuple[int, ...] | None = None,
                          deadline: float | None = None) -> None:
        """Wait until ``deadline`` (default: ``engine.load_wait_seconds`` from now) while models in use hold the
        room ``name`` needs.

        Their requests end and free it; refusing at once would leave a user who wants another model
        nothing but 503s for as long as someone keeps the loaded one busy, even with pauses of a
        second between requests. Runs before the GPU turn, so other loads are not held up meanwhile.
        """
        if deadline is None:
            deadline = time.monotonic() + self._load_wait
        held: set[str] = set()
        try:
            while True:
                try:
                    await self._plan_room(name, needed, device, gpus)
                    return
                except Overloaded as exc:
                    if exc.code != "insufficient_memory" or time.monotonic() >= deadline:
                        if exc.code == "insufficient_memory" and self._load_wait > 0:
                            raise _waited(exc, self._load_wait) from None
                        raise
                self._room_waits.add(name)  # shown while loading (``waiting_for_room``)
                # new requests for the busy models in its way wait behind this load (see _behind_swaps); a
                # budget is the device's as a whole, measured room only the GPUs' it loads on
                now = time.time()
                where = None if self._budget.budgets.get(device) else gpus
                for busy in [n for n, r in self._res.items() if shares_room(r, device, where) and n in self._runners
                             and n not in held and not self._idle(n, now)]:
                    held.add(busy)
                    self._held[busy] += 1
                await asyncio.sleep(ROOM_POLL_SECONDS)
        finally:
            self._room_waits.discard(name)
            for model in held:
                self._held[model] -= 1
                if self._held[model] <= 0:
                    del self._held[model]

    async def _behind_swaps(self, name: str) -> None:
        """Wait while a load for another model waits for ``name``'s room (at most ``load_wait_seconds`` from that
        load's first wait, see ``_room_turn``)."""
        while name in self._held:
            await asyncio.sleep(ROOM_POLL_SECONDS)

    async def _make_room(self, name: str, needed: int, device: str, gpus: tuple[int, ...] | None = None) -> None:
        """Unload idle models LRU-first until ``needed`` bytes fit on ``device`` (on ``gpus``, None: all, when
        there is no GPU budget and the room is measured); Overloaded if impossible."""
        while True:  # re-planned after every await: another load may have taken room meanwhile
            victims = await self._plan_room(name, needed, device, gpus)
            if not victims:
                return  # fits now; the caller reserves the room before its next await
            # the room is this load's from now: a load planned while the victims unload (one for a victim itself,
            # asked for again by a request already under way) must not count it as free and take it
            async with self._reserved(device, needed):
                for victim in victims:
                    log.info("unloading idle model %s to make room for %s", victim, name)
                    await self._evict(victim)


def _waited(exc: Overloaded, seconds: float) -> Overloaded:
    """``exc`` saying how long the load waited for room."""
    return Overloaded(f"{exc.message} (waited {seconds:g} s for them to finish)", code=exc.code)
