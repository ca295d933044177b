"""A forced pull that replaces a model where the kernel has no atomic exchange, beside another pull's clean-up.

Without ``renameat2(RENAME_EXCHANGE)`` (older kernels, some file systems) the old model directory is renamed
into ``tmp/old-*`` and the new one into its place. Another pull's clean-up of ``tmp/`` deleted such an entry
whenever its lock was free, and nothing held it: when the second rename then failed, the old model could not be
put back and the name was lost. Real store, real files; the failing rename is injected.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import changed_copy
from xllm_jupyter.core.errors import StoreError
from xllm_jupyter.store import atomic
from xllm_jupyter.store.store import ModelStore


@contextmanager
def _install_fails(monkeypatch: Any, meanwhile: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Inside the block, a pull's rename of its new model into ``models/`` calls ``meanwhile`` then fails (EIO)."""
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst).parent.name == "models" and Path(src).name.startswith("pull-"):  # the new model into place
            meanwhile()
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "rename", real_rename)


def test_a_clean_up_during_a_failed_replace_leaves_the_old_model_in_place(tmp_path, tiny_llama_dir, monkeypatch):
    home = tmp_path / "home"
    store = ModelStore(home)
    kept = store.pull(str(tiny_llama_dir), "m")
    other = changed_copy(tiny_llama_dir, tmp_path / "other")
    monkeypatch.setattr(atomic, "_renameat2_exchange", lambda a, b: False)
    # another process's pull cleans tmp/ just before the new model's rename into place fails
    with _install_fails(monkeypatch, meanwhile=lambda: ModelStore(home)._clean_tmp()), pytest.raises(StoreError):
        store.pull(str(other), "m", force=True)
    assert store.show("m").digest == kept.digest and store.verify("m")


def test_a_replace_without_exchange_leaves_nothing_in_tmp(tmp_path, tiny_llama_dir, monkeypatch):
    """The swap's lock file beside ``tmp/old-*`` goes with the old model, after a replace and after a failed one
    (it stayed until the next pull's clean-up)."""
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), "m")
    other = changed_copy(tiny_llama_dir, tmp_path / "other")
    monkeypatch.setattr(atomic, "_renameat2_exchange", lambda a, b: False)
    replaced = store.pull(str(other), "m", force=True)
    assert sorted(p.name for p in store.tmp.iterdir()) == []
    with _install_fails(monkeypatch), pytest.raises(StoreError):
        store.pull(str(tiny_llama_dir), "m", force=True)
    assert sorted(p.name for p in store.tmp.iterdir()) == []
    assert store.show("m").digest == replaced.digest
