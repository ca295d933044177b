"""Loading a model on demand: resolving its name, choosing a backend, loading its replicas on worker threads.

A load is a task no request owns (``_load``): a client that leaves mid-load cancels its wait, not the
load (unless it still waits for room and no client waits for it any more: then it stops). Room for the model is made first (``SwapMixin._room_turn``, in swaps.py), and its estimated size
stays reserved in the memory budget until it is recorded with its measured size after the warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Callable

from ..backends.base import Backend, BackendOptions, LoadedModel, ModelSpec, unload_each
from ..backends.memory_estimate import disk_bytes
from ..backends.registry import get_backend, select_backend
from ..backends.torch_device import device_kind
from ..core import gc_freeze
from ..core.config import EngineConfig
from ..core.errors import InvalidRequest, ModelNotFound, Overloaded, XllmError
from ..core.slow_work import run_slow, submit_slow
from ..core.types import ModelfileDefaults
from ..store.names import canonical_name
from .fairness import FairnessPolicy
from .first_use import resolve_pulled
from .manager import MemoryBudget, ReplicaSet, Residency, gpu_indices
from .runner import ModelRunner

log = logging.getLogger(__name__)

#: loads of one model in a row whose files were replaced in the store as they loaded, before its waiters get a 503
LOAD_ATTEMPTS = 3


class LoadingMixin:
    """Engine methods that load models and register their runners; the Engine owns the state they use."""

    config: EngineConfig
    catalog: Any
    fairness: FairnessPolicy
    _backends: dict[str, Backend] | None
    _backend_options: BackendOptions
    _runners: dict[str, Any]
    _loading: dict[str, asyncio.Future]
    _resolving: dict[str, asyncio.Future]  # resolves under way (``_resolve_shared``)
    _load_waiters: Counter[str]  # requests awaiting each pending load (``_load``)
    _unload_asks: Counter[str]  # unloads asked for each model (``unload``): a pull or rm calls one after it
    _unload_reasons: dict[str, Any]  # the Engine's: why a model was last unloaded with a reason (a removal)
    _room_waits: set[str]  # SwapMixin's: loads waiting for models in use to free room
    _defaults: dict[str, ModelfileDefaults]
    _embeddings: Any
    _adapters: dict[str, str]
    _res: dict[str, Residency]
    _budget: MemoryBudget
    _replicas: dict[str, int]
    # other mixins' and the Engine's
    _behind_swaps: Callable[[str], Any]  # SwapMixin's
    _room_turn: Callable[..., contextlib.AbstractAsyncContextManager]  # SwapMixin's
    _attach_spec: Callable[[ModelSpec], Any]  # AdapterMixin's
    unload_adapter: Callable[[str], Any]  # AdapterMixin's
    _touch: Callable[..., None]  # ResidencyMixin's
    _retire: Callable[..., Any]  # ResidencyMixin's
    _start_reaper: Callable[[], None]
    _stopped: Any  # the Engine's: the XllmError stop() gave (None while it serves)
    unload: Callable[[str], Any]

    def _choose_backend(self, spec: ModelSpec) -> Backend:
        if self._backends is None:
            return select_backend(spec)
        if spec.backend:
            if spec.backend in self._backends:
                return self._backends[spec.backend]
            return get_backend(spec.backend)
        for backend in self._backends.values():
            if backend.available() and backend.supports(spec):
                return backend
        raise InvalidRequest(f"No configured backend can load {spec.format} models", param="model")

    def _choose_backend_once(self, spec: ModelSpec) -> Backend:
        """``_choose_backend``; the process's first one (it imports torch) with collections paused, then a freeze."""
        with gc_freeze.first_time("choose a backend") as block:
            block.only_imported()  # (backend modules and torch; the choice itself reads a few files)
            return self._choose_backend(spec)

    def _resolve(self, name: str) -> ModelSpec:
        """The catalog's spec with the engine's settings as the backend options, the spec's overrides applied."""
        if self.catalog is None:
            raise ModelNotFound(name)
        spec = self.catalog.resolve(name)
        options = self._backend_options
        draft = self.config.draft_model
        if draft and canonical_name(draft) != name:
            options = dataclasses.replace(options, draft_model_path=str(self.catalog.resolve(draft).path))
        return dataclasses.replace(spec, options=options.with_overrides(spec.overrides))

    async def _resolve_shared(self, name: str) -> ModelSpec:
        """``_resolve(name)`` on a slow-work thread, one at a time per name: callers arriving meanwhile share it.

        A first use of a packaged model pulls it, or waits for a pull of it under way (another process's: minutes),
        awaited on the loop (first_use.py). Each embeddings request waited on a slow-work thread of its own, so
        ``SLOW_WORKERS`` of them held that whole pool and every other load, pull and removal waited for the pull.
        """
        pending = self._resolving.get(name)
        if pending is None:
            # a task no request owns: a client that leaves stops its own wait, not the others' (nor the thread)
            pending = asyncio.ensure_future(resolve_pulled(self, name))
            self._resolving[name] = pending
            pending.add_done_callback(lambda task: self._resolve_done(name, task))
        try:
            return await asyncio.shield(pending)
        except XllmError as exc:
            # its own copy for each caller: a handler may set its param, and one instance raised in many requests
            # would chain their tracebacks
            raise copy.copy(exc) from None

    def _resolve_done(self, name: str, task: asyncio.Future) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]  # the next caller resolves afresh (the store may have changed)
        if not task.cancelled():
            task.exception()  # mark retrieved: a resolve whose callers all left would log its error as unseen

    async def load(self, name: str) -> LoadedModel:
        """The loaded model ``name``, loading it on a worker thread if needed.

        The entry point of a request: while a load for another model waits for this one's room, a
        request arriving now waits behind it (``_behind_swaps``), so a model kept busy by a steady
        stream of requests cannot keep the other model out. The request's later calls (encode,
        generate) use ``_load`` and never wait there, so a request already under way is not held.
        """
        name = canonical_name(name)
        await self._behind_swaps(self._adapters.get(name, name))
        return await self._load(name)

    async def _load(self, name: str) -> LoadedModel:
        """``load`` without waiting behind a swap: for a request already past its entry."""
        name = canonical_name(name)
        base = self._adapters.get(name, name)  # an adapter's model is its base's
        runner = self._runners.get(base)
        if runner is not None and name != base and name in self._loading:
            # an adapter attached but not yet checked against its manifest (``_load_new``): a re-pull may have
            # replaced its files, so a new request waits for the check as the attach's own waiters do
            runner = None
        if runner is not None and not runner.alive:
            # its engine thread died (its requests were failed): free it and load the model afresh
            log.warning("the engine thread of %s is gone; reloading the model", base)
            await self.unload(base)
            runner = None
        if runner is not None:
            rec = self._res.get(base)
            if rec is not None:
                rec.last_used = time.time()
            return runner.model
        if name in self._embeddings.slots:
            raise not_supported(name, "an embedding model: use /v1/embeddings")
        pending = self._loading.get(name)
        if pending is None:
            self._refuse_if_stopped()
            # a task no request owns: a client that leaves mid-load cancels its wait, not the load,
            # whose weights would otherwise be loaded by its thread and never unloaded
            pending = asyncio.ensure_future(self._load_new(name))
            self._loading[name] = pending
            pending.add_done_callback(lambda task: self._load_done(name, task))
        self._load_waiters[name] += 1
        try:
            model = await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled() and self._stopped is not None:
                self._refuse_if_stopped()  # the engine stopped under the load: its waiters get why, not a 500
            raise
        finally:
            self._load_waiters[name] -= 1
            if self._load_waiters[name] <= 0:
                del self._load_waiters[name]
                if not pending.done() and name in self._room_waits:
                    # every client that wanted it left while it still waits for room (no weight read yet): it
                    # must not hold the busy models' new requests back, then evict one of them, for no one
                    log.info("nobody waits for %s any more; its load stops waiting for room", name)
                    pending.cancel()
        if self._adapters.get(name, name) not in self._runners:
            # unloaded between the load registering it and its waiters waking (its collection can take a second):
            # a 503 to retry, as for a model unloaded under a running request, not a 404 "does not exist"; a
            # removal's unload says it is gone, as it tells the requests it cut on the running model
            reason = self._unload_reasons.get(name)
            if reason is not None:
                raise copy.copy(reason)  # (one instance raised in many requests would chain their tracebacks)
            raise Overloaded(f"The model '{name}' was unloaded as it finished loading; retry the request")
        return model

    def _refuse_if_stopped(self) -> None:
        """Raise (a fresh copy of) the error ``stop()`` gave, once the engine is stopping or stopped."""
        stopped = self._stopped
        if stopped is not None:
            raise copy.copy(stopped)  # (one instance raised in many requests would chain their tracebacks)

    def _load_done(self, name: str, task: asyncio.Future) -> None:
        if self._loading.get(name) is task:
            self._loading.pop(name, None)
            self._unload_asks.pop(name, None)  # (counted only while a load is under way)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter re-raises it itself

    async def _load_new(self, name: str) -> LoadedModel:
        """Resolve, choose a backend and load ``name`` (or attach it, for an adapter); register its runner.

        A model re-pulled (other files) or removed while it loaded is not registered: its old weights would
        serve under the new digest, or a removed model would stay loaded. The load is discarded and done
        again from what the store holds now (a removed model: its waiters get the 404); an adapter is detached
        and attached again.
        """
        for _ in range(LOAD_ATTEMPTS):
            asked = self._unload_asks[name]  # a pull or rm of the model from here on asks for its unload
            spec = await resolve_pulled(self, name)  # (a first use's pull awaited on the loop: first_use.py)
            if spec.task == "embedding":
                raise not_supported(name, "an embedding model: use /v1/embeddings")
            if spec.task == "adapter":  # a LoRA: attached to its (loaded once) base model
                try:
                    model = await self._attach_spec(spec)
                except Exception as exc:
                    if not await self._moved_under(name, spec, asked, exc):
                        raise
                    continue
                # (attached and routed already: an unload asked during the check detaches it)
                if await self._files_unchanged(name, spec):
                    return model
                log.warning("adapter %s was re-pulled or removed while it was attached; attaching it again", name)
                await self.unload_adapter(name)
                continue
            try:
                # off the IOLoop: choosing imports a backend and asks torch whether CUDA is there (seconds, once);
                # it looks at the files too (a directory gone under it: "no backend can load" it)
                backend = await asyncio.to_thread(self._choose_backend_once, spec)
                box = [await self._load_runner(name, spec, backend)]
            except Exception as exc:
                if not await self._moved_under(name, spec, asked, exc):
                    raise
                continue
            try:
                unchanged = await self._files_unchanged(name, spec)
            except BaseException:  # cancelled (the engine stops): stop the thread once it is done, unload
                self._res.pop(name, None)
                threading.Thread(target=box.pop().shutdown, kwargs={"timeout": None}, daemon=True).start()
                raise
            if unchanged:
                break  # (no await from the check to the registration below: an unload after it finds the runner)
            log.warning("model %s was re-pulled or removed while it loaded; loading it again from the store", name)
            # (a list the unload empties: no frame here keeps the old weights alive past their unload)
            await self._retire(name, box, self._res.pop(name, None))
        else:
            raise Overloaded(f"The model '{name}' was replaced in the store each time it loaded; retry the request")
        runner = box.pop()
        self._defaults[name] = spec.defaults
        self._runners[name] = runner
        self.residency_changes[name, "load"] += 1  # the Engine's (/metrics)
        self._unload_reasons.pop(name, None)  # (an earlier removal's: this load's waiters are not cut by it)
        # it serves from here on: readiness (/health/ready, /admin/stats' status) must not say "Still loading"
        # through the collection below, which walks the whole process (a JupyterLab's: a second or more)
        self._loading.pop(name, None)
        self._unload_asks.pop(name, None)
        # the load's garbage goes; the model stays unfrozen, so its unload needs no full collection (gc_freeze.py)
        await asyncio.to_thread(gc_freeze.tidy)
        return runner.model

    async def _moved_under(self, name: str, spec: ModelSpec, asked: int, exc: Exception) -> bool:
        """Whether a pull or rm changed ``name``'s files since its load resolved ``spec`` (``asked``: the unload
        asks counted then), given that the load failed with ``exc``: the files went from under the backend as it
        read them, so the error says nothing about what the store holds (not "damaged"); load that instead."""
        if self._unload_asks[name] == asked and await self._files_unchanged(name, spec):
            return False
        log.warning("model %s was re-pulled or removed as it loaded, and its load failed (%s); loading it again "
                    "from the store", name, type(exc).__name__)
        return True

    async def _files_unchanged(self, name: str, spec: ModelSpec) -> bool:
        """Whether the store still holds the files ``spec`` was loaded from (its manifest's digest) and the settings
        (a create that kept the weights keeps the digest), read off the IOLoop. True when that cannot be told (a
        catalog without digests). A pull, create or rm asks for an unload after it changed the model; one asked
        during the read may have come after the read: it reads again."""
        lookup = getattr(self.catalog, "facts", None)
        if spec.digest is None or lookup is None:
            return True
        while True:
            asked = self._unload_asks[name]
            try:
                facts = await asyncio.to_thread(lookup, name)
            except Exception:  # an unreadable store: the model files were read, let it serve
                log.warning("could not re-read the manifest of %s after its load", name, exc_info=True)
                return True
            if self._unload_asks[name] == asked:
                return facts.digest == spec.digest and facts.defaults in (None, spec.defaults)

    async def _load_runner(self, name: str, spec: ModelSpec, backend: Backend) -> Any:
        """Make room within the budget, then load ``name``'s replicas and start their threads."""
        count = self._replicas.get(name, 1)
        # which memory it draws on (deciding "auto" imports torch: off the IOLoop)
        device = backend.memory_device(spec) or await asyncio.to_thread(
            device_kind, spec.options.device)
        # weights (their files) and a cache the backend allocates at load (exllama's paged KV cache: 8 GiB
        # for an 8B Llama at the default 65,536 tokens, more than its 4-bit weights); reads files, may ask torch
        needed = count * await asyncio.to_thread(lambda: disk_bytes(spec.path) + backend.cache_bytes_estimate(spec))
        models: list[LoadedModel] = []
        gpus = gpu_indices(spec, backend) if device == "cuda" else None
        async with self._room_turn(name, needed, device, gpus):
            # reserved until the model is recorded with its measured size (after the warm-up, which may
            # take minutes): a load meanwhile must not count this memory as free
            async with self._reserved(device, needed):
                freezes = gc_freeze.freezes()
                try:
                    for _ in range(count):
                        models.append(await _load_on_a_thread(backend, spec))
                except BaseException as exc:
                    await run_slow(unload_each, models)  # (freeing memory takes a while: off the IOLoop)
                    if isinstance(exc, Exception):  # (not a cancel: the engine stops, its loop may be going)
                        await run_slow(gc_freeze.release_after_failed_load, exc, freezes)
                    raise
        async with self._reserved(device, needed):  # (no await between the two: never counted free)
            return await self._start_replicas(name, models, device, gpus)

    @contextlib.asynccontextmanager
    async def _reserved(self, device: str, size: int):
        """Count ``size`` bytes as taken on ``device`` while the block runs."""
        self._budget.reserved[device] = self._budget.reserved.get(device, 0) + size
        try:
            yield
        finally:
            self._budget.reserved[device] -= size

    async def _start_replicas(self, name: str, models: list[LoadedModel], device: str,
                              gpus: tuple[int, ...] | None) -> Any:
        """Start the loaded replicas' threads, wait for their warm-up; record the model."""
        runners = [
            ModelRunner(
                m,
                max_batch_size=min(self.config.max_batch_size, m.max_batch_size),
                fairness=self.fairness,
                stream_interval=self.config.stream_interval_ms / 1000,
            )
            for m in models
        ]
        runner = runners[0] if len(runners) == 1 else ReplicaSet(runners)
        runner.start()
        try:
            await run_slow(runner.wait_ready)  # compiling can take minutes: off the IOLoop and the shared pool
        except BaseException:
            # failed, or this load was cancelled mid warm-up: stop the thread once it is done, unload
            threading.Thread(target=runner.shutdown, kwargs={"timeout": None}, daemon=True).start()
            raise
        # (a backend that measures a load as a change in device memory can be blurred by an unload meanwhile)
        self._res[name] = Residency(device=device, memory_bytes=sum(max(0, m.memory_bytes()) for m in models),
                                    gpus=gpus)
        self._touch(name)
        self._start_reaper()
        return runner

    async def _load_embedding(self, spec: ModelSpec) -> Any:
        """Load embedding model ``spec`` (``_load_embedding_once``); one re-pulled or removed while it loaded is
        unloaded and loaded again from what the store holds now, as a chat model is (``_load_new``)."""
        for _ in range(LOAD_ATTEMPTS):
            try:
                slot = await self._load_embedding_once(spec)
            except Exception as exc:
                # (an embedding load is not in ``_loading``, so no unload asks are counted for it: the digest tells)
                if not await self._moved_under(spec.name, spec, self._unload_asks[spec.name], exc):
                    raise
            else:
                # (the slot is in the table by now: an unload asked after the check below finds it)
                if await self._files_unchanged(spec.name, spec):
                    return slot
                log.warning("model %s was re-pulled or removed while it loaded; loading it again from the store",
                            spec.name)
                await self._embeddings.unload(spec.name)
            spec = await self._resolve_shared(spec.name)  # a removed model: ModelNotFound (404)
            if spec.task != "embedding":
                raise not_supported(spec.name, "a chat model and cannot create embeddings")
        raise Overloaded(f"The model '{spec.name}' was replaced in the store each time it loaded; retry the request")

    async def _load_embedding_once(self, spec: ModelSpec) -> Any:
        """Load embedding model ``spec`` after making room for its weights (it is charged to the budget too)."""
        if spec.name in self._embeddings.slots or self._embeddings.is_loading(spec.name):
            return await self._embeddings.load(spec)  # loaded, or joins the load under way: no room to make
        self._refuse_if_stopped()
        device = await asyncio.to_thread(device_kind, spec.options.device)
        needed = await asyncio.to_thread(disk_bytes, spec.path)
        def settled() -> bool:  # loaded (or loading) while this one waited for its turn: no room to make
            return spec.name in self._embeddings.slots or self._embeddings.is_loading(spec.name)

        async with self._room_turn(spec.name, needed, device, gpu_indices(spec, None), settled):
            if settled():
                return await self._embeddings.load(spec)
            async with self._reserved(device, needed):
                return await self._embeddings.load(spec)


