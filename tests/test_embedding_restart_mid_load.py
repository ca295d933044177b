"""An engine stopped while an embedding model loaded, then started again, loads that model afresh for its next
request: the stopped load's wait (failed with the stop's 503) is not what the restarted engine's requests join,
and the model that stopped load's thread finishes with is unloaded without touching the new one."""

from __future__ import annotations

import asyncio
import threading

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.engine.engine import Engine

from .fake_backend import FakeBackend
from .test_embedding_load_stop import HANG, _Embedders, _Vectors


async def test_a_restart_after_a_stop_mid_load_loads_the_embedding_model_again():
    engine = Engine(EngineConfig(), _Embedders(), [FakeBackend()])
    reading, release = threading.Event(), threading.Event()
    models: list[_Vectors] = []

    def loader(spec):
        mine = _Vectors()
        models.append(mine)
        if len(models) == 1:  # the first load is held on its thread until the test releases it
            reading.set()
            release.wait(HANG)
        return mine

    engine._embeddings._loader = loader
    await engine.start()
    try:
        cut = asyncio.ensure_future(engine.embed("fake", ["a b"]))
        await asyncio.to_thread(reading.wait, HANG)
        await engine.stop()
        await asyncio.gather(cut, return_exceptions=True)
        await engine.start()
        # (was the stopped load's 503 "The engine was stopped", until that load's thread ended)
        assert (await asyncio.wait_for(engine.embed("fake", ["a b"]), HANG)).vectors.tolist() == [[1.0, 0.0]]
        assert len(models) == 2
        release.set()
        assert await asyncio.to_thread(models[0].unloaded.wait, HANG)  # the stopped load's model: unloaded
        # the new one serves on
        assert (await asyncio.wait_for(engine.embed("fake", ["c d"]), HANG)).vectors.tolist() == [[1.0, 0.0]]
        assert not models[1].unloaded.is_set()
    finally:
        release.set()
        await engine.stop()
