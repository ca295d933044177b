"""A first use's pull must not hold a slow-work thread while it runs or waits.

A request naming a packaged default not in the store yet pulls it first (minutes for smollm2's conversion), or
waits for another process's pull of it (the name's store lock). The resolve did that on a slow-work thread
(core/slow_work.py), which DELETEs and loads share: with that pool busy, they waited for the pull to end. Here
the pool is made one thread (the same mechanism, fewer requests), another process's pull of all-minilm is
stood for by its lock, and an embeddings request's first use of all-minilm waits for it; meanwhile a DELETE of
another model and a chat that loads one must answer. Real server, packaged all-MiniLM, real ``openai`` SDK.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from xllm_jupyter.core import slow_work
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import API_KEY, make_test_config, running_server
from .slow_work_helpers import HUNG, assert_chat_answers, hold_pull_lock, store_of

#: a fail-safe for the DELETE (it takes milliseconds; on the old code it waited for the pull's lock)
DELETE_TIMEOUT = 20


def test_a_first_use_waiting_for_a_pull_leaves_the_slow_pool_to_deletes_and_loads(tmp_path, tiny_llama_dir,
                                                                                    monkeypatch, caplog):
    monkeypatch.setattr(slow_work, "_slow", slow_work.ThreadLane(1, "xllm-slow-test"))
    home = tmp_path / "home"
    store = store_of(home, tiny_llama_dir, "spare", "cold", "doomed")
    assert not store.exists("all-minilm")
    caplog.set_level(logging.INFO, logger="xllm_jupyter.store")
    pull_lock = hold_pull_lock(home, "all-minilm")  # another process pulls it
    with running_server(make_test_config(home), ModelStore(home), "spare") as server, ThreadPoolExecutor(1) as pool:
        def embed() -> int:
            client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)
            return len(client.embeddings.create(model="all-minilm", input="hi").data[0].embedding)

        try:
            first_use = pool.submit(embed)
            deadline = time.monotonic() + HUNG
            while not any("on first use" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline and not first_use.done(), "the first use never began its pull"
                time.sleep(0.05)
            try:
                r = httpx.delete(f"{server.base_url}/models/doomed", headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=DELETE_TIMEOUT)
            except httpx.TimeoutException:
                raise AssertionError("a DELETE waited for the slow-work thread a first use's pull held") from None
            assert r.status_code == 200 and not store.exists("doomed")
            assert_chat_answers(server.base_url, API_KEY, "cold", "a chat that loads its model hung while a first "
                                "use waited for a pull")
            assert not first_use.done()  # (the pull still waits for the lock: all the above ran beside it)
        finally:
            pull_lock.release()
        assert first_use.result(300) > 0  # the pull went on once the lock was free, and the model serves
    assert store.exists("all-minilm")


def test_a_shutdown_ends_a_first_use_pull_within_the_grace_even_mid_conversion(tmp_path, monkeypatch):
    """The future a first use awaits ends with PullStopped within the store's grace of ``cancel_pulls`` (a
    shutdown), while the conversion step is still inside its library call; that step then writes nothing."""
    import pytest

    from xllm_jupyter.core.errors import PullStopped
    from xllm_jupyter.store.cancel import GRACE_SECONDS

    from .test_pull_cancel import _held_conversions, _wait_until

    state, changed, release = _held_conversions(monkeypatch)
    store = ModelStore(tmp_path / "home")
    try:
        pulling = store.first_use_pull("smollm2")
        assert pulling is not None
        _wait_until(changed, lambda: state["started"] == 1, "the conversion never started")
        assert store.cancel_pulls() == 1
        with pytest.raises(PullStopped):
            pulling.result(GRACE_SECONDS + 10)  # (a fail-safe: it ends after the grace)
        assert state["ended"] == 0  # it ended while the conversion was still held
    finally:
        release.set()
    _wait_until(changed, lambda: state["ended"] == 1, "the held conversion never ended")
    assert not store.exists("smollm2") and store.first_use_pull("nosuch") is None