def _load_and_prepare(backend: Backend, spec: ModelSpec) -> LoadedModel:
    """``backend.load(spec)``, then what constrained decoding needs: part of the load, not of the first
    structured request, whose build held the GIL (and the IOLoop) for 0.3-0.7 s."""
    # a backend's first load imports torch and its model library: unpaused, the objects they make set off
    # full collections mid-load (each a GIL stretch of 0.2-0.4 s); paused, one freeze at its end walks them.
    # Where the backend can import ahead, only the imports are in that block: the model loads after the
    # freeze, unfrozen, so its unload is a plain collection, not a full one of the whole process (gc_freeze.py)
    model = None
    with gc_freeze.first_time(f"load {getattr(backend, 'name', type(backend).__name__)}") as first:
        if first and _import_ahead(backend, spec):
            first.only_imported()
        else:
            model = backend.load(spec)
    if model is None:
        model = backend.load(spec)
    try:
        model.prepare_constraints()
    except Exception:  # the model serves anyway: a constrained request tries again (and answers the error)
        log.warning("model %s: the grammar engine could not be prepared", spec.name, exc_info=True)
    return model


def _import_ahead(backend: Backend, spec: ModelSpec) -> bool:
    """``backend.import_libraries(spec)`` where the backend has it (tests' stand-ins may not): True when done."""
    imports = getattr(backend, "import_libraries", None)
    return bool(imports(spec)) if imports is not None else False


async def _load_on_a_thread(backend: Backend, spec: ModelSpec) -> LoadedModel:
    """``backend.load(spec)`` on a slow-work thread (core/slow_work.py); if the wait is cancelled, the thread's model is unloaded
    once it is done (a thread cannot be stopped, and its weights would stay in memory for good)."""
    loading = submit_slow(_load_and_prepare, backend, spec)
    waiting = asyncio.wrap_future(loading)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        # on the thread's future, not a task's: a loop closed before the load ended (an exit right after stop())
        # ran no callback, so the model stayed loaded ("Task was destroyed but it is pending!")
        loading.add_done_callback(_unload_when_loaded)
        waiting.add_done_callback(lambda w: w.cancelled() or w.exception())  # no one awaits it: its error is seen
        raise


def _unload_when_loaded(loading: Future) -> None:
    if not loading.cancelled() and loading.exception() is None:
        threading.Thread(target=unload_each, args=([loading.result()],), name="xllm-unload", daemon=True).start()


def not_supported(name: str, what: str) -> InvalidRequest:
    """The 400 for a request that names a model of the wrong kind (``what`` it is)."""
    return InvalidRequest(f"The model '{name}' is {what}", param="model", code="model_not_supported")
