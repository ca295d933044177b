"""A model load reads its tokenizer files once, and its grammar tokenizer is keyed by the bytes it read.

transformers parsed SmolLM2's 3.5 MB ``tokenizer.json`` a second time with Python's json (0.1-0.4 s
holding the GIL: the IOLoop stood still) for added tokens its Rust tokenizer already had; and the key
of the shared llguidance tokenizer was digested from the files after the load, so a re-pull that
replaced them mid-load filed the old tokenizer under the new files' key. Counted, not timed.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path

import pytest

pytest.importorskip("torch")
llguidance_hf = pytest.importorskip("llguidance.hf")

from xllm_jupyter.backends import constraints, released_tokenizers, tokenizer_files  # noqa: E402
from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.constraints import GrammarCompiler, SharedTokenizers, tokenizer_identity  # noqa: E402
from xllm_jupyter.backends.tokenizer_files import added_tokens_only_in_tokenizer_json, load_tokenizer  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402

TEXT = "<|im_start|>user\nHi there, naïve café 😀<|im_end|>\n<|endoftext|>"


@pytest.fixture(autouse=True)
def own_tokenizers_in_use(monkeypatch) -> None:
    """A registry of tokenizers in use of this test's own: a session server's model of the same files (the
    tiny Llama's) would otherwise hand its tokenizer to this test's loads, which then read nothing."""
    monkeypatch.setattr(tokenizer_files, "_in_use", weakref.WeakValueDictionary())
    monkeypatch.setattr(released_tokenizers, "RELEASED", released_tokenizers.ReleasedTokenizers())  # (and released ones)


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Counts llguidance's tokenizer builds (a registry of this test's own)."""
    calls: list[str] = []
    real = constraints.build_ll_tokenizer

    def counted(*args, **kwargs):
        calls.append("build")
        return real(*args, **kwargs)

    monkeypatch.setattr(constraints, "build_ll_tokenizer", counted)
    monkeypatch.setattr(constraints, "SHARED_TOKENIZERS", SharedTokenizers())
    return calls


def load(directory: Path):
    """The transformers backend's load of the model at ``directory`` (CPU)."""
    return TransformersBackend().load(ModelSpec(name="t", path=directory, options=BackendOptions(device="cpu")))


def with_config(tmp_path: Path, source: Path, name: str, **changes) -> Path:
    """A copy of ``source``'s tokenizer files whose tokenizer_config.json has ``changes`` (None: key removed)."""
    out = tmp_path / name
    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / f).exists():
            shutil.copy(source / f, out / f)
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_load_parses_tokenizer_json_in_python_no_more(tiny_llama_dir, monkeypatch):
    parsed = []
    real = json.load

    def counted(fp, *args, **kwargs):
        parsed.append(Path(getattr(fp, "name", "?")).name)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(json, "load", counted)
    model = load(Path(tiny_llama_dir))
    try:
        assert "tokenizer_config.json" in parsed  # (the count sees transformers' reads)
        assert "tokenizer.json" not in parsed  # read once, by the Rust tokenizer
    finally:
        model.unload()


def with_added_tokens(directory: Path) -> None:
    """Add two tokens to ``directory``'s tokenizer.json: a plain one with stripping flags, a special one."""
    data = json.loads((directory / "tokenizer.json").read_text())
    top = max(t["id"] for t in data["added_tokens"]) + max(len(data["model"]["vocab"]), 1)
    data["added_tokens"] += [
        {"id": top + 1, "content": "<tool>", "single_word": False, "lstrip": True, "rstrip": False,
         "normalized": True, "special": False},
        {"id": top + 2, "content": "<|sep|>", "single_word": False, "lstrip": False, "rstrip": True,
         "normalized": False, "special": True}]
    (directory / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize("tokenizer_class,added", [("TokenizersBackend", False), ("PreTrainedTokenizerFast", False),
                                                   ("TokenizersBackend", True)])
def test_the_short_read_gives_the_tokenizer_transformers_gives(tiny_llama_dir, tmp_path, tokenizer_class, added):
    from transformers import AutoTokenizer

    directory = with_config(tmp_path, Path(tiny_llama_dir), "tok", tokenizer_class=tokenizer_class)
    if added:
        with_added_tokens(directory)
    assert added_tokens_only_in_tokenizer_json(directory)
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()  # vocabulary, added tokens, flags
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_ids == theirs.all_special_ids and len(ours.all_special_ids) >= 2
    assert {i: repr(t) for i, t in ours.added_tokens_decoder.items()} == {
        i: repr(t) for i, t in theirs.added_tokens_decoder.items()}
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    text = TEXT + " a <tool> b<|sep|> c"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True)
    if added:
        assert ours.convert_tokens_to_ids(["<tool>", "<|sep|>"]) == theirs.convert_tokens_to_ids(["<tool>", "<|sep|>"])
        assert len(ours) == len(theirs) == len(theirs.get_vocab())
        assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.chat_template == theirs.chat_template and ours.chat_template


