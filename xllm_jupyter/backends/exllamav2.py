"""The exllamav2 backend: EXL2, GPTQ and FP16 safetensors models on CUDA GPUs.

exllamav2's dynamic generator batches continuously only in paged mode, which needs
flash-attn. Without it the generator runs unpaged: one sequence at a time. We detect
that, say so once in the log, expose the mode in ``/v1/models`` and ``xllm ps``, and
let the engine queue the other requests (max batch size 1), so none fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
    v2_sampler_fields,
    wants_cpu,
)
from .exllama_model import DynamicGeneratorModel
from .exllama_sampling import AnswerPenaltiesV2, LogitsV2, RawLogprobsV2
from .exllama_stream import StreamHeldV2, check_receive_sample
from .exllamav2_plan import LENGTH_DEPENDENT_ROPE, estimated_cache_tokens, plan_cache
from .hf_tokenizer import ChatTokenizer
from .prefix_isolation_v2 import IsolatedJobV2

log = logging.getLogger(__name__)

#: store formats this backend loads
FORMATS = ("exl2", "gptq", "safetensors")
#: exllamav2 quantizes its cache only symmetrically
_CACHE_CLASSES = {None: "ExLlamaV2Cache", (8, 8): "ExLlamaV2Cache_Q8", (6, 6): "ExLlamaV2Cache_Q6",
                  (4, 4): "ExLlamaV2Cache_Q4"}
#: tokens the generator takes per job and step at most (its ``max_q_size`` default, the width of its logits buffer:
#: the last token and up to seven drafts); it bounds the batch through the model's input size (``q_size``)
MAX_Q_SIZE = 8
#: the most tokens drafted per step we let exllamav2 take (``engine.num_draft_tokens``)
MAX_DRAFT_TOKENS = 8
_warned_unpaged = False


def paged_attention_available() -> bool:
    """True when flash-attn with paged attention (2.5.7 or later) is importable (exllamav2's batching needs it)."""
    try:
        from exllamav2 import attn

        # (has_flash_attn alone, flash-attn 2.2.1-2.5.6, is refused by the generator's paged mode)
        return bool(getattr(attn, "has_flash_attn_with_paged", False))
    except Exception:  # a broken flash-attn build: unpaged mode, and the log says why
        log.debug("exllamav2's flash-attn probe failed", exc_info=True)
        return False


#: transformers 5's ``rope_parameters`` -> the ExLlamaV2Config attributes exllamav2 sets from the same keys of
#: transformers 4's ``rope_scaling``, per rope type: (``alt_rope_method``, {key: attribute})
ROPE_ATTRIBUTES: dict[str, tuple[str | None, dict[str, str]]] = {
    "linear": (None, {"factor": "scale_pos_emb"}),
    "llama3": ("llama3", {"factor": "l3_rope_factor", "low_freq_factor": "l3_rope_low_freq_factor",
                          "high_freq_factor": "l3_rope_high_freq_factor",
                          "original_max_position_embeddings": "l3_rope_original_max_position_embeddings"}),
    "yarn": ("yarn", {"factor": "yarn_rope_factor",
                      "original_max_position_embeddings": "yarn_rope_original_max_position_embeddings"}),
    "mrope": (None, {"mrope_section": "mrope_section"}),
}


def apply_rope_parameters(config: Any, path: Path) -> None:
    """RoPE settings of a ``config.json`` saved by transformers 5, onto exllamav2's config.

    exllamav2 0.3.2 reads ``rope_theta`` and ``rope_scaling`` only; transformers 5 writes both
    as ``rope_parameters``, so such a model (a Llama 3.1 saved today, say) would silently run
    with the architecture's default base and no scaling: wrong text past the first tokens.
    A rope type we cannot map is an EngineError, not a wrong model.
    """
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for scope in (raw, raw.get("text_config") or {}):
        params = scope.get("rope_parameters")
        if isinstance(params, dict) and not scope.get("rope_scaling"):  # (with rope_scaling the library has it all)
            break
    else:
        return
    if "rope_type" not in params and isinstance(params.get("full_attention"), dict):
        # per layer type (Gemma 3): the global layers' settings are the ones rope_scaling held; sliding
        # layers keep the architecture's own base, as exllamav2 sets them
        params = params["full_attention"]
    if "rope_theta" in params and "rope_theta" not in scope:
        config.rotary_embedding_base = float(params["rope_theta"])
    # two settings transformers 5 moved in beside the rope type
    if "partial_rotary_factor" in params and "partial_rotary_factor" not in scope:
        config.partial_rotary_factor = float(params["partial_rotary_factor"])
    if "mrope_section" in params:
        config.mrope_section = params["mrope_section"]
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return
    if kind not in ROPE_ATTRIBUTES:
        raise EngineError(f"exllamav2 cannot apply rope_type '{kind}' as transformers 5 saves it (rope_parameters); "
                          "use the exllamav3 or transformers backend for this model")
    method, attributes = ROPE_ATTRIBUTES[kind]
    try:
        for key, attribute in attributes.items():
            setattr(config, attribute, params[key])
    except KeyError as exc:
        raise EngineError(f"config.json: rope_parameters of type '{kind}' lack '{exc.args[0]}'") from None
    if method:
        config.alt_rope_method = method


def warn_unpaged_once() -> None:
    """Log (once per process) that exllamav2 runs one sequence at a time here."""
    global _warned_unpaged
    if not _warned_unpaged:
        _warned_unpaged = True
        log.warning("exllamav2: flash-attn is not installed, so its generator runs unpaged (one sequence at a "
                    "time); other requests wait in the queue. Install flash-attn for continuous batching.")


class ExllamaV2Backend(ExllamaBackend):
    """Loads models with exllamav2."""

    name = "exllamav2"
    load_modules = ("exllamav2.generator", "exllamav2.version")

    def cache_bytes_estimate(self, spec: ModelSpec) -> int:
        """The KV cache it allocates at load (``plan_cache``: paged, or one context unpaged), and a draft model
        with its cache (FP16: ``open_draft``)."""
        return exllama_cache_estimate(spec, draft_cache_quantized=False, cache_tokens=estimated_cache_tokens)

    def supports(self, spec: ModelSpec) -> bool:
        """EXL2, GPTQ or FP16 safetensors chat models in a directory (not on ``engine.device: cpu``)."""
        return (not wants_cpu(spec) and spec.task == "chat" and spec.format in FORMATS
                and is_model_directory(Path(spec.path)))

    def load(self, spec: ModelSpec) -> ExllamaV2Model:
        """Load weights, cache and generator (slow; called on a worker thread)."""
        from .jit import import_with_kernels

        exllamav2 = import_with_kernels("exllamav2")
        from exllamav2.generator import ExLlamaV2DynamicGenerator
        from exllamav2.version import __version__

        opts = ExllamaOptions.from_options(spec.options, spec.context_length)
        library = f"exllamav2 {__version__}"
        check_library_api(library, opts)
        if opts.tensor_parallel:
            raise EngineError("engine.tensor_parallel is supported by the exllamav3 backend only")
        bits = opts.kv_bits()
        if bits not in _CACHE_CLASSES:
            raise EngineError("exllamav2 quantizes its KV cache symmetrically only: use fp16, q8, q6 or q4")
        path = Path(spec.path)
        before = cuda_memory_in_use()

        def loaded(on_gpu: list[Any]) -> tuple[Any, int, Any, int, bool, Any, Any]:
            nonlocal opts
            opts = drafting_options(exllamav2, opts, path)  # the limits, the window and q_size follow a draft in use
            config, ctx, model, cache, cache_tokens, paged = open_model(exllamav2, path, opts,
                                                                        paged_attention_available())
            check_limits(opts, config, paged)
            if not paged:
                warn_unpaged_once()
            on_gpu.append(model)
            if opts.gpu_split:
                model.load(gpu_split=list(opts.gpu_split))
                cache = type(cache)(model, max_seq_len=cache_tokens)
            else:
                model.load_autosplit(cache)
            tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
            draft = _load_draft(exllamav2, opts, cache_tokens, paged, config.max_seq_len, int(config.vocab_size),
                                on_gpu)
            generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, **library_keywords(
                ExLlamaV2DynamicGenerator.__init__, generator_kwargs(opts, ctx, paged, draft), library=library,
                what="ExLlamaV2DynamicGenerator"))
            return config, ctx, model, cache_tokens, paged, draft, generator

        config, ctx, model, cache_tokens, paged, draft, generator = guarded_load(loaded, spec.name, "exllamav2", spec.created_from)
        return build_model(spec, path, config=config, opts=opts, ctx=ctx, paged=paged, cache_tokens=cache_tokens,
                           model=model, draft=draft, generator=generator, memory_bytes=cuda_memory_in_use() - before)


