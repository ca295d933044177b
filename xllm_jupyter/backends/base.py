"""The Backend contract every inference library is adapted to.

A ``Backend`` turns a ``ModelSpec`` into a ``LoadedModel``. A ``LoadedModel`` is driven
by exactly one engine thread: ``add``/``cancel``/``step`` are only ever called from
that thread, so backends need no locking for them. Tokenizer methods
(``tokenize``/``detokenize``/``render_chat``) may be called from other threads
while the engine thread steps, so they must be thread-safe.

Continuous batching happens here: jobs ``add``-ed between two ``step`` calls join the
running batch at the next step (their prefill runs in that step).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..core.config import EngineConfig
from ..core.errors import EngineError, Unsupported
from ..core.types import ChatMessage, Constraint, ModelfileDefaults, SequenceJob, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendOptions:
    """The settings a backend loads a model with: the engine's (docs/configuration.md), built once by the
    engine, with a model's own overrides applied by ``with_overrides``."""

    device: str = "auto"
    dtype: str = "auto"
    torch_threads: int = 0
    max_batch_size: int = 16
    cache_tokens: int = 0
    kv_cache_bits: str = "fp16"
    tensor_parallel: bool = False
    #: GB per GPU, as config gives them (strings) or as numbers; exllama's options check them
    gpu_split: tuple[str | float, ...] = ()
    num_draft_tokens: int = 4
    ngram_draft: int = 0
    compile: str = "auto"
    #: the weights of ``engine.draft_model`` (resolved in the store); None: no draft model
    draft_model_path: str | None = None
    #: a created model's Modelfile ADAPTER, merged into its weights at load
    merge_adapter: str | None = None
    #: the compiled path's torch.compile backend ("eager" traces without code generation: tests, benchmarks)
    compile_backend: str = "inductor"

    @classmethod
    def from_config(cls, config: EngineConfig) -> BackendOptions:
        """The engine settings a backend reads (``draft_model_path`` is per model: the engine sets it)."""
        c = config
        return cls(device=c.device, dtype=c.dtype, torch_threads=c.torch_threads, max_batch_size=c.max_batch_size,
                   cache_tokens=c.cache_tokens, kv_cache_bits=c.kv_cache_bits, tensor_parallel=c.tensor_parallel,
                   gpu_split=c.gpu_split, num_draft_tokens=c.num_draft_tokens, ngram_draft=c.ngram_draft,
                   compile=c.compile)

    def with_overrides(self, overrides: Mapping[str, Any]) -> BackendOptions:
        """These options with ``overrides`` applied; EngineError names an unknown option or a value of the
        wrong type (before minutes of loading, not in the middle of them)."""
        if not overrides:
            return self
        hints = typing.get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in hints:
                raise EngineError(f"Unknown backend option '{key}' (known: {', '.join(hints)})")
            hint = hints[key]
            if isinstance(value, list) and typing.get_origin(hint) is tuple:
                value = tuple(value)
            if not _is_a(value, hint):
                raise EngineError(f"Backend option '{key}' must be {_type_name(hint)}, not {type(value).__name__}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type ``hint`` (a bool is not an int here; tuple items are the reader's to check)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """``hint`` in an error message: "int", "str or None", "a list"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    return "None" if hint is type(None) else hint.__name__


@dataclass(frozen=True)
class ModelSpec:
    """What a backend needs to load a model: where it is and how to run it.

    ``path`` is a directory (HF safetensors / EXL2 / EXL3) or a single file (GGUF).
    ``format`` is one of ``safetensors``, ``gguf``, ``exl3``, ``exl2``, ``gptq``.
    ``backend`` forces a backend by name; ``None`` means choose automatically.
    ``options`` are the settings the backend loads it with: the engine's, with this model's
    ``overrides`` applied (``Engine._resolve``).
    """

    name: str
    path: Path
    format: str = "safetensors"
    backend: str | None = None
    context_length: int | None = None
    options: BackendOptions = field(default_factory=BackendOptions)
    #: this model's own settings (``BackendOptions`` names) over the engine's: a created model's ADAPTER
    overrides: Mapping[str, Any] = field(default_factory=dict)
    digest: str | None = None
    #: "chat" (text generation) or "embedding"; decides which engine path loads it
    task: str = "chat"
    #: a created model's Modelfile defaults for serving (PARAMETER, SYSTEM, MESSAGE)
    defaults: ModelfileDefaults = field(default_factory=ModelfileDefaults)
    #: for a LoRA adapter (``task == "adapter"``): the store name of the model it applies to
    base_model: str | None = None
    #: a model made by ``xllm create`` or ``cp``: the model it was made from (a failed load says to create it again)
    created_from: str | None = None


class LoadedModel(ABC):
    """A model in memory that decodes batches of ``SequenceJob``s step by step."""

    #: the model's served name
    name: str
    #: the backend's registry name (e.g. "transformers")
    backend_name: str
    #: max prompt + completion tokens per sequence
    context_length: int
    #: token ids that end a sequence (EOS, end-of-turn)
    eos_token_ids: frozenset[int]
    #: how many jobs may decode in one step
    max_batch_size: int
    #: size of the output vocabulary (valid token ids are 0..vocab_size-1)
    vocab_size: int
    #: honours ``SequenceJob.prompt_logprobs`` (scores a prompt's tokens in its prefill); a backend that
    #: cannot leaves it False and the engine refuses such jobs rather than drop the scores
    scores_prompts: bool = False

    @abstractmethod
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (thread-safe)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, special tokens skipped (thread-safe)."""

    @abstractmethod
    def render_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True, tools: Sequence[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text the model's chat template makes of ``messages`` (and ``tools``, if any) (thread-safe);
        ``template_kwargs``: extra variables for the template (vLLM's ``chat_template_kwargs``)."""

    def chat_template(self) -> str | None:
        """The chat template's source, for feature detection (tool support, call format); None if unknown."""
        return None

    def warm_up(self) -> None:
        """Compile or record what the first steps would otherwise wait for (engine thread, before any step).

        It runs on the thread that will step the model because some of that work belongs to
        its thread: torch's CUDA graph trees, for one, keep their graphs per thread.
        """

    @abstractmethod
    def add(self, job: SequenceJob) -> None:
        """Queue a job; it joins the batch at the next ``step`` (engine thread only)."""

    @abstractmethod
    def cancel(self, job_id: int) -> None:
        """Stop a job; the next ``step`` frees its cache and emits its final event (engine thread only)."""

    @abstractmethod
    def step(self) -> list[TokenEvent]:
        """Run one step for every active job: prefill new ones, decode one token each.

        Returns one event per job that produced a token or finished. A job's last event
        has ``finish`` set (STOP for EOS/stop token, LENGTH at max_tokens or context
        end, CANCELLED after ``cancel``) and the job's token counts.
        """

    def drop_failed(self, suspects: frozenset[int]) -> frozenset[int] | None:
        """Called once after every ``step`` that raised, before anything else: drop the jobs to blame and
        return their ids, a non-empty part of ``suspects`` (the jobs added since the last step that
        returned), so that the others step again with no token lost or repeated (engine thread only).

        None: the backend cannot tell who to blame or cannot resume. This default, for backends whose
        failed step may have left the running jobs half advanced: the engine then fails every job.
        """
        return None

    @abstractmethod
    def active_jobs(self) -> int:
        """Jobs added and not yet finished."""

    def admission_budget(self) -> int | None:
        """Room for new jobs now, in ``admission_cost`` units; None when only the batch limit counts.

        The engine adds a job only while its cost fits, so jobs never wait inside a backend's
        own (first-come) queue, where the engine's per-user fairness could not reach them
        (engine thread only).
        """
        return None

    def admission_cost(self, job: SequenceJob) -> int:
        """The room ``job`` takes until it ends, in the units of ``admission_budget``."""
        return 0

    def admission_check(self) -> Callable[[SequenceJob], bool] | None:
        """A claim-as-you-go test for the jobs the engine wants to add now, in order (None: the batch limit
        only): True claims room for the job, False leaves it waiting (engine thread only).

        This default spends ``admission_budget`` by ``admission_cost``. An idle model takes the next
        job whatever the count says (the backend starts or refuses it), so a misjudged count can delay
        jobs but never stall the queue.
        """
        budget = self.admission_budget()
        if budget is None:
            return None
        idle = not self.active_jobs()

        def fits(job: SequenceJob) -> bool:
            nonlocal budget, idle
            cost = self.admission_cost(job)
            if cost > budget and not idle:
                return False
            budget -= cost
            idle = False
            return True

        return fits

    def check_constraint(self, constraint: Constraint, *, param: str = "response_format") -> None:
        """Compile ``constraint`` now (any thread); InvalidRequest (400) if it is invalid or unsupported."""
        raise Unsupported(f"The {self.backend_name} backend does not support constrained decoding", param=param)

    def prepare_constraints(self) -> None:
        """Build what constrained decoding needs per model (the grammar engine's tokenizer) now: the
        engine calls it on the loading thread, so no request pays for it (or stalls the IOLoop with it)."""

    def load_adapter(self, name: str, path: Path) -> None:
        """Attach the LoRA adapter at ``path`` as ``name`` (any thread; waits for the current step)."""
        raise Unsupported(f"The {self.backend_name} backend does not support LoRA adapters", param="model")

    def unload_adapter(self, name: str) -> bool:
        """Detach adapter ``name`` (its running jobs end with an error); False when it is not attached."""
        return False

    def memory_bytes(self) -> int:
        """Bytes of weights plus cache this model holds (best effort)."""
        return 0

    def details(self) -> dict[str, Any]:
        """Backend-specific facts for `/v1/models` details and `xllm ps` (mode, dtype, device)."""
        return {}

    def unload(self) -> None:
        """Release weights and caches; the object is unusable afterwards."""


class Backend(ABC):
    """Adapts one inference library: says whether it can run a model and loads it."""

    #: registry name used in config/manifests ("transformers", "exllamav3", ...)
    name: str
    #: True when a model's memory is spread over every visible GPU (exllama's auto-split), not one device
    splits_over_gpus: bool = False

    @abstractmethod
    def available(self) -> bool:
        """True when the library imports on this machine (must not raise)."""

    @abstractmethod
    def supports(self, spec: ModelSpec) -> bool:
        """True when this backend can load ``spec``'s format."""

    @abstractmethod
    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load the model (slow: called on a worker thread, never the IOLoop)."""

    def import_libraries(self, spec: ModelSpec) -> bool:
        """Import what a load of ``spec`` imports (the engine does this before a backend's first load, so that
        what the imports made is frozen and the model, loaded after, is not); True when done, False when this
        backend has no such step (its first load then runs as one block). Must not raise."""
        return False

    def cache_bytes_estimate(self, spec: ModelSpec) -> int:
        """Bytes a load of ``spec`` allocates besides its weight files (a KV cache sized at load, a draft
        model), estimated before loading for the memory budget; 0 when the cache grows with use instead
        (must not raise)."""
        return 0

    def memory_device(self, spec: ModelSpec) -> str | None:
        """Which memory a load of ``spec`` draws on (``"cuda"`` or ``"cpu"``); None: where its ``device``
        option says."""
        return None


def unload_each(models: Iterable[Any]) -> None:
    """Call ``unload()`` on each of ``models``, logging what fails: freeing is best effort, and one model's
    failure must not keep the others loaded."""
    for model in models:
        try:
            model.unload()
        except Exception:
            log.exception("unloading %s failed", getattr(model, "name", type(model).__name__))
