"""Our exllama backends behind the real server, over the libraries' own generators, without a GPU.

tests/page_generator.py takes only the model's forward out of exllamav3's and exllamav2's
generators; every running job "samples" one fixed token (exllamav2: from logits that favour
it, through the library's own sampler). So this checks what tests/test_gpu_backends.py checks
that does not depend on the forward: /v1/models details, lengths and finish reasons,
streaming = non-streaming, batching, cancellation, exllamav3's grammar filter (JSON schema,
forced tool calls), logprobs, and (exllamav2, whose sampler runs on CPU) logit_bias, stop
strings and seeds through the real sampler. exllamav3's sampler is CUDA-only: those checks are
the GPU test's. Then engine options on the models: quantized caches, n-gram and draft models. Skipped where a library
does not import without a GPU (CI); ``benchmarks/gpu/cpu_check.sh`` runs it here.
"""

from __future__ import annotations

import json
import textwrap
import time
from itertools import count

import pytest
from openai import OpenAI

from tests import exllama_checks as checks
from tests.exllama_checks import MODEL, ask, model_entry
from tests.page_generator import KINDS, cpu_pages_server, pages_held, require_kind
from tests.server_fixtures import API_KEY

pytestmark = pytest.mark.exllama


@pytest.fixture(scope="module", params=KINDS)
def server(request, tiny_llama_dir, tmp_path_factory):
    """The real server over the CPU-pages backend of each kind (one per module and kind)."""
    require_kind(request.param)
    home = tmp_path_factory.mktemp(f"serve-{request.param}")
    with cpu_pages_server(request.param, tiny_llama_dir, home, MODEL, (API_KEY,)) as info:
        yield info


@pytest.fixture()
def sdk(server):
    """An openai SDK client of ``server``."""
    from openai import OpenAI

    with OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def v2_only(server):
    """Skip on exllamav3, whose sampler needs CUDA."""
    if server.kind == "exllamav3":
        pytest.skip("exllamav3's sampler is CUDA-only (tests/test_gpu_backends.py checks it on a GPU)")


def test_models_report_backend_mode_and_prefix_cache(server):
    entry = model_entry(server)
    backend, _, mode = server.kind.partition("-")
    assert f'"backend": "{backend}"' in entry
    assert f'"mode": "{mode or "paged"}"' in entry
    assert '"scope": "per cache namespace"' in entry


def test_xllm_ps_shows_the_backend_and_its_mode(server):
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    out = CliRunner().invoke(main, ["--url", server.base_url, "--api-key", API_KEY, "ps"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    row = next(line for line in out.stdout.splitlines() if line.startswith(MODEL))
    backend, _, mode = server.kind.partition("-")
    assert backend in row and (mode or "paged") in row and ("batch≤1" in row) == (mode == "unpaged")


def test_lengths_finish_reasons_and_streaming_match(sdk):
    checks.check_greedy_is_deterministic_and_streaming_matches(sdk)


def test_concurrent_requests_all_complete_and_batch_when_paged(server):
    checks.check_concurrent_requests(server, batched=server.kind != "exllamav2-unpaged")


def test_cancelled_stream_frees_the_job(server, sdk):
    checks.check_cancelled_stream_frees_the_job(server, sdk, max_tokens=1500)  # the tiny Llama's context: 2048


def test_logprobs_come_from_the_models_distribution(sdk):
    """exllamav2: the softmax of the logits (RawLogprobsV2); exllamav3: the stand-in's, in the shapes its
    ``receive_logits`` gives."""
    checks.check_logprobs(sdk)


def test_greedy_logprobs_on_exllamav2_are_the_models_not_the_samplers(server, sdk):
    """exllamav2's sampler keeps one token under greedy decoding (logprob 0, alternatives -inf); the model's
    distribution gives FILLER_TOKEN about two chances in three over unit noise, and finite alternatives."""
    v2_only(server)
    r = ask(sdk, max_tokens=3, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    for c in r.choices[0].logprobs.content:
        assert -3.0 < c.logprob < -0.01
        assert all(-30.0 < alt.logprob < 0 for alt in c.top_logprobs) and len(c.top_logprobs) == 3


def test_logit_bias_and_stop_strings_go_through_the_real_sampler(server, sdk):
    v2_only(server)
    checks.check_logit_bias_and_stop_strings(sdk)


def test_seeded_sampling_repeats_and_seeds_differ(server, sdk):
    v2_only(server)
    runs = [ask(sdk, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_json_schema_through_llguidance_on_exllamav3_and_a_clear_400_on_exllamav2(server, sdk):
    """exllamav3: our grammar in the library's LLGuidanceFilter masks every step and ends the job."""
    checks.check_json_schema(sdk, supported=server.kind == "exllamav3", max_tokens=200)


def test_forced_tool_call_through_llguidance_on_exllamav3(server, sdk):
    if server.kind != "exllamav3":
        pytest.skip("exllamav2 has no grammar engine (constrained output is a 400 there)")
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False}}}
    for parallel in (None, False):
        r = ask(sdk, "Weather in Oslo?", tools=[tool], max_tokens=200, parallel_tool_calls=parallel,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        calls = choice.message.tool_calls
        # (a call forced by name finishes "stop", as api.openai.com finishes it)
        assert choice.finish_reason == "stop" and calls and (parallel is None or len(calls) == 1)
        assert all(c.function.name == "get_weather" and set(json.loads(c.function.arguments)) == {"city"}
                   for c in calls)


@pytest.mark.parametrize("kind", KINDS)
def test_a_flood_cannot_hold_a_newcomer_behind_it_in_the_librarys_queue(kind, tiny_llama_dir, tmp_path_factory):
    """A 16-page cache holds two of these 7-page jobs. Alice sends eight; Bob, as big, arrives while her
    first two run and gets the next room, though the library starts queued jobs first come, first served."""
    import asyncio

    from openai import AsyncOpenAI

    from tests.exllama_checks import BOB_KEY

    require_kind(kind)
    home = tmp_path_factory.mktemp(f"flood-{kind}")
    order: list[str] = []

    async def flood(url: str, engine) -> None:
        async with AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=300) as alice, \
                AsyncOpenAI(base_url=url, api_key=BOB_KEY, max_retries=0, timeout=300) as bob:
            async def send(client, name: str) -> None:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "word " * 650 + name}], max_tokens=1000,
                    temperature=0, stream=True, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if name == "bob" and chunk.choices and chunk.choices[0].delta.content:
                        order.append("bob starts")
                        await stream.close()
                        return
                order.append(f"{name} ends")

            alices = [asyncio.ensure_future(send(alice, f"alice{i}")) for i in range(8)]
            while engine.stats(MODEL).running + engine.stats(MODEL).queued < 8:
                await asyncio.sleep(0.002)
            await asyncio.gather(send(bob, "bob"), *alices)

    with cpu_pages_server(kind, tiny_llama_dir, home, MODEL, (API_KEY, BOB_KEY), cache_tokens=16 * 256,
                          max_batch_size=8) as info:
        asyncio.run(flood(info.base_url, info.engine))
    assert order.index("bob starts") <= 2, order  # after the (at most two) jobs running when he came


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancellation_storm_leaves_no_job_or_page_behind(kind, tiny_llama_dir, tmp_path_factory):
    """Sixteen streams of two users over a cache that holds five at once: a quarter closed before the
    first chunk, a quarter after one, a quarter after five, the rest read to the end. The finished
    ones are whole, and afterwards no job is running or queued and no cache page is referenced."""
    import asyncio

    from openai import AsyncOpenAI

    from tests.exllama_checks import BOB_KEY

    require_kind(kind)
    home = tmp_path_factory.mktemp(f"storm-{kind}")
    finished: list[int] = []

    async def storm(url: str) -> None:
        async with AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=300) as alice, \
                AsyncOpenAI(base_url=url, api_key=BOB_KEY, max_retries=0, timeout=300) as bob:
            async def send(i: int) -> None:
                stream = await (alice, bob)[i % 2].chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "word " * 300 + str(i)}], max_tokens=400,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                keep = (0, 1, 5, None)[i % 4]  # content chunks to read before closing (None: all)
                seen = 0
                async for chunk in stream:
                    if keep is not None and seen >= keep:
                        break
                    if chunk.choices and chunk.choices[0].delta.content:
                        seen += 1
                    if chunk.usage is not None:
                        finished.append(chunk.usage.completion_tokens)
                await stream.close()

            await asyncio.gather(*(send(i) for i in range(16)))

    with cpu_pages_server(kind, tiny_llama_dir, home, MODEL, (API_KEY, BOB_KEY), cache_tokens=16 * 256,
                          max_batch_size=8) as info:
        asyncio.run(storm(info.base_url))
        engine = info.engine
        deadline = time.time() + 30
        while time.time() < deadline and (engine.stats(MODEL).running or engine.stats(MODEL).queued):
            time.sleep(0.05)
        assert (engine.stats(MODEL).running, engine.stats(MODEL).queued) == (0, 0)
        assert finished == [400] * 4
        model = info.call(engine.load(MODEL))
        assert pages_held(model) == 0
        with OpenAI(base_url=info.base_url, api_key=BOB_KEY, max_retries=0, timeout=60) as sdk:
            assert ask(sdk, max_tokens=3, extra_body={"ignore_eos": True}).usage.completion_tokens == 3


