"""Static-cache (slot) decoding of the transformers backend, compiled or not, against the eager path.

On CPU the slot cache runs eagerly and under ``torch.compile(backend="eager", fullgraph=True)``,
which traces the whole decode step as CUDA graphs need it (any graph break fails) without
generating code. The GPU test at the end compiles with inductor and CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.server_fixtures import TINY, make_test_config, running_server  # noqa: E402
from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.hf_compiled import (  # noqa: E402
    StaticBatch,
    StaticPlan,
    compiled_graphs,
    give_this_thread_cudagraph_state,
)
from xllm_jupyter.backends.registry import (  # noqa: E402
    AUTO_ORDER,
    COMPILED_FIRST,
    auto_order,
    compile_setting,
    select_backend,
)
from xllm_jupyter.backends.slot_cache import SPARE_COLUMNS, buckets  # noqa: E402
from xllm_jupyter.backends.hf_model import TransformersModel  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402
from xllm_jupyter.core.config import EngineConfig  # noqa: E402
from xllm_jupyter.core.errors import ContextLengthExceeded, EngineError  # noqa: E402
from xllm_jupyter.core.types import (  # noqa: E402
    FinishReason,
    GenerationParams,
    GenerationRequest,
    SamplingParams,
    SequenceJob,
)
from xllm_jupyter.engine.engine import Engine  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
#: top_k keeps the sampled CDF short: over the random model's near-uniform 49k-token softmax,
#: float rounding (~1e-7) between two correct implementations can move a draw to the next id
SEEDED = SamplingParams(temperature=0.8, top_k=20, seed=7)
SLOTS = 3
#: 512 columns per slot: windows of 256 and 512 columns, so long jobs cross a window boundary
CACHE_TOKENS = SLOTS * 512
_ids = iter(range(1, 1_000_000))


def cpu_spec(path: Path, **options) -> ModelSpec:
    """The tiny Llama on CPU with ``options``."""
    return ModelSpec(name="tiny", path=Path(path), options=BackendOptions(**{"device": "cpu", "torch_threads": 1, **options}))


@pytest.fixture(scope="module")
def eager(tiny_llama_dir) -> TransformersModel:
    """The reference: the dynamic-batch eager path."""
    m = TransformersBackend().load(cpu_spec(tiny_llama_dir, compile="off", max_batch_size=SLOTS))
    yield m
    m.unload()


def slot_model(eager: TransformersModel, compile_backend: str | None, *, warm: bool = True) -> TransformersModel:
    """The same weights decoding through a slot cache (``compile_backend`` None: not compiled), warmed up here."""
    m = TransformersModel(cpu_spec(eager.model.name_or_path), eager.model, eager.tokenizer, device=torch.device("cpu"),
                          max_batch_size=SLOTS, static=StaticPlan(CACHE_TOKENS, compile_backend))
    if warm:
        m.warm_up()
    return m


@pytest.fixture(scope="module", params=[None, "eager"], ids=["slots-uncompiled", "slots-compiled"])
def static(request, eager) -> TransformersModel:
    """Slot decoding, uncompiled and traced whole by torch.compile (backend "eager", fullgraph)."""
    m = slot_model(eager, request.param)
    yield m
    m.unload()


def job(prompt, max_tokens, sampling=GREEDY, **kw) -> SequenceJob:
    """A job with a fresh id."""
    return SequenceJob(next(_ids), tuple(prompt), max_tokens, sampling, frozenset(), **kw)


def schedule(sampling=GREEDY):
    """Jobs of different prompt lengths joining at different steps; more jobs than slots."""
    return {0: [job(range(200, 230), 40, sampling)],
            2: [job(range(50, 55), 6, sampling, logprobs=True, top_logprobs=2), job(range(60, 77), 30, sampling)],
            5: [job(range(70, 72), 25, sampling)],  # queued: every slot is taken
            9: [job(range(300, 540), 30, sampling)],  # 240 + 30 tokens: crosses the 256-column window
            14: [job(range(80, 99), 20, sampling)]}


def run(m: TransformersModel, joins, *, cancels=None, max_steps=300):
    """Step until idle; returns events per join order (index in ``joins``) and the slot sets seen."""
    order = {j.job_id: i for i, j in enumerate(j for step in sorted(joins) for j in joins[step])}
    events: dict[int, list] = defaultdict(list)
    slots_seen: list[tuple[int, ...]] = []
    for step in range(max_steps):
        for j in joins.get(step, []):
            m.add(j)
        for jid in (cancels or {}).get(step, []):
            m.cancel(jid)
        if not m.active_jobs() and step > max(joins):
            break
        for e in m.step():
            events[order[e.job_id]].append(e)
        if isinstance(m._batch, StaticBatch):
            slots_seen.append(tuple(m._batch.table.rows))
    assert not m.active_jobs()
    return events, slots_seen


def tokens(evs) -> list[int]:
    """Token ids of one job's events."""
    return [e.token_id for e in evs if e.token_id is not None]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_slot_decoding_matches_eager_under_continuous_batching(eager, static, sampling):
    want, _ = run(eager, schedule(sampling))
    got, slots_seen = run(static, schedule(sampling))
    assert len(got) == len(want) == 6
    for i in want:
        assert tokens(got[i]) == tokens(want[i]), f"job {i}"
        assert got[i][-1].finish is want[i][-1].finish is FinishReason.LENGTH
        for a, b in zip(want[i], got[i]):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
                assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert len(tokens(got[4])) == 30  # the long job really decoded past column 256
    # every slot was used, never more than SLOTS, and slots were handed on to later jobs
    assert set().union(*slots_seen) == set(range(SLOTS)) and max(len(s) for s in slots_seen) == SLOTS
    assert sum(1 for a, b in zip(slots_seen, slots_seen[1:]) if set(b) - set(a)) >= 3
    assert static._batch.table.rows == [] and sorted(static._batch.table.free) == list(range(SLOTS))


