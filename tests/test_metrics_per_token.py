"""``xllm_inter_token_latency_seconds`` is per output token, as vLLM's, however the engine groups tokens into deltas.

The engine merges the tokens made within ``engine.stream_interval_ms`` into one delta (several per delta on a GPU);
timing the gaps between stream chunks made the figure per chunk: a 60 s interval gave one gap for a whole reply.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_metrics_health_cache import scrape, value
from xllm_jupyter.core.config import CacheConfig
from xllm_jupyter.server.metrics import TokenClock

ROUTE = "/v1/chat/completions"
ITL = "xllm_inter_token_latency_seconds"


def test_a_delta_of_several_tokens_observes_its_gap_once_per_token():
    registry = CollectorRegistry()
    itl = Histogram("itl", "per token", buckets=(0.05, 0.15, 1.0), registry=registry)
    clock, arrivals = TokenClock(), {}
    clock.itl = itl
    clock.tokens(arrivals, 0, 1, 10.0)  # the first delta: no gap yet
    clock.tokens(arrivals, 1, 1, 10.1)  # another choice's first delta: its own clock
    clock.tokens(arrivals, 0, 3, 10.3)  # 3 tokens made in 0.3 s: 0.1 s each
    clock.tokens(arrivals, 1, 2, 10.2)  # 2 in 0.1 s: 0.05 s each
    got = {s.name[len("itl"):] + s.labels.get("le", ""): s.value for m in registry.collect() for s in m.samples}
    assert got["_count"] == 5
    assert got["_sum"] == pytest.approx(0.4)
    assert (got["_bucket0.05"], got["_bucket0.15"], got["_bucket1.0"]) == (2, 5, 5)


def test_an_unarmed_clock_observes_nothing():
    """Until the answer turns out to be a stream (``timed_stream`` arms it), arrivals are only noted."""
    clock, arrivals = TokenClock(), {}
    clock.tokens(arrivals, 0, 1, 1.0)
    clock.tokens(arrivals, 0, 2, 2.0)
    assert arrivals == {0: 2.0}


def _http(server: Any) -> httpx.Client:
    return httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120)


@pytest.mark.parametrize("interval_ms", [0, 60000])
def test_each_token_after_each_choices_first_is_one_observation(xllm_home, tiny_catalog, interval_ms):
    """A stream of n choices of k tokens observes n * (k - 1) inter-token latencies, whether the engine sends every
    token alone (0 ms) or a choice's first alone and the rest in one delta (60 s); a reply asked for whole observes
    none (the histogram is of streamed requests)."""
    config = make_test_config(xllm_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    body = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5,
            "ignore_eos": True, "seed": 3, "n": 2}
    with running_server(config, tiny_catalog, TINY) as server, _http(server) as http:
        before = scrape(http)
        with http.stream("POST", ROUTE, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in s.read().decode().splitlines() if line.startswith("data: {")]
        middle = scrape(http)
        assert http.post(ROUTE, json=body).status_code == 200
        after = scrape(http)
    assert events[-1]["usage"]["completion_tokens"] == 10
    count, total = value(middle, ITL + "_count", endpoint=ROUTE) - value(before, ITL + "_count", endpoint=ROUTE), \
        value(middle, ITL + "_sum", endpoint=ROUTE) - value(before, ITL + "_sum", endpoint=ROUTE)
    assert count == 2 * (5 - 1)
    duration = value(middle, "xllm_request_duration_seconds_sum", endpoint=ROUTE)
    assert 0 < total <= 2 * duration  # each choice's gaps add up to at most the request's time
    assert value(after, ITL + "_count", endpoint=ROUTE) == value(middle, ITL + "_count", endpoint=ROUTE)


def test_a_replay_from_the_response_cache_is_not_timed_as_the_models(xllm_home, tiny_catalog):
    """TTFT and the inter-token latency are the model's (as vLLM's): a stream the response cache replays answers in
    ~0 s without it, so it is counted as a request and a cache hit but in neither histogram (it was a TTFT of ~0 s
    and, per chunk, gaps of ~0 s, pulling both figures down as the hit rate rose)."""
    config = dataclasses.replace(make_test_config(xllm_home, keepalive_seconds=60), cache=CacheConfig(enabled=True, max_entries=8))
    body = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with running_server(config, tiny_catalog, TINY) as server, _http(server) as http:
        samples = [scrape(http)]
        for _ in range(2):
            with http.stream("POST", ROUTE, json=body) as s:
                assert s.status_code == 200
                s.read()
            samples.append(scrape(http))
    first, replay = [{name: value(b, name, **labels) - value(a, name, **labels)
                      for name, labels in (("xllm_time_to_first_token_seconds_count", {"endpoint": ROUTE}),
                                           (ITL + "_count", {"endpoint": ROUTE}),
                                           ("xllm_response_cache_hits_total", {}),
                                           ("xllm_requests_total", {"endpoint": ROUTE, "status": "200"}))}
                     for a, b in zip(samples, samples[1:])]
    assert list(first.values()) == [1, 4 - 1, 0, 1]
    assert list(replay.values()) == [0, 0, 1, 1]
