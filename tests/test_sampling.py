"""Logits processing and sampling: each filter and penalty, seeds, logprobs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from xllm_jupyter.backends.sampling import (  # noqa: E402
    Filters,
    JobSampler,
    apply_presence_frequency,
    apply_repetition_penalty,
    filter_logits,
    new_generator,
    sample,
)
from xllm_jupyter.core.errors import InvalidRequest  # noqa: E402
from xllm_jupyter.core.types import SamplingParams  # noqa: E402

V = 8
NEG = float("-inf")


def sampler(prompt=(), **kw) -> JobSampler:
    """A CPU sampler over a vocabulary of V tokens."""
    return JobSampler(SamplingParams(**kw), prompt, V, "cpu")


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(4)
    apply_presence_frequency(logits, torch.tensor([1, 2]), torch.tensor([1.0, 3.0]), presence=0.5, frequency=0.25)
    assert logits.tolist() == [0.0, -0.75, -1.25, 0.0]


def test_penalties_track_prompt_and_generated_ids():
    s = sampler(prompt=(1,), repetition_penalty=2.0, frequency_penalty=1.0)
    s.observe(3)
    s.observe(3)
    row = torch.full((V,), 4.0)
    s.adjust(row)
    # token 1: prompt only -> repetition penalty only; token 3: both; others untouched
    assert row.tolist() == [4.0, 2.0, 4.0, 0.0, 4.0, 4.0, 4.0, 4.0]


def test_logit_bias_is_added():
    s = sampler(logit_bias={2: 5.0, 7: -1.5})
    row = torch.zeros(V)
    s.adjust(row)
    assert row[2] == 5.0 and row[7] == -1.5 and row.abs().sum() == 6.5


def test_logit_bias_out_of_range_is_rejected():
    with pytest.raises(InvalidRequest):
        sampler(logit_bias={V: 1.0})


def kept(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Which tokens of each row survive the filters (one setting for every row)."""
    n = logits.shape[0]
    return torch.isfinite(filter_logits(logits, Filters([top_k] * n, [top_p] * n, [min_p] * n))).tolist()


def test_top_k_keeps_k_largest_and_zero_is_off():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert kept(logits, top_k=2) == [[False, True, False, True]]
    assert kept(logits, top_k=0) == [[True] * 4]
    mixed = filter_logits(logits.repeat(2, 1), Filters([2, 0], [1.0, 1.0], [0.0, 0.0]))
    assert mixed[0].tolist() == [NEG, 5.0, NEG, 4.0] and mixed[1].tolist() == [1.0, 5.0, 3.0, 4.0]


@pytest.mark.parametrize("first_k", [1, 2, 64])
def test_top_p_keeps_smallest_nucleus(first_k):
    from xllm_jupyter.backends.sampling import candidates

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.3, 0.15, 0.5], [0.9, 0.05, 0.03, 0.02]])
    values, ids = candidates(probs.log(), Filters([0] * 3, [0.8, 0.81, 0.5], [0.0] * 3), first_k=first_k)
    out = torch.full((3, 4), NEG).scatter_(-1, ids, values)
    assert torch.isfinite(out).tolist() == [
        [True, True, False, False],  # 0.5 + 0.3 reaches 0.8
        [False, True, True, True],  # needs the third most likely token to pass 0.81
        [True, False, False, False],  # the top token always survives
    ]


def test_top_p_applies_after_top_k():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # after top-2 the distribution is (4/7, 3/7): top_p 0.5 keeps only the first
    assert kept(logits, top_k=2, top_p=0.5) == [[True, False, False, False]]
    assert kept(logits, top_p=0.5) == [[True, True, False, False]]
    assert kept(logits, top_p=1.0) == [[True] * 4]


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(logits, min_p=0.5) == [[True, True, False, False]]
    assert kept(logits, top_k=3, min_p=0.5) == [[True, True, False, False]]
    assert kept(logits, min_p=0.0) == [[True] * 4]