def check_library_api(library: str, opts: ExllamaOptions) -> None:
    """EngineError naming the keyword, before minutes of loading, when the installed exllamav2 (``library``: name
    and version) does not declare a keyword this backend passes: its generator and jobs ignore unknown ones
    silently (``library_keywords``)."""
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    library_keywords(ExLlamaV2DynamicGenerator.__init__, generator_kwargs(opts, 4096, True, None), library=library,
                     what="ExLlamaV2DynamicGenerator")
    library_keywords(ExLlamaV2DynamicJob.__init__, job_kwargs(SequenceJob(0, (0,), 1, SamplingParams()), None, 1),
                     library=library, what="ExLlamaV2DynamicJob")
    check_receive_sample(ExLlamaV2DynamicJob, StreamHeldV2, library)
    library_keywords(ExLlamaV2Sampler.Settings.__init__, v2_sampler_fields(SamplingParams()), library=library,
                     what="ExLlamaV2Sampler.Settings")


def job_kwargs(job: SequenceJob, settings: Any, max_new_tokens: int) -> dict[str, Any]:
    """``ExLlamaV2DynamicJob`` arguments for ``job`` (``check_library_api`` checks the same keywords at load)."""
    import torch

    return dict(
        input_ids=torch.tensor([job.prompt_ids], dtype=torch.long),
        max_new_tokens=max_new_tokens,
        gen_settings=settings,
        seed=job.sampling.seed,
        stop_conditions=sorted(job.stop_token_ids),
        return_probs=job.logprobs,
        return_top_tokens=job.top_logprobs,
        identifier=job.job_id,
        # a job keeping tool-call markup (keep_special) gets every special token's text: step() takes the others out
        decode_special_tokens=bool(job.keep_special),
    )