def test_a_prefill_error_resumes_into_the_slot_cache_without_losing_tokens(eager, static, monkeypatch):
    # the engine's drop_failed (engine/step_failures.py): the prefill before the failed one joins the slot cache
    broken_prompt = tuple(range(600, 800))
    prefill = static._prefill

    def failing(seqs, events):
        if any(s.job.prompt_ids == broken_prompt for s in seqs):
            raise RuntimeError("a failure these inputs trigger")
        return prefill(seqs, events)

    monkeypatch.setattr(static, "_prefill", failing)
    first, short, broken = job(range(200, 230), 30), job(range(50, 55), 12), job(broken_prompt, 6)
    want, _ = run(eager, {0: [first], 2: [short]})
    static.add(first)
    got: dict[int, list] = defaultdict(list)
    for step in range(60):
        if step == 2:
            static.add(short)
            static.add(broken)
            with pytest.raises(EngineError):
                static.step()
            assert static.drop_failed(frozenset({short.job_id, broken.job_id})) == {broken.job_id}
        if not static.active_jobs():
            break
        for e in static.step():
            got[e.job_id].append(e)
    assert [tokens(got[first.job_id]), tokens(got[short.job_id])] == [tokens(want[0]), tokens(want[1])]
    assert broken.job_id not in got and static._batch.table.rows == []


def test_details_memory_and_context(eager, static):
    details = static.details()
    assert details["decode"] == ("compiled-static" if static._batch.decoder.compiled else "static")
    assert eager.details()["decode"] == "eager"
    cache = static._batch.cache
    # 2 layers x (keys + values) x 3 slots x 2 kv heads x (512 + 16 spare) columns x 16 dims x 4 bytes
    assert cache.nbytes == 2 * 2 * SLOTS * 2 * (512 + SPARE_COLUMNS) * 16 * 4
    assert static.memory_bytes() == static._weight_bytes + cache.nbytes
    assert static.context_length == 512  # the slot length bounds every sequence
    with pytest.raises(ContextLengthExceeded):
        static.add(job(range(100, 612), 4))
    long, _ = run(static, {0: [job(range(100, 500), 500)]})
    assert long[0][-1].finish is FinishReason.LENGTH and long[0][-1].completion_tokens == 112