def test_greedy_rows_take_argmax_after_bias():
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0], [0.0, 3.0, 1.0, 0, 0, 0, 0, 0]])
    res = sample(logits, [sampler(temperature=0), sampler(temperature=0, logit_bias={2: 10.0})], [None, None])
    assert res.token_ids == [1, 2]


def test_logit_bias_forces_a_sampled_token():
    logits = torch.randn(1, V)
    s = sampler(temperature=1.0, seed=1, logit_bias={5: 100.0})
    assert all(sample(logits.clone(), [s], [None]).token_ids == [5] for _ in range(20))


def draws(seed, n=30, batch_noise=False):
    """n tokens drawn at temperature 1 from fixed logits; optionally with a noisy neighbour row."""
    base = torch.linspace(0, 1, V)
    s = sampler(temperature=1.0, seed=seed)
    other = sampler(temperature=1.0)
    out = []
    for _ in range(n):
        if batch_noise:
            rows = torch.stack([torch.randn(V), base.clone()])
            out.append(sample(rows, [other, s], [None, None]).token_ids[1])
        else:
            out.append(sample(base.clone().unsqueeze(0), [s], [None]).token_ids[0])
    return out


def test_seed_makes_sampling_reproducible_regardless_of_batch():
    a = draws(1234)
    assert a == draws(1234)
    assert a == draws(1234, batch_noise=True)
    assert a != draws(4321)
    assert len(set(a)) > 1  # really sampling, not argmax


def test_unseeded_generators_differ():
    a, b = new_generator(None, "cpu"), new_generator(None, "cpu")
    assert torch.rand(4, generator=a).tolist() != torch.rand(4, generator=b).tolist()


def test_sampling_matches_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    s = sampler(temperature=1.0, seed=0)
    logits = probs.log().unsqueeze(0).repeat(4000, 1)
    counts = torch.bincount(torch.tensor(sample(logits, [s] * 4000, [None] * 4000).token_ids), minlength=V)
    freq = (counts.float() / 4000).tolist()
    assert abs(freq[0] - 0.6) < 0.04 and abs(freq[1] - 0.3) < 0.04 and sum(freq[3:]) == 0


def test_temperature_sharpens_and_filters_restrict_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    top1 = sampler(temperature=1.0, top_k=1, seed=3)
    assert {sample(logits.clone(), [top1], [None]).token_ids[0] for _ in range(20)} == {0}
    top2 = sampler(temperature=1.0, top_k=2, seed=3)
    assert {sample(logits.clone(), [top2], [None]).token_ids[0] for _ in range(60)} == {0, 1}
    nucleus = sampler(temperature=1.0, top_p=0.8, seed=3)  # probabilities ~.64 .24 .09 .03 ...
    assert {sample(logits.clone(), [nucleus], [None]).token_ids[0] for _ in range(60)} == {0, 1}
    # mixed rows in one call: each keeps its own filter
    rows, floor = logits.repeat(3, 1), sampler(temperature=1.0, min_p=0.3, seed=4)
    picks = [sample(rows.clone(), [top1, nucleus, floor], [None] * 3).token_ids for _ in range(60)]
    assert {p[0] for p in picks} == {0} and {p[1] for p in picks} == {0, 1} and {p[2] for p in picks} == {0, 1}
    cold = sampler(temperature=0.05, seed=3)
    assert {sample(logits.clone(), [cold], [None]).token_ids[0] for _ in range(20)} == {0}



@pytest.mark.parametrize("temperature", [1e-38, 1e-37, 1e-6])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_tiny_temperature_takes_the_most_likely_token(temperature, top_p):
    """Logits over 1e-38 overflowed to +inf: the softmax was NaN and any token came out (3 here, every seed)."""
    logits = torch.tensor([[0.5, 1.0, 30.0, 29.9, 0.0, -1.0, 0.0, 0.0]])  # (a model's logits run to 30 and more)
    picks = {sample(logits.clone(), [sampler(temperature=temperature, top_p=top_p, seed=seed)], [None]).token_ids[0]
             for seed in range(20)}
    assert picks == {2}
    # a row at an ordinary temperature beside it keeps its own distribution (the shift changes no probability)
    warm = [sample(logits.clone().repeat(2, 1), [sampler(temperature=temperature), sampler(temperature=1.0, seed=s)],
                   [None, None]).token_ids for s in range(60)]
    assert {w[0] for w in warm} == {2} and {w[1] for w in warm} == {2, 3}

