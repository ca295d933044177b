"""The exllama adapters' CPU-side logic: option parsing, sampler mapping, result translation,
backend selection and the job bookkeeping around a generator. No CUDA here; the library's
generator is replaced by a scripted stand-in only to check our side of the contract."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from xllm_jupyter.backends.base import BackendOptions, ModelSpec
from xllm_jupyter.backends.memory_estimate import disk_bytes
from xllm_jupyter.backends.exllama_common import ExllamaOptions, v2_sampler_fields
from xllm_jupyter.backends.exllama_results import JobInfo, SpeculativeStats, translate_results
from xllm_jupyter.backends.exllama_sampling import v3_sampler_steps
from xllm_jupyter.backends.exllama_model import DynamicGeneratorModel
from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer
from xllm_jupyter.backends.registry import get_backend, select_backend
from xllm_jupyter.core.errors import EngineError, InvalidRequest
from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob


# ------------------------------------------------------------------ options
def exllama_options(overrides: dict, context_length: int | None = None) -> ExllamaOptions:
    """ExllamaOptions from the default engine settings with ``overrides`` (as a model's would apply)."""
    return ExllamaOptions.from_options(BackendOptions().with_overrides(overrides), context_length)


def test_options_defaults_and_cache_rounding():
    opts = exllama_options({})
    assert opts.kv_bits() is None and opts.max_batch_size == 16
    assert opts.cache_size(4096) == 65536  # default cache
    small = exllama_options({"cache_tokens": 1000})
    assert small.cache_size(512) == 1024  # whole 256-token pages
    assert small.cache_size(3000) == 3072  # never smaller than one full context


@pytest.mark.parametrize("name,bits", [("q8", (8, 8)), ("Q4", (4, 4)), ("q6", (6, 6)), ("4,6", (4, 6)), ("fp16", None)])
def test_kv_cache_bits(name, bits):
    assert exllama_options({"kv_cache_bits": name}).kv_bits() == bits


@pytest.mark.parametrize("bad,needle", [({"kv_cache_bits": "q5x"}, "kv_cache_bits"), ({"kv_cache_bits": "1,9"}, "between 2 and 8"),
                                        ({"gpu_split": ["a"]}, "gpu_split"), ({"cache_tokens": -1}, "cache_tokens")])
def test_bad_options_name_the_setting(bad, needle):
    with pytest.raises(EngineError, match=needle):
        exllama_options(bad)


def test_options_carry_speculative_and_split_settings():
    opts = exllama_options({"gpu_split": ["20", 24], "tensor_parallel": True, "ngram_draft": 3,
                                        "num_draft_tokens": 5, "draft_model_path": "/m/draft", "max_batch_size": 64})
    assert opts.gpu_split == (20.0, 24.0) and opts.tensor_parallel and opts.ngram_draft == 3
    assert opts.num_draft_tokens == 5 and opts.draft_model_path == "/m/draft" and opts.max_batch_size == 64



def test_exllamav2_drafting_jobs_ask_for_the_window_exllamav2_holds_back():
    """exllamav2 ends a drafting job once it has max_new_tokens less num_draft_tokens tokens
    (tests/test_exllama_library_serving.py shows it on the library); the job asks for that many more,
    within the cache's pages and the RoPE tables' positions."""
    from types import SimpleNamespace

    from xllm_jupyter.backends.exllamav2 import ExllamaV2Model

    def asked(draft, prompt_len, max_tokens, cache=2304, seq_len=2304):
        model = SimpleNamespace(generator=SimpleNamespace(num_draft_tokens=draft, max_total_tokens=cache),
                                _seq_len=seq_len)
        job = SequenceJob(1, (5,) * prompt_len, max_tokens, SamplingParams())
        return ExllamaV2Model._library_max_new_tokens(model, job)

    assert asked(0, 40, 24) == 24  # no drafting: as asked
    assert asked(4, 40, 24) == 28
    assert asked(4, 2000, 48) == 52  # a job that fills a 2,048 context, planned for it (plan_cache)
    # unpaged, the cache is one page of max_seq_len: pages for the prompt and max_new_tokens
    assert asked(4, 2000, 46, cache=2048, seq_len=2048) == 48
    assert asked(4, 2000, 48, cache=2048, seq_len=2048) == 48  # never less than asked
    # paged, the cache holds more: the window's positions stop at the RoPE tables (one past: the last draft
    # position is prompt + max_new_tokens - 2)
    assert asked(4, 2000, 46, cache=65536, seq_len=2048) == 49


def test_exllamav2_gets_room_for_the_last_token_and_the_whole_draft_window():
    """exllamav2's logits buffer is ``max_q_size`` wide and a drafting step needs the last token and the window."""
    from types import SimpleNamespace

    from xllm_jupyter.backends.exllamav2 import check_limits, generator_kwargs

    def q(**options):
        return generator_kwargs(exllama_options(options), 2048, True, None)["max_q_size"]

    assert q() == 8 and q(num_draft_tokens=8) == 8  # (not drafting)
    assert q(ngram_draft=2, num_draft_tokens=7) == 8 and q(ngram_draft=2, num_draft_tokens=8) == 9
    assert q(draft_model_path="/d", num_draft_tokens=8) == 9
    config = SimpleNamespace(max_input_len=2048, max_seq_len=4096, max_batch_size=1)
    check_limits(exllama_options({"ngram_draft": 2, "num_draft_tokens": 8, "max_batch_size": 227}), config, True)
    with pytest.raises(EngineError, match="max_batch_size must be at most 227"):
        check_limits(exllama_options({"ngram_draft": 2, "num_draft_tokens": 8, "max_batch_size": 228}), config, True)
    with pytest.raises(EngineError, match="num_draft_tokens must be at most 8"):
        check_limits(exllama_options({"ngram_draft": 2, "num_draft_tokens": 9}), config, True)


def test_exllamav2_drafting_limits_follow_a_draft_that_loads():
    """A draft whose vocabulary is larger than the model's is not loaded (``open_draft``): its limits, input size
    and window no longer apply (12 draft tokens refused the load; the window was set aside in the cache)."""
    from types import SimpleNamespace

    from xllm_jupyter.backends.exllamav2 import check_limits, draft_window, drafting_options, q_size

    vocab = {"/m": 32000, "/small": 32000, "/large": 32256}
    library = SimpleNamespace(ExLlamaV2Config=lambda path: SimpleNamespace(vocab_size=vocab[path]))
    config = SimpleNamespace(max_input_len=2048, max_seq_len=4096, max_batch_size=1)
    unused = drafting_options(library, exllama_options({"draft_model_path": "/large", "num_draft_tokens": 12}),
                              Path("/m"))
    assert unused.draft_model_path is None and draft_window(unused) == 0 and q_size(unused) == 8
    check_limits(unused, config, True)
    used = drafting_options(library, exllama_options({"draft_model_path": "/small", "num_draft_tokens": 12}),
                            Path("/m"))
    assert used.draft_model_path == "/small" and draft_window(used) == 12
    with pytest.raises(EngineError, match="num_draft_tokens must be at most 8"):
        check_limits(used, config, True)
    # n-gram drafting needs no draft model: its window stays
    ngram = drafting_options(library, exllama_options({"draft_model_path": "/large", "ngram_draft": 2}), Path("/m"))
    assert draft_window(ngram) == 4


@pytest.mark.parametrize(("paged", "window", "cache_tokens", "rope", "plan"), [
    (True, 0, 0, False, (2048, 2048, 65536)),  # no drafting: one context, as before
    (False, 0, 0, False, (2048, 2048, 2048)),
    (True, 4, 0, False, (2048, 2304, 65536)),  # the window's positions: 2,048 + 3 -> a page more of RoPE tables
    (False, 4, 0, False, (2048, 2304, 2304)),  # unpaged the one page holds context and window: 2,052 -> 2,304
    (True, 4, 2048, False, (2044, 2048, 2048)),  # a configured cache bounds context + window
    (False, 4, 2048, False, (2044, 2048, 2048)),
    (True, 4, 0, True, (2045, 2048, 65536)),  # YaRN/su, learned positions: max_seq_len kept: context shorter
    (False, 4, 0, True, (2044, 2048, 2048)),
    (True, 1, 0, False, (2048, 2048, 65536)),  # a window of one reaches no position past the context
])
def test_exllamav2_plans_context_tables_and_cache_for_the_draft_window(paged, window, cache_tokens, rope, plan):
    from xllm_jupyter.backends.exllamav2_plan import plan_cache

    opts = exllama_options({"cache_tokens": cache_tokens})
    got = plan_cache(opts, 2048, paged=paged, window=window, length_fixed=rope)
    assert (got.context, got.seq_len, got.cache_tokens) == plan
    # what a job of the whole context asks (context + window) fits the cache's pages, its last window's
    # positions (up to context + window - 2) the RoPE tables
    assert got.context + window <= got.cache_tokens and got.context + window - 1 <= got.seq_len


def test_a_configured_cache_bounds_the_context_and_drafting_gets_cache_history():
    from xllm_jupyter.backends.exllamav3 import _cache_kwargs, generator_kwargs

    small = exllama_options({"cache_tokens": 16384})
    assert small.serving_context(131072) == 16384 and small.cache_size(small.serving_context(131072)) == 16384
    assert exllama_options({}).serving_context(131072) == 131072  # no cache set: the model's context
    assert exllama_options({"cache_tokens": 16384}, 4096).serving_context(131072) == 4096
    # exllamav3 keeps tokens free past a job's last one (context_reserve): a configured cache still bounds the
    # memory, so the context served is that much shorter; without one the cache grows past the context instead
    from xllm_jupyter.backends.exllamav3 import context_reserve

    assert context_reserve(small) == 1 and context_reserve(drafting_opts := exllama_options({"ngram_draft": 2})) == 5
    assert small.serving_context(131072, 1) == 16383 and small.cache_size(16383, 1) == 16384
    assert drafting_opts.serving_context(131072, 5) == 131072 and drafting_opts.cache_size(131072, 5) == 131072 + 256
    drafting = exllama_options({"ngram_draft": 3, "num_draft_tokens": 5, "draft_model_path": "/d"})
    # recurrent models roll a speculative pass back through this history (exllamav3 refuses drafting without it)
    assert _cache_kwargs(drafting)["max_history"] == 5
    # a draft model wins over n-gram drafting (exllamav3 refuses both at once)
    assert generator_kwargs(drafting, (object(), object()))["ngram_match_min"] == 0
    assert generator_kwargs(drafting, None)["ngram_match_min"] == 3


@pytest.mark.exllama
def test_exllamav3_takes_only_architectures_it_implements(tmp_path):
    from xllm_jupyter.backends.exllamav3 import ExllamaV3Backend, known_architectures

    if not known_architectures():
        pytest.skip("exllamav3 is not installed here (its sources list its architectures)")
    backend = ExllamaV3Backend()
    for arch, fmt, expected in (("LlamaForCausalLM", "safetensors", True), ("GPT2LMHeadModel", "safetensors", False),
                                ("GPT2LMHeadModel", "exl3", True)):
        model = tmp_path / f"{arch}-{fmt}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": [arch]}))
        assert backend.supports(ModelSpec(name="m", path=model, format=fmt)) is expected


