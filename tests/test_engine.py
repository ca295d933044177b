"""Engine and ModelRunner: batching, cancellation, stop strings, n, errors (fake backend)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from xllm_jupyter.backends.base import BackendOptions
from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import (
    BadModelOutput,
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
)
from xllm_jupyter.core.types import (
    ChoiceDelta,
    FinishReason,
    GenerationDone,
    GenerationParams,
    GenerationRequest,
    SamplingParams,
)
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.engine.runner import ModelRunner
from xllm_jupyter.engine.stops import StopMatcher

from .fake_backend import FakeBackend, FakeCatalog, FakeModel


def make_engine(step_delay=0.0, max_batch_size=16, **cfg):
    backend = FakeBackend(step_delay=step_delay)
    engine = Engine(EngineConfig(max_batch_size=max_batch_size, **cfg), FakeCatalog(["fake", "other"]), [backend])
    return engine, backend


def req(prompt=(1, 2, 3), **params):
    return GenerationRequest(model="fake", prompt_ids=tuple(prompt), params=GenerationParams(**params))


async def collect(engine, request):
    texts: dict[int, str] = {}
    finishes: dict[int, FinishReason] = {}
    done = None
    async for ev in engine.generate(request):
        if isinstance(ev, ChoiceDelta):
            texts[ev.index] = texts.get(ev.index, "") + ev.text
            if ev.finish:
                finishes[ev.index] = ev.finish
        else:
            assert isinstance(ev, GenerationDone)
            done = ev
    return texts, finishes, done


async def wait_for(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_single_request_length_and_usage():
    engine, _ = make_engine()
    await engine.start()
    texts, finishes, done = await collect(engine, req(max_tokens=5))
    assert finishes == {0: FinishReason.LENGTH}
    assert texts[0] == "t7 t8 t9 t10 t11 "
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 5
    assert done.usage.total_tokens == 8
    await engine.stop()


async def test_eos_stops_and_ignore_eos_continues():
    engine, _ = make_engine()
    texts, finishes, done = await collect(engine, req(prompt=(99, 1), max_tokens=10))
    assert finishes[0] is FinishReason.STOP
    assert done.usage.completion_tokens == 4  # the EOS token counts, its text does not
    assert texts[0].count("t") == 3
    texts, finishes, done = await collect(engine, req(prompt=(99, 1), max_tokens=10, ignore_eos=True))
    assert finishes[0] is FinishReason.LENGTH and done.usage.completion_tokens == 10
    await engine.stop()


async def test_stop_strings_cut_text_and_free_the_job():
    engine, backend = make_engine()
    texts, finishes, done = await collect(engine, req(max_tokens=20, stop=("t9",)))
    assert texts[0] == "t7 t8 "
    assert finishes[0] is FinishReason.STOP
    assert done.usage.completion_tokens == 3
    await wait_for(lambda: engine.stats().running == 0)
    assert backend.models["fake"].jobs == {}
    await engine.stop()


async def test_continuous_batching_joins_running_batch():
    engine, backend = make_engine(step_delay=0.002)
    first_started = asyncio.Event()

    async def long_one():
        async for ev in engine.generate(req(max_tokens=200)):
            first_started.set()
        return True

    long_task = asyncio.create_task(long_one())
    await first_started.wait()
    steps_before = engine.stats().steps
    texts, finishes, _ = await collect(engine, req(prompt=(5,), max_tokens=3))
    assert finishes[0] is FinishReason.LENGTH
    # the short request finished while the long one was still decoding
    assert not long_task.done()
    assert engine.stats().max_batch >= 2 and engine.stats().batched_steps >= 3
    assert engine.stats().steps - steps_before < 50
    await long_task
    await engine.stop()


async def test_eight_concurrent_requests_are_batched():
    engine, backend = make_engine(step_delay=0.001)
    results = await asyncio.gather(*(collect(engine, req(prompt=(i + 1,), max_tokens=30)) for i in range(8)))
    assert all(r[1][0] is FinishReason.LENGTH for r in results)
    assert engine.stats().max_batch == 8
    assert max(backend.models["fake"].batch_sizes) == 8
    await engine.stop()


async def test_max_batch_size_queues_the_rest():
    engine, backend = make_engine(step_delay=0.001, max_batch_size=2)
    results = await asyncio.gather(*(collect(engine, req(prompt=(i + 1,), max_tokens=10)) for i in range(5)))
    assert len(results) == 5 and all(r[2].usage.completion_tokens == 10 for r in results)
    assert max(backend.models["fake"].batch_sizes) == 2
    await engine.stop()


async def test_closing_the_stream_cancels_within_one_step():
    engine, backend = make_engine(step_delay=0.002)
    gen = engine.generate(req(max_tokens=250))
    got = 0
    async for ev in gen:
        got += 1
        if got == 1:  # the first token leaves alone; the rest may come together (stream_interval_ms)
            break
    await gen.aclose()
    await wait_for(lambda: engine.stats().running == 0)
    assert engine.stats().cancelled == 1
    assert backend.models["fake"].jobs == {}
    await engine.stop()


async def test_cancel_while_queued_never_runs():
    engine, backend = make_engine(step_delay=0.002, max_batch_size=1)
    blocker = asyncio.create_task(collect(engine, req(max_tokens=50)))
    await wait_for(lambda: engine.stats().running == 1)
    gen = engine.generate(req(prompt=(7,), max_tokens=50))
    task = asyncio.create_task(gen.__anext__())
    await wait_for(lambda: engine.stats().queued == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gen.aclose()
    await wait_for(lambda: engine.stats().queued == 0)
    await blocker
    assert max(backend.models["fake"].batch_sizes) == 1
    await engine.stop()


async def test_n_choices_and_seeds():
    engine, _ = make_engine()
    params = dict(max_tokens=4, n=3, sampling=SamplingParams(seed=10))
    texts, finishes, done = await collect(engine, req(**params))
    assert set(texts) == {0, 1, 2}
    assert len(set(texts.values())) == 3  # each choice gets its own seed
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 3
    again, _, _ = await collect(engine, req(**params))
    assert again == texts
    await engine.stop()


async def test_errors_context_unknown_model_and_empty_prompt():
    engine, _ = make_engine()
    with pytest.raises(ContextLengthExceeded):
        await collect(engine, req(prompt=tuple(range(1, 250)), max_tokens=10))
    with pytest.raises(ModelNotFound):
        await collect(engine, GenerationRequest(model="nope", prompt_ids=(1,)))
    with pytest.raises(InvalidRequest):
        await collect(engine, req(prompt=()))
    # still serving afterwards
    texts, _, _ = await collect(engine, req(max_tokens=2))
    assert texts[0] == "t7 t8 "
    await engine.stop()


async def test_dead_engine_thread_fails_requests_and_reports_unhealthy():
    engine, backend = make_engine(step_delay=0.001)
    await engine.load("fake")
    assert engine.healthy
    backend.models["fake"].explode.set()
    with pytest.raises(EngineError):
        await collect(engine, req(max_tokens=5))
    await wait_for(lambda: not engine.healthy)
    await engine.stop()


async def test_a_failed_step_fails_its_batch_and_the_engine_recovers():
    engine, backend = make_engine(step_delay=0.001)
    await engine.load("fake")
    backend.models["fake"].fail_next.set()
    with pytest.raises(EngineError):
        await collect(engine, req(max_tokens=50))
    assert engine.healthy
    texts, finishes, _ = await collect(engine, req(max_tokens=2))
    assert texts[0] == "t7 t8 " and finishes[0] is FinishReason.LENGTH
    await engine.stop()


async def test_a_job_the_device_has_no_memory_for_is_a_503_and_the_others_go_on():
    from xllm_jupyter.core.errors import Overloaded

    engine, _ = make_engine(step_delay=0.001)
    other = asyncio.ensure_future(collect(engine, req(max_tokens=20)))
    with pytest.raises(Overloaded, match="ran out of memory"):
        await collect(engine, req(max_tokens=66))  # the fake backend's out-of-memory job
    with pytest.raises(BadModelOutput, match="non-finite logits"):  # a job's own failure says what it was
        await collect(engine, req(max_tokens=67))
    texts, _, done = await other
    assert done.usage.completion_tokens == 20 and engine.healthy
    await engine.stop()


async def test_a_job_the_backend_refuses_fails_alone():
    engine, _ = make_engine()
    with pytest.raises(InvalidRequest, match="unlucky"):
        await collect(engine, req(max_tokens=13, n=2))
    assert engine.healthy
    await wait_for(lambda: engine.stats().running == 0)
    texts, _, _ = await collect(engine, req(max_tokens=2))
    assert texts[0] == "t7 t8 "
    await engine.stop()


async def test_the_engine_counts_tokens_across_models_and_unloads():
    """stats().tokens: every generated token (n choices each), and the count survives an unload."""
    engine, _ = make_engine()
    await engine.start()
    assert engine.stats().tokens == 0
    *_, done = await collect(engine, req(max_tokens=5, n=2))
    assert done.usage.completion_tokens == 10 and engine.stats().tokens == engine.stats("fake").tokens == 10
    other = GenerationRequest(model="other", prompt_ids=(1, 2), params=GenerationParams(max_tokens=3))
    await collect(engine, other)
    assert engine.stats().tokens == 13 and engine.stats("other").tokens == 3
    assert await engine.unload("fake") is True
    assert engine.stats().tokens == 13  # a rate read from it does not drop when a model leaves
    await engine.stop()


async def test_the_engine_counts_requests_across_unloads():
    """stats().completed (what /admin/stats reports) keeps the requests of models unloaded since: it went back to 0."""
    engine, _ = make_engine()
    await engine.start()
    await collect(engine, req(max_tokens=2))
    await collect(engine, GenerationRequest(model="other", prompt_ids=(1, 2), params=GenerationParams(max_tokens=2)))
    assert engine.stats().completed == 2
    assert await engine.unload("fake") is True
    assert engine.stats().completed == 2 and engine.stats("other").completed == 1
    await collect(engine, req(max_tokens=2))  # loaded again: its own count starts over, the engine's goes on
    assert engine.stats().completed == 3 and engine.stats("fake").completed == 1
    await engine.stop()


async def test_models_listing_load_and_unload():
    engine, backend = make_engine()
    names = [m.name for m in engine.list_models()]
    assert names == ["fake", "other"]
    assert not engine.model_info("fake").loaded
    await engine.load("fake")
    info = engine.model_info("fake")
    assert info.loaded and info.backend == "fake" and info.context_length == 256
    assert [m.name for m in engine.loaded_models()] == ["fake"]
    assert await engine.unload("fake") is True
    assert backend.models["fake"].unloaded
    assert await engine.unload("fake") is False
    with pytest.raises(ModelNotFound):
        engine.model_info("missing")
    await engine.stop()


async def test_the_models_own_thread_warms_it_up_before_its_first_step():
    engine, backend = make_engine()
    texts, _, _ = await collect(engine, req(max_tokens=2))
    runner = engine._runners["fake"]
    # compiled CUDA graphs belong to the thread that records them: the one that steps the model
    assert backend.models["fake"].warmed_on == runner._thread.ident != threading.get_ident()
    assert texts[0] == "t7 t8 "
    await engine.stop()


async def test_a_failed_warm_up_fails_the_load_cleanly_and_the_engine_goes_on():
    backend = FakeBackend(warm_up_errors={"fake": RuntimeError("/secret/path exploded")})
    engine = Engine(EngineConfig(), FakeCatalog(["fake", "other"]), [backend])
    with pytest.raises(EngineError) as caught:
        await engine.load("fake")
    assert str(caught.value) == "Preparing model 'fake' failed (RuntimeError)"  # no path, no message
    assert "fake" not in [m.name for m in engine.loaded_models()]
    await wait_for(lambda: backend.models["fake"].unloaded)
    texts, _, _ = await collect(engine, GenerationRequest(model="other", prompt_ids=(1, 2, 3),
                                                           params=GenerationParams(max_tokens=2)))
    assert texts[0] == "t7 t8 "
    with pytest.raises(EngineError):  # not cached as loaded: the next request tries again
        await engine.load("fake")
    assert backend.loads == 3
    await engine.stop()


def _options_of_loads(backend: FakeBackend) -> list[BackendOptions]:
    """The options of every load ``backend`` is asked for, as they happen."""
    seen: list[BackendOptions] = []
    load = backend.load
    backend.load = lambda spec: seen.append(spec.options) or load(spec)
    return seen


async def test_engine_settings_reach_the_backend_as_options():
    backend = FakeBackend()
    seen = _options_of_loads(backend)
    engine = Engine(EngineConfig(device="cpu", dtype="float32", torch_threads=1, max_batch_size=3, cache_tokens=4096,
                                 kv_cache_bits="q8", gpu_split=("20",), ngram_draft=3, compile="on"), FakeCatalog(),
                    [backend])
    await engine.load("fake")
    assert seen == [BackendOptions(device="cpu", dtype="float32", torch_threads=1, max_batch_size=3, cache_tokens=4096,
                                   kv_cache_bits="q8", tensor_parallel=False, gpu_split=("20",), num_draft_tokens=4,
                                   ngram_draft=3, compile="on")]
    await engine.stop()


async def test_a_models_own_options_override_the_engines_and_bad_ones_are_clear_errors():
    backend = FakeBackend()
    seen = _options_of_loads(backend)
    catalog = FakeCatalog(["fake", "typo", "wrong-type"])
    resolve = catalog.resolve
    overrides = {"fake": {"max_batch_size": 2, "gpu_split": [20, 24]}, "typo": {"max_batch_sise": 2},
                 "wrong-type": {"max_batch_size": "2"}}
    catalog.resolve = lambda name: dataclasses.replace(resolve(name), overrides=overrides[name])
    engine = Engine(EngineConfig(device="cpu", cache_tokens=4096), catalog, [backend])
    await engine.load("fake")
    assert seen == [BackendOptions(device="cpu", cache_tokens=4096, max_batch_size=2, gpu_split=(20, 24))]
    with pytest.raises(EngineError, match="Unknown backend option 'max_batch_sise'"):
        await engine.load("typo")
    with pytest.raises(EngineError, match="'max_batch_size' must be int, not str"):
        await engine.load("wrong-type")
    assert len(seen) == 1  # refused before loading
    await engine.stop()


async def test_a_dead_engine_thread_fails_its_queued_requests_too_and_the_model_reloads():
    engine, backend = make_engine(step_delay=0.005, max_batch_size=1)
    await engine.load("fake")
    running = asyncio.ensure_future(collect(engine, req(max_tokens=200)))
    queued = asyncio.ensure_future(collect(engine, req(max_tokens=5)))  # waits: the batch holds one
    await wait_for(lambda: engine.stats("fake").queued == 1)
    first = backend.models["fake"]
    first.explode.set()
    for request in (running, queued):  # neither may hang
        with pytest.raises(EngineError):
            await asyncio.wait_for(request, 5)
    await wait_for(lambda: not engine.healthy)
    # the next request reloads the model on a new thread (the dead one is unloaded)
    texts, _, done = await collect(engine, req(max_tokens=3))
    assert done.usage.completion_tokens == 3 and backend.loads == 2 and first.unloaded and engine.healthy
    await engine.stop()


class _GatedBackend(FakeBackend):
    """Loads wait inside the backend until ``gate`` is set: a test, not the clock, says when a load ends."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def load(self, spec):
        self.entered.set()
        assert self.gate.wait(60), "the test never let the load finish"
        return super().load(spec)


