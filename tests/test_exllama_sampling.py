"""Presence/frequency penalties over the answer only, and exllamav2 logprobs from the model's logits (exllama_sampling.py).

exllamav2's job hands its logits, a strided view of the generator's buffer, to ``receive_logits``;
here a minimal job with the same two attributes stands in for the library's class (the library
itself runs this path in tests/test_exllama_library_serving.py), and the result must equal what
the transformers backend's sampler does to the same logits.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from xllm_jupyter.backends.exllama_common import v2_sampler_fields  # noqa: E402
from xllm_jupyter.backends.exllama_sampling import (  # noqa: E402
    AnswerPenaltiesV2,
    LogitsV2,
    RawLogprobsV2,
    v3_sampler_steps,
)
from xllm_jupyter.backends.sampling import (  # noqa: E402
    Filters,
    apply_presence_frequency,
    apply_repetition_penalty,
    filter_logits,
)
from xllm_jupyter.core.types import SamplingParams  # noqa: E402

VOCAB = 64


class _Ids:
    def __init__(self, ids):
        self.ids = torch.tensor([ids], dtype=torch.long)

    def torch(self):
        return self.ids


class _Sequence:
    def __init__(self, ids):
        self.sequence_ids = _Ids(ids)


class LibraryJob:
    """What AnswerPenaltiesV2 reads of exllamav2's job: the sequence so far; sampling returns the logits."""

    def __init__(self, ids):
        self.sequences = [_Sequence(ids)]

    def receive_logits(self, logits):
        return logits


class Job(AnswerPenaltiesV2, LibraryJob):
    pass


def penalized(prompt, answer, sampling):
    """One row of logits as the job leaves it, from a strided (1, 1, V) view of a (1, 2, V) buffer."""
    buffer = torch.linspace(-3.0, 3.0, 2 * VOCAB).reshape(1, 2, VOCAB).contiguous()
    job = Job(list(prompt) + list(answer))
    job.xllm_bind_penalties(len(prompt), sampling)
    view = buffer[0:1, 1:2, :]
    assert job.receive_logits(view) is view
    return buffer[0, 1].clone(), torch.linspace(-3.0, 3.0, 2 * VOCAB).reshape(2, VOCAB)[1].clone()


def test_presence_and_frequency_count_the_answer_not_the_prompt():
    prompt, answer = [7] * 50 + [8], [9, 9, 10]
    out, raw = penalized(prompt, answer, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[7] == raw[7] and out[8] == raw[8]  # prompt only: untouched
    assert out[9] == pytest.approx(raw[9] - 0.5 - 2 * 0.25) and out[10] == pytest.approx(raw[10] - 0.5 - 0.25)
    untouched = [i for i in range(VOCAB) if i not in (9, 10)]
    assert torch.equal(out[untouched], raw[untouched])


def test_the_order_and_values_match_the_transformers_backend():
    prompt, answer = [3, 4, 4, 60], [4, 5, 5, 5]
    sampling = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    out, raw = penalized(prompt, answer, sampling)
    # sampling.py: repetition over prompt and answer, then presence/frequency over the answer
    expected = apply_repetition_penalty(raw.clone(), torch.tensor([3, 4, 5, 60]), 1.3)
    expected = apply_presence_frequency(expected, torch.tensor([4, 5]), torch.tensor([1, 3]), 0.4, 0.2)
    assert torch.allclose(out, expected)


def test_no_penalties_leave_the_logits_alone():
    out, raw = penalized([1, 2, 3], [4, 4], SamplingParams(temperature=0.7))
    assert torch.equal(out, raw)


class SamplingLibraryJob:
    """What RawLogprobsV2 wraps: exllamav2's ``receive_logits`` giving its sampler's final probabilities
    (greedy: the chosen token at 1.0, no alternatives) in the shapes the library uses."""

    return_probs = True
    return_top_tokens = 2

    def receive_logits(self, logits):
        token = logits[:, 0, :4].argmax(dim=-1, keepdim=True)  # (1, 1), within the vocabulary
        return token, torch.zeros((1, 1, 2), dtype=torch.long), torch.tensor([[[1.0, 0.0]]]), torch.ones((1, 1)), False


class LogprobsJob(RawLogprobsV2, SamplingLibraryJob):
    pass


def test_exllamav2_logprobs_are_the_softmax_of_the_models_logits():
    logits = torch.tensor([[[2.0, 1.0, 0.0, 0.5, 9.0]]])  # the last column is padding past a vocabulary of 4
    job = LogprobsJob()
    job.xllm_bind_logprobs(4)
    token, top_tokens, top_probs, prob, _ = job.receive_logits(logits)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.5]), dim=0)
    assert token.tolist() == [[0]]  # the library's choice stands
    # its probability and the alternatives come from the logits, the padding left out
    assert prob.shape == (1, 1) and prob.item() == pytest.approx(expected[0].item())
    assert top_tokens.tolist() == [[[0, 1]]] and torch.allclose(top_probs[0, 0], expected[:2])


