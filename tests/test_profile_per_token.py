"""The notebook profile's inter-token latency (``itl`` table, ``itl_*`` columns) is per token, as the server's metric.

A stream chunk holds every token the server made within ``engine.stream_interval_ms`` (several on a GPU): the gaps
between chunks were the figure, so a 60 s interval gave one gap for a whole reply. The profile now asks for the
server's running token count on every chunk (``continuous_usage_stats``) and spreads each gap over its tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

import xllm_jupyter
from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.notebook import profile as profile_module
from xllm_jupyter.notebook.clients import async_client
from xllm_jupyter.notebook.streams import StreamRecord, measure_stream


def test_a_piece_of_several_tokens_counts_once_per_token():
    rec = StreamRecord(model="m", times=[0.1, 0.2, 0.5, 0.5], tokens=[1, 2, 5, 5])
    # 1 token in 0.1 s, 3 in 0.3 s, then a piece of no new token (a chunk split from the same delta): nothing
    assert rec.itl_s == pytest.approx([0.1, 0.1, 0.1, 0.1])
    # a server that sent no counts: one gap per piece, as before
    assert StreamRecord(model="m", times=[0.1, 0.2, 0.5]).itl_s == pytest.approx([0.1, 0.3])
    assert StreamRecord(model="m", times=[0.1, 0.2, 0.5], tokens=[None, None, None]).itl_s == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("interval_ms", [0, 60000])
def test_a_measured_stream_times_every_token_after_the_first(xllm_home, tiny_catalog, interval_ms):
    """Greedy, so the pieces are the same every run: the first token alone (the server sends it at once), then one
    piece per token (0 ms) or the other five together (60 s): five per-token figures either way, adding up to the
    time from the first piece to the last."""
    config = make_test_config(xllm_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    params = {"max_tokens": 6, "ignore_eos": True, "temperature": 0}
    with running_server(config, tiny_catalog, TINY) as server:
        async def measure() -> StreamRecord:
            client = async_client((server.base_url, server.api_key))
            try:
                return await measure_stream(client, [{"role": "user", "content": "Say something."}], TINY, params,
                                            token_counts=True)
            finally:
                await client.aclose()

        rec = asyncio.run(measure())
    assert rec.error is None and rec.completion_tokens == 6
    assert rec.tokens[0] == 1 and rec.tokens[-1] == 6
    assert len(rec.itl_s) == 5
    assert sum(rec.itl_s) == pytest.approx(rec.times[-1] - rec.times[0])


def test_the_profile_asks_for_token_counts(endpoint_pair, monkeypatch):
    """Every measured request of the sweep asks for the server's counts (the spy calls the real ``measure_stream``)."""
    asked = []

    async def spy(*args, **kwargs):
        rec = await measure_stream(*args, **kwargs)
        asked.append((kwargs.get("token_counts", False), rec.tokens))
        return rec

    monkeypatch.setattr(profile_module, "measure_stream", spy)
    result = xllm_jupyter.profile(TINY, concurrency=(1, 2), prompt_tokens=(16,), max_tokens=4, client=endpoint_pair,
                                  sample_interval=0.05)
    assert len(result.frame) == 3
    sweep = asked[-3:]  # (the calibration's requests come first)
    assert all(flag for flag, _ in sweep)
    assert all(None not in tokens and all(t <= 4 for t in tokens) for _, tokens in sweep)
    assert any(tokens for _, tokens in sweep)


@pytest.fixture
def endpoint_pair(xllm_server):
    return (xllm_server.base_url, xllm_server.api_key)
