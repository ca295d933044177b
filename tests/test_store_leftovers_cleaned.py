"""What an interrupted ``rm`` or ``create`` leaves in ``tmp/`` (a killed or Ctrl-C'd process) is deleted by the next
``rm`` or ``create`` too, not by a pull alone: a user who never pulls again kept a removed model's gigabytes."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.store.atomic import FileLock
from xllm_jupyter.store.store import ModelStore


@pytest.fixture
def store(tmp_path, tiny_llama_dir) -> ModelStore:
    s = ModelStore(tmp_path / "home")
    s.pull(str(tiny_llama_dir), TINY)
    return s


def _leftovers(store: ModelStore) -> list:
    """A removal and a create that were killed midway (no process holds their directories)."""
    made = []
    for name in ("rm-0123456789abcdef", "pull-0123456789abcdef"):
        path = store.tmp / name
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x" * 1000)
        made.append(path)
    return made


@pytest.mark.parametrize("op", ["rm", "create"])
def test_the_next_rm_or_create_deletes_what_an_interrupted_one_left(store, op):
    store.create("other", f"FROM {TINY}\n")
    left = _leftovers(store)
    live = store.tmp / "pull-live"  # a create of another process, under way: kept
    live.mkdir()
    with FileLock(store.tmp / "pull-live.lock"):
        if op == "rm":
            store.rm("other")
        else:
            store.create("third", f"FROM {TINY}\nSYSTEM hi\n")
    assert not any(p.exists() for p in left)
    assert live.is_dir()