def open_model(exllamav2: Any, path: Path, opts: ExllamaOptions,
               paged: bool) -> tuple[Any, int, Any, Any, int, bool]:
    """Config, context length, unloaded model, its lazy cache of the configured storage, cache tokens, and
    whether the generator runs paged (``paged`` unless the architecture's overrides turned flash-attn off)."""
    config = exllamav2.ExLlamaV2Config(str(path))
    apply_rope_parameters(config, path)
    config.arch_compat_overrides()
    paged = paged and not config.no_flash_attn
    plan = plan_cache(opts, int(config.max_seq_len or 4096), paged=paged,
                      window=draft_window(opts),
                      length_fixed=config.alt_rope_method in LENGTH_DEPENDENT_ROPE
                      or bool(config.arch.lm.keys.get("learned_pos_emb")))
    # the cache, and prefill chunks below 2,048 tokens (the model's input size follows the context),
    # must be whole pages; we serve ``plan.context`` tokens of it
    config.max_seq_len = plan.seq_len
    if not paged:
        config.no_flash_attn = True
    model = exllamav2.ExLlamaV2(config)
    cache = getattr(exllamav2, _CACHE_CLASSES[opts.kv_bits()])(model, max_seq_len=plan.cache_tokens, lazy=True)
    return config, plan.context, model, cache, plan.cache_tokens, paged


def drafting_options(exllamav2: Any, opts: ExllamaOptions, path: Path) -> ExllamaOptions:
    """``opts`` as the load will draft: without ``engine.draft_model`` when the draft's vocabulary does not fit the
    model's (``open_draft`` would not load it; ``draft_vocabulary_fits`` logs why), so that neither the limits on
    drafting (``check_limits``), the generator's input size (``q_size``) nor the cache (``draft_window``) follow a
    draft that is never loaded: ``num_draft_tokens`` past 8 refused the load, and a wider ``max_q_size`` a batch."""
    if not opts.draft_model_path:
        return opts
    draft_vocab = int(exllamav2.ExLlamaV2Config(opts.draft_model_path).vocab_size)
    if draft_vocabulary_fits(draft_vocab, int(exllamav2.ExLlamaV2Config(str(path)).vocab_size)):
        return opts
    return dataclasses.replace(opts, draft_model_path=None)


def draft_window(opts: ExllamaOptions) -> int:
    """Tokens the generator will draft per step: ``num_draft_tokens`` with n-gram drafting or a draft model (one
    that loads: ``drafting_options``), else 0."""
    return opts.num_draft_tokens if (opts.draft_model_path or opts.ngram_draft) else 0