# -- engine options on the libraries' own generators (no server) ---------------------------------

def load(kind: str, model_dir, **options):
    """A fresh model of ``kind`` over the tiny Llama with ``options`` (as engine config gives them)."""
    from tests.page_generator import load_cpu_pages_model, load_cpu_pages_v2_model
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec

    spec = ModelSpec(name="t", path=str(model_dir), format="safetensors", backend=kind,
                     options=BackendOptions(**{"max_batch_size": 4, "cache_tokens": 4096, **options}))
    if kind == "exllamav3":
        return load_cpu_pages_model(spec)
    return load_cpu_pages_v2_model(spec, paged=kind == "exllamav2-paged")


def generate(model, prompt_ids, max_tokens: int, sampling=None, job_id: int = 1) -> list:
    """Run one job (greedy unless ``sampling`` says otherwise) to the end; its events."""
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    model.add(SequenceJob(job_id, tuple(prompt_ids), max_tokens, sampling or SamplingParams(temperature=0.0), frozenset()))
    events = []
    for _ in range(4 * max_tokens + 20):
        events += model.step()
        if events and events[-1].finish is not None:
            return events
    raise AssertionError("the job did not finish")


async def answer_through(runner, prompt_ids, stop_token: int, max_tokens: int, **params) -> tuple:
    """One greedy request with logprobs through ``runner``: (text, raw bytes of each token, usage, finish)."""
    import asyncio

    from xllm_jupyter.core.types import ChoiceDelta, GenerationDone, GenerationParams, GenerationRequest, SamplingParams

    request = GenerationRequest(model="t", prompt_ids=tuple(prompt_ids), params=GenerationParams(
        max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), stop_token_ids=(stop_token,),
        logprobs=True, **params))
    text, raw, usage, finish = "", [], None, None
    async for item in runner.submit(request, asyncio.get_running_loop()):
        if isinstance(item, ChoiceDelta):
            text += item.text
            raw += [entry.raw for entry in item.logprobs]
            finish = item.finish or finish
        elif isinstance(item, GenerationDone):
            usage = item.usage.completion_tokens
    return text, raw, usage, finish.value if finish is not None else ""


def wait_for_no_jobs(model) -> None:
    """Give the engine's cancel of a job cut by a stop string the step it takes to reach the model (2 s at most)."""
    for _ in range(200):
        if model.active_jobs() == 0:
            return
        time.sleep(0.01)


@pytest.mark.parametrize(("kind", "bits", "k_v"), [
    ("exllamav3", "q4", (4, 4)), ("exllamav3", "q8", (8, 8)), ("exllamav3", "4,6", (4, 6)),
    ("exllamav2-unpaged", "q4", None), ("exllamav2-unpaged", "q6", None), ("exllamav2-unpaged", "q8", None),
])
def test_quantized_kv_caches_are_built_by_the_library(tiny_llama_dir, kind, bits, k_v):
    require_kind(kind)
    model = load(kind, tiny_llama_dir, kv_cache_bits=bits)
    events = generate(model, range(100, 140), 3)
    assert len([e for e in events if e.token_id is not None]) == 3 and events[-1].finish is not None
    assert model.details()["kv_cache"] == bits
    cache = model.generator.cache
    if kind == "exllamav3":
        layers = list(cache.layers.values())
        assert layers and all(type(layer).__name__ == "CacheLayer_quant" for layer in layers)
        assert {(layer.k_bits, layer.v_bits) for layer in layers} == {k_v}
    else:
        assert type(cache).__name__ == f"ExLlamaV2Cache_{bits.upper()}"


def test_ngram_drafting_keeps_greedy_output_and_reports_acceptance(tiny_llama_dir):
    """exllamav2's own n-gram drafting; the stand-in forward verifies drafts like a model would."""
    require_kind("exllamav2-unpaged")
    plain = generate(load("exllamav2-unpaged", tiny_llama_dir), range(100, 140), 24)
    model = load("exllamav2-unpaged", tiny_llama_dir, ngram_draft=2, num_draft_tokens=4)
    drafted = generate(model, range(100, 140), 24)
    # all 24 tokens: exllamav2 alone stops a drafting job num_draft_tokens early
    assert [e.token_id for e in drafted] == [e.token_id for e in plain] and len(plain) == 24
    assert drafted[-1].completion_tokens == 24
    spec = model.details()["speculative"]
    assert spec["method"] == "ngram" and spec["accepted"] > 0 and spec["acceptance_rate"] > 0.5


def test_a_draft_model_is_wired_in_and_its_drafts_accepted(tiny_llama_dir):
    """exllamav2's draft-model decoding with our generator arguments (the draft drafts what the model picks)."""
    require_kind("exllamav2-unpaged")
    plain = generate(load("exllamav2-unpaged", tiny_llama_dir), range(100, 140), 24)
    model = load("exllamav2-unpaged", tiny_llama_dir, draft_model_path=str(tiny_llama_dir), num_draft_tokens=3)
    drafted = generate(model, range(100, 140), 24)
    assert [e.token_id for e in drafted] == [e.token_id for e in plain] and drafted[-1].completion_tokens == 24
    spec = model.details()["speculative"]
    assert spec["method"] == "draft_model" and spec["acceptance_rate"] > 0.8


@pytest.mark.parametrize("drafting", [{"ngram_draft": 2, "num_draft_tokens": 4},
                                      {"draft_model_path": "<model>", "num_draft_tokens": 3}], ids=["ngram", "draft-model"])