def test_cancel_frees_the_slot_for_the_next_job(eager, static):
    a, b = job(range(200, 230), 100), job(range(40, 51), 100)
    static.add(a)
    static.add(b)
    static.step()
    static.step()
    table = static._batch.table
    assert sorted(table.rows) == [0, 1]
    slot_a = table.rows[[s.job.job_id for s in static._running].index(a.job_id)]
    static.cancel(a.job_id)
    out = static.step()
    assert [(e.job_id, e.finish) for e in out if e.finish] == [(a.job_id, FinishReason.CANCELLED)]
    assert table.rows == [1 - slot_a] and slot_a in table.free and static.last_batch_size == 1
    # the next job takes a's slot (over a's stale keys) and decodes as it does alone
    c = job(range(60, 75), 12)
    static.add(c)
    static.step()
    assert table.rows == [1 - slot_a, slot_a]
    static.cancel(b.job_id)
    events = defaultdict(list)
    while static.active_jobs():
        for e in static.step():
            events[e.job_id].append(e)
    alone, _ = run(eager, {0: [job(range(60, 75), 12)]})
    assert [e.finish for e in events[b.job_id]] == [FinishReason.CANCELLED]
    assert tokens(events[c.job_id])[-11:] == tokens(alone[0])[-11:] and len(tokens(alone[0])) == 12
    assert table.rows == [] and sorted(table.free) == [0, 1, 2]


def test_a_row_that_went_non_finite_leaves_its_slot_clean_for_the_next_job(eager):
    # a decode step that overflows (fp16, say) writes NaN keys/values into the job's slot and the job fails alone;
    # the slot's next job must decode as it does alone: its masked columns span the old ones, and 0 * NaN is NaN
    m = slot_model(eager, None)
    poison = 1234

    def overflow(module, args, out):  # the embedding of ``poison`` overflows
        return torch.where((args[0] == poison).unsqueeze(-1), float("inf"), out)

    hook = eager.model.get_input_embeddings().register_forward_hook(overflow)
    try:
        alone, _ = run(eager, {0: [job(range(100, 110), 8)]})
        forced = dataclasses.replace(GREEDY, logit_bias={poison: 100.0})  # its first token is ``poison``
        failed, _ = run(m, {0: [job(range(200, 240), 3, forced)]})
        assert failed[0][-1].finish is FinishReason.ERROR and "non-finite" in failed[0][-1].error
        after, slots_seen = run(m, {0: [job(range(100, 110), 8)]})
        assert slots_seen[0] == (0,)  # the failed job's slot
        assert after[0][-1].finish is FinishReason.LENGTH and tokens(after[0]) == tokens(alone[0])
    finally:
        hook.remove()
        m.unload()


def test_lora_rows_follow_their_slots(tiny_llama_dir, tmp_path):
    from tests.test_lora import _make_adapter

    adapter = _make_adapter(Path(tiny_llama_dir), tmp_path / "ad", seed=3)
    spec = cpu_spec(tiny_llama_dir, compile="off", max_batch_size=SLOTS)
    models = [TransformersBackend().load(spec), TransformersBackend().load(spec)]
    models[1] = TransformersModel(spec, models[1].model, models[1].tokenizer, device=torch.device("cpu"),
                                  max_batch_size=SLOTS, static=StaticPlan(CACHE_TOKENS, "eager"))
    outs = []
    for m in models:
        m.load_adapter("ad", adapter)
        # the adapter row sits in slot 1 while slot 0 is empty, so slot order != row order
        joins = {0: [job(range(30, 40), 3), job(range(200, 220), 16, adapter="ad")], 1: [job(range(90, 99), 12)]}
        outs.append(run(m, joins)[0])
    assert models[1].details()["decode"] == "static"  # LoRA hooks: the slot cache runs uncompiled
    assert {i: tokens(e) for i, e in outs[1].items()} == {i: tokens(e) for i, e in outs[0].items()}
    plain, _ = run(models[0], {0: [job(range(200, 220), 16)]})
    assert tokens(plain[0]) != tokens(outs[0][1])  # the adapter really changed that row


def test_compiled_steps_refuse_a_thread_other_than_the_one_that_warmed_them_up(eager):
    # torch's CUDA graph trees keep graphs per thread (a second thread's first new shape fails
    # inside torch): the decoder enforces one thread on every device, so CPU runs catch it
    m = slot_model(eager, "eager", warm=False)
    helper = threading.Thread(target=m.warm_up)
    helper.start()
    helper.join()
    assert m._batch.decoder.thread == helper.ident
    with pytest.raises(EngineError, match="generation step") as caught:
        run(m, {0: [job(range(10, 20), 3)]})
    assert "second thread" in str(caught.value.__cause__)
    m.unload()


