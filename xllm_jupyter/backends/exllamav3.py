"""The exllamav3 backend: EXL3 and FP16/BF16 safetensors models on CUDA GPUs.

exllamav3's ``Generator`` batches continuously without flash-attn, deduplicates prompt
pages (prefix caching), supports a draft model or n-gram drafting (speculative decoding),
quantized K/V caches and tensor parallelism. The library is imported lazily; its CUDA
kernels compile on first use (see ``jit.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

from ..core.errors import EngineError
from ..core.types import SamplingParams, SequenceJob
from .base import ModelSpec
from .exllama_common import (
    ExllamaBackend,
    ExllamaOptions,
    config_eos,
    cuda_memory_in_use,
    draft_vocabulary_fits,
    exllama_cache_estimate,
    guarded_load,
    is_model_directory,
    library_keywords,
    wants_cpu,
)
from .exllama_model import DynamicGeneratorModel
from .exllama_sampling import AnswerPenaltiesV3, v3_sampler
from .exllama_stream import StreamHeldV3, check_receive_sample
from .hf_tokenizer import ChatTokenizer
from .prefix_isolation import IsolatedJobV3

log = logging.getLogger(__name__)

#: store formats this backend loads
FORMATS = ("exl3", "safetensors")
#: the oldest exllamav3 whose top-p keeps the token that crosses P, as OpenAI's and HF's do (1.6.0-1.6.2 left it
#: out); the [exl3] extra asks for it, this refuses an older install at load rather than sample differently
MIN_VERSION = (1, 6, 3)
#: Prefill every waiting prompt in full at the next iteration. exllamav3's defaults ingest one
#: prompt per 5 iterations while others decode, which smooths inter-token latency for one
#: user but, measured with 16-64 concurrent requests arriving over HTTP, delayed the first
#: token by 2-3 s and halved throughput. A shared server serves many users: TTFT wins.
PREFILL_SETTINGS = {"prefill_cooldown": 0, "max_chunk_size": 2048, "shared_chunk_size": 2048}
#: ``Generator`` settings older supported releases lack: 1.6.3 prefills every waiting prompt in full at every
#: iteration, which is what PREFILL_SETTINGS asks of 1.6.4 on (left out there, not an error)
OPTIONAL_GENERATOR_KEYWORDS = ("prefill_cooldown", "shared_chunk_size")


class ExllamaV3Backend(ExllamaBackend):
    """Loads models with exllamav3."""

    name = "exllamav3"
    # (the architectures' modules: ``Config.from_directory`` imports them all at a load's start)
    load_modules = ("exllamav3.architecture.architectures", "exllamav3.generator.filter.llguidance",
                    "exllamav3.generator.sampler.custom", "exllamav3.version")

    def cache_bytes_estimate(self, spec: ModelSpec) -> int:
        """The paged KV cache it allocates at load (a full context and ``context_reserve`` past it), a draft model."""
        return exllama_cache_estimate(spec, context_reserve)

    def supports(self, spec: ModelSpec) -> bool:
        """EXL3 models, and FP16/BF16 safetensors chat models of an architecture exllamav3 implements (not on
        ``engine.device: cpu``).

        Another architecture goes to the next backend (transformers) instead of failing to load.
        """
        path = Path(spec.path)
        if wants_cpu(spec) or not (spec.task == "chat" and spec.format in FORMATS and is_model_directory(path)):
            return False
        known = known_architectures()
        return spec.format == "exl3" or not known or model_architecture(path) in known

    def load(self, spec: ModelSpec) -> ExllamaV3Model:
        """Load weights, cache and generator (slow; called on a worker thread)."""
        from .jit import import_with_kernels

        import_with_kernels("exllamav3")
        from exllamav3 import Generator, Tokenizer
        from exllamav3.version import __version__

        check_library_version(__version__)

        opts = ExllamaOptions.from_options(spec.options, spec.context_length)
        check_library_api(f"exllamav3 {__version__}", opts)
        path = Path(spec.path)
        before = cuda_memory_in_use(opts.tensor_parallel)

        def loaded(on_gpu: list[Any]) -> tuple[Any, Any, int, Any, Any, Any]:
            nonlocal opts
            opts = drafting_options(opts, path)  # before the cache is sized: no window for a draft never loaded
            config, model, cache, cache_tokens = open_model(path, opts)
            draft = _load_draft(opts, cache_tokens, _load_kwargs(opts), int(config.vocab_size), on_gpu)
            on_gpu.append(model)
            model.load(**_load_kwargs(opts))
            warm_up_kernels(model, cache, opts)
            tokenizer = Tokenizer.from_config(config)
            generator = Generator(model=model, cache=cache, tokenizer=tokenizer,
                                  **library_generator_kwargs(Generator, opts, draft, f"exllamav3 {__version__}"))
            return config, model, cache_tokens, draft, tokenizer, generator

        config, model, cache_tokens, draft, tokenizer, generator = guarded_load(loaded, spec.name, "exllamav3", spec.created_from)
        prepare_grammar_tokenizer(tokenizer)
        return build_model(spec, path, config=config, opts=opts, cache_tokens=cache_tokens, model=model,
                           tokenizer=tokenizer, draft=draft, generator=generator,
                           memory_bytes=cuda_memory_in_use(opts.tensor_parallel) - before)


def check_library_version(version: str) -> None:
    """EngineError unless ``version`` (exllamav3's ``__version__``) is at least MIN_VERSION."""
    parts = re.findall(r"\d+", version)[:3]
    if tuple(int(x) for x in parts) < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        raise EngineError(f"exllamav3 {version} is older than {wanted}, which this backend needs (its top_p "
                          f"sampling matches OpenAI's from {wanted} on): pip install -U 'exllamav3>={wanted}'")


def check_library_api(library: str, opts: ExllamaOptions) -> None:
    """EngineError naming the keyword, before minutes of loading, when the installed exllamav3 (``library``: name
    and version) does not declare a keyword this backend passes: its ``Generator`` and ``Job`` ignore unknown
    ones silently (``library_keywords``)."""
    from exllamav3 import Cache, Generator, Job, Model

    library_generator_kwargs(Generator, opts, None, library)
    library_keywords(Job.__init__, job_kwargs(SequenceJob(0, (0,), 1, SamplingParams()), sampler=None, filters=None),
                     library=library, what="Job")
    check_receive_sample(Job, StreamHeldV3, library)
    library_keywords(getattr(Model, "load_gen", None) or Model.load, _load_kwargs(opts), library=library,
                     what="Model.load")
    # (k_bits / v_bits go on to the quantized cache layer's constructor, which declares them)
    library_keywords(Cache.__init__, {"max_num_tokens": 0, **_cache_kwargs(opts)}, library=library, what="Cache",
                     optional=("k_bits", "v_bits"))


def library_generator_kwargs(generator_class: Any, opts: ExllamaOptions, draft: tuple[Any, Any] | None,
                             library: str) -> dict[str, Any]:
    """``generator_kwargs`` that ``generator_class`` declares (OPTIONAL_GENERATOR_KEYWORDS left out where it lacks
    them; any other missing one is an EngineError)."""
    return library_keywords(generator_class.__init__, generator_kwargs(opts, draft), library=library,
                            what="Generator", optional=OPTIONAL_GENERATOR_KEYWORDS)


@functools.lru_cache(maxsize=1)
def known_architectures() -> frozenset[str]:
    """The ``architectures`` names exllamav3 implements, read from its sources: importing it may compile
    its CUDA kernels for minutes, and backend selection runs on the event loop. Empty if not found."""
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    names: set[str] = set()
    for source in (Path(list(spec.submodule_search_locations)[0]) / "architecture").glob("*.py"):
        try:
            names.update(re.findall(r'arch_string\s*=\s*"([^"]+)"', source.read_text(encoding="utf-8")))
        except OSError:
            continue
    return frozenset(names)


def model_architecture(path: Path) -> str | None:
    """The model's architecture as its ``config.json`` names it (exllamav3 reads the first of one)."""
    try:
        names = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return str(names[0]) if len(names) == 1 else None


def open_model(path: Path, opts: ExllamaOptions, cache_tokens: int = 0) -> tuple[Any, Any, Any, int]:
    """Config, unloaded model and the cache to create before loading (sized from config unless given)."""
    from exllamav3 import Cache, Config, Model

    config = Config.from_directory(str(path))
    cache_tokens = cache_tokens or opts.cache_size(_context_length(opts, config), context_reserve(opts))
    model = Model.from_config(config)
    return config, model, Cache(model, max_num_tokens=cache_tokens, **_cache_kwargs(opts)), cache_tokens


def _context_length(opts: ExllamaOptions, config: Any) -> int:
    """The configured context length, else the model's, within a configured cache size."""
    return opts.serving_context(int(getattr(config, "max_position_embeddings", 0) or 4096), context_reserve(opts))


def drafting_options(opts: ExllamaOptions, path: Path) -> ExllamaOptions:
    """``opts`` as the load will draft: without ``engine.draft_model`` when the draft's vocabulary does not fit the
    model's (``draft_vocabulary_fits`` logs why), so that neither the cache (``context_reserve``, ``max_history``) nor
    the context served sets a draft window aside for a draft that is never loaded."""
    if not opts.draft_model_path:
        return opts
    from exllamav3 import Config

    draft_vocab = int(Config.from_directory(opts.draft_model_path).vocab_size)
    if draft_vocabulary_fits(draft_vocab, int(Config.from_directory(str(path)).vocab_size)):
        return opts
    return dataclasses.replace(opts, draft_model_path=None)


def context_reserve(opts: ExllamaOptions) -> int:
    """Cache tokens exllamav3 keeps free past a job's last token: one, and the draft window when drafting.

    ``Job.prepare_for_queue`` cuts ``max_new_tokens`` to the cache less the prompt, one token and the draft
    window, so a cache of exactly one context ended a job that filled the context that many tokens early.
    """
    return 1 + (opts.num_draft_tokens if (opts.draft_model_path or opts.ngram_draft) else 0)


def generator_kwargs(opts: ExllamaOptions, draft: tuple[Any, Any] | None) -> dict[str, Any]:
    """``Generator`` arguments besides model, cache and tokenizer: batch, drafting, prefill schedule."""
    return dict(
        max_batch_size=opts.max_batch_size,
        draft_model=draft[0] if draft else None, draft_cache=draft[1] if draft else None,
        num_draft_tokens=opts.num_draft_tokens if (draft or opts.ngram_draft) else None,
        # a draft model wins over n-gram drafting (the library takes one of them), as on exllamav2
        ngram_match_min=0 if draft else opts.ngram_draft, **PREFILL_SETTINGS,
    )


def build_model(spec: ModelSpec, path: Path, *, config: Any, opts: ExllamaOptions, cache_tokens: int, model: Any,
                tokenizer: Any, draft: tuple[Any, Any] | None, generator: Any, memory_bytes: int) -> ExllamaV3Model:
    """Our LoadedModel over a loaded exllamav3 model and its generator (chat template, EOS ids, details)."""
    chat = ChatTokenizer.from_directory(str(path), spec.name)
    eos = chat.eos_ids(getattr(config, "eos_token_id_list", None), getattr(config, "eos_token_id", None),
                       *config_eos(path))
    speculative = None
    if draft or opts.ngram_draft:
        speculative = {"method": "draft_model" if draft else "ngram", "num_draft_tokens": opts.num_draft_tokens,
                       "ngram_min_match": None if draft else opts.ngram_draft}
    details = {
        "backend": "exllamav3", "format": spec.format, "device": "cuda", "mode": "paged",
        "batching": "continuous", "max_batch_size": opts.max_batch_size, "cache_tokens": cache_tokens,
        "kv_cache": opts.kv_cache_bits, "tensor_parallel": opts.tensor_parallel, "speculative": speculative,
    }
    return ExllamaV3Model(
        spec, generator=generator, chat=chat, context_length=_context_length(opts, config),
        vocab_size=int(config.vocab_size), eos_token_ids=eos, max_batch_size=opts.max_batch_size,
        memory_bytes=memory_bytes, details=details, model=model, tokenizer=tokenizer, draft=draft,
    )


def _cache_kwargs(opts: ExllamaOptions) -> dict[str, Any]:
    """Cache layer type and bits for the configured KV cache storage, and the batch it serves."""
    # the cache's recurrent-state slots cap the generator's batch for recurrent models (the
    # library's default is 16, whatever engine.max_batch_size says)
    kwargs: dict[str, Any] = {"max_batch_size": opts.max_batch_size}
    if opts.draft_model_path or opts.ngram_draft:
        # recurrent (and sliding-window) models roll back a speculative pass through this history;
        # the library refuses drafting without it (other models ignore it)
        kwargs["max_history"] = opts.num_draft_tokens
    bits = opts.kv_bits()
    if bits is None:
        return kwargs
    from exllamav3.cache.quant import CacheLayer_quant

    return {**kwargs, "layer_type": CacheLayer_quant, "k_bits": bits[0], "v_bits": bits[1]}


def _load_kwargs(opts: ExllamaOptions) -> dict[str, Any]:
    """Auto-split (default), an explicit per-GPU split, or tensor parallelism.

    The auto-split reserves room for the activations of the batch and prefill chunk the generator runs
    (``Model.load_gen``'s ``max_batch_size`` defaults to 1: a split sized for one sequence can run out of
    memory on the first full batch).
    """
    kwargs: dict[str, Any] = {"progressbar": False, "max_batch_size": opts.max_batch_size,
                              "max_chunk_size": PREFILL_SETTINGS["max_chunk_size"]}
    if opts.tensor_parallel:
        kwargs["tensor_p"] = True
    if opts.gpu_split:
        kwargs["use_per_device"] = list(opts.gpu_split)
    return kwargs


def _load_draft(opts: ExllamaOptions, cache_tokens: int, load_kwargs: dict[str, Any], vocab_size: int,
                on_gpu: list[Any] | None = None) -> tuple[Any, Any] | None:
    """The draft model and its cache (same size as the main cache, as exllamav3 requires); None without one,
    or when its vocabulary is not the model's (``engine.draft_model`` serves every model)."""
    if not opts.draft_model_path:
        return None
    config, model, cache, _ = open_model(Path(opts.draft_model_path), opts, cache_tokens)
    if not draft_vocabulary_fits(int(config.vocab_size), vocab_size):
        return None
    if on_gpu is not None:
        on_gpu.append(model)
    model.load(**load_kwargs)
    return model, cache


def warm_up_kernels(model: Any, cache: Any, opts: ExllamaOptions) -> None:
    """exllamav3's own warm-up, as its loader runs it: Triton compiles and GEMM autotuning at load, not in the
    first users' requests. Before the generator exists (the passes write into the cache's first pages);
    a pass that fails is the library's to report, and a warm-up that fails costs only speed."""
    try:
        failed = model.warmup(cache=cache, max_chunk_size=PREFILL_SETTINGS["max_chunk_size"],
                              max_batch_size=min(8, opts.max_batch_size))
    except Exception:
        log.warning("exllamav3: the kernel warm-up failed; the first requests compile what it would have",
                    exc_info=True)
        return
    if failed:
        log.warning("exllamav3: warm-up passes that failed: %s", ", ".join(map(str, failed)))


def prepare_grammar_tokenizer(tokenizer: Any) -> None:
    """Build llguidance's view of the tokenizer now, on the loading thread: the first constrained request
    would otherwise build it on the engine thread (about a second for a 150k vocabulary, every stream
    waiting)."""
    try:
        from exllamav3.generator.filter.llguidance import (
            create_ll_tokenizer,
            llguidance_available,
        )

        if llguidance_available:
            create_ll_tokenizer(tokenizer)  # cached by the library for its filters
    except Exception:  # constrained decoding then builds it on first use, as before
        log.debug("building llguidance's tokenizer at load failed", exc_info=True)


def job_kwargs(job: SequenceJob, *, sampler: Any, filters: list[Any] | None) -> dict[str, Any]:
    """exllamav3 ``Job`` arguments for ``job`` (``check_library_api`` checks the same keywords at load)."""
    import torch

    return dict(
        input_ids=torch.tensor([job.prompt_ids], dtype=torch.long),
        max_new_tokens=job.max_tokens,
        sampler=sampler,
        seed=job.sampling.seed,
        stop_conditions=sorted(job.stop_token_ids),
        return_probs=job.logprobs,
        return_top_tokens=job.top_logprobs,
        filters=filters,
        identifier=job.job_id,
        # a job keeping tool-call markup (keep_special) gets every special token's text: step() takes the others out
        decode_special_tokens=bool(job.keep_special),
    )


class ExllamaV3Model(DynamicGeneratorModel):
    """A model decoding through exllamav3's ``Generator``."""

    backend_name = "exllamav3"
    isolation_mixin = IsolatedJobV3
    # held tokens streamed, in the step that samples them
    job_mixins = (StreamHeldV3, AnswerPenaltiesV3)

    def __init__(self, spec: ModelSpec, *, model: Any, tokenizer: Any, draft: tuple[Any, Any] | None, **kw: Any):
        super().__init__(spec, **kw)
        self._model = model
        self._tokenizer = tokenizer
        self._draft = draft

    def make_job(self, job: SequenceJob) -> Any:
        """An exllamav3 ``Job`` with our sampling, stop tokens, logprobs and grammar."""
        from exllamav3 import Job

        filters = None
        if job.constraint is not None:
            from exllamav3.generator.filter.llguidance import LLGuidanceFilter

            filters = [LLGuidanceFilter(self._tokenizer, llg_grammar=self.grammar(job.constraint),
                                        eos_after_completed=True)]
        native = self.job_class(Job)(**job_kwargs(self.library_job(job), sampler=v3_sampler(job.sampling),
                                                         filters=filters))
        native.xllm_bind_penalties(len(job.prompt_ids))
        native.xllm_bind_stream(self.stream_bytes(job))
        return native

    def free_pages(self) -> int:
        """Unreferenced pages of the page table."""
        return int(self.generator.pagetable.num_unreferenced_pages())

    def total_pages(self) -> int:
        """Pages of the page table."""
        return int(self.generator.pagetable.max_pages)

    def tokens_held(self, job: SequenceJob) -> int:
        """Prompt, answer, the end token and a draft window past it (as ``Job.prepare_for_queue``)."""
        return len(job.prompt_ids) + job.max_tokens + 1 + int(self.generator.max_draft_tokens or 0)

    def page_size(self) -> int:
        """exllamav3's fixed page size."""
        from exllamav3.constants import PAGE_SIZE

        return int(PAGE_SIZE)

    def _release(self) -> None:
        try:
            self.generator.close()
        except Exception:
            log.debug("closing the exllamav3 generator failed", exc_info=True)
        for model in (self._model, self._draft[0] if self._draft else None):
            if model is not None:
                try:
                    model.unload()
                except Exception:
                    log.debug("unloading exllamav3 weights failed", exc_info=True)
        self.generator = None
        self._model = self._draft = None

