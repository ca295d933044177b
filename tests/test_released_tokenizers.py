"""A model unloaded and loaded again gets its tokenizer and grammar tokenizer back: nothing read or built twice.

The notebook pattern: a model's keep_alive runs out (unload), its user comes back minutes later, the model
loads again, and its ``Tokenizer.from_file`` and llguidance build (both holding the GIL: the IOLoop stood
still) ran again. Now the two most recently released tokenizers are kept, each for 30 minutes, dropped
first when a load is short of CPU memory, never handed to other files nor when changed since their load.
Counted and compared by identity, not timed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llguidance.hf")

from xllm_jupyter.backends import constraints, released_tokenizers, tokenizer_files  # noqa: E402
from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.constraints import SharedTokenizers  # noqa: E402
from xllm_jupyter.backends.released_tokenizers import SECONDS, ReleasedTokenizers  # noqa: E402
from xllm_jupyter.backends.tokenizer_files import load_tokenizer, release  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402

from .helpers import Clock  # noqa: E402
from .test_model_manager import make_engine, req, run, wait_for  # noqa: E402
from .test_tokenizer_files import builds  # noqa: E402,F401 - a fixture: counts llguidance's builds


@pytest.fixture
def clock() -> Clock:
    """The clock of this test's released tokenizers."""
    return Clock()


@pytest.fixture(autouse=True)
def released(monkeypatch, clock) -> ReleasedTokenizers:
    """Registries of this test's own: tokenizers in use, released ones (on ``clock``), grammar tokenizers."""
    monkeypatch.setattr(tokenizer_files, "_in_use", weakref.WeakValueDictionary())
    own = ReleasedTokenizers(clock=clock)
    monkeypatch.setattr(released_tokenizers, "RELEASED", own)
    monkeypatch.setattr(constraints, "SHARED_TOKENIZERS", SharedTokenizers())
    return own


def load(directory: Path):
    """The transformers backend's load of the model at ``directory`` (CPU)."""
    return TransformersBackend().load(ModelSpec(name="t", path=directory, options=BackendOptions(device="cpu")))


