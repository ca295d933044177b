"""The engine's embedding models: loaded on demand, each with its own one-thread executor.

Embedding forwards never enter a chat runner's step loop: each embedding model has a
single worker thread of its own, so forwards for it run one after another there (torch
already spreads one forward over the cores) and the event loop only awaits futures.

A request's texts are tokenized off that thread (the model's tokenizer is lock-free once
settled), and its forwards go to the thread ``TURN`` inputs at a time, the next turn queued
only when the last one is done: another user's request queued meanwhile runs between two
turns, so it waits for one turn of a big batch, not for the whole batch (tokenizing included).
Turns are handed out user by user (the engine's ``FairQueue``, one turn on the thread at a time):
one user's burst of requests (an indexing job's) does not queue another user's behind all of it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.base import ModelSpec
from ..core import gc_freeze
from ..core.errors import Overloaded, XllmError
from ..core.slow_work import run_slow
from ..core.types import EmbeddingResult, ModelInfo, ModelRuntime
from .fairness import FairQueue

log = logging.getLogger(__name__)

#: inputs per turn on a model's thread (one forward chunk of backends/embeddings.py)
TURN = 64


def interrupted(name: str, exc: BaseException) -> Overloaded:
    """What a load of ``name`` that ended with ``exc`` (no Exception: a cancel, an exit) tells its waiters: a 503."""
    return Overloaded(f"The load of the embedding model '{name}' was interrupted ({type(exc).__name__}); "
                      "retry the request")


def _being_cancelled() -> bool:
    """True when the running task was cancelled (not a CancelledError a loader thread raised)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class EmbeddingSlot:
    """One loaded embedding model and the thread its forwards run on."""

    def __init__(self, model: Any):
        self.model = model
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"xllm-embed-{model.name}")
        self.closed = False  # unloaded: no new work (its executor is shut down or about to be)
        self.closed_by: XllmError | None = None  # what a request that finds it closed fails with (None: a 503)
        #: requests past their slot check and not yet done (on the IOLoop only): a keep_alive expiry waits for 0,
        #: since their tokenizing and turns are not one job on the model's thread that the unload would wait for
        self.in_use = 0
        # turns waiting for the thread, one FIFO per user, round-robin (on the IOLoop only; no reserve: one thread)
        self._turns: FairQueue[tuple[str, asyncio.Future]] = FairQueue(key=lambda t: t[0], reserved=0)
        self._turn_held = False  # a turn is on the thread (or handed to its request, not yet on it)

    def turns_waiting(self) -> int:
        """Turns waiting for the model's thread."""
        return len(self._turns)

    async def turn(self, user: str) -> None:
        """Wait for ``user``'s turn on the model's thread; pair with ``turn_done``."""
        waiter = asyncio.get_running_loop().create_future()
        self._turns.append((user, waiter))
        if not self._turn_held:
            self._next_turn()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.turn_done()  # handed over as the request left: the next one's
            else:
                self._turns.remove_if(lambda t: t[1] is waiter)
            raise

    def turn_done(self) -> None:
        """The turn has left the thread: the next user's goes."""
        self._turn_held = False
        self._next_turn()

    def _next_turn(self) -> None:
        while self._turns:
            _, waiter = self._turns.take(1)[0]  # (the user served longest ago first)
            if not waiter.done():  # (one cancelled, its request not yet resumed to leave the line: the next)
                self._turn_held = True
                waiter.set_result(None)
                return

    def info(self) -> ModelInfo:
        """The loaded model's ``ModelInfo``."""
        m = self.model
        return ModelInfo(
            name=m.name,
            created=self.created,
            loaded=True,
            backend=m.backend_name,
            context_length=m.context_length,
            details=m.details(),
            runtime=ModelRuntime(memory_bytes=m.memory_bytes()),
        )

    def shutdown(self) -> None:
        """Finish queued work, stop the thread and drop the weights."""
        self.executor.shutdown(wait=True)
        self.model.unload()