async def test_a_client_leaving_mid_load_leaves_the_load_running_not_an_orphan_model():
    # the load's thread cannot be stopped: its model must end up registered (or unloaded), never lost
    # (gated, not timed: a 0.3 s load and a 0.05 s sleep raced when the loop was slow to wake)
    backend = _GatedBackend()
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    leaving = asyncio.ensure_future(engine.load("fake"))
    await wait_for(backend.entered.is_set, timeout=120)  # (a process's first load imports torch first: seconds)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    joining = asyncio.ensure_future(engine.load("fake"))
    await asyncio.sleep(0)
    assert engine.is_loading("fake")  # it joins the load in flight
    backend.gate.set()
    model = await joining
    assert backend.loads == 1 and engine.is_loaded("fake") and not model.unloaded
    await engine.stop()
    assert model.unloaded
    # stopped mid-load: what the load's thread makes is unloaded when it is done
    backend.gate.clear()
    backend.entered.clear()
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    loading = asyncio.ensure_future(engine.load("fake"))
    await wait_for(backend.entered.is_set, timeout=120)
    await engine.stop()
    with pytest.raises(Overloaded):  # its waiter hears why (a 503 to clients), not a bare cancellation
        await loading
    backend.gate.set()
    await wait_for(lambda: backend.loads == 2 and backend.models["fake"].unloaded)


