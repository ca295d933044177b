"""gpu_serving.py's inter-token latency is per token on both sides, as the server's metric.

The server sends every token made within ``engine.stream_interval_ms`` as one chunk (several on a GPU), so the
gaps between the chunks it read were the server side's figure while the raw generator's were per token: the
server/raw ITL compared unlike things. The benchmark now asks for the running token count on every chunk
(``continuous_usage_stats``, read by ``sse_load``) and counts an arrival of n tokens after a gap g as n figures of
g / n, the raw side's multi-token steps too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest

from tests.server_fixtures import RANDOM_STEPS_MS, TINY, make_test_config, random_steps, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_serving  # noqa: E402
import sse_load  # noqa: E402


def stream(times: list[tuple[float, int]]) -> dict:
    return {"start": 0.0, "first": times[0][0], "tokens": sum(n for _, n in times), "times": times}


def test_an_arrival_of_several_tokens_counts_once_per_token():
    # 1 token, 4 in 0.1 s, then 1 in 0.2 s twice: six figures, four of 25 ms
    row = gpu_serving.summarize([stream([(0.0, 1), (0.1, 4), (0.3, 1), (0.5, 1)])], 1.0)
    assert row["itl_p50_ms"] == 25.0 and row["itl_p99_ms"] == 200.0 and not row["itl_is_chunk_gap"]
    assert row["tpot_ms"] == 83.33  # 500 ms over the 6 tokens after the first
    # a server that sent no counts: one figure per chunk gap, said so
    gaps = gpu_serving.summarize([stream([(0.0, 0), (0.1, 0), (0.3, 0), (0.5, 0)])], 1.0)
    assert gaps["itl_p50_ms"] == 200.0 and gaps["itl_is_chunk_gap"]


def test_arrivals_come_from_the_running_counts():
    reads = [(0.1, 1), (0.2, 2), (0.3, 1), (0.4, 1)]
    # 1 token, then 3, then a read of text held back (no new token: its time goes to the next), then 2
    assert gpu_serving.arrivals(reads, [1, 4, 4, 6]) == [(0.1, 1), (0.2, 3), (0.4, 2)]
    assert gpu_serving.arrivals(reads, [None] * 4) == [(0.1, 0), (0.2, 0), (0.3, 0), (0.4, 0)]
    assert gpu_serving.arrivals(reads, []) == [(0.1, 0), (0.2, 0), (0.3, 0), (0.4, 0)]


@pytest.mark.parametrize("interval_ms", [0, 60000, RANDOM_STEPS_MS])
def test_the_server_side_times_every_token_after_the_first(xllm_home, tiny_catalog, interval_ms):
    """Greedy completions read by sse_load as gpu_serving's server side asks for them: one arrival per token (0 ms),
    the first token alone and the rest together (60 s) or seeded random groups (``random_steps``): one figure per
    token after the first arrival however they were grouped, adding up to the time from the first arrival to the
    last."""
    config = make_test_config(xllm_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    body = {"model": TINY, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    grouping = random_steps(seed=3) if interval_ms == RANDOM_STEPS_MS else contextlib.nullcontext()
    with grouping as chosen, running_server(config, tiny_catalog, TINY) as server:
        recs, _ = sse_load.run_level(server.root, "/v1/completions", [{**body, "prompt": f"Stream {i} says"}
                                                                     for i in range(2)], api_key=server.api_key)
    if chosen is not None:  # the random grouping reached the runner: some steps left at once, some waited
        assert True in chosen and False in chosen
    for rec in recs:
        assert rec["tokens"] == 12 and len(rec["made"]) == len(rec["times"]) and None not in rec["made"]
        times = gpu_serving.arrivals(rec["times"], rec["made"])
        assert sum(n for _, n in times) == rec["made"][-1] <= 12
        figures = gpu_serving.itl_figures(times)
        assert len(figures) == rec["made"][-1] - times[0][1] >= 1
        assert sum(figures) == pytest.approx(times[-1][0] - times[0][0])
        assert not gpu_serving.summarize([{**rec, "times": times}], 1.0)["itl_is_chunk_gap"]