def test_exllamav3_drafting_through_the_librarys_own_drafters(tiny_llama_dir, drafting):
    """exllamav3's generator and jobs as our options build them for n-gram drafting (the job's suffix automaton)
    and for a draft model (the library's drafting loop over a stand-in draft that misses every fifth position):
    greedy output and length kept, every drafted position counted accepted or rejected, and pages freed."""
    require_kind("exllamav3")
    from tests.page_generator import DRAFT_MISS_EVERY

    options = {k: (str(tiny_llama_dir) if v == "<model>" else v) for k, v in drafting.items()}
    prompt = list(range(100, 140))
    plain = generate(load("exllamav3", tiny_llama_dir), prompt, 24)
    model = load("exllamav3", tiny_llama_dir, **options)
    window = options["num_draft_tokens"]
    # the options reached the library: its drafting mode and window, a cache history for a speculative pass
    assert model.generator.max_draft_tokens == window and model.generator.cache.max_history == window
    assert (model.generator.draft_model is not None) == ("draft_model_path" in options)
    assert model.generator.ngram_match_min == options.get("ngram_draft", 0)
    rounds = []
    iterate = model.generator.iterate

    def counted():
        results = iterate()
        rounds.append(sum(1 for r in results if r.get("stage") == "streaming"))
        return results

    model.generator.iterate = counted
    drafted = generate(model, prompt, 24)
    assert [e.token_id for e in drafted] == [e.token_id for e in plain] and len(plain) == 24
    assert drafted[-1].completion_tokens == 24
    assert max(rounds) > 1  # some steps produced several tokens of one job
    spec = model.details()["speculative"]
    assert spec["method"] == ("draft_model" if "draft_model_path" in options else "ngram")
    assert spec["num_draft_tokens"] == window and spec["accepted"] > 0
    if "draft_model_path" in options:  # the stand-in draft misses now and then: some windows partly rejected
        assert spec["rejected"] > 0 and 0 < spec["acceptance_rate"] < 1
        # every step drafted a full window (the prompt's prefill and the first draft share the first step), and
        # each drafted position was counted once, the end's unresolved ones as rejected
        assert spec["accepted"] + spec["rejected"] == window * len(rounds)
    assert pages_held(model) == 0 and DRAFT_MISS_EVERY > 1


def test_exllamav3_cancelling_a_drafting_job_frees_its_pages_and_keeps_its_draft_counts(tiny_llama_dir):
    """A drafting job cancelled mid-answer (a stop string, a closed stream) frees its pages at once; the
    library reports draft counts only at a job's end, so ours are taken from the job when it is cancelled."""
    require_kind("exllamav3")
    from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

    model = load("exllamav3", tiny_llama_dir, draft_model_path=str(tiny_llama_dir), num_draft_tokens=3)
    model.add(SequenceJob(1, tuple(range(100, 400)), 200, SamplingParams(temperature=0.0), frozenset()))
    tokens = 0
    while tokens < 12:
        tokens += sum(1 for e in model.step() if e.token_id is not None)
    assert pages_held(model) > 0
    model.cancel(1)
    assert pages_held(model) == 0
    spec = model.details()["speculative"]
    assert spec["accepted"] > 0 and spec["accepted"] + spec["rejected"] >= tokens - 4
    (event,) = model.step()
    assert event.finish == FinishReason.CANCELLED and model.active_jobs() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drafting", [{}, {"ngram_draft": 2, "num_draft_tokens": 4}], ids=["plain", "ngram"])
def test_admission_cost_is_the_librarys_own_page_count(tiny_llama_dir, kind, drafting):
    """The engine admits a job by the pages the library will take for it (``admission_cost``): the same count as
    the library's job computes, around page boundaries and with a draft window, so the library's own queue stays
    empty (docs/jupyterhub.md, Fairness) and nothing admitted is refused."""
    require_kind(kind)
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    if drafting and kind == "exllamav2-unpaged":
        pytest.skip("the unpaged generator holds one whole-context page whatever the job")
    model = load(kind, tiny_llama_dir, **drafting)
    job_ids = count(1)
    for prompt in (1, 200, 231, 232, 233, 255, 256, 257, 511, 513):
        for max_tokens in (1, 24, 256):
            job = SequenceJob(next(job_ids), tuple(range(100, 100 + prompt)), max_tokens,
                              SamplingParams(temperature=0.0), frozenset())
            model.add(job)
            native = model.generator.pending_jobs[-1]
            assert model.admission_cost(job) == native.current_new_pages_required(), (prompt, max_tokens)
            model.cancel(job.job_id)
            model.step()
    assert pages_held(model) == 0


@pytest.mark.parametrize(("cache_tokens", "drafting", "context"), [
    (4096, {}, 4095), (4096, {"ngram_draft": 2, "num_draft_tokens": 4}, 4091), (0, {}, 4096)])
def test_exllamav3_serves_every_token_of_a_full_context(tiny_llama_dir, cache_tokens, drafting, context):
    """exllamav3 keeps one token and the draft window free past a job's last token: the context we serve leaves
    them room (a configured cache still bounds the memory), so a job that fills it gets every token it asks for.
    It ended that many tokens early when the cache held exactly the context."""
    require_kind("exllamav3")
    from tests.page_generator import load_cpu_pages_model
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec

    spec = ModelSpec(name="t", path=str(tiny_llama_dir), format="safetensors", context_length=4096,
                     options=BackendOptions(max_batch_size=4, cache_tokens=cache_tokens, **drafting))
    model = load_cpu_pages_model(spec)
    assert model.context_length == context and model.generator.max_total_tokens >= context + 1 + drafting.get(
        "num_draft_tokens", 0)
    if cache_tokens:
        assert model.generator.max_total_tokens == cache_tokens  # the configured cache bounds the memory
    prompt = [100 + i % 50 for i in range(context - 40)]
    events = generate(model, prompt, 40)
    assert events[-1].completion_tokens == 40 and len([e for e in events if e.token_id is not None]) == 40


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
@pytest.mark.parametrize("drafting", [{"ngram_draft": 2}, {"draft_model_path": "<model>"}], ids=["ngram", "draft-model"])
def test_exllamav2_drafts_its_most_tokens_a_step(tiny_llama_dir, kind, drafting):
    """``engine.num_draft_tokens`` at its most (8): exllamav2 0.3.2 checks only that the window fits its
    ``max_q_size`` (8 by default), but a step feeds a job its last token and the window, 9 positions, into a logits
    buffer 8 wide: every drafting step failed. The generator now gets a ``max_q_size`` of 9."""
    require_kind(kind)
    options = {k: (str(tiny_llama_dir) if v == "<model>" else v) for k, v in drafting.items()}
    model = load(kind, tiny_llama_dir, num_draft_tokens=8, **options)
    plain = generate(load(kind, tiny_llama_dir), range(100, 140), 24)
    drafted = generate(model, range(100, 140), 24)
    assert [e.token_id for e in drafted] == [e.token_id for e in plain] and drafted[-1].completion_tokens == 24
    assert model.generator.num_draft_tokens == 8 and model.generator.logits_pinned.shape[1] == 9
    assert model.details()["speculative"]["accepted"] > 0


YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}}


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
@pytest.mark.parametrize(("options", "config", "plan"), [
    ({"ngram_draft": 2, "num_draft_tokens": 4}, {}, {"paged": (2048, 2304), "unpaged": (2048, 2304)}),
    ({"draft_model_path": "<model>", "num_draft_tokens": 3}, {}, {"paged": (2048, 2304), "unpaged": (2048, 2304)}),
    ({"ngram_draft": 2, "num_draft_tokens": 4, "cache_tokens": 2048}, {},
     {"paged": (2044, 2048), "unpaged": (2044, 2048)}),
    ({"ngram_draft": 2, "num_draft_tokens": 4}, YARN, {"paged": (2045, 2048), "unpaged": (2044, 2048)}),
    ({}, {}, {"paged": (2048, 2048), "unpaged": (2048, 2048)}),
], ids=["ngram", "draft-model", "cache-bound", "yarn", "plain"])
def test_exllamav2_serves_every_token_of_a_full_context_while_drafting(tiny_llama_dir, tmp_path, kind, options,
                                                                        config, plan):
    """exllamav2 ends a drafting job once it has max_new_tokens less the window, and its last window's positions
    reach past the job's end: the context, RoPE tables (max_seq_len) and cache we plan give a job that fills the
    context every token it asks for, and the stand-in forward checks that no position passes the tables or the
    cache. A drafting job of the whole context ended num_draft_tokens early before. For YaRN max_seq_len sets
    the frequencies, so it stays the model's and the context is shorter instead."""
    require_kind(kind)
    from xllm_jupyter.core.types import FinishReason

    model_dir = tiny_llama_dir
    if config:
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        for f in tiny_llama_dir.iterdir():
            if f.name != "config.json":
                (model_dir / f.name).symlink_to(f)
        (model_dir / "config.json").write_text(json.dumps({**json.loads((tiny_llama_dir / "config.json").read_text()),
                                                           **config}))
    options = {"cache_tokens": 0, **{k: (str(model_dir) if v == "<model>" else v) for k, v in options.items()}}
    model = load(kind, model_dir, **options)
    context, seq_len = plan[kind.partition("-")[2]]
    assert (model.context_length, model._model.config.max_seq_len) == (context, seq_len)
    if config:
        assert model._model.config.alt_rope_method == "yarn"
    window = options.get("num_draft_tokens", 0)
    assert model.generator.num_draft_tokens == window
    for answer in (40, 1):
        events = generate(model, [100 + i % 50 for i in range(context - answer)], answer, job_id=answer)
        assert events[-1].completion_tokens == answer and len([e for e in events if e.token_id is not None]) == answer
        assert events[-1].finish == FinishReason.LENGTH
    assert pages_held(model) == 0
    if window:
        assert model.details()["speculative"]["accepted"] > 0


def tiny_gpt2(out, tokenizer_dir):
    """A random-weight 1-layer GPT-2 (a learned table of 1,024 positions) as exllamav2 reads one: the original
    checkpoint's key names (no ``transformer.`` prefix), the tiny Llama's tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=1, n_head=4, n_positions=1024,
                        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    weights = GPT2LMHeadModel(config).state_dict()
    out.mkdir()
    config.save_pretrained(str(out))
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in weights.items() if k.startswith("transformer.")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
def test_exllamav2_drafting_keeps_a_learned_position_table_within_its_rows(tiny_llama_dir, tmp_path, kind):
    """A learned position table (GPT-2, GPTBigCode) has the model's rows only, and exllamav2's load refuses a
    max_seq_len past them: drafting keeps max_seq_len (1,024) and serves a context shorter by the window, as
    for YaRN. The plan for rotary models (max_seq_len 1,280 for the window's positions) failed the load; the
    memory estimate plans the same."""
    require_kind(kind)
    from xllm_jupyter.backends import exllamav2_plan as v2
    from xllm_jupyter.backends.base import BackendOptions
    from xllm_jupyter.backends.exllama_common import ExllamaOptions
    from xllm_jupyter.core.types import FinishReason

    model_dir = tiny_gpt2(tmp_path / "gpt2", tiny_llama_dir)
    options = {"ngram_draft": 2, "num_draft_tokens": 4, "cache_tokens": 0}
    model = load(kind, model_dir, **options)
    paged = kind == "exllamav2-paged"
    assert (model.context_length, model._model.config.max_seq_len) == ((1021 if paged else 1020), 1024)
    for answer in (40, 1):
        events = generate(model, [100 + i % 50 for i in range(model.context_length - answer)], answer, job_id=answer)
        assert events[-1].completion_tokens == answer and events[-1].finish == FinishReason.LENGTH
    assert pages_held(model) == 0
    opts = ExllamaOptions.from_options(BackendOptions(**options))
    config = json.loads((model_dir / "config.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(v2, "runs_paged", lambda config: paged)
        assert v2.estimated_cache_tokens(opts, config, 4) == int(model.generator.cache.max_seq_len)


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
@pytest.mark.parametrize(("options", "tokens"), [
    ({}, {"paged": 65536, "unpaged": 2048}),
    ({"ngram_draft": 2, "num_draft_tokens": 4}, {"paged": 65536, "unpaged": 2304}),
    ({"cache_tokens": 4096}, {"paged": 4096, "unpaged": 2048}),
    ({"cache_tokens": 1000, "ngram_draft": 2, "num_draft_tokens": 4}, {"paged": 1024, "unpaged": 1024}),
], ids=["default", "ngram", "cache", "small-cache-ngram"])
def test_exllamav2_memory_estimate_is_the_cache_the_library_allocates(tiny_llama_dir, kind, options, tokens,
                                                                      monkeypatch):
    """The estimate the memory budget sees before a load is the cache exllamav2's generator then has: unpaged
    (no flash-attn) one context, not the paged default of 65,536 tokens; whether it runs paged is told from
    flash-attn's files as exllamav2's own import tells it."""
    require_kind(kind)
    import sys

    from exllamav2 import attn

    from tests.page_generator import load_cpu_pages_v2_model
    from xllm_jupyter.backends import exllamav2_plan as v2
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.exllamav2 import ExllamaV2Backend
    from xllm_jupyter.backends.memory_estimate import kv_cache_bytes

    with monkeypatch.context() as patch:  # as before anything imported exllamav2
        patch.delitem(sys.modules, "exllamav2.attn")
        assert v2.runs_paged({}) == attn.has_flash_attn_with_paged
        assert list(v2.flash_attn_version()) == getattr(attn, "flash_attn_ver", [])
    assert v2.runs_paged({}) == attn.has_flash_attn_with_paged  # and after, from the library's flags
    paged = kind == "exllamav2-paged"
    monkeypatch.setattr(v2, "runs_paged", lambda config: paged)  # (the harness runs unpaged beside flash-attn)
    spec = ModelSpec(name="t", path=str(tiny_llama_dir), format="safetensors",
                     options=BackendOptions(**{"max_batch_size": 4, **options}))
    model = load_cpu_pages_v2_model(spec, paged=paged)
    allocated = int(model.generator.cache.max_seq_len)
    assert allocated == tokens[kind.partition("-")[2]]
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert ExllamaV2Backend().cache_bytes_estimate(spec) == kv_cache_bytes(config, allocated, None)


COLD_FIRST_LOAD = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    from tests.page_generator import BACKEND_OF_KIND
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.core import gc_freeze
    from xllm_jupyter.engine import loading

    library = "exllamav3" if sys.argv[1] == "exllamav3" else "exllamav2"
    assert library not in sys.modules and "transformers" not in sys.modules  # the imports are the first load's
    gc_freeze.freeze()  # what the engine's start does
    backend = BACKEND_OF_KIND[sys.argv[1]]()
    real_load, seen = type(backend).load, {}

    def load(self, spec):
        seen["frozen"], known = gc.get_freeze_count(), set(sys.modules)
        try:
            return real_load(self, spec)
        finally:
            seen["new_modules"] = sorted(set(sys.modules) - known)

    type(backend).load = load
    spec = ModelSpec(name="t", path=Path(sys.argv[2]), format="safetensors",
                     options=BackendOptions(max_batch_size=4, cache_tokens=4096))
    model = loading._load_and_prepare(backend, spec)
    print(json.dumps({**seen, "generator_frozen": gc_freeze.is_frozen(model.generator),
                      "tokens": model.tokenize("Hi")}))
""")


@pytest.mark.parametrize("kind", KINDS)
def test_a_first_exllama_load_freezes_its_imports_and_not_its_model(tiny_llama_dir, kind):
    """``ExllamaBackend.import_libraries``: in a fresh interpreter the first load imports the library (its CUDA
    extension module), the modules of it and of transformers a load reaches, then the engine freezes them and
    loads the model after the freeze, unfrozen, so its unload is a plain collection, not a full one of the
    process (core/gc_freeze.py). Without the hook the first load was frozen whole, model and all."""
    require_kind(kind)
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", COLD_FIRST_LOAD, kind, str(tiny_llama_dir)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["frozen"] > 100_000  # the imports' objects, frozen before the load
    assert got["new_modules"] == []  # the imports ahead were all of the load's: nothing left to import unfrozen
    assert not got["generator_frozen"] and got["tokens"]