async def test_a_shutdown_that_times_out_mid_step_leaves_the_unload_to_the_step_thread():
    # freeing weights under a running step would pull them from under it (exllamav2: freed C handles)
    model = FakeModel("fake")
    runner = ModelRunner(model)
    runner.start()
    runner.wait_ready()
    model.gate = threading.Event()  # the step waits, as at the compile gate while another model compiles
    running = asyncio.ensure_future(collect_handle(runner.submit(req(max_tokens=50), asyncio.get_running_loop())))
    await wait_for(lambda: model.in_step)
    assert await asyncio.to_thread(runner.shutdown, 0.05) is False
    assert not model.unloaded and not runner.wait_closed(0.05)
    model.gate.set()
    with pytest.raises(Overloaded, match="unloaded"):
        await asyncio.wait_for(running, 5)
    assert await asyncio.to_thread(runner.wait_closed, 5)
    assert model.unloaded and not model.unloaded_mid_step and model.unloaded_on == runner._thread.ident
    # an idle runner closes at once, on the caller's thread
    idle = ModelRunner(FakeModel("idle"))
    idle.start()
    idle.wait_ready()
    assert idle.shutdown(5) is True and idle.wait_closed(0) and idle.model.unloaded_on == threading.get_ident()


async def test_a_job_being_admitted_still_counts_as_running():
    # between leaving the queue and reaching the backend a job must not vanish from the counts
    # (/admin/usage, metrics, the max_queue check); add() runs on the step thread outside the lock
    seen = []

    class Watched(FakeModel):
        def add(self, job):
            seen.append((runner.user_counts(), len(runner), runner.stats().running))
            super().add(job)

    runner = ModelRunner(Watched("fake"))
    runner.start()
    runner.wait_ready()
    request = dataclasses.replace(req(max_tokens=2, n=2), user="alice")
    text = await collect_handle(runner.submit(request, asyncio.get_running_loop()))
    assert sorted(text.split()) == ["t7", "t7", "t8", "t8"]
    assert seen == [({"alice": (2, 0)}, 2, 2)] * 2  # both choices, through both adds
    assert runner.user_counts() == {} and len(runner) == 0
    assert await asyncio.to_thread(runner.shutdown, 5)


