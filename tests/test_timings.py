"""llama.cpp's ``timings`` on chat completions: the engine's own prompt and generation times, on a whole completion
and on a stream's last chunk, whatever the engine's stream interval (0: a delta per token; 60000: every token in one).
Real server, real SDK; the durations are only compared with each other and with the client's clock, never with a
fixed figure."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.types import GenerationTimings, Usage
from xllm_jupyter.openai.timings import timings_wire
from xllm_jupyter.store import ModelStore

KEYS = ["cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
        "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"]
MSG = [{"role": "user", "content": "Say something"}]
BODY = {"model": TINY, "messages": MSG, "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module", params=[0, 60000], ids=["interval-0", "interval-60000"])
def server(request, tmp_path_factory, tiny_llama_dir):
    """A server of "tiny" that hands out every token alone (0) or every token of a reply in one delta (60000);
    one sequence at a time, so a second request waits in the queue."""
    home = tmp_path_factory.mktemp("timings")
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    config = make_test_config(home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=request.param,
                                                                    max_batch_size=1))
    with running_server(config, store, TINY) as info:
        yield info


@pytest.fixture
def raw(server):
    with httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as c:
        yield c


def _events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _check(timings: dict, usage: dict) -> None:
    """``timings`` are llama.cpp's, and agree with ``usage`` and with each other."""
    assert list(timings) == KEYS
    assert timings["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"] and timings["prompt_n"] > 0
    assert timings["predicted_n"] == usage["completion_tokens"] == 6
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0
    assert timings["prompt_per_second"] == pytest.approx(timings["prompt_n"] * 1e3 / timings["prompt_ms"])
    assert timings["prompt_per_token_ms"] == pytest.approx(timings["prompt_ms"] / timings["prompt_n"])
    assert timings["predicted_per_second"] == pytest.approx(6e3 / timings["predicted_ms"])
    assert timings["predicted_per_token_ms"] == pytest.approx(timings["predicted_ms"] / 6)


def test_a_chat_completion_carries_the_engines_timings(server, raw):
    start = time.perf_counter()
    r = raw.post("/v1/chat/completions", json=BODY)
    wall_ms = (time.perf_counter() - start) * 1e3
    assert r.status_code == 200, r.text
    body = r.json()
    _check(body["timings"], body["usage"])
    assert body["timings"]["prompt_ms"] + body["timings"]["predicted_ms"] < wall_ms  # (inside the request's time)
    ChatCompletion.model_validate(body, strict=True)
    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0) as client:
        sdk = client.chat.completions.create(**{k: v for k, v in BODY.items() if k != "ignore_eos"},
                                             extra_body={"ignore_eos": True})
    assert list(sdk.model_extra["timings"]) == KEYS  # the SDK keeps the field


@pytest.mark.parametrize("extra", [{}, {"stream_options": {"include_usage": True}}, {"n": 2, "seed": 1}, {"store": True}],
                         ids=["no usage", "usage", "n=2", "stored"])
def test_a_streams_last_chunk_carries_them_alone(server, raw, extra):
    """On the stream's last chunk only (the usage chunk, else the last choice's finish chunk), as llama.cpp sends them;
    the other chunks are as they were, in their order."""
    chunks = _events(raw.post("/v1/chat/completions", json={**BODY, "stream": True, **extra}))
    assert ["timings" in c for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    last = chunks[-1]
    if "stream_options" in extra:
        assert last["choices"] == []
        _check(last["timings"], last["usage"])
    else:
        assert last["choices"][0]["finish_reason"] == "length"
        assert list(last["timings"]) == KEYS and last["timings"]["predicted_n"] == 6 * extra.get("n", 1)
    texts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert all(texts.values()) and len(texts) == extra.get("n", 1)


def test_the_prompts_time_leaves_out_the_wait_in_the_queue(server, raw):
    """One sequence at a time: a request sent while another makes 64 tokens waits for them all before its first
    token, and its ``prompt_ms`` is its own prefill, a small part of that wait (the client's clock counts it all)."""
    first_chunk = threading.Event()

    def long_reply():
        with httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"},
                          timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json={**BODY, "max_tokens": 64, "stream": True}) as r:
                for _ in r.iter_lines():
                    first_chunk.set()

    runner = threading.Thread(target=long_reply)
    runner.start()
    try:
        assert first_chunk.wait(120)
        start = time.perf_counter()
        r = raw.post("/v1/chat/completions", json={**BODY, "max_tokens": 1})
        waited_ms = (time.perf_counter() - start) * 1e3
    finally:
        runner.join(120)
    timings = r.json()["timings"]
    assert timings["predicted_n"] == 1 and timings["predicted_ms"] == 0 and timings["predicted_per_second"] is None
    assert timings["prompt_ms"] < waited_ms / 4, (timings, waited_ms)