def test_each_model_compiles_its_own_graphs(eager):
    # shared graphs would make two models re-record each other's CUDA graphs at every switch
    from torch._dynamo.utils import counters

    first = slot_model(eager, "eager")
    graphs = counters["stats"]["unique_graphs"]
    second = slot_model(eager, "eager")
    assert counters["stats"]["unique_graphs"] > graphs
    first.unload()
    second.unload()


def test_unloading_drops_the_compiled_graphs(eager):
    # dynamo keeps a compiled code object alive from its own tables (and a module global per graph):
    # on CUDA every unload or reload would keep its CUDA graphs and their memory pool
    import xllm_jupyter.backends.hf_compiled as hc
    from xllm_jupyter.backends.hf_compiled import compiled_graphs

    def compiled_globals():
        return {name for name in vars(hc) if name.startswith("__compiled_fn")}

    before = compiled_globals()
    m = slot_model(eager, "eager")
    fn = m._batch.decoder._fn
    assert compiled_graphs(fn) >= 1 and compiled_globals() - before
    m.unload()
    assert compiled_graphs(fn) == 0 and compiled_globals() <= before


def test_after_the_warm_up_serving_compiles_nothing(eager):
    # a compile while serving stalls every running stream (seconds on CPU, up to minutes on a GPU)
    from torch._dynamo.utils import counters

    m = slot_model(eager, "eager")
    graphs = counters["stats"]["unique_graphs"]
    run(m, {0: [job(range(10, 40), 300)]})  # one row past the first window
    run(m, {0: [job(range(10, 40), 300), job(range(50, 60), 200)], 5: [job(range(70, 90), 100)]})
    assert counters["stats"]["unique_graphs"] == graphs
    m.unload()


def test_one_graph_serves_every_shape_so_steps_skip_their_guard_checks(eager):
    # ~1,000 guards cost 0.2-0.6 ms a step here; with one graph there is nothing for them to choose
    m = slot_model(eager, "eager")
    decoder = m._batch.decoder
    assert decoder.widths == (2, 3) and decoder.windows == (256, 512)  # one row runs as two
    assert compiled_graphs(decoder._fn) == 1 and decoder.skips_guards
    assert {k: m.details()[k] for k in ("decode", "attention", "guard_checks")} == {
        "decode": "compiled-static", "attention": "xllm_slot_sdpa", "guard_checks": "skipped"}
    joins = {0: [job(range(10, 40), 300)], 3: [job(range(50, 60), 20)]}  # past the first window; 1-3 rows
    before = decoder.steps_without_guard_checks
    got, slots_seen = run(m, joins)
    want, _ = run(eager, {0: [job(range(10, 40), 300)], 3: [job(range(50, 60), 20)]})
    assert [tokens(got[i]) for i in (0, 1)] == [tokens(want[i]) for i in (0, 1)]
    assert {len(s) for s in slots_seen} == {0, 1, 2}  # one row ran alone, then two
    assert decoder.steps_without_guard_checks - before == 299  # every decode step: the first token is the prefill's
    assert compiled_graphs(decoder._fn) == 1
    m.unload()


def takes_fixed_sizes_only(gm, example_inputs):
    """A torch.compile backend that refuses graphs with sizes that vary (as a compiler might)."""
    if any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))
           for x in example_inputs):
        raise RuntimeError("this compiler takes fixed sizes only")
    return gm.forward


def refuses_everything(gm, example_inputs):
    """A torch.compile backend that always fails."""
    raise RuntimeError("the compiler failed")


def test_a_failed_compile_retries_with_fixed_shapes_then_decodes_eagerly(eager):
    # a compiler failure must cost speed, not the model: one graph, else specialized shapes, else eager
    want, _ = run(eager, {0: [job(range(10, 40), 280)], 2: [job(range(50, 60), 20)]})
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # fixed sizes stay fixed
        fixed = slot_model(eager, takes_fixed_sizes_only)
    decoder = fixed._batch.decoder
    assert decoder.compiled and not decoder.one_graph and not decoder.skips_guards and decoder.widths == (1, 2, 3)
    assert fixed.details()["guard_checks"] == "checked"
    assert compiled_graphs(decoder._fn) == len(decoder.widths) * len(decoder.windows)  # one per shape
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        got, _ = run(fixed, {0: [job(range(10, 40), 280)], 2: [job(range(50, 60), 20)]})
    assert [tokens(got[i]) for i in (0, 1)] == [tokens(want[i]) for i in (0, 1)]
    assert fixed.details()["decode"] == "compiled-static"
    broken = slot_model(eager, refuses_everything)
    assert not broken._batch.decoder.compiled and broken.details()["decode"] == "static"
    assert "guard_checks" not in broken.details()
    got, _ = run(broken, {0: [job(range(10, 40), 280)], 2: [job(range(50, 60), 20)]})
    assert [tokens(got[i]) for i in (0, 1)] == [tokens(want[i]) for i in (0, 1)]
    fixed.unload()
    broken.unload()