def q_size(opts: ExllamaOptions) -> int:
    """The generator's ``max_q_size`` for ``opts``: its default, or, drafting, the last token and the whole window.

    exllamav2 0.3.2 checks only ``num_draft_tokens <= max_q_size``, but a drafting step feeds a job its last
    token and the window, and copies their logits into a buffer ``max_q_size`` wide: 8 drafts in the default 8
    failed every drafting step (a tensor size mismatch).
    """
    drafting = bool(opts.draft_model_path or opts.ngram_draft)
    return max(MAX_Q_SIZE, opts.num_draft_tokens + 1) if drafting else MAX_Q_SIZE


def check_limits(opts: ExllamaOptions, config: Any, paged: bool) -> None:
    """The generator's limits on drafting and batch, as EngineErrors that name the setting (before the weights load)."""
    if (opts.draft_model_path or opts.ngram_draft) and opts.num_draft_tokens > MAX_DRAFT_TOKENS:
        raise EngineError(f"engine.num_draft_tokens must be at most {MAX_DRAFT_TOKENS} on the exllamav2 backend")
    # the model's input size, which loading clamps to the context; unpaged, the batch is one job
    max_input = min(int(config.max_input_len), int(config.max_seq_len)) * int(config.max_batch_size)
    if paged and opts.max_batch_size * q_size(opts) > max_input:
        raise EngineError(f"engine.max_batch_size must be at most {max_input // q_size(opts)} on the exllamav2 "
                          f"backend with this model, context length and num_draft_tokens")


def generator_kwargs(opts: ExllamaOptions, ctx: int, paged: bool, draft: tuple[Any, Any] | None) -> dict[str, Any]:
    """``ExLlamaV2DynamicGenerator`` arguments besides model, cache and tokenizer."""
    return dict(
        max_batch_size=opts.max_batch_size if paged else 1, max_seq_len=ctx, paged=paged, max_q_size=q_size(opts),
        draft_model=draft[0] if draft else None, draft_cache=draft[1] if draft else None,
        num_draft_tokens=opts.num_draft_tokens, use_ngram_draft=bool(opts.ngram_draft) and not draft,
    )


def build_model(spec: ModelSpec, path: Path, *, config: Any, opts: ExllamaOptions, ctx: int, paged: bool,
                cache_tokens: int, model: Any, draft: tuple[Any, Any] | None, generator: Any,
                memory_bytes: int) -> ExllamaV2Model:
    """Our LoadedModel over a loaded exllamav2 model and its generator (chat template, EOS ids, details)."""
    chat = ChatTokenizer.from_directory(str(path), spec.name)
    eos = chat.eos_ids(getattr(config, "eos_token_id", None), *config_eos(path))
    speculative = None
    if draft or opts.ngram_draft:
        speculative = {"method": "draft_model" if draft else "ngram", "num_draft_tokens": opts.num_draft_tokens}
    batch = generator.max_batch_size
    details = {
        "backend": "exllamav2", "format": spec.format, "device": "cuda",
        "mode": "paged" if paged else "unpaged", "batching": "continuous" if paged else "one sequence at a time",
        "max_batch_size": batch, "cache_tokens": cache_tokens, "kv_cache": opts.kv_cache_bits,
        "tensor_parallel": False, "speculative": speculative,
    }
    return ExllamaV2Model(
        spec, generator=generator, chat=chat, context_length=ctx, vocab_size=int(config.vocab_size),
        eos_token_ids=eos, max_batch_size=batch, memory_bytes=memory_bytes, details=details, model=model, draft=draft,
        seq_len=int(config.max_seq_len),
    )


def _load_draft(exllamav2: Any, opts: ExllamaOptions, cache_tokens: int, paged: bool, seq_len: int,
                vocab_size: int, on_gpu: list[Any] | None = None) -> tuple[Any, Any] | None:
    """The configured draft model, loaded, with its cache."""
    draft = open_draft(exllamav2, opts, cache_tokens, paged, seq_len, vocab_size)
    if draft is not None:
        if on_gpu is not None:
            on_gpu.append(draft[0])
        draft[0].load_autosplit(draft[1])
    return draft