def test_exllamav3_load_and_cache_arguments_follow_the_options():
    from xllm_jupyter.backends.exllamav3 import _cache_kwargs, _load_kwargs

    opts = exllama_options({"gpu_split": [20, 24], "max_batch_size": 64})
    # a split is GB per device; the auto-split budgets activations for the generator's batch and prefill chunk
    # (exllamav3's Model.load_gen defaults to a batch of 1)
    assert _load_kwargs(opts) == {"progressbar": False, "use_per_device": [20.0, 24.0], "max_batch_size": 64,
                                  "max_chunk_size": 2048}
    assert _load_kwargs(exllama_options({"tensor_parallel": True}))["tensor_p"] is True
    # recurrent-state slots follow the engine's batch size (fp16 cache: no quantized layer type)
    assert _cache_kwargs(opts) == {"max_batch_size": 64}


# ------------------------------------------------------------------ samplers
def test_exllamav3_steps_sample_in_the_transformers_backends_order():
    """sampling.py's order: repetition, presence/frequency, logit_bias, temperature, top-k, top-p, min-p.
    exllamav3's ComboSampler puts the bias before the repetition penalty and min-p before top-p."""
    s = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.25,
                       repetition_penalty=1.1, logit_bias={5: -100.0, 9: 2.0}, seed=3)
    assert v3_sampler_steps(s) == [
        ("SS_RepP", (1.1,)), ("SS_PresFreqP", (0.5, 0.25)), ("SS_LogitBias", ({5: -100.0, 9: 2.0},)),
        # (a sort first: the step-by-step path must not divide the job's logits in place, see below)
        ("SS_Sort", ()), ("SS_Temperature", (0.7,)), ("SS_TopK", (40,)), ("SS_TopP", (0.9,)), ("SS_MinP", (0.05,)),
        ("SS_Sample", ()),
    ]
    # without top-p, min-p and top-k commute: the library's fusable order (min-p, top-k, top-p)
    names = [name for name, _ in v3_sampler_steps(SamplingParams(temperature=0.7, top_k=40, min_p=0.05))]
    assert names[3:] == ["SS_Temperature", "SS_MinP", "SS_TopK", "SS_TopP", "SS_Sample"]
    # top_p 0 keeps the top token (as sampling.Filters), within the library's 0..1
    assert ("SS_TopP", (1e-6,)) in v3_sampler_steps(SamplingParams(temperature=1.0, top_p=0.0))


def test_greedy_maps_to_argmax_in_both_libraries():
    s = SamplingParams(temperature=0.0, top_p=0.5, logit_bias={3: 1.0})
    assert v3_sampler_steps(s)[-2:] == [("SS_LogitBias", ({3: 1.0},)), ("SS_Argmax", ())]
    v2 = v2_sampler_fields(s)
    assert v2["top_k"] == 1 and v2["top_p"] == 1.0 and v2["temperature"] == 1.0
    hot = v2_sampler_fields(SamplingParams(temperature=1.3, top_p=0.8, top_k=0, min_p=0.1, presence_penalty=0.2))
    # penalties, bias and cuts stay off in the library's settings: the job applies them (test_exllama_sampling.py)
    assert hot == {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "token_repetition_penalty": 1.0,
                   "token_frequency_penalty": 0.0, "token_presence_penalty": 0.0}
    # below 0.01 exllamav2 would decode greedily: the job divides by the temperature, the library gets 1.0
    assert v2_sampler_fields(SamplingParams(temperature=0.005))["temperature"] == 1.0
    assert v2_sampler_fields(SamplingParams(temperature=0.01))["temperature"] == 0.01


def require_library(name):
    """Skip unless the library and its compiled module import here (tests/page_generator.py)."""
    from tests.page_generator import require

    require(name)


def tokens_left_to_draw(sampler, logits):
    """Token ids exllamav3's sampler could draw from ``logits`` (1-D): its state before the final (CUDA) step."""
    from exllamav3.generator.sampler import CustomSampler

    state = CustomSampler(sampler.steps[:-1]).forward(logits.clone().unsqueeze(0), return_state=True)
    if state.probs is not None:
        ids = state.indices[0] if state.indices is not None else torch.arange(logits.numel())
        return set(ids[state.probs[0] > 0].tolist())
    return set(torch.nonzero(torch.isfinite(state.logits[0])).flatten().tolist())