def test_presence_and_frequency_penalties_count_the_answer_not_the_prompt(tiny_llama_dir):
    """exllamav2's sampler would count the prompt's 200 FILLER_TOKENs (20 off its lead of ~12); OpenAI counts the answer."""
    from tests.page_generator import FILLER_TOKEN
    from xllm_jupyter.core.types import SamplingParams

    require_kind("exllamav2-unpaged")
    model = load("exllamav2-unpaged", tiny_llama_dir)
    prompt = [FILLER_TOKEN] * 200 + list(range(100, 110))
    light = generate(model, prompt, 4, SamplingParams(temperature=0.0, frequency_penalty=0.1, presence_penalty=0.5))
    assert [e.token_id for e in light] == [FILLER_TOKEN] * 4
    # the answer does count: 2 per repeat (and 2 once) soon outweighs the lead
    heavy = generate(model, prompt, 12, SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
                     job_id=2)
    ids = [e.token_id for e in heavy if e.token_id is not None]
    assert ids[0] == FILLER_TOKEN and set(ids[1:]) - {FILLER_TOKEN}


def test_exllamav3_narrows_its_penalty_window_to_the_answer(tiny_llama_dir):
    """exllamav3's sampler is CUDA-only here: check the window our job sets on the library's own step."""
    require_kind("exllamav3")  # (before importing it: CI has no exllamav3)
    from exllamav3.generator.sampler.custom import SS_PresFreqP, SS_RepP

    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    model = load("exllamav3", tiny_llama_dir)
    job = SequenceJob(1, tuple(range(100, 140)), 8, SamplingParams(presence_penalty=0.5, repetition_penalty=1.2),
                      frozenset())
    native = model.make_job(job)
    (step,) = native.xllm_answer_steps
    assert type(step) is SS_PresFreqP
    for answer in (0, 3):
        if answer:
            native.sequences[0].sequence_ids.append(torch_ids([7] * answer))
        try:
            native.prepare_sampling_past_ids()
        except (RuntimeError, AssertionError):  # staging the ids on the device needs CUDA; the window is set first
            pass
        assert step.sustain_range == answer and step.decay_range == 0
    # repetition keeps the whole sequence (HF semantics)
    assert all(s.sustain_range > 10**6 for s in native.sampler.steps if type(s) is SS_RepP)
    assert model.make_job(SequenceJob(2, (1, 2), 4, SamplingParams(), frozenset())).xllm_answer_steps == ()