def test_other_tokenizers_are_read_as_transformers_reads_them(tiny_llama_dir, tmp_path):
    source = Path(tiny_llama_dir)
    assert added_tokens_only_in_tokenizer_json(source)
    decoder = {"0": {"content": "<|endoftext|>", "special": True}}
    assert not added_tokens_only_in_tokenizer_json(with_config(tmp_path, source, "a", added_tokens_decoder=decoder))
    assert not added_tokens_only_in_tokenizer_json(with_config(tmp_path, source, "b", tokenizer_class="LlamaTokenizer"))
    assert not added_tokens_only_in_tokenizer_json(with_config(tmp_path, source, "c", tokenizer_class=None))
    legacy = with_config(tmp_path, source, "d")
    (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert not added_tokens_only_in_tokenizer_json(legacy)  # read in the branch skipped
    no_json = with_config(tmp_path, source, "e")
    (no_json / "tokenizer.json").unlink()
    assert not added_tokens_only_in_tokenizer_json(no_json)


def swapped_tokens(directory: Path) -> None:
    """Rewrite ``directory``'s tokenizer.json with its last two tokens' ids swapped (same size, other masks)."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(data, indent=1))


def test_files_replaced_while_a_model_loads_do_not_get_its_grammar_tokenizer(tiny_llama_dir, tmp_path, builds,
                                                                            monkeypatch):
    from transformers import AutoTokenizer

    served = shutil.copytree(tiny_llama_dir, tmp_path / "served")
    fresh = shutil.copytree(tiny_llama_dir, tmp_path / "fresh")
    swapped_tokens(fresh)
    real = AutoTokenizer.from_pretrained.__func__

    def read_then_repulled(cls, *args, **kwargs):  # a forced re-pull lands right after the old files were read
        tokenizer = real(cls, *args, **kwargs)
        if fresh.exists():
            os.rename(served, tmp_path / "old")
            os.rename(fresh, served)
        return tokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(read_then_repulled))
    old = load(served)  # read from the old files
    try:
        old.prepare_constraints()
        new = load(served)  # the new files
        try:
            new.prepare_constraints()
            assert builds == ["build", "build"]  # the new files' model built its own
            assert new._grammars.tokenizer is not old._grammars.tokenizer
        finally:
            new.unload()
    finally:
        old.unload()


class GgufRead:
    """What transformers keeps of a tokenizer read from a GGUF: its directory and its Rust tokenizer."""

    def __init__(self, directory: Path, tokenizer_json: Path):
        import tokenizers

        self.name_or_path = str(directory)
        self.backend_tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size()


def test_separately_pulled_copies_of_a_gguf_share_a_grammar_tokenizer(tiny_llama_dir, tmp_path):
    pulled, again, other = tmp_path / "pulled", tmp_path / "again", tmp_path / "other"
    for d, content in ((pulled, b"GGUF one"), (again, b"GGUF two"), (other, b"GGUF one")):
        d.mkdir()
        (d / "model.gguf").write_bytes(content)  # files of their own: no inode, size or time in common
    changed = shutil.copytree(tiny_llama_dir, tmp_path / "changed")
    swapped_tokens(changed)
    first = tokenizer_identity(GgufRead(pulled, Path(tiny_llama_dir) / "tokenizer.json"))
    assert first is not None
    assert tokenizer_identity(GgufRead(again, Path(tiny_llama_dir) / "tokenizer.json")) == first  # the same tokenizer
    assert tokenizer_identity(GgufRead(other, changed / "tokenizer.json")) not in (first, None)  # another one

    class Unknown:  # neither a tokenizer.json nor a Rust tokenizer: not shared
        name_or_path = str(pulled)

        def __len__(self) -> int:
            return 49_152

    assert tokenizer_identity(Unknown()) is None


def test_a_compiler_of_a_tokenizer_read_by_load_tokenizer_shares_with_a_copy(tiny_llama_dir, tmp_path, builds):
    linked = tmp_path / "linked"  # what xllm cp makes: hard links
    linked.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        os.link(f, linked / f.name)
    compilers = []
    for directory in (Path(tiny_llama_dir), linked):
        tokenizer = load_tokenizer(directory)
        compilers.append(GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id]))
        compilers[-1].prepare()
    assert builds == ["build"] and compilers[0].tokenizer is compilers[1].tokenizer


def test_end_of_turn_ids_are_looked_up_without_building_the_whole_vocabulary(tiny_llama_dir, monkeypatch):
    from xllm_jupyter.backends.hf_tokenizer import END_OF_TURN_TOKENS, ChatTokenizer

    chat = ChatTokenizer.from_directory(str(tiny_llama_dir), "t")
    vocab = chat.tokenizer.get_vocab()  # what it looked them up in before: the whole vocabulary as a dict
    expected = {chat.tokenizer.eos_token_id, 7} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    assert len(expected) >= 3  # SmolLM2's <|im_end|> and <|endoftext|> are there
    calls = []
    monkeypatch.setattr(type(chat.tokenizer), "get_vocab", lambda self, *a, **k: calls.append(1) or vocab)
    assert chat.eos_ids(7) == frozenset(expected)
    assert calls == []  # a dict of 49k entries built holding the GIL, for six lookups


def test_the_grammar_tokenizer_is_built_without_copying_the_rust_tokenizer(tiny_llama_dir, monkeypatch):
    from llguidance import LLMatcher

    tokenizer = load_tokenizer(Path(tiny_llama_dir))
    eos = [tokenizer.eos_token_id]
    theirs = llguidance_hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
    copies = []
    monkeypatch.setattr(llguidance_hf, "copy", lambda obj: copies.append(obj) or obj)  # the copy from_tokenizer makes
    ours = constraints.build_ll_tokenizer(tokenizer, len(tokenizer), eos)
    assert copies == []  # a pickle round trip of the whole vocabulary, holding the GIL
    assert (ours.vocab_size, ours.eos_token) == (theirs.vocab_size, theirs.eos_token)
    assert ours.tokenize_str(TEXT) == theirs.tokenize_str(TEXT)
    grammar = LLMatcher.grammar_from_json_schema({"type": "object", "properties": {"city": {"type": "string"}}})
    masks = [LLMatcher(t, grammar).compute_bitmask() for t in (ours, theirs)]
    assert masks[0] == masks[1] and any(masks[0])

    tokenizer.backend_tokenizer.enable_padding()  # padding on: from_tokenizer's copy switches it off
    constraints.build_ll_tokenizer(tokenizer, len(tokenizer), eos)
    assert len(copies) == 1


def test_the_grammar_tokenizer_is_built_in_two_calls_and_masks_as_the_one_call_build(tiny_llama_dir, monkeypatch):
    # one LLTokenizer(...) held the GIL 0.5-0.8 s, about half of it computing the mask slices: built bare, then given
    # the default slices (with_slices), the IOLoop runs in between; the tokenizer must be the one slices=None builds
    import llguidance
    import numpy as np
    from llguidance import LLMatcher

    real = llguidance.LLTokenizer
    tokenizer = load_tokenizer(Path(tiny_llama_dir))
    eos = [tokenizer.eos_token_id]
    one_call = real(tokenizer.backend_tokenizer.to_str(), n_vocab=len(tokenizer), eos_token=eos)
    slices_asked = []

    class Recording:  # llguidance.LLTokenizer, with the slices each construction asked for recorded
        general_slices = staticmethod(real.general_slices)

        def __call__(self, *args, **kwargs):
            slices_asked.append(kwargs.get("slices", "default"))
            return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLTokenizer", Recording())
    ours = constraints.build_ll_tokenizer(tokenizer, len(tokenizer), eos)
    assert slices_asked == [[]]  # the build itself computed no slices
    assert (ours.vocab_size, ours.eos_tokens, ours.is_canonical) == (one_call.vocab_size, one_call.eos_tokens,
                                                                     one_call.is_canonical)
    assert ours.tokenize_str(TEXT) == one_call.tokenize_str(TEXT)
    grammars = [LLMatcher.grammar_from_json_schema({"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}}, "required": ["city", "n"]}),
                LLMatcher.grammar_from_regex(r"[a-z]{3,8}@[0-9]+")]
    for grammar in grammars:  # the same masks step after step, on the same (first allowed) tokens
        matchers = [LLMatcher(t, grammar) for t in (ours, one_call)]
        for _ in range(12):
            masks = [m.compute_bitmask() for m in matchers]
            assert masks[0] == masks[1]
            allowed = np.flatnonzero(np.unpackbits(np.frombuffer(masks[0], dtype=np.uint8), bitorder="little"))
            if matchers[0].is_stopped() or not len(allowed):
                break
            assert all(m.consume_token(int(allowed[0])) for m in matchers)


def test_a_gguf_tokenizer_read_sets_off_no_full_collection_but_one_and_freezes_nothing(smollm2_dir, monkeypatch):
    import gc
    import threading

    from tests.models import SMOLLM2_GGUF
    from xllm_jupyter.core import gc_freeze

    monkeypatch.setattr(gc_freeze, "_enabled", True)
    was = gc.isenabled()
    gc.enable()
    gc.collect()
    gc.freeze()  # what the engine does at start and after each load: only what the read makes is walked
    full, freezes = [], []
    real_freeze = gc_freeze.freeze
    me = threading.get_ident()

    def counted(phase, info):
        if phase == "start" and info["generation"] == 2 and threading.get_ident() == me:
            full.append(len(freezes))

    def freeze():
        freezes.append(1)
        real_freeze()

    monkeypatch.setattr(gc_freeze, "freeze", freeze)
    gc.callbacks.append(counted)
    try:
        tokenizer = load_tokenizer(smollm2_dir, gguf_file=SMOLLM2_GGUF)
        frozen = gc_freeze.is_frozen(tokenizer)
    finally:
        gc.callbacks.remove(counted)
        gc.unfreeze()
        if not was:
            gc.disable()
    assert len(tokenizer) >= 49_152 and gc.isenabled() == was
    # its fields are a million Python objects: full collections walked them 5-9 times, each 0.06-1.3 s
    assert full == [0]  # one, at the end
    # and no freeze: it would catch the tokenizer (and every model loaded since the last freeze), whose
    # unloads would then need a full collection of the whole process (gc_freeze.is_frozen)
    assert freezes == [] and not frozen


def test_a_copys_tokenizer_is_the_one_in_use_not_a_second_read(tiny_llama_dir, tmp_path):
    """Tokenizer files byte for byte those of a tokenizer still in use: the same tokenizer, no second
    ``Tokenizer.from_file`` (a GIL stretch of 0.12-0.29 s); other files, or none in use, a read of their own."""
    import gc

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    first = load_tokenizer(tiny_llama_dir)
    assert load_tokenizer(copy) is first
    assert load_tokenizer(copy, use_fast=True) is not first  # other arguments: read as asked
    changed = with_config(tmp_path, Path(tiny_llama_dir), "changed", model_max_length=77)
    other = load_tokenizer(changed)
    assert other is not first and other.model_max_length == 77
    ids = first.encode("hello there", add_special_tokens=False)
    del first
    gc.collect()
    again = load_tokenizer(copy)  # none in use any more: read again, and the same tokenizer as before
    assert again.encode("hello there", add_special_tokens=False) == ids


def test_a_copy_with_its_own_chat_template_is_not_given_the_tokenizer_in_use(tiny_llama_dir, tmp_path):
    """transformers reads chat templates from ``chat_template.jinja`` and ``additional_chat_templates/`` beside the
    tokenizer files: a model whose tokenizer files matched one in use, and whose templates did not, was served the
    other's (its own template never ran)."""
    first = load_tokenizer(tiny_llama_dir)
    own = tmp_path / "own"
    shutil.copytree(tiny_llama_dir, own)
    text = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (own / "chat_template.jinja").write_text(text, encoding="utf-8")
    tokenizer = load_tokenizer(own)
    assert tokenizer is not first and tokenizer.chat_template == text
    named = tmp_path / "named"
    shutil.copytree(tiny_llama_dir, named)
    (named / "additional_chat_templates").mkdir()
    (named / "additional_chat_templates" / "tool_use.jinja").write_text(text, encoding="utf-8")
    tokenizer = load_tokenizer(named)
    assert tokenizer is not first and tokenizer.chat_template["tool_use"] == text
    assert load_tokenizer(named) is tokenizer  # the same files again: shared, as a plain copy's are


def test_a_copy_whose_config_picks_another_tokenizer_class_is_not_given_the_tokenizer_in_use(tiny_llama_dir, tmp_path):
    """Without ``tokenizer_class`` in ``tokenizer_config.json`` transformers takes the class from the model's
    ``config.json``: the same tokenizer files under another config are another tokenizer (a GPT-2 one here)."""
    classless = tmp_path / "classless"
    shutil.copytree(tiny_llama_dir, classless)
    settings = json.loads((classless / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    (classless / "tokenizer_config.json").write_text(json.dumps(settings))
    first = load_tokenizer(classless)
    assert load_tokenizer(shutil.copytree(classless, tmp_path / "copy")) is first  # same config too: shared
    gpt2 = shutil.copytree(classless, tmp_path / "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    other = load_tokenizer(gpt2)
    assert other is not first and type(other).__name__ == "GPT2Tokenizer" != type(first).__name__
