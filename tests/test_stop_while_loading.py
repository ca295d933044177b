"""``xllm stop NAME`` while NAME still loads unloads it once the load ends, as ``ollama stop`` does.

The stop sends ``"wait_for_load": true`` to ``POST /admin/models/unload``. Without it (what a pull or ``xllm create``
sends: test_create_while_loading.py) an unload during a load only makes the load read its files again and answers
``unloaded: false`` at once, so the stop said "not loaded" while ``xllm ps`` showed the model loading, and the model
landed afterwards, keeping the memory the user asked to free. Loads are held on their worker thread until the stop
is waiting for them (hooks, not timings).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading

import pytest
from click.testing import CliRunner

from xllm_jupyter.cli.main import main
from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.context import XllmContext

from .fake_backend import FakeBackend, FakeCatalog, FakeEmbeddingModel
from .magic_shell import magic_shell, run, shown
from .server_fixtures import API_KEY, make_test_config
from .test_repull_while_loading import a_server, chat_held_at_load, held_load  # noqa: F401 - a fixture


class _HeldLoads(FakeBackend):
    """Loads wait for ``release`` after setting ``reading``."""

    def __init__(self) -> None:
        super().__init__()
        self.reading, self.release = threading.Event(), threading.Event()

    def load(self, spec):
        self.reading.set()
        self.release.wait(60)
        return super().load(spec)


class _Embeddings(FakeCatalog):
    def resolve(self, name):
        return dataclasses.replace(super().resolve(name), task="embedding")


class _Vectors(FakeEmbeddingModel):
    """FakeEmbeddingModel with what ``xllm ps`` reads of a loaded model."""

    name, backend_name, context_length = "fake", "fake", 8

    def details(self):
        return {}

    def memory_bytes(self):
        return 0


def _release_when_stop_waits(monkeypatch, release: threading.Event) -> None:
    """Let the held load go once the stop waits for it (old code: the stop never waits, the test fails)."""
    settle = Engine.load_settled

    async def load_settled(self, name):
        release.set()
        await settle(self, name)

    monkeypatch.setattr(Engine, "load_settled", load_settled)


def _stop_body(wait: bool = True) -> bytes:
    return json.dumps({"model": "fake", **({"wait_for_load": True} if wait else {})}).encode()


async def test_a_stop_during_a_load_unloads_the_model_once_it_is_loaded(tmp_path, monkeypatch):
    backend = _HeldLoads()
    _release_when_stop_waits(monkeypatch, backend.release)
    engine = Engine(EngineConfig(), FakeCatalog(["fake"]), [backend])
    await engine.start()
    serving = XllmContext(engine, make_test_config(tmp_path)).serving
    try:
        load = asyncio.ensure_future(engine.load_any("fake"))  # e.g. a request's, or `xllm run fake`'s
        assert await asyncio.to_thread(backend.reading.wait, 60)
        # a plain unload (a pull's or create's) still answers at once and leaves the load be
        assert (await serving.admin_unload(_stop_body(wait=False)))["unloaded"] is False
        assert (await serving.admin_unload(_stop_body()))["unloaded"] is True  # was False, before the load ended
        await asyncio.gather(load, return_exceptions=True)  # (its waiter may hear the model was unloaded: a 503)
        assert not engine.is_loaded("fake") and not engine.is_loading("fake")
        assert backend.loads == 1
    finally:
        backend.release.set()
        await engine.stop()


async def test_a_stop_during_an_embedding_models_load_unloads_it_once_it_is_loaded(tmp_path, monkeypatch):
    engine = Engine(EngineConfig(), _Embeddings(["fake"]), [FakeBackend()])
    reading, release = threading.Event(), threading.Event()
    _release_when_stop_waits(monkeypatch, release)

    def loader(spec):
        reading.set()
        release.wait(60)
        return _Vectors()

    engine._embeddings._loader = loader
    await engine.start()
    serving = XllmContext(engine, make_test_config(tmp_path)).serving
    try:
        load = asyncio.ensure_future(engine.load_any("fake"))
        assert await asyncio.to_thread(reading.wait, 60)
        assert (await serving.admin_unload(_stop_body()))["unloaded"] is True
        await load
        assert not engine.is_loaded("fake")
    finally:
        release.set()
        await engine.stop()


@pytest.mark.parametrize("front", ["xllm stop", "%xllm stop"])
def test_a_stop_during_a_load_waits_for_it_and_unloads_the_model(tmp_path, tiny_llama_dir, held_load,  # noqa: F811
                                                                 monkeypatch, front):
    read, release, _ = held_load
    _release_when_stop_waits(monkeypatch, release)
    _, server = a_server(tmp_path, tiny_llama_dir)
    with chat_held_at_load(server, read) as (info, _, asked):
        try:
            if front == "xllm stop":
                result = CliRunner().invoke(main, ["stop", "tiny", "--url", info.base_url, "--api-key", API_KEY],
                                            catch_exceptions=False)
                assert result.exit_code == 0 and "Stopped tiny" in result.stdout, result.output
            else:
                monkeypatch.setenv("XLLM_BASE_URL", info.base_url)
                monkeypatch.setenv("XLLM_API_KEY", API_KEY)
                monkeypatch.delenv("XLLM_MODEL", raising=False)
                with magic_shell() as ip:
                    cap = run(ip, "stop tiny")
                assert cap.stderr == "" and shown(cap) == "Unloaded tiny", (cap.stderr, shown(cap))
        finally:
            release.set()  # (a failure must not leave the chat's load held until the fixture's end)
        assert not info.engine.is_loaded("tiny") and not info.engine.is_loading("tiny")
        concurrent.futures.wait([asked], 300)  # (its chat answered or was cut by the unload: either is fine)
