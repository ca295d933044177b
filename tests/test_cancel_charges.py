"""A generation cancelled before its first token: charged its prompt once admitted (prefilled), nothing while queued.

The layer that charges usage (``ObservedEngine``: per-key token budgets, hub quotas, the usage file) only saw
deltas, so a request whose client left during a long prefill was free though its model had processed the prompt.
"""

from __future__ import annotations

import asyncio
import threading

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.types import Usage
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.metrics import ServerMetrics

from .fake_backend import FakeBackend, FakeCatalog
from .test_engine import req, wait_for


async def _opened(observed, request) -> tuple[asyncio.Task, list]:
    """A task iterating ``observed.generate(request)``; the list collects its events."""
    events: list = []

    async def consume():
        async for ev in observed.generate(request):
            events.append(ev)

    return asyncio.ensure_future(consume()), events


async def test_a_request_cancelled_in_its_prefill_is_charged_its_prompt_and_a_queued_one_nothing():
    backend = FakeBackend()
    engine = Engine(EngineConfig(max_batch_size=1), FakeCatalog(["fake"]), [backend])
    await engine.start()
    await engine.load("fake")
    model = backend.models["fake"]
    model.gate = gate = threading.Event()  # every step waits here: the first job's prefill never ends
    charged: list[Usage] = []
    metrics = ServerMetrics(engine)
    observed = metrics.observed(engine, lambda request, usage: charged.append(usage))
    try:
        running, running_events = await _opened(observed, req((1, 2, 3, 4, 5), max_tokens=50))
        await wait_for(lambda: model.in_step)  # admitted: its prefill step runs
        queued, queued_events = await _opened(observed, req((7, 8), max_tokens=50))
        await wait_for(lambda: engine.stats().queued == 1)  # the batch (of 1) is full: it waits
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert charged == [] and queued_events == []  # never admitted: free
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        assert running_events == []  # no token reached it
        assert charged == [Usage(5, 0)]  # its prompt, which the model processed
        assert metrics.registry.get_sample_value("xllm_prompt_tokens_total", {"model": "fake"}) == 5
    finally:
        gate.set()
        await engine.stop()
