"""/metrics, /health/ready and the response cache, through real servers and real tiny models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import CacheConfig

CHAT = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6}


def _http(server: Any) -> httpx.Client:
    return httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120)


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` as ``{(name, sorted labels): value}``."""
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent (a labelled counter appears on first use)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def cached_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server of its own with the response cache on (long keepalive: no comments in streams)."""
    config = dataclasses.replace(make_test_config(xllm_home, keepalive_seconds=60), cache=CacheConfig(enabled=True, max_entries=8))
    with running_server(config, tiny_catalog, TINY) as info:
        yield info


# -------------------------------------------------------------------- metrics
def _content_chunks(sse: bytes) -> int:
    """Streamed chat chunks that carry text: what the server times (first one: TTFT, each later one: a gap)."""
    count = 0
    for line in sse.decode().splitlines():
        if line.startswith("data: {"):
            choices = json.loads(line[len("data: "):]).get("choices") or [{}]
            count += bool(choices[0].get("delta", {}).get("content"))
    return count


def test_metrics_move_as_requests_run(xllm_home, tiny_catalog):
    # A server of its own: on the session server a request another test left closing could finish
    # between the two scrapes and move the exact counts below.
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, _http(server) as http:
        before = scrape(http)
        r = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        assert r.status_code == 200
        usage = r.json()["usage"]
        # greedy, so the chunks are the same every run: sampled, the random tiny model's first token could
        # be one that decodes to no text (a byte of a split character), leaving one content chunk and no gap
        stream = {**CHAT, "stream": True, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        with http.stream("POST", "/v1/chat/completions", json=stream) as s:
            assert s.status_code == 200
            content = _content_chunks(s.read())
        assert http.post("/v1/chat/completions", json={"model": TINY}).status_code == 400
        after = scrape(http)
    route = "/v1/chat/completions"
    assert value(after, "xllm_requests_total", endpoint=route, status="200") - value(before, "xllm_requests_total", endpoint=route, status="200") == 2
    assert value(after, "xllm_requests_total", endpoint=route, status="400") - value(before, "xllm_requests_total", endpoint=route, status="400") == 1
    # the first scrape itself was counted once it finished
    assert value(after, "xllm_requests_total", endpoint="/metrics", status="200") == 1
    prompt = value(after, "xllm_prompt_tokens_total", model=TINY) - value(before, "xllm_prompt_tokens_total", model=TINY)
    generated = value(after, "xllm_generation_tokens_total", model=TINY) - value(before, "xllm_generation_tokens_total", model=TINY)
    assert prompt >= 2 * usage["prompt_tokens"]
    assert generated == usage["completion_tokens"] + 4
    # the engine sends the first token alone, then (stream_interval_ms) the rest in one or more merged deltas
    assert content >= 2
    ttft = "xllm_time_to_first_token_seconds_count"
    assert value(after, ttft, endpoint=route) - value(before, ttft, endpoint=route) == 1
    itl = "xllm_inter_token_latency_seconds_count"
    assert value(after, itl, endpoint=route) - value(before, itl, endpoint=route) == 4 - 1  # per token after the first
    e2e = "xllm_request_duration_seconds_count"
    assert value(after, e2e, endpoint=route) - value(before, e2e, endpoint=route) == 2
    # no backend reports cached prompt tokens yet: every generation is a prefix-cache miss
    misses = value(after, "xllm_prefix_cache_misses_total", model=TINY) - value(before, "xllm_prefix_cache_misses_total", model=TINY)
    assert misses == 2
    assert value(after, "xllm_requests_in_flight") == 1  # the scrape itself
    assert value(after, "xllm_requests_queued") == 0
    assert value(after, "xllm_model_memory_bytes", model=TINY) > 0
    assert value(after, "xllm_model_loads_total", model=TINY) == 1


def test_a_streamed_legacy_function_call_is_timed_as_content(xllm_home, tiny_catalog):
    """A forced legacy call streams only ``delta.function_call`` pieces: they are its generated text, so the first is
    its time to first token (they counted as nothing: no TTFT, no gaps), and each token after the first one an
    inter-token latency."""
    body = {**CHAT, "max_tokens": 40, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "function_call": {"name": "add"},
            "functions": [{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]}
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, _http(server) as http:
        before = scrape(http)
        with http.stream("POST", "/v1/chat/completions", json=body) as s:
            assert s.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in s.read().decode().splitlines() if line.startswith("data: {")]
        after = scrape(http)
    pieces = [e["choices"][0]["delta"].get("function_call") for e in events if e["choices"]]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 2 and pieces[0]["name"] == "add"
    route = "/v1/chat/completions"
    ttft, itl = "xllm_time_to_first_token_seconds_count", "xllm_inter_token_latency_seconds_count"
    assert value(after, ttft, endpoint=route) - value(before, ttft, endpoint=route) == 1
    tokens = events[-1]["usage"]["completion_tokens"]
    assert value(after, itl, endpoint=route) - value(before, itl, endpoint=route) == tokens - 1


def test_metrics_need_the_key(xllm_server):
    r = httpx.get(xllm_server.root + "/metrics", timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_servers_do_not_share_metrics(xllm_server, cached_server):
    with _http(cached_server) as http:
        before = scrape(http)
    with _http(xllm_server) as http:
        assert http.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 2}).status_code == 200
    with _http(cached_server) as http:
        after = scrape(http)
    key = ("xllm_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after.get(key) == before.get(key)


# --------------------------------------------------------------------- health
def test_ready_and_live_without_a_key(xllm_server):
    ready = httpx.get(xllm_server.root + "/health/ready", timeout=30)
    assert ready.status_code == 200
    # no model names without a key (what is loaded is for clients with one: /v1/models)
    assert ready.json() == {"status": "ready"}
    live = httpx.get(xllm_server.root + "/health", timeout=30)
    assert live.status_code == 200 and live.json() == {"status": "ok"}


def test_ready_turns_503_when_an_engine_thread_dies(xllm_home, tiny_catalog):
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server:
        url = server.root + "/health/ready"
        assert httpx.get(url, timeout=30).status_code == 200
        server.engine._runners[TINY].shutdown()  # the step thread ends, the runner stays registered
        r = httpx.get(url, timeout=30)
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "not_ready" and "died" in err["message"]
        assert httpx.get(server.root + "/health", timeout=30).status_code == 503
        # the server still answers everything else
        with _http(server) as http:
            assert http.get("/v1/models").status_code == 200


# ------------------------------------------------------------- response cache
def _cache_counts(http: httpx.Client) -> tuple[float, float]:
    s = scrape(http)
    return value(s, "xllm_response_cache_hits_total"), value(s, "xllm_response_cache_misses_total")


def test_cache_hit_returns_the_identical_body(cached_server):
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": "cache me (full)"}]}
    with _http(cached_server) as http:
        hits, misses = _cache_counts(http)
        first = http.post("/v1/chat/completions", json=body)
        # who asks and the hints to api.openai.com's prompt cache change nothing in the answer: the same entry
        hints = {"user": "someone-else", "prompt_cache_key": "conv-7", "prompt_cache_retention": "24h", "safety_identifier": "h",
                 "prompt_cache_options": {"ttl": "30m"}}
        second = http.post("/v1/chat/completions", json={**body, **hints})
        assert first.status_code == second.status_code == 200
        assert second.content == first.content  # id and created included
        assert _cache_counts(http) == (hits + 1, misses + 1)
        # another request (different max_tokens) is a miss of its own
        third = http.post("/v1/chat/completions", json={**body, "max_tokens": 3})
        assert third.json()["id"] != first.json()["id"]
        assert _cache_counts(http) == (hits + 1, misses + 2)


def test_cache_hit_replays_the_identical_sse_stream(cached_server):
    body = {**CHAT, "seed": 7, "temperature": 0.9, "stream": True, "stream_options": {"include_usage": True}}
    body["messages"] = [{"role": "user", "content": "cache me (stream)"}]

    def stream_bytes(http: httpx.Client) -> bytes:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            return r.read()

    with _http(cached_server) as http:
        hits, _ = _cache_counts(http)
        first = stream_bytes(http)
        second = stream_bytes(http)
        assert _cache_counts(http)[0] == hits + 1
    assert second == first
    assert first.endswith(b"data: [DONE]\n\n") and b'"usage":{"prompt_tokens"' in first
    # the same request without usage is another form: generated, not cut from the cached one
    with _http(cached_server) as http:
        hits, _ = _cache_counts(http)
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream_options": None}) as r:
            plain = r.read()
        assert _cache_counts(http)[0] == hits
    assert b'"usage"' not in plain


def test_completions_are_cached_too(cached_server):
    body = {"model": TINY, "prompt": "Once upon", "max_tokens": 4, "temperature": 0}
    with _http(cached_server) as http:
        hits, _ = _cache_counts(http)
        first = http.post("/v1/completions", json=body)
        second = http.post("/v1/completions", json=body)
        assert second.content == first.content
        assert _cache_counts(http)[0] == hits + 1


def test_the_cache_is_bounded_in_bytes_and_keeps_no_huge_response():
    """By count alone one user could pin gigabytes: a 130-byte request with n=4 and top_logprobs=20 answers ~14 MB."""
    from xllm_jupyter.openai.cache import ResponseCache

    budget = 64 * 2**20  # cache.MAX_BYTES
    cache = ResponseCache(CacheConfig(enabled=True))

    async def model_identity(name: str) -> str:
        return "weights"

    async def fill() -> None:
        for i in range(40):
            async def answer(body: bytes, i: int = i) -> dict:
                return {"id": f"chatcmpl-{i}", "pad": "x" * (3 * 2**20)}

            await cache.serve("chat", f'{{"model": "m", "seed": {i}}}'.encode(), answer, model_identity)

        async def huge(body: bytes) -> dict:
            return {"pad": "x" * (budget // 2)}

        await cache.serve("chat", b'{"model": "m", "seed": 99}', huge, model_identity)

    asyncio.run(fill())
    held = [len(form) for entry in cache._entries.values() for form in entry.values()]
    assert 0 < len(held) < 40 and sum(held) <= budget and max(held) < budget // 4


def test_the_cache_parses_and_hashes_a_big_body_off_the_loop(monkeypatch):
    """The cache reads every deterministic body: a big one must not stall the IOLoop (see offload.py)."""
    from xllm_jupyter.openai.cache import ResponseCache

    monkeypatch.setattr("xllm_jupyter.openai.offload.INLINE_BODY_BYTES", 1024)
    on_loop: list[bool] = []
    real_key = ResponseCache.key

    def key(self, *args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread
            on_loop.append(False)
        return real_key(self, *args)

    monkeypatch.setattr(ResponseCache, "key", key)
    cache = ResponseCache(CacheConfig(enabled=True))

    async def model_identity(name: str) -> str:
        return "weights"

    async def answer(body: bytes) -> dict:
        return {"id": "chatcmpl-1"}

    async def serve_both() -> list:
        small = b'{"model": "m", "seed": 1}'
        return [await cache.serve("chat", body, answer, model_identity) for body in (small, small + b" " * 2048)]

    assert asyncio.run(serve_both()) == [{"id": "chatcmpl-1"}] * 2  # the big body is the same request: a hit
    assert on_loop == [True, False] and cache.hits == 1


def test_sampled_requests_are_never_cached(cached_server):
    body = {**CHAT, "temperature": 0.8, "messages": [{"role": "user", "content": "do not cache me"}]}
    with _http(cached_server) as http:
        hits, misses = _cache_counts(http)
        a = http.post("/v1/chat/completions", json=body).json()
        b = http.post("/v1/chat/completions", json=body).json()
        assert a["id"] != b["id"]
        assert _cache_counts(http) == (hits, misses)


def test_not_ready_before_the_engine_starts(xllm_home, tiny_catalog):
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.ops import readiness

    engine = Engine(make_test_config(xllm_home).engine, catalog=tiny_catalog)  # built, never started
    assert readiness(engine, (TINY,)) == "The engine is starting."


def test_json_nested_past_the_parsers_depth_is_a_400_not_a_500(cached_server):
    """Bodies the response cache or the pull route parse with ``json`` (and tool-call arguments in the history)
    may nest deeper than the parser recurses: a client error, never a 500 with a traceback in the log."""
    deep = "[" * 50_000 + "]" * 50_000
    with _http(cached_server) as http:
        for path in ("/v1/chat/completions", "/v1/completions", "/admin/models/pull"):
            r = http.post(path, content=deep.encode())
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (path, r.text[:200])
        history = [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = http.post("/v1/chat/completions", json={"model": TINY, "messages": history, "tools": tools,
                                                     "max_tokens": 2, "temperature": 0})
        assert r.status_code in (200, 400), r.text[:200]
    from xllm_jupyter.openai.tool_parser import parse_tool_calls

    assert parse_tool_calls(deep, {"f"}).calls == ()  # model output nested as deep is text, not a crash


def test_not_ready_while_a_startup_model_named_in_capitals_loads(xllm_home, tiny_catalog):
    """The config may spell the default model as it likes; the engine keeps one canonical spelling."""
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.ops import readiness

    async def main() -> tuple[str | None, str | None]:
        engine = Engine(make_test_config(xllm_home).engine, catalog=tiny_catalog)
        await engine.start()
        try:
            load = asyncio.ensure_future(engine.load(TINY.upper()))
            await asyncio.sleep(0)  # the load has registered itself and gone to its thread
            during = readiness(engine, (TINY.upper(),))
            await load
            return during, readiness(engine, (TINY.upper(),))
        finally:
            await engine.stop()

    during, after = asyncio.run(main())
    assert during == f"Still loading {TINY.upper()}." and after is None