def test_logprobs_come_from_raw_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0, 0, 0, 0, 0]])
    raw = torch.log_softmax(logits[0], -1)
    res = sample(logits.clone(), [sampler(temperature=0, logit_bias={3: 50.0})], [2])
    assert res.token_ids == [3]
    chosen, top = res.logprobs[0]
    assert math.isclose(chosen, float(raw[3]), rel_tol=1e-6)
    assert [t for t, _ in top] == [1, 2]
    assert math.isclose(top[0][1], float(raw[1]), rel_tol=1e-6)


def test_more_alternatives_than_the_vocabulary_stay_in_their_row():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0, 1.0]])
    res = sample(logits.clone(), [sampler(temperature=0), sampler(temperature=0)], [10, 3])
    first, second = res.logprobs[0][1], res.logprobs[1][1]
    assert len(first) == 8 and sorted(t for t, _ in first) == list(range(8)) and first[0][0] == 1
    assert len(second) == 3 and [t for t, _ in second][:2] == [0, 7]  # (the rest tie)


def test_invalid_repetition_penalty_is_rejected():
    with pytest.raises(InvalidRequest):
        sampler(repetition_penalty=0.0)


def test_seeds_outside_torchs_range_still_seed_reproducibly():
    # OpenAI's seed is any integer; torch takes [-2**63, 2**64): a larger one was a 500, not a seed
    from xllm_jupyter.backends.sampling import new_generator

    big = new_generator(2**64 + 5, "cpu")
    assert torch.equal(torch.rand(4, generator=big), torch.rand(4, generator=new_generator(5, "cpu")))
    assert torch.equal(torch.rand(4, generator=new_generator(-1, "cpu")),
                       torch.rand(4, generator=new_generator(-1, "cpu")))


# -- batched sampling against a plain per-row reference; device reads; non-finite rows --------

W = 300  # wide enough that a top-p search can need more than its first 64 columns

#: one row of each kind the sampler handles differently
MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, logit_bias={3: 4.0}, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.0, top_k=20, seed=2),
    SamplingParams(temperature=1.2, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.5, seed=4),
    SamplingParams(temperature=1.0, min_p=0.1, seed=5),
    SamplingParams(temperature=0.9, top_k=10, min_p=0.05, seed=6),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, seed=7),
    SamplingParams(temperature=1.0, repetition_penalty=1.2, top_p=0.95, seed=8),
    SamplingParams(temperature=1.0, logit_bias={7: 3.0, 9: -100.0}, seed=9),
    SamplingParams(temperature=1.0, top_p=0.0, seed=10),
    SamplingParams(temperature=1.5, top_p=0.999, seed=11),
    SamplingParams(temperature=0.8, top_k=W, seed=12),
]
MIXED_LP = [None, 2, 0, 5, None, 3, 1, None, 4, 2, None, 0, 3, 5]
PROMPT_IDS = (1, 2, 3, 4)


