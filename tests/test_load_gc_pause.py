"""A backend's first load imports with automatic collections paused, one freeze walks what the imports made, and the
model loads after it, unfrozen.

The first load imports torch and transformers mid-load: millions of objects, which set off full
collections that each walked all of them holding the GIL (three of 0.2-0.37 s in one cold load of the
tiny Llama, and the freeze after it 0.38 s: docs/performance.md). Counted, not timed: full collections
on the loading thread during the load, in a fresh interpreter (imports cold).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from xllm_jupyter.core import gc_freeze

COLD_LOAD = textwrap.dedent("""
    import gc, json, sys, threading
    from pathlib import Path
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.core import gc_freeze
    from xllm_jupyter.engine import loading
    from xllm_jupyter.backends.registry import get_backend

    assert "torch" not in sys.modules and "transformers" not in sys.modules  # the imports are the load's
    gc_freeze.freeze()  # what the engine's start does
    phase = ["before"]  # the loading thread's step: imports (ahead of the load), between (the freeze), load, after
    full = {"imports": 0, "between": 0, "load": 0, "after": 0}

    def counted(stage, info):
        if stage == "stop" and info["generation"] == 2 and phase[0] != "before":
            full[phase[0]] += 1

    backend = get_backend("transformers")
    real_imports, real_load = type(backend).import_libraries, type(backend).load

    def import_libraries(self, spec):
        phase[0] = "imports"
        try:
            return real_imports(self, spec)
        finally:
            phase[0] = "between"

    NEW_MODULES = [None]

    FROZEN = [0]

    def load(self, spec):
        FROZEN[0] = gc.get_freeze_count()
        phase[0], known = "load", set(sys.modules)
        try:
            return real_load(self, spec)
        finally:
            phase[0], NEW_MODULES[0] = "after", sorted(set(sys.modules) - known)

    type(backend).import_libraries, type(backend).load = import_libraries, load
    gc.callbacks.append(counted)
    spec = ModelSpec(name="t", path=Path(sys.argv[1]), options=BackendOptions(device="cpu"))
    model = loading._load_and_prepare(backend, spec)
    gc.callbacks.remove(counted)
    print(json.dumps({**full, "resumed": gc.get_threshold()[2] != gc_freeze.NO_FULL_COLLECTIONS,
                      "new_modules_in_load": NEW_MODULES[0], "model_frozen": gc_freeze.is_frozen(model.model),
                      "frozen": FROZEN[0],
                      "tokens": model.tokenize("Hi")}))
