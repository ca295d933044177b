"""Lifecycle races on the shared engine: shutdowns, unloads and loads meeting requests already under way.

Server tests run a real standalone server (its own engine) on the real tiny Llama and talk to it with
the real ``openai`` SDK; engine tests use the deterministic fake backend. Nothing waits on a clock:
each test waits for a state (a load waiting for room, a stream running) before it acts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from xllm_jupyter.backends.memory_estimate import disk_bytes
from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import Overloaded
from xllm_jupyter.core.types import ChatMessage, GenerationParams, GenerationRequest
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.standalone import shutdown_engine
from xllm_jupyter.store.store import ModelStore

from .fake_backend import FakeBackend, FakeCatalog, FakeEmbeddingModel
from .server_fixtures import API_KEY, make_test_config, running_server
from .test_lora import _make_adapter

SHUTTING_DOWN = Overloaded("The server is shutting down; retry the request later")


@pytest.fixture(scope="module")
def two_model_home(tmp_path_factory, tiny_llama_dir):
    """A store with the tiny Llama as "tiny" and "tiny2"."""
    home = tmp_path_factory.mktemp("xllm-races")
    store = ModelStore(home)
    for name in ("tiny", "tiny2"):
        store.pull(str(tiny_llama_dir), name)
    return home


def wait_until(pred, what: str, limit: float = 60.0) -> None:
    """Poll ``pred`` (a state, not a duration: the limit only ends a hung test)."""
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.01)


def test_a_request_waiting_for_a_load_when_the_server_stops_gets_a_503_not_a_500(two_model_home, tiny_llama_dir):
    # room for one model only: a request for tiny2 waits (load_wait_seconds) while a stream keeps tiny busy
    config = make_test_config(two_model_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, memory_budget_bytes=int(disk_bytes(tiny_llama_dir) * 1.5), load_wait_seconds=600,
        idle_grace_seconds=0.1))
    with running_server(config, ModelStore(two_model_home), "tiny") as info, \
            concurrent.futures.ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        engine = info.engine
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))  # tiny is generating now
        assert first.model == "tiny"
        waiting = pool.submit(c.chat.completions.create, model="tiny2",
                              messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        wait_until(lambda: "tiny2" in engine._room_waits, "tiny2's load waiting for tiny's room")

        info.call(shutdown_engine(engine))  # what `xllm serve` does on SIGTERM, before it closes connections

        with pytest.raises(openai.APIStatusError) as caught:
            waiting.result(60)
        assert caught.value.status_code == 503  # was a 500 "server_error": the cancelled load's wait leaked out
        body = caught.value.response.json()["error"]
        assert body["code"] == "overloaded" and "shutting down" in body["message"]
        with pytest.raises(openai.APIError, match="shutting down"):  # the stream ends with the same reason
            for _ in stream:
                pass
        assert not engine.is_loaded("tiny2") and not engine.is_loading("tiny2")


def in_flight(info) -> float:
    """The server's ``xllm_requests_in_flight`` gauge (the scrape counts itself)."""
    text = httpx.get(info.root + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("xllm_requests_in_flight ")))


