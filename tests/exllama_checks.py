"""Checks of an exllama backend behind the real server, shared by the GPU tests and the CPU harness.

tests/test_gpu_backends.py runs them on a GPU with random weights; tests/test_exllama_library_serving.py
runs them over the libraries' own generators with the forward taken out (tests/page_generator.py).
Each takes the openai SDK client (and the server where it reads the engine) and asserts only what
does not depend on the weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest

from tests.server_fixtures import API_KEY

#: the served model's name in both suites
MODEL = "g"
BOB_KEY = "sk-bob-exllama-test"  # a second API key: a second user with its own prefix-cache namespace
APPLE = 11977  # " apple" in SmolLM2's vocabulary (the tokenizer of both suites' models)
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
               "required": ["name", "n"], "additionalProperties": False}


class ForcedBackend:
    """The real store, with every model pinned to one backend (a test server's catalog)."""

    def __init__(self, store: Any, backend: str):
        self.store, self.backend = store, backend

    def resolve(self, name: str) -> Any:
        """The stored model, pinned to the backend."""
        return dataclasses.replace(self.store.resolve(name), backend=self.backend)

    def names(self) -> list[str]:
        """The stored models."""
        return self.store.names()


def ask(sdk: Any, content: str = "Tell me a story", **kw: Any) -> Any:
    """One chat completion of MODEL: 12 greedy tokens unless told otherwise."""
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def model_entry(server: Any) -> str:
    """The served model's /v1/models entry, as JSON text."""
    import httpx

    body = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return json.dumps(next(m for m in body["data"] if m["id"] == MODEL))


def check_greedy_is_deterministic_and_streaming_matches(sdk: Any) -> None:
    """Two greedy runs agree; the stream's pieces add up to the same text and usage."""
    # a first run puts the prompt in the prefix cache, so the compared runs all prefill the same way (a
    # full prefill and a cached one may differ in the last bits, and a random model's top two logits by
    # about as little)
    ask(sdk, max_tokens=1)
    a = ask(sdk, extra_body={"ignore_eos": True})
    b = ask(sdk, extra_body={"ignore_eos": True})
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 12
    assert a.choices[0].message.content == b.choices[0].message.content
    stream = ask(sdk, stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == a.choices[0].message.content and usage.completion_tokens == 12


def check_logit_bias_and_stop_strings(sdk: Any) -> None:
    """A +100 bias forces " apple"; a stop string inside it ends the text there."""
    r = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == " apple" * 5
    stopped = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, stop=["pp"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == " a"


def check_logprobs(sdk: Any) -> None:
    """One entry per token, each with two alternatives, best first, the greedy choice among the best."""
    r = ask(sdk, max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-3) for c in content)


def check_logprobs_are_the_models_at_any_temperature(sdk: Any) -> None:
    """The first token's alternatives are the model's distribution, whatever the sampling settings: the same
    prompt greedy and at temperature 0.5 with top-p and min-p (exllamav3's step-by-step sampler path) agree."""
    def first(**kw: Any) -> list[tuple[str, float]]:
        r = ask(sdk, "Name a fruit.", max_tokens=1, logprobs=True, top_logprobs=3, seed=1, **kw)
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content[0].top_logprobs]

    greedy = first(temperature=0)
    # exllamav3: the step-by-step sampler path (min-p with top-p), then the fused kernel (top-p alone)
    for hot in (first(temperature=0.5, top_p=0.9, extra_body={"min_p": 0.05}), first(temperature=0.5, top_p=0.9)):
        assert [t for t, _ in hot] == [t for t, _ in greedy]
        assert [p for _, p in hot] == pytest.approx([p for _, p in greedy], abs=1e-3)


def check_concurrent_requests(server: Any, *, batched: bool) -> None:
    """Six concurrent requests all complete; they shared steps when ``batched``, else ran one at a time."""
    from openai import AsyncOpenAI

    async def run() -> list[Any]:
        async with AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            calls = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"story {i}"}],
                                               max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                     for i in range(6)]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [24] * 6
    stats = server.engine.stats(MODEL)
    if batched:
        assert stats.max_batch > 1 and stats.batched_steps > 0
    else:
        assert stats.max_batch == 1  # the rest waited in the queue


def check_cancelled_stream_frees_the_job(server: Any, sdk: Any, *, max_tokens: int = 3000) -> None:
    """Closing a stream ends its job in the engine; the model still serves."""
    stream = ask(sdk, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for _ in stream:
        seen += 1
        if seen >= 3:
            break
    stream.close()
    deadline = time.time() + 15
    while time.time() < deadline and server.engine.stats(MODEL).running:
        time.sleep(0.05)
    assert server.engine.stats(MODEL).running == 0
    assert ask(sdk, max_tokens=2).usage.completion_tokens >= 1  # still serving


def check_json_schema(sdk: Any, *, supported: bool, **kw: Any) -> None:
    """A JSON schema yields a parsing object (grammar backends) or a 400 naming the parameter."""
    import openai

    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": JSON_SCHEMA, "strict": True}}
    if not supported:
        with pytest.raises(openai.BadRequestError) as err:
            ask(sdk, response_format=fmt, max_tokens=40)
        assert err.value.body["code"] == "unsupported_parameter"
        return
    r = ask(sdk, response_format=fmt, **kw)
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"name", "n"} and isinstance(data["n"], int) and len(data["name"]) <= 8


def check_prefix_reuse_never_crosses_users(server: Any) -> None:
    """Alice reuses her own prompt pages; Bob (a second API key) none of hers, then his own."""
    from openai import OpenAI

    def cached(client: Any, content: str) -> int:
        """Cached prompt tokens of one short request."""
        return ask(client, content, max_tokens=2).usage.prompt_tokens_details.cached_tokens

    secret = "Alice's private notes: the vault code is 4711 and the spare key is under the mat. " * 30
    with OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as alice, \
            OpenAI(base_url=server.base_url, api_key=BOB_KEY, max_retries=0, timeout=120) as bob:
        cached(alice, secret)
        assert cached(alice, secret) >= 256  # alice reuses her own pages
        # a probe shorter than one page (partial-page matching): nothing of alice's is reused
        assert cached(bob, secret[:200]) == 0
        assert cached(bob, secret) < 256  # at most his own probe's tokens, all within the first page
        assert cached(bob, secret) >= 256  # once bob has sent it himself, his repeat is served from the cache
    assert server.engine.stats(MODEL).running == 0
