"""The grammar engine's tokenizer is built while a model loads, not by its first structured request.

llguidance builds it in 0.3-0.7 s for a 49k vocabulary holding the GIL throughout, so built by the
first ``response_format``/forced-tools request (on a worker thread even) it froze the IOLoop: every
user's stream and ``/health`` (benchmarks/first_use_stall.py). Counted, not timed: which phase calls
llguidance's tokenizer build (``constraints.build_ll_tokenizer``), and how often when replicas, copies
and changed files load.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("llguidance.hf")

from tests.server_fixtures import TINY, make_test_config  # noqa: E402
from xllm_jupyter.backends import constraints  # noqa: E402
from xllm_jupyter.backends.constraints import GrammarCompiler, SharedTokenizers  # noqa: E402
from xllm_jupyter.core.errors import InvalidRequest  # noqa: E402
from xllm_jupyter.core.types import Constraint  # noqa: E402
from xllm_jupyter.engine.engine import Engine  # noqa: E402

SCHEMA = Constraint(kind="json_schema", spec=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))


class Builds(list):
    """The phase (``load``, ``request``) of each call of llguidance's tokenizer build."""

    phase = "load"


@pytest.fixture
def builds(monkeypatch) -> Builds:
    """Counts llguidance's tokenizer builds, each noted with the phase the test is in."""
    calls = Builds()
    real = constraints.build_ll_tokenizer

    def counted(*args, **kwargs):
        calls.append(calls.phase)
        return real(*args, **kwargs)

    monkeypatch.setattr(constraints, "build_ll_tokenizer", counted)
    # a registry of this test's own: models other tests left loaded would otherwise lend it their build
    monkeypatch.setattr(constraints, "SHARED_TOKENIZERS", SharedTokenizers())
    return calls


def compiler_for(directory, vocab_size: int = 0) -> GrammarCompiler:
    """A GrammarCompiler over the tokenizer read from ``directory``, as a model's load makes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return GrammarCompiler(tokenizer, vocab_size or len(tokenizer), [tokenizer.eos_token_id])


async def test_the_first_structured_request_finds_the_tokenizer_built_at_load(xllm_home, tiny_catalog, builds):
    engine = Engine(make_test_config(xllm_home).engine, catalog=tiny_catalog)
    await engine.start()
    try:
        model = await engine.load(TINY)
        assert builds == ["load"]  # built once, by the load
        builds.phase = "request"
        await engine.check_constraint(TINY, SCHEMA)  # what serving does before queueing a structured request
        await engine.check_constraint(TINY, Constraint(kind="json_object", spec=""))
        assert builds == ["load"]  # no request built it again
        assert model.vocab_size >= 49_152  # the real SmolLM2 vocabulary: the build the stall came from
    finally:
        await engine.stop()


def test_a_tokenizer_llguidance_cannot_take_loads_and_refuses_each_constraint_with_a_400(builds):
    grammars = GrammarCompiler(object(), 32, [0])  # not a fast (Rust) tokenizer: llguidance refuses it
    grammars.prepare()  # the load goes on
    assert grammars.prepared and builds == ["load"]
    for _ in range(2):  # refused from the reason kept at load, without another build
        with pytest.raises(InvalidRequest) as err:
            grammars.compile(SCHEMA)
        assert err.value.code == "unsupported_parameter" and "not available for this model" in str(err.value)
    assert builds == ["load"]


async def test_replicas_of_a_model_build_the_grammar_tokenizer_once(xllm_home, tiny_catalog, builds):
    config = make_test_config(xllm_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, replicas=(f"{TINY}=2",)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    await engine.start()
    try:
        await engine.load(TINY)
        assert len(engine.model_info(TINY).runtime.replicas) == 2
        assert builds == ["load"]  # the second replica's load found the first's build
        assert len(constraints.SHARED_TOKENIZERS) == 1
        builds.phase = "request"
        await engine.check_constraint(TINY, SCHEMA)
        assert builds == ["load"]
    finally:
        await engine.stop()


def test_copies_of_a_tokenizer_share_one_build_and_changed_files_at_the_same_path_do_not(
        tiny_llama_dir, tmp_path, builds):
    linked = tmp_path / "linked"  # what xllm cp / create make: hard links
    linked.mkdir()
    for f in tiny_llama_dir.iterdir():
        os.link(f, linked / f.name)
    copied = shutil.copytree(tiny_llama_dir, tmp_path / "copied")  # other files, the same bytes
    first = compiler_for(tiny_llama_dir)
    first.prepare()
    others = [compiler_for(linked), compiler_for(copied)]
    for c in others:
        c.prepare()
        assert c.prepared and c.tokenizer is first.tokenizer
    assert builds == ["load"]

    # a forced re-pull: the directory at the same path replaced by one whose tokenizer.json differs
    fresh = shutil.copytree(tiny_llama_dir, tmp_path / "fresh")
    data = json.loads((fresh / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens' ids swapped: the same size, other masks
    (fresh / "tokenizer.json").write_text(json.dumps(data, indent=1))
    os.rename(copied, tmp_path / "old")
    os.rename(fresh, copied)
    repulled = compiler_for(copied)
    repulled.prepare()
    assert builds == ["load", "load"] and repulled.tokenizer is not first.tokenizer
    wider = compiler_for(tiny_llama_dir, vocab_size=first.vocab_size + 64)  # another model's logits width
    wider.prepare()
    assert len(builds) == 3 and wider.tokenizer is not first.tokenizer


def test_two_loads_at_once_build_once(tiny_llama_dir, builds, monkeypatch):
    compilers = [compiler_for(tiny_llama_dir), compiler_for(tiny_llama_dir)]
    second_started = threading.Event()
    counted = constraints.build_ll_tokenizer

    def slow_first(*args, **kwargs):  # the first build waits until the second load asks too
        second_started.wait(30)
        threading.Event().wait(0.1)  # (it reaches the lock meanwhile; no assertion is timed)
        return counted(*args, **kwargs)

    monkeypatch.setattr(constraints, "build_ll_tokenizer", slow_first)
    first = threading.Thread(target=compilers[0].prepare)
    first.start()

    def second():
        second_started.set()
        compilers[1].prepare()

    other = threading.Thread(target=second)
    other.start()
    first.join(60)
    other.join(60)
    assert builds == ["load"] and compilers[0].tokenizer is compilers[1].tokenizer


def test_an_unloaded_models_tokenizer_is_kept_only_with_its_transformers_tokenizer(tiny_llama_dir, builds):
    """The build lives while a compiler or the transformers tokenizer it was built for does (a released one is kept
    for a reload: tests/test_released_tokenizers.py); with neither left, it goes and a new compiler builds again."""
    a, b = compiler_for(tiny_llama_dir), compiler_for(tiny_llama_dir)
    a.prepare()
    b.prepare()
    assert builds == ["load"] and len(constraints.SHARED_TOKENIZERS) == 1
    del a
    gc.collect()
    assert len(constraints.SHARED_TOKENIZERS) == 1  # b still holds it
    tokenizer = b._hf
    del b
    gc.collect()
    assert len(constraints.SHARED_TOKENIZERS) == 1  # its transformers tokenizer still lives
    del tokenizer
    gc.collect()
    assert len(constraints.SHARED_TOKENIZERS) == 0  # gone with the last thing that used it
    compiler_for(tiny_llama_dir).prepare()
    assert builds == ["load", "load"]