@pytest.mark.exllama
@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.7, top_k=12, top_p=0.6, min_p=0.2),
    SamplingParams(temperature=1.3, top_p=0.75, min_p=0.1, logit_bias={4: 3.0, 7: -100.0}),
    SamplingParams(temperature=0.5, top_k=9, min_p=0.05),
])
def test_exllamav3_steps_keep_what_the_transformers_backend_keeps(sampling, monkeypatch):
    """The library's own sampler steps (pure torch up to the draw) run on CPU logits: the tokens left to draw
    from are sampling.py's."""
    from xllm_jupyter.backends.sampling import Filters, filter_logits

    require_library("exllamav3")  # (with its compiled module: importing it would build one for minutes)
    from exllamav3.generator.sampler import CustomSampler, custom

    def sampler():
        return CustomSampler([getattr(custom, name)(*args) for name, args in v3_sampler_steps(sampling)])

    # the fused kernel takes the truncation wherever the library can fuse it (all but min-p with top-p)
    fused = type(sampler().steps[-1]).__name__ == "SS_Fused"
    assert fused is (sampling.top_p == 1.0 or sampling.min_p == 0.0)
    # the step-by-step path, which the fused kernel reproduces ("equivalent to the steps it replaces"), runs here
    monkeypatch.setattr(custom, "fused_sampler_enable", False)
    vocab = 64
    logits = torch.linspace(-3.0, 3.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(11))]
    biased = logits.clone()
    for token, value in sampling.logit_bias.items():
        biased[token] += value
    expected = filter_logits((biased / sampling.temperature).unsqueeze(0), Filters.of([sampling], vocab))[0]
    left = tokens_left_to_draw(sampler(), logits)
    assert left == set(torch.nonzero(torch.isfinite(expected)).flatten().tolist()) and 1 < len(left) < vocab
    if not fused:
        # the job takes its logprobs from the same tensor after sampling: it must still be the model's logits
        job_logits = logits.clone().unsqueeze(0)
        CustomSampler(sampler().steps[:-1]).forward(job_logits, return_state=True)
        assert torch.equal(job_logits[0], logits)


@pytest.mark.exllama
def test_exllamav3_combo_sampler_cuts_top_p_after_min_p(monkeypatch):
    """Why the steps are ours: probabilities 0.5, 0.3, 0.2 with min_p 0.5 and top_p 0.6. HF (and OpenAI) keep the
    first two; ComboSampler counts top-p's mass over what min-p kept (0.625, 0.375) and keeps one."""
    require_library("exllamav3")  # (with its compiled module: importing it would build one for minutes)
    from exllamav3.generator.sampler import ComboSampler, CustomSampler, custom

    monkeypatch.setattr(custom, "fused_sampler_enable", False)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    sampling = SamplingParams(temperature=1.0, top_p=0.6, min_p=0.5)
    ours = CustomSampler([getattr(custom, name)(*args) for name, args in v3_sampler_steps(sampling)])
    assert tokens_left_to_draw(ours, logits) == {0, 1}
    assert tokens_left_to_draw(ComboSampler(top_p=0.6, min_p=0.5), logits) == {0}


def test_exllamav3_older_than_1_6_3_is_refused_at_load_by_name():
    """1.6.0-1.6.2's top-p left out the token that crosses P (the [exl3] extra asks for 1.6.3)."""
    from xllm_jupyter.backends.exllamav3 import check_library_version

    for ok in ("1.6.3", "1.6.5", "1.10.0", "2.0.0.dev1"):
        check_library_version(ok)
    for old in ("1.6.2", "1.4.1", "0.0.43"):
        with pytest.raises(EngineError, match=f"exllamav3 {old} is older than 1.6.3"):
            check_library_version(old)


# --------------------------------------------------------- result translation
def streaming(ident, ids, text, **extra):
    """A result dict shaped like the generators' (token tensors of shape (1, n))."""
    r = {"job": object(), "stage": "streaming", "identifier": ident, "serial": 0, "eos": False, "text": text,
         "token_ids": torch.tensor([ids], dtype=torch.long)}
    r.update(extra)
    return r


def test_tokens_become_events_and_eos_finishes_with_usage():
    jobs = {7: JobInfo(7)}
    results = [
        {"stage": "started", "identifier": 7, "eos": False},
        {"stage": "prefill", "identifier": 7, "eos": False, "curr_progress": 6, "max_progress": 6},
        streaming(7, [11], " hi"),
        streaming(7, [12], "!", eos=True, eos_reason="max_new_tokens", new_tokens=2, prompt_tokens=6, cached_tokens=256),
    ]
    events = translate_results(results, jobs, str)
    assert [(e.token_id, e.text, e.finish) for e in events] == [(11, " hi", None), (12, "!", FinishReason.LENGTH)]
    last = events[-1]
    assert (last.prompt_tokens, last.cached_tokens, last.completion_tokens) == (6, 256, 2)


@pytest.mark.parametrize("reason,finish", [("stop_token", FinishReason.STOP), ("stop_string", FinishReason.STOP),
                                           ("end_filter", FinishReason.STOP), ("max_new_tokens", FinishReason.LENGTH)])
def test_eos_reasons(reason, finish):
    r = {"stage": "streaming", "identifier": 1, "eos": True, "eos_reason": reason, "text": "", "new_tokens": 3}
    (event,) = translate_results([r], {1: JobInfo(1)}, str)
    assert event.token_id is None and event.finish is finish and event.completion_tokens == 3


def test_a_stop_token_end_releases_the_answer_held_back_and_counts_the_stop_token_without_its_text():
    """Both libraries end a job on a stop token without emitting what they held back (an incomplete character, a
    possible stop-string match): the end result's ``held`` has it, the stop token last. The stop token is a token
    of the answer (usage counts it, as on the transformers backend), its text is not."""
    held = {"text": "\ufffd there<|im_end|>", "token_ids": torch.tensor([[173, 665, 2]]),
            "token_probs": torch.tensor([[0.5, 0.25, 0.9]]),
            "top_k_tokens": torch.tensor([[[173, 9], [665, 9], [2, 9]]]),
            "top_k_probs": torch.tensor([[[0.5, 0.1], [0.25, 0.2], [0.9, 0.05]]])}
    end = {"stage": "streaming", "identifier": 1, "eos": True, "eos_reason": "stop_token", "new_tokens": 4,
           "eos_triggering_token_id": 2, "eos_triggering_token_str": "<|im_end|>", "held": held}
    raw = {173: b"\xe2", 665: b" there", 9: b"x", 2: b""}.__getitem__
    events = translate_results([end], {1: JobInfo(1, logprobs=True, top_logprobs=1)}, str, raw=raw)
    assert [(e.token_id, e.finish) for e in events] == [(173, None), (665, None), (2, FinishReason.STOP)]
    assert "".join(e.text for e in events) == "\ufffd there"
    assert [e.logprob for e in events] == pytest.approx([math.log(0.5), math.log(0.25), math.log(0.9)])
    assert [e.top_logprobs[0][0] for e in events] == ["173", "665", "2"] and events[0].token_bytes == b"\xe2"
    assert events[-1].completion_tokens == 4
    # without the tokens' bytes: the held text less the stop token's
    events = translate_results([end], {1: JobInfo(1)}, str)
    assert [e.token_id for e in events] == [173, 665, 2] and "".join(e.text for e in events) == "\ufffd there"
    # the stop token alone was held, or nothing: the finishing event is the stop token's, without text
    for alone in ({**end, "held": {"text": "<|im_end|>", "token_ids": torch.tensor([[2]])}}, {**end, "held": {}}):
        (event,) = translate_results([alone], {1: JobInfo(1)}, str, raw=raw)
        assert (event.token_id, event.text, event.finish) == (2, "", FinishReason.STOP)
    # a stop string's end: what is held is the stop string and what followed it, not the answer
    stop_string = {**end, "eos_reason": "stop_string", "text": "ok", "token_ids": torch.tensor([[5]]),
                   "held": {"text": "STOP and more"}}
    (event,) = translate_results([stop_string], {1: JobInfo(1)}, str, raw=raw)
    assert (event.token_id, event.text) == (5, "ok")


