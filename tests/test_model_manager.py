"""Model manager: memory budgets, LRU eviction, keep_alive, replicas and loading state.

Engine-level tests use the fake backend (its catalog points at a file whose size is
the pre-load estimate); server tests use real tiny models pulled under three names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from xllm_jupyter.core.config import AuthConfig, EngineConfig, load_config
from xllm_jupyter.core.errors import InvalidRequest, ModelNotFound, Overloaded
from xllm_jupyter.core.types import GenerationParams, GenerationRequest
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.backends.memory_estimate import disk_bytes
from xllm_jupyter.engine.manager import parse_keep_alive, parse_replicas
from xllm_jupyter.store.store import ModelStore

from .fake_backend import FakeBackend, FakeCatalog
from .server_fixtures import API_KEY, make_test_config, running_server

ADMIN_KEY = "sk-manager-admin"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
SIZE = 1000  # bytes of each fake model's "files" and its memory once loaded


def make_engine(tmp_path, *, budget=0, load_delay=0.0, step_delay=0.0, **cfg):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * SIZE)
    backend = FakeBackend(load_delay=load_delay, step_delay=step_delay, memory_bytes=SIZE)
    config = EngineConfig(memory_budget_bytes=budget, device="cpu", idle_grace_seconds=0, **cfg)
    return Engine(config, FakeCatalog(["a", "b", "c"], path=weights), [backend]), backend


def req(model, keep_alive=None, max_tokens=3):
    return GenerationRequest(model=model, prompt_ids=(1, 2), params=GenerationParams(max_tokens=max_tokens),
                             keep_alive=keep_alive)


async def run(engine, request):
    async for _ in engine.generate(request):
        pass


async def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_parse_keep_alive():
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("2.5") == 2.5
    assert parse_keep_alive(-1) is None and parse_keep_alive("-1m") is None
    with pytest.raises(InvalidRequest) as exc:
        parse_keep_alive("soon")
    assert exc.value.param == "keep_alive"


def test_replicas_config_accepts_a_mapping_and_env(tmp_path):
    (tmp_path / "config.yaml").write_text("engine:\n  replicas: {tiny: 2}\n  memory_budget_bytes: 1000\n")
    assert load_config(tmp_path / "config.yaml", env={}).engine.replicas == ("tiny=2",)
    env = {"XLLM_ENGINE_REPLICAS": "tiny=2,other=3"}
    assert load_config(tmp_path / "none.yaml", env=env).engine.replicas == ("tiny=2", "other=3")
    # keyed by the spelling the engine keeps (names are case-insensitive)
    assert parse_replicas(("Tiny=2", " OTHER = 3")) == {"tiny": 2, "other": 3}


@pytest.mark.parametrize("entry", ["tiny=0", "tiny=-1", "tiny=65", "tiny=x"])
def test_replicas_count_out_of_range_is_an_error_naming_the_entry(entry):
    # 0 once quietly meant 1 runner, and 1000 would try to load 1000 copies
    with pytest.raises(InvalidRequest, match=f"'{entry}'") as caught:
        parse_replicas((entry,))
    assert caught.value.param == "replicas"
    assert parse_replicas(("tiny=64",)) == {"tiny": 64}


async def test_lru_idle_model_is_evicted_never_one_in_use(tmp_path):
    engine, backend = make_engine(tmp_path, budget=2 * SIZE + 10, step_delay=0.01, load_wait_seconds=0)  # 503 at once
    await engine.start()
    await run(engine, req("a"))
    await run(engine, req("b"))
    await run(engine, req("a"))  # b is now the least recently used
    await run(engine, req("c"))
    assert engine.is_loaded("a") and engine.is_loaded("c") and not engine.is_loaded("b")
    assert backend.models["b"].unloaded
    # c is held by a long request; a is idle and goes, though c is older
    long = asyncio.create_task(run(engine, req("c", max_tokens=200)))
    await wait_for(lambda: engine.stats("c").running == 1)
    await asyncio.sleep(0.02)
    await run(engine, req("a"))  # a becomes the most recent
    await run(engine, req("b"))
    assert engine.is_loaded("c") and engine.is_loaded("b") and not engine.is_loaded("a")
    # both loaded models are busy: nothing can be freed for a third
    long_b = asyncio.create_task(run(engine, req("b", max_tokens=200)))
    await wait_for(lambda: engine.stats("b").running == 1)
    with pytest.raises(Overloaded) as exc:
        await engine.load("a")
    assert exc.value.code == "insufficient_memory" and str(SIZE) in exc.value.message
    await long
    await long_b
    await engine.stop()


async def test_a_model_that_never_fits_is_503(tmp_path):
    engine, backend = make_engine(tmp_path, budget=SIZE // 2)
    await engine.start()
    with pytest.raises(Overloaded) as exc:
        await engine.load("a")
    assert exc.value.status == 503 and exc.value.code == "model_does_not_fit"
    assert backend.loads == 0  # decided before loading
    await engine.stop()


async def test_the_budget_counts_the_cache_a_backend_allocates_at_load(tmp_path):
    # the files fit; with the KV cache an exllama backend allocates at load, the model does not
    engine, backend = make_engine(tmp_path, budget=int(SIZE * 1.5))
    backend.cache_bytes_estimate = lambda spec: SIZE
    await engine.start()
    with pytest.raises(Overloaded) as exc:
        await engine.load("a")
    assert exc.value.code == "model_does_not_fit" and backend.loads == 0
    await engine.stop()


async def test_without_a_gpu_budget_a_cuda_load_is_checked_against_the_memory_the_device_has(tmp_path, monkeypatch):
    # no GPU here: the device's free memory is simulated as what the fake models on it leave of 2.5 models'
    engine, backend = make_engine(tmp_path, step_delay=0.01, load_wait_seconds=0)  # 503 at once
    backend.memory_device = lambda spec: "cuda"
    backend.splits_over_gpus = True

    def room(gpus):
        assert gpus is None  # a backend that splits over every GPU: all of them are asked
        return int(SIZE * 2.5) - sum(SIZE for m in backend.models.values() if not m.unloaded)

    monkeypatch.setattr("xllm_jupyter.backends.torch_device.cuda_room_bytes", room)
    await engine.start()
    await run(engine, req("a"))
    await run(engine, req("b"))
    await run(engine, req("c"))  # does not fit beside a and b: idle a (least recently used) makes room
    assert not engine.is_loaded("a") and backend.models["a"].unloaded and engine.is_loaded("c")
    busy = [asyncio.create_task(run(engine, req(m, max_tokens=200))) for m in ("b", "c")]
    await wait_for(lambda: engine.stats("b").running == 1 and engine.stats("c").running == 1)
    with pytest.raises(Overloaded) as exc:  # both busy: nothing to evict, and no load that would run out
        await engine.load("a")
    assert exc.value.code == "insufficient_memory" and backend.loads == 3
    await asyncio.gather(*busy)
    backend.cache_bytes_estimate = lambda spec: 2 * SIZE  # 3 models' worth: more than the device has
    with pytest.raises(Overloaded) as exc:
        await engine.load("a")
    assert exc.value.code == "model_does_not_fit" and "GPU memory" in exc.value.message and backend.loads == 3
    await engine.stop()


async def test_measured_gpu_room_does_not_count_a_warming_model_twice(tmp_path, monkeypatch):
    # a warming model's memory is already gone from the device's free memory: reserving it too would
    # refuse a second model that fits (1.5 models' room left, one needed)
    engine, backend = make_engine(tmp_path)
    backend.memory_device = lambda spec: "cuda"
    monkeypatch.setattr("xllm_jupyter.backends.torch_device.cuda_room_bytes",
                        lambda gpus: int(SIZE * 2.5) - sum(SIZE for m in backend.models.values() if not m.unloaded))
    warming = threading.Event()
    backend.warm_up_gate = warming  # a's warm-up (a compile) lasts until set
    await engine.start()
    a = asyncio.ensure_future(engine.load("a"))
    await wait_for(lambda: "a" in backend.models)
    backend.warm_up_gate = None
    await engine.load("b")
    assert engine.is_loaded("b") and not engine.is_loaded("a")  # a is still warming up
    warming.set()
    await a
    assert engine.is_loaded("a") and engine.is_loaded("b")
    await engine.stop()


def test_a_transformers_load_measures_the_gpu_it_names():
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.engine.manager import gpu_indices

    def spec(device):
        return ModelSpec(name="m", path=Path("/nonexistent"), options=BackendOptions(device=device))

    assert gpu_indices(spec("cuda:1"), FakeBackend()) == (1,) and gpu_indices(spec("auto"), None) == (0,)
    splitting = FakeBackend()
    splitting.splits_over_gpus = True  # exllama: every visible GPU
    assert gpu_indices(spec("cuda:1"), splitting) is None


def test_measured_room_on_one_gpu_never_evicts_a_model_on_another():
    from xllm_jupyter.engine.manager import MemoryBudget, Residency

    budget = MemoryBudget({})
    records = {"on0": Residency(device="cuda", memory_bytes=SIZE, gpus=(0,), last_used=1.0),
               "on1": Residency(device="cuda", memory_bytes=SIZE, gpus=(1,), last_used=2.0),
               "split": Residency(device="cuda", memory_bytes=SIZE, gpus=None, last_used=3.0)}
    idle = list(records)
    # room on cuda:1 for 1.5 models after evicting what shares it: on1, then the split model (LRU order)
    assert budget.plan("new", 2 * SIZE, "cuda", records, idle, device_room=SIZE // 2, gpus=(1,)) == ["on1", "split"]
    with pytest.raises(Overloaded) as exc:  # on0 frees nothing on cuda:1
        budget.plan("new", 3 * SIZE, "cuda", records, idle, device_room=SIZE // 2, gpus=(1,))
    assert exc.value.code == "model_does_not_fit"


async def test_concurrent_first_requests_for_an_embedding_model_make_room_once(tmp_path, monkeypatch):
    # the second request joins the load under way: it must not make room (evict, or fail) a second time
    from xllm_jupyter.backends.base import ModelSpec

    engine, backend = make_engine(tmp_path, budget=int(2.5 * SIZE))
    catalog = engine.catalog
    resolve = catalog.resolve

    def with_embedder(name):
        if name == "embed":
            return ModelSpec(name="embed", path=catalog.path, format="safetensors", task="embedding")
        return resolve(name)

    monkeypatch.setattr(catalog, "resolve", with_embedder)

    class Embedder:
        name, dimension, backend_name, context_length = "embed", 4, "fake", 16

        def details(self):
            return {"device": "cpu"}

        def memory_bytes(self):
            return SIZE

        def unload(self):
            pass

    def slow_load(spec):
        time.sleep(0.3)
        return Embedder()

    engine._embeddings._loader = slow_load
    await engine.start()
    await run(engine, req("a"))  # idle, 1 of 2.5 models' budget
    await asyncio.gather(engine.load_any("embed"), engine.load_any("embed"))
    assert engine.is_loaded("a") and engine.is_loaded("embed")
    await engine.stop()


async def test_gpu_loads_run_one_at_a_time_cpu_loads_in_parallel(tmp_path):
    # a backend measures a GPU model as the change in the process's GPU memory: loads must not overlap
    engine, backend = make_engine(tmp_path, load_delay=0.2)
    await engine.start()
    await asyncio.gather(engine.load("a"), engine.load("b"))
    assert backend.max_in_flight == 2  # CPU models: nothing to blur
    backend.memory_device = lambda spec: "cuda"
    await engine.load("c")
    await engine.unload("a")
    await engine.unload("b")
    backend.max_in_flight = 0
    await asyncio.gather(engine.load("a"), engine.load("b"))
    assert backend.max_in_flight == 1 and engine.is_loaded("a") and engine.is_loaded("b")
    await engine.stop()


async def test_the_budget_sees_what_a_model_holds_now_not_only_at_load(tmp_path):
    # an eager transformers model's KV cache grows after load: the budget must count it
    engine, backend = make_engine(tmp_path, budget=3 * SIZE + 10)
    await engine.start()
    await run(engine, req("a"))
    await run(engine, req("b"))
    backend.models["b"]._memory_bytes = 2 * SIZE  # b's cache grew while serving
    assert engine.model_info("b").runtime.memory_bytes == 2 * SIZE
    await run(engine, req("c"))  # a + 2 b + c > budget: a (LRU) goes
    assert not engine.is_loaded("a") and engine.is_loaded("b") and engine.is_loaded("c")
    await engine.stop()


async def test_concurrent_loads_share_one_and_show_loading(tmp_path):
    engine, backend = make_engine(tmp_path, load_delay=0.3)
    await engine.start()
    tasks = [asyncio.create_task(engine.load("a")) for _ in range(3)]
    await wait_for(lambda: any(m.runtime and m.runtime.state == "loading" for m in engine.loaded_models(include_loading=True)))
    models = await asyncio.gather(*tasks)
    assert backend.loads == 1 and models[0] is models[1] is models[2]
    assert engine.model_info("a").runtime.state == "loaded"
    failed = await asyncio.gather(*(engine.load("missing") for _ in range(2)), return_exceptions=True)
    assert all(isinstance(f, ModelNotFound) for f in failed)  # every waiter hears of the failure
    await engine.stop()


async def test_keep_alive_zero_duration_and_forever(tmp_path):
    engine, _ = make_engine(tmp_path, keep_alive="1s")
    await engine.start()
    await run(engine, req("a", keep_alive=0))
    await wait_for(lambda: not engine.is_loaded("a"), timeout=5)  # after the idle grace (1 s), at a reaper tick
    await run(engine, req("b"))  # the default: 1s
    await run(engine, req("c", keep_alive=-1.0))
    assert engine.model_info("b").runtime.expires_at is not None
    assert engine.model_info("c").runtime.expires_at is None
    await wait_for(lambda: not engine.is_loaded("b"), timeout=4)
    assert engine.is_loaded("c")
    await engine.stop()


async def test_replicas_share_the_load(tmp_path):
    engine, backend = make_engine(tmp_path, step_delay=0.01, replicas=("a=2",))
    await engine.start()
    await asyncio.gather(*(run(engine, req("a", max_tokens=20)) for _ in range(4)))
    replicas = engine.model_info("a").runtime.replicas
    assert len(replicas) == 2 and all(r.steps > 0 for r in replicas)
    assert backend.loads == 2 and engine.model_info("a").runtime.memory_bytes == 2 * SIZE
    await engine.stop()


# --------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def three_model_home(tmp_path_factory, tiny_llama_dir):
    """A store with the tiny Llama as "tiny1", "tiny2" and "tiny3"."""
    home = tmp_path_factory.mktemp("xllm-manager")
    store = ModelStore(home)
    for name in ("tiny1", "tiny2", "tiny3"):
        store.pull(str(tiny_llama_dir), name)
    return home


def server_config(home, **engine):
    config = make_test_config(home)
    return dataclasses.replace(config, auth=AuthConfig(admin_keys=(ADMIN_KEY,)),
                               engine=dataclasses.replace(config.engine, idle_grace_seconds=0.1, **engine))


def chat(base_url, model, **extra):
    # keep_alive is for admins where keys have roles (tests/test_auth_limits.py)
    key = ADMIN_KEY if "keep_alive" in extra else API_KEY
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120) as c:
        return c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, extra_body=extra or None)


def admin(info):
    r = httpx.get(info.root + "/admin/models", headers=ADMIN_HEADERS)
    assert r.status_code == 200
    return {m["id"]: m for m in r.json()["data"]}


def test_server_lru_eviction_spares_a_streaming_model(three_model_home, tiny_llama_dir):
    estimate = disk_bytes(tiny_llama_dir)
    config = server_config(three_model_home, memory_budget_bytes=int(estimate * 2.5), keep_alive="-1")
    store = ModelStore(three_model_home)
    with running_server(config, store, "tiny1") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            # long enough to outlast everything below on any machine (200 tokens took ~0.9 s here, about as long
            # as loading tiny2 and tiny3: a faster CPU would finish tiny1 first and make it the LRU victim);
            # closed after the eviction, so the test does not wait for it
            stream = c.chat.completions.create(model="tiny1", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=1900, extra_body={"ignore_eos": True}, stream=True)
            chunks = iter(stream)
            first = next(chunks)  # tiny1 is now the oldest and in use
            assert first.choices
            chat(info.base_url, "tiny2")
            models = admin(info)
            assert models["tiny2"]["state"] == "loaded" and models["tiny1"]["running"] == 1
            assert models["tiny1"]["memory_bytes"] > 0 and models["tiny1"]["last_used"] > 0
            # wait until the server has finished with tiny2 (its generation ends after the
            # client has the reply), then past idle_grace_seconds so it counts as idle
            deadline = time.monotonic() + 60
            while admin(info)["tiny2"].get("in_use", 0) or admin(info)["tiny2"].get("running", 0):
                assert time.monotonic() < deadline, admin(info)["tiny2"]
                time.sleep(0.05)
            time.sleep(0.3)
            chat(info.base_url, "tiny3")  # needs room: idle tiny2 goes, busy tiny1 stays
            models = admin(info)
            assert set(models) == {"tiny1", "tiny3"} and models["tiny1"]["running"] == 1
            more = [next(chunks) for _ in range(20)]
            assert all(ch.choices and ch.choices[0].finish_reason is None for ch in more)  # the stream survived
            stream.close()


def test_server_model_that_never_fits_is_openai_shaped_503(three_model_home, tiny_llama_dir):
    budget = int(disk_bytes(tiny_llama_dir) * 1.5)  # room for one tiny model; tiny2 wants two replicas
    config = server_config(three_model_home, memory_budget_bytes=budget, replicas=("tiny2=2",))
    with running_server(config, ModelStore(three_model_home), "tiny1") as info:
        r = httpx.post(info.base_url + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny2", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "model_does_not_fit" and str(budget) in err["message"] and err["type"]
        r = httpx.get(info.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200  # still serving


def test_server_keep_alive_and_replicas(three_model_home):
    config = server_config(three_model_home, keep_alive="1s", replicas=("tiny3=2",))
    with running_server(config, ModelStore(three_model_home), "tiny1") as info:
        chat(info.base_url, "tiny1", keep_alive=0)
        chat(info.base_url, "tiny2", keep_alive="1s")
        chat(info.base_url, "tiny3", keep_alive=-1)
        deadline = time.monotonic() + 60  # each unload runs a full collection: seconds on a loaded machine
        while set(admin(info)) != {"tiny3"}:
            assert time.monotonic() < deadline, admin(info)
            time.sleep(0.1)
        r = httpx.post(info.base_url + "/chat/completions", headers=ADMIN_HEADERS,
                       json={"model": "tiny1", "messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: chat(info.base_url, "tiny3", keep_alive="-1"), range(6)))
        tiny3 = admin(info)["tiny3"]
        assert tiny3["replicas"] == 2 and tiny3["expires_at"] is None
        assert all(r["steps"] > 0 for r in tiny3["details"]["replicas"])
        r = httpx.post(info.root + "/admin/models/load", headers=ADMIN_HEADERS,
                       json={"model": "tiny2", "keep_alive": "1h"})
        assert r.status_code == 200 and admin(info)["tiny2"]["expires_at"] > time.time() + 3000


async def test_a_preloaded_model_stays_after_its_requests(tmp_path):
    """Preloaded models have no keep_alive expiry, before and after requests that send none."""
    engine, _ = make_engine(tmp_path, keep_alive="1s", preload=("a",))
    await engine.start()
    await run(engine, req("a"))
    assert engine.model_info("a").runtime.expires_at is None  # it was 1 s from the request before
    await run(engine, req("a", keep_alive=-1.0))
    await run(engine, req("b"))
    await wait_for(lambda: not engine.is_loaded("b"), timeout=5)  # b's keep_alive (1 s) ran out; a's did not
    assert engine.is_loaded("a")
    await engine.stop()


async def test_until_counts_from_now_while_a_request_runs(tmp_path):
    """``xllm ps`` UNTIL (``expires_at``) of a model a request is using: its keep_alive from now, since the countdown
    restarts when the request ends. It showed the expiry the model's last use set, in the past once a request ran
    longer than the keep_alive (the model was not unloading), and ignored the running request's own keep_alive."""
    engine, _ = make_engine(tmp_path, keep_alive="1s")
    await engine.start()
    await run(engine, req("a"))
    for keep_alive, expected in ((None, 1), (3600.0, 3600), (-1.0, None)):
        events = engine.generate(req("a", keep_alive=keep_alive, max_tokens=2))
        await anext(events)  # the request holds the model until its stream is closed
        await asyncio.sleep(1.5)  # longer than the default keep_alive: the expiry its last use set has passed
        shown = engine.model_info("a").runtime.expires_at
        if expected is None:
            assert shown is None
        else:
            assert time.time() < shown <= time.time() + expected
        await events.aclose()
        assert engine.is_loaded("a")
    assert engine.model_info("a").runtime.expires_at is None  # (the last request's keep_alive: forever)
    await engine.stop()
