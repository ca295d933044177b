"""LoRA adapters served next to their base model: naming, attach/detach and routing.

An adapter is served under its own name (its store name, or the name given to
``load_adapter``); it names the base model it applies to. The base is loaded once and
every adapter attaches to that one loaded model, so requests for the base and for any
of its adapters share the base's runner and continuous batch: a request for an adapter
is routed to the base's runner with ``GenerationRequest.adapter`` set, and the backend
applies the adapter to that request's rows only.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InvalidRequest, ModelNotFound, ModelRemoved, Overloaded, XllmError, quoted
from ..core.slow_work import run_slow
from .first_use import resolve_pulled
from ..core.types import GenerationRequest, ModelInfo, ModelRuntime
from ..store.names import canonical_name, is_valid_name

if TYPE_CHECKING:
    from ..backends.base import LoadedModel, ModelSpec
    from ..core.types import ModelfileDefaults
    from .runner import ModelRunner


def base_gone(base: str, adapter: str, reason: XllmError | None) -> XllmError:
    """What a request for ``adapter`` gets when its base model went while the adapter loaded: ``reason`` the base's
    unload gave (a removal: a 404 naming the base; None: a 503 to retry)."""
    if isinstance(reason, ModelRemoved):
        gone = ModelNotFound(base)
        gone.message = (f"The base model '{quoted(base)}' of adapter '{quoted(adapter)}' was removed from the server "
                        "while the adapter loaded; the adapter cannot serve until its base is pulled again")
        return gone
    if reason is not None:
        return copy.copy(reason)  # (one instance raised in many requests would chain their tracebacks)
    return Overloaded(f"The base model '{quoted(base)}' of adapter '{quoted(adapter)}' was unloaded while the "
                      "adapter attached; retry the request")


class AdapterMixin:
    """Engine methods for LoRA adapters; the Engine owns ``_adapters`` (adapter name -> base name)."""

    _adapters: dict[str, str]
    residency_changes: Counter[tuple[str, str]]
    _runners: dict[str, "ModelRunner"]
    _unload_reasons: dict[str, XllmError]  # the Engine's: why each model was last unloaded (until it loads again)
    _defaults: dict[str, "ModelfileDefaults"]  # the Engine's: each served model's Modelfile defaults

    async def load_adapter(self, base: str, name: str, path: str | Path) -> "LoadedModel":
        """Load ``base`` if needed and attach the peft LoRA directory ``path`` to it as adapter ``name``."""
        base, name = canonical_name(base), canonical_name(name)
        if name == base or name in self._runners:
            raise InvalidRequest(f"'{name}' is already the name of a loaded model", param="model")
        if base in self._adapters:
            raise InvalidRequest(f"'{base}' is an adapter; an adapter applies to a base model", param="model")
        if self._adapters.get(name, base) != base:
            await self.unload_adapter(name)  # the same name on another base: move it
        model = await self.load(base)  # type: ignore[attr-defined]
        if base in self._adapters:  # a stored adapter: loading it attached it to its own base
            raise InvalidRequest(f"'{base}' is an adapter; an adapter applies to a base model", param="model")
        await run_slow(model.load_adapter, name, Path(path))  # (reads weights, may wait for a load's turn)
        runner = self._runners.get(base)
        if runner is None or runner.model is not model:
            # the base was unloaded (or removed) while the adapter attached: routed, the adapter named a base that
            # is gone, and its requests got the 503 "unloaded as it finished loading" whatever the cause
            raise base_gone(base, name, self._unload_reasons.get(base))
        self._defaults.pop(name, None)  # (a stored adapter's are set by ``_attach_spec``; one loaded by path has none)
        if self._adapters.get(name) != base:
            self.residency_changes[name, "load"] += 1
        self._adapters[name] = base
        return model

    async def _attach_spec(self, spec: "ModelSpec") -> "LoadedModel":
        """Attach the stored adapter ``spec`` (``task == "adapter"``) to its recorded base model."""
        if not spec.base_model:
            raise InvalidRequest(f"The adapter '{spec.name}' does not name its base model; pull it again "
                                 "with a base model given", param="model")
        resolved = False
        try:
            base = await resolve_pulled(self, spec.base_model)  # (a first use's pull awaited on the loop)
            resolved = True
            if base.task == "adapter":
                # adapters do not stack; found before loading, as the 503 "retry" its routing gave could never pass
                raise InvalidRequest(f"The base model '{quoted(spec.base_model)}' of adapter '{spec.name}' is itself "
                                     "a LoRA adapter; pull the adapter again with the model it applies to as its "
                                     "base (xllm pull ADAPTER --base MODEL)", param="model")
            model = await self.load_adapter(spec.base_model, spec.name, spec.path)
            self._defaults[spec.name] = spec.defaults  # (a model created FROM an adapter: its Modelfile settings)
            return model
        except ModelNotFound:  # only the base can be missing here: the adapter itself resolved
            if resolved:  # it was stored when the adapter's load began: removed since (a DELETE mid-load)
                raise base_gone(spec.base_model, spec.name, ModelRemoved(spec.base_model)) from None
            if not is_valid_name(spec.base_model):  # (a stored model's name could not be a path)
                # peft records the directory it trained on: a server path, not for every user who asks
                raise InvalidRequest(f"The adapter '{spec.name}' names its base model by a path or Hub id, not a "
                                     "stored model; pull it again with its base given (xllm pull ADAPTER --base MODEL, "
                                     "or the HTTP pull's \"base\" field)",
                                     param="model") from None
            raise InvalidRequest(f"The base model '{spec.base_model}' of adapter '{spec.name}' is not in the "
                                 "store; pull it under that name first", param="model") from None

    async def unload_adapter(self, name: str, reason: XllmError | None = None) -> bool:
        """Detach adapter ``name`` from its base (the base stays loaded); False when it was not attached. Its
        requests fail with ``reason`` (None: a 503 to retry)."""
        name = canonical_name(name)
        base = self._adapters.pop(name, None)
        if base is not None:
            self.residency_changes[name, "unload"] += 1
        runner = self._runners.get(base) if base is not None else None
        if runner is None:
            return False
        # first: the backend drops the adapter's jobs as it detaches it, and their clients must hear why (a 503
        # to retry, as for a base model unloaded under them), not an engine failure
        runner.retire_adapter(name, reason or Overloaded(f"The adapter '{name}' was unloaded while this request ran; "
                                                         "retry the request"))
        return await run_slow(runner.model.unload_adapter, name)

    def _route(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` aimed at the base's runner when its model is an attached adapter."""
        base = self._adapters.get(request.model)
        if base is None:
            return request
        return dataclasses.replace(request, model=base, adapter=request.model)

    def _adapter_info(self, name: str, base: str) -> ModelInfo:
        # no digest: replaced below, and reading it costs a manifest read on every /metrics and /admin/stats poll
        info = self._info(base, with_digest=False)  # type: ignore[attr-defined]
        details = {"base_model": base, "format": "lora", "mode": info.details.get("mode")}
        # the base's load and batching: an adapter's requests run in its batch
        shared = info.runtime or ModelRuntime()
        # and its keep_alive: the adapter leaves memory with its base (`xllm ps` UNTIL said forever)
        runtime = ModelRuntime(running=shared.running, queued=shared.queued, max_batch_size=shared.max_batch_size,
                               expires_at=shared.expires_at)
        # digest None: ``_info`` reads the adapter's own (its store manifest's), not the base's it was given above
        return dataclasses.replace(info, name=name, details=details, runtime=runtime, task="adapter", default=False,
                                   digest=None)
