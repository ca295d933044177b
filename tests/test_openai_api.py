"""The OpenAI-compatible API end to end: real server, real tiny Llama, the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.helpers import wait_idle
from tests.server_fixtures import TINY

MSG = [{"role": "user", "content": "Say something."}]




def sse_events(text: str) -> list:
    """The ``data:`` payloads of an SSE body (JSON-decoded, ``[DONE]`` kept as a string)."""
    out = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ------------------------------------------------------------------------- models
def test_models_list_and_retrieve(client, raw):
    ids = [m.id for m in client.models.list()]
    assert TINY in ids
    model = client.models.retrieve(TINY)
    assert model.id == TINY and model.object == "model" and model.owned_by == "xllm"
    body = raw.get("/v1/models").json()
    assert body["object"] == "list"
    entry = next(m for m in body["data"] if m["id"] == TINY)
    assert isinstance(entry["created"], int)
    assert entry["xllm"]["loaded"] is True
    assert entry["xllm"]["backend"] == "transformers"
    assert entry["xllm"]["context_length"] == 2048


def test_health_needs_no_key(xllm_server):
    r = httpx.get(xllm_server.root + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}  # no model names without a key


# ------------------------------------------------------------- chat completions
def test_chat_completion(client):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=8, seed=7)  # seeded: some text
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == TINY
    assert isinstance(r.created, int) and abs(r.created - time.time()) < 60
    assert r.system_fingerprint
    (choice,) = r.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_latest_tag_names_the_same_model(client):
    """As in Ollama, ``tiny:latest`` is ``tiny``: served (the reply names the model as asked) and retrieved."""
    r = client.chat.completions.create(model=f"{TINY}:latest", messages=MSG, max_tokens=2)
    assert r.model == f"{TINY}:latest" and r.usage.completion_tokens >= 1
    assert client.models.retrieve(f"{TINY.upper()}:latest").id == TINY


def test_chat_content_parts_and_roles(client):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again?"},
    ]
    r = client.chat.completions.create(model=TINY, messages=messages, max_completion_tokens=4)
    assert r.usage.completion_tokens <= 4
    # an assistant message's content may hold refusal parts (ChatCompletionContentPartRefusalParam): what it said
    said = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I can't help with that."}, {"role": "user", "content": "Ok"}]
    as_parts = [said[0], {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}, said[2]]
    same = [client.chat.completions.create(model=TINY, messages=m, max_tokens=1).usage.prompt_tokens for m in (said, as_parts)]
    assert same[0] == same[1]
    with pytest.raises(openai.BadRequestError) as exc:  # only the assistant refuses
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}])
    assert exc.value.body["param"] == "messages[0].content[0].type"


def test_chat_stream(client, raw):
    stream = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=6, stream=True, seed=7)  # seeded: some text
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.created == chunks[0].created for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.choices[0].delta.content is None and last.choices[0].delta.role is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text

    # the wire format itself: no usage key without include_usage, [DONE] last
    with raw.stream("POST", "/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["delta"] == {}


def test_chat_stream_include_usage(client, raw):
    # greedy: both calls below must generate the same number of tokens to compare their usage
    body = {"model": TINY, "messages": MSG, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with raw.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == []
    usage = final["usage"]
    assert usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert all(e["usage"] is None for e in events[:-2])

    chunks = list(client.chat.completions.create(**body))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == usage["completion_tokens"]


def test_chat_n2(client):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=5, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_tokens=5, n=2, seed=3, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert set(finishes) == {0, 1}
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    # the same seed gives the same choices streamed or not
    assert texts == {c.index: c.message.content for c in r.choices}


def test_seed_determinism(client):
    kw = dict(model=TINY, messages=MSG, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_string(client):
    kw = dict(model=TINY, messages=MSG, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 12
    stop = full[8:12]
    cut = full[: full.find(stop)]
    r = client.chat.completions.create(**kw, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut


def test_logprobs_shape(client):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert isinstance(entry.token, str)
        assert entry.logprob <= 0.0
        # a token that is part of a character carries its own bytes and reads "\\xe7" (as OpenAI writes it)
        assert bytes(entry.bytes).decode("utf-8", errors="backslashreplace") == entry.token
        assert len(entry.top_logprobs) == 3
        assert all(t.logprob <= 0.0 for t in entry.top_logprobs)
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_tokens=3, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed and all(len(e.top_logprobs) == 2 for e in streamed)


def test_sampling_parameters_accepted(client):
    r = client.chat.completions.create(
        model=TINY,
        messages=MSG,
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"42": 5},
        user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 4
    assert r.choices[0].finish_reason == "length"


def test_top_p_zero_is_greedy(client):
    """OpenAI takes top_p 0 (clients such as TaskWeaver default to it): only the most likely token, whatever the
    temperature and seed; it was a 400 here. The Responses API and legacy completions take it too."""
    kw = dict(model=TINY, messages=MSG, max_tokens=6, extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    for seed in (1, 2):
        r = client.chat.completions.create(top_p=0, temperature=1.5, seed=seed, **kw)
        assert r.choices[0].message.content == greedy
    assert client.responses.create(model=TINY, input="x", top_p=0, max_output_tokens=1).top_p == 0
    assert client.completions.create(model=TINY, prompt="x", top_p=0, max_tokens=1).choices[0].text is not None


def test_max_tokens_default_fills_context(client):
    probe = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi " * 2000}], max_tokens=1)
    prompt = probe.usage.prompt_tokens
    assert 2000 <= prompt < 2048
    r = client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hi " * 2000}], extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 2048 - prompt
    assert r.choices[0].finish_reason == "length"


# ----------------------------------------------------------- legacy completions
def test_completion(client, raw):
    r = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=6)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6
    default = raw.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's legacy default

    chunks = list(client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completion_n_prompts_and_logprobs(client):
    r = client.completions.create(model=TINY, prompt=["a b c", "d e f"], max_tokens=3, n=2, logprobs=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) <= 3 for t in lp.top_logprobs)  # logprobs + the sampled token, as OpenAI's
    assert lp.text_offset[0] == len("a b c")
    assert r.usage.completion_tokens <= 12

    chunks = list(client.completions.create(model=TINY, prompt=["a b c", "d e f"], max_tokens=3, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    token_prompt = client.completions.create(model=TINY, prompt=[1, 2, 3, 4], max_tokens=2)
    assert token_prompt.usage.prompt_tokens == 4


def test_completion_best_of_returns_the_best_per_token(client, raw):
    """best_of generates that many completions per prompt and returns the n with the highest log probability per
    token (OpenAI's rule), best first; usage counts every candidate. It was a 400 unless equal to n."""
    kw = dict(model=TINY, prompt="a b c", max_tokens=5, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    every = client.completions.create(n=3, logprobs=0, **kw)

    def per_token(c) -> float:
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    ranked = sorted(every.choices, key=per_token, reverse=True)
    assert per_token(ranked[0]) > per_token(ranked[-1])  # the seed gives candidates that differ
    best = client.completions.create(n=2, best_of=3, **kw)
    assert [c.index for c in best.choices] == [0, 1] and [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == every.usage.completion_tokens == 15
    # the request's own rules: n <= best_of, and not streamed when it picks
    for extra in ({"n": 3, "best_of": 2}, {"best_of": 2, "stream": True}):
        r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 1, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


# ---------------------------------------------------------- batching, disconnect
async def test_concurrent_streams_are_batched(xllm_server):
    engine = xllm_server.engine
    before = engine.stats()

    async with openai.AsyncOpenAI(base_url=xllm_server.base_url, api_key=xllm_server.api_key, max_retries=0, timeout=120) as c:

        async def one(i: int) -> str:
            stream = await c.chat.completions.create(
                model=TINY, messages=[{"role": "user", "content": f"Request {i}"}], max_tokens=24, stream=True,
                extra_body={"ignore_eos": True},
            )
            parts = []
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason
            assert finish == "length"
            return "".join(parts)

        texts = await asyncio.gather(*(one(i) for i in range(8)))
    assert len(texts) == 8 and all(texts)
    after = engine.stats()
    assert after.max_batch >= 2
    assert after.batched_steps > before.batched_steps
    assert after.completed >= before.completed + 8


def test_disconnect_cancels_generation(xllm_server):
    engine = xllm_server.engine
    assert wait_idle(engine)
    cancelled = engine.stats().cancelled
    body = {"model": TINY, "messages": MSG, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {xllm_server.api_key}"}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", xllm_server.base_url + "/chat/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got == 2:  # the role chunk and the first content chunk (the first token leaves alone)
                    break
            assert engine.stats().running == 1
    # leaving the blocks closed the connection mid-stream
    assert wait_idle(engine), engine.stats()
    assert engine.stats().cancelled > cancelled


def test_a_stream_the_client_leaves_is_charged_what_it_generated(xllm_server, raw):
    """Leaving a stream before its final usage must not make its tokens free (daily token quotas)."""

    def charged() -> tuple[int, int]:
        rows = raw.get("/admin/usage").json()["data"]
        return sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)

    engine = xllm_server.engine
    assert wait_idle(engine)
    prompt0, completion0 = charged()
    body = {"model": TINY, "messages": MSG, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    received = 0
    with raw.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                received += 1  # a content chunk carries at least one token
            if received == 1:  # the first token leaves alone; later ones may come grouped (stream_interval_ms)
                break
    assert wait_idle(engine), engine.stats()
    prompt1, completion1 = charged()
    assert prompt1 > prompt0
    assert 1 <= completion1 - completion0 < 1900


def test_disconnect_cancels_non_streaming(xllm_server):
    engine = xllm_server.engine
    assert wait_idle(engine)
    cancelled = engine.stats().cancelled
    body = {"model": TINY, "messages": MSG, "max_tokens": 1900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {xllm_server.api_key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(xllm_server.base_url + "/chat/completions", json=body, headers=headers, timeout=0.5)
    assert wait_idle(engine), engine.stats()
    assert engine.stats().cancelled > cancelled  # cancelled, not run to its end (a 3 s deadline told them apart)


# ------------------------------------------------------------------------- admin
def test_admin_models_and_reload(client, raw):
    body = raw.get("/admin/models").json()
    entry = next(m for m in body["data"] if m["id"] == TINY)
    assert entry["backend"] == "transformers"
    assert entry["memory_bytes"] > 0
    assert entry["running"] == 0 and entry["queued"] == 0
    assert entry["batch_mode"] and entry["max_batch_size"] == 8

    r = raw.post("/admin/models/unload", json={"model": TINY})
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert raw.post("/admin/models/unload", json={"model": TINY}).json()["unloaded"] is False
    assert TINY not in [m["id"] for m in raw.get("/admin/models").json()["data"]]
    assert raw.get("/v1/models/" + TINY).json()["xllm"]["loaded"] is False

    r = raw.post("/admin/models/load", json={"model": TINY})
    assert r.status_code == 200 and r.json()["xllm"]["loaded"] is True
    assert client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2).usage.completion_tokens <= 2


# ------------------------------------------------------------------------- the IOLoop
def _on_the_loop() -> bool:
    """True when called on a thread that runs an event loop (the server's IOLoop), not a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": TINY, "messages": MSG, "max_tokens": 2}),
    ("/v1/completions", {"model": TINY, "prompt": "Say", "max_tokens": 2}),
    ("/v1/embeddings", {"model": TINY, "input": "Say"}),
    ("/v1/responses", {"model": TINY, "input": "Say", "max_output_tokens": 2, "store": False}),
])
def test_a_big_body_is_parsed_on_a_worker_thread_and_a_small_one_on_the_loop(raw, monkeypatch, path, body):
    # every stream and /health share the IOLoop: a 4 MiB body of 40k messages took it 0.1-0.7 s to parse
    from xllm_jupyter.openai.embeddings import EmbeddingRequest
    from xllm_jupyter.openai.protocol import ChatCompletionRequest, CompletionRequest
    from xllm_jupyter.openai.responses import ResponsesRequest

    # the session server takes bodies up to 256 KiB, the usual threshold: a lower one here
    monkeypatch.setattr("xllm_jupyter.openai.offload.INLINE_BODY_BYTES", 4096)
    parsed: list[tuple[str, bool]] = []  # (request type, parsed on the loop), as the real parser validates
    for cls in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest):
        def check(self, _real=cls.check):
            parsed.append((type(self).__name__, _on_the_loop()))
            _real(self)
        monkeypatch.setattr(cls, "check", check)
    small = json.dumps(body)
    answers = []
    for text, on_loop in ((small, True), (small + " " * 8192, False)):  # the same request, past the threshold
        parsed.clear()
        r = raw.post(path, content=text, headers={"Content-Type": "application/json"})
        answers.append((r.status_code, r.json().get("error")))
        assert parsed[0][1] is on_loop, (len(text), parsed)  # (Responses then parses its chat body: small here)
    assert answers[0] == answers[1]  # the same answer either way
    if path != "/v1/embeddings":  # (the tiny chat model makes no embeddings: the same 4xx twice)
        assert answers[0] == (200, None)
