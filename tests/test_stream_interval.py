"""engine.stream_interval_ms: tokens made close together leave as one delta, nothing lost or reordered."""

from __future__ import annotations

import pytest

from xllm_jupyter.core.types import ChoiceDelta, FinishReason, GenerationDone, Usage
from xllm_jupyter.engine.delivery import MAX_SCALED_INTERVAL, SCALE_STREAMS, coalesce, paced_interval

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.engine.engine import Engine

from .fake_backend import FakeBackend, FakeCatalog
from .test_engine import make_engine, req


def test_coalesce_merges_each_choice_and_keeps_the_rest_in_order():
    lp = lambda t: ((t, -0.5, ()),)  # noqa: E731
    items = [
        ChoiceDelta(0, "a", (1,), lp("a")),
        ChoiceDelta(1, "x", (7,), lp("x")),
        ChoiceDelta(0, "b", (2,), lp("b")),
        ChoiceDelta(1, "y", (8,), lp("y"), FinishReason.STOP),
        ChoiceDelta(0, "c", (3,), lp("c"), FinishReason.LENGTH),
        GenerationDone(Usage(3, 5, 0)),
        "end",
    ]
    out = coalesce(items)
    assert out[0] == ChoiceDelta(0, "abc", (1, 2, 3), lp("a") + lp("b") + lp("c"), FinishReason.LENGTH)
    assert out[1] == ChoiceDelta(1, "xy", (7, 8), lp("x") + lp("y"), FinishReason.STOP)
    assert out[2:] == items[5:]
    single = [ChoiceDelta(0, "a", (1,))]
    assert coalesce(single) == single


def test_the_interval_grows_with_the_streams_past_the_scale_but_stays_bounded():
    assert paced_interval(0.016, 1) == paced_interval(0.016, SCALE_STREAMS) == 0.016
    assert paced_interval(0.016, 4 * SCALE_STREAMS) == pytest.approx(0.064)
    assert paced_interval(0.016, 1000) == MAX_SCALED_INTERVAL
    assert paced_interval(0.0, 1000) == 0.0  # 0 = per-step deltas, at any load
    assert paced_interval(0.5, 1000) == 0.5  # a configured interval above the bound is kept


async def test_many_streams_get_fewer_larger_deltas_than_one():
    # 48 sequences (3x the scale): the 30 ms interval becomes 90 ms; a lone stream keeps 30 ms
    engine = Engine(EngineConfig(max_batch_size=64, stream_interval_ms=30), FakeCatalog(["fake"]),
                    [FakeBackend(step_delay=0.005, max_batch_size=64)])
    alone = await deltas(engine, req(max_tokens=60, ignore_eos=True))
    crowd = await deltas(engine, req(max_tokens=60, ignore_eos=True, n=48))
    per_delta_alone = 60 / len(alone)
    per_delta_crowd = 60 * 48 / len(crowd)
    assert per_delta_crowd > 1.5 * per_delta_alone, (per_delta_alone, per_delta_crowd)
    await engine.stop()


async def deltas(engine, request) -> list[ChoiceDelta]:
    out = []
    async for ev in engine.generate(request):
        if isinstance(ev, ChoiceDelta):
            out.append(ev)
    return out


@pytest.mark.parametrize("n", [1, 2])
async def test_an_interval_merges_tokens_but_never_delays_the_first_or_loses_any(n):
    # 40 steps of 5 ms within a 60 ms interval: about a dozen tokens per delta
    merged_engine, _ = make_engine(step_delay=0.005, stream_interval_ms=60)
    plain_engine, _ = make_engine(step_delay=0.005, stream_interval_ms=0)
    request = req(max_tokens=40, ignore_eos=True, n=n, logprobs=True)
    merged = await deltas(merged_engine, request)
    plain = await deltas(plain_engine, request)
    for index in range(n):
        m = [d for d in merged if d.index == index]
        p = [d for d in plain if d.index == index]
        assert len(p) == 40 and all(len(d.token_ids) == 1 for d in p)  # interval 0: one delta per step
        assert len(m) < 20  # merged
        assert "".join(d.text for d in m) == "".join(d.text for d in p)
        assert sum((d.token_ids for d in m), ()) == sum((d.token_ids for d in p), ())
        assert sum((d.logprobs for d in m), ()) == sum((d.logprobs for d in p), ())
        assert [d.finish for d in m[:-1]] == [None] * (len(m) - 1) and m[-1].finish is FinishReason.LENGTH
    # the request's first delta is handed out at once, not after an interval
    assert len(merged[0].token_ids) == 1
    await merged_engine.stop()
    await plain_engine.stop()


async def test_the_end_of_a_request_flushes_what_was_held():
    engine, backend = make_engine(step_delay=0.005, stream_interval_ms=1000)
    first = await deltas(engine, req(max_tokens=6, ignore_eos=True))
    # nothing waits a whole second: the end of the request flushes what was held
    assert "".join(d.text for d in first).count("t") == 6 and first[-1].finish is FinishReason.LENGTH
    assert len(first) == 2  # the first token alone, then the other five together
    await engine.stop()


def test_openai_stream_chunks_are_not_tokens_but_carry_every_token(client):
    """Through the real server: fewer chunks than tokens, yet every token's logprob and text arrive."""
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=120, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(logprobs=True, **kwargs)
    stream = client.chat.completions.create(stream=True, logprobs=True, stream_options={"include_usage": True}, **kwargs)
    text, entries, content_chunks, usage = "", [], 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content_chunks += 1
                text += choice.delta.content
            if choice.logprobs and choice.logprobs.content:
                entries += choice.logprobs.content
    assert usage.completion_tokens == 120 == len(entries)
    assert content_chunks < 120
    assert text == full.choices[0].message.content
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in full.choices[0].logprobs.content], abs=1e-4)