def reference_step(row, p, generated, gen, top_n):
    """One job's token and logprobs the plain way: one row, whole vocabulary, sorting."""
    vocab = row.shape[0]
    raw = torch.log_softmax(row, -1)
    x = row.clone()
    if p.repetition_penalty != 1.0:
        for t in set(PROMPT_IDS) | set(generated):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(generated):
        x[t] -= generated.count(t) * p.frequency_penalty + p.presence_penalty
    for t, b in p.logit_bias.items():
        x[t] += b
    if p.greedy:
        token = int(x.argmax())
    else:
        u = torch.rand(1, generator=gen)
        x = x / p.temperature
        top_k = p.top_k if 0 < p.top_k < vocab else 0
        top_p = min(max(p.top_p, 1e-6), 1.0)
        # truncated rows draw over their tokens best first, the others in vocabulary order
        order = x.argsort(descending=True) if top_k or top_p < 1.0 else torch.arange(vocab)
        y = x[order]
        if top_k:
            y[top_k:] = NEG
        if top_p < 1.0:
            probs = y.softmax(-1)
            y[probs.cumsum(-1) - probs >= top_p] = NEG
        if p.min_p:
            y[y < y.max() + torch.tensor(p.min_p).log()] = NEG
        cdf = y.softmax(-1).cumsum(-1)
        token = int(order[min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), vocab - 1)])
    lp = None if top_n is None else (float(raw[token]), raw.topk(top_n) if top_n else None)
    return token, lp


def test_batched_sampling_matches_a_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    samplers = [JobSampler(p, PROMPT_IDS, W, "cpu") for p in MIXED]
    ref_gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in MIXED]
    history: list[list[int]] = [[] for _ in MIXED]
    for _ in range(6):
        logits = torch.randn(len(MIXED), W, generator=gen) * 2
        res = sample(logits.clone(), samplers, MIXED_LP)
        assert res.bad_rows == [] and sorted(res.logprobs) == [i for i, n in enumerate(MIXED_LP) if n is not None]
        for i, p in enumerate(MIXED):
            token, lp = reference_step(logits[i], p, history[i], ref_gens[i], MIXED_LP[i])
            assert res.token_ids[i] == token, (i, p)
            if lp is not None:
                chosen, top = res.logprobs[i]
                assert abs(chosen - lp[0]) < 1e-6
                assert [t for t, _ in top] == ([] if lp[1] is None else lp[1].indices.tolist())
                assert all(abs(v - w) < 1e-6 for (_, v), w in zip(top, [] if lp[1] is None else lp[1].values.tolist()))
            history[i].append(token)
            samplers[i].observe(token)


def test_each_row_samples_as_if_alone():
    # the batched paths (index tensors, one packed transfer) must keep every row's result its own
    logits = torch.randn(len(MIXED), W, generator=torch.Generator().manual_seed(1)) * 2
    batch = sample(logits.clone(), [JobSampler(p, PROMPT_IDS, W, "cpu") for p in MIXED], MIXED_LP)
    for i, p in enumerate(MIXED):
        alone = sample(logits[i:i + 1].clone(), [JobSampler(p, PROMPT_IDS, W, "cpu")], [MIXED_LP[i]])
        assert alone.token_ids == [batch.token_ids[i]]
        assert alone.logprobs.get(0) == batch.logprobs.get(i)


class HostReads:
    """Counts what would wait for a GPU in a block: device-to-host reads and indexing with host data.

    On the CPU nothing waits, so this counts the calls that would: scalar reads (``item``,
    ``float``, ``bool``), ``nonzero`` (boolean-mask indexing), ``tolist``/``numpy``/``cpu``,
    and ``[]`` with a Python list (a blocking host-to-device copy of the index on CUDA).
    """

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.reads = 0
        self.list_indexing = 0
        aten = torch.ops.aten
        blocking = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default}
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.reads += func in blocking
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        for name in ("tolist", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), "reads"))
        for name in ("__getitem__", "__setitem__"):
            monkeypatch.setattr(torch.Tensor, name, self._indexing(getattr(torch.Tensor, name)))

    def _counted(self, method, counter):
        def wrapper(tensor, *args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return method(tensor, *args, **kwargs)
        return wrapper

    def _indexing(self, method):
        def wrapper(tensor, key, *args):
            keys = key if isinstance(key, tuple) else (key,)
            self.list_indexing += any(isinstance(k, list) for k in keys)
            return method(tensor, key, *args)
        return wrapper

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_one_device_read_per_sample_call(monkeypatch):
    # 16 rows all asking for logprobs: once 49 reads (ids, then three per logprob row)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(top_k=5, seed=2), SamplingParams(min_p=0.2, seed=3),
              SamplingParams(frequency_penalty=0.5, logit_bias={4: 2.0}, seed=4)]
    samplers = [JobSampler(params[i % len(params)], PROMPT_IDS, W, "cpu") for i in range(16)]
    logits = torch.randn(16, W, generator=torch.Generator().manual_seed(2)) * 4
    sample(logits.clone(), samplers, [3] * 16)  # penalties build their id tensors on the first call
    with HostReads(monkeypatch) as count:
        res = sample(logits.clone(), samplers, [3] * 16)
    assert len(res.logprobs) == 16
    assert (count.reads, count.list_indexing) == (1, 0)
    # without logprobs, and with rows that search for their top-p nucleus (one read per try)
    samplers += [JobSampler(SamplingParams(top_p=0.9, seed=5), (), W, "cpu")] * 2
    logits = torch.randn(18, W, generator=torch.Generator().manual_seed(3)) * 4
    with HostReads(monkeypatch) as count:
        sample(logits.clone(), samplers, [None] * 18)
    assert (count.reads, count.list_indexing) == (2, 0)


