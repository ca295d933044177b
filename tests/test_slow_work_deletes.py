"""Removals waiting for a pull, and pulls, must not take the slow-work pool from the loads.

``DELETE /v1/models/{id}`` waits for the name's store lock, which a pull (or a first-use load of a packaged model)
holds for minutes. It waited on a thread of the slow-work pool (core/slow_work.py), which loads share: as many
DELETEs as the pool has threads, all waiting on one pull, and a chat that had to load its model hung. Here the pool
is made small (the same mechanism with fewer threads), the name's lock held as a pull holds it, that many DELETEs
sent and more, and a chat with a model not loaded yet must load it and answer. Real server, real tiny Llamas, real
``openai`` SDK.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from xllm_jupyter.core import slow_work
from xllm_jupyter.server.standalone import shutdown_engine
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import API_KEY, make_test_config, running_server
from .slow_work_helpers import HUNG, CallCounter, assert_chat_answers_while_held, hold_pull_lock, store_of

#: the slow-work pool's threads in this test (the server's has 64: the same stall, with fewer requests)
WORKERS = 3


def test_deletes_waiting_for_a_pull_leave_the_slow_pool_to_loads(tmp_path, tiny_llama_dir, monkeypatch):
    """WORKERS + 2 DELETEs of a model whose pull holds its lock: a chat that loads another model still answers,
    and once the pull lets go, one DELETE removes the model and the others get 404s."""
    monkeypatch.setattr(slow_work, "_slow", slow_work.ThreadLane(WORKERS, "xllm-slow-test"))
    home = tmp_path / "home"
    store = store_of(home, tiny_llama_dir, "spare", "cold", "doomed")
    tries = CallCounter()
    monkeypatch.setattr(ModelStore, "rm", tries.wrap(ModelStore.rm))
    pull_lock = hold_pull_lock(home, "doomed")
    deletes = WORKERS + 2
    with running_server(make_test_config(home), ModelStore(home), "spare") as server:
        def delete() -> int:
            return httpx.delete(f"{server.base_url}/models/doomed", headers={"Authorization": f"Bearer {API_KEY}"},
                                timeout=300).status_code

        admins = ThreadPoolExecutor(deletes)
        try:
            sent = [admins.submit(delete) for _ in range(deletes)]
            # as many DELETEs as the pool has threads reached the store (before the fix, each holds one)
            assert_chat_answers_while_held(tries, WORKERS, sent, server.base_url, API_KEY, "cold",
                                           f"a chat that loads its model hung while {deletes} DELETEs waited on a pull")
        finally:
            pull_lock.release()
            codes = sorted(f.result(300) for f in sent)
            admins.shutdown()
        assert codes == [200] + [404] * (deletes - 1)
        assert not store.exists("doomed")


def test_pulls_in_flight_leave_the_slow_pool_to_loads(tmp_path, tiny_llama_dir, monkeypatch):
    """WORKERS + 1 admin pulls held in the store (as downloads or conversions take minutes): a chat that loads a
    model still answers; each pull then finishes."""
    monkeypatch.setattr(slow_work, "_slow", slow_work.ThreadLane(WORKERS, "xllm-slow-test"))
    home = tmp_path / "home"
    store = store_of(home, tiny_llama_dir, "spare", "cold")
    release, held = threading.Event(), CallCounter()
    original_pull = ModelStore.pull
    wait_for_release = held.wrap(lambda: release.wait(300))

    def held_pull(self, source, name=None, **kwargs):
        if name is not None and name.startswith("new"):
            wait_for_release()
        return original_pull(self, source, name, **kwargs)

    monkeypatch.setattr(ModelStore, "pull", held_pull)
    names = [f"new{i}" for i in range(WORKERS + 1)]
    with running_server(make_test_config(home), ModelStore(home), "spare") as server:
        def pull(name: str) -> int:
            r = httpx.post(server.root + "/admin/models/pull", json={"model": str(tiny_llama_dir), "name": name},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
            return r.status_code if '"success"' in r.text else -1

        admins = ThreadPoolExecutor(len(names))
        try:
            sent = [admins.submit(pull, n) for n in names]
            # as many pulls as the slow pool has threads are in the store
            assert_chat_answers_while_held(held, WORKERS, sent, server.base_url, API_KEY, "cold",
                                           "a chat that loads its model hung while {calls} pulls were in flight")
        finally:
            release.set()
            codes = [f.result(300) for f in sent]
            admins.shutdown()
        assert codes == [200] * len(names) and all(store.exists(n) for n in names)


def test_a_delete_waiting_for_a_pull_stops_when_its_client_leaves(tmp_path, tiny_llama_dir, caplog):
    """A DELETE waiting for a pull's lock whose client hangs up stops trying: once the pull lets go, the model is
    still in the store (it was removed by nobody's request), and a DELETE whose client waits removes it."""
    home = tmp_path / "home"
    store = store_of(home, tiny_llama_dir, "spare", "doomed")
    tries = CallCounter()
    pull_lock = hold_pull_lock(home, "doomed")
    caplog.set_level(logging.INFO, logger="xllm_jupyter.server")
    with pytest.MonkeyPatch.context() as mp, running_server(make_test_config(home), ModelStore(home), "spare") as server:
        mp.setattr(ModelStore, "rm", tries.wrap(ModelStore.rm))
        try:
            host, port = server.root.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
            conn.request("DELETE", "/v1/models/doomed", headers={"Authorization": f"Bearer {API_KEY}"})
            assert tries.wait_for(2)  # the DELETE is waiting for the lock
            conn.sock.shutdown(socket.SHUT_RDWR)  # the client leaves without its answer
            conn.close()
            left = "left while a pull of it held it"
            deadline = time.monotonic() + HUNG  # (a fail-safe: on the old code it kept trying until the pull ended)
            while not (stopped := any(left in r.getMessage() for r in caplog.records)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stopped, f"the DELETE went on trying the lock after its client left ({tries.calls} tries)"
            stopped_at = tries.calls
        finally:
            pull_lock.release()
        assert store.exists("doomed")
        r = httpx.delete(f"{server.base_url}/models/doomed", headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=300)
        assert r.status_code == 200 and r.json() == {"id": "doomed", "object": "model", "deleted": True}
        assert tries.calls == stopped_at + 1 and not store.exists("doomed")


def test_a_delete_waiting_for_a_pull_answers_503_when_the_server_stops(tmp_path, tiny_llama_dir):
    """A DELETE waiting for a lock another process's pull holds, when the server shuts down (its engine stops first,
    as ``run_server`` does at SIGTERM): an OpenAI 503 saying so, not a connection cut at the drain's end (and a
    500 in the log when the loop cancelled it); the model stays."""
    home = tmp_path / "home"
    store = store_of(home, tiny_llama_dir, "spare", "doomed")
    tries = CallCounter()
    pull_lock = hold_pull_lock(home, "doomed")  # as a CLI pull of the name holds it
    with pytest.MonkeyPatch.context() as mp, running_server(make_test_config(home), ModelStore(home), "spare") as server:
        mp.setattr(ModelStore, "rm", tries.wrap(ModelStore.rm))
        admins = ThreadPoolExecutor(1)
        try:
            sent = admins.submit(httpx.delete, f"{server.base_url}/models/doomed",
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=HUNG)
            assert tries.wait_for(2)  # the DELETE is waiting for the lock
            server.call(shutdown_engine(server.engine), timeout=60)
            try:
                r = sent.result(HUNG + 10)
            except httpx.TimeoutException:
                pytest.fail("a DELETE waiting for a pull's lock went on waiting after the server began to stop")
        finally:
            pull_lock.release()
            admins.shutdown()
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert "shutting down" in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert store.exists("doomed")