def test_a_held_answer_gives_each_token_the_text_it_completes():
    """exllamav2 0.3.2 holds everything after an invalid byte until a stop token: released token by token, as the
    transformers backend's detokenizer does, so that the engine cuts a stop string at the token that completes it
    and counts no token after it (all of the text rode on the stop token, every held token counted). An answer
    that stops inside a character ends in U+FFFD, on the stop token (as the transformers backend flushes it)."""
    held = {"token_ids": torch.tensor([[173, 665, 21, 173, 2]]), "token_probs": torch.tensor([[0.5] * 5])}
    end = {"stage": "streaming", "identifier": 1, "eos": True, "eos_reason": "stop_token", "new_tokens": 5,
           "eos_triggering_token_id": 2, "held": held}
    raw = {173: b"\xe2", 665: b" STOP", 21: b" more", 2: b""}.__getitem__
    for info in (JobInfo(1), JobInfo(1, logprobs=True)):
        events = translate_results([end], {1: info}, str, raw=raw)
        assert [(e.token_id, e.text) for e in events] == [
            (173, ""), (665, "\ufffd STOP"), (21, " more"), (173, ""), (2, "\ufffd")]
        assert [e.finish for e in events] == [None] * 4 + [FinishReason.STOP]


def test_any_release_of_several_tokens_gives_each_the_text_it_completes():
    """exllamav2 also releases what it held after an invalid byte at ``max_new_tokens`` (and at five U+FFFD): token
    by token too, where the tokens' bytes make the library's text; where they do not, the text stays on the last."""
    raw = {173: b"\xe2", 665: b" STOP", 21: b" more", 5: b"a", 6: b"b"}.__getitem__
    end = streaming(1, [173, 665, 21, 173], "\ufffd STOP more\ufffd", eos=True, eos_reason="max_new_tokens")
    events = translate_results([end], {1: JobInfo(1)}, str, raw=raw)
    assert [e.text for e in events] == ["", "\ufffd STOP", " more", "\ufffd"]
    assert [e.finish for e in events] == [None] * 3 + [FinishReason.LENGTH]
    other = streaming(1, [5, 6], "xy")  # (a text the bytes do not make: left as the library gave it)
    assert [e.text for e in translate_results([other], {1: JobInfo(1)}, str, raw=raw)] == ["", "xy"]


class HoldingJobV2:
    """exllamav2 0.3.2's ``receive_sample`` reduced to its holding: tokens and probabilities held while their text
    decodes with U+FFFD (one to four of them), released together; at a stop token left under ``held``."""

    return_probs, return_top_tokens = True, 0

    def __init__(self, raw, stop: int):
        self.raw, self.stop, self.held, self.probs, self.new_tokens = raw, stop, [], [], 0

    def receive_sample(self, logits, token, k_tokens, k_probs, prob, filter_eos, results, first=True):
        self.held.append(int(token))
        self.probs.append(float(prob))
        self.new_tokens += 1
        r = {"stage": "streaming", "identifier": 1, "eos": False}
        pack = {"token_ids": torch.tensor([self.held]), "token_probs": torch.tensor([self.probs])}
        if int(token) == self.stop:
            r.update(eos=True, eos_reason="stop_token", new_tokens=self.new_tokens, held=pack)
        elif not 1 <= b"".join(map(self.raw, self.held)).decode("utf-8", "replace").count("\ufffd") < 5:
            r.update(pack, text=b"".join(map(self.raw, self.held)).decode("utf-8", "replace"))
            self.held, self.probs = [], []
        results.append(r)
        return r["eos"], token


class HoldingJobV3(HoldingJobV2):
    """The same holding behind exllamav3's ``receive_sample`` signature (``results`` after ``next_prob``)."""

    def receive_sample(self, logits, token, k_tokens, k_probs, prob, results, first=True):
        return super().receive_sample(logits, token, k_tokens, k_probs, prob, False, results, first)


@pytest.mark.parametrize("library", ["exllamav2", "exllamav3"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "library-holds"])
def test_held_tokens_go_out_in_the_step_that_samples_them(stream, library):
    """``StreamHeldV2``/``V3`` put each token the library holds after an invalid byte out at once, with the text it
    completes and its probability, and cut them off the library's release at the stop token (nothing twice);
    without the tokens' bytes to spell them (``xllm_bind_stream(None)``) the library's hold stands, released at the
    end. (exllamav3 put a byte's token out with the token after it, a step late.)"""
    from xllm_jupyter.backends.exllama_stream import StreamHeldV2, StreamHeldV3

    raw = {21: b" Hi", 173: b"\xe2", 665: b" there", 2: b""}.__getitem__
    mixin, holding = (StreamHeldV2, HoldingJobV2) if library == "exllamav2" else (StreamHeldV3, HoldingJobV3)
    job = type("Job", (mixin, holding), {})(raw, 2)
    job.xllm_bind_stream(raw if stream else None)
    steps = []
    for token in (21, 173, 665, 21, 173, 2):
        results: list = []
        args = (False, results) if library == "exllamav2" else (results,)
        job.receive_sample(None, torch.tensor([[token]]), None, None, torch.tensor([[0.5]]), *args)
        events = translate_results(results, {1: JobInfo(1, logprobs=True)}, str, raw=raw)
        steps.append([(e.token_id, e.text) for e in events if e.token_id is not None])
        assert all(e.logprob == pytest.approx(math.log(0.5)) for e in events if e.token_id is not None)
    assert events[-1].finish is FinishReason.STOP and events[-1].completion_tokens == 6
    if stream:
        assert steps == [[(21, " Hi")], [(173, "")], [(665, "\ufffd there")], [(21, " Hi")], [(173, "")],
                         [(2, "\ufffd")]]
    else:
        assert steps == [[(21, " Hi")], [], [], [], [],
                         [(173, ""), (665, "\ufffd there"), (21, " Hi"), (173, ""), (2, "\ufffd")]]


def test_speculative_results_give_one_event_per_token_and_count_acceptance():
    stats = SpeculativeStats()
    r = streaming(2, [5, 6, 7], "abc", eos=True, eos_reason="stop_token", new_tokens=3,
                  accepted_draft_tokens=6, rejected_draft_tokens=2)
    events = translate_results([r], {2: JobInfo(2)}, str, stats)
    assert [e.token_id for e in events] == [5, 6, 7]
    assert [e.text for e in events] == ["", "", "abc"] and events[-1].finish is FinishReason.STOP
    assert events[0].finish is None and stats.acceptance_rate == pytest.approx(0.75)
    assert SpeculativeStats().acceptance_rate is None


def test_logprobs_and_top_logprobs_from_probabilities():
    r = streaming(3, [4], "x", token_probs=torch.tensor([[0.5]]), top_k_tokens=torch.tensor([[[4, 8, 9]]]),
                  top_k_probs=torch.tensor([[[0.5, 0.25, 0.0]]]))
    (event,) = translate_results([r], {3: JobInfo(3, logprobs=True, top_logprobs=2)}, lambda t: f"<{t}>")
    assert event.logprob == pytest.approx(math.log(0.5))
    assert [name for name, _ in event.top_logprobs] == ["<4>", "<8>"]
    assert event.top_logprobs[1][1] == pytest.approx(math.log(0.25))
    # a zero probability stays a finite number
    (plain,) = translate_results([streaming(3, [4], "x", token_probs=torch.tensor([[0.0]]))], {3: JobInfo(3, True)}, str)
    assert plain.logprob == -9999.0