class EmbeddingHost:
    """Loads embedding models once (concurrent first requests share one load) and runs them."""

    def __init__(self, loader: Callable[[ModelSpec], Any] | None = None,
                 changes: Counter[tuple[str, str]] | None = None):
        self._loader = loader
        #: loads and unloads by model (the engine's ``residency_changes``)
        self.changes: Counter[tuple[str, str]] = changes if changes is not None else Counter()
        self.slots: dict[str, EmbeddingSlot] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._loads: set[asyncio.Task] = set()  # the loads' own tasks (a task nobody references may be collected)
        self.stopped: XllmError | None = None  # set by stop(): what a request waiting for a load (or asking one) gets

    def _load_sync(self, spec: ModelSpec) -> Any:
        if self._loader is not None:
            return self._loader(spec)
        # imports torch and transformers: only when needed, and the first time with collections paused, then frozen
        # (gc_freeze); the model itself loads after that freeze: unfrozen, its unload walks no frozen object
        with gc_freeze.first_time("load embeddings") as block:
            from ..backends.embeddings import import_libraries, load_embedding_model

            import_libraries()
            block.only_imported()
        return load_embedding_model(spec)

    def is_loading(self, name: str) -> bool:
        """True while a load of ``name`` is under way."""
        return name in self._loading

    def pending(self, name: str) -> asyncio.Future | None:
        """The load of ``name`` under way (it settles when the load ends), or None."""
        return self._loading.get(name)

    async def load(self, spec: ModelSpec) -> EmbeddingSlot:
        """The slot for ``spec``, loading the model on a worker thread if needed.

        The load is a task no request owns, as a chat model's is: a client that leaves mid-load cancels its own
        wait, not the load the other requests wait for; ``stop()`` fails the waits at once (a thread cannot be
        stopped: what it loads after that is unloaded, never served by a stopped engine).
        """
        slot = self.slots.get(spec.name)
        if slot is not None:
            return slot
        pending = self._loading.get(spec.name)
        if pending is None:
            if self.stopped is not None:
                raise copy.copy(self.stopped)  # (one instance raised in many requests would chain their tracebacks)
            pending = asyncio.get_running_loop().create_future()
            self._loading[spec.name] = pending
            task = asyncio.ensure_future(self._load_into(spec, pending))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        return await asyncio.shield(pending)

    async def _load_into(self, spec: ModelSpec, pending: asyncio.Future) -> None:
        """Load ``spec`` on a worker thread and register its slot, settling ``pending`` (unless ``stop()`` did:
        then the model is unloaded)."""
        freezes = gc_freeze.freezes()
        try:
            model = await run_slow(self._load_sync, spec)  # (may wait for another load: not the shared pool)
        except BaseException as exc:
            # every end settles the waiters: a loader's SystemExit or KeyboardInterrupt (on its thread: no Ctrl-C) or
            # CancelledError, or this task cancelled, left them waiting for good (and the first two stopped the loop)
            failure = exc if isinstance(exc, Exception) else interrupted(spec.name, exc)
            if not pending.done():
                pending.set_exception(failure)
                pending.exception()  # concurrent waiters re-raise it themselves
            cancelled = isinstance(exc, asyncio.CancelledError) and _being_cancelled()
            await asyncio.shield(run_slow(gc_freeze.release_after_failed_load, failure, freezes))
            if cancelled:
                raise  # (this task was cancelled: it ends cancelled, its waiters told)
            return
        finally:
            if self._loading.get(spec.name) is pending:
                self._loading.pop(spec.name, None)
        if pending.done():  # the engine stopped while it loaded: its waiters heard why, and nothing serves it
            log.info("embedding model %s finished loading after the engine stopped; unloading it", spec.name)
            await run_slow(model.unload)
            del model
            await asyncio.to_thread(gc_freeze.release)
            return
        slot = EmbeddingSlot(model)
        self.slots[spec.name] = slot
        self.changes[spec.name, "load"] += 1
        pending.set_result(slot)
        log.info("loaded embedding model %s (%d dimensions)", spec.name, model.dimension)
        # the load's garbage goes; the model stays unfrozen, so its unload needs no full collection (gc_freeze.py)
        await asyncio.to_thread(gc_freeze.tidy)

    async def embed(self, slot: EmbeddingSlot, inputs: Sequence[str] | Sequence[Sequence[int]],
                    tokenize: Callable[..., Any] | None = None, user: str | None = None) -> EmbeddingResult:
        """Tokenize and check ``inputs`` on a worker thread (``tokenize(chars, work)`` runs it: the engine's prompt
        lane; default: asyncio's pool), then embed them on the model's own thread, ``TURN`` inputs a turn, the
        turns shared out by ``user``."""
        self._check_open(slot)
        slot.in_use += 1
        try:
            return await self._embed(slot, inputs, tokenize, user or "")
        finally:
            slot.in_use -= 1

    def busy(self, name: str) -> bool:
        """True while a request uses loaded embedding model ``name`` (its keep_alive expiry then waits)."""
        slot = self.slots.get(name)
        return slot is not None and slot.in_use > 0

    async def _embed(self, slot: EmbeddingSlot, inputs: Sequence[str] | Sequence[Sequence[int]],
                     tokenize: Callable[..., Any] | None, user: str) -> EmbeddingResult:
        model = slot.model

        def prepare() -> list[list[int]]:
            ids = [model.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
            for i, row in enumerate(ids):
                model.check_ids(i, row)
            return ids

        chars = sum(len(x) for x in inputs if isinstance(x, str))
        ids = await (tokenize(chars, prepare) if tokenize is not None else asyncio.to_thread(prepare))
        # similar lengths share a turn (each pads to its longest); rows go back to input order via ``order``
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vectors = np.empty((len(ids), model.dimension), dtype=np.float32)
        loop = asyncio.get_running_loop()
        for start in range(0, len(order), TURN):
            rows = order[start : start + TURN]
            self._check_open(slot)
            await slot.turn(user)
            try:
                vectors[rows] = await loop.run_in_executor(slot.executor, model.embed_ids, [ids[i] for i in rows])
            except RuntimeError:  # "cannot schedule new futures after shutdown": unloaded between two turns
                self._check_open(slot)
                raise
            finally:
                slot.turn_done()
        return EmbeddingResult(model=model.name, vectors=vectors, token_counts=tuple(len(r) for r in ids))

    @staticmethod
    def _check_open(slot: EmbeddingSlot) -> None:
        """The unload's error when ``slot`` was unloaded after this request got it."""
        if slot.closed:
            # unloaded after this request got its slot (a keep_alive 0 request ending while this one waited for
            # the load's collection): its executor takes no work, which read as a 500 with a traceback
            if slot.closed_by is not None:
                raise copy.copy(slot.closed_by)  # its own: one instance raised in many requests collects their frames
            raise Overloaded(f"The model '{slot.model.name}' was unloaded while this request ran; retry the request")

    async def unload(self, name: str, reason: XllmError | None = None) -> bool:
        """Unload ``name``; False when it was not loaded. A request that finds it closed fails with ``reason``."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return False
        self.changes[name, "unload"] += 1
        slot.closed, slot.closed_by = True, reason
        # the worker thread gets the box, not the slot: it may still hold its finished call when the collection
        # below runs, and the model must be unreferenced by then (what it leaves in cycles, that one frees)
        box = [slot]
        del slot
        full = await asyncio.to_thread(gc_freeze.is_frozen, box[0].model)  # (made at its load, like its weights)
        await run_slow(lambda: box[0].shutdown())
        box.clear()
        await asyncio.to_thread(gc_freeze.release, full)  # (frozen cycles: only a collection that unfreezes finds them)
        return True

    async def stop(self, reason: XllmError | None = None) -> None:
        """Unload every embedding model; requests waiting for a load under way fail with ``reason`` now (default:
        a 503 to retry), as do later ones."""
        self.stopped = reason or Overloaded("The engine was stopped; retry the request later")
        for pending in list(self._loading.values()):
            if not pending.done():
                pending.set_exception(copy.copy(self.stopped))
                pending.exception()  # (each waiter re-raises it itself)
        # forgotten, not left until their threads end: an engine started again meanwhile joined these failed waits
        # (its requests got the stop's 503); each load's own end unloads what it loaded (``_load_into``)
        self._loading.clear()
        for name in list(self.slots):
            await self.unload(name)