def test_a_new_thread_can_record_cuda_graphs_after_the_setup():
    # torch 2.11 asserts in get_container on any thread but the one that imported the module
    from concurrent.futures import ThreadPoolExecutor

    from torch._inductor import cudagraph_trees as trees

    def on_a_new_thread():
        give_this_thread_cudagraph_state()
        return trees.get_container(0)  # what recording a graph calls first (no CUDA needed)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(on_a_new_thread).result().device_index == 0


async def test_the_engine_thread_compiles_and_steps_the_model(tiny_catalog):
    engine = Engine(EngineConfig(compile="on", max_batch_size=2), catalog=TraceOnly(tiny_catalog))
    try:
        model = await engine.load(TINY)
        request = GenerationRequest(model=TINY, prompt_ids=tuple(range(10, 20)),
                                    params=GenerationParams(max_tokens=4, ignore_eos=True))  # four steps, whatever it draws
        done = [ev async for ev in engine.generate(request)][-1]
        assert done.usage.completion_tokens == 4
        assert model.details()["decode"] == "compiled-static"
        assert model._batch.decoder.thread == engine._runners[TINY]._thread.ident != threading.get_ident()
    finally:
        await engine.stop()


def test_compile_option_chooses_the_path_at_load(tiny_llama_dir):
    backend = TransformersBackend()
    on = backend.load(cpu_spec(tiny_llama_dir, compile="on", compile_backend="eager", max_batch_size=2))
    auto = backend.load(cpu_spec(tiny_llama_dir))  # auto: off on CPU
    try:
        assert on.details()["decode"] == "compiled-static" and isinstance(on._batch, StaticBatch)
        assert auto.details()["decode"] == "eager"
    finally:
        on.unload()
        auto.unload()
    with pytest.raises(EngineError, match="engine.compile"):
        backend.load(cpu_spec(tiny_llama_dir, compile="sometimes"))


def test_buckets():
    assert buckets(1) == (1,) and buckets(16) == (1, 2, 4, 8, 16) and buckets(12) == (1, 2, 4, 8, 12)
    assert buckets(4096, 256) == (256, 512, 1024, 2048, 4096) and buckets(100, 256) == (100,)


# ------------------------------------------------------------------- selection rule
@pytest.mark.parametrize("value,want", [("auto", "auto"), ("on", "on"), ("OFF", "off"), (True, "on"),
                                        (False, "off"), ("True", "on"), ("false", "off"), (None, "auto")])
def test_compile_setting_reads_yaml_spellings(value, want):
    assert compile_setting(BackendOptions(compile=value)) == want


def test_registry_prefers_compiled_transformers_for_fp16_safetensors_only(tiny_llama_dir):
    def spec(fmt="safetensors", **options):
        return ModelSpec(name="m", path=Path(tiny_llama_dir), format=fmt, options=BackendOptions(**options))

    assert auto_order(spec(compile="on")) == COMPILED_FIRST == ("transformers", "exllamav3", "exllamav2")
    assert auto_order(spec(compile="off")) == AUTO_ORDER == ("exllamav3", "exllamav2", "transformers")
    for fmt in ("exl3", "exl2", "gptq", "gguf"):  # quantized models stay on exllama
        assert auto_order(spec(fmt, compile="on")) == AUTO_ORDER
    assert auto_order(dataclasses.replace(spec(compile="on"), task="embedding")) == AUTO_ORDER
    assert auto_order(spec(compile="auto", device="cpu")) == AUTO_ORDER
    assert auto_order(spec(compile="auto", device="cuda", dtype="float32")) == AUTO_ORDER
    assert auto_order(spec(compile="auto")) == AUTO_ORDER  # unmeasured on a GPU: only "on" reorders
    assert select_backend(spec(compile="on")).name == "transformers"
    # a manifest's backend still wins
    with pytest.raises(Exception, match="exllamav3"):
        select_backend(dataclasses.replace(spec(compile="on"), backend="exllamav3"))