def test_a_load_waiting_for_room_stops_when_its_last_client_leaves(two_model_home, tiny_llama_dir):
    # it went on waiting: new requests for the busy model queued behind it, and once that model idled it was
    # unloaded for a model nobody wanted any more (its next request then loaded it back)
    config = make_test_config(two_model_home)
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, memory_budget_bytes=int(disk_bytes(tiny_llama_dir) * 1.5), load_wait_seconds=600,
        idle_grace_seconds=0.1))
    with running_server(config, ModelStore(two_model_home), "tiny") as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        engine = info.engine
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # tiny is in use
        body = json.dumps({"model": "tiny2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        port = int(info.root.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            wait_until(lambda: "tiny2" in engine._room_waits, "tiny2's load waiting for tiny's room")
        wait_until(lambda: in_flight(info) == 2, "the server handling the client's leaving")  # (the stream, the scrape)

        assert not engine.is_loading("tiny2") and not engine._held  # tiny's requests are no longer held back
        stream.close()
        wait_until(lambda: engine.stats("tiny").running == 0, "the stream's job ending")
        reply = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.model == "tiny" and engine.is_loaded("tiny") and not engine.is_loaded("tiny2")


def chat_request(model: str = "fake") -> GenerationRequest:
    return GenerationRequest(model=model, prompt_ids=(1, 2, 3), params=GenerationParams(max_tokens=3))


async def test_a_stopped_engine_loads_nothing_for_requests_already_under_way():
    # a request tokenizing when the server stops reaches generate() afterwards: it must not load the
    # model again into the stopping engine (a GPU load there held the process's exit for its whole length)
    backend = FakeBackend()
    engine = Engine(EngineConfig(), FakeCatalog(["fake", "other"]), [backend])
    await engine.start()
    await engine.load("fake")
    prompt = await engine.encode_chat("fake", [ChatMessage(role="user", content="hi")])
    await engine.stop(SHUTTING_DOWN)

    with pytest.raises(Overloaded, match="shutting down"):
        async for _ in engine.generate(dataclasses.replace(chat_request(), prompt_ids=tuple(prompt))):
            pass
    for later in (engine.load("other"), engine.load_any("fake"), engine.encode_chat("fake", [])):
        with pytest.raises(Overloaded, match="shutting down"):
            await later
    assert backend.loads == 1 and not engine.is_loaded("fake") and not engine.is_loaded("other")

    await engine.start()  # a restarted engine loads again
    async for _ in engine.generate(chat_request()):
        pass
    assert backend.loads == 2
    await engine.stop()


async def test_waiters_of_a_load_the_engine_stops_get_its_reason():
    backend = FakeBackend()
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    await engine.start()
    gate = backend.warm_up_gate = threading.Event()  # the load stays in its warm-up
    waiters = [asyncio.ensure_future(engine.load("fake")) for _ in range(3)]
    while not backend.loads:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(engine.stop(SHUTTING_DOWN))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    gate.set()
    await stopping
    assert [type(r) for r in results] == [Overloaded] * 3
    assert len({id(r) for r in results}) == 3  # each its own instance (tracebacks never chain across requests)


@pytest.mark.parametrize("call", ["encode_text", "encode_chat"])
async def test_a_model_is_not_unloaded_as_idle_while_a_request_tokenizes_its_prompt(call):
    # a long prompt tokenizes for longer than the idle grace; another user's keep_alive 0 request ending
    # meanwhile expired the model, and the reaper unloaded it under the tokenizer (then the request loaded it again)
    backend = FakeBackend()
    engine = Engine(EngineConfig(idle_grace_seconds=0), FakeCatalog(["fake"]), [backend])
    await engine.start()
    await engine.load("fake")
    model = backend.models["fake"]
    entered, release = threading.Event(), threading.Event()
    plain = model.tokenize

    def slow_tokenize(text, **kwargs):
        entered.set()
        release.wait()
        return plain(text, **kwargs)

    model.tokenize = slow_tokenize
    if call == "encode_text":
        encoding = asyncio.ensure_future(engine.encode_text("fake", "a long prompt"))
    else:
        encoding = asyncio.ensure_future(engine.encode_chat("fake", [ChatMessage(role="user", content="a long prompt")]))
    try:
        await asyncio.to_thread(entered.wait)
        other = dataclasses.replace(chat_request(), keep_alive=0.0)  # another user's: "unload it when done"
        async for _ in engine.generate(other):
            pass
        await engine._reap_expired()  # the reaper's tick while the prompt is still being tokenized
        assert engine.is_loaded("fake") and not model.unloaded
    finally:
        release.set()
    prompt = await encoding
    async for _ in engine.generate(dataclasses.replace(chat_request(), prompt_ids=tuple(prompt))):
        pass
    assert backend.loads == 1
    await engine.stop()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir):
    """A random LoRA adapter for the tiny Llama."""
    return _make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "one", seed=1)


