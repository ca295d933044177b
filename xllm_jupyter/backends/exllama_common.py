"""What the exllamav3 and exllamav2 adapters share, free of CUDA so it is unit-tested on CPU.

Both libraries' dynamic generators take jobs with a sampler, stop conditions and an
identifier, and return per-step result dicts (``stage: streaming``, ``token_ids``,
``text``, ``eos``/``eos_reason``, timing and cache counters). This module maps our
``SamplingParams`` and options onto their settings (``exllama_results`` maps their results onto ``TokenEvent``s).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from ..core import gc_freeze
from ..core.errors import EngineError, ModelLoadError
from ..core.types import SamplingParams
from .base import Backend, BackendOptions, ModelSpec, unload_each
from .compile_gate import empty_cuda_cache
from .memory_estimate import disk_bytes, kv_cache_bytes
from .torch_device import is_out_of_memory, out_of_memory, release_memory

log = logging.getLogger(__name__)
T = TypeVar("T")

#: both libraries allocate the KV cache in pages of this many tokens
PAGE_SIZE = 256
#: cache size when none is configured: room for 64 sequences of 1k tokens
DEFAULT_CACHE_TOKENS = 65536

#: (cache_tokens, context) pairs whose capped context was logged already
_CAPPED_CONTEXTS: set[tuple[int, int]] = set()

#: quantized KV cache names -> (key bits, value bits)
KV_CACHE_BITS: dict[str, tuple[int, int]] = {"q8": (8, 8), "q6": (6, 6), "q4": (4, 4)}


@dataclass(frozen=True)
class ExllamaOptions:
    """The engine settings an exllama backend reads, validated (see docs/configuration.md)."""

    max_batch_size: int = 16
    cache_tokens: int = 0
    kv_cache_bits: str = "fp16"
    tensor_parallel: bool = False
    gpu_split: tuple[float, ...] = ()
    draft_model_path: str | None = None
    num_draft_tokens: int = 4
    ngram_draft: int = 0
    context_length: int | None = None

    @classmethod
    def from_options(cls, options: BackendOptions, context_length: int | None = None) -> ExllamaOptions:
        """Check a ModelSpec's options for exllama; EngineError names the setting that is wrong."""
        try:
            split = tuple(float(x) for x in options.gpu_split)
        except (TypeError, ValueError) as exc:
            raise EngineError("engine.gpu_split must list GB per GPU as numbers, e.g. [20, 24]") from exc
        opts = cls(
            max_batch_size=max(1, options.max_batch_size or 16),
            cache_tokens=options.cache_tokens,
            kv_cache_bits=(options.kv_cache_bits or "fp16").strip().lower(),
            tensor_parallel=options.tensor_parallel,
            gpu_split=split,
            draft_model_path=options.draft_model_path or None,
            num_draft_tokens=max(1, options.num_draft_tokens or 4),
            ngram_draft=max(0, options.ngram_draft),
            context_length=int(context_length) if context_length else None,
        )
        opts.kv_bits()  # validate now, before minutes of loading
        if opts.cache_tokens < 0:
            raise EngineError("engine.cache_tokens must be >= 0")
        return opts

    def kv_bits(self) -> tuple[int, int] | None:
        """(key bits, value bits) of a quantized cache, or None for fp16."""
        name = self.kv_cache_bits
        if name in ("fp16", "16", ""):
            return None
        if name in KV_CACHE_BITS:
            return KV_CACHE_BITS[name]
        try:
            k, v = (int(x) for x in name.split(","))
        except ValueError:
            raise EngineError(f"engine.kv_cache_bits '{name}' is not one of fp16, q8, q6, q4 or 'K,V' bits") from None
        if not (2 <= k <= 8 and 2 <= v <= 8):
            raise EngineError("engine.kv_cache_bits: key and value bits must be between 2 and 8")
        return k, v

    def serving_context(self, model_context: int, reserve: int = 0) -> int:
        """The context to serve: the configured one, else the model's, never more than a configured cache
        holds (so ``cache_tokens`` bounds the memory a long-context model takes), less the ``reserve`` cache
        tokens the library keeps free past a job's last token (``cache_size``)."""
        context = self.context_length or int(model_context)
        if self.cache_tokens and self.cache_tokens - reserve < context:
            served = max(1, self.cache_tokens - reserve)
            if (self.cache_tokens, context) not in _CAPPED_CONTEXTS:  # (asked several times per load: say it once)
                _CAPPED_CONTEXTS.add((self.cache_tokens, context))
                log.warning("engine.cache_tokens (%d) holds less than the context length (%d): serving %d tokens "
                            "of context", self.cache_tokens, context, served)
            context = served
        return context

    def cache_size(self, context_length: int, reserve: int = 0) -> int:
        """KV cache tokens: the configured size (or the default), at least one full context and the ``reserve``
        tokens past it, whole pages.

        ``reserve``: what the library keeps free past a job's last token (exllamav3: one token and the draft
        window), so that a job of a full context still gets every token it asks for.
        """
        tokens = max(self.cache_tokens or DEFAULT_CACHE_TOKENS, context_length + reserve)
        return -(-tokens // PAGE_SIZE) * PAGE_SIZE


def exllama_cache_estimate(spec: Any, reserve: Callable[[ExllamaOptions], int] = lambda opts: 0,
                           draft_cache_quantized: bool = True,
                           cache_tokens: Callable[[ExllamaOptions, Mapping[str, Any], int], int] | None = None) -> int:
    """What an exllama backend allocates at load for ``spec`` besides its weights: the KV cache (from its
    options and ``config.json``, ``reserve(opts)`` tokens past a full context: ``ExllamaOptions.cache_size``;
    or ``cache_tokens(opts, config, window)``, ``window`` the tokens drafted per step, 0 without drafting) and,
    with ``engine.draft_model``, the draft's weights and its cache of the same size (stored as the model's
    unless not ``draft_cache_quantized``: exllamav2 gives a draft an FP16 cache). A draft whose vocabulary
    is larger than the model's is not loaded (``draft_vocabulary_fits``), so not counted."""
    try:
        config = _read_config(Path(spec.path))
        opts = ExllamaOptions.from_options(spec.options, spec.context_length)
        text = config.get("text_config") or config
        draft = Path(opts.draft_model_path) if opts.draft_model_path else None
        draft_config = _read_config(draft) if draft is not None else None
        if draft_config is not None and not _vocabulary_within(draft_config, config):
            # not loaded: no weights, no cache of its own, and no draft window set aside (``reserve(opts)``)
            draft = draft_config = None
            opts = dataclasses.replace(opts, draft_model_path=None)
        window = opts.num_draft_tokens if (draft is not None or opts.ngram_draft) else 0
        if cache_tokens is not None:
            tokens = cache_tokens(opts, config, window)
        else:
            context = opts.serving_context(int(text.get("max_position_embeddings") or 4096), reserve(opts))
            tokens = opts.cache_size(context, reserve(opts))
        bits = opts.kv_bits()
        total = kv_cache_bytes(config, tokens, bits)
        if draft is not None and draft_config is not None:  # both loaders give the draft a cache as large as the model's
            total += disk_bytes(draft) + kv_cache_bytes(draft_config, tokens, bits if draft_cache_quantized else None)
        return total
    except (OSError, ValueError, TypeError, EngineError):  # an estimate: the load itself reports what is wrong
        return 0


def _vocabulary_within(draft: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
    """Whether a draft's ``config.json`` vocabulary fits the model's (True when either does not say)."""
    sizes = [(c.get("text_config") or c).get("vocab_size") or c.get("vocab_size") for c in (draft, model)]
    return None in sizes or int(sizes[0]) <= int(sizes[1])


class ExllamaBackend(Backend):
    """What both exllama backends share: CUDA only, a model auto-split over the visible GPUs, a KV cache
    allocated whole at load. ``name`` is also the library's import name."""

    splits_over_gpus = True
    #: the library's modules a load imports that importing the library does not (``import_libraries``)
    load_modules: tuple[str, ...] = ()

    @property
    def library(self) -> str:
        """The library's import name (the tests' stand-in backends have names of their own)."""
        return self.name.split("-")[0]

    def available(self) -> bool:
        """The library is installed and a CUDA GPU is visible."""
        return importlib.util.find_spec(self.name) is not None and cuda_available()

    def import_libraries(self, spec: ModelSpec) -> bool:
        """Import what a load imports: the library with its CUDA extension (built first where none is:
        ``jit.import_ahead``), its ``load_modules`` and the tokenizer's classes, so that the engine freezes
        what the imports made and the model, loaded after, is not frozen with them (core/gc_freeze.py).
        False when the library itself fails to import: its error is kept for the load, which raises it as it
        always did (the first load then runs as one block). Never raises."""
        from .jit import import_ahead

        if not self.available() or not import_ahead(self.library):
            return False
        # each on its own: one that fails (llguidance not installed, say) is the load's to report, not the others'
        for step in [*(functools.partial(importlib.import_module, m) for m in self.load_modules),
                     functools.partial(import_tokenizer_side, Path(spec.path))]:
            try:
                step()
            except Exception:
                log.debug("an import ahead of loading %s failed", spec.name, exc_info=True)
        return True

    def cache_bytes_estimate(self, spec: ModelSpec) -> int:
        """The paged KV cache it allocates at load (``cache_tokens`` at the configured K/V bits), a draft model."""
        return exllama_cache_estimate(spec)

    def memory_device(self, spec: ModelSpec) -> str:
        """GPU memory, whatever ``engine.device`` says (auto-split over the visible GPUs)."""
        return "cuda"


def import_tokenizer_side(path: Path) -> None:
    """What ``ChatTokenizer.from_directory`` imports reading a model's tokenizer: transformers' tokenizer classes,
    and the configuration module of the model's type (``AutoTokenizer`` reads ``config.json``; transformers 5 then
    imports its activations, hub kernels and flash-attn integration: 0.5 s of imports with flash-attn installed)."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    from .quiet_loading import library_bars_off

    if (path / "config.json").is_file():
        with library_bars_off():
            AutoConfig.from_pretrained(str(path))


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=64)
def _keywords_of(fn: Callable[..., Any]) -> frozenset[str]:
    """The keyword names ``fn`` declares (not what a ``**kwargs`` of it swallows)."""
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def library_keywords(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, library: str, what: str,
                     optional: Iterable[str] = ()) -> dict[str, Any]:
    """``kwargs`` for the library's ``fn`` (a constructor, say), checked against its signature before anything loads.

    The exllama generators and jobs take ``**kwargs`` and ignore what they do not know, so a keyword renamed in a
    release would change serving silently (no logprobs, no drafting). A keyword ``fn`` does not declare is an
    EngineError naming ``library`` (name and version) and ``what``, unless it is in ``optional`` (settings older
    supported releases lack, like exllamav3's ``prefill_cooldown`` before 1.6.4): those are left out.
    """
    named = _keywords_of(fn)
    optional = frozenset(optional)
    missing = [k for k in kwargs if k not in named and k not in optional]
    if missing:
        raise EngineError(f"{library}: {what} takes no {', '.join(repr(k) for k in missing)}; this xllm does not "
                          f"support that release of the library (see the [exl3]/[exl2] extras for the versions)")
    dropped = [k for k in kwargs if k not in named]
    if dropped:
        log.debug("%s: %s has no %s (left out)", library, what, ", ".join(dropped))
    return {k: v for k, v in kwargs.items() if k in named}


def wants_cpu(spec: Any) -> bool:
    """True when ``engine.device`` (or the model's own) is the CPU, where exllama cannot run."""
    return spec.options.device.strip().lower() == "cpu"


def draft_vocabulary_fits(draft_vocab: int, vocab: int) -> bool:
    """Whether a draft model's token ids all exist in the model; logs why drafting is off when not.

    A draft's ids past the model's embedding would fault the GPU. A smaller draft vocabulary is
    fine (Qwen's small models pad theirs to 151,936 ids, the large ones to 152,064: same tokenizer).
    """
    if draft_vocab <= vocab:
        return True
    log.warning("engine.draft_model has a vocabulary of %d tokens, more than this model's %d: speculative "
                "decoding is off for it", draft_vocab, vocab)
    return False


#: exllamav2 0.3.2 samples greedily below this temperature (``sample_basic``: top-k 1 at temperature 1); the
#: transformers backend (and OpenAI) sample at any temperature above 0, so below it the job divides the logits
#: itself and gives the library 1.0 (``exllama_sampling.LogitsV2``)
V2_MIN_TEMPERATURE = 0.01


def v2_sampler_fields(s: SamplingParams) -> dict[str, Any]:
    """exllamav2 ``ExLlamaV2Sampler.Settings`` attributes for ``s``: the temperature, or top-k 1 when greedy.

    The rest stays off here: the job applies the penalties, ``logit_bias`` and the top-k/top-p/min-p cuts
    itself (``exllama_sampling.py``), since the library's one penalty window would count the prompt for
    presence/frequency too and its top-p leaves out the token that crosses P; and a temperature below
    V2_MIN_TEMPERATURE, which the library would turn into greedy decoding.
    """
    greedy = s.greedy
    return {
        "temperature": 1.0 if greedy or s.temperature < V2_MIN_TEMPERATURE else float(s.temperature),
        "top_k": 1 if greedy else 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "token_repetition_penalty": 1.0,
        "token_frequency_penalty": 0.0,
        "token_presence_penalty": 0.0,
    }


def cuda_available() -> bool:
    """True when torch is installed with a usable CUDA device (never raises)."""
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver or torch build counts as no CUDA
        log.debug("torch.cuda.is_available() failed", exc_info=True)
        return False


def is_model_directory(path: Path) -> bool:
    """A directory with a ``config.json`` (what both exllama loaders read)."""
    return path.is_dir() and (path / "config.json").is_file()


def guarded_load(build: Callable[[list[Any]], T], name: str, library: str, created_from: str | None = None) -> T:
    """``build(on_gpu)``: a load that appends each model it puts on the GPU to ``on_gpu``. If it raises, those
    models are unloaded and the error becomes an EngineError naming the library (a bug's own error is raised
    as it is), or a 503 when the GPUs ran out of memory, raised only once the error, whose frames hold the
    cache, is gone, so that its memory can be given back first."""
    on_gpu: list[Any] = []
    try:
        return build(on_gpu)
    except Exception as exc:
        unload_quietly(on_gpu)  # whatever failed (a draft's settings, say): nothing may stay on the GPU
        if not is_out_of_memory(exc):
            if isinstance(exc, (OSError, ValueError, KeyError, RuntimeError, AssertionError)):
                raise ModelLoadError.of(name, library, exc, created_from) from exc
            raise
    on_gpu.clear()
    release_memory()
    raise out_of_memory(name, "cuda", "its weights and KV cache")


def unload_quietly(models: Iterable[Any]) -> None:
    """Unload what a failed load put on the GPU (the error's traceback would keep it there until collected)."""
    unload_each(models)
    free_cuda_memory()


def free_cuda_memory() -> None:
    """Collect garbage, then return torch's cached CUDA memory (best effort: never raises)."""
    try:
        gc_freeze.collect()  # unfreezes first: cycles among frozen objects are never collected
        empty_cuda_cache()
    except Exception:
        log.debug("emptying the CUDA cache failed", exc_info=True)


def cuda_memory_in_use(all_processes: bool = False) -> int:
    """Bytes allocated by torch on every visible CUDA device; with ``all_processes``, what the devices have
    in use by anyone (exllamav3's tensor parallelism loads every device but one in worker processes)."""
    import torch

    devices = range(torch.cuda.device_count())
    if all_processes:
        return sum(total - free for free, total in (torch.cuda.mem_get_info(d) for d in devices))
    return sum(torch.cuda.memory_allocated(d) for d in devices)


def config_eos(path: Path) -> list[Any]:
    """EOS ids named by ``generation_config.json`` (end-of-turn ids live there for many chat models)."""
    try:
        return [json.loads((path / "generation_config.json").read_text()).get("eos_token_id")]
    except (OSError, ValueError):
        return []
