"""One engine shared by several users: the queue bound and model swaps must not let one user lock others out."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import pytest

from xllm_jupyter.core.config import EngineConfig, QuotaConfig, load_config
from xllm_jupyter.core.errors import Overloaded
from xllm_jupyter.core.types import GenerationDone, GenerationParams, GenerationRequest
from xllm_jupyter.engine.engine import Engine

from .fake_backend import FakeBackend, FakeCatalog

SIZE = 1000  # bytes of each fake model's files, and its memory once loaded


def _engine(tmp_path, quotas: QuotaConfig | None = None, step_delay: float = 0.002,
            **config) -> tuple[Engine, FakeBackend]:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * SIZE)
    backend = FakeBackend(step_delay=step_delay, memory_bytes=SIZE)
    cfg = EngineConfig(**{"device": "cpu", "idle_grace_seconds": 0, **config})
    return Engine(cfg, FakeCatalog(["a", "b", "c"], path=weights), [backend], quotas=quotas), backend


def _req(model: str, user: str, max_tokens: int = 3, n: int = 1) -> GenerationRequest:
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True, n=n)
    return GenerationRequest(model=model, prompt_ids=(1, 2), params=params, user=user)


async def _run(engine: Engine, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


async def _until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def _alice_busy_on_a(tmp_path, max_tokens: int = 250, *, on_gpu: bool = False, **config):
    """An engine with room for one model, and alice generating with "a" in it; stopped on the way out.

    Yields ``(engine, backend, alice's task)``. ``on_gpu``: the room is a GPU budget (models on cuda),
    else a memory budget.
    """
    budget = "gpu_memory_budget_bytes" if on_gpu else "memory_budget_bytes"
    engine, backend = _engine(tmp_path, keep_alive="-1", **{budget: int(SIZE * 1.5)}, **config)
    if on_gpu:
        backend.memory_device = lambda spec: "cuda"
    await engine.start()
    alice = None
    try:
        await engine.load("a")
        alice = asyncio.create_task(_run(engine, _req("a", "alice", max_tokens=max_tokens)))
        await _until(lambda: engine.stats("a").running == 1)
        yield engine, backend, alice
    finally:
        if alice is not None:
            alice.cancel()
            await asyncio.gather(alice, return_exceptions=True)
        await engine.stop()


# ------------------------------------------------------------------ the queue bound
async def test_a_full_queue_refuses_the_user_who_filled_it_not_the_others(tmp_path):
    # the reserve keeps a batch slot free, so bob's job starts while alice's 4 are all still there
    engine, _ = _engine(tmp_path, QuotaConfig(reserve_when_alone=True), max_batch_size=4, max_queue=4)
    await engine.start()
    try:
        await engine.load("a")
        flood = [asyncio.create_task(_run(engine, _req("a", "alice", 250))) for _ in range(4)]
        await _until(lambda: len(engine._runners["a"]) == 4)  # noqa: SLF001 - alice's 4 fill the queue
        await _run(engine, _req("a", "bob"))  # bob holds none of it: he is served, not refused
        with pytest.raises(Overloaded) as refused:
            await _run(engine, _req("a", "alice"))  # her fifth: past the queue, and she holds all of it
        assert "(4 of its sequences are yours, and this request asks for 1 more)" in refused.value.message
        with pytest.raises(Overloaded) as refused:
            await _run(engine, _req("a", "carol", n=3))  # more than an equal share (4 / 3 users) in one go
        # carol learns her own figures (none held, 3 asked), not how many sequences alice has queued
        assert re.findall(r"\d+", refused.value.message) == ["0", "3"], refused.value.message
        assert refused.value.code == "overloaded"
        with pytest.raises(Overloaded) as refused:
            await _run(engine, _req("a", "carol", n=5))  # can never fit a queue of 4: says so, not "retry later"
        assert "holds 4 sequences: a request for 5 never fits" in refused.value.message
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await _until(lambda: len(engine._runners["a"]) == 0)  # noqa: SLF001
        assert engine._res["a"].sequences == {}  # noqa: SLF001 - nothing counted after the cancels
    finally:
        await engine.stop()


async def test_n_counts_against_the_queue_bound(tmp_path):
    engine, _ = _engine(tmp_path, max_batch_size=2, max_queue=4)
    await engine.start()
    try:
        await engine.load("a")
        with pytest.raises(Overloaded):
            await _run(engine, _req("a", "alice", n=5))  # one request of 5 sequences passes a queue of 4
        await _run(engine, _req("a", "alice", n=4))
    finally:
        await engine.stop()


# ------------------------------------------------------------------ model swaps
async def test_a_load_waits_for_the_model_in_use_instead_of_503(tmp_path):
    # room for one model: bob's model b needs a's room while alice generates with a
    async with _alice_busy_on_a(tmp_path, max_tokens=100) as (engine, backend, alice):
        await _run(engine, _req("b", "bob"))  # waits for alice's request to end, then a makes room for b
        assert alice.done() and not alice.exception()
        assert engine.is_loaded("b") and not engine.is_loaded("a") and backend.models["a"].unloaded


async def test_a_load_past_the_wait_is_503_saying_how_long_it_waited(tmp_path):
    async with _alice_busy_on_a(tmp_path, load_wait_seconds=0.2) as (engine, _, alice):
        with pytest.raises(Overloaded) as refused:
            await _run(engine, _req("b", "bob"))
        assert refused.value.code == "insufficient_memory" and "waited 0.2 s" in refused.value.message
        assert engine.is_loaded("a") and not alice.done()  # alice's generation was never disturbed


def test_load_wait_seconds_is_configurable(tmp_path):
    assert load_config(tmp_path / "none.yaml", env={}).engine.load_wait_seconds == 60.0
    env = {"XLLM_ENGINE_LOAD_WAIT_SECONDS": "0"}
    assert load_config(tmp_path / "none.yaml", env=env).engine.load_wait_seconds == 0.0


async def test_a_model_kept_busy_back_to_back_cannot_keep_another_users_model_out(tmp_path):
    # alice sends request after request to a, never leaving it idle for the grace; bob wants b, which
    # only fits once a is gone. Requests arriving while bob's load waits queue behind it: the two take turns
    engine, backend = _engine(tmp_path, memory_budget_bytes=int(SIZE * 1.5), keep_alive="-1",
                              idle_grace_seconds=0.3, load_wait_seconds=20)
    await engine.start()
    stop = asyncio.Event()
    served: list[str] = []

    async def alice() -> None:
        while not stop.is_set():
            await engine.load("a")  # a request's entry, as serving makes it
            await _run(engine, _req("a", "alice", max_tokens=20))
            served.append("alice")

    try:
        await engine.load("a")
        loop = asyncio.create_task(alice())
        await _until(lambda: len(served) >= 2)
        await engine.load("b")  # without the turn, this waits 20 s and is a 503
        await _run(engine, _req("b", "bob"))
        assert engine.is_loaded("b") and backend.models["a"].unloaded
        count = len(served)
        await _until(lambda: len(served) > count)  # then alice's turn comes back: a is loaded again
        assert engine.is_loaded("a") and not engine.is_loaded("b")
        stop.set()
        await loop
    finally:
        stop.set()
        await engine.stop()


async def test_many_users_of_two_models_that_do_not_fit_together_all_take_turns(tmp_path):
    # four clients on each of two models, room for one: every request is served in some turn, none is a 503
    # (a request awaits between its entry and its generation, as serving does while it tokenizes: a model
    # just evicted for the other can be asked for again in that gap)
    engine, _ = _engine(tmp_path, memory_budget_bytes=int(SIZE * 1.5), keep_alive="-1",
                        idle_grace_seconds=0.3, load_wait_seconds=20)
    await engine.start()
    deadline = time.monotonic() + 3.0
    served = {"a": 0, "b": 0}

    async def client(model: str, user: str) -> None:
        while time.monotonic() < deadline:
            await engine.load(model)
            await asyncio.sleep(0.005)
            await _run(engine, _req(model, user, max_tokens=5))
            served[model] += 1

    try:
        clients = [client(m, f"{m}-user{i}") for m in ("a", "b") for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert served["a"] > 3 and served["b"] > 3
    finally:
        await engine.stop()


# ------------------------------------------------------------------ who waits, and why
async def test_each_users_running_and_queued_sequences_reach_admin_usage_metrics_and_their_own_row(tmp_path):
    from xllm_jupyter.server.handlers import XllmContext
    from xllm_jupyter.server.usage import Caller

    # slow steps: the jobs stay where they are while the counts are read; no reserve, so alice takes both slots
    engine, _ = _engine(tmp_path, QuotaConfig(reserved_slots=0), step_delay=0.05, max_batch_size=2)
    await engine.start()
    context = XllmContext(engine, load_config(tmp_path / "none.yaml", env={"XLLM_HOME": str(tmp_path)}))
    try:
        for user in ("alice", "bob", "carol"):  # admitted once, as the HTTP layer does: they have rows and labels
            context.usage.release(context.usage.admit(Caller(user)))
        await engine.load("a")
        tasks = [asyncio.create_task(_run(engine, _req("a", "alice", 250))) for _ in range(3)]
        await _until(lambda: engine.stats("a").running == 2 and engine.stats("a").queued == 1)
        tasks.append(asyncio.create_task(_run(engine, _req("a", "bob", 250, n=2))))
        await _until(lambda: engine.stats("a").queued == 3)
        assert engine.user_counts() == {"alice": (2, 1), "bob": (0, 2)}
        rows = {row["user"]: row for row in context.usage.snapshot()}
        assert [(rows[u]["running"], rows[u]["queued"]) for u in ("alice", "bob", "carol")] == [(2, 1), (0, 2), (0, 0)]
        mine = context.usage.snapshot("bob")  # the hub page's view: the caller's own row only
        assert [(r["user"], r["running"], r["queued"]) for r in mine] == [("bob", 0, 2)]
        text = context.metrics.exposition().decode()
        for line in ('xllm_user_sequences_running{user="alice"} 2.0', 'xllm_user_sequences_queued{user="alice"} 1.0',
                     'xllm_user_sequences_running{user="bob"} 0.0', 'xllm_user_sequences_queued{user="bob"} 2.0',
                     'xllm_user_sequences_queued{user="carol"} 0.0'):
            assert line in text, line
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _until(lambda: engine.user_counts() == {})
    finally:
        await engine.stop()
        context.close()


async def test_a_load_waiting_for_room_says_so_in_its_model_state(tmp_path):
    async with _alice_busy_on_a(tmp_path) as (engine, _, alice):
        bob = asyncio.create_task(_run(engine, _req("b", "bob")))
        await _until(lambda: engine.model_info("b").runtime is not None
                     and engine.model_info("b").runtime.waiting_for_room)
        assert engine.model_info("b").runtime.wire() == {"state": "loading", "waiting_for_room": True}
        loading = {i.name: i.runtime.wire() for i in engine.loaded_models(include_loading=True)}
        assert loading["b"]["waiting_for_room"] is True and "waiting_for_room" not in loading["a"]
        from xllm_jupyter.server.handlers import XllmContext
        from xllm_jupyter.server.stats import sampler_for

        context = XllmContext(engine, load_config(tmp_path / "none.yaml", env={"XLLM_HOME": str(tmp_path)}))
        panel = {m["id"]: m for m in sampler_for(context).snapshot()["models"]}  # /admin/stats, the lab panel's
        assert (panel["b"]["state"], panel["b"]["waiting_for_room"], panel["a"]["waiting_for_room"]) == \
            ("loading", True, False)
        alice.cancel()
        await asyncio.gather(alice, return_exceptions=True)
        await bob  # a went idle: b was loaded in its room
        assert engine.is_loaded("b") and "b" not in engine._room_waits  # noqa: SLF001 - nothing left behind


async def test_two_loads_that_counted_the_same_idle_model_both_load_in_turn(tmp_path):
    # bob's b and carol's c each need a's room (a GPU budget for one model). The test holds the GPU turn
    # as a third load would, so both see a go idle and count it before either takes the turn; the
    # second to get it finds a gone and b in its place. It waits for b's request to end instead of a 503
    async with _alice_busy_on_a(tmp_path, on_gpu=True) as (engine, backend, alice):
        await engine._gpu_loads.acquire()  # noqa: SLF001 - another load's turn
        try:
            bob = asyncio.create_task(_run(engine, _req("b", "bob")))
            carol = asyncio.create_task(_run(engine, _req("c", "carol")))
            await _until(lambda: engine._room_waits == {"b", "c"})  # noqa: SLF001 - both wait for a
            alice.cancel()
            await asyncio.gather(alice, return_exceptions=True)
            await _until(lambda: not engine._room_waits)  # noqa: SLF001 - both counted a, both wait for the turn
        finally:
            engine._gpu_loads.release()  # noqa: SLF001
        await asyncio.gather(bob, carol)  # before: carol's load was a 503 insufficient_memory at once
        first, second = sorted("bc", key=engine.is_loaded)  # whichever got the turn first made room for the other
        assert backend.models["a"].unloaded and backend.models[first].unloaded and engine.is_loaded(second)


async def test_a_load_waiting_for_room_on_one_gpu_does_not_hold_a_model_on_another(tmp_path, monkeypatch):
    # no GPU budget: room is measured per GPU. bob's b needs a's room on GPU 0; carol's c on GPU 1 frees none
    # of it, so her requests must not queue behind b's load (before: held up to load_wait_seconds too)
    import dataclasses

    from xllm_jupyter.backends import torch_device

    engine, backend = _engine(tmp_path, keep_alive="-1")
    backend.memory_device = lambda spec: "cuda"
    where = {"a": "cuda:0", "b": "cuda:0", "c": "cuda:1"}
    plain = engine.catalog.resolve
    engine.catalog.resolve = lambda name: dataclasses.replace(plain(name), overrides={"device": where[name]})
    full = {"now": False}  # once set, each GPU has room for one model: free only while none is loaded on it

    def room(gpus: tuple[int, ...]) -> int:
        taken = [m for m, gpu in where.items() if gpu == f"cuda:{gpus[0]}" and engine.is_loaded(m)]
        return 0 if full["now"] and taken else 10 * SIZE

    monkeypatch.setattr(torch_device, "cuda_room_bytes", room)
    await engine.start()
    try:
        await engine.load("a")
        await engine.load("c")
        full["now"] = True  # both GPUs full: b fits only in a's room
        users = [asyncio.create_task(_run(engine, _req(m, u, max_tokens=250))) for m, u in (("a", "alice"), ("c", "carol"))]
        await _until(lambda: engine.stats("a").running == 1 and engine.stats("c").running == 1)
        bob = asyncio.create_task(_run(engine, _req("b", "bob")))
        await _until(lambda: "b" in engine._room_waits)  # noqa: SLF001
        assert "a" in engine._held and "c" not in engine._held  # noqa: SLF001 - only the model in b's way waits
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
        await bob
        assert engine.is_loaded("b") and engine.is_loaded("c") and not engine.is_loaded("a")
    finally:
        await engine.stop()


# ------------------------------------------------------------------ the daily token quota
async def test_concurrent_requests_near_the_daily_quota_are_refused_instead_of_passing_it(tmp_path):
    import dataclasses

    from xllm_jupyter.core.errors import RateLimited
    from xllm_jupyter.server.handlers import XllmContext
    from xllm_jupyter.server.usage import Caller

    engine, _ = _engine(tmp_path, QuotaConfig(reserved_slots=0), step_delay=0.05)
    await engine.start()
    config = load_config(tmp_path / "none.yaml", env={"XLLM_HOME": str(tmp_path)})
    config = dataclasses.replace(config, quotas=QuotaConfig(tokens_per_day=100, usage_file="off"))
    context = XllmContext(engine, config)
    observed = context.serving.engine  # the engine as the serving layer calls it: held, charged

    async def run(request: GenerationRequest) -> None:
        async for _ in observed.generate(request):
            pass

    try:
        for user in ("alice", "bob"):
            context.usage.release(context.usage.admit(Caller(user)))
        await engine.load("a")
        first = asyncio.create_task(run(_req("a", "alice", 60)))  # may use 2 + 60 of alice's 100
        await _until(lambda: engine.stats("a").running == 1)
        with pytest.raises(RateLimited) as refused:  # 62 + 62 could pass 100: refused, not overshot
            await run(_req("a", "alice", 60))
        assert refused.value.retry_after == 1 and "held by this user's requests running now" in refused.value.message
        with pytest.raises(RateLimited):
            await run(_req("a", "alice", 30, n=2))  # n counts: 2 + 2 x 30
        row = context.usage.snapshot("alice")[0]
        assert row["tokens_reserved"] == 62 and row["tokens_today"] == 0 and row["rejected"] == {"tokens_per_day": 2}
        await run(_req("a", "alice", 30))  # 62 + 32 fits
        await run(_req("a", "bob", 5))  # another user's quota is their own
        await first
        row = context.usage.snapshot("alice")[0]
        assert row["tokens_reserved"] == 0 and row["tokens_today"] == 94  # settled to what was used
        await run(_req("a", "alice", 10))  # alone, it runs and may cross the quota (94 + 12), as a sequential one does
        with pytest.raises(RateLimited, match="Daily token quota reached"):
            context.usage.admit(Caller("alice"))
    finally:
        await engine.stop()
        context.close()


async def test_the_prompts_of_one_request_never_refuse_each_other_at_the_daily_quota(tmp_path):
    import dataclasses

    from xllm_jupyter.core.errors import RateLimited
    from xllm_jupyter.openai.generation import interleaved
    from xllm_jupyter.server.handlers import XllmContext
    from xllm_jupyter.server.usage import Caller

    engine, _ = _engine(tmp_path, QuotaConfig(reserved_slots=0), step_delay=0.02)
    await engine.start()
    config = load_config(tmp_path / "none.yaml", env={"XLLM_HOME": str(tmp_path)})
    context = XllmContext(engine, dataclasses.replace(config, quotas=QuotaConfig(tokens_per_day=100, usage_file="off")))
    observed = context.serving.engine
    try:
        context.usage.release(context.usage.admit(Caller("alice")))
        await engine.load("a")
        # one legacy completion of two prompts (one generation each, one request id): 62 + 62 could pass 100,
        # but the request is alone, as a sequential one would be: it runs (before: a 429 every retry repeated)
        prompts = [dataclasses.replace(_req("a", "alice", 60), request_id="cmpl-1") for _ in range(2)]
        done = [ev async for _, ev in interleaved(observed, prompts) if isinstance(ev, GenerationDone)]
        assert len(done) == 2 and context.usage.snapshot("alice")[0]["tokens_today"] == 124
        # another request's generations still count against it: a second request while one runs is refused
        first = asyncio.create_task(_run(observed, dataclasses.replace(_req("a", "alice", 20), request_id="cmpl-2")))
        await _until(lambda: context.usage.snapshot("alice")[0]["tokens_reserved"] == 22)
        with pytest.raises(RateLimited):
            await _run(observed, dataclasses.replace(_req("a", "alice", 5), request_id="cmpl-3"))
        await first
        assert context.usage.snapshot("alice")[0]["tokens_reserved"] == 0
    finally:
        await engine.stop()
        context.close()


async def test_a_started_stream_closed_unread_frees_its_queued_job_at_once(tmp_path):
    # a stream whose first event was awaited (openai/generation.started) and then closed without a
    # read kept its engine job queued until the slot holder ended (an unstarted generator's finally
    # never runs), holding the slot it would get and the user's share of the queue meanwhile
    from xllm_jupyter.openai.generation import started

    engine, _ = _engine(tmp_path, max_batch_size=1, step_delay=0.04)
    await engine.start()
    try:
        await engine.load("a")
        holder = asyncio.create_task(_run(engine, _req("a", "x", max_tokens=250)))  # the only slot, ~10 s
        await _until(lambda: engine.stats("a").running == 1)
        stream = await started(engine.generate(_req("a", "y", max_tokens=50)), 0.05)  # queued: not there yet
        assert engine.stats("a").queued == 1
        await stream.aclose()
        await _until(lambda: engine.stats("a").queued == 0, timeout=5)
        assert not holder.done()  # freed by the close, not by the holder ending
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    finally:
        await engine.stop()
