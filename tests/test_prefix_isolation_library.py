"""Per-user prefix reuse against the exllama libraries' own generators and page tables, without a GPU.

tests/page_generator.py runs exllamav3's Generator and exllamav2's dynamic generator (paged
and unpaged) as they are except for the model's forward, so the pages a job reuses, and
``cached_tokens``, come from the libraries' arithmetic over our isolation hooks
(backends/prefix_isolation.py), not from stand-ins. Skipped where a library does not import
without a GPU (CI): that needs its extension module prebuilt by
``benchmarks/gpu/cross_build.sh`` (and flash-attn for exllamav2's paged mode).
tests/test_gpu_backends.py checks the same on a GPU.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from tests.page_generator import (
    KINDS,
    cpu_pages_server,
    load_cpu_pages_model,
    load_cpu_pages_v2_model,
    pages_held,
    require_kind,
)
from xllm_jupyter.backends.base import BackendOptions, ModelSpec
from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

pytestmark = pytest.mark.exllama

PAGE = 256
GREEDY = SamplingParams(temperature=0.0)
_ids = itertools.count(1)


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    """Each generator the harness runs, where its library imports."""
    require_kind(request.param)
    return request.param


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> Path:
    """The tiny Llama: its config and SmolLM2's tokenizer are all the harness reads."""
    return Path(tiny_llama_dir)


def load(kind: str, model_dir: Path, **options):
    """A fresh model (empty page table) of ``kind`` over the tiny Llama's config and tokenizer."""
    spec = ModelSpec(name="t", path=str(model_dir), format="safetensors", backend=kind,
                     options=BackendOptions(**{"max_batch_size": 8, "cache_tokens": 8 * PAGE, **options}))
    if kind == "exllamav3":
        return load_cpu_pages_model(spec)
    return load_cpu_pages_v2_model(spec, paged=kind == "exllamav2-paged")


def prompt(seed: int, length: int) -> tuple[int, ...]:
    """``length`` token ids, the same for the same seed (ids below the vocabulary, no specials)."""
    return tuple(100 + (seed * 7919 + i * 31) % 3000 for i in range(length))


def job(tokens: tuple[int, ...], namespace: str, max_tokens: int = 2) -> SequenceJob:
    """A greedy job of ``namespace`` (a user's prefix-cache namespace)."""
    return SequenceJob(next(_ids), tokens, max_tokens, GREEDY, frozenset(), cache_namespace=namespace)


def run(model, *jobs: SequenceJob, cancel_after: dict[int, int] | None = None) -> dict[int, int]:
    """Add ``jobs`` together and step to the end; each job's ``cached_tokens`` (-1 when cancelled).

    ``cancel_after`` maps a job id to the events it gets before it is cancelled (0: at once).
    After every step the library checks its own page table (references, hashes, contents).
    """
    cancel_after = dict(cancel_after or {})
    for j in jobs:
        model.add(j)
        if cancel_after.get(j.job_id) == 0:
            model.cancel(j.job_id)
    seen: dict[int, int] = {}
    cached: dict[int, int] = {}
    generator = model.generator
    for _ in range(sum(j.max_tokens for j in jobs) + 50):  # enough even one job at a time
        events = model.step()
        if hasattr(generator, "pagetable"):  # exllamav3 checks its page table (exllamav2 has no such check)
            generator.pagetable.validate_pagetable(generator.active_jobs)
        for event in events:
            seen[event.job_id] = seen.get(event.job_id, 0) + 1
            if event.finish is not None:
                cached[event.job_id] = -1 if event.finish == FinishReason.CANCELLED else event.cached_tokens
            elif seen[event.job_id] == cancel_after.get(event.job_id):
                model.cancel(event.job_id)
        if len(cached) == len(jobs):
            return cached
    raise AssertionError(f"jobs did not finish: {cached}")


def test_a_user_reuses_own_prompt_pages_and_no_one_elses(kind, model_dir):
    model = load(kind, model_dir)
    secret = prompt(1, 3 * PAGE + 40)
    first = job(secret, "alice")
    assert run(model, first)[first.job_id] == 0
    again = job(secret, "alice")
    assert run(model, again)[again.job_id] >= 3 * PAGE  # her three full pages, by the library's lookup
    probe = job(secret[:200], "bob")  # shorter than a page: the library's partial-page matching
    assert run(model, probe)[probe.job_id] == 0
    bob = job(secret, "bob")
    assert run(model, bob)[bob.job_id] < PAGE  # at most his own probe's tokens
    bob_again = job(secret, "bob")
    assert run(model, bob_again)[bob_again.job_id] >= 3 * PAGE  # his own copy now
    assert pages_held(model) == 0


def test_a_shared_namespace_reuses_across_users(kind, model_dir):
    """The control: with quotas.share_prefix_cache every job is in namespace "" and the library shares."""
    model = load(kind, model_dir)
    text = prompt(2, 2 * PAGE + 10)
    first, full, probe = job(text, ""), job(text, ""), job(text[:200], "")
    run(model, first)
    assert run(model, full)[full.job_id] >= 2 * PAGE
    assert run(model, probe)[probe.job_id] == 199  # a partial page: all but the last prompt token


def test_same_prompt_from_two_users_in_one_batch(kind, model_dir):
    """Both prefill the same pages in the same step; neither takes the other's, both can repeat their own."""
    if kind == "exllamav2-unpaged":
        pytest.skip("unpaged runs one sequence at a time: no two jobs share a step")
    model = load(kind, model_dir)
    text = prompt(3, 2 * PAGE + 100)
    a, b = job(text, "alice"), job(text, "bob")
    assert run(model, a, b) == {a.job_id: 0, b.job_id: 0}
    a2, b2, c = job(text, "alice"), job(text, "bob"), job(text, "carol")
    cached = run(model, a2, b2, c)
    assert cached[a2.job_id] >= 2 * PAGE and cached[b2.job_id] >= 2 * PAGE and cached[c.job_id] == 0
    assert pages_held(model) == 0