def other_files(tmp_path: Path, source: Path, name: str, max_length: int) -> Path:
    """A copy of ``source`` whose tokenizer_config.json has another model_max_length (other tokenizer files)."""
    out = shutil.copytree(source, tmp_path / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": max_length}))
    return out


def released_ref(directory: Path) -> weakref.ref:
    """Read ``directory``'s tokenizer as a load does, release it as an unload does; a weak reference to it."""
    tokenizer = load_tokenizer(directory)
    assert release(tokenizer)
    return weakref.ref(tokenizer)


def test_a_reloaded_model_gets_its_tokenizer_and_grammar_tokenizer_back(tiny_llama_dir, builds, released):  # noqa: F811
    model = load(Path(tiny_llama_dir))
    model.prepare_constraints()
    tokenizer, build = weakref.ref(model.chat.tokenizer), weakref.ref(model._grammars._built)
    ids = model.tokenize("hello there")
    model.unload()  # (keep_alive ran out)
    del model
    gc.collect()
    assert tokenizer() is not None and build() is not None and len(released) == 1  # kept, though no model holds them
    again = load(Path(tiny_llama_dir))
    try:
        again.prepare_constraints()
        assert again.chat.tokenizer is tokenizer()  # no second Tokenizer.from_file
        assert again._grammars._built is build() and builds == ["build"]  # no second llguidance build
        assert len(released) == 0  # in use again: it holds no released slot
        assert again.tokenize("hello there") == ids
    finally:
        again.unload()
    assert len(released) == 1


def test_only_the_two_most_recently_released_are_kept(tiny_llama_dir, tmp_path, released):
    dirs = [other_files(tmp_path, Path(tiny_llama_dir), f"m{i}", 1000 + i) for i in range(3)]
    refs = [released_ref(d) for d in dirs]
    gc.collect()
    assert len(released) == 2 and refs[0]() is None  # the oldest went
    assert load_tokenizer(dirs[1]) is refs[1]() is not None and load_tokenizer(dirs[2]) is refs[2]() is not None
    fresh = load_tokenizer(dirs[0])  # read again
    assert fresh.model_max_length == 1000


def test_a_released_tokenizer_is_dropped_after_its_time(tiny_llama_dir, clock, released):
    ref = released_ref(Path(tiny_llama_dir))
    clock.now += SECONDS - 1
    assert not released.due() and released.expire() == 0
    clock.now += 2
    assert released.due() and released.expire() == 1
    gc.collect()
    assert ref() is None and len(released) == 0


async def test_the_keep_alive_reaper_drops_expired_ones(tiny_llama_dir, tmp_path, clock, released):
    engine, _ = make_engine(tmp_path)
    await engine.start()
    try:
        ref = released_ref(Path(tiny_llama_dir))
        await asyncio.sleep(0.6)  # (two reaper passes: not yet due)
        assert len(released) == 1
        clock.now += SECONDS + 1
        await wait_for(lambda: len(released) == 0)
    finally:
        await engine.stop()
    gc.collect()
    assert ref() is None


async def test_a_load_short_of_cpu_memory_drops_them_before_any_model(tiny_llama_dir, tmp_path, released):
    from .test_model_manager import SIZE

    engine, backend = make_engine(tmp_path, budget=2 * SIZE + 10)
    await engine.start()
    try:
        ref = released_ref(Path(tiny_llama_dir))
        await run(engine, req("a"))
        await run(engine, req("b"))  # both fit: nothing to drop
        assert len(released) == 1
        await run(engine, req("c"))  # a goes for c's room, and the released tokenizer first
        assert len(released) == 0 and backend.models["a"].unloaded
    finally:
        await engine.stop()
    gc.collect()
    assert ref() is None


def test_other_files_or_arguments_never_get_a_released_tokenizer(tiny_llama_dir, tmp_path, released):
    ref = released_ref(Path(tiny_llama_dir))
    template = shutil.copytree(tiny_llama_dir, tmp_path / "template")
    (template / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    other = load_tokenizer(template)
    assert other is not ref() and other.chat_template.startswith("{% for m")
    assert load_tokenizer(tiny_llama_dir, use_fast=True) is not ref()  # other arguments: read as asked
    assert len(released) == 1
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")  # byte for byte the same files: shared
    assert load_tokenizer(copy) is ref() is not None


def test_a_changed_tokenizer_is_never_handed_out(tiny_llama_dir, released):
    """Nothing in production changes a loaded tokenizer, but a test once set a template on one that another
    test's model then got (bd54e5e): one changed since its load is neither kept nor shared."""
    directory = Path(tiny_llama_dir)
    tokenizer = load_tokenizer(directory)
    template = tokenizer.chat_template
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert load_tokenizer(directory) is not tokenizer  # in use, changed: a read of its own
    assert not release(tokenizer) and len(released) == 0  # released, changed: not kept
    ref = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert ref() is None
    grown = load_tokenizer(directory)
    assert grown.chat_template == template
    assert release(grown) and len(released) == 1
    grown.add_tokens(["<changed-while-released>"])  # changed after its release: not handed out either
    fresh = load_tokenizer(directory)
    assert fresh is not grown and len(fresh) == len(grown) - 1


async def test_a_removed_model_keeps_no_tokenizer(tiny_llama_dir, tmp_path, released):
    """DELETE /v1/models/{id} unloads with ModelRemoved: the tokenizer its unload kept (or an earlier keep_alive's
    unload did) is for a reload that will not come, and its memory goes with the model."""
    from xllm_jupyter.core.errors import ModelRemoved

    engine, backend = make_engine(tmp_path)
    await engine.start()
    try:
        ref = released_ref(Path(tiny_llama_dir))  # (its model unloaded when its keep_alive ran out)
        await run(engine, req("a"))
        assert not await engine.unload("gone")  # a plain unload of a model not loaded keeps it
        assert await engine.unload("a") and len(released) == 1
        assert not await engine.unload("gone", ModelRemoved("gone")) and len(released) == 0
    finally:
        await engine.stop()
    gc.collect()
    assert ref() is None
