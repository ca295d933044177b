"""A retried pull that would only return the model already stored answers at once, past a cancelled pull left running.

A pull cancelled inside a long conversion step (deaf to its cancel) is left running; a new pull of its name waits
for it, so that two conversions of one name never run at once. A retry that converts nothing (the stored model
is from the same source, no ``force``) waited for it too, minutes for the model it had all along. Real store,
real server and client; the conversion is held on an event as transformers' weight read holds it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from xllm_jupyter.client.client import XllmClient
from xllm_jupyter.core.errors import PullStopped
from xllm_jupyter.store.cancel import waiting_status
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import API_KEY, make_test_config, running_server
from .test_pull_cancel import _held_conversions, _wait_until

#: a fail-safe: the retry answers in well under a second; the held conversion would keep it for 300 s
QUICK = 60


def _left_conversion(store, gguf, changed, state, pool):
    """A forced conversion of ``same`` cancelled and left inside its held step."""
    stop = threading.Event()
    first = pool.submit(store.pull, str(gguf), "same", convert=True, force=True, cancel=stop)
    _wait_until(changed, lambda: state["started"] == 1, "the conversion never started")
    stop.set()
    with pytest.raises(PullStopped):
        first.result(300)
    assert store.left_pulls("same") == 1


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_a_retry_that_returns_the_stored_model_does_not_wait_for_the_left_pull(tmp_path, tiny_llama_dir, gguf,
                                                                                 monkeypatch):
    state, changed, release = _held_conversions(monkeypatch)
    store = ModelStore(tmp_path / "home")
    stored = store.pull(str(tiny_llama_dir), "same")
    stages: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            _left_conversion(store, gguf, changed, state, pool)
            retry = pool.submit(store.pull, str(tiny_llama_dir), "same", progress=lambda e: stages.append(e.stage))
            manifest = retry.result(QUICK)  # before: waited here until the held conversion ended
            assert manifest.digest == stored.digest and stages == []
            # a retry with work to do (force) still waits for the left conversion
            forced = pool.submit(store.pull, str(tiny_llama_dir), "same", force=True,
                                 progress=lambda e: stages.append(e.stage))
            for _ in range(200):
                if stages or forced.done():
                    break
                time.sleep(0.05)
            assert stages == [waiting_status("same")] and not forced.done()
        finally:
            release.set()
        assert forced.result(300).digest == stored.digest
    assert state["started"] == 1


def test_the_pull_route_answers_a_retry_of_the_stored_model_at_once(tmp_path, tiny_llama_dir, gguf, monkeypatch):
    state, changed, release = _held_conversions(monkeypatch)
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), "spare")
    stored = store.pull(str(tiny_llama_dir), "same")
    with running_server(make_test_config(home), ModelStore(home), "spare") as server, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            _left_conversion(store, gguf, changed, state, pool)

            def retry() -> list[dict]:
                with XllmClient(server.base_url, API_KEY) as client:
                    return list(client.pull(str(tiny_llama_dir), name="same"))

            events = pool.submit(retry).result(QUICK)  # before: the route waited for the left conversion
        finally:
            release.set()
    assert [e["status"] for e in events] == ["success"], events
    assert events[-1]["digest"] == stored.digest
