"""A client leaving ``POST /admin/models/pull`` stops the store's pull at once, even inside a long step.

A GGUF conversion's library calls report nothing for tens of seconds. The route used to stop its pull only at the
next progress report, so the request (and the pull's name lock, its CPU and its files in ``tmp/``) stayed until the
step ended; it now hands its "client gone" event to the store as the pull's cancel, the one a shutdown sets.
Here the conversion's first library call (the tokenizer read) is held on an event the test controls, so the
test needs no clock: the pull must end while that call is still held.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import dirs_in
from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from tests.test_store import tiny_gguf  # noqa: F401 - a fixture
from xllm_jupyter.store.store import ModelStore

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
#: how long the test waits for what must happen (far beyond the store's half-second grace; no timing is asserted)
PATIENCE = 60


class WatchedStore(ModelStore):
    """The real store, saying when a pull has returned (or raised) to its caller."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pull_ended = threading.Event()

    def pull(self, *args, **kwargs):
        """``ModelStore.pull``, then ``pull_ended`` set."""
        try:
            return super().pull(*args, **kwargs)
        finally:
            self.pull_ended.set()


@pytest.fixture
def held_tokenizer_read(monkeypatch):
    """Holds a GGUF conversion inside its first library call; yields (inside, release)."""
    import transformers

    inside, release = threading.Event(), threading.Event()
    original = transformers.AutoTokenizer.from_pretrained

    def held(*args, **kwargs):
        if kwargs.get("gguf_file"):  # a conversion's read (the server's own model loads pass through)
            inside.set()
            release.wait(300)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", held)
    yield inside, release
    release.set()


def test_a_client_leaving_mid_conversion_stops_the_pull_at_once(tmp_path, tiny_llama_dir, tiny_gguf,  # noqa: F811
                                                                 held_tokenizer_read):
    inside, release = held_tokenizer_read
    home = tmp_path / "home"
    ModelStore(home).pull(str(tiny_llama_dir), TINY)
    store = WatchedStore(home)
    with running_server(make_test_config(home), store, TINY) as info:
        events = []
        with httpx.stream("POST", info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE,
                          json={"model": str(tiny_gguf), "name": "converted", "convert": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[len("data: "):]))
                    if events[-1]["status"] == "convert":
                        break
            assert inside.wait(PATIENCE), events  # the conversion is inside its library call
        # the client has gone (the stream closed); the held call has not returned
        try:
            assert store.pull_ended.wait(PATIENCE), "the pull went on after its client left"
            assert not release.is_set()
            # the server serves meanwhile, the abandoned step still held
            with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=PATIENCE) as c:
                reply = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert reply.choices[0].finish_reason in ("length", "stop")
        finally:
            release.set()
        # the step returns, its thread unwinds at the next step and deletes its build directory and lock
        deadline = time.monotonic() + PATIENCE
        while sorted(p.name for p in store.tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(p.name for p in store.tmp.iterdir()) == []
        assert [m.name for m in store.list()] == [TINY] and dirs_in(store.models) == [TINY]
        assert store.damaged() == []
        # nothing is stuck: the name pulls again (its lock was let go), over the same route
        r = httpx.post(info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE,
                       json={"model": str(tiny_gguf), "name": "converted"})
        done = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert done[-1]["status"] == "success" and done[-1]["id"] == "converted", done


def _events_until(lines, status_prefix):
    """The stream's next events up to the first whose status starts with ``status_prefix`` (or its end)."""
    events = []
    for line in lines:
        if line.startswith("data: {"):
            events.append(json.loads(line[len("data: "):]))
            if str(events[-1].get("status", "")).startswith(status_prefix) or "error" in events[-1]:
                break
    return events


def test_a_repull_waits_on_the_ioloop_for_the_left_conversion_and_stops_with_its_client_or_a_shutdown(
        tmp_path, tiny_llama_dir, tiny_gguf, held_tokenizer_read):  # noqa: F811
    """A pull of a name whose cancelled conversion is still held in its library call ran a second conversion beside
    it. Now it waits for that first, saying so, before it calls the store's pull (no pull thread held), and its
    client leaving, or a shutdown's ``cancel_pulls``, stops the wait."""
    inside, release = held_tokenizer_read
    home = tmp_path / "home"
    ModelStore(home).pull(str(tiny_llama_dir), TINY)
    store = WatchedStore(home)
    calls = []
    original = store.pull
    store.pull = lambda *a, **k: calls.append(a) or original(*a, **k)  # counts the pulls the route starts
    body = {"model": str(tiny_gguf), "name": "converted", "convert": True}
    waiting = "waiting for the cancelled pull of 'converted' to finish"
    with running_server(make_test_config(home), store, TINY) as info:
        try:
            with httpx.stream("POST", info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE, json=body) as r:
                assert _events_until(r.iter_lines(), "convert")[-1]["status"] == "convert"
                assert inside.wait(PATIENCE)
            assert store.pull_ended.wait(PATIENCE), "the pull went on after its client left"
            # a retry whose client leaves while it waits: it never reaches the store
            with httpx.stream("POST", info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE, json=body) as r:
                assert r.status_code == 200
                assert _events_until(r.iter_lines(), "waiting")[-1] == {"status": waiting, "file": None, "completed": 0, "total": None}
            # a retry waiting at a shutdown's cancel: its stream ends with the stop's error, nothing pulled
            with httpx.stream("POST", info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE, json=body) as r:
                lines = r.iter_lines()
                assert _events_until(lines, "waiting")[-1]["status"] == waiting
                assert store.cancel_pulls() >= 1
                rest = _events_until(lines, "never")
            assert "error" in rest[-1] and "stopped before it started" in rest[-1]["error"]["message"], rest
            assert len(calls) == 1 and not release.is_set()  # only the first pull ran; the conversion is still held
        finally:
            release.set()
        # once the left conversion ends, a retry goes through (after its one waiting event, if it still ran)
        r = httpx.post(info.root + "/admin/models/pull", headers=HEADERS, timeout=PATIENCE,
                       json={"model": str(tiny_gguf), "name": "converted"})
        done = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert done[-1]["status"] == "success" and done[-1]["id"] == "converted", done
        assert len(calls) == 2