def test_the_first_token_carries_the_prompt_tokens_taken_from_the_prefix_cache():
    class LibraryJob:  # the two counters both libraries' jobs keep
        cached_pages, cached_tokens = 2, 37

    info = JobInfo(4, prompt_tokens=600)
    first, second = (translate_results([streaming(4, [t], "a", job=LibraryJob())], {4: info}, str, page_size=256)
                     for t in (1, 2))
    # known from the first token on, so a job the engine ends itself (a stop string) still reports it
    assert first[0].cached_tokens == 2 * 256 + 37 and info.cached == 549
    assert second[0].cached_tokens == 0


def test_a_job_the_library_failed_finishes_with_an_error():
    class LibraryJob:
        identifier = 5

    # exllamav3's reap_failed_job: no identifier key, the job object and the exception
    failed = {"job": LibraryJob(), "serial": 0, "stage": "error", "eos": True, "error": RuntimeError("CUDA out of memory")}
    (event,) = translate_results([failed, streaming(6, [3], "b")], {5: JobInfo(5)}, str)
    assert (event.job_id, event.token_id, event.finish, event.out_of_memory) == (5, None, FinishReason.ERROR, False)

    class OutOfMemoryError(RuntimeError):  # torch's, by name
        pass

    (oom,) = translate_results([{**failed, "error": OutOfMemoryError("CUDA out of memory")}], {5: JobInfo(5)}, str)
    assert oom.finish is FinishReason.ERROR and oom.out_of_memory


def test_a_failed_load_unloads_every_model_it_started_and_keeps_going_past_errors():
    from xllm_jupyter.backends.exllama_common import unload_quietly

    class Weights:
        def __init__(self, fails=False):
            self.fails, self.unloaded = fails, False

        def unload(self):
            self.unloaded = True
            if self.fails:
                raise RuntimeError("half-loaded")

    models = [Weights(fails=True), Weights()]
    unload_quietly(models)
    assert all(m.unloaded for m in models)


def test_a_failed_load_is_an_engine_error_naming_the_library_or_a_503_when_the_gpus_are_full():
    import weakref

    from xllm_jupyter.backends.exllama_common import guarded_load
    from xllm_jupyter.core.errors import Overloaded

    class Weights:
        unloaded = False

        def unload(self):
            self.unloaded = True

    def failing(error, message, started):
        def build(on_gpu):
            cache = Weights()  # held by this frame only, as a library's cache is
            caches.append(weakref.ref(cache))
            on_gpu.append(started)
            raise error(message)  # made here, as a library's error is: nothing else holds it
        return build

    started, caches = Weights(), []
    with pytest.raises(EngineError, match="with exllamav3 .ValueError."):
        guarded_load(failing(ValueError, "bad config at /home/me/model", started), "m", "exllamav3")
    assert started.unloaded
    with pytest.raises(TypeError):  # not a load error: a bug, raised as it is
        guarded_load(failing(TypeError, "oops", Weights()), "m", "exllamav2")
    # both libraries' auto-split, once every GPU is full: a 503, raised after the cache is gone
    started = Weights()
    with pytest.raises(Overloaded) as exc:
        guarded_load(failing(RuntimeError, "Insufficient VRAM for model and cache", started), "m", "exllamav2")
    error = exc.value
    assert isinstance(error, Overloaded) and error.code == "insufficient_memory" and "cache_tokens" in error.message
    assert started.unloaded and caches[-1]() is None and error.__context__ is None
    assert guarded_load(lambda on_gpu: "loaded", "m", "exllamav3") == "loaded"


def test_special_tokens_the_library_streams_as_text_are_taken_out():
    special = {2: "<|im_end|>"}
    # exllamav3 streams a special token's literal text (here under ignore_eos, with a drafted token after it)
    (end, after) = translate_results([streaming(8, [2, 40], "<|im_end|> ok")], {8: JobInfo(8)}, str, special=special)
    assert (end.token_id, end.text, after.token_id, after.text) == (2, "", 40, " ok")
    # the same text from ordinary tokens stays
    (plain,) = translate_results([streaming(8, [41], "<|im_end|>")], {8: JobInfo(8)}, str, special=special)
    assert plain.text == "<|im_end|>"


@pytest.fixture(scope="module")
def markup_chat():
    """A real tokenizer with Mistral's tool-call markup added as special tokens, as Mistral's own have it."""
    from tests.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    return ChatTokenizer(tokenizer, "m")


def test_a_job_keeping_tool_markup_keeps_its_special_tokens_text_and_no_others(markup_chat):
    calls, args = markup_chat.tokenizer.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"])
    special = {2: "<|im_end|>", calls: "[TOOL_CALLS]", args: "[ARGS]"}
    kept = markup_chat.keeping(("[TOOL_CALLS]", "[ARGS]"))
    step = streaming(8, [calls, 40, args, 2], "[TOOL_CALLS]x[ARGS]<|im_end|>", token_probs=torch.tensor([[0.5] * 4]))
    raw = markup_chat.token_bytes
    keeping = translate_results([step], {8: JobInfo(8, logprobs=True, kept=kept)}, str, special=special, raw=raw)
    assert "".join(e.text for e in keeping) == "[TOOL_CALLS]x[ARGS]"
    assert [e.token_bytes for e in keeping][::2] == [b"[TOOL_CALLS]", b"[ARGS]"]  # its logprobs name them too
    plain = translate_results([step], {8: JobInfo(8, logprobs=True)}, str, special=special, raw=raw)
    assert "".join(e.text for e in plain) == "x" and [e.token_bytes for e in plain][::2] == [b"", b""]


def test_a_job_keeping_tool_markup_names_it_in_top_logprobs_as_its_bytes_spell_it(markup_chat):
    # top_logprobs named a kept token by the model's piece (""), its bytes and the chosen token's name being its text
    from xllm_jupyter.backends.detokenize import token_text

    calls, args = markup_chat.tokenizer.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"])
    step = streaming(8, [args], "[ARGS]", token_probs=torch.tensor([[0.5]]),
                     top_k_tokens=torch.tensor([[[args, calls, 40]]]), top_k_probs=torch.tensor([[[0.5, 0.3, 0.2]]]))
    info = JobInfo(8, logprobs=True, top_logprobs=3, kept=markup_chat.keeping(("[TOOL_CALLS]", "[ARGS]")))
    piece = lambda t: token_text(markup_chat.token_bytes(t))  # noqa: E731 (the model's own: DynamicGeneratorModel._piece)
    (event,) = translate_results([step], {8: info}, piece, raw=markup_chat.token_bytes)
    assert event.token_bytes == b"[ARGS]" and event.top_bytes[:2] == (b"[ARGS]", b"[TOOL_CALLS]")
    assert [name for name, _ in event.top_logprobs] == ["[ARGS]", "[TOOL_CALLS]", piece(40)]
    (plain,) = translate_results([step], {8: JobInfo(8, logprobs=True, top_logprobs=3)}, piece,
                                 raw=markup_chat.token_bytes)
    assert [name for name, _ in plain.top_logprobs] == ["", "", piece(40)]  # a job without tools: as before