def test_engine_passes_compile_to_the_backend(tiny_catalog):
    engine = Engine(EngineConfig(compile="on"), catalog=tiny_catalog)
    assert engine._resolve(TINY).options.compile == "on"
    assert Engine(EngineConfig(), catalog=tiny_catalog)._resolve(TINY).options.compile == "auto"


# ------------------------------------------------------------------------- server
class TraceOnly:
    """The real store, with torch.compile's "eager" backend (full tracing, no C++ build on CPU)."""

    def __init__(self, store):
        self.store = store

    def resolve(self, name):
        spec = self.store.resolve(name)
        return dataclasses.replace(spec, overrides={**spec.overrides, "compile_backend": "eager"})

    def names(self):
        return self.store.names()


class Renamed(TraceOnly):
    """TraceOnly, with more names for the same model (two compiled models from one checkpoint)."""

    def __init__(self, store, aliases: dict[str, str]):
        super().__init__(store)
        self.aliases = aliases

    def resolve(self, name):
        """The aliased model's spec under ``name``."""
        return dataclasses.replace(super().resolve(self.aliases.get(name, name)), name=name)


async def test_a_model_compiles_while_another_serves(tiny_catalog, eager):
    # a torch.compile trace beside another transformers forward fails (the trace state is
    # process-wide) and the skip stance is process-wide: the compile gate keeps them apart
    import asyncio

    from xllm_jupyter.backends.compile_gate import COMPILE_GATE
    from xllm_jupyter.core.types import ChoiceDelta

    second = "tiny-second"
    engine = Engine(EngineConfig(compile="on", max_batch_size=2), catalog=Renamed(tiny_catalog, {second: TINY}))
    prompt = tuple(range(10, 40))
    want, _ = run(eager, {0: [job(prompt, 60)]})

    async def generated(name):
        params = GenerationParams(max_tokens=60, sampling=GREEDY, ignore_eos=True)
        events = [ev async for ev in engine.generate(GenerationRequest(model=name, prompt_ids=prompt, params=params))]
        return [t for ev in events if isinstance(ev, ChoiceDelta) for t in ev.token_ids]

    def compiling() -> bool:
        deadline = time.monotonic() + 60
        while COMPILE_GATE.in_flight[2] == 0:  # the second model's first compile is under way
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    try:
        first = (await engine.load(TINY))._batch.decoder
        assert first.skips_guards
        loading = asyncio.create_task(engine.load(second))
        assert await asyncio.to_thread(compiling)
        during = await generated(TINY)
        other = (await loading)._batch.decoder
        before = first.steps_without_guard_checks
        assert during == await generated(TINY) == await generated(second) == tokens(want[0])
        assert first.steps_without_guard_checks - before == 59  # every decode step skipped its guard checks
        assert other.compiled and other.skips_guards and other.steps_without_guard_checks == 59
        assert COMPILE_GATE.in_flight == (0, 0, 0)
    finally:
        await engine.stop()


def test_compiles_beside_another_models_forwards_do_not_fail(tiny_llama_dir):
    # without the gate, 4-6 of 8 such compiles failed with transformers 5.25 (each model then
    # decoded eagerly): dynamo read trace state that the other thread's forwards switched
    backend = TransformersBackend()
    serving = backend.load(cpu_spec(tiny_llama_dir, compile="off", max_batch_size=2))
    stop = threading.Event()

    def serve():
        with torch.inference_mode():
            while not stop.is_set():
                serving.add(job(range(10, 30), 2))
                while serving.active_jobs():
                    serving.step()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(4):
            m = backend.load(cpu_spec(tiny_llama_dir, compile="on", compile_backend="eager", max_batch_size=2))
            m.warm_up()
            assert m.decode_mode == "compiled-static" and m._batch.decoder.skips_guards
            m.unload()
    finally:
        stop.set()
        thread.join()
        serving.unload()


