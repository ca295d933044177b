"""The exllama backends' engine options on a real GPU (``@pytest.mark.gpu``): quantized K/V
caches, n-gram and draft-model speculative decoding, seeds, tensor parallelism; and the device
checks the engine makes before a GPU load.

Each loads the random-weight Llama (tests/gpu_fixtures.py) straight through the backend and
steps it like the engine thread does, so a test costs one load of a 4-layer model. Random
weights make the text meaningless; the tests check lengths, memory, reported details,
reproducibility and that speculative decoding keeps greedy output (verification is exact up
to half-precision near-ties, so the first tokens are compared).
"""

from __future__ import annotations

import importlib.util
from itertools import count
from pathlib import Path

import pytest

from xllm_jupyter.backends.base import BackendOptions, ModelSpec
from xllm_jupyter.core.types import SamplingParams, SequenceJob

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(temperature=0.0)
#: a prompt that repeats itself, so n-gram drafting finds matches to propose
LOOPING_PROMPT = tuple(range(300, 340)) * 6
_ids = count(1)


def backend(name: str):
    """The named exllama backend, or a skip where its library is not installed."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    if name == "exllamav3":
        from xllm_jupyter.backends.exllamav3 import ExllamaV3Backend

        return ExllamaV3Backend()
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend

    return ExllamaV2Backend()


def load(name: str, path: Path, **options):
    """Load the test model with ``options`` (engine settings as the engine passes them)."""
    opts = BackendOptions(**{"max_batch_size": 4, "cache_tokens": 8192, **options})
    return backend(name).load(ModelSpec(name="g", path=Path(path), context_length=2048, options=opts))


def generate(model, prompt=LOOPING_PROMPT, max_tokens=32, sampling=GREEDY) -> list[int]:
    """One job stepped to its end; its token ids (no stop tokens, so it runs to ``max_tokens``)."""
    job = SequenceJob(next(_ids), tuple(prompt), max_tokens, sampling)
    model.add(job)
    out: list[int] = []
    for _ in range(max_tokens * 4):
        events = [e for e in model.step() if e.job_id == job.job_id]
        out += [e.token_id for e in events if e.token_id is not None]
        if any(e.finish for e in events):
            return out
    raise AssertionError(f"job did not finish: {len(out)} tokens")


@pytest.fixture(scope="module", params=["exllamav3", "exllamav2"])
def plain(request, gpu_llama_dir):
    """Each backend with the default fp16 cache and no drafting: the reference."""
    m = load(request.param, gpu_llama_dir)
    m.xllm_backend = request.param
    yield m
    m.unload()


@pytest.mark.parametrize("bits", ["q4", "q8", "4,6"])
def test_quantized_kv_cache_decodes_and_takes_less_memory(plain, gpu_llama_dir, bits):
    if plain.xllm_backend == "exllamav2" and "," in bits:
        with pytest.raises(Exception, match="symmetrically"):
            load("exllamav2", gpu_llama_dir, kv_cache_bits=bits)
        return
    m = load(plain.xllm_backend, gpu_llama_dir, kv_cache_bits=bits)
    try:
        assert m.details()["kv_cache"] == bits
        assert len(generate(m)) == 32
        # the cache's tokens (8,192 paged; exllamav2 unpaged holds one context, 2,048) x 4 layers x (256 key +
        # 256 value) values x 2 bytes in fp16 (32 MiB paged). A bare "less" would pass a setting ignored but for
        # noise: at least 30% of the saving the bits promise (exllamav2 keeps one layer's fp16 keys and values
        # as scratch beside a quantized cache, so it saves about half of that at q8)
        tokens = m.details()["cache_tokens"]
        assert tokens == plain.details()["cache_tokens"] and tokens in (2048, 8192)
        k, v = (8, 8) if bits == "q8" else (4, 4) if bits == "q4" else (4, 6)
        promised = tokens * 4 * 512 * 2 * (1 - (k + v) / 32)
        assert plain.memory_bytes() - m.memory_bytes() >= 0.3 * promised, (plain.memory_bytes(), m.memory_bytes())
    finally:
        m.unload()


def test_ngram_drafting_keeps_greedy_output_and_reports_acceptance(plain, gpu_llama_dir):
    want = generate(plain)
    m = load(plain.xllm_backend, gpu_llama_dir, ngram_draft=2, num_draft_tokens=4)
    try:
        assert m.details()["speculative"]["method"] == "ngram"
        got = generate(m)
        assert len(got) == 32 and got[:8] == want[:8]
        rate = m.details()["speculative"]["acceptance_rate"]
        # a random model's greedy output loops, so drafts from the context get accepted
        assert rate is not None and 0 < rate <= 1
    finally:
        m.unload()


def test_draft_model_of_the_same_weights_is_accepted_almost_always(plain, gpu_llama_dir):
    want = generate(plain)
    m = load(plain.xllm_backend, gpu_llama_dir, draft_model_path=str(gpu_llama_dir), num_draft_tokens=4)
    try:
        assert m.details()["speculative"]["method"] == "draft_model"
        got = generate(m)
        assert len(got) == 32 and got[:8] == want[:8]
        assert m.details()["speculative"]["acceptance_rate"] > 0.8
    finally:
        m.unload()


def test_seeded_sampling_repeats_and_other_seeds_differ(plain):
    sampled = [generate(plain, sampling=SamplingParams(temperature=1.0, seed=s)) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_matches_one_gpu(gpu_llama_dir):
    one = load("exllamav3", gpu_llama_dir)
    try:
        want = generate(one)
    finally:
        one.unload()
    tp = load("exllamav3", gpu_llama_dir, tensor_parallel=True)
    try:
        assert tp.details()["tensor_parallel"] is True
        assert generate(tp)[:8] == want[:8]
    finally:
        tp.unload()


def test_the_engine_device_probes_on_a_real_gpu():
    """cuda:N past the visible GPUs is a 400; the free-memory probe counts torch's unused cache as room."""
    from xllm_jupyter.backends.torch_device import cuda_room_bytes, pick_device
    from xllm_jupyter.core.errors import InvalidRequest

    devices = torch.cuda.device_count()
    assert pick_device("cuda:0").index == 0
    with pytest.raises(InvalidRequest, match="does not exist"):
        pick_device(f"cuda:{devices}")
    total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(devices))
    cuda_room_bytes()  # the first probe creates each device's context, which takes memory itself
    room = cuda_room_bytes()
    assert 0 < room <= total
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda:0")
    taken = cuda_room_bytes()
    del block  # back in torch's cache, not the driver's: still room for our next load
    freed = cuda_room_bytes()
    assert room - taken >= 500 * 2**20 and abs(freed - room) < 64 * 2**20, (room, taken, freed)
    # a CUDA graph's private pool keeps what its capture allocated: reserved, yet no new model can use it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scratch = torch.ones(512 * 2**20 // 4, device="cuda:0")
        total = scratch.sum()
    del scratch
    pooled = cuda_room_bytes()
    assert freed - pooled >= 500 * 2**20 and total.device.type == "cuda", (freed, pooled)
