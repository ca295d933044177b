"""A step that raises fails the requests that had just joined, not everyone's (engine/step_failures.py).

The fake backend through the engine, then the real server with the tiny Llama, whose forward
raises for one chosen prompt (a real out-of-memory cannot be produced on demand).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import EngineError, Overloaded
from xllm_jupyter.core.log_context import request_id_var
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.errors import GENERIC_500

from .fake_backend import FakeBackend, FakeCatalog
from .server_fixtures import TINY
from .test_engine import collect, req, wait_for


def expected(prompt, max_tokens):
    """The fake's tokens for a request run undisturbed."""
    return "".join(f"t{(sum(prompt) + i) % 50 + 1} " for i in range(max_tokens))


async def started_engine(resumable=True):
    backend = FakeBackend(step_delay=0.002)
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    await engine.load("fake")
    model = backend.models["fake"]
    model.resumable = resumable
    return engine, model


async def running(engine, prompt=(1, 2, 3), max_tokens=150):
    """A request generating in the background, once it has made a few tokens."""
    task = asyncio.ensure_future(collect(engine, req(prompt, max_tokens=max_tokens)))
    await wait_for(lambda: engine.stats("fake").tokens >= 3)
    return task


async def test_a_request_whose_prefill_fails_fails_alone_and_the_others_keep_their_tokens():
    engine, model = await started_engine()
    model.poison = 77
    first = await running(engine)
    with pytest.raises(EngineError) as failed:
        await collect(engine, req((77, 1), max_tokens=5, n=2))
    assert str(failed.value) == "The engine failed while starting this generation" and failed.value.status == 500
    assert failed.value.type == "server_error"  # no trace, no path: the fake's error names one
    texts, finishes, done = await first
    assert texts[0] == expected((1, 2, 3), 150) and done.usage.completion_tokens == 150  # none lost or repeated
    assert len(model.dropped) == 1 and len(model.dropped[0]) == 2  # both choices, nothing else
    stats = engine.stats("fake")
    assert (stats.failed_steps, stats.isolated_failures, stats.running) == (1, 1, 0)
    texts, _, _ = await collect(engine, req((5, 5), max_tokens=4))  # still serving
    assert texts[0] == expected((5, 5), 4) and engine.healthy
    await engine.stop()


async def test_a_prefill_out_of_memory_is_a_503_for_that_request_only():
    engine, model = await started_engine()
    model.poison = 77
    first = await running(engine)
    original = model._step

    def out_of_memory():  # a library's words for it, under the backend's own error
        try:
            return original()
        except RuntimeError:
            raise EngineError("the backend failed") from RuntimeError("CUDA error: out of memory")

    model._step = out_of_memory
    with pytest.raises(Overloaded, match="ran out of memory for this request") as failed:
        await collect(engine, req((77,), max_tokens=5))
    assert failed.value.status == 503
    texts, _, done = await first
    assert texts[0] == expected((1, 2, 3), 150) and done.usage.completion_tokens == 150
    await engine.stop()


async def test_a_step_that_fails_again_without_new_jobs_fails_everyone_once():
    engine, model = await started_engine()
    model.poison = 77
    drop = model.drop_failed
    calls = []

    def drop_then_fail_again(suspects):
        calls.append(suspects)
        dropped = drop(suspects)
        if len(calls) == 1:
            model.fail_next.set()  # the retry fails too: the running job is to blame, or the device
        return dropped

    model.drop_failed = drop_then_fail_again
    first = await running(engine)
    with pytest.raises(EngineError, match="starting this generation"):
        await collect(engine, req((77,), max_tokens=5))
    with pytest.raises(EngineError, match="failed while generating"):
        await first
    assert len(calls) == 2 and calls[1] == frozenset()  # asked once more, with no suspect: no loop
    await wait_for(lambda: engine.stats("fake").running == 0)
    stats = engine.stats("fake")
    assert (stats.failed_steps, stats.isolated_failures) == (2, 1)
    texts, _, _ = await collect(engine, req((5, 5), max_tokens=4))
    assert texts[0] == expected((5, 5), 4) and engine.healthy
    await engine.stop()


async def test_a_job_already_running_when_steps_start_failing_fails_the_batch():
    engine, model = await started_engine()
    first = await running(engine, prompt=(2, 2))
    second = asyncio.ensure_future(collect(engine, req((3, 3), max_tokens=150)))
    await wait_for(lambda: len(model.jobs) == 2)  # both past their first step
    model.fail_next.set()  # no job joined since the last good step: nobody to blame alone
    for task in (first, second):
        with pytest.raises(EngineError, match="failed while generating"):
            await task
    assert model.dropped == [] and engine.stats("fake").failed_steps == 1
    await engine.stop()