async def test_an_unload_waits_for_a_stuck_step_only_so_long(monkeypatch):
    # a step that never returns must not hang the unload (nor every load that would evict the model)
    monkeypatch.setattr("xllm_jupyter.engine.manager.EVICT_WAIT_SECONDS", 0.2)
    engine, backend = make_engine()
    await engine.load("fake")
    model = backend.models["fake"]
    model.gate = threading.Event()
    running = asyncio.ensure_future(collect(engine, req(max_tokens=50)))
    await wait_for(lambda: model.in_step)
    runner = engine._runners["fake"]
    monkeypatch.setattr(runner, "shutdown",
                        lambda timeout=30.0, reason=None: runner.__class__.shutdown(runner, 0.05, reason=reason))
    assert await asyncio.wait_for(engine.unload("fake"), 5) and not engine.is_loaded("fake")
    assert not model.unloaded  # still in its step: its own thread unloads it when the step ends
    model.gate.set()
    with pytest.raises(Overloaded, match="unloaded"):
        await asyncio.wait_for(running, 5)
    await wait_for(lambda: model.unloaded)
    await engine.stop()


async def collect_handle(handle):
    """Drain a RequestHandle; returns its text."""
    return "".join([ev.text async for ev in handle if isinstance(ev, ChoiceDelta)])


