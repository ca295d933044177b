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


def test_logprobs_come_from_raw_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0, 0, 0, 0, 0]])
    raw = torch.log_softmax(logits[0], -1)
    res = sample(logits.clone(), [sampler(temperature=0, logit_bias={3: 50.0})], [2])
    assert res.token_ids == [3]
    chosen, top = res.logprobs[0]
    assert math.isclose(chosen, float(raw[3]), rel_tol=1e-6)
    assert [t for t, _ in top] == [1, 2]
    assert math.isclose(top[0][1], float(raw[1]), rel_tol=1e-6)


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