def torch_ids(ids):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def test_a_job_the_library_fails_ends_its_request_instead_of_hanging(tiny_llama_dir):
    """exllamav3 drops a job whose prefill raises (CUDA out of memory, say) and reports an ``error`` result."""
    from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

    require_kind("exllamav3")
    model = load("exllamav3", tiny_llama_dir)
    real_prefill, calls = model.generator.model.prefill, []

    def prefill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return real_prefill(*args, **kwargs)

    model.generator.model.prefill = prefill
    for job_id, start in ((1, 100), (2, 500)):
        model.add(SequenceJob(job_id, tuple(range(start, start + 300)), 3, SamplingParams(temperature=0.0), frozenset()))
    finished = {}
    for _ in range(40):
        finished.update({e.job_id: e.finish for e in model.step() if e.finish is not None})
        if len(finished) == 2:
            break
    assert sorted(finished.values()) == sorted([FinishReason.ERROR, FinishReason.LENGTH])
    assert model.active_jobs() == 0 and pages_held(model) == 0


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(("legacy", "v5"), [
    ({"rope_theta": 500000.0}, {"rope_theta": 500000.0, "rope_type": "default"}),
    ({"rope_theta": 1e5, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     {"rope_theta": 1e5, "rope_type": "linear", "factor": 4.0}),
    ({"rope_theta": 5e5, "rope_scaling": LLAMA3}, {"rope_theta": 5e5, **LLAMA3}),
    ({"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}},
     {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    # per layer type, as Gemma 3 is saved: the global layers' settings
    ({"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
     {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
      "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}),
    # moved in beside the rope type (GLM 4)
    ({"rope_theta": 1e4, "partial_rotary_factor": 0.5}, {"rope_theta": 1e4, "rope_type": "default",
                                                          "partial_rotary_factor": 0.5}),
], ids=["default", "linear", "llama3", "yarn", "per-layer-type", "partial-rotary"])
def test_exllamav2_reads_rope_settings_as_transformers_5_saves_them(tiny_llama_dir, tmp_path, legacy, v5):
    """The same RoPE settings as transformers 4 wrote them (which exllamav2 reads) and as 5 writes them."""
    require_kind("exllamav2-unpaged")  # (before importing it: CI has no exllamav2)
    import exllamav2

    from xllm_jupyter.backends.exllamav2 import apply_rope_parameters

    base = {k: v for k, v in json.loads((tiny_llama_dir / "config.json").read_text()).items()
            if not k.startswith("rope")}
    configs = {}
    for name, content in (("legacy", {**base, **legacy}), ("v5", {**base, "rope_parameters": v5})):
        model = tmp_path / name
        model.mkdir()
        for f in tiny_llama_dir.iterdir():
            if f.name != "config.json":
                (model / f.name).symlink_to(f)
        (model / "config.json").write_text(json.dumps(content))
        configs[name] = exllamav2.ExLlamaV2Config(str(model))
    apply_rope_parameters(configs["v5"], tmp_path / "v5")
    attributes = ["rotary_embedding_base", "scale_pos_emb", "alt_rope_method", "l3_rope_factor", "l3_rope_low_freq_factor",
                  "l3_rope_high_freq_factor", "l3_rope_original_max_position_embeddings", "yarn_rope_factor",
                  "yarn_rope_original_max_position_embeddings", "partial_rotary_factor", "mrope_section"]
    assert {a: getattr(configs["v5"], a, None) for a in attributes} == \
        {a: getattr(configs["legacy"], a, None) for a in attributes}
    assert configs["v5"].rotary_embedding_base == legacy["rope_theta"]


def test_exllamav2_cuts_top_p_and_min_p_itself_before_the_real_sampler(tiny_llama_dir):
    """exllamav2's compiled sampler draws after our job cut the logits (exllama_sampling.LogitsV2): the stand-in's
    FILLER_TOKEN holds about two thirds of the mass, so top_p 0.5 or min_p 0.5 leave it alone and every seed
    draws it, where the same seeds at top_p 1 draw other tokens too."""
    from tests.page_generator import FILLER_TOKEN
    from xllm_jupyter.core.types import SamplingParams

    require_kind("exllamav2-unpaged")
    model = load("exllamav2-unpaged", tiny_llama_dir)
    prompt = list(range(100, 120))

    def tokens(job_id: int, **sampling) -> list[int]:
        events = generate(model, prompt, 12, SamplingParams(temperature=1.0, seed=job_id, **sampling), job_id=job_id)
        return [e.token_id for e in events if e.token_id is not None]

    free = [t for job in range(1, 4) for t in tokens(job)]
    assert len(free) == 36 and set(free) != {FILLER_TOKEN}
    for i, cut in enumerate(({"top_p": 0.5}, {"min_p": 0.5}, {"top_k": 1})):
        assert tokens(10 + i, **cut) == [FILLER_TOKEN] * 12


def test_exllamav2_samples_below_the_temperature_it_would_decode_greedily(tiny_llama_dir):
    """exllamav2's sampler decodes greedily below temperature 0.01 (``sample_basic``); OpenAI and the transformers
    backend sample at any temperature above 0. Two tokens 0.001 apart at temperature 0.005 (e^0.2 to 1: 55/45):
    both are drawn over seeds, through the library's own draw; greedy still picks the first."""
    import torch

    from tests.page_generator import FILLER_TOKEN
    from xllm_jupyter.core.types import SamplingParams

    require_kind("exllamav2-unpaged")
    model = load("exllamav2-unpaged", tiny_llama_dir)
    vocab = model.generator.padded_vocab_size

    def forward_chunk(input_ids, preprocess_only=False, **kwargs):
        if preprocess_only:
            return None
        logits = torch.zeros((*input_ids.shape, vocab))
        logits[..., FILLER_TOKEN] = 12.0
        logits[..., FILLER_TOKEN + 1] = 11.999
        return {"logits": logits}

    model.generator.model.forward_chunk = forward_chunk

    def tokens(job_id: int, temperature: float) -> list[int]:
        events = generate(model, range(100, 120), 8, SamplingParams(temperature=temperature, seed=job_id), job_id=job_id)
        return [e.token_id for e in events if e.token_id is not None]

    drawn = [t for job_id in range(1, 7) for t in tokens(job_id, 0.005)]
    assert set(drawn) == {FILLER_TOKEN, FILLER_TOKEN + 1} and len(drawn) == 48
    assert set(tokens(10, 0.0)) == {FILLER_TOKEN}


def script_tokens(model, kind: str, script: list[int]) -> list[int]:
    """Make ``model``'s stand-in forward pick ``script``'s tokens in turn (one job at a time), through each library's
    own job: exllamav3's ``receive_sample`` (with probabilities from logits that favour the token), exllamav2's
    sampler over logits that favour it. Returns a list that grows by one entry per token the library samples."""
    import torch

    from tests.page_generator import FILLER_BOOST

    generator = model.generator
    vocab = generator.padded_vocab_size
    drawn: list[int] = []

    def logits_for(step: int, shape) -> "torch.Tensor":
        drawn.append(step)
        logits = torch.zeros(shape)
        logits[..., script[min(step, len(script) - 1)]] = FILLER_BOOST
        return logits

    if kind == "exllamav3":
        def xllm_sample(job):
            scores = logits_for(job.new_tokens, (1, vocab))
            token = scores.argmax(dim=-1, keepdim=True)
            return token, generator.xllm_probabilities(job, scores, token)

        generator.xllm_sample = xllm_sample
        return drawn
    calls = count()

    def forward_chunk(input_ids, preprocess_only=False, **kwargs):
        return None if preprocess_only else {"logits": logits_for(next(calls), (*input_ids.shape, vocab))}

    generator.model.forward_chunk = forward_chunk
    return drawn


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("logprobs", [False, True], ids=["text", "logprobs"])
def test_a_stop_token_releases_the_answer_the_library_held_back(tiny_llama_dir, kind, logprobs):
    """Both libraries hold text back while it ends in an incomplete UTF-8 character, and end a job on a stop token
    without releasing what they held, which was lost with its logprobs: here a lone byte 0xE2 (no character) last
    (both libraries), and exllamav2 0.3.2 holds everything after an earlier one too. The answer keeps them (a lone
    byte as U+FFFD). The stop token counts as a token of the answer (usage, logprobs), as on the transformers
    backend; its text never shows."""
    from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

    require_kind(kind)
    model = load(kind, tiny_llama_dir)
    hi, lone_byte, there, stop = 21041, 173, 665, 2  # " Hi", 0xE2, " there", <|im_end|>
    assert [model.chat.token_bytes(t) for t in (hi, lone_byte, there)] == [b" Hi", b"\xe2", b" there"]
    script_tokens(model, kind, [hi, lone_byte, there, lone_byte, stop])
    job = SequenceJob(1, tuple(range(100, 120)), 20, SamplingParams(temperature=0.0), frozenset({stop}),
                      logprobs=logprobs, top_logprobs=2 if logprobs else 0)
    model.add(job)
    events = []
    for _ in range(40):
        events += model.step()
        if events and events[-1].finish is not None:
            break
    assert events[-1].finish is FinishReason.STOP
    assert "".join(e.text for e in events) == " Hi\ufffd there\ufffd"
    tokens = [e.token_id for e in events if e.token_id is not None]
    assert tokens == [hi, lone_byte, there, lone_byte, stop]
    if logprobs:
        assert [e.token_bytes for e in events if e.token_id is not None] == [b" Hi", b"\xe2", b" there", b"\xe2", b""]
        assert all(e.logprob is not None and -1.0 < e.logprob <= 0 and len(e.top_logprobs) == 2
                   for e in events if e.token_id is not None)
    assert model.active_jobs() == 0 and pages_held(model) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_tool_markup_special_tokens_stay_in_the_text_of_a_job_that_keeps_them(tmp_path_factory, kind):
    """Mistral's tool-call markup is special tokens, whose text the libraries stream and we took out (with every
    special token's): a job with tools active keeps it (``keep_special``) so the tool parser sees the calls, in its
    logprobs too, and where the library held it back behind an incomplete character until the stop token; a job
    without keeps none of it, and no job any other special token's text."""
    from tests.models import build_tiny_llama
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    require_kind(kind)
    model = load(kind, build_tiny_llama(tmp_path_factory.mktemp("markup") / "m", special=("[TOOL_CALLS]", "[ARGS]")))
    calls, args = model.chat.tokenizer.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"])
    hi, lone_byte, there, end_of_text, stop = 21041, 173, 665, 0, 2  # " Hi", 0xE2, " there", <|endoftext|>, <|im_end|>
    for keep, text in ((("[TOOL_CALLS]", "[ARGS]"), " Hi[TOOL_CALLS] there[ARGS]\ufffd[TOOL_CALLS]"),
                       ((), " Hi there\ufffd")):
        script_tokens(model, kind, [hi, calls, end_of_text, there, args, lone_byte, calls, stop])
        model.add(SequenceJob(1, tuple(range(100, 120)), 20, SamplingParams(temperature=0.0), frozenset({stop}),
                              logprobs=True, keep_special=keep))
        events = []
        for _ in range(40):
            events += model.step()
            if events and events[-1].finish is not None:
                break
        assert "".join(e.text for e in events) == text
        assert [e.token_bytes for e in events if e.token_id == calls] == [b"[TOOL_CALLS]" if keep else b""] * 2
    assert model.active_jobs() == 0 and pages_held(model) == 0


def test_exllamav3_sets_no_draft_window_aside_for_a_draft_it_does_not_load(tiny_llama_dir, tmp_path):
    """A draft whose vocabulary is larger than the model's is not loaded (``draft_vocabulary_fits``); exllamav3 then
    drafts nothing, so the cache and the served context keep no draft window (nor the cache's rollback history):
    the context was cut by the window and the window's cache pages were never used."""
    import shutil

    require_kind("exllamav3")
    from tests.page_generator import load_cpu_pages_model
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec

    draft = tmp_path / "draft"
    shutil.copytree(tiny_llama_dir, draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": int(config["vocab_size"]) + 256}))

    def loaded(**options):
        spec = ModelSpec(name="t", path=str(tiny_llama_dir), format="safetensors", context_length=4096,
                         options=BackendOptions(max_batch_size=4, cache_tokens=4096, num_draft_tokens=4, **options))
        return load_cpu_pages_model(spec)

    model = loaded(draft_model_path=str(draft))
    assert model.context_length == 4095  # the cache less the one token exllamav3 keeps past a job's last
    assert model.generator.cache.max_history == 0
    assert model.details()["speculative"] is None and not model.generator.max_draft_tokens
    prompt = [100 + i % 50 for i in range(4095 - 40)]
    events = generate(model, prompt, 40)
    assert events[-1].completion_tokens == 40
    # the same draft with n-gram drafting on: the window is set aside for the n-gram drafts
    assert loaded(draft_model_path=str(draft), ngram_draft=2).context_length == 4091
    # a draft that fits drafts, and its window is set aside
    assert loaded(draft_model_path=str(tiny_llama_dir)).context_length == 4091


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
def test_exllamav2_drafting_limits_follow_a_draft_it_loads(tiny_llama_dir, tmp_path, kind):
    """exllamav2 checked its drafting limits (at most 8 draft tokens, the input size) and set the window aside for a
    draft whose vocabulary keeps it from loading: 12 draft tokens refused the load of a model that drafts nothing.
    Now it loads as without the draft: no window in the context, the generator's default input size."""
    import shutil

    from xllm_jupyter.core.errors import EngineError

    require_kind(kind)
    draft = tmp_path / "draft"
    shutil.copytree(tiny_llama_dir, draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": int(config["vocab_size"]) + 256}))
    model = load(kind, tiny_llama_dir, draft_model_path=str(draft), num_draft_tokens=12)
    assert model.details()["speculative"] is None and model.generator.num_draft_tokens == 0
    assert model.generator.logits_pinned.shape[1] == 8  # max_q_size: the default, no window
    assert model.context_length == load(kind, tiny_llama_dir).context_length
    assert generate(model, range(100, 120), 12)[-1].completion_tokens == 12
    # a draft that loads keeps its limit
    with pytest.raises(EngineError, match="num_draft_tokens must be at most 8"):
        load(kind, tiny_llama_dir, draft_model_path=str(tiny_llama_dir), num_draft_tokens=12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_string_in_a_held_answer_ends_it_at_the_token_the_transformers_backend_would(tiny_llama_dir, kind):
    """exllamav2 0.3.2 holds everything after an invalid byte; released at the stop token all on that token, the
    engine cut a stop string inside it there, counting every held token (5 here, not 2) and giving their logprobs.
    Token by token, the answer ends where the transformers backend's does (its detokenizer releases "\\ufffd there"
    with " there"), at a stop token or at max_tokens; without the stop string the whole answer, the stop token
    counted, its text never shown."""
    import asyncio

    from xllm_jupyter.engine.runner import ModelRunner

    require_kind(kind)
    model = load(kind, tiny_llama_dir)
    hi, lone_byte, there, stop = 21041, 173, 665, 2  # " Hi", 0xE2, " there", <|im_end|>
    runner = ModelRunner(model)
    runner.start()
    runner.wait_ready()

    async def answer(script=(lone_byte, there, hi, lone_byte, stop), max_tokens=20, **params) -> tuple:
        script_tokens(model, kind, list(script))
        return await answer_through(runner, range(100, 120), stop, max_tokens, **params)

    try:
        text, raw, usage, finish = asyncio.run(answer(stop=("there",)))
        assert (text, raw, usage, finish) == ("\ufffd ", [b"\xe2", b" there"], 2, "stop")
        text, raw, usage, finish = asyncio.run(answer())
        assert (text, raw, usage) == ("\ufffd there Hi\ufffd", [b"\xe2", b" there", b" Hi", b"\xe2", b""], 5)
        # exllamav2 releases the same at max_tokens: the stop string ends it where it ends on transformers too
        text, raw, usage, finish = asyncio.run(answer((lone_byte, there, hi, hi), max_tokens=4, stop=("there",)))
        assert (text, raw, usage, finish) == ("\ufffd ", [b"\xe2", b" there"], 2, "stop")
        wait_for_no_jobs(model)
        assert model.active_jobs() == 0 and pages_held(model) == 0
    finally:
        runner.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_text_streams_as_each_character_completes_after_an_invalid_byte(tiny_llama_dir, kind):
    """exllamav2 0.3.2 holds every token after a byte that makes no character until the job ends (or five U+FFFD):
    nothing streamed, the tokens all came at the stop token. Each token now goes out in the step that samples it,
    with the text it completes (U+FFFD for the lone byte once the next token shows it incomplete), its logprobs
    with it, and the library's release at the end adds nothing twice."""
    from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

    require_kind(kind)
    model = load(kind, tiny_llama_dir)
    hi, lone_byte, there, stop = 21041, 173, 665, 2  # " Hi", 0xE2, " there", <|im_end|>
    script = [hi, lone_byte, there, hi, lone_byte, hi, there, stop]
    drawn = script_tokens(model, kind, script)
    model.add(SequenceJob(1, tuple(range(100, 120)), 20, SamplingParams(temperature=0.0), frozenset({stop}),
                          logprobs=True, top_logprobs=2))
    text, texts, events = "", [], []
    for _ in range(40):
        sampled = len(drawn)
        step = model.step()
        # each token's event (its logprobs) in the step that samples it: exllamav3 put the byte's out a step late
        assert [e.token_id for e in step if e.token_id is not None] == script[sampled:len(drawn)]
        events += [e for e in step if e.token_id is not None]
        text += "".join(e.text for e in step)
        texts.append(text)
        if step and step[-1].finish is not None:
            break
    assert events[-1].finish is FinishReason.STOP
    assert [t for t in texts if t] == [" Hi", " Hi", " Hi\ufffd there", " Hi\ufffd there Hi", " Hi\ufffd there Hi",
                                       " Hi\ufffd there Hi\ufffd Hi", " Hi\ufffd there Hi\ufffd Hi there",
                                       " Hi\ufffd there Hi\ufffd Hi there"]
    assert [e.token_id for e in events] == script and events[-1].completion_tokens == len(script)
    assert [e.token_bytes for e in events] == [b" Hi", b"\xe2", b" there", b" Hi", b"\xe2", b" Hi", b" there", b""]
    assert all(e.logprob is not None and -1.0 < e.logprob <= 0 and len(e.top_logprobs) == 2 for e in events)
    assert len([t for t in texts if t]) == len(script)  # one step a token, its event in it
    assert model.active_jobs() == 0 and pages_held(model) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_string_after_an_invalid_byte_ends_the_job_when_it_is_sampled(tiny_llama_dir, kind):
    """The engine matches stop strings on streamed text: behind exllamav2 0.3.2's hold it saw " there" only at the
    stop token, and the library generated every token up to it (12 here) for an answer of 2. Now the job is
    cancelled the step after " there" is sampled, and its pages are free."""
    import asyncio

    from xllm_jupyter.engine.runner import ModelRunner

    require_kind(kind)
    model = load(kind, tiny_llama_dir)
    hi, lone_byte, there, stop = 21041, 173, 665, 2  # " Hi", 0xE2, " there", <|im_end|>
    drawn = script_tokens(model, kind, [lone_byte, there] + [hi] * 9 + [stop, hi])
    runner = ModelRunner(model)
    runner.start()
    runner.wait_ready()

    try:
        answer = asyncio.run(answer_through(runner, range(100, 120), stop, 20, stop=("there",)))
        assert answer == ("\ufffd ", [b"\xe2", b" there"], 2, "stop")
        wait_for_no_jobs(model)
        assert model.active_jobs() == 0 and pages_held(model) == 0
        assert len(drawn) <= 3, f"the library sampled {len(drawn)} tokens for an answer cut after 2"
    finally:
        runner.shutdown()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("script", "max_tokens", "content", "finish"), [
    # five lone bytes: exllamav2 releases all at the fifth U+FFFD, the fifth byte's character still open; the euro
    # sign's next two bytes complete it after that release
    ([173] * 5 + [220, 122, 21041, 2], 20, "\ufffd" * 4 + "\u20ac Hi", "stop"),
    ([21041, 173, 665, 173], 4, " Hi\ufffd there\ufffd", "length"),  # max_tokens inside a character
], ids=["fifth-fffd", "max-tokens"])
def test_held_tokens_streamed_and_released_later_go_out_once(tiny_llama_dir, kind, script, max_tokens, content,
                                                             finish):
    """What goes out while the library holds and what it releases later (at its fifth U+FFFD, at max_tokens) make
    the answer's tokens once each, their text that of the bytes decoded together, as the transformers backend's."""
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    require_kind(kind)
    model = load(kind, tiny_llama_dir)
    script_tokens(model, kind, script)
    model.add(SequenceJob(1, tuple(range(100, 120)), max_tokens, SamplingParams(temperature=0.0), frozenset({2}),
                          logprobs=True))
    events = []
    for _ in range(40):
        events += model.step()
        if events and events[-1].finish is not None:
            break
    assert events[-1].finish.value == finish and events[-1].completion_tokens == len(script)
    assert "".join(e.text for e in events) == content
    tokens = [e for e in events if e.token_id is not None]
    assert [e.token_id for e in tokens] == script and all(e.logprob is not None for e in tokens)
    assert model.active_jobs() == 0 and pages_held(model) == 0


def script_by_position(model, script: list[int], prompt_length: int, draft_misses: int = 0) -> None:
    """exllamav2's forward, and its draft model's, favour ``script``'s token for each cache position (the token
    after position p is ``script[p + 1 - prompt_length]``), so a draft window is scripted position by position: the
    library samples the script whatever it drafted. With ``draft_misses`` the draft model proposes a wrong token at
    answer positions that are multiples of it (those windows are partly rejected)."""
    import torch

    from tests.page_generator import FILLER_BOOST

    generator = model.generator
    vocab = generator.padded_vocab_size

    def forward(misses: int):
        def forward_chunk(input_ids, preprocess_only=False, attn_params=None, **kwargs):
            if preprocess_only:
                return None
            rows, width = input_ids.shape
            seqlens = getattr(attn_params, "cache_seqlens", None)
            starts = seqlens[:rows].tolist() if seqlens is not None else [int(attn_params.past_len)]
            logits = torch.zeros((rows, width, vocab))
            for row, start in enumerate(starts):
                for i in range(width):
                    at = min(max(0, int(start) + i + 1 - prompt_length), len(script) - 1)
                    token = script[at] + (1 if misses and at % misses == misses - 1 else 0)
                    logits[row, i, token] = FILLER_BOOST
            return {"logits": logits}
        return forward_chunk

    generator.model.forward_chunk = forward(0)
    if generator.draft_model is not None:
        generator.draft_model.forward_chunk = forward(draft_misses)


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
@pytest.mark.parametrize("drafting", [{"ngram_draft": 2, "num_draft_tokens": 4},
                                      {"draft_model_path": "<model>", "num_draft_tokens": 3},
                                      {"draft_model_path": "<model>", "num_draft_tokens": 3, "misses": 3}],
                         ids=["ngram", "draft-model", "draft-model-misses"])
def test_held_tokens_stream_once_each_while_drafting(tiny_llama_dir, kind, drafting):
    """Drafting, exllamav2 samples several tokens a step (``receive_sample`` once for each accepted one), some held
    after an invalid byte, some released: every token goes out once, in order, with its logprobs and the text its
    bytes complete, a character split over a window boundary whole; usage counts each once and pages are freed."""
    from xllm_jupyter.backends.exllama_results import texts_by_token
    from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

    require_kind(kind)
    options = {k: (str(tiny_llama_dir) if v == "<model>" else v) for k, v in drafting.items() if k != "misses"}
    model = load(kind, tiny_llama_dir, **options)
    hi, lone_byte, there, b82, bac, stop = 21041, 173, 665, 220, 122, 2  # 0xE2 0x82 0xAC: the euro sign
    script = [hi, lone_byte, there, lone_byte, b82, bac, hi, hi, lone_byte, lone_byte, there, hi, hi, hi, stop]
    prompt = tuple(range(100, 120))
    script_by_position(model, script, len(prompt), drafting.get("misses", 0))
    # two jobs at once (one after the other unpaged), then one that ends at max_tokens inside a character
    for job_id, first in [(1, 100), (2, 300)]:
        model.add(SequenceJob(job_id, tuple(range(first, first + len(prompt))), 40, SamplingParams(temperature=0.0),
                              frozenset({stop}), logprobs=True, top_logprobs=2))
    events, per_step = {1: [], 2: [], 3: []}, []
    for _ in range(120):
        step = model.step()
        for e in step:
            events[e.job_id].append(e)
        per_step.append(max([len([e for e in step if e.token_id is not None and e.job_id == j]) for j in events]))
        if all(events[j] and events[j][-1].finish is not None for j in (1, 2)):
            if not events[3]:
                model.add(SequenceJob(3, prompt, 9, SamplingParams(temperature=0.0), frozenset({stop}), logprobs=True,
                                      top_logprobs=2))
            elif events[3][-1].finish is not None:
                break
    # a step puts out what it sampled, at most the window and the model's own token (held ones came at the end)
    assert max(per_step) <= options["num_draft_tokens"] + 1 and max(per_step) > 1, per_step
    for job_id, length in [(1, len(script)), (2, len(script)), (3, 9)]:
        out = events[job_id]
        assert out[-1].finish is (FinishReason.STOP if length == len(script) else FinishReason.LENGTH)
        tokens = [e for e in out if e.token_id is not None]
        assert [e.token_id for e in tokens] == script[:length] and out[-1].completion_tokens == length
        spelled = [model.chat.token_bytes(t) for t in script[:length]]
        expected = texts_by_token(spelled[:-1] + [b""] if length == len(script) else spelled)
        assert "".join(e.text for e in out) == "".join(expected)
        assert [e.text for e in tokens] == expected  # each token its own characters, in its own event
        assert [e.token_bytes for e in tokens] == spelled
        assert all(e.logprob is not None and len(e.top_logprobs) == 2 for e in tokens)
    assert "".join(texts_by_token([model.chat.token_bytes(t) for t in script[:-1]])) == (
        " Hi\ufffd there\u20ac Hi Hi\ufffd\ufffd there Hi Hi Hi")
    assert "".join(e.text for e in events[3]) == " Hi\ufffd there\u20ac Hi Hi\ufffd"
    assert model.details()["speculative"]["accepted"] > 0
    if drafting.get("misses"):
        assert model.details()["speculative"]["rejected"] > 0
    assert model.active_jobs() == 0 and pages_held(model) == 0


@pytest.mark.parametrize("kind", ["exllamav2-paged", "exllamav2-unpaged"])
def test_a_stop_string_after_an_invalid_byte_ends_a_drafting_job(tiny_llama_dir, kind):
    """Drafting, the stop string after an invalid byte goes out with the window that samples it: the engine cuts
    the answer there (tokens the window sampled after it not counted), cancels the job, and its pages are free."""
    import asyncio

    from xllm_jupyter.engine.runner import ModelRunner

    require_kind(kind)
    model = load(kind, tiny_llama_dir, draft_model_path=str(tiny_llama_dir), num_draft_tokens=3)
    hi, lone_byte, there, stop = 21041, 173, 665, 2  # " Hi", 0xE2, " there", <|im_end|>
    prompt = tuple(range(100, 120))
    script_by_position(model, [hi, lone_byte, there] + [hi] * 20 + [stop], len(prompt))
    steps = count()
    iterate = model.generator.iterate
    model.generator.iterate = lambda: (next(steps), iterate())[1]
    runner = ModelRunner(model)
    runner.start()
    runner.wait_ready()

    try:
        answer = asyncio.run(answer_through(runner, prompt, stop, 30, stop=("there",)))
        assert answer == (" Hi\ufffd ", [b" Hi", b"\xe2", b" there"], 3, "stop")
        wait_for_no_jobs(model)
        assert model.active_jobs() == 0 and pages_held(model) == 0
        # one library step prefills and samples the window with " there" (the cancel needs none): the 24 tokens
        # held to the stop token took 6
        assert next(steps) <= 2
    finally:
        runner.shutdown()
