"""The store's per-name lock files do not pile up in ``<XLLM_HOME>/locks/``, and deleting them keeps locking exact.

Every pull, removal and create locked ``locks/<name>.lock`` and left the (empty) file behind: one file per
name ever used, for good. The holder now deletes it as it lets go; a taker that locked a file deleted under it
retries on the path's new file (``FileLock.acquire``), so two takers never both hold the name.
"""

from __future__ import annotations

import threading
import time

import pytest

from xllm_jupyter.core.errors import ModelNotFound
from xllm_jupyter.store.atomic import FileLock
from xllm_jupyter.store.store import ModelStore


def test_pulls_creates_and_removals_leave_no_lock_files(tmp_path, tiny_llama_dir):
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), "first")
    store.create("second", "FROM first\nPARAMETER temperature 0.2\n")
    store.rm("first")
    with pytest.raises(ModelNotFound):
        store.rm("never-pulled")
    assert "second" in store.names() and "first" not in store.names()
    assert [p.name for p in store.locks.iterdir() if not p.name.startswith(".")] == []


def test_a_lock_whose_file_its_holders_delete_still_admits_one_holder_at_a_time(tmp_path):
    path = tmp_path / "locks" / "name.lock"
    inside: list[int] = []
    overlaps: list[int] = []

    def take(worker: int) -> None:
        for _ in range(200):
            with FileLock(path, remove=True):
                inside.append(worker)
                time.sleep(0.0002)  # (held a moment: the others are waiting on this file as it is deleted)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                inside.remove(worker)

    threads = [threading.Thread(target=take, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and overlaps == []
    assert not path.exists()  # the last holder deleted it


def test_a_holder_that_keeps_its_file_is_not_undone_by_a_taker_that_deletes(tmp_path):
    """A taker made with ``remove`` waits for a holder without it (another process's ``xllm pull``, say), then
    deletes the file it locked as it lets go; a later taker makes a new one."""
    path = tmp_path / "name.lock"
    keeper = FileLock(path)
    assert keeper.acquire(blocking=False)
    assert not FileLock(path, remove=True).acquire(blocking=False)  # held: refused, the file untouched
    assert path.exists()
    keeper.release()
    remover = FileLock(path, remove=True)
    assert remover.acquire(blocking=False)
    remover.release()
    assert not path.exists()
