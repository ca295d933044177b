"""``xllm_request_time_per_output_token_seconds``: each finished generation's choices, their mean time per output token
after the first, as vLLM's ``vllm:request_time_per_output_token_seconds`` (one observation per request, streamed or
not, where the inter-token latency observes every token of streams only)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import httpx
import pytest

from tests.server_fixtures import RANDOM_STEPS_MS, TINY, make_test_config, random_steps, running_server
from tests.test_metrics_health_cache import scrape, value
from xllm_jupyter.server.metrics import note_span, per_output_token

ROUTE = "/v1/chat/completions"
TPOT = "xllm_request_time_per_output_token_seconds"
ITL = "xllm_inter_token_latency_seconds"


def test_a_choice_counts_its_time_from_its_first_delta_to_its_last_over_the_tokens_after_it():
    spans: dict[int, list[float]] = {}
    note_span(spans, 0, 1, 10.0)  # the first token alone, as the engine sends it
    note_span(spans, 1, 2, 10.0)  # (a first delta of two: the second is not after it)
    note_span(spans, 0, 3, 10.3)
    note_span(spans, 0, 2, 10.5)  # 5 tokens after the first in 0.5 s
    note_span(spans, 1, 4, 10.4)  # 4 after the first delta in 0.4 s
    note_span(spans, 2, 1, 10.0)  # one token, nothing after it
    assert per_output_token(spans[0]) == pytest.approx(0.1)
    assert per_output_token(spans[1]) == pytest.approx(0.1)
    assert per_output_token(spans[2]) is None


def _delta(a: dict, b: dict, name: str) -> float:
    return value(b, name, endpoint=ROUTE) - value(a, name, endpoint=ROUTE)


@pytest.mark.parametrize("interval_ms", [0, 60000, RANDOM_STEPS_MS])
def test_each_finished_choice_is_one_observation_streamed_or_not(xllm_home, tiny_catalog, interval_ms):
    """One observation per choice of more than one token, streamed or whole, however the engine grouped the tokens
    into deltas (each alone, all after the first in one, seeded random groups); for a streamed choice it is the
    inter-token latency's sum over its count (both run from the choice's first delta to its last)."""
    config = make_test_config(xllm_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    body = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "ignore_eos": True, "seed": 3}
    grouping = random_steps(seed=5) if interval_ms == RANDOM_STEPS_MS else contextlib.nullcontext()
    with grouping, running_server(config, tiny_catalog, TINY) as server, httpx.Client(
            base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as http:
        samples = [scrape(http)]
        with http.stream("POST", ROUTE, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.read().decode().splitlines() if line.startswith("data: {")]
        samples.append(scrape(http))
        assert http.post(ROUTE, json={**body, "n": 2}).json()["usage"]["completion_tokens"] == 16
        samples.append(scrape(http))
        assert http.post(ROUTE, json={**body, "max_tokens": 1}).status_code == 200  # one token: no time after it
        samples.append(scrape(http))
    assert events[-1]["usage"]["completion_tokens"] == 8
    stream, whole, single = zip(samples, samples[1:])
    assert _delta(*stream, TPOT + "_count") == 1
    assert _delta(*stream, TPOT + "_sum") == pytest.approx(_delta(*stream, ITL + "_sum") / _delta(*stream, ITL + "_count"))
    assert 0 < _delta(*stream, TPOT + "_sum") < _delta(*stream, "xllm_request_duration_seconds_sum")
    assert _delta(*whole, TPOT + "_count") == 2 and _delta(*whole, ITL + "_count") == 0
    assert 0 < _delta(*whole, TPOT + "_sum") < 2 * _delta(*whole, "xllm_request_duration_seconds_sum")
    assert _delta(*single, TPOT + "_count") == 0
