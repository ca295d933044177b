"""``canonical_name`` (store/names.py) remembers the spellings it has seen: a request's model name passes it ~9 times."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from xllm_jupyter.store import names
from xllm_jupyter.store.names import canonical_name


@pytest.mark.parametrize("spelling, canonical", [
    ("SmolLM2", "smollm2"), ("llama3:latest", "llama3"), ("Qwen2.5-Coder:7B", "qwen2.5-coder:7b"),
    ("not a name!", "not a name!"), ("con", "con"), ("x.", "x."), ("\u212aelvin", "\u212aelvin"), ("", ""),
])
def test_same_answers_twice(spelling, canonical):
    assert canonical_name(spelling) == canonical
    assert canonical_name(spelling) == canonical  # the remembered one


def test_a_seen_spelling_is_not_validated_again(monkeypatch):
    calls = []
    real = names.validate_name

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(names, "validate_name", counting)
    names._canonical_str.cache_clear()
    for _ in range(5):
        assert canonical_name("Counted-Model:Q4") == "counted-model:q4"
        assert canonical_name("bad name") == "bad name"
    assert calls == ["Counted-Model:Q4", "bad name"]
    names._canonical_str.cache_clear()  # (the counting wrapper's answers were the real ones; start clean anyway)


def test_bounded_and_other_types_pass_uncached():
    for i in range(3000):
        canonical_name(f"model-{i}")
    assert names._canonical_str.cache_info().currsize <= 1024

    class Name(str):
        pass

    assert canonical_name(Name("Sub:Latest")) == "sub" and canonical_name(None) is None  # type: ignore[arg-type]


def test_long_spellings_are_not_kept():
    # a request body of up to max_body_bytes (4 MiB) may hold one model name: 1,024 remembered ones were gigabytes
    names._canonical_str.cache_clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50):
            hostile = f"{i}-" + "x" * 200_000
            assert canonical_name(hostile) == hostile
            del hostile
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, kept
    longest = "a" * 64 + ":" + "b" * 32
    assert canonical_name(longest) == longest and names._canonical_str.cache_info().currsize == 1
