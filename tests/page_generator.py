"""The exllama libraries' own generators, jobs and page tables on CPU, with only the forward taken out.

exllamav3: ``Generator.__init__``, ``enqueue``, ``iterate`` (job start, page allocation,
prefill scheduling, prompt-page hashing and partial-page matching, page release,
defragmentation of the page table), ``cancel`` and ``Job.receive_sample`` run as the library
wrote them. Its decode step (``iterate_gen``, the one method replaced, since it stages
everything for CUDA) records each running job's input token in its page with the library's
``get_input_ids_list`` and feeds it the best token by stand-in logits: always FILLER_TOKEN
unless the job's grammar forbids it (its filters' masks combined by the job, as the library
does), with probabilities for logprobs in the shapes the library's ``receive_logits`` gives.

With ``engine.ngram_draft`` or ``engine.draft_model`` the library's own drafters run (the job's
suffix automaton, ``iterate_ngram_gen``; the draft model's loop, ``iterate_draftmodel_gen``, over
a stand-in draft forward that proposes FILLER_TOKEN but for every DRAFT_MISS_EVERY-th position),
and the decode step verifies the window as the library's does: tokens accepted while they match
the draft, the rest rejected and their page positions rewound, draft counts on the job.

exllamav2: the whole ``ExLlamaV2DynamicGenerator`` runs, paged or unpaged, its sampler and
n-gram drafting included; only ``model.forward_chunk`` is replaced, by logits that depend on
the input ids alone and that greedy decoding always resolves to one fixed token.

Either way prefill writes no K/V and the text is meaningless, but which cache pages a job
reuses, and so ``cached_tokens`` in the results, is the libraries' own arithmetic over our
isolation hooks (``backends/prefix_isolation.py``). Needs each library's extension module to
import without a GPU (prebuilt by ``benchmarks/gpu/cross_build.sh``; CI has neither, so the
tests that use this skip there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xllm_jupyter.backends.base import ModelSpec
from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend
from xllm_jupyter.backends.exllamav3 import ExllamaV3Backend, ExllamaV3Model, build_model

#: the token every running job "samples" (any id that is not a stop token)
FILLER_TOKEN = 1000
#: the stand-in logits: FILLER_TOKEN's lead over unit noise (greedy always picks it; at
#: temperature 1 exllamav2's sampler picks it about two times in three, so seeds change the text)
FILLER_BOOST = 12.0


#: the stand-in draft model proposes a wrong token at cache positions that are multiples of this (so
#: verification rejects part of some windows)
DRAFT_MISS_EVERY = 5


#: a benchmark's stand-in for what the GPU spends on a step: ``(decode rows, prefill tokens) -> None``
StepCost = Callable[[int, int], None]


def importable(library: str) -> bool:
    """``library`` and its prebuilt extension module (``<library>_ext``) import here, GPU or not."""
    if importlib.util.find_spec(library) is None or importlib.util.find_spec(f"{library}_ext") is None:
        return False
    try:
        importlib.import_module(library)
    except Exception:  # noqa: BLE001 - a missing symbol or driver library: not usable here
        return False
    return True


def require(library: str) -> None:
    """Skip the calling test unless ``library`` imports here."""
    if not importable(library):
        pytest.skip(f"{library} with a prebuilt extension module is not importable here")


def cpu_step_generator_class() -> type:
    """``exllamav3.Generator`` with its decode step replaced (see the module docstring)."""
    import torch
    from exllamav3 import Generator

    class CpuStepGenerator(Generator):
        """The library's generator; ``iterate_gen`` feeds each prefilled job its best stand-in token."""

        #: what a step costs besides this Python (``StepCost``; None: nothing), set by benchmarks
        xllm_step_cost: StepCost | None = None

        def _staging(self, name: str, rows: int, width: int | None = None, dtype: Any = torch.int32) -> Any:
            """The library's staging buffers (the draft model's loop takes them), not pinned: pinning needs a
            CUDA driver."""
            return torch.zeros((rows,) if width is None else (rows, width), dtype=dtype)

        def iterate_gen(self, results: list, draft_tokens: Any = None) -> None:
            """One decode step for every prefilled job (a draft window verified), then release finished jobs
            as the library does."""
            finished = []
            decoding = [job for job in self.active_jobs if job.is_prefill_done()]
            if decoding and self.xllm_step_cost is not None:
                self.xllm_step_cost(len(decoding), 0)
            for row, job in enumerate(decoding):
                if job.time_first_token is None:
                    job.time_first_token = time.time()
                # the library's own record of the step's input token (and draft window) in its cache
                # pages (what the forward's staging does)
                job.get_input_ids_list(draft_tokens, row, add_to_cache=True)
                window = 0 if draft_tokens is None else int(draft_tokens.shape[-1])
                for i in range(window + 1):
                    token, probabilities = self.xllm_sample(job)
                    eos, _, requeue = job.receive_sample(None, token, *probabilities, results)
                    assert not requeue, "requeueing is outside what this stand-in step covers"
                    if eos:
                        # as the library: window positions past the end count as rejected, in the end result too
                        if window - i:
                            job.rejected_draft_tokens += window - i
                            for r in reversed(results):
                                if r.get("eos") and r["job"] is job and "rejected_draft_tokens" in r:
                                    r["rejected_draft_tokens"] = job.rejected_draft_tokens
                                    break
                        finished.append(job)
                        break
                    if i == window:
                        break
                    if int(draft_tokens[row, i]) != int(token):
                        self.xllm_reject(job, window - i)
                        break
                    job.accepted_draft_tokens += 1
            # as the library releases finished jobs at the end of its step
            remaining = self.num_remaining_jobs()
            for job in finished:
                job.deallocate_pages()
                self.active_jobs.remove(job)
            if remaining and not self.num_remaining_jobs():
                self.on_queue_drained()

        def xllm_sample(self, job: Any) -> tuple[Any, tuple[Any, Any, Any]]:
            """The job's next token by the stand-in logits, and its probabilities when the job asks for them."""
            if not job.filters and not (job.return_probs or job.return_top_tokens > 0):
                # no grammar, no probabilities: the stand-in logits' best token, without building them
                return torch.tensor([[FILLER_TOKEN]]), (None, None, None)
            scores = self.xllm_scores(job)
            token = scores.argmax(dim=-1, keepdim=True)
            return token, self.xllm_probabilities(job, scores, token)

        @staticmethod
        def xllm_reject(job: Any, rejected: int) -> None:
            """The library's rejection of a draft window's last ``rejected`` positions: counted on the job, and
            the page positions the window wrote rewound (``iterate_gen``'s ``reject_remainder``)."""
            from exllamav3.constants import PAGE_SIZE

            job.rejected_draft_tokens += rejected
            for seq in job.sequences:
                left = rejected
                while left:
                    page = seq.allocated_pages[(seq.kv_position + left - 1) // PAGE_SIZE]
                    back = min(page.kv_position, left)
                    page.kv_position -= back
                    left -= back

        def xllm_scores(self, job: Any) -> Any:
            """The stand-in logits of the job's next token, under the mask of its grammar if it has one.

            ``stand_in_logits`` of the sequence so far: the best token is FILLER_TOKEN unless a
            grammar forbids it. The masks come from the job's filters and the job's own
            combination of them (``prepare_logit_mask``), as in the library's decode step; the
            CUDA sampler that would apply them is what is replaced.
            """
            width = self.padded_vocab_size
            scores = stand_in_logits(job.sequences[0].sequence_ids.torch(), (1, width))
            active = [f for f in job.filters if f.is_active] if job.new_tokens >= 0 else []
            if not active:
                return scores
            for f in active:
                background = f.use_background_worker()
                job.filter_futures.append(self.filter_pool.submit(f.get_next_logit_mask) if background else None)
                job.logit_masks.append(None if background else f.get_next_logit_mask())
            # host buffers the library would pin (pinning needs a CUDA driver)
            if job.pinned_logit_bitmask is None:
                job.pinned_logit_bitmask = torch.empty((1, width // 32), dtype=torch.int32)
            if job.pinned_logit_mask is None:
                job.pinned_logit_mask = torch.empty((1, width), dtype=torch.half)
            job.prepare_logit_mask()
            mask = job.device_logit_mask
            if mask.dtype == torch.int32:
                mask = job._expand_bitmask(mask)
            return scores + mask.float()

        @staticmethod
        def xllm_probabilities(job: Any, scores: Any, token: Any) -> tuple[Any, Any, Any]:
            """(top-k tokens, top-k probabilities, the token's probability) as ``receive_logits`` makes them."""
            if not (job.return_probs or job.return_top_tokens > 0):
                return None, None, None
            probs = torch.softmax(scores.float(), dim=-1).unsqueeze(0)  # (1, 1, vocab) like a job's logits
            prob = torch.gather(probs.squeeze(0), dim=1, index=token) if job.return_probs else None
            top_tokens = top_probs = None
            if job.return_top_tokens > 0:
                sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
                top_tokens = sorted_ids[:, :, :job.return_top_tokens]
                top_probs = sorted_probs[:, :, :job.return_top_tokens]
            return top_tokens, top_probs, prob

    return CpuStepGenerator


def load_cpu_pages_model(spec: ModelSpec, step_cost: StepCost | None = None) -> ExllamaV3Model:
    """Our ExllamaV3Model over the library's real config, tokenizer, cache object and generator, no weights.

    ``step_cost`` is spent by every prefill and decode step (a benchmark's stand-in for the GPU).
    """
    from exllamav3 import Tokenizer

    from xllm_jupyter.backends.exllama_common import ExllamaOptions
    from exllamav3.version import __version__

    from xllm_jupyter.backends.exllamav3 import drafting_options, library_generator_kwargs, open_model

    opts = drafting_options(ExllamaOptions.from_options(spec.options, spec.context_length), Path(spec.path))
    config, model, cache, cache_tokens = open_model(Path(spec.path), opts)
    # the forward is what is taken out: prefill writes nothing, and there are no K/V tensors to
    # copy a partial page between or to rotate when the page table is defragmented
    _stand_in_forward(model, cache, step_cost)
    draft = None
    if opts.draft_model_path:  # as the backend's _load_draft: a cache as large as the model's, our options
        _, draft_model, draft_cache, _ = open_model(Path(opts.draft_model_path), opts, cache_tokens)
        _stand_in_forward(draft_model, draft_cache, None)
        draft_model.forward = _v3_draft_forward_stand_in((int(config.vocab_size) + 31) // 32 * 32)
        draft = (draft_model, draft_cache)
    tokenizer = Tokenizer.from_config(config)
    step_generator = cpu_step_generator_class()
    with _unpinned():
        generator = step_generator(model=model, cache=cache, tokenizer=tokenizer,
                                   **library_generator_kwargs(step_generator, opts, draft, f"exllamav3 {__version__}"))
    generator.xllm_step_cost = step_cost
    return build_model(spec, Path(spec.path), config=config, opts=opts, cache_tokens=cache_tokens, model=model,
                       tokenizer=tokenizer, draft=draft, generator=generator, memory_bytes=0)


def _stand_in_forward(model: Any, cache: Any, step_cost: StepCost | None) -> None:
    """exllamav3 ``model`` and its ``cache`` without weights or K/V tensors (see ``load_cpu_pages_model``)."""
    model.prefill = _v3_prefill_stand_in(step_cost)
    model.output_device = "cpu"
    cache.initialized = True
    cache.copy_page = lambda *args, **kwargs: None
    cache.get_all_tensors = lambda: []


@contextlib.contextmanager
def _unpinned() -> Iterator[None]:
    """``torch.empty``/``torch.zeros`` ignore ``pin_memory`` meanwhile: the generator pins its draft buffers,
    which needs a CUDA driver."""
    import torch

    real = {name: getattr(torch, name) for name in ("empty", "zeros")}
    with pytest.MonkeyPatch.context() as patch:
        for name, fn in real.items():
            patch.setattr(torch, name, lambda *a, _fn=fn, pin_memory=False, **kw: _fn(*a, **kw))
        yield


def _v3_draft_forward_stand_in(vocab: int) -> Any:
    """A draft model's ``forward``: logits (rows, 1, ``vocab``) that propose FILLER_TOKEN, the token the stand-in
    model picks, except at cache positions that are multiples of DRAFT_MISS_EVERY (proposed: the next id)."""
    import torch

    def forward(input_ids: Any = None, params: Any = None, **kwargs: Any) -> Any:
        """The library's call signature (keywords ``input_ids``, ``params``)."""
        rows = int(input_ids.shape[0])
        logits = torch.zeros((rows, 1, vocab))
        for row, position in enumerate(params["cache_seqlens"][:rows].tolist()):
            logits[row, 0, FILLER_TOKEN + (position % DRAFT_MISS_EVERY == 0)] = FILLER_BOOST
        return logits

    return forward


def _v3_prefill_stand_in(step_cost: StepCost | None) -> Any:
    """exllamav3's ``Model.prefill`` without a model: writes nothing, costs ``step_cost`` for its tokens."""

    def prefill(input_ids: Any = None, params: Any = None, **kwargs: Any) -> None:
        """The library's call signature (keywords ``input_ids``, ``params``)."""
        if step_cost is not None:
            step_cost(0, int(input_ids.shape[-1]))

    return prefill


class CpuPagesV3Backend(ExllamaV3Backend):
    """The exllamav3 backend loading ``load_cpu_pages_model`` (registered by the tests that use it)."""

    name = "exllamav3-cpu-pages"

    def available(self) -> bool:
        """Where exllamav3 imports, GPU or not."""
        return importable("exllamav3")

    def load(self, spec: ModelSpec) -> ExllamaV3Model:
        """No weights: see the module docstring."""
        return load_cpu_pages_model(spec)


def load_cpu_pages_v2_model(spec: ModelSpec, *, paged: bool, step_cost: StepCost | None = None) -> Any:
    """Our ExllamaV2Model over exllamav2's real config, tokenizer, lazy cache and generator, no weights.

    A configured draft model gets the same stand-in forward, so it drafts what the model picks.
    ``step_cost`` is spent by every forward of the model (a benchmark's stand-in for the GPU).
    """
    import exllamav2
    from exllamav2.generator import ExLlamaV2DynamicGenerator

    from xllm_jupyter.backends.exllama_common import ExllamaOptions
    from xllm_jupyter.backends.exllamav2 import build_model as build_v2_model
    from xllm_jupyter.backends.exllamav2 import check_limits, drafting_options, open_draft
    from xllm_jupyter.backends.exllamav2 import generator_kwargs as v2_generator_kwargs
    from xllm_jupyter.backends.exllamav2 import open_model as open_v2_model

    # as the backend's load: drafting as it will load, its limits checked
    opts = drafting_options(exllamav2, ExllamaOptions.from_options(spec.options, spec.context_length), Path(spec.path))
    config, ctx, model, cache, cache_tokens, paged = open_v2_model(exllamav2, Path(spec.path), opts, paged)
    check_limits(opts, config, paged)
    draft = open_draft(exllamav2, opts, cache_tokens, paged, config.max_seq_len, int(config.vocab_size))
    vocab = (int(config.vocab_size) + 31) // 32 * 32  # the generator's padded vocabulary
    for m, c in [(model, cache)] + ([draft] if draft else []):
        positions = min(int(m.config.max_seq_len), _load_learned_positions(m))
        m.forward_chunk = _v2_forward_stand_in(vocab, step_cost if m is model else None, positions)
        # no K/V tensors to copy a partial page between, or to rotate when the page table is defragmented
        c.copy_states = lambda *args, **kwargs: None
        c.all_tensors = lambda: []
    tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer,
                                          **v2_generator_kwargs(opts, ctx, paged, draft))
    return build_v2_model(spec, Path(spec.path), config=config, opts=opts, ctx=ctx, paged=paged,
                          cache_tokens=cache_tokens, model=model, draft=draft, generator=generator, memory_bytes=0)


def _load_learned_positions(model: Any) -> int:
    """Rows of the model's learned position table (GPT-2, GPTBigCode), loaded by exllamav2's own ``load`` with the
    weight's shape from the file (not its data: a GPU read), so its check of ``max_seq_len`` against the table
    runs; no limit (a large number) for a model with rotary positions."""
    import torch
    from exllamav2.pos_embedding import ExLlamaV2PosEmbedding
    from exllamav2.stloader import STFile

    rows = 1 << 62
    for module in model.modules:
        if isinstance(module, ExLlamaV2PosEmbedding):
            key = module.key + ".weight"
            shape = STFile.open(model.config.tensor_file_map[key], keymap=model.config.arch.keymap).header[key]["shape"]
            module.load_weight = lambda: torch.nn.Parameter(torch.empty(shape, dtype=torch.half), requires_grad=False)
            module.load()  # AssertionError past the table, as on a GPU
            rows = min(rows, int(module.native_ctx_size))
    return rows


def _v2_forward_stand_in(vocab: int, step_cost: StepCost | None = None, seq_len: int | None = None) -> Any:
    """``forward_chunk`` without a model: prefill writes nothing, decoding gives ``stand_in_logits``.

    With ``seq_len`` (the model's ``max_seq_len``: its RoPE tables' length) every call's positions are checked
    against it and against the cache, as the real forward would index them: a position past either is an
    AssertionError out of the step (the kernels would read past the tables or write past the cache unchecked).
    """
    import torch

    def check_positions(input_ids: Any, attn_params: Any = None, cache: Any = None, **kwargs: Any) -> None:
        if seq_len is None or attn_params is None:
            return
        width = int(input_ids.shape[-1])
        seqlens = getattr(attn_params, "cache_seqlens", None)
        start = int(seqlens.max()) if seqlens is not None else int(attn_params.past_len or 0)
        end = start + width  # one past the last position written and rotated
        limit = min(seq_len, int(cache.max_seq_len)) if cache is not None else seq_len
        assert end <= limit, f"positions up to {end - 1} past the RoPE tables ({seq_len}) or the cache"
        if seqlens is not None:  # paged: within the pages the step's block index gives the job
            assert end <= attn_params.block_index.shape[-1] * attn_params.page_size, "positions past the job's pages"

    def forward_chunk(input_ids: Any, preprocess_only: bool = False, **kwargs: Any) -> Any:
        """exllamav2's forward signature; ``preprocess_only`` is prefill."""
        check_positions(input_ids, **kwargs)
        if step_cost is None:
            return None if preprocess_only else {"logits": stand_in_logits(input_ids, (*input_ids.shape, vocab))}
        rows, width = input_ids.shape
        if preprocess_only:
            step_cost(0, rows * width)
            return None
        step_cost(rows, 0)
        # a benchmark's logits: FILLER_TOKEN's lead without the noise, which costs more than a GPU's logits
        logits = torch.zeros((rows, width, vocab))
        logits[..., FILLER_TOKEN] = FILLER_BOOST
        return {"logits": logits}

    return forward_chunk


def stand_in_logits(ids: Any, shape: tuple[int, ...]) -> Any:
    """Logits fixed by ``ids`` alone: unit noise (so seeds matter when sampling) plus FILLER_BOOST for
    FILLER_TOKEN (so greedy decoding always picks it), FILLER_TOKEN indexing the last dimension."""
    import torch

    noise = torch.Generator().manual_seed(int(ids.sum()) * 1_000_003 + ids.numel())
    logits = torch.randn(shape, generator=noise)
    logits[..., FILLER_TOKEN] += FILLER_BOOST
    return logits


class CpuPagesV2Backend(ExllamaV2Backend):
    """The exllamav2 counterpart, paged (needs flash-attn, as the real backend)."""

    name = "exllamav2-cpu-pages"
    paged = True

    def available(self) -> bool:
        """Where exllamav2 imports, GPU or not."""
        return importable("exllamav2")

    def load(self, spec: ModelSpec) -> Any:
        """No weights: see the module docstring."""
        return load_cpu_pages_v2_model(spec, paged=self.paged)


class CpuPagesV2UnpagedBackend(CpuPagesV2Backend):
    """exllamav2 unpaged: what the real backend runs without flash-attn (one sequence at a time)."""

    name = "exllamav2-unpaged-cpu-pages"
    paged = False


#: the generators the CPU checks run: exllamav3, exllamav2 paged (needs flash-attn), exllamav2 unpaged
KINDS = ("exllamav3", "exllamav2-paged", "exllamav2-unpaged")
BACKEND_OF_KIND = {"exllamav3": CpuPagesV3Backend, "exllamav2-paged": CpuPagesV2Backend,
                   "exllamav2-unpaged": CpuPagesV2UnpagedBackend}


def pages_held(model: Any) -> int:
    """Cache pages some job still references in ``model``'s generator (0 once every job ended)."""
    generator = model.generator
    return len(getattr(generator, "pagetable", generator).referenced_pages)


def require_kind(kind: str) -> None:
    """Skip unless the library of ``kind`` imports here (and flash-attn does, for exllamav2 paged)."""
    require("exllamav3" if kind == "exllamav3" else "exllamav2")
    if kind == "exllamav2-paged":
        from xllm_jupyter.backends.exllamav2 import paged_attention_available

        if not paged_attention_available():
            pytest.skip("exllamav2's paged mode needs flash-attn")


@contextlib.contextmanager
def cpu_pages_server(kind: str, model_dir: Path, home: Path, model: str, api_keys: tuple[str, ...],
                     **engine: Any) -> Iterator[Any]:
    """The real server and engine serving ``model_dir`` as ``model`` through the CPU-pages backend of ``kind``.

    ``engine`` overrides engine settings (default: a 16-page cache).
    """
    from tests.exllama_checks import ForcedBackend
    from tests.server_fixtures import make_test_config, running_server
    from xllm_jupyter.backends import registry
    from xllm_jupyter.store.store import ModelStore

    backend = BACKEND_OF_KIND[kind]
    store = ModelStore(home)
    store.pull(str(model_dir), model)
    config = make_test_config(home, api_keys=api_keys)
    engine = {"default_model": model, "cache_tokens": 16 * 256, **engine}
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, **engine))

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.BACKENDS, backend.name, f"tests.page_generator:{backend.__name__}")
        with running_server(config, ForcedBackend(store, backend.name), model) as info:
            info.kind = kind
            yield info
