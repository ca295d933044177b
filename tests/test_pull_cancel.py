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


def test_a_left_conversion_lets_the_next_pull_of_its_name_through_and_never_installs(tmp_path, tiny_llama_dir,
                                                                                     monkeypatch):
    """A GGUF conversion cancelled and left inside its long library call held the name's lock until that call
    ended (tens of seconds: the weights' read), so a pull, or a first-use load, of the same name waited for it.
    Now the name's next pull runs at once; the left conversion, once its call ends, writes nothing into models/.
    The conversion is held by an event (as transformers' read holds it, deaf to the cancel); no clock."""
    import concurrent.futures

    from xllm_jupyter.store import convert
    from xllm_jupyter.store.store import ModelStore

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    converting, release, ended = threading.Event(), threading.Event(), threading.Event()

    def held_conversion(source, out_dir, *, progress=None):  # one step that reports nothing until it returns
        converting.set()
        release.wait(300)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(bytes(16))
        ended.set()
        return None

    monkeypatch.setattr(convert, "gguf_to_safetensors", held_conversion)
    store = ModelStore(tmp_path / "home")
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(store.pull, str(gguf), "same", convert=True, cancel=stop)
        try:
            assert converting.wait(300), "the conversion never started"
            stop.set()
            with pytest.raises(PullStopped):
                first.result(300)
            second = pool.submit(store.pull, str(tiny_llama_dir), "same")
            try:
                manifest = second.result(60)  # (a fail-safe: before the fix it waited for the held conversion)
            except concurrent.futures.TimeoutError:
                pytest.fail("the pull of the name waited for the left conversion's library call to end")
            assert not ended.is_set() and manifest.source == str(tiny_llama_dir)
        finally:
            release.set()
        assert ended.wait(300)
        for _ in range(600):  # the left thread unwinds at its next step (cancelled): wait for its files to go
            if not cancel_module._abandoned:
                break
            time.sleep(0.05)
    # what the left conversion built never reached models/: the second pull's model is there, whole
    kept = store.show("same")
    assert kept.source == str(tiny_llama_dir) and kept.format == "safetensors" and store.verify("same")
    assert not [p.name for p in (tmp_path / "home" / "tmp").iterdir() if p.name.startswith("pull-") and p.is_dir()]
