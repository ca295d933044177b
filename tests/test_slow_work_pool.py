"""Many slow loads at once must not stall a chat with a model already loaded.

asyncio's default pool (``cpu_count + 4`` threads) serves the server's short work: resolving a name,
tokenizing a prompt. Loads waited on it too, for their weights or their warm-up (core/slow_work.py), so
that many users loading other models at once took every thread and a chat with a loaded model hung.
Here that many loads or pulls (and one more) are held on their threads by events while a chat with the loaded
model runs; they are let go only once it has answered. Real server, real tiny Llamas (and copies of the
packaged all-MiniLM for embedding loads), real ``openai`` SDK.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from xllm_jupyter.engine import loading
from xllm_jupyter.engine.embeddings import EmbeddingHost
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import API_KEY, make_test_config, running_server
from .slow_work_helpers import HI, CallCounter, assert_chat_answers_while_held

#: asyncio's default pool size (``ThreadPoolExecutor``'s default): loads enough to take all of its threads
DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)


@pytest.mark.parametrize("stage", ["load", "warm-up", "embedding load", "pull"])
def test_a_loaded_model_answers_while_many_loads_are_held(tmp_path, tiny_llama_dir, monkeypatch, stage):
    """DEFAULT_WORKERS + 1 loads (or pulls) held in their ``stage``: a chat with the loaded "spare" still answers."""
    embedding = stage == "embedding load"  # copies of the packaged all-MiniLM, loaded by embedding requests
    names = [f"copy{i}" for i in range(DEFAULT_WORKERS + 1)]
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), "spare")
    for name in names if stage != "pull" else ():
        store.pull("all-minilm" if embedding else str(tiny_llama_dir), name)

    release, held = threading.Event(), CallCounter()
    hold = held.wrap(lambda: release.wait(300))  # on the thread the server gave the load's (or pull's) stage

    original, original_embedding, original_pull = loading._load_and_prepare, EmbeddingHost._load_sync, ModelStore.pull

    def held_load(backend, spec):
        if spec.name not in names:
            return original(backend, spec)
        if stage == "load":
            hold()
            return original(backend, spec)
        model = original(backend, spec)
        warm_up = model.warm_up
        model.warm_up = lambda: (hold(), warm_up())  # held once its runner thread warms it up
        return model

    def held_embedding_load(host, spec):
        hold()
        return original_embedding(host, spec)

    def held_pull(self, source, name, **kwargs):  # as a download or a GGUF conversion would take a while
        hold()
        return original_pull(self, source, name, **kwargs)

    monkeypatch.setattr(loading, "_load_and_prepare", held_load)
    monkeypatch.setattr(EmbeddingHost, "_load_sync", held_embedding_load)
    monkeypatch.setattr(ModelStore, "pull", held_pull)
    with running_server(make_test_config(home), ModelStore(home), "spare") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)

        def ask(name: str) -> str:
            """The slow request for ``name``; what its answer says it loaded or pulled."""
            if stage == "pull":
                r = httpx.post(server.root + "/admin/models/pull", json={"model": str(tiny_llama_dir), "name": name},
                               headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
                last = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]
                return last["id"] if r.status_code == 200 and last["status"] == "success" else r.text
            if embedding:
                reply = client.embeddings.create(model=name, input="hi")
                return reply.model if len(reply.data[0].embedding) == 384 else str(reply)
            reply = client.chat.completions.create(model=name, messages=HI, max_tokens=2)
            return reply.model if reply.usage.completion_tokens >= 1 else str(reply)

        users = ThreadPoolExecutor(len(names))
        try:
            slow = [users.submit(ask, n) for n in names]
            # every thread asyncio's default pool has is taken by a held call, if they still use it
            assert_chat_answers_while_held(held, DEFAULT_WORKERS, slow, server.base_url, server.api_key, "spare",
                                           f"a chat with the loaded model hung while {{calls}} {stage}s were held")
        finally:
            release.set()
            done = [f.result(300) for f in slow]
            users.shutdown()
        assert sorted(done) == sorted(names)