def test_non_finite_rows_are_reported_and_the_rest_sample_normally(monkeypatch):
    logits = torch.randn(6, W, generator=torch.Generator().manual_seed(4)) * 4
    logits[1, 5] = float("nan")  # e.g. fp16 overflow inside the model
    logits[2, 7] = float("inf")
    logits[3] = NEG  # nothing left to draw from
    logits[4, :100] = NEG  # a grammar mask: fine
    params = [SamplingParams(temperature=0), SamplingParams(top_p=0.9, seed=1), SamplingParams(temperature=0),
              SamplingParams(top_k=4, seed=2), SamplingParams(top_p=0.9, seed=3), SamplingParams(seed=4)]

    def run(rows):
        samplers = [JobSampler(params[i], (), W, "cpu") for i in rows]
        with HostReads(monkeypatch) as count:
            res = sample(logits[rows].clone(), samplers, [2] * len(rows))
        return res, count.reads

    res, reads = run(range(6))
    assert res.bad_rows == [1, 2, 3]
    assert sorted(res.logprobs) == [0, 4, 5]
    healthy, _ = run([0, 4, 5])
    assert [res.token_ids[i] for i in (0, 4, 5)] == healthy.token_ids
    assert [res.logprobs[i] for i in (0, 4, 5)] == [healthy.logprobs[j] for j in range(3)]
    assert res.token_ids[4] >= 100 and math.isfinite(res.logprobs[4][0])
    # the NaN row searching for a top-p nucleus must not widen the search past its first try
    assert reads == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_synchronization_per_sample_call_on_cuda():
    import warnings

    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(top_k=5, seed=2), SamplingParams(min_p=0.2, seed=3),
              SamplingParams(frequency_penalty=0.5, logit_bias={4: 2.0}, seed=4)]
    samplers = [JobSampler(params[i % len(params)], PROMPT_IDS, W, "cuda") for i in range(16)]
    logits = torch.randn(16, W, device="cuda") * 4
    sample(logits.clone(), samplers, [3] * 16)  # warm-up: pinned buffers, penalty id tensors
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample(logits.clone(), samplers, [3] * 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_seeded_draws_ignore_the_process_wide_default_dtype():
    """A half-precision model load elsewhere in the process sets torch's default dtype for every thread
    (transformers' from_pretrained does, while it builds the model): a seeded stream stays the same."""
    vocab = 50_000

    def draws() -> list[int]:
        s = JobSampler(SamplingParams(seed=7, frequency_penalty=0.5, logit_bias={3: 0.3}), (), vocab, "cpu")
        out = []
        for _ in range(20):
            token = sample(torch.zeros(1, vocab), [s], [None]).token_ids[0]
            s.observe(token)
            out.append(token)
        return out

    want = draws()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = draws()
    finally:
        torch.set_default_dtype(before)
    assert got == want