def test_a_page_completed_while_decoding_is_reused_by_its_namespace_only(kind, model_dir):
    """The token that fills a page records it for its namespace at once: a job of the same user that
    starts while the first still runs reuses it, another user's does not (the hook skips other tokens)."""
    if kind == "exllamav2-unpaged":
        pytest.skip("unpaged has one page and never hashes it")
    model = load(kind, model_dir)
    text = prompt(4, PAGE - 20)
    first = job(text, "alice", max_tokens=80)  # its 21st new token is written into page 0's last slot
    model.add(first)
    made: list[int] = []
    while len(made) < 25:
        made += [e.token_id for e in model.step() if e.job_id == first.job_id and e.token_id is not None]
    longer = text + tuple(made[:20]) + prompt(5, 40)  # page 0 as the first job filled it, then more
    again, other = job(longer, "alice"), job(longer, "bob")
    cached = run(model, again, other)  # (the first job runs on beside them, to its end)
    assert cached[again.job_id] >= PAGE
    assert cached[other.job_id] < PAGE
    while model.active_jobs():
        model.step()
    assert pages_held(model) == 0


def lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_random_traffic_never_reuses_another_users_tokens(kind, model_dir):
    """Three users, shared documents with private tails, a small cache (eviction, defrag), cancellations.

    A job may only be served cached tokens that its own user sent (or generated) before or
    beside it: ``cached_tokens`` never exceeds the longest common prefix with that user's
    sequences, though other users' sequences often share a longer one.
    """
    model = load(kind, model_dir, cache_tokens=12 * PAGE)
    reused, leak_chances = random_traffic(model, seed=7, rounds=60)
    # the traffic did reuse (unpaged: only the previous job's tokens can be), and did tempt a leak
    assert reused > (0 if kind == "exllamav2-unpaged" else 4 * PAGE) and leak_chances >= 5
    # long answers: pages completed while decoding are hashed and reusable too, by their user only
    random_traffic(load(kind, model_dir, cache_tokens=12 * PAGE), seed=8, rounds=10, longest=300)


@pytest.mark.parametrize("drafting", [{"ngram_draft": 2, "num_draft_tokens": 4},
                                      {"draft_model_path": "<model>", "num_draft_tokens": 3}], ids=["ngram", "draft-model"])
def test_random_traffic_with_drafting_never_reuses_another_users_tokens(kind, model_dir, drafting):
    """The same traffic with speculative decoding: draft windows written into pages and partly rewound, pages
    completed inside a window, all within each user's namespace (exllamav3 checks its page table every step)."""
    options = {k: (str(model_dir) if v == "<model>" else v) for k, v in drafting.items()}
    model = load(kind, model_dir, cache_tokens=12 * PAGE, **options)
    random_traffic(model, seed=9, rounds=12, longest=300)
    assert model.details()["speculative"]["accepted"] > 0


def random_traffic(model, *, seed: int, rounds: int, longest: int = 6) -> tuple[int, int]:
    """Run the traffic above, checking every job; (cached tokens served, jobs that could have leaked)."""
    from tests.page_generator import FILLER_TOKEN

    rng = random.Random(seed)
    docs = [prompt(seed, rng.randint(PAGE + 50, 3 * PAGE + 50)) for seed in range(10, 22)]
    users = ("alice", "bob", "carol")
    sent: dict[str, list[tuple[int, tuple[int, ...]]]] = {u: [] for u in users}
    reused = leak_chances = 0
    for _ in range(rounds):
        batch = []
        for _ in range(rng.randint(1, 3)):
            doc = rng.choice(docs)
            tokens = doc[: rng.randint(100, len(doc))] + prompt(rng.randrange(10_000), rng.randint(0, 30))
            batch.append(job(tokens, rng.choice(users), max_tokens=rng.randint(1, longest)))
        for j in batch:
            sent[j.cache_namespace].append((j.job_id, j.prompt_ids + (FILLER_TOKEN,) * j.max_tokens))
        cancel = {j.job_id: rng.choice((0, 1, 2)) for j in batch if rng.random() < 0.2}
        cached = run(model, *batch, cancel_after=cancel)
        for j in batch:
            if cached[j.job_id] < 0:
                continue
            own = max((lcp(j.prompt_ids, s) for i, s in sent[j.cache_namespace] if i != j.job_id), default=0)
            others = max((lcp(j.prompt_ids, s) for u in users if u != j.cache_namespace for _, s in sent[u]), default=0)
            assert cached[j.job_id] <= min(own, len(j.prompt_ids) - 1), (j.cache_namespace, cached[j.job_id], own)
            reused += cached[j.job_id]
            leak_chances += others > own + PAGE
        assert pages_held(model) == 0
    return reused, leak_chances


@pytest.fixture(scope="module")
def http_server(kind, model_dir, tmp_path_factory):
    """The real server and engine over the CPU-pages backend of ``kind``, two API keys (two users)."""
    from tests.exllama_checks import BOB_KEY, MODEL
    from tests.server_fixtures import API_KEY

    with cpu_pages_server(kind, model_dir, tmp_path_factory.mktemp(f"home-{kind}"), MODEL, (API_KEY, BOB_KEY)) as info:
        yield info


def test_over_http_each_api_key_reuses_only_its_own_prompts(http_server):
    """tests/test_gpu_backends.py's isolation check, the same steps, through the server and the openai SDK."""
    from tests.exllama_checks import check_prefix_reuse_never_crosses_users

    check_prefix_reuse_never_crosses_users(http_server)
