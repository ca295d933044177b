"""Our exllama backends behind the real server, over the libraries' own generators, without a GPU.

tests/page_generator.py takes only the model's forward out of exllamav3's and exllamav2's
generators; every running job "samples" one fixed token (exllamav2: from logits that favour
it, through the library's own sampler). So this checks what tests/test_gpu_backends.py checks
that does not depend on the forward: /v1/models details, lengths and finish reasons,
streaming = non-streaming, batching, cancellation freeing the library's pages, and (exllamav2,
whose sampler runs on CPU) logit_bias, stop strings and logprobs through the real sampler.
exllamav3's sampler is CUDA-only: those checks are the GPU test's. Skipped where a library
does not import without a GPU (CI); ``benchmarks/gpu/cpu_check.sh`` runs it here.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.page_generator import KINDS, cpu_pages_server, require_kind
from tests.server_fixtures import API_KEY

pytestmark = pytest.mark.exllama

MODEL = "m"
APPLE = 11977  # " apple" in SmolLM2's vocabulary (the tiny Llama's tokenizer)


@pytest.fixture(scope="module", params=KINDS)
def server(request, tiny_llama_dir, tmp_path_factory):
    require_kind(request.param)
    home = tmp_path_factory.mktemp(f"serve-{request.param}")
    with cpu_pages_server(request.param, tiny_llama_dir, home, MODEL, (API_KEY,)) as info:
        yield info


@pytest.fixture()
def sdk(server):
    from openai import OpenAI

    with OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def ask(sdk, content="Tell me a story", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_report_backend_mode_and_prefix_cache(server):
    import httpx

    body = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    entry = json.dumps(next(m for m in body["data"] if m["id"] == MODEL))
    backend, _, mode = server.kind.partition("-")
    assert f'"backend": "{backend}"' in entry
    assert f'"mode": "{mode or "paged"}"' in entry
    assert '"scope": "per cache namespace"' in entry


def test_lengths_finish_reasons_and_streaming_match(sdk):
    a = ask(sdk, extra_body={"ignore_eos": True})
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 12
    assert a.usage.prompt_tokens > 0 and a.choices[0].message.content
    stream = ask(sdk, stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == a.choices[0].message.content and usage.completion_tokens == 12


def test_concurrent_requests_all_complete_and_batch_when_paged(server):
    from openai import AsyncOpenAI

    async def run():
        async with AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
            calls = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"story {i}"}],
                                               max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                     for i in range(6)]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [24] * 6
    stats = server.engine.stats(MODEL)
    if server.kind == "exllamav2-unpaged":
        assert stats.max_batch == 1  # one sequence at a time; the rest waited in the queue
    else:
        assert stats.max_batch > 1 and stats.batched_steps > 0


def test_cancelled_stream_frees_the_job(server, sdk):
    stream = ask(sdk, max_tokens=1500, stream=True, extra_body={"ignore_eos": True})
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
    assert ask(sdk, max_tokens=2).usage.completion_tokens == 2  # still serving


def v2_only(server):
    if server.kind == "exllamav3":
        pytest.skip("exllamav3's sampler is CUDA-only (tests/test_gpu_backends.py checks it on a GPU)")


def test_logit_bias_and_stop_strings_go_through_the_real_sampler(server, sdk):
    v2_only(server)
    r = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == " apple" * 5
    stopped = ask(sdk, max_tokens=5, logit_bias={str(APPLE): 100}, stop=["pp"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == " a"


def test_logprobs_come_from_the_samplers_probabilities(server, sdk):
    v2_only(server)
    r = ask(sdk, max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    # the stand-in logits put all the probability on one token
    assert all(c.logprob > -1e-3 and len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_constrained_output_is_a_clear_400_on_exllamav2(server, sdk):
    import openai

    v2_only(server)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert err.value.body["code"] == "unsupported_parameter"
