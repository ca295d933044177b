"""store/cancel.py's run_cancellable: a cancelled pull's caller waits one grace for it, then leaves it once."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from xllm_jupyter.core.errors import PullStopped
from xllm_jupyter.store import cancel as cancel_module
from xllm_jupyter.store.cancel import PullJob, run_cancellable


def test_a_cancelled_pull_stuck_in_a_library_call_is_left_after_one_grace(caplog):
    job = PullJob("stuck")
    release = threading.Event()
    started = threading.Event()

    def stuck() -> None:  # a conversion step that reports nothing until it returns
        started.set()
        release.wait(30)

    def cancel() -> None:
        started.wait(30)
        job.cancel.set()

    threading.Thread(target=cancel, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="xllm_jupyter.store.store"), pytest.raises(PullStopped):
            run_cancellable(job, stuck)
        assert job in cancel_module._abandoned  # left, its files for the exit to delete if its step never ends
    finally:
        release.set()
    left = [r for r in caplog.records if "leaving it" in r.getMessage()]
    # one grace and one warning: its own PullStopped was taken for a Ctrl-C and given a second grace (and warning)
    assert len(left) == 1, [r.getMessage() for r in left]
    # the stuck step ended (released above): the pull unwinds and is no longer kept among the abandoned (a server
    # whose pulls' clients leave mid-conversion kept one job for each until it exited)
    for _ in range(600):
        with cancel_module._abandoned_lock:
            if job not in cancel_module._abandoned:
                break
        time.sleep(0.05)
    assert job not in cancel_module._abandoned
