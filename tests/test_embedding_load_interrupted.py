"""An embedding model's load that ends with no Exception (a loader's SystemExit, KeyboardInterrupt or CancelledError,
or its task cancelled) must still answer every request waiting for it.

The load task caught ``Exception`` only: its waiters' future was never settled, so they waited for good, and a
SystemExit or KeyboardInterrupt raised in the loader's thread came out of the server's IOLoop and stopped it.
A real server with the packaged all-MiniLM (its loader made to raise once) and the real ``openai`` SDK; the
cancelled task on the engine's EmbeddingHost itself.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import openai
import pytest

from xllm_jupyter.backends.base import ModelSpec
from xllm_jupyter.core.errors import Overloaded
from xllm_jupyter.engine.embeddings import EmbeddingHost
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import make_test_config, running_server

#: how long a hung request may take before the test reports it (a fail-safe, not a timing assertion)
HUNG = 60


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, asyncio.CancelledError])
def test_a_load_interrupted_in_its_loader_answers_a_503_and_the_server_serves_on(tmp_path, tiny_llama_dir,
                                                                                monkeypatch, raised):
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), "tiny")
    store.pull("all-minilm", "all-minilm")
    original, calls = EmbeddingHost._load_sync, []

    def interrupted_once(host, spec):
        calls.append(spec.name)
        if len(calls) == 1:
            raise raised()
        return original(host, spec)

    monkeypatch.setattr(EmbeddingHost, "_load_sync", interrupted_once)
    with running_server(make_test_config(home), ModelStore(home), "tiny") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=HUNG)
        try:
            with pytest.raises(openai.APIStatusError) as failed:
                client.embeddings.create(model="all-minilm", input="hi")
        except openai.APITimeoutError:
            pytest.fail(f"an embedding request hung after its model's loader raised {raised.__name__}")
        assert failed.value.status_code == 503
        error = failed.value.body
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert "all-minilm" in error["message"] and raised.__name__ in error["message"], error
        # the server still serves (the exit did not stop its IOLoop), and the retry loads the model
        reply = client.embeddings.create(model="all-minilm", input="hi")
        assert len(reply.data[0].embedding) == 384
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.usage.completion_tokens >= 1
    assert calls == ["all-minilm", "all-minilm"]


def test_a_cancelled_load_task_answers_its_waiters():
    """The load's own task cancelled (as a loop shutting down cancels every task): its waiters get a 503."""
    entered, release = threading.Event(), threading.Event()

    def held(spec):
        entered.set()
        release.wait(60)
        raise RuntimeError("never served")

    async def scenario() -> list[BaseException]:
        host = EmbeddingHost(held)
        spec = ModelSpec(name="embedder", path=Path("unused"), task="embedding")
        waiters = [asyncio.ensure_future(host.load(spec)) for _ in range(2)]
        await asyncio.to_thread(entered.wait, 60)
        (task,) = host._loads
        task.cancel()
        release.set()
        done, hung = await asyncio.wait(waiters, timeout=HUNG)
        assert not hung, "the waiters of a cancelled load hung"
        await asyncio.gather(task, return_exceptions=True)  # (it lets go of what the failed load left first)
        assert task.cancelled()
        return [w.exception() for w in waiters]

    errors = asyncio.run(scenario())
    assert all(isinstance(e, Overloaded) and "embedder" in e.message for e in errors), errors
