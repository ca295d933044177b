"""``xllm_generation_tokens_total`` counts the tokens of generations that failed mid-stream, as the engine does.

/admin/stats' ``generated_tokens`` is the engine's count (every token generated, failed
requests' included); /metrics counted only generations that finished or were closed by
their consumer, so a model unloaded under a stream made the two disagree.
"""

from __future__ import annotations

import asyncio

import pytest

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import Overloaded
from xllm_jupyter.core.types import ChoiceDelta
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.metrics import ServerMetrics

from .fake_backend import FakeBackend, FakeCatalog
from .test_engine import req


def _sample(metrics: ServerMetrics, name: str, model: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": model}) or 0.0


async def test_a_stream_failed_by_an_unload_is_counted_in_metrics_as_in_the_engine():
    backend = FakeBackend(step_delay=0.002)
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    await engine.start()
    await engine.load("fake")
    seen: list = []
    metrics = ServerMetrics(engine)
    observed = metrics.observed(engine, lambda request, usage: seen.append(usage))
    delivered, unloading = 0, []
    try:
        with pytest.raises(Overloaded):
            async for ev in observed.generate(req((1, 2, 3), max_tokens=200)):
                if isinstance(ev, ChoiceDelta):
                    delivered += len(ev.token_ids)
                    if delivered >= 5 and not unloading:
                        unloading.append(asyncio.ensure_future(engine.unload("fake")))  # the admin, under the stream
        await unloading[0]
        generated = engine.stats().tokens  # what /admin/stats reports as generated_tokens
        assert 5 <= delivered < 200 and generated == delivered
        assert _sample(metrics, "xllm_generation_tokens_total", "fake") == generated
        assert _sample(metrics, "xllm_prompt_tokens_total", "fake") == 3
        assert seen == []  # a failed request is not charged to its user (quotas, usage files)
    finally:
        await engine.stop()