def test_a_job_keeping_tool_markup_asks_the_library_for_special_tokens_text(markup_chat, tiny_llama_dir):
    """exllamav2 streams no special token's text unless asked (exllamav3 some of them): such a job asks, and its held
    tokens are spelled with the markup too; other jobs are as before."""
    from xllm_jupyter.backends import exllamav2, exllamav3

    keeping, plain = job(1, keep_special=("[TOOL_CALLS]", "[ARGS]")), job(2)
    assert exllamav2.job_kwargs(keeping, None, 4)["decode_special_tokens"] is True
    assert exllamav3.job_kwargs(keeping, sampler=None, filters=None)["decode_special_tokens"] is True
    assert not exllamav2.job_kwargs(plain, None, 4)["decode_special_tokens"]
    assert not exllamav3.job_kwargs(plain, sampler=None, filters=None)["decode_special_tokens"]
    model = ScriptedModel(ModelSpec(name="s", path=Path(tiny_llama_dir)), generator=ScriptedGenerator(),
                          chat=markup_chat, context_length=2048, vocab_size=len(markup_chat.tokenizer),
                          eos_token_ids=markup_chat.eos_ids(), max_batch_size=8, memory_bytes=1, details={})
    calls = markup_chat.tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    assert model.stream_bytes(keeping)(calls) == b"[TOOL_CALLS]" and model.stream_bytes(plain)(calls) == b""
    assert model.kept(job(3, keep_special=("<none>",))) is None  # not a special token here: nothing to keep
    # (Qwen's <tool_call>, not special: such a job asks the library for no special token's text)
    assert model.library_job(job(3, keep_special=("<none>",))).keep_special == () and model.library_job(keeping) is keeping


def test_results_of_unknown_jobs_are_ignored():
    assert translate_results([streaming(99, [1], "a")], {1: JobInfo(1)}, str) == []


# ----------------------------------------------------------- backend selection
def test_exllama_backends_are_registered_and_unavailable_without_cuda(tmp_path):
    for name in ("exllamav3", "exllamav2"):
        backend = get_backend(name)
        assert backend.name == name
        assert backend.available() is (torch.cuda.is_available() and __import__("importlib").util.find_spec(name) is not None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_selection_falls_back_to_transformers_and_refuses_gpu_only_formats(tiny_llama_dir):
    spec = ModelSpec(name="t", path=Path(tiny_llama_dir), format="safetensors")
    assert select_backend(spec).name == "transformers"
    with pytest.raises(InvalidRequest, match="No installed backend can load exl3"):
        select_backend(ModelSpec(name="q", path=Path(tiny_llama_dir), format="exl3"))
    with pytest.raises(InvalidRequest, match="not installed on this machine"):
        select_backend(ModelSpec(name="t", path=Path(tiny_llama_dir), format="safetensors", backend="exllamav3"))


def test_supports_checks_format_task_and_directory(tiny_llama_dir, tmp_path):
    v3, v2 = get_backend("exllamav3"), get_backend("exllamav2")
    d = Path(tiny_llama_dir)
    assert v3.supports(ModelSpec(name="a", path=d, format="exl3")) and v3.supports(ModelSpec(name="a", path=d))
    assert not v3.supports(ModelSpec(name="a", path=d, format="exl2"))
    assert v2.supports(ModelSpec(name="a", path=d, format="exl2")) and v2.supports(ModelSpec(name="a", path=d, format="gptq"))
    assert not v2.supports(ModelSpec(name="a", path=d, format="exl3"))
    assert not v3.supports(ModelSpec(name="a", path=d, task="embedding"))
    assert not v3.supports(ModelSpec(name="a", path=tmp_path / "missing", format="exl3"))


# ------------------------------------------------- job bookkeeping (scripted)
class ScriptedGenerator:
    """Stands in for the library generator: records enqueue/cancel, returns scripted results."""

    def __init__(self):
        self.enqueued, self.cancelled, self.script = [], [], []
        self.free, self.pending_jobs = 16, []

    def enqueue(self, job):
        self.enqueued.append(job)

    def cancel(self, job):
        self.cancelled.append(job)

    def iterate(self):
        return self.script.pop(0) if self.script else []


class ScriptedJob(dict):
    """A job record with the namespace hook the real job classes get from prefix_isolation."""

    def xllm_bind(self, isolation, namespace, page_size):
        self.update(namespace=namespace, page_size=page_size)

    def __getattr__(self, name):  # the counters the library's jobs keep as attributes
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ScriptedModel(DynamicGeneratorModel):
    backend_name = "scripted"

    def make_job(self, job):
        return ScriptedJob(identifier=job.job_id, max=job.max_tokens)

    def page_size(self):
        return 256

    def free_pages(self):
        return self.generator.free

    def total_pages(self):
        return 16

    def tokens_held(self, job):
        return len(job.prompt_ids) + job.max_tokens


@pytest.fixture()
def scripted(tiny_llama_dir):
    chat = ChatTokenizer.from_directory(str(tiny_llama_dir), "s")
    gen = ScriptedGenerator()
    model = ScriptedModel(ModelSpec(name="s", path=Path(tiny_llama_dir)), generator=gen, chat=chat, context_length=2048,
                          vocab_size=len(chat.tokenizer), eos_token_ids=chat.eos_ids(), max_batch_size=8,
                          memory_bytes=123, details={"backend": "scripted", "mode": "paged"})
    return model, gen


def job(i, **kw):
    return SequenceJob(job_id=i, prompt_ids=(1, 2, 3), max_tokens=4, sampling=SamplingParams(temperature=0), **kw)


def test_cancel_frees_the_job_at_once_and_reports_it_next_step(scripted):
    model, gen = scripted
    model.add(job(1, cache_namespace="alice"))
    model.add(job(2))
    assert model.active_jobs() == 2 and len(gen.enqueued) == 2
    assert [j["namespace"] for j in gen.enqueued] == ["alice", ""]  # every job carries its cache namespace
    model.cancel(1)
    assert gen.cancelled == [gen.enqueued[0]]  # pages freed now, not at the next step
    gen.script.append([streaming(2, [9], "z", eos=True, eos_reason="max_new_tokens", new_tokens=1, prompt_tokens=3,
                                 cached_tokens=0)])
    events = model.step()
    assert (events[0].job_id, events[0].finish) == (1, FinishReason.CANCELLED)
    assert (events[1].job_id, events[1].finish) == (2, FinishReason.LENGTH)
    assert model.active_jobs() == 0
    model.cancel(2)  # already finished: nothing to cancel
    assert model.step() == [] and len(gen.cancelled) == 1


def test_admission_counts_free_pages_less_what_jobs_not_started_still_need(scripted):
    from types import SimpleNamespace

    model, gen = scripted
    gen.free, gen.pending_jobs = 10, [SimpleNamespace(current_new_pages_required=lambda: 3)]
    assert model.admission_budget() == 7
    assert model.admission_cost(job(1)) == 1  # 3 prompt + 4 answer tokens: one page
    big = SequenceJob(job_id=2, prompt_ids=(1,) * 10_000, max_tokens=4, sampling=SamplingParams())
    assert model.admission_cost(big) == 16  # never more than the cache: the library refuses it, it never waits


def test_details_report_prefix_cache_and_speculation(scripted):
    from types import SimpleNamespace

    model, gen = scripted
    model._details["speculative"] = {"method": "ngram"}
    model.add(SequenceJob(job_id=1, prompt_ids=(1,) * 512, max_tokens=4, sampling=SamplingParams(temperature=0)))
    native = SimpleNamespace(cached_pages=1, cached_tokens=0)  # the library job's counters
    gen.script.append([streaming(1, [4, 5], "ab", eos=True, eos_reason="stop_token", new_tokens=2, prompt_tokens=512,
                                 cached_tokens=256, accepted_draft_tokens=1, rejected_draft_tokens=3, job=native)])
    model.step()
    d = model.details()
    assert d["prefix_cache"] == {"prompt_tokens": 512, "cached_tokens": 256, "hit_rate": 0.5,
                                 "scope": "per cache namespace"}
    assert d["speculative"]["acceptance_rate"] == 0.25 and d["mode"] == "paged"
    assert model.memory_bytes() == 123


def test_a_job_the_engine_cancels_mid_answer_still_counts_its_cache_hits_and_drafts(scripted):
    from types import SimpleNamespace

    model, gen = scripted
    model._details["speculative"] = {"method": "ngram"}
    model.add(SequenceJob(job_id=1, prompt_ids=(1,) * 300, max_tokens=40, sampling=SamplingParams(temperature=0)))
    native = SimpleNamespace(cached_pages=1, cached_tokens=10)
    gen.script.append([streaming(1, [4], "a", job=native)])
    (event,) = model.step()
    assert event.cached_tokens == 266  # on the first token: the runner keeps it for usage
    # a stop string matched: the engine cancels the job, which never sends its end-of-sequence result
    gen.enqueued[0].update(accepted_draft_tokens=3, rejected_draft_tokens=1)
    model.cancel(1)
    d = model.details()
    assert d["prefix_cache"]["prompt_tokens"] == 300 and d["prefix_cache"]["cached_tokens"] == 266
    assert d["speculative"]["acceptance_rate"] == 0.75


def test_chat_tokenizer_renders_the_template_and_finds_end_of_turn(tiny_llama_dir):
    chat = ChatTokenizer.from_directory(str(tiny_llama_dir), "t")
    from xllm_jupyter.core.types import ChatMessage

    text = chat.render_chat([ChatMessage(role="user", content="hello")])
    assert "hello" in text and text.rstrip().endswith("assistant")
    vocab = chat.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in chat.eos_ids()
    assert chat.detokenize(chat.tokenize("a small test", add_special_tokens=False)) == "a small test"


def test_jit_progress_counts_object_files(tmp_path, caplog, monkeypatch):
    from xllm_jupyter.backends import jit

    monkeypatch.setattr(jit, "PROGRESS_INTERVAL", 0.05)
    (tmp_path / "a.o").write_bytes(b"")
    progress = jit.BuildProgress("exllamav3", tmp_path, 10)
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.backends.jit"):
        progress.start()
        import time

        time.sleep(0.3)
        progress.stop()
    assert any("compiled 1 of 10" in r.getMessage() for r in caplog.records)


def test_jit_progress_counts_the_sources_a_cuda_build_compiles(tmp_path, monkeypatch):
    """exllamav3 1.6.5 ships 202 sources and compiles 194 on CUDA: ROCm's under rocm/ and hipify's outputs are
    not built (its ``extension_sources``), so "compiled 194 of 202" would never reach the end."""
    import importlib.machinery
    import importlib.util

    from xllm_jupyter.backends import jit

    root = tmp_path / "exllamav3"
    for name in ("exllamav3_ext/bindings.cpp", "exllamav3_ext/gemm/a.cu", "exllamav3_ext/util.c",
                 "exllamav3_ext/rocm/rdna.cu", "exllamav3_ext/rocm/compat.cpp", "exllamav3_ext/gemm/a_hip.cpp",
                 "exllamav3_ext/hip_drv.cpp", "exllamav3_ext/gemm/a.cuh", "exllamav3_ext/notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    found = importlib.machinery.ModuleSpec("exllamav3", None, is_package=True)
    found.submodule_search_locations = [str(root)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: found if name == "exllamav3" else None)
    assert jit._source_count("exllamav3", "exllamav3_ext") == 3


def test_exllamav2_rope_parameters_it_cannot_map_are_an_error_not_a_wrong_model(tmp_path):
    from types import SimpleNamespace

    from xllm_jupyter.backends.exllamav2 import apply_rope_parameters

    config = SimpleNamespace(rotary_embedding_base=10000.0, alt_rope_method=None)
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e6, "rope_type": "longrope"}}))
    with pytest.raises(EngineError, match="longrope"):
        apply_rope_parameters(config, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3"}}))
    with pytest.raises(EngineError, match="lack 'factor'"):
        apply_rope_parameters(config, tmp_path)
    # transformers 4's keys: exllamav2 reads them itself
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3"},
                                                      "rope_parameters": {"rope_theta": 1.0}}))
    fresh = SimpleNamespace(rotary_embedding_base=5e5)
    apply_rope_parameters(fresh, tmp_path)
    assert fresh.rotary_embedding_base == 5e5