async def test_a_backend_that_cannot_resume_fails_the_batch_as_before():
    # exllama's generators: an error out of iterate() may have advanced any job, so nothing is retried
    engine, model = await started_engine(resumable=False)
    model.poison = 77
    first = await running(engine)
    with pytest.raises(EngineError, match="failed while generating"):
        await collect(engine, req((77,), max_tokens=5))
    with pytest.raises(EngineError, match="failed while generating"):
        await first
    assert model.dropped == [] and engine.stats("fake").isolated_failures == 0
    await engine.stop()


async def _as_request(rid, coro):
    """Await ``coro`` in a request's context: the id the server's edge sets for the access log and log records."""
    request_id_var.set(rid)
    return await coro


def _step_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xllm_jupyter.engine.step_failures"]


@pytest.mark.parametrize("resumable", [True, False])
async def test_the_log_lines_of_a_failed_step_name_the_requests_it_failed(caplog, resumable):
    # they carried the engine thread's request id "-" and named no request: the access log could not be matched
    caplog.set_level(logging.WARNING, logger="xllm_jupyter.engine.step_failures")
    engine, model = await started_engine(resumable)
    model.poison = 77
    first = await asyncio.ensure_future(_as_request("rid-first", running(engine)))
    with pytest.raises(EngineError):
        await asyncio.ensure_future(_as_request("rid-bad", collect(engine, req((77, 1), max_tokens=5, n=2))))
    if resumable:  # the bad request fails alone, named once (its two choices are one request)
        texts, _, _ = await first
        assert [(r.request_id, r.getMessage().count("rid-bad")) for r in _step_lines(caplog)] == [("rid-bad", 1)]
        assert "rid-first" not in caplog.text
    else:  # everyone's fails, each named
        with pytest.raises(EngineError):
            await first
        [line] = _step_lines(caplog)
        assert sorted(line.request_id.split(",")) == ["rid-bad", "rid-first"]
        assert "rid-bad" in line.getMessage() and "rid-first" in line.getMessage()
    await engine.stop()


# ------------------------------------------------------- the real server, the tiny Llama
BAD = list(range(400, 440))  # the prompt (token ids) whose prefill raises


@pytest.fixture
def failing_prefill(xllm_server, monkeypatch):
    """Make the served tiny Llama's forward raise ``error`` for the prompt BAD; decoding a little slower, so a
    stream is still running when the bad request comes."""
    import torch

    holder = {}

    def install(error: Exception):
        hf = xllm_server.engine._runners[TINY].model.model  # noqa: SLF001 - fault injection into the live model
        forward = hf.forward
        bad = torch.tensor(BAD)

        def faulty(*args, **kwargs):
            ids = kwargs["input_ids"]
            if ids.shape[1] >= len(BAD) and bool((ids[:, -len(BAD):] == bad).all(dim=1).any()):
                raise error
            if ids.shape[1] == 1:
                time.sleep(0.01)
            return forward(*args, **kwargs)

        monkeypatch.setattr(hf, "forward", faulty)
        holder["hf"] = hf

    return install


def _failed_steps(raw) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {"isolated": 0.0, "batch": 0.0}
    for family in text_string_to_metric_families(raw.get("/metrics").text):
        for s in family.samples:
            if s.name == "xllm_failed_steps_total" and s.labels["model"] == TINY:
                out[s.labels["outcome"]] = s.value
    return out


@pytest.mark.parametrize("error, status, code, message", [
    (RuntimeError("/secret/kernel.cu: device-side failure"), 500, "engine_error", GENERIC_500),  # (a 500 says no more)
    (RuntimeError("CUDA error: out of memory"), 503, "overloaded",
     "The GPU ran out of memory for this request; retry it, or shorten its prompt"),
], ids=["error", "out-of-memory"])
def test_a_prompt_that_breaks_the_prefill_fails_alone_on_the_server(client, raw, failing_prefill, error, status, code,
                                                                    message, caplog):
    caplog.set_level(logging.WARNING, logger="xllm_jupyter.engine.step_failures")
    body = dict(model=TINY, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=60, temperature=0,
                extra_body={"ignore_eos": True})
    alone = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True))
    before = _failed_steps(raw)
    failing_prefill(error)
    stream = client.chat.completions.create(**body, stream=True)
    chunks = [next(stream) for _ in range(3)]  # it runs
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": BAD, "max_tokens": 5},
                 headers={"X-Request-ID": "rid-bad-prefill"})
    assert r.status_code == status
    # the step's log line carries the request id of the access log's line (was "-", the engine thread's)
    assert [line.request_id for line in _step_lines(caplog)] == ["rid-bad-prefill"]
    assert r.json() == {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    chunks += list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == alone and chunks[-1].choices[0].finish_reason == "length"
    after = _failed_steps(raw)
    assert (after["isolated"] - before["isolated"], after["batch"] - before["batch"]) == (1, 0)
    again = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=4,
                                      extra_body={"ignore_eos": True})  # still serving
    assert again.usage.completion_tokens == 4
