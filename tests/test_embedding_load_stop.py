"""An embedding model's load is a task no request owns, as a chat model's is.

The engine stopping (SIGTERM) while an embedding model loads fails the requests waiting for it at once with the
stop's error (503 "shutting down"), and the model its thread finishes loading afterwards is unloaded, not served
by the stopped engine: the requests waited for the thread and were then served (or, past the server's drain, cut
without an answer), and the process's exit waited for them (found by benchmarks/lifecycle_races.py's SIGTERM
mid-load probe: 7 s, and an embeddings request answered by a closed connection). A first request whose client
leaves mid-load no longer fails the others waiting for the same load.

Loads are held on their worker thread with events; a hang guard (not a timing check) bounds the waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import Overloaded
from xllm_jupyter.engine.engine import Engine

from .fake_backend import FakeBackend, FakeCatalog, FakeEmbeddingModel

#: how long a test waits for what must happen at once before it calls it a hang
HANG = 30


class _Embedders(FakeCatalog):
    def resolve(self, name):
        return dataclasses.replace(super().resolve(name), task="embedding")


class _Vectors(FakeEmbeddingModel):
    def __init__(self) -> None:
        self.unloaded = threading.Event()

    def unload(self) -> None:
        self.unloaded.set()


def held_engine() -> tuple[Engine, threading.Event, threading.Event, _Vectors]:
    """An engine whose embedding load of "fake" sets ``reading`` and then waits for ``release``."""
    engine = Engine(EngineConfig(), _Embedders(), [FakeBackend()])
    reading, release, model = threading.Event(), threading.Event(), _Vectors()

    def loader(spec):
        reading.set()
        release.wait(HANG)
        return model

    engine._embeddings._loader = loader
    return engine, reading, release, model


async def test_a_stop_during_an_embedding_load_fails_its_requests_now_and_unloads_what_it_loads():
    engine, reading, release, model = held_engine()
    await engine.start()
    try:
        asked = [asyncio.ensure_future(engine.embed("fake", ["a b"])) for _ in range(2)]
        await asyncio.to_thread(reading.wait, HANG)
        await engine.stop(Overloaded("The server is shutting down; retry the request later"))
        done, _ = await asyncio.wait(asked, timeout=HANG)  # the thread still loads: they must not wait for it
        assert len(done) == 2 and not release.is_set()
        for request in asked:
            with pytest.raises(Overloaded, match="shutting down"):
                request.result()
    finally:
        release.set()
    assert await asyncio.to_thread(model.unloaded.wait, HANG)  # loaded after the stop: unloaded, never served
    assert "fake" not in engine._embeddings.slots
    with pytest.raises(Overloaded, match="shutting down"):  # and nothing loads it again
        await engine.embed("fake", ["a"])


async def test_a_restarted_engine_loads_embedding_models_again():
    engine, reading, release, model = held_engine()
    release.set()
    await engine.start()
    await engine.stop()
    await engine.start()
    try:
        assert (await engine.embed("fake", ["a b"])).vectors.tolist() == [[1.0, 0.0]]
    finally:
        await engine.stop()


async def test_the_first_embeddings_request_leaving_mid_load_does_not_fail_the_others():
    engine, reading, release, model = held_engine()
    await engine.start()
    try:
        joined = asyncio.Event()
        load = engine._embeddings.load

        async def second_joins(spec):
            if engine._embeddings.is_loading(spec.name):
                joined.set()  # (it runs on into the wait for the load under way before the test resumes)
            return await load(spec)

        engine._embeddings.load = second_joins
        first = asyncio.ensure_future(engine.embed("fake", ["a b"]))
        await asyncio.to_thread(reading.wait, HANG)  # its load is on the thread
        other = asyncio.ensure_future(engine.embed("fake", ["c d"]))
        await asyncio.wait_for(joined.wait(), HANG)
        first.cancel()  # its client left
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        assert (await asyncio.wait_for(other, HANG)).vectors.tolist() == [[1.0, 0.0]]
        assert "fake" in engine._embeddings.slots and not model.unloaded.is_set()
    finally:
        release.set()
        await engine.stop()