def open_draft(exllamav2: Any, opts: ExllamaOptions, cache_tokens: int, paged: bool, seq_len: int,
               vocab_size: int) -> tuple[Any, Any] | None:
    """The configured draft model (unloaded) and its lazy cache, as long as the main one; None without one,
    or when its vocabulary is not the model's (``engine.draft_model`` serves every model)."""
    if not opts.draft_model_path:
        return None
    config = exllamav2.ExLlamaV2Config(opts.draft_model_path)
    if not draft_vocabulary_fits(int(config.vocab_size), vocab_size):
        return None
    apply_rope_parameters(config, Path(opts.draft_model_path))
    config.arch_compat_overrides()
    # the generator wants the draft's context at least the model's, whatever the draft's own config says
    config.max_seq_len = seq_len
    if not paged:
        config.no_flash_attn = True
    model = exllamav2.ExLlamaV2(config)
    return model, exllamav2.ExLlamaV2Cache(model, max_seq_len=cache_tokens, lazy=True)


class ExllamaV2Model(DynamicGeneratorModel):
    """A model decoding through exllamav2's dynamic generator."""

    backend_name = "exllamav2"
    isolation_mixin = IsolatedJobV2
    # held tokens streamed; logprobs first: they take the logits before the penalties change them; the bias and
    # cuts after them
    job_mixins = (StreamHeldV2, RawLogprobsV2, AnswerPenaltiesV2, LogitsV2)

    def __init__(self, spec: ModelSpec, *, model: Any, draft: tuple[Any, Any] | None, seq_len: int, **kw: Any):
        super().__init__(spec, **kw)
        self._model = model
        self._draft = draft
        self._seq_len = int(seq_len)  # the model's max_seq_len: the positions its RoPE tables hold

    def make_job(self, job: SequenceJob) -> Any:
        """An ``ExLlamaV2DynamicJob`` with our sampling settings, stop tokens and logprobs."""
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        settings = ExLlamaV2Sampler.Settings(**v2_sampler_fields(job.sampling))
        native = self.job_class(ExLlamaV2DynamicJob)(**job_kwargs(self.library_job(job), settings,
                                                                       self._library_max_new_tokens(job)))
        native.xllm_bind_penalties(len(job.prompt_ids), job.sampling)
        native.xllm_bind_logprobs(self.vocab_size)
        native.xllm_bind_logits(job.sampling, self.vocab_size)
        native.xllm_bind_stream(self.stream_bytes(job))
        return native

    def _library_max_new_tokens(self, job: SequenceJob) -> int:
        """The ``max_new_tokens`` that makes exllamav2 generate ``job.max_tokens`` tokens.

        While drafting (n-gram or draft model) exllamav2 ends a job once it has ``max_new_tokens`` less
        ``num_draft_tokens`` tokens: ask for that many more. ``plan_cache`` sized the cache and the RoPE
        tables so that this fits for any job within the context; the bound below only keeps a job that
        would not (none should) inside them, ending early rather than writing past them.
        """
        draft = int(getattr(self.generator, "num_draft_tokens", 0) or 0)
        if not draft:
            return job.max_tokens
        prompt = len(job.prompt_ids)
        # pages for prompt + max_new_tokens; the last window reaches position prompt + max_new_tokens - 2
        room = min(int(self.generator.max_total_tokens) - prompt, self._seq_len + 1 - prompt)
        return max(job.max_tokens, min(job.max_tokens + draft, room))

    def free_pages(self) -> int:
        """Unreferenced pages (unpaged: the one page, when no job holds it)."""
        return len(self.generator.unreferenced_pages)

    def total_pages(self) -> int:
        """The generator's pages."""
        return int(self.generator.max_pages)

    def tokens_held(self, job: SequenceJob) -> int:
        """Prompt and answer (as ``ExLlamaV2DynamicJob.prepare_for_queue``)."""
        return len(job.prompt_ids) + self._library_max_new_tokens(job)

    def page_size(self) -> int:
        """The generator's page size (the whole context when unpaged)."""
        return int(self.generator.page_size)

    def check_constraint(self, constraint, *, param: str = "response_format") -> None:
        """exllamav2 has no grammar engine we can drive: constrained decoding is a 400 here."""
        from ..core.errors import Unsupported

        raise Unsupported("Constrained decoding (response_format / forced tool calls) is not available on the "
                          "exllamav2 backend; use an exllamav3 or transformers model", param=param)

    def _release(self) -> None:
        for model in (self._model, self._draft[0] if self._draft else None):
            if model is not None:
                try:
                    model.unload()
                except Exception:
                    log.debug("unloading exllamav2 weights failed", exc_info=True)
        self.generator = None
        self._model = self._draft = None
