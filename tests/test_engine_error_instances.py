"""Each request the engine fails gets an error of its own, also when one cause ends many requests at once.

An exception instance raised in several requests' tasks collects every one of their tracebacks (the frames,
and what those hold, of all the requests): the server logged a 500's traceback with the other requests' frames
in it, and a removal's error, which the engine keeps until the model loads again, kept the frames of every
request it cut alive with it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from xllm_jupyter.backends.base import ModelSpec
from xllm_jupyter.core.errors import EngineError, ModelRemoved
from xllm_jupyter.engine.embeddings import EmbeddingHost

from .test_engine import collect, make_engine, req, wait_for


async def _cut(engine, cut, count=3):
    """Start ``count`` requests (10 s at least each), run ``cut()`` once all are generating; their errors, in order."""
    runs = [asyncio.ensure_future(collect(engine, req(prompt=(1, 2, i), max_tokens=200))) for i in range(count)]
    await wait_for(lambda: engine.stats("fake").running == count)
    await cut()
    return await asyncio.gather(*runs, return_exceptions=True)


async def test_requests_cut_by_a_removal_each_get_their_own_error():
    engine, _ = make_engine(step_delay=0.05)
    await engine.start()
    await engine.load("fake")
    reason = ModelRemoved("fake")
    errors = await _cut(engine, lambda: engine.unload("fake", reason))
    assert all(type(e) is ModelRemoved and str(e) == str(reason) for e in errors), errors
    assert len({id(e) for e in errors}) == len(errors) and all(e is not reason for e in errors)
    assert reason.__traceback__ is None  # the reason the engine keeps was never raised, so it holds no frames
    for e in errors:  # each holds its own request's frames only: one engine.generate in its traceback
        frames = []
        tb = e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        assert frames.count("generate") == 1, frames
    await engine.stop()


async def test_requests_failed_by_one_step_each_get_their_own_error():
    engine, backend = make_engine(step_delay=0.05)
    await engine.start()
    await engine.load("fake")

    async def fail_a_step():
        backend.models["fake"].fail_next.set()

    errors = await _cut(engine, fail_a_step)
    assert all(type(e) is EngineError for e in errors), errors
    assert len({id(e) for e in errors}) == len(errors)
    assert engine.healthy
    await engine.stop()


async def test_embedding_requests_on_a_removed_model_each_get_their_own_error():
    """Requests that got an embedding model's slot before its removal closed it: each its own copy of the reason."""

    class Embedder:
        name, dimension = "embedder", 4

        def unload(self):
            pass

    host = EmbeddingHost(lambda spec: Embedder())
    slot = await host.load(ModelSpec(name="embedder", path=Path("unused"), task="embedding"))
    reason = ModelRemoved("embedder")
    assert await host.unload("embedder", reason)
    errors = await asyncio.gather(*(host.embed(slot, ["hi"]) for _ in range(2)), return_exceptions=True)
    assert all(type(e) is ModelRemoved and str(e) == str(reason) for e in errors), errors
    assert errors[0] is not errors[1] and reason not in errors and reason.__traceback__ is None