""")


def test_a_cold_first_load_runs_no_full_collection_until_the_one_after_it(tiny_llama_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", COLD_LOAD, str(tiny_llama_dir)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["imports"] == 0  # none set off by the imports' objects while they were made
    assert got["between"] == 0  # frozen without a walk of them (they are imports: FirstBlock.only_imported)
    assert got["frozen"] > 100_000  # and frozen, before the weights load
    assert got["new_modules_in_load"] == []  # the imports ahead were all of them: nothing left to import unfrozen
    assert not got["model_frozen"]  # the model loaded after the freeze: its unload is a plain collection
    assert got["resumed"] and got["tokens"]  # full collections resumed; the model works


def full_collections_paused() -> bool:
    """Whether automatic full collections are held off now."""
    return gc.get_threshold()[2] == gc_freeze.NO_FULL_COLLECTIONS


@pytest.fixture
def collector_restored():
    """Leaves the collector's thresholds and gc_freeze's switch as the test found them."""
    thresholds, freezing = gc.get_threshold(), gc_freeze.enabled()
    yield
    gc_freeze.configure(freezing)
    gc.set_threshold(*thresholds)


def test_paused_blocks_nest_and_overlap_and_full_collections_resume_after_the_last(collector_restored):
    gc_freeze.configure(True)
    before = gc.get_threshold()
    inside, release = threading.Event(), threading.Event()

    def other_load():
        with gc_freeze.paused():
            inside.set()
            release.wait(30)

    other = threading.Thread(target=other_load)
    with gc_freeze.paused():
        assert full_collections_paused() and gc.get_threshold()[:2] == before[:2]  # young ones go on
        with gc_freeze.paused():
            assert full_collections_paused()
        assert full_collections_paused()  # the outer block still runs
        other.start()
        inside.wait(30)
    assert full_collections_paused()  # the other thread's block still runs
    release.set()
    other.join(30)
    assert gc.get_threshold() == before


def test_paused_does_nothing_when_freezing_is_off(collector_restored):
    gc_freeze.configure(False)
    before = gc.get_threshold()
    with gc_freeze.paused():
        assert gc.get_threshold() == before  # off means off: the collector as it was
    assert gc.get_threshold() == before


def test_only_the_first_block_of_a_key_is_paused_and_ends_in_a_freeze(collector_restored, monkeypatch):
    gc_freeze.configure(True)
    before = gc.get_threshold()
    freezes = []
    monkeypatch.setattr(gc_freeze, "freeze", lambda: freezes.append(full_collections_paused()))
    key = f"test {os.getpid()} {id(freezes)}"
    with gc_freeze.first_time(key):
        assert full_collections_paused()
    assert freezes == [True] and gc.get_threshold() == before  # frozen before full collections resumed
    with gc_freeze.first_time(key):
        assert not full_collections_paused()  # the second: as any other
    assert freezes == [True]
    with pytest.raises(RuntimeError):
        with gc_freeze.first_time(key + " failing"):
            raise RuntimeError("the load failed")
    assert freezes == [True] and gc.get_threshold() == before  # no freeze for a failed block; thresholds back


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_a_gguf_weights_read_holds_off_full_collections_until_one_at_its_end(tmp_path, monkeypatch, fmt,
                                                                           collector_restored):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from xllm_jupyter.backends import transformers as backend_module
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.core.errors import ModelLoadError

    gc_freeze.configure(True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "config.json").write_text("{}")
    seen, freezes = [], []
    monkeypatch.setattr(backend_module, "load_tokenizer", lambda *a, **k: object())  # (its own test: test_tokenizer_files)
    monkeypatch.setattr(gc_freeze, "freeze", lambda: freezes.append(1))

    def weights(cls, *args, **kwargs):  # what transformers' GGUF reader does: a million objects, in Python
        seen.append(full_collections_paused())
        raise OSError("stand-in: no weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(weights))
    spec = ModelSpec(name="g", path=tmp_path, format=fmt, options=BackendOptions(device="cpu"))
    with pytest.raises(ModelLoadError):
        backend_module.TransformersBackend().load(spec)
    assert seen == [fmt == "gguf"]  # held off while a GGUF's tensors are read; a safetensors read as ever
    assert not full_collections_paused() and freezes == []  # back after it (no freeze: the read failed)


def test_one_collection_without_a_freeze_leaves_what_the_block_made_unfrozen(collector_restored):
    # a GGUF read (tokenizer, weights) leaves garbage and a model: a freeze at its end caught the model (and every
    # model loaded since the last freeze), whose unloads then needed a full collection of the whole process
    gc_freeze.configure(True)
    made = []
    try:
        with gc_freeze.one_collection(freeze_after=False):
            assert full_collections_paused()
            made.append([object()])
        assert not full_collections_paused()
        assert not gc_freeze.is_frozen(made[0])
        with gc_freeze.one_collection():  # the default: a freeze, as the first imports want
            made.append([object()])
        assert gc_freeze.is_frozen(made[1])
    finally:
        gc.unfreeze()


def test_a_first_block_that_only_imported_ends_in_a_freeze_without_a_full_collection(collector_restored):
    # the collection before the freeze walked the imports' objects (0.15-0.17 s, GIL held, after torch and again
    # after transformers) and found ~160 garbage objects; an import-only block freezes them instead
    gc_freeze.configure(True)
    key = f"test imports {os.getpid()} {id(collector_restored)}"
    walks = []

    def counted(phase, info):
        if phase == "start" and info["generation"] == 2:
            walks.append(1)

    gc.callbacks.append(counted)
    try:
        with gc_freeze.first_time(key) as block:
            assert block and full_collections_paused()
            made = [[object()] for _ in range(10)]
            block.only_imported()
        assert walks == [] and not full_collections_paused()
        assert all(gc_freeze.is_frozen(m) for m in made)
        with gc_freeze.first_time(key) as block:  # a later block: not first, nothing special
            assert not block and not full_collections_paused()
        with gc_freeze.first_time(key + " collected"):  # not declared: the collection, then the freeze
            pass
        assert walks == [1]
    finally:
        gc.callbacks.remove(counted)
        gc.unfreeze()
