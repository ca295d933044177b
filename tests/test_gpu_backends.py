"""exllamav3 and exllamav2 behind our server, on a real GPU (``@pytest.mark.gpu``).

Skipped cleanly where CUDA or the library is absent (CI). On a GPU machine: a random-weight
Llama with real head sizes and SmolLM2's tokenizer, served by the real server and engine,
called with the openai SDK. Random weights make the text meaningless, so the tests check
what does not depend on it: lengths, finish reasons, determinism, stop handling, batching,
prefix-cache reuse, cancellation, constraints and error shapes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import time

import pytest

from tests.server_fixtures import API_KEY, make_test_config, running_server

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["exllamav3", "exllamav2"]
MODEL = "g"
BOB_KEY = "sk-bob-gpu-test"  # a second API key: a second user with its own prefix-cache namespace


class ForcedBackend:
    """The real store, with every model pinned to one backend."""

    def __init__(self, store, backend: str):
        self.store, self.backend = store, backend

    def resolve(self, name):
        return dataclasses.replace(self.store.resolve(name), backend=self.backend)

    def names(self):
        return self.store.names()


@pytest.fixture(scope="module", params=BACKENDS)
def gpu_server(request, gpu_llama_dir, tmp_path_factory):
    backend = request.param
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    from xllm_jupyter.store.store import ModelStore

    home = tmp_path_factory.mktemp(f"home-{backend}")
    store = ModelStore(home)
    store.pull(str(gpu_llama_dir), MODEL)
    config = make_test_config(home, api_keys=(API_KEY, BOB_KEY))
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, default_model=MODEL, max_batch_size=16,
                                                                    cache_tokens=16384))
    with running_server(config, ForcedBackend(store, backend), MODEL) as info:
        info.backend = backend
        yield info


@pytest.fixture()
def sdk(gpu_server):
    from openai import OpenAI

    with OpenAI(base_url=gpu_server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def ask(sdk, content="Tell me a story", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def model_entry(gpu_server) -> str:
    """The served model's /v1/models entry, as JSON text."""
    import httpx

    body = httpx.get(gpu_server.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return json.dumps(next(m for m in body["data"] if m["id"] == MODEL))


def paged(gpu_server) -> bool:
    """exllamav3 always; exllamav2 only with flash-attn (else it decodes one sequence at a time)."""
    return '"mode": "paged"' in model_entry(gpu_server)


def test_models_report_backend_and_mode(gpu_server):
    text = model_entry(gpu_server)
    assert gpu_server.backend in text
    assert '"mode": "paged"' in text if gpu_server.backend == "exllamav3" else '"mode": "' in text


def test_greedy_is_deterministic_and_streaming_matches(sdk):
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


APPLE = 11977  # " apple" in SmolLM2's vocabulary


def test_logit_bias_and_stop_strings_are_honoured(sdk):
    r = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == " apple" * 5
    stopped = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, stop=["pp"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == " a"


def test_logprobs(sdk):
    r = ask(sdk, max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)


def test_concurrent_requests_all_complete_and_batch_when_paged(gpu_server, sdk):
    from openai import AsyncOpenAI

    async def run():
        async with AsyncOpenAI(base_url=gpu_server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            calls = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"story {i}"}],
                                               max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                     for i in range(6)]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert all(r.usage.completion_tokens == 24 for r in results)
    stats = gpu_server.engine.stats(MODEL)
    if paged(gpu_server):
        assert stats.max_batch > 1 and stats.batched_steps > 0
    else:
        assert stats.max_batch >= 1


def test_prefix_cache_reuse_shows_in_usage(gpu_server, sdk):
    if not paged(gpu_server):
        pytest.skip("exllamav2 reuses prefixes in paged mode only (flash-attn)")
    prompt = "The library of Babel contains every book. " * 60  # > 2 cache pages
    ask(sdk, prompt, max_tokens=2)
    second = ask(sdk, prompt, max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens >= 256


def test_prefix_reuse_never_crosses_users(gpu_server, sdk):
    from openai import OpenAI

    if not paged(gpu_server):
        pytest.skip("exllamav2 reuses prefixes in paged mode only (flash-attn)")
    secret = "Alice's private notes: the vault code is 4711 and the spare key is under the mat. " * 30
    ask(sdk, secret, max_tokens=2)
    assert ask(sdk, secret, max_tokens=2).usage.prompt_tokens_details.cached_tokens >= 256  # alice reuses her own
    with OpenAI(base_url=gpu_server.base_url, api_key=BOB_KEY, max_retries=0, timeout=120) as bob:
        # the same text, and a probe shorter than one page (partial-page matching): nothing of alice's is reused
        assert ask(bob, secret[:200], max_tokens=2).usage.prompt_tokens_details.cached_tokens == 0
        # (at most the tokens of bob's own probe, all within the first page, are reused)
        assert ask(bob, secret, max_tokens=2).usage.prompt_tokens_details.cached_tokens < 256
        # once bob has sent it himself, his own repeat is served from the cache
        assert ask(bob, secret, max_tokens=2).usage.prompt_tokens_details.cached_tokens >= 256


def test_cancelled_stream_frees_the_job(gpu_server, sdk):
    stream = ask(sdk, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for chunk in stream:
        seen += 1
        if seen >= 3:
            break
    stream.close()
    deadline = time.time() + 15
    while time.time() < deadline and gpu_server.engine.stats(MODEL).running:
        time.sleep(0.05)
    assert gpu_server.engine.stats(MODEL).running == 0
    assert ask(sdk, max_tokens=2).usage.completion_tokens >= 1  # still serving


def test_json_schema_on_exllamav3_and_a_clear_400_on_exllamav2(gpu_server, sdk):
    import openai

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    if gpu_server.backend == "exllamav2":
        with pytest.raises(openai.BadRequestError) as err:
            ask(sdk, response_format=fmt, max_tokens=40)
        assert err.value.body["code"] == "unsupported_parameter"
        return
    r = ask(sdk, response_format=fmt, max_tokens=60, temperature=1, seed=3)
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"name", "n"} and isinstance(data["n"], int)