@pytest.mark.exllama
def test_the_kernel_warm_up_calls_exllamav3_as_its_signature_takes_it():
    """``warm_up_kernels`` runs only on a GPU: its call must at least fit the library's method."""
    import inspect

    from xllm_jupyter.backends.exllamav3 import warm_up_kernels

    require_library("exllamav3")  # (with its compiled module: importing it would build one for minutes)
    from exllamav3 import Model

    calls = []

    class Loaded:
        def warmup(self, *args, **kwargs):
            inspect.signature(Model.warmup).bind(self, *args, **kwargs)  # TypeError if the library takes other names
            calls.append(kwargs)
            return ["a pass"]

    warm_up_kernels(Loaded(), object(), exllama_options({"max_batch_size": 64}))
    assert calls == [{"cache": calls[0]["cache"], "max_chunk_size": 2048, "max_batch_size": 8}]


@pytest.fixture
def exllamav2_paged(monkeypatch):
    """exllamav2's estimate as where flash-attn (paged mode) is installed."""
    from xllm_jupyter.backends import exllamav2_plan

    monkeypatch.setattr(exllamav2_plan, "runs_paged", lambda config: True)


def test_the_memory_budget_sees_the_kv_cache_an_exllama_load_allocates(tmp_path, exllamav2_paged):
    from xllm_jupyter.backends.memory_estimate import kv_cache_bytes
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend
    from xllm_jupyter.backends.exllamav3 import ExllamaV3Backend

    llama3_8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
                 "max_position_embeddings": 8192}
    # 32 layers x 8 heads x 128 x (16 + 16) bits per token: 8 GiB at the default 65,536 tokens
    assert kv_cache_bytes(llama3_8b, 65536, None) == 8 * 2**30
    assert kv_cache_bytes(llama3_8b, 65536, (4, 4)) == 2 * 2**30
    assert kv_cache_bytes({"num_hidden_layers": 2}, 1000, None) == 0  # a shape it cannot read: no guess
    (tmp_path / "config.json").write_text(json.dumps(llama3_8b))
    for backend in (ExllamaV3Backend(), ExllamaV2Backend()):
        spec = ModelSpec(name="m", path=tmp_path, format="exl3", options=BackendOptions(cache_tokens=16384, kv_cache_bits="q8"))
        assert backend.cache_bytes_estimate(spec) == 16384 * 32 * 8 * 128 * 2
    assert ExllamaV3Backend().cache_bytes_estimate(ModelSpec(name="m", path=tmp_path / "gone")) == 0


def test_exllamav2_unpaged_estimate_counts_the_one_context_it_allocates(tmp_path, monkeypatch):
    """Without flash-attn exllamav2 runs unpaged: its cache is one context (the model's max_seq_len), not the
    paged default of 65,536 tokens; with a draft window, that context and the window (plan_cache)."""
    from xllm_jupyter.backends import exllamav2_plan
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend

    shape = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512,
             "max_position_embeddings": 4096, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(shape))
    per_token = 4 * 2 * 64 * 4  # layers x kv heads x head size x (2 + 2 bytes)

    def estimate(paged, **options):
        monkeypatch.setattr(exllamav2_plan, "runs_paged", lambda config: paged)
        spec = ModelSpec(name="m", path=tmp_path, format="exl2", options=BackendOptions(**options))
        return ExllamaV2Backend().cache_bytes_estimate(spec) // per_token

    assert estimate(True) == 65536 and estimate(False) == 4096
    assert estimate(False, cache_tokens=1000) == 1024  # a configured cache bounds the context: 1,000 -> a page
    assert estimate(False, ngram_draft=2, num_draft_tokens=4) == 4096 + 256  # the window needs another page
    assert estimate(True, ngram_draft=2, num_draft_tokens=4) == 65536
    # the context exllamav2 reads first, as it reads it
    (tmp_path / "config.json").write_text(json.dumps({**shape, "max_sequence_length": 8192}))
    assert estimate(False) == 8192
    # YaRN: max_seq_len kept (the context served shorter by the window), so no page more
    (tmp_path / "config.json").write_text(json.dumps({**shape, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}))
    assert estimate(False, ngram_draft=2, num_draft_tokens=4) == 4096