# ------------------------------------------------- exllamav2: bias and cuts done by the job
class CutJob(AnswerPenaltiesV2, LogitsV2, LibraryJob):
    pass


def cut(logits_row, sampling, *, prompt=(1,), answer=(), vocab=None):
    """The row as the job leaves it for exllamav2's sampler, from a strided (1, 1, V) view of a (1, 2, V) buffer."""
    width = logits_row.numel()
    buffer = torch.zeros((1, 2, width))
    buffer[0, 1] = logits_row
    job = CutJob(list(prompt) + list(answer))
    job.xllm_bind_penalties(len(prompt), sampling)
    job.xllm_bind_logits(sampling, vocab or width)
    view = buffer[0:1, 1:2, :]
    assert job.receive_logits(view) is view
    return buffer[0, 1].clone()


def kept(row):
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_exllamav2_top_p_keeps_the_token_that_crosses_p():
    """Probabilities 0.5, 0.3, 0.2 and top_p 0.6: OpenAI/HF keep the first two (the second crosses 0.6);
    exllamav2's own top_p keeps only the first (its mass stays within P), so the job cuts instead."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    out = cut(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert kept(out) == {0, 1} and torch.equal(out[:2], logits[:2])
    # the library is left the temperature and the draw only
    assert v2_sampler_fields(SamplingParams(temperature=0.8, top_p=0.6, top_k=5, min_p=0.1)) == {
        "temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "token_repetition_penalty": 1.0,
        "token_frequency_penalty": 0.0, "token_presence_penalty": 0.0}


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05, logit_bias={3: 5.0, 40: -100.0}),
    SamplingParams(temperature=1.5, top_p=0.5, min_p=0.3),
    SamplingParams(temperature=0.4, min_p=0.2, repetition_penalty=1.4, presence_penalty=0.8, logit_bias={9: 1.5}),
])
def test_exllamav2_cuts_like_the_transformers_backend(sampling):
    """Penalties, then the bias, then top-k/top-p/min-p at the sampling temperature, as sampling.py does; the
    padding past the vocabulary is never a candidate."""
    vocab, width = 60, 64
    logits = torch.linspace(-4.0, 4.0, width)[torch.randperm(width, generator=torch.Generator().manual_seed(5))]
    prompt, answer = [9, 10, 11], [9, 12]
    out = cut(logits, sampling, prompt=prompt, answer=answer, vocab=vocab)
    expected = logits[:vocab].clone()
    if sampling.repetition_penalty != 1.0:
        expected = apply_repetition_penalty(expected, torch.tensor([9, 10, 11, 12]), sampling.repetition_penalty)
    if sampling.presence_penalty:
        expected = apply_presence_frequency(expected, torch.tensor([9, 12]), torch.tensor([1, 1]),
                                            sampling.presence_penalty, sampling.frequency_penalty)
    for token, bias in sampling.logit_bias.items():
        expected[token] += bias
    survivors = filter_logits((expected / sampling.temperature).unsqueeze(0), Filters.of([sampling], vocab))[0]
    assert kept(out) == kept(survivors) and 1 < len(kept(out)) < vocab
    assert torch.allclose(out[list(kept(out))], expected[list(kept(out))])
    assert not torch.isfinite(out[vocab:]).any()


def test_exllamav2_greedy_keeps_the_bias_and_cuts_nothing():
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    out = cut(logits, SamplingParams(temperature=0.0, top_p=0.1, logit_bias={2: 10.0}))
    assert torch.isfinite(out).all() and out[2] == pytest.approx(10.0) and out.argmax() == 2
    untouched = cut(logits, SamplingParams(temperature=0.9))  # no bias, no cut: the buffer as it was
    assert torch.equal(untouched, logits)


def test_exllamav2_below_its_greedy_temperature_the_job_divides_the_logits():
    """exllamav2 decodes greedily below temperature 0.01; there the job divides the logits by the temperature
    (after the bias and the cuts, which are taken at it) and the library samples at 1.0."""
    logits = torch.tensor([2.0, 1.999, -3.0, 0.0])
    sampling = SamplingParams(temperature=0.005, logit_bias={3: 1.0}, top_k=2)
    out = cut(logits, sampling)
    assert kept(out) == {0, 1}
    assert torch.allclose(out[:2], (logits[:2] - 2.0) / 0.005)  # (shifted by the largest logit: out of overflow)
    assert v2_sampler_fields(sampling)["temperature"] == 1.0
    # at 0.01 and above the library's own temperature serves: the row is not divided
    assert torch.equal(cut(logits, SamplingParams(temperature=0.01)), logits)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_exllamav2_a_tiny_temperature_cannot_overflow_the_logits(top_p):
    """Dividing raw logits by 1e-38 overflows float32 (30 / 1e-38 = +inf, and the library's softmax then takes
    inf - inf = NaN: any token). The job shifts each row by its largest logit first: the same distribution,
    whose limit is the argmax."""
    logits = torch.tensor([30.0, 29.9, -3.0, 0.0])
    out = cut(logits, SamplingParams(temperature=1e-38, top_p=top_p))
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    assert out[0] == 0.0 and out.argmax() == 0 and (top_p == 1.0 or kept(out) == {0})
    assert torch.softmax(out, dim=-1).tolist() == [1.0, 0.0, 0.0, 0.0]
    # a temperature the division represents keeps the distribution it had: only shifted by the maximum
    out = cut(logits, SamplingParams(temperature=0.005))
    assert torch.allclose(torch.softmax(out, -1), torch.softmax(logits / 0.005, -1)) and out.max() == 0.0


@pytest.mark.parametrize("top_p, min_p", [(1.0, 0.0), (0.9, 0.05)])
@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324])
def test_exllamav3_a_tiny_temperature_keeps_the_logits_finite(temperature, top_p, min_p):
    """exllamav3's temperature step divides float32 logits (30 over 1e-38 is +inf: a NaN softmax, any token) and its
    fused kernel multiplies by 1/T in float32: both stay finite, and the largest logit stays the one on top."""
    steps = dict(v3_sampler_steps(SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p)))
    (t,) = steps["SS_Temperature"]
    logits = torch.tensor([30.0, 29.9, -1e4, 1e4], dtype=torch.float32)
    tempered = logits / t
    inv = torch.tensor(1.0 / t, dtype=torch.float32)
    assert torch.isfinite(tempered).all() and torch.isfinite(inv) and int(tempered.argmax()) == 3
    assert torch.isfinite((logits - logits.max()) * inv).all()
    assert tempered.softmax(-1)[3] == 1.0
    assert dict(v3_sampler_steps(SamplingParams(temperature=0.7)))["SS_Temperature"] == (0.7,)  # others untouched