async def test_concurrent_loads_share_one_load():
    engine, backend = make_engine()
    a, b = await asyncio.gather(engine.load("other"), engine.load("other"))
    assert a is b
    await engine.stop()


async def test_names_that_differ_only_in_case_are_one_model():
    # store names are case-insensitive: "FAKE" and "Fake" must not each load a copy of the weights
    engine, backend = make_engine()
    a = await engine.load("FAKE")
    assert await engine.load("fake") is a and await engine.load("Fake") is a
    assert [m.name for m in engine.loaded_models()] == ["fake"] and len(backend.models) == 1
    texts, finishes, _ = await collect(engine, GenerationRequest(model="fAKE", prompt_ids=(1, 2, 3),
                                                                 params=GenerationParams(max_tokens=3)))
    assert finishes == {0: FinishReason.LENGTH} and texts[0]
    assert engine.is_loaded("FaKe") and engine.model_info("FAKE").loaded and engine.stats("FAKE").completed == 1
    assert await engine.unload("FAKE") is True and not engine.is_loaded("fake")
    await engine.stop()


async def test_encode_chat_uses_template():
    from xllm_jupyter.core.types import ChatMessage

    engine, _ = make_engine()
    ids = await engine.encode_chat("fake", [ChatMessage("user", "hi")])
    assert len(ids) == len("user:hi\n")
    await engine.stop()


@pytest.mark.parametrize(
    "stops,chunks,expected,matched",
    [
        (("END",), ["ab", "cE", "N", "Dxx"], "abc", "END"),
        (("END",), ["ab", "cE", "N", "x"], "abcENx", None),
        (("\n\n", "###"), ["a\n", "b#", "#c"], "a\nb##c", None),
        (("\n\n", "###"), ["a\n", "\nb"], "a", "\n\n"),
        ((), ["x", "y"], "xy", None),
    ],
)
def test_stop_matcher(stops, chunks, expected, matched):
    m = StopMatcher(stops)
    out, hit = "", None
    for c in chunks:
        text, hit = m.feed(c)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert out == expected and hit == matched


def test_stop_matcher_releases_text_without_stop_prefixes_immediately():
    m = StopMatcher(("STOP",))
    assert m.feed("hello ") == ("hello ", None)
    assert m.feed("wor S") == ("wor ", None)
    assert m.feed("x") == ("Sx", None)