def test_whether_exllamav2_runs_paged_is_told_without_importing_it(tmp_path, monkeypatch):
    """flash-attn 2.5.7+ with its CUDA module, read from its files (exllamav2's test, not its import)."""
    import sys

    from xllm_jupyter.backends.exllamav2_plan import flash_attn_version, runs_paged

    monkeypatch.delitem(sys.modules, "exllamav2.attn", raising=False)
    monkeypatch.delenv("EXLLAMA_NO_FLASH_ATTN", raising=False)
    package = tmp_path / "flash_attn"
    package.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    for version, cuda_module, softcap, paged in [("2.8.3.post2", True, False, True), ("2.5.6", True, False, False),
                                                 ("2.5.7", True, False, True), ("2.5.9", True, True, False),
                                                 ("2.6.3", True, True, True), ("2.8.3", False, False, False)]:
        (package / "__init__.py").write_text(f'__version__ = "{version}"\n\nimport nothing_here\n')
        module = tmp_path / "flash_attn_2_cuda.so"
        if cuda_module:
            module.write_bytes(b"")
        elif module.exists():
            module.unlink()
        import importlib

        importlib.invalidate_caches()
        config = {"attn_logit_softcapping": 50.0} if softcap else {}
        assert runs_paged(config) is paged, version
    assert flash_attn_version() == (2, 8, 3) and "flash_attn" not in sys.modules
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")
    assert not runs_paged({})


def test_the_estimate_counts_a_draft_models_weights_and_cache_and_exllama_never_takes_cpu(tmp_path, exllamav2_paged):
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend
    from xllm_jupyter.backends.exllamav3 import ExllamaV3Backend

    shape = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 2, "hidden_size": 512}
    model, draft = tmp_path / "model", tmp_path / "draft"
    for path, layers in ((model, 4), (draft, 2)):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": layers}))
    (draft / "model.safetensors").write_bytes(b"\0" * 5000)
    per_layer = 4096 * 2 * 64 * 4  # tokens x kv heads x head size x (2 + 2 bytes)
    options = BackendOptions(cache_tokens=4096)
    for backend in (ExllamaV3Backend(), ExllamaV2Backend()):
        alone = backend.cache_bytes_estimate(ModelSpec(name="m", path=model, context_length=2048, options=options))
        assert alone == 4 * per_layer
        drafted = ModelSpec(name="m", path=model, context_length=2048,
                            options=dataclasses.replace(options, draft_model_path=str(draft)))
        assert backend.cache_bytes_estimate(drafted) == alone + 2 * per_layer + disk_bytes(draft)
        # a quantized cache: exllamav3 stores the draft's cache the same way, exllamav2 gives it an FP16 one
        q4 = dataclasses.replace(drafted, options=dataclasses.replace(drafted.options, kv_cache_bits="q4"))
        draft_cache = 2 * per_layer // (4 if backend.name == "exllamav3" else 1)
        assert backend.cache_bytes_estimate(q4) == 4 * per_layer // 4 + draft_cache + disk_bytes(draft)
        assert backend.memory_device(drafted) == "cuda"  # auto-split over the GPUs, whatever engine.device says
        # engine.device: cpu leaves FP16 models to transformers instead of loading them on the GPU
        assert backend.supports(ModelSpec(name="m", path=model, format="safetensors"))
        assert not backend.supports(ModelSpec(name="m", path=model, format="safetensors", options=BackendOptions(device="cpu")))
    # a draft whose vocabulary is larger than the model's does not load (draft_vocabulary_fits): not counted
    (model / "config.json").write_text(json.dumps({**shape, "vocab_size": 1000}))
    (draft / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": 2, "vocab_size": 1024}))
    for backend in (ExllamaV3Backend(), ExllamaV2Backend()):
        drafted = ModelSpec(name="m", path=model, context_length=2048,
                            options=dataclasses.replace(options, draft_model_path=str(draft)))
        assert backend.cache_bytes_estimate(drafted) == 4 * per_layer
    # nor is a draft window set aside for it: exllamav3's cache for a context of 65,535 is one token past it, 256
    # pages (the window's 4 more tokens would take a 257th)
    per_token = per_layer // 4096
    drafted = ModelSpec(name="m", path=model, context_length=65535,
                        options=BackendOptions(draft_model_path=str(draft), num_draft_tokens=4))
    assert ExllamaV3Backend().cache_bytes_estimate(drafted) == 4 * per_token * 65536


@pytest.mark.parametrize("library", ["exllamav2", "exllamav3"])
def test_a_library_that_fails_to_import_ahead_fails_the_load_with_its_own_error_once(tmp_path, monkeypatch, library):
    """``import_libraries`` never raises: a library whose import fails (its CUDA kernels do not build, say) makes it
    return False, and the load raises that same error as it always did, without importing (building) again;
    the load after that tries again, as before."""
    from xllm_jupyter.backends import exllama_common
    from xllm_jupyter.backends.registry import get_backend

    runs = tmp_path / "runs"
    package = tmp_path / "site" / library
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"with open({str(runs)!r}, 'a') as f:\n    f.write('x')\n"
        f"raise RuntimeError(\"Error building extension '{library}_ext'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(exllama_common, "cuda_available", lambda: True)
    backend = get_backend(library)
    spec = ModelSpec(name="m", path=tmp_path, format="exl2" if library == "exllamav2" else "exl3")
    assert backend.available()
    assert backend.import_libraries(spec) is False
    with pytest.raises(RuntimeError, match=f"Error building extension '{library}_ext'") as first:
        backend.load(spec)
    assert runs.read_text() == "x"  # the import ran once for the two
    with pytest.raises(RuntimeError, match="Error building extension") as second:
        backend.load(spec)
    assert runs.read_text() == "xx" and second.value is not first.value


def test_import_libraries_without_the_library_or_a_gpu_is_false_and_never_raises(tmp_path, monkeypatch):
    from xllm_jupyter.backends import exllama_common
    from xllm_jupyter.backends.registry import get_backend

    spec = ModelSpec(name="m", path=tmp_path, format="exl2")
    monkeypatch.setattr(exllama_common, "cuda_available", lambda: False)
    for library in ("exllamav2", "exllamav3"):
        assert get_backend(library).import_libraries(spec) is False


def test_imports_ahead_go_on_past_one_that_fails(tmp_path, monkeypatch):
    """One module that does not import (llguidance missing, say) is the load's to report: the others, and the
    tokenizer's, are still imported ahead, and the hook says it ran."""
    from xllm_jupyter.backends import exllama_common
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend

    (tmp_path / "site" / "exllamav2").mkdir(parents=True)
    (tmp_path / "site" / "exllamav2" / "__init__.py").write_text("")
    (tmp_path / "site" / "exllamav2" / "ext.py").write_text("")
    (tmp_path / "site" / "xllm_probe_module.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(exllama_common, "cuda_available", lambda: True)
    tokenizer_side = []
    monkeypatch.setattr(exllama_common, "import_tokenizer_side", tokenizer_side.append)

    class Backend(ExllamaV2Backend):
        load_modules = ("xllm_no_such_module", "xllm_probe_module")

    known = set(sys.modules)
    try:
        assert Backend().import_libraries(ModelSpec(name="m", path=tmp_path, format="exl2")) is True
        assert "xllm_probe_module" in sys.modules and tokenizer_side == [tmp_path]
    finally:  # the stand-in library leaves with its site
        for name in set(sys.modules) - known:
            if name.split(".")[0] in ("exllamav2", "xllm_probe_module"):
                sys.modules.pop(name)