def test_unloading_an_adapter_fails_its_requests_with_a_503_to_retry(tmp_path, tiny_llama_dir, adapter_dir):
    # its running stream ended with a 500 "server had an error" (and a logged traceback), its queued request
    # with a 404, where unloading a base model answers both with a 503 saying so (clients retry a 503)
    store = ModelStore(tmp_path)
    store.pull(str(tiny_llama_dir), "tiny")
    store.pull(str(adapter_dir), "ad-one", base="tiny")
    config = make_test_config(tmp_path)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, max_batch_size=1))
    with running_server(config, store, "tiny") as info, concurrent.futures.ThreadPoolExecutor(1) as pool, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        engine = info.engine
        stream = c.chat.completions.create(model="ad-one", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
        assert next(iter(stream)).model == "ad-one"  # attached on first use, and generating
        queued = pool.submit(c.chat.completions.create, model="ad-one", messages=[{"role": "user", "content": "hi"}],
                             max_tokens=3)
        wait_until(lambda: engine.stats("tiny").queued == 1, "the second request waiting for the batch slot")

        r = httpx.post(info.root + "/admin/models/unload", json={"model": "ad-one"},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["unloaded"] is True

        with pytest.raises(openai.APIError, match="adapter 'ad-one' was unloaded") as caught:
            for _ in stream:
                pass
        assert "retry" in caught.value.message
        with pytest.raises(openai.APIStatusError) as refused:
            queued.result(60)
        assert refused.value.status_code == 503
        assert refused.value.response.json()["error"]["code"] == "overloaded"
        wait_until(lambda: engine.stats("tiny").running == 0, "the adapter's jobs leaving the batch")
        stats = engine.stats("tiny")
        assert (stats.running, stats.queued) == (0, 0)
        reply = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, seed=7)
        assert reply.usage.completion_tokens == 2  # the base serves on


def test_a_second_ctrl_c_cuts_the_drain_but_still_saves_usage(tmp_path, xllm_home):
    # the first Ctrl-C removed the handlers, so the second raised KeyboardInterrupt wherever the loop was and
    # cancelled the rest of the shutdown: the last usage save (daily quotas) was lost
    usage = tmp_path / "usage.json"
    port = free_port()
    env = {**os.environ, "XLLM_HOME": str(xllm_home), "XLLM_CONFIG": str(tmp_path / "none.yaml"),
           "XLLM_SERVER_PORT": str(port), "XLLM_API_KEYS": API_KEY, "XLLM_SERVER_HOST": "127.0.0.1",
           "XLLM_QUOTAS_USAGE_FILE": str(usage), "OMP_NUM_THREADS": "1"}
    code = "from xllm_jupyter.core.config import load_config\nfrom xllm_jupyter.server.standalone import serve\n" \
           "serve(load_config(), ['tiny'])\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        wait_until(lambda: _ready(base), "the server serving", limit=120)
        with openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            # a request in flight through the shutdown: a 1 MB prompt tokenizes for a second or more, so the drain waits
            big = threading.Thread(target=_quietly, args=(c.chat.completions.create,), kwargs=dict(
                model="tiny", messages=[{"role": "user", "content": "word " * 200_000}], max_tokens=3), daemon=True)
            big.start()
            wait_until(lambda: _in_flight(base, headers) == 2, "the big request being handled")  # (it, the scrape)
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: any("shutting down" in line for line in lines), "the shutdown starting")
            proc.send_signal(signal.SIGINT)  # impatient: Ctrl-C again
            proc.wait(120)
        reader.join(10)
        out = "".join(lines)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
        saved = json.loads(usage.read_text())["users"]
        assert [(u["requests"], u["completion_tokens"] > 0) for u in saved.values()] == [(2, True)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/health/ready").status_code == 200
    except httpx.TransportError:
        return False


def _in_flight(base: str, headers: dict) -> float:
    text = httpx.get(base + "/metrics", headers=headers).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("xllm_requests_in_flight ")))


