"""The asyncio-facing engine: loads models, queues requests, streams choice deltas.

Model steps run on one worker thread per loaded model (``ModelRunner``); the engine
only hands requests to runners and awaits per-request queues, so it never blocks the
event loop it lives on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator, Protocol, Sequence

from ..backends import released_tokenizers
from ..backends.base import Backend, BackendOptions, ModelSpec
from ..core import gc_freeze
from ..core.config import EngineConfig, QuotaConfig
from ..core.errors import (ContextLengthExceeded, EngineError, InvalidRequest, ModelNotFound, ModelRemoved, Overloaded,
                           XllmError)
from ..core.slow_work import run_slow
from ..core.types import (
    ChatMessage,
    ChoiceDelta,
    Constraint,
    EmbeddingResult,
    GenerationDone,
    GenerationRequest,
    ModelfileDefaults,
)
from ..store.names import canonical_name
from .embeddings import EmbeddingHost
from .fairness import FairnessPolicy
from .loading import LoadingMixin, not_supported
from .lora import AdapterMixin
from .manager import (
    MemoryBudget,
    Residency,
    ResidencyMixin,
    parse_keep_alive,
    parse_replicas,
    reap_forever,
)
from .prompt_lane import PromptLane, chat_chars
from .runner import ModelRunner
from .swaps import SwapMixin
from .views import ViewsMixin

log = logging.getLogger(__name__)

#: what a model made by ``pull`` (no Modelfile) applies to requests: nothing
NO_DEFAULTS = ModelfileDefaults()


class ModelCatalog(Protocol):
    """Where model names resolve to loadable specs (the store implements this)."""

    def resolve(self, name: str) -> ModelSpec:
        """The spec for ``name``; raises ModelNotFound when there is none."""

    def names(self) -> list[str]:
        """Names of models that could be loaded."""

    # optional: ``facts(name) -> CatalogFacts`` (or ``task(name) -> str | None``): what a model serves
    # and its digest, without loading it (``Engine._info``)


class Engine(AdapterMixin, LoadingMixin, SwapMixin, ResidencyMixin, ViewsMixin):
    """One shared engine: what is loaded, and the entry point for every generation."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        catalog: ModelCatalog | None = None,
        backends: Sequence[Backend] | None = None,
        quotas: QuotaConfig | None = None,
    ):
        self.config = config or EngineConfig()
        self._backend_options = BackendOptions.from_config(self.config)  # each model's, less its overrides
        self.fairness = FairnessPolicy.from_quotas(quotas)  # each runner's FairQueue reserve and window
        self.catalog = catalog
        self._backends = {b.name: b for b in backends} if backends else None
        self._runners: dict[str, ModelRunner] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._resolving: dict[str, asyncio.Future] = {}  # resolves under way, shared by their callers (loading.py)
        self._load_waiters: Counter[str] = Counter()  # requests awaiting each pending load
        self._unload_asks: Counter[str] = Counter()  # unloads asked for, by model (a load checks its files again)
        # why a model was last unloaded with a reason (a removal), until a load registers it again: the waiters of a
        # load it unloaded as it registered hear that reason too (loading.py, ``_load``)
        self._unload_reasons: dict[str, XllmError] = {}
        self._gpu_loads = asyncio.Lock()  # GPU loads run one at a time (see _gpu_turn)
        self._created = int(time.time())
        self._started = False
        self._stopped: XllmError | None = None  # set by stop(): why a load asked for from then on is refused
        self._retired_tokens = 0  # tokens of runners unloaded since start (stats() counts them on)
        self._retired_requests = (0, 0)  # (completed, cancelled) of those runners, counted on the same way
        self._defaults: dict[str, ModelfileDefaults] = {}  # a created model's Modelfile defaults, by name
        #: each model's loads and unloads since the engine was made ((name, "load" | "unload") -> count), counted as
        #: they happen: /metrics reads them, so a model evicted and loaded again between two scrapes shows in both
        self.residency_changes: Counter[tuple[str, str]] = Counter()
        self._embeddings = EmbeddingHost(changes=self.residency_changes)  # embedding models: own threads, no runner
        self._adapters: dict[str, str] = {}  # LoRA adapter name -> the loaded base model it is attached to
        c = self.config
        self._res: dict[str, Residency] = {}  # residency facts of loaded and loading models
        self._budget = MemoryBudget({"cpu": c.memory_budget_bytes, "cuda": c.gpu_memory_budget_bytes})
        self._grace = c.idle_grace_seconds
        self._load_wait = c.load_wait_seconds  # how long a load waits for models in use to free room
        self._held: Counter[str] = Counter()  # models whose new requests wait behind a load needing their room
        self._room_waits: set[str] = set()  # models whose load waits for models in use to free room
        self._default_keep_alive = parse_keep_alive(c.keep_alive, param="engine.keep_alive")
        self._replicas = parse_replicas(c.replicas)
        self._embed_expiry: dict[str, float | None] = {}
        self._reaper: asyncio.Task | None = None
        self._prompts = PromptLane()  # huge prompts tokenize on threads of their own, not the shared pool's
        gc_freeze.configure(c.gc_freeze)  # process-wide, like the collector: the last engine built decides

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start serving; preloads the models named in ``config.preload``."""
        self._started = True
        self._stopped = None
        self._embeddings.stopped = None  # (a restarted engine loads embedding models again)
        self._start_reaper()
        # the process's start-up (imports, config, handlers) lives as long as it does: out of the full collections.
        # Before the preloads, not after: a freeze then caught their models, whose unloads then had to walk every
        # frozen object (gc_freeze.is_frozen); a backend's first load freezes its own imports (gc_freeze.first_time)
        await asyncio.to_thread(gc_freeze.freeze)
        for name in map(canonical_name, self.config.preload):
            await self.load_any(name)
            rec = self._res.get(name)
            if rec is not None:  # (an embedding model has none: it never expires unless a request says so)
                rec.pinned = True  # preloaded models stay until unloaded or evicted, however often used
                self._touch(name)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(reap_forever(self))

    async def stop(self, reason: XllmError | None = None) -> None:
        """Cancel everything, stop every runner thread and release models.

        Requests still generating fail with ``reason`` (e.g. the server shutting down; default: the model was
        unloaded), so their clients get an error they can act on rather than a cut connection.
        """
        # first: a request already past the server's door (tokenizing, or waiting for a load cancelled below)
        # must get this error, not load a model into a stopping engine or see its wait cancelled as a 500
        self._stopped = reason or Overloaded("The engine was stopped; retry the request later")
        # then the store's pulls in flight: a first use that counted its pull after the server's own cancel_pulls
        # but read stop_reason before the line above was stopped by neither (first_use.py); `xllm run`'s LocalChat
        # and the hub service's failed start had no cancel_pulls at all
        cancel = getattr(self.catalog, "cancel_pulls", None)
        if cancel is not None:
            cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        loading = list(self._loading.values())
        for task in loading:  # loads in flight end here (what their threads load is unloaded when done)
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        runners = list(self._runners.values())
        self._runners.clear()
        self._res.clear()
        await asyncio.gather(*(run_slow(r.shutdown, reason=reason) for r in runners))
        await self._embeddings.stop(self._stopped)  # (its loads under way too: their requests get the same error)
        self._prompts.close()
        self._started = False

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._started

    @property
    def stop_reason(self) -> XllmError | None:
        """The error ``stop()`` gives requests, from the moment it begins; None while the engine serves (a server
        waiting on something else, e.g. a removal on a pull's lock, ends with it at a shutdown)."""
        return self._stopped

    def is_loading(self, name: str) -> bool:
        """True while model ``name`` (any spelling) is being loaded."""
        return canonical_name(name) in self._loading

    @property
    def healthy(self) -> bool:
        """False when any runner thread has died."""
        return all(r.alive for r in self._runners.values())

    # ------------------------------------------------------------------- models
    async def load_any(self, name: str, keep_alive: float | None = None) -> None:
        """Load ``name`` whatever its task (chat or embedding): preload and ``/admin/models/load``."""
        name = canonical_name(name)
        if name in self._embeddings.slots or (name in self._adapters and name not in self._loading):
            return  # (an adapter still being checked after its attach: waits for that below)
        if name not in self._runners:
            spec = await self._resolve_shared(name)  # (a first use pulls, or waits for a pull: off the shared pool)
            if spec.task == "embedding":
                await self._load_embedding(spec)
                self._expire_embedding(name, keep_alive)
                return
            await self.load(name)
        self._touch(name, "default" if keep_alive is None else (None if keep_alive < 0 else keep_alive))

    async def embed(self, model: str, inputs: Sequence[str] | Sequence[Sequence[int]],
                    keep_alive: float | None = None, *, user: str | None = None) -> EmbeddingResult:
        """Unit-length embeddings of ``inputs`` (texts or token-id lists) with embedding model ``model`` (huge texts
        are tokenized in ``user``'s turn in the prompt lane)."""
        model = canonical_name(model)
        slot = self._embeddings.slots.get(model)
        if slot is None:
            if model in self._runners:
                raise not_supported(model, "a chat model and cannot create embeddings")
            # a first use pulls the model, or waits for a pull of it under way: minutes, so off the shared pool, and
            # one wait for all such requests (one thread each held the slow pool too, stalling every other load)
            spec = await self._resolve_shared(model)
            if spec.task != "embedding":
                raise not_supported(model, "a chat model and cannot create embeddings")
            slot = await self._load_embedding(spec)
        result = await self._embeddings.embed(slot, inputs, functools.partial(self._prompts.run, user=user), user)
        self._expire_embedding(model, keep_alive)
        return result

    def _expire_embedding(self, name: str, keep_alive: float | None) -> None:
        """Embedding models stay loaded unless a request's keep_alive (>= 0) says otherwise."""
        if keep_alive is None:
            return
        self._embed_expiry[name] = None if keep_alive < 0 else time.time() + keep_alive
        self._start_reaper()

    def embedding_dimension(self, model: str) -> int | None:
        """The vector size of loaded embedding model ``model`` (None when it is not loaded)."""
        model = canonical_name(model)
        slot = self._embeddings.slots.get(model)
        return slot.model.dimension if slot is not None else None

    async def unload(self, name: str, reason: XllmError | None = None) -> bool:
        """Unload ``name``; False when it was not loaded. Its open requests fail with ``reason`` (None: a 503 saying
        it was unloaded, to retry; a removal says it is gone, as their retry would find).

        A pull or rm that changed a model's files calls this: a load of the model under way then reads its
        manifest again before it registers (``_files_unchanged``), and loads the new files if it changed.
        """
        name = canonical_name(name)
        if name in self._loading:
            self._unload_asks[name] += 1  # (only then: the counter stays as small as the loads under way)
        try:
            if name in self._embeddings.slots:  # (before the unload's await: a load meanwhile sets its own)
                # its request's keep_alive goes with it: a later load without one stays (the reaper would unload it)
                self._embed_expiry.pop(name, None)
            if await self._embeddings.unload(name, reason):
                return True
            if name in self._adapters:
                return await self.unload_adapter(name, reason)
            if name not in self._runners:
                return False
            if reason is not None:
                self._unload_reasons[name] = reason
            await self._evict(name, reason)
            return True
        finally:
            if isinstance(reason, ModelRemoved) and len(released_tokenizers.RELEASED):
                # its unload (now or at an earlier keep_alive) kept its tokenizer for a reload that will not come:
                # its memory goes with the model (the few others kept are read again if their models load)
                await asyncio.to_thread(released_tokenizers.RELEASED.clear)

    async def load_settled(self, name: str) -> None:
        """Wait until no load of ``name`` is under way, whether it loaded or failed (``xllm stop`` during a load)."""
        name = canonical_name(name)
        while (pending := self._loading.get(name) or self._embeddings.pending(name)) is not None:
            # asyncio.wait neither raises the load's error nor cancels the load if this wait is cancelled; a load
            # that registered its runner leaves ``_loading`` before its task ends: that is settled enough to unload
            await asyncio.wait([pending])

    def model_defaults(self, name: str) -> ModelfileDefaults:
        """The Modelfile defaults of loaded model ``name`` (empty if none)."""
        name = canonical_name(name)
        return self._defaults.get(name, NO_DEFAULTS) if name in self._runners or name in self._adapters else NO_DEFAULTS

    @staticmethod
    def _canonical(request: GenerationRequest) -> GenerationRequest:
        """``request`` naming its model as runners are kept (``TINY`` and ``tiny`` are one model)."""
        name = canonical_name(request.model)
        return request if name == request.model else dataclasses.replace(request, model=name)

    # --------------------------------------------------------------- prompting
    async def encode_chat(self, name: str, messages: Sequence[ChatMessage], tools: Sequence[dict] | None = None, *,
                          user: str | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Prompt token ids for a chat (and its ``tools``), through the model's chat template (a huge prompt waits its
        ``user``'s turn in the prompt lane; ``template_kwargs``: extra template variables)."""
        model = await self._load(name)
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if template_kwargs:  # (only when given: a backend without them keeps working)
            extra["template_kwargs"] = template_kwargs

        def work() -> list[int]:
            text = model.render_chat(messages, add_generation_prompt=True, **extra)
            return model.tokenize(text, add_special_tokens=False)

        with self._busy(canonical_name(name)):
            return await self._prompts.run(chat_chars(messages, tools), work, user=user)

    async def encode_text(self, name: str, text: str, *, user: str | None = None) -> list[int]:
        """Prompt token ids for raw text (legacy completions; a huge one waits its ``user``'s turn in the prompt lane)."""
        model = await self._load(name)
        with self._busy(canonical_name(name)):
            return await self._prompts.run(len(text), model.tokenize, text, add_special_tokens=True, user=user)

    async def check_constraint(self, name: str, constraint: Constraint, *, param: str = "response_format") -> None:
        """Compile ``constraint`` for model ``name`` on a worker thread; InvalidRequest (400) if it is invalid.

        Serving calls this before a request is queued (and before a stream starts), so a
        bad grammar is a plain 400; the compiled grammar is cached for the job itself.
        """
        model = await self._load(name)
        with self._busy(canonical_name(name)):
            await asyncio.to_thread(model.check_constraint, constraint, param=param)

    def validate(self, request: GenerationRequest) -> None:
        """Raise a 4xx error if ``request`` cannot run on its (loaded) model; a 503 if it was unloaded since."""
        request = self._canonical(request)
        asked = request.model
        request = self._route(request)
        runner = self._runners.get(request.model)
        if runner is None:
            # its request loaded it first (serving loads, tokenizes, then checks): an unload since then (an admin's,
            # a re-pull's or rm's) is a 503 to retry, as for one unloaded while it generates, not a 404 "does not exist"
            raise Overloaded(f"The model '{asked}' was unloaded while this request was prepared; retry the request")
        ctx = runner.model.context_length
        prompt = len(request.prompt_ids)
        if prompt == 0:
            raise InvalidRequest("The prompt is empty", param="messages")
        if prompt + request.params.max_tokens > ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt + request.params.max_tokens} tokens ({prompt} in the messages, "
                f"{request.params.max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        if request.params.n < 1:
            raise InvalidRequest("n must be at least 1", param="n")
        self._check_queue(request, runner)

    def _check_queue(self, request: GenerationRequest, runner: Any) -> None:
        """Overloaded (503) when ``request`` would pass ``engine.max_queue`` sequences, unless its user holds
        less than an equal share of the queue among the users with work on the model.

        One user's flood must not refuse everyone else: while the queue is full, a user holding fewer than
        ``max_queue / users`` sequences still gets in, so the queue holds at most about twice ``max_queue``.
        """
        limit, n, total = self.config.max_queue, request.params.n, len(runner)
        if total + n <= limit:
            return
        rec = self._res.get(request.model)
        held = rec.sequences if rec is not None else Counter()
        user = request.user or ""
        mine = held.get(user, 0)
        if mine + n <= max(1, limit // len(held.keys() | {user})):
            return
        # the caller's own figures only: how busy the model is (the total) is other users' activity
        if n > limit:
            raise Overloaded(f"The queue of model '{request.model}' holds {limit} sequences: a request for {n} "
                             f"never fits; ask for fewer (n)")
        raise Overloaded(f"The server is busy: the queue of model '{request.model}' is full ({mine} of its sequences "
                         f"are yours, and this request asks for {n} more); retry later")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[ChoiceDelta | GenerationDone]:
        """Stream ``ChoiceDelta``s for every choice, then one ``GenerationDone`` (with ``params.prompt_logprobs``,
        the prompt's ``PromptLogprobs`` before choice 0's first delta; with n > 1 another choice's may come first).

        Closing the iterator early (client left, cell interrupted) cancels all of the
        request's jobs; they leave the batch within one step.
        """
        request = self._canonical(request)
        await self._load(request.model)
        self.validate(request)
        request = self._route(request)  # an adapter's request runs in its base model's batch
        runner = self._runners.get(request.model)
        if runner is None:
            raise ModelNotFound(request.model)
        rec = self._res[request.model]
        handle = runner.submit(request, asyncio.get_running_loop())  # (raises if its thread died)
        rec.in_use += 1  # never evicted while this request runs
        rec.keep_alive = self._keep_alive_after(rec, request.keep_alive)  # (its expiry counts from now while it runs)
        user, n = request.user or "", request.params.n
        rec.sequences[user] += n  # the user's share of the queue (_check_queue)
        try:
            async for event in handle:
                yield event
        finally:
            handle.cancel()
            rec.in_use -= 1
            rec.sequences[user] -= n
            if rec.sequences[user] <= 0:
                del rec.sequences[user]
            self._finished(request.model, request.keep_alive)

    def _keep_alive_after(self, rec: Residency, keep_alive: float | None) -> float | None:
        """Seconds a request's end keeps its model loaded (its ``keep_alive``: None = the default, < 0 = forever)."""
        default = None if rec.pinned else self._default_keep_alive
        return default if keep_alive is None else (None if keep_alive < 0 else keep_alive)


__all__ = ["Engine", "ModelCatalog", "XllmError", "EngineError"]