def test_timings_wire_reads_as_llama_cpp_writes_them():
    assert timings_wire(None, Usage(5, 2)) is None
    assert timings_wire(GenerationTimings(0.02, 0.1), Usage(10, 5, cached_tokens=6)) == {
        "cache_n": 6, "prompt_n": 4, "prompt_ms": 20.0, "prompt_per_token_ms": 5.0, "prompt_per_second": 200.0,
        "predicted_n": 5, "predicted_ms": 100.0, "predicted_per_token_ms": 20.0, "predicted_per_second": 50.0}
    # a rate or a time per token over nothing is null, as llama.cpp's JSON writes its non-finite ones
    assert timings_wire(GenerationTimings(0.0, 0.0), Usage(3, 0, cached_tokens=3)) == {
        "cache_n": 3, "prompt_n": 0, "prompt_ms": 0.0, "prompt_per_token_ms": None, "prompt_per_second": None,
        "predicted_n": 0, "predicted_ms": 0.0, "predicted_per_token_ms": None, "predicted_per_second": None}


def test_a_legacy_completion_of_one_prompt_carries_them_too(raw):
    """/v1/completions, as llama.cpp's: a prompt's timings on the whole completion and on the stream's last chunk;
    several prompts at once run side by side, and one set of times would be none of theirs: none."""
    from openai.types import Completion

    body = {"model": TINY, "prompt": "Say something", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = raw.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    _check(whole.json()["timings"], whole.json()["usage"])
    Completion.model_validate(whole.json(), strict=True)
    for extra in ({}, {"stream_options": {"include_usage": True}}):
        chunks = _events(raw.post("/v1/completions", json={**body, "stream": True, **extra}))
        assert ["timings" in c for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1]["timings"]["predicted_n"] == 6
    several = raw.post("/v1/completions", json={**body, "prompt": ["Say", "something"]})
    assert several.status_code == 200 and "timings" not in several.json()


def test_only_the_chunk_that_may_end_the_stream_waits_for_them():
    """A choice's last chunk goes as it comes unless it ends the stream's last open choice (or is the usage chunk):
    a legacy completion's has the choice's last text, which waited for another choice's next chunk (a prompt still
    in the queue, or a reply 60 s of stream interval away)."""
    import asyncio

    from xllm_jupyter.openai.timings import Timed, with_timings

    def chunk(i: int, text: str, finish: str | None = None) -> dict:
        return {"object": "text_completion", "choices": [{"index": i, "text": text, "finish_reason": finish}]}

    def run(items: list, choices: int) -> list:
        asked: list[int] = []

        async def source():
            for k, item in enumerate(items):
                asked.append(k)
                yield item

        async def read():
            return [(out, len(asked)) async for out in with_timings(source(), choices)]

        return asyncio.run(read())

    two = [chunk(0, "a"), chunk(0, "b", "length"), chunk(1, "x"), chunk(1, "y", "length"), Timed(prompt_n=3)]
    out = run(two, 2)
    # each chunk left before the next was asked for, but the stream's last, which waited for its timings
    assert [asked for _, asked in out] == [1, 2, 3, 5]
    assert [c for c, _ in out] == [*two[:3], {**two[3], "timings": {"prompt_n": 3}}]
    usage = {"object": "text_completion", "choices": [], "usage": {"total_tokens": 5}}
    out = run([chunk(0, "a", "length"), usage, Timed(prompt_n=3)], 1)
    assert [c for c, _ in out] == [chunk(0, "a", "length"), {**usage, "timings": {"prompt_n": 3}}]
