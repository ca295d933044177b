"""A usage save waits a bounded time for the usage file's lock: a holder stuck for good does not hang shutdown.

The saver took ``.usage.json.lock`` with no timeout, so a process that kept it (hung, or on a dead network file
system) hung the server's saves and its last save at shutdown. Now the save gives up after ``LOCK_WAIT``, logs,
and keeps the counts for the next save, which merges them as before.
"""

from __future__ import annotations

import logging
import threading

from xllm_jupyter.core.config import QuotaConfig
from xllm_jupyter.server import usage_file
from xllm_jupyter.server.usage import UsageTracker
from xllm_jupyter.server.usage_file import read_usage
from xllm_jupyter.store.atomic import FileLock


def test_a_stuck_lock_holder_does_not_hang_the_last_save_and_the_counts_wait_for_the_next(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(usage_file, "LOCK_WAIT", 0.2, raising=False)
    file = tmp_path / "usage.json"
    stuck = FileLock(file.with_name(".usage.json.lock"))  # another process's save that never ends
    assert stuck.acquire(blocking=False)
    tracker = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    tracker.charge("alice", 30, 10)
    closing = threading.Thread(target=tracker.close, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="xllm_jupyter.server"):
            closing.start()
            closing.join(60)  # (the old code waited for good: this bound only ends the test that fails)
            assert not closing.is_alive(), "the last save hangs on a lock another process holds"
        assert not file.exists()
        assert any("could not save usage" in r.getMessage() and "held" in r.getMessage() for r in caplog.records)
        assert any("were not saved" in r.getMessage() for r in caplog.records)
    finally:
        stuck.release()
    tracker._saver.flush()  # (a save after the holder let go: what was kept is saved)
    assert read_usage(file)["alice"]["tokens_today"] == 40


def test_a_lock_taken_with_a_timeout(tmp_path):
    path = tmp_path / "x.lock"
    holder = FileLock(path)
    assert holder.acquire(blocking=False)
    assert not FileLock(path).acquire(timeout=0.05)  # held: gives up
    holder.release()
    other = FileLock(path)
    assert other.acquire(timeout=0.05)  # free: taken at once
    other.release()
