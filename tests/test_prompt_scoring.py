"""The transformers backend scores prompt tokens in its prefill (``SequenceJob.prompt_logprobs``), chunk by chunk,
on the eager batch and the slot cache alike: the scores match one plain forward pass, the cache the chunks leave
decodes the same tokens as a plain prefill, and a job with max_tokens 0 ends at its prefill."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.hf_compiled import StaticPlan  # noqa: E402
from xllm_jupyter.backends.hf_model import TransformersModel  # noqa: E402
from xllm_jupyter.backends.hf_prefill import prefill_groups  # noqa: E402
from xllm_jupyter.backends.prompt_scoring import chunk_positions  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402
from xllm_jupyter.core.errors import InvalidRequest  # noqa: E402
from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
_ids = iter(range(1, 1_000_000))
_PICK = torch.Generator().manual_seed(0)
LONG, SHORT, OTHER = ([int(i) for i in torch.randint(100, 40000, (n,), generator=_PICK)] for n in (30, 7, 12))


def spec(path) -> ModelSpec:
    return ModelSpec(name="tiny", path=Path(path), options=BackendOptions(device="cpu", compile="off", torch_threads=1,
                                                                         max_batch_size=4))


@pytest.fixture(scope="module")
def eager(tiny_llama_dir) -> TransformersModel:
    m = TransformersBackend().load(spec(tiny_llama_dir))
    yield m
    m.unload()


@pytest.fixture(params=["eager", "slots"])
def model(request, eager) -> TransformersModel:
    """The eager batch, or the same weights on a slot cache (the compiled path's batch, uncompiled here)."""
    if request.param == "eager":
        yield eager
        return
    m = TransformersModel(spec(eager.model.name_or_path), eager.model, eager.tokenizer, device=torch.device("cpu"),
                          max_batch_size=4, static=StaticPlan(4 * 256, None))
    m.warm_up()
    yield m
    m._batch.release()


def job(prompt, max_tokens, **kw) -> SequenceJob:
    return SequenceJob(next(_ids), tuple(prompt), max_tokens, GREEDY, frozenset(), **kw)


def run(m: TransformersModel, jobs) -> dict[int, list]:
    for j in jobs:
        m.add(j)
    events: dict[int, list] = defaultdict(list)
    for _ in range(100):
        if not m.active_jobs():
            break
        for e in m.step():
            events[e.job_id].append(e)
    assert not m.active_jobs()
    return events


def reference(m: TransformersModel, ids) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(m.model(torch.tensor([list(ids)])).logits[0].float(), dim=-1)


def test_chunked_scoring_matches_a_forward_pass_and_decodes_on(model, monkeypatch):
    rows = 2  # LONG and SHORT prefill together (left-padded); OTHER does not score, so it goes alone
    monkeypatch.setattr(model, "score_bytes", 3 * model.vocab_size * (rows * 4 + rows * 8))
    assert chunk_positions(rows, rows, model.vocab_size, model.score_bytes) == 3  # 10 chunks for LONG
    alone = job(LONG, 5, logprobs=True)
    plain = run(model, [alone, job(OTHER, 5)])
    long_, short, other = job(LONG, 5, logprobs=True, top_logprobs=3, prompt_logprobs=True), \
        job(SHORT, 0, top_logprobs=1, prompt_logprobs=True), job(OTHER, 5)
    assert [[s.job for s in g] for g in prefill_groups([_Seq(j) for j in (long_, short, other)])] == \
        [[other], [short, long_]]
    events = run(model, [long_, short, other])

    for j, k in ((long_, 3), (short, 1)):
        scores = events[j.job_id][0].prompt_logprobs
        assert scores is not None and len(scores) == len(j.prompt_ids)
        assert scores.first_raw == model.chat.token_bytes(j.prompt_ids[0])
        want = reference(model, j.prompt_ids)
        for t, entry in enumerate(scores.scored, start=1):
            assert entry.raw == model.chat.token_bytes(j.prompt_ids[t])
            assert entry.logprob == pytest.approx(want[t - 1, j.prompt_ids[t]].item(), abs=1e-4)
            assert [v for _, v in entry.top] == pytest.approx(want[t - 1].topk(k).values.tolist(), abs=1e-4)
            assert list(entry.top_raw) == [model.chat.token_bytes(i) for i in want[t - 1].topk(k).indices.tolist()]
        assert all(e.prompt_logprobs is None for e in events[j.job_id][1:])  # once, on the first event

    # max_tokens 0: the prefill is all; no token, "length", the prompt counted
    (end,) = events[short.job_id]
    assert (end.token_id, end.finish, end.prompt_tokens, end.completion_tokens) == \
        (None, FinishReason.LENGTH, len(SHORT), 0)
    # the cache the chunks left decodes exactly what a plain prefill's does; the job that did not score is untouched
    tokens = {j: [e.token_id for e in evs] for j, evs in (*events.items(), *plain.items())}
    assert tokens[long_.job_id] == tokens[alone.job_id]  # (and their logprobs, which read the whole cache:)
    assert tokens[other.job_id] == tokens[alone.job_id + 1]
    assert [e.logprob for e in events[long_.job_id]] == pytest.approx([e.logprob for e in plain[alone.job_id]],
                                                                      abs=1e-4)
    assert all(e.prompt_logprobs is None for e in events[other.job_id])


def test_max_tokens_zero_needs_prompt_scoring(eager):
    with pytest.raises(InvalidRequest):
        eager.add(job(SHORT, 0))
    assert eager.scores_prompts


class _Seq:
    """What prefill_groups reads of a queued job."""

    def __init__(self, job: SequenceJob) -> None:
        self.job = job


def test_only_the_transformers_backend_claims_prompt_scores():
    """exllama's generators give no prompt logits: their models leave the flag off, so echo with logprobs is refused
    there (tests/test_echo.py) instead of answered without the scores."""
    from xllm_jupyter.backends.exllama_model import DynamicGeneratorModel
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Model
    from xllm_jupyter.backends.exllamav3 import ExllamaV3Model

    assert TransformersModel.scores_prompts
    assert not (DynamicGeneratorModel.scores_prompts or ExllamaV3Model.scores_prompts or ExllamaV2Model.scores_prompts)
