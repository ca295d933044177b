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


def _held_conversions(monkeypatch):
    """The store's conversion replaced by one held on an event (as transformers' weights read holds it, deaf to the
    cancel), counting the conversions running at once; returns (state, release)."""
    from xllm_jupyter.store import convert

    state = {"started": 0, "running": 0, "peak": 0, "ended": 0}
    changed, release = threading.Condition(), threading.Event()

    def held_conversion(source, out_dir, *, progress=None):  # one step that reports nothing until it returns
        with changed:
            state["started"] += 1
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            changed.notify_all()
        try:
            release.wait(300)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text("{}")
            (out_dir / "model.safetensors").write_bytes(bytes(16))
        finally:
            with changed:
                state["running"] -= 1
                state["ended"] += 1
                changed.notify_all()
        return None

    monkeypatch.setattr(convert, "gguf_to_safetensors", held_conversion)
    return state, changed, release


def _wait_until(changed, test, what):
    """Wait (fail-safe: 60 s, no timing asserted) until ``test()`` holds."""
    with changed:
        assert changed.wait_for(test, 60), what


def test_a_left_conversion_lets_go_of_its_name_and_the_next_pull_waits_for_it_without_its_lock(
        tmp_path, tiny_llama_dir, monkeypatch):
    """A GGUF conversion cancelled and left inside its long library call held the name's lock until that call
    ended (tens of seconds: the weights' read), so a DELETE or a load of the name waited for it. It lets go of the
    lock when left; a new pull of the name waits (saying so) for the left thread instead of converting beside it,
    and the left conversion, once its call ends, writes nothing into models/."""
    import concurrent.futures

    from xllm_jupyter.store.cancel import waiting_status
    from xllm_jupyter.store.store import ModelStore

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    state, changed, release = _held_conversions(monkeypatch)
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), "same")
    stop, stages = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(store.pull, str(gguf), "same", convert=True, force=True, cancel=stop)
        try:
            _wait_until(changed, lambda: state["started"] == 1, "the conversion never started")
            stop.set()
            with pytest.raises(PullStopped):
                first.result(300)
            # the name's lock is free: the installed model is removed at once (a DELETE's try), and read meanwhile
            assert store.show("same").source == str(tiny_llama_dir)
            assert store.rm("same", wait=False) is True
            assert store.left_pulls("same") == 1
            second = pool.submit(store.pull, str(tiny_llama_dir), "same", progress=lambda e: stages.append(e.stage))
            for _ in range(1200):
                if stages or second.done():
                    break
                time.sleep(0.05)
            assert stages == [waiting_status("same")] and not second.done()
        finally:
            release.set()
        manifest = second.result(300)
        assert state["ended"] == 1 and manifest.source == str(tiny_llama_dir)
        for _ in range(600):  # the left thread unwinds at its next step (cancelled): wait for its files to go
            if not cancel_module._abandoned:
                break
            time.sleep(0.05)
    # what the left conversion built never reached models/: the second pull's model is there, whole
    kept = store.show("same")
    assert kept.source == str(tiny_llama_dir) and kept.format == "safetensors" and store.verify("same")
    assert not [p.name for p in (tmp_path / "home" / "tmp").iterdir() if p.name.startswith("pull-") and p.is_dir()]
    assert state["started"] == 1 and store.left_pulls("same") == 0


def test_cancel_and_retry_never_runs_two_conversions_of_a_name_at_once(tmp_path, monkeypatch):
    """Each cancel and retry of a conversion started one more full conversion beside the left one (smollm2: 408 MiB
    peak with one, 914 MiB with two), with no bound. A retry now waits for the left one (and is itself cancellable
    while it waits), so at most one conversion of a name runs at a time."""
    import concurrent.futures

    from xllm_jupyter.store.store import ModelStore

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    state, changed, release = _held_conversions(monkeypatch)
    store = ModelStore(tmp_path / "home")
    waiting = threading.Semaphore(0)

    def report(event):
        if event.stage.startswith("waiting"):
            waiting.release()
            with changed:  # (``_wait_until`` looks again on a notify only: a wait said after its first look took 60 s)
                changed.notify_all()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            stop = threading.Event()
            first = pool.submit(store.pull, str(gguf), "same", convert=True, cancel=stop)
            _wait_until(changed, lambda: state["started"] == 1, "the conversion never started")
            stop.set()
            with pytest.raises(PullStopped):
                first.result(300)
            # a retry, cancelled in turn: while it waits, and again the next
            for _ in range(2):
                retry_stop = threading.Event()
                retry = pool.submit(store.pull, str(gguf), "same", convert=True, cancel=retry_stop, progress=report)
                _wait_until(changed, lambda: state["started"] > 1 or waiting.acquire(blocking=False),
                            "the retry neither waited nor converted")
                assert state["peak"] == 1, "a retry converted beside the left conversion"
                retry_stop.set()
                with pytest.raises(PullStopped):
                    retry.result(300)  # (it stopped while waiting: nothing of it is left running)
            last = pool.submit(store.pull, str(gguf), "same", convert=True, progress=report)
            _wait_until(changed, lambda: state["started"] > 1 or waiting.acquire(blocking=False),
                        "the last retry neither waited nor converted")
            assert state["peak"] == 1 and not last.done()
        finally:
            release.set()
        manifest = last.result(300)
    # the left conversion ended, then the last retry's ran: two in all, never two at once
    assert (state["started"], state["peak"]) == (2, 1)
    assert manifest.name == "same" and store.verify("same")
