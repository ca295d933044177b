"""What the engine can tell about its models: listings, one model's info, counters.

Read-only views over the Engine's tables. ``/v1/models`` runs them on a worker thread
(the catalog reads the disk) while the IOLoop loads and unloads, so each table is read
with ``.get()`` or copied first, never checked and then indexed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import ModelNotFound
from ..core.types import CatalogFacts, EngineStats, ModelfileDefaults, ModelInfo, ModelRuntime, UserSequences
from ..store.names import canonical_name
from .manager import Residency, replica_stats, runner_memory_bytes


def shown_expiry(rec: Residency) -> int | None:
    """When keep_alive unloads the model (None: never). While a request uses it, its keep_alive from now: the
    countdown restarts when the request ends, so the expiry its last use set (past, in a long request) would be wrong.
    Ollama's ``ps`` does so for a model whose countdown has not started (its first request)."""
    if rec.in_use:
        return None if rec.keep_alive is None else int(time.time() + rec.keep_alive)
    return None if rec.expires_at is None else int(rec.expires_at)


class ViewsMixin:
    """Engine methods that describe models and count their work; the Engine owns the tables they read."""

    _runners: dict[str, Any]
    _defaults: dict[str, ModelfileDefaults]
    _res: dict[str, Residency]
    _adapters: dict[str, str]
    _embeddings: Any
    _embed_expiry: dict[str, float | None]
    _loading: dict[str, Any]
    _room_waits: set[str]
    _created: int
    _retired_tokens: int
    _retired_requests: tuple[int, int]
    catalog: Any
    config: Any
    _adapter_info: Callable[[str, str], ModelInfo]  # AdapterMixin's

    def is_loaded(self, name: str) -> bool:
        """True when ``name`` is loaded now."""
        name = canonical_name(name)
        return name in self._runners or name in self._embeddings.slots or name in self._adapters

    def _info(self, name: str, *, with_digest: bool = True) -> ModelInfo:
        info = self._plain_info(name)
        # clients pick a default (a chat model, the configured one first) from these two
        task = info.task or info.details.get("task") or ("chat" if name in self._runners else None)
        default = bool(self.config.default_model) and name == canonical_name(self.config.default_model)
        digest = info.digest
        # the defaults a loaded model's (or attached adapter's: its own, not its base's) requests get, read at its load
        defaults = self._defaults.get(name, ModelfileDefaults()) if name in self._runners or name in self._adapters \
            else None
        # the catalog reads a manifest from disk: only when asked for (the polled, loaded-only views skip it)
        if task is None or (with_digest and digest is None):
            facts = self._catalog_facts(name)
            task = task or facts.task
            if with_digest:  # lets every caller (not only admins, who may read manifests) record which weights answered
                digest = digest or facts.digest
            if defaults is None and name not in self._adapters:
                defaults = facts.defaults
        return dataclasses.replace(info, task=task, default=default, digest=digest, defaults=defaults)

    def _catalog_facts(self, name: str) -> CatalogFacts:
        """What the catalog says of ``name`` (its task and digest); nothing when it has no ``facts``."""
        lookup = getattr(self.catalog, "facts", None)
        if lookup is not None:
            return lookup(name)
        task = getattr(self.catalog, "task", None)  # a catalog that knows tasks only
        return CatalogFacts(task=task(name) if task is not None else None)

    def _plain_info(self, name: str) -> ModelInfo:
        # .get(), never `in` then [name]: listings run on a worker thread while the IOLoop unloads
        slot = self._embeddings.slots.get(name)
        if slot is not None:
            info = slot.info()
            # when a request's keep_alive unloads it (`xllm ps` UNTIL, as for chat models); None: it stays
            expiry = self._embed_expiry.get(name)
            if expiry is None or info.runtime is None:
                return info
            return dataclasses.replace(info, runtime=dataclasses.replace(info.runtime, expires_at=int(expiry)))
        base = self._adapters.get(name)
        if base is not None:
            return self._adapter_info(name, base)
        runner = self._runners.get(name)
        if runner is None:
            loading = ModelRuntime(state="loading", waiting_for_room=name in self._room_waits) \
                if name in self._loading else None
            return ModelInfo(name=name, created=self._created, loaded=False, runtime=loading)
        m = runner.model
        stats = runner.stats()
        rec = self._res.get(name) or Residency()
        runtime = ModelRuntime(
            memory_bytes=runner_memory_bytes(runner) or rec.memory_bytes,  # live: an eager KV cache grows
            running=stats.running,
            queued=stats.queued,
            max_batch_size=runner.max_batch_size,
            replicas=tuple(replica_stats(runner)),
            last_used=int(rec.last_used),
            in_use=rec.in_use,
            expires_at=shown_expiry(rec),
        )
        return ModelInfo(
            name=name,
            created=runner.created,
            loaded=True,
            backend=m.backend_name,
            context_length=m.context_length,
            details=m.details(),
            runtime=runtime,
        )

    def list_models(self) -> list[ModelInfo]:
        """Loaded models first, then every other model the catalog can load."""
        names = list(self._runners) + list(self._adapters) + list(self._embeddings.slots)
        if self.catalog is not None:
            names += [n for n in self.catalog.names() if n not in names]
        return [self._info(n) for n in names]

    def loaded_models(self, *, include_loading: bool = False) -> list[ModelInfo]:
        """Only the models in memory now (and, if asked, those being loaded: ``runtime.state == "loading"``)."""
        loading = [n for n in self._loading if n not in self._runners] if include_loading else []
        # no digests: /metrics and /admin/stats poll this on the IOLoop, and neither shows one
        return [self._info(n, with_digest=False)
                for n in list(self._runners) + list(self._adapters) + list(self._embeddings.slots) + loading]

    def model_info(self, name: str) -> ModelInfo:
        """One model's info; raises ModelNotFound if it is neither loaded nor loadable."""
        name = canonical_name(name)
        if name in self._runners or name in self._embeddings.slots or name in self._adapters:
            return self._info(name)
        if self.catalog is not None and name in self.catalog.names():
            return self._info(name)
        raise ModelNotFound(name)

    # ------------------------------------------------------------------- stats
    def user_counts(self, model: str | None = None) -> dict[str, UserSequences]:
        """Each user's sequences over every loaded model, or on ``model`` only ("" for anonymous requests)."""
        if model is not None:
            name = canonical_name(model)
            runner = self._runners.get(self._adapters.get(name, name))  # an adapter's requests run on its base
            return runner.user_counts() if runner is not None else {}
        return UserSequences.summed(r.user_counts() for r in list(self._runners.values()))

    def stats(self, name: str | None = None) -> EngineStats:
        """Counters for one model, or summed over all loaded models."""
        name = canonical_name(name) if name else name
        name = self._adapters.get(name or "", name)
        runner = self._runners.get(name) if name else None
        runners = [runner] if runner is not None else list(self._runners.values())
        parts = [r.stats() for r in runners]
        return EngineStats(
            running=sum(p.running for p in parts),
            queued=sum(p.queued for p in parts),
            steps=sum(p.steps for p in parts),
            max_batch=max((p.max_batch for p in parts), default=0),
            batched_steps=sum(p.batched_steps for p in parts),
            # the all-models counters go on across unloads (a counter read by /admin/stats never goes back)
            completed=sum(p.completed for p in parts) + (self._retired_requests[0] if runner is None else 0),
            cancelled=sum(p.cancelled for p in parts) + (self._retired_requests[1] if runner is None else 0),
            failed_steps=sum(p.failed_steps for p in parts),
            isolated_failures=sum(p.isolated_failures for p in parts),
            tokens=sum(p.tokens for p in parts) + (self._retired_tokens if runner is None else 0),
        )