def test_server_with_compile_on_serves_and_reports_decode_mode(xllm_home, tiny_catalog, client):
    import httpx
    import openai

    base = make_test_config(xllm_home)
    config = dataclasses.replace(base, engine=dataclasses.replace(base.engine, compile="on"))
    messages = [{"role": "user", "content": "Count: one two three"}]
    want = client.chat.completions.create(model=TINY, messages=messages, max_tokens=16, temperature=0)
    with running_server(config, TraceOnly(tiny_catalog), TINY) as srv:
        headers = {"Authorization": f"Bearer {srv.api_key}"}
        body = httpx.get(srv.base_url + "/models", headers=headers).json()
        entry = next(m for m in body["data"] if m["id"] == TINY)
        assert '"decode": "compiled-static"' in json.dumps(entry) and '"guard_checks": "skipped"' in json.dumps(entry)
        with openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, max_retries=0, timeout=120) as sdk:
            got = sdk.chat.completions.create(model=TINY, messages=messages, max_tokens=16, temperature=0)
            streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
                model=TINY, messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert got.choices[0].message.content == want.choices[0].message.content == streamed
    assert got.usage.completion_tokens == want.usage.completion_tokens


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graph_decode_matches_eager(tiny_llama_dir, dtype):
    from torch._dynamo.utils import counters

    backend = TransformersBackend()
    opts = BackendOptions(device="cuda", dtype=dtype, max_batch_size=SLOTS, cache_tokens=CACHE_TOKENS)
    eager_gpu = backend.load(ModelSpec(name="tiny", path=Path(tiny_llama_dir),
                                       options=dataclasses.replace(opts, compile="off")))
    skips = counters["inductor"]["cudagraph_skips"]
    graphs = backend.load(ModelSpec(name="tiny", path=Path(tiny_llama_dir),
                                    options=dataclasses.replace(opts, compile="on")))
    graphs.warm_up()
    try:
        decoder = graphs._batch.decoder
        assert graphs.details()["decode"] == "compiled-static" and decoder.compiled
        assert compiled_graphs(decoder._fn) == 1 and decoder.skips_guards  # one graph: no guard checks
        want, _ = run(eager_gpu, schedule())
        got, _ = run(graphs, schedule())
        assert decoder.steps_without_guard_checks > 0 and compiled_graphs(decoder._fn) == 1
        # inductor silently falls back to no CUDA graphs (e.g. on a mutated non-static input)
        assert counters["inductor"]["cudagraph_skips"] == skips
        for i in want:
            a, b = tokens(want[i]), tokens(got[i])
            if dtype == "float32":
                assert a == b, f"job {i}"
            else:  # half precision: different kernels may flip a near-tie late in a random model
                assert a[:8] == b[:8], f"job {i}"
        text = [graphs.detokenize(tokens(got[i])) for i in got]
        assert all(text)
    finally:
        eager_gpu.unload()
        graphs.unload()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_cuda_graphs_on_engine_threads_across_a_reload(tiny_catalog):
    """The server's path: compiled and stepped on the engine thread, then again on a new one.

    The reload's engine thread is not the one that imported torch's CUDA graph module (torch
    2.11 asserts there without ``give_this_thread_cudagraph_state``); jobs of different
    lengths step through several (rows, window) pairs, all recorded by the warm-up, with the
    guard checks skipped.
    """
    import asyncio

    from torch._dynamo.utils import counters

    config = EngineConfig(device="cuda", compile="on", max_batch_size=SLOTS, cache_tokens=CACHE_TOKENS)
    engine = Engine(config, catalog=tiny_catalog)

    async def completion_tokens(request):
        return [ev async for ev in engine.generate(request)][-1].usage.completion_tokens

    skips = counters["inductor"]["cudagraph_skips"]
    try:
        for _ in range(2):
            model = await engine.load(TINY)
            lengths = [300, 260, 200]  # past the first 256-column window, ending at different steps
            requests = [GenerationRequest(model=TINY, prompt_ids=tuple(range(10 + i, 40 + i)),
                                          params=GenerationParams(max_tokens=n, ignore_eos=True))
                        for i, n in enumerate(lengths)]
            assert await asyncio.gather(*map(completion_tokens, requests)) == lengths
            decoder = model._batch.decoder
            assert model.details()["decode"] == "compiled-static"
            assert decoder.thread == engine._runners[TINY]._thread.ident
            assert decoder.skips_guards and decoder.steps_without_guard_checks >= max(lengths) - 1
            assert compiled_graphs(decoder._fn) == 1
            assert await engine.unload(TINY)
        assert counters["inductor"]["cudagraph_skips"] == skips
    finally:
        await engine.stop()
