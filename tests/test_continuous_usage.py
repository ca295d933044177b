"""``stream_options.continuous_usage_stats`` (vLLM's): every chunk of a chat stream carries its choice's usage so far.

A chunk carries all the tokens the engine made within ``engine.stream_interval_ms``, so a client timing tokens (the
notebook profile's inter-token latency) needs each chunk's token count: the running ``completion_tokens`` gives it.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import CacheConfig

BODY = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5,
        "ignore_eos": True, "temperature": 0, "n": 2, "stream": True}


def _events(http: httpx.Client, **stream_options: bool) -> list[dict]:
    with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream_options": stream_options}) as s:
        assert s.status_code == 200
        return [json.loads(line[len("data: "):]) for line in s.read().decode().splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("interval_ms", [0, 60000])
def test_every_chunk_carries_its_choices_usage_so_far(xllm_home, tiny_catalog, interval_ms):
    config = dataclasses.replace(make_test_config(xllm_home, keepalive_seconds=60), cache=CacheConfig(enabled=True, max_entries=8))
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    with running_server(config, tiny_catalog, TINY) as server, \
            httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as http:
        plain = _events(http, include_usage=True)  # (cached: a later request must not get this form replayed)
        continuous = _events(http, include_usage=True, continuous_usage_stats=True)
        ignored = _events(http, continuous_usage_stats=True)  # without include_usage: no usage at all, as vLLM
    assert all(e["usage"] is None for e in plain if e["choices"])
    assert all("usage" not in e for e in ignored)
    final = continuous[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 10
    prompt = final["usage"]["prompt_tokens"]
    seen = {0: [], 1: []}
    for event in continuous[:-1]:
        usage, (choice,) = event["usage"], event["choices"]
        assert usage["prompt_tokens"] == prompt and usage["total_tokens"] == prompt + usage["completion_tokens"]
        seen[choice["index"]].append(usage["completion_tokens"])
    for counts in seen.values():
        assert counts[0] == 0  # the role chunk: nothing made yet
        assert counts == sorted(counts) and counts[-1] == 5  # (the last: the finish chunk)
    # a chunk's own tokens are the step from the choice's previous chunk: one token per step at 0 ms, and at 60 s the
    # first alone then the other four together
    steps = {i: [b - a for a, b in zip(c, c[1:]) if b > a] for i, c in seen.items()}
    assert all(sum(s) == 5 for s in steps.values())
    if interval_ms:
        assert steps == {0: [1, 4], 1: [1, 4]}


def test_legacy_completions_too(xllm_server):
    """Each prompt's choices carry their own prompt's tokens and the tokens made for them so far."""
    body = {"model": TINY, "prompt": ["Hi", "Say something longer."], "max_tokens": 3, "ignore_eos": True, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.Client(base_url=xllm_server.root, headers={"Authorization": f"Bearer {xllm_server.api_key}"}, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as s:
            assert s.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in s.read().decode().splitlines() if line.startswith("data: {")]
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    seen: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    for event in events[:-1]:
        usage, (choice,) = event["usage"], event["choices"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        seen[choice["index"]].append((usage["prompt_tokens"], usage["completion_tokens"]))
    assert seen[0][-1][1] == seen[1][-1][1] == 3
    assert seen[0][0][0] < seen[1][0][0] and sum(p for p, _ in (seen[0][0], seen[1][0])) == final["usage"]["prompt_tokens"]
    assert all(len({p for p, _ in s}) == 1 and [c for _, c in s] == sorted(c for _, c in s) for s in seen.values())