def _quietly(call, **kwargs) -> None:
    """``call(**kwargs)``, whatever it raises (a request the shutdown cuts)."""
    try:
        call(**kwargs)
    except Exception:  # noqa: BLE001 - its outcome is not what the test checks
        pass


async def test_a_model_unloaded_as_its_load_finishes_is_a_503_to_retry_not_a_404(monkeypatch):
    # between registering the runner and answering its waiters, a load collects (gc_freeze.tidy, a second or
    # more in a JupyterLab process); an unload then left the waiters a model that was gone: a 404 "does not exist"
    from xllm_jupyter.engine import loading

    backend = FakeBackend()
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    await engine.start()
    freezing, thawed = threading.Event(), threading.Event()

    def slow_freeze() -> None:
        if engine.is_loaded("fake"):  # (the collection after the runner is registered, not one inside the load)
            freezing.set()
            thawed.wait()

    monkeypatch.setattr(loading.gc_freeze, "tidy", slow_freeze)
    try:
        request = asyncio.ensure_future(collect(engine.generate(chat_request())))
        await asyncio.to_thread(freezing.wait)
        assert await engine.unload("fake")  # an admin's unload (or an eviction) right then
    finally:
        thawed.set()
    with pytest.raises(Overloaded, match="unloaded"):
        await request
    assert backend.models["fake"].unloaded
    await engine.stop()


async def collect(events) -> list:
    return [event async for event in events]


async def test_an_adapter_job_admitted_as_its_adapter_is_detached_gets_the_unload_503_not_a_404():
    # seen in a mixed run (/v1/responses 404 model_not_found): the job left the queue for the batch, the engine
    # retired the adapter's jobs and detached it, and only then did the backend refuse the job for its adapter
    from xllm_jupyter.core.errors import ModelNotFound
    from xllm_jupyter.engine.runner import ModelRunner

    from .fake_backend import FakeModel

    entered, detached = threading.Event(), threading.Event()

    class Detaching(FakeModel):
        def add(self, job):
            if job.adapter:
                entered.set()
                detached.wait()
                raise ModelNotFound(job.adapter)  # what the transformers backend says for a detached adapter
            super().add(job)

    runner = ModelRunner(Detaching("fake"))
    runner.start()
    await asyncio.to_thread(runner.wait_ready)
    request = dataclasses.replace(chat_request(), adapter="ad")
    try:
        handle = runner.submit(request, asyncio.get_running_loop())
        await asyncio.to_thread(entered.wait)
        runner.retire_adapter("ad", Overloaded("The adapter 'ad' was unloaded while this request ran; retry"))
    finally:
        detached.set()
    with pytest.raises(Overloaded, match="adapter 'ad' was unloaded"):
        await collect(handle)
    assert (runner.stats().running, runner.stats().queued) == (0, 0)
    await asyncio.to_thread(runner.shutdown)


async def test_an_embedding_request_whose_model_was_unloaded_after_it_got_it_is_a_503_not_a_500():
    # a request that loaded the model waits for the load's collection; a keep_alive 0 request ending meanwhile
    # lets the reaper unload it, and the first request's work then went to a shut-down executor (a RuntimeError)
    from xllm_jupyter.engine.embeddings import EmbeddingHost

    host = EmbeddingHost(loader=lambda spec: FakeEmbeddingModel())
    slot = await host.load(dataclasses.replace(FakeCatalog(["vec"]).resolve("vec"), task="embedding"))
    assert (await host.embed(slot, ["a b"])).vectors.tolist() == [[1.0, 0.0]]  # (rows of a float32 array)
    assert await host.unload("vec")  # (the reaper's unload) before the first request's embed
    with pytest.raises(Overloaded, match="unloaded"):
        await host.embed(slot, ["a b"])
