"""A model re-pulled or removed while it loads: the load's old files must not end up serving.

The load is held on its worker thread (after the backend read the old files) while the store changes, then let
go: nothing waits on a clock. Server tests run a real standalone server on real tiny Llamas (two seeds, so the
weights tell which files were loaded) with the real ``openai`` SDK; the engine test uses the fake backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import threading

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.types import CatalogFacts
from xllm_jupyter.engine import loading
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.store.store import ModelStore

from .fake_backend import FakeBackend, FakeCatalog, FakeEmbeddingModel
from .models import build_tiny_llama
from .server_fixtures import API_KEY, make_test_config, running_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    """A tiny Llama like ``tiny_llama_dir`` with other random weights (seed 1)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)


@pytest.fixture
def held_load(monkeypatch):
    """Holds the first load of "tiny" on its worker thread once the backend has read its files.

    Yields ``(read, release, digests)``: ``read`` is set while it is held, ``release`` lets it go, ``digests``
    lists the manifest digest of every "tiny" load, in order.
    """
    read, release, digests = threading.Event(), threading.Event(), []
    original = loading._load_and_prepare

    def held(backend, spec):
        model = original(backend, spec)
        if spec.name == "tiny":
            digests.append(spec.digest)
            if len(digests) == 1:
                read.set()
                release.wait(300)
        return model

    monkeypatch.setattr(loading, "_load_and_prepare", held)
    yield read, release, digests
    release.set()


def a_server(tmp_path, tiny_llama_dir):
    """A store with the tiny Llama as "tiny" and "spare", and a server with only "spare" loaded."""
    home = tmp_path / "home"
    store = ModelStore(home)
    for name in ("tiny", "spare"):
        store.pull(str(tiny_llama_dir), name)
    return store, running_server(make_test_config(home), ModelStore(home), "spare")


@contextlib.contextmanager
def chat_held_at_load(server, read: threading.Event):
    """Start ``server``; yield (info, client, asked) once a chat for tiny, sent on a thread, has its load held."""
    with server as info, concurrent.futures.ThreadPoolExecutor(1) as pool, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        asked = pool.submit(c.chat.completions.create, model="tiny", messages=HI, max_tokens=3)
        assert read.wait(300), "the load of tiny never read its files"
        yield info, c, asked


def embeddings(engine) -> torch.Tensor:
    """The input embeddings of the "tiny" the engine has loaded."""
    return engine._runners["tiny"].model.model.get_input_embeddings().weight.detach()


def pull(root: str, source, name: str) -> dict:
    """``POST /admin/models/pull`` with ``force``; its success event."""
    r = httpx.post(root + "/admin/models/pull", json={"model": str(source), "name": name, "force": True},
                   headers=HEADERS, timeout=300)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["status"] == "success", events
    return events[-1]


def test_a_forced_repull_while_the_model_loads_serves_the_new_weights(tmp_path, tiny_llama_dir, other_llama_dir,
                                                                     held_load):
    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    old = store.show("tiny").digest
    with chat_held_at_load(server, read) as (info, c, asked):

        new = pull(info.root, other_llama_dir, "tiny")["digest"]  # `xllm pull --force` against the server
        assert new != old
        release.set()

        reply = asked.result(300)
        assert reply.model == "tiny" and reply.choices[0].message.content is not None
        # the old weights were read first; the load was redone from the new files
        assert digests == [old, new]
        assert torch.equal(embeddings(info.engine), load_file(other_llama_dir / "model.safetensors")
                           ["model.embed_tokens.weight"])
        listed = {m.id: m for m in c.models.list().data}
        assert listed["tiny"].model_extra["xllm"]["digest"] == new  # what /v1/models says is what serves
        again = c.chat.completions.create(model="tiny", messages=HI, max_tokens=3)
        assert again.model == "tiny"
        assert digests == [old, new]  # no third load: the new weights stay


def test_a_model_removed_while_it_loads_is_not_left_loaded(tmp_path, tiny_llama_dir, held_load):
    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    with chat_held_at_load(server, read) as (info, c, asked):

        store.rm("tiny")  # `xllm rm tiny` (its unload, asked before, found nothing loaded yet)
        release.set()

        with pytest.raises(openai.NotFoundError) as caught:  # was a 200 from the removed model's weights
            asked.result(300)
        assert caught.value.response.json()["error"]["code"] == "model_not_found"
        assert not info.engine.is_loaded("tiny") and not info.engine.is_loading("tiny")
        assert "tiny" not in [m.id for m in c.models.list().data]
        assert len(digests) == 1


class _Store(FakeCatalog):
    """A fake catalog whose model has a digest that a test changes (a re-pull), with its reads held on demand."""

    def __init__(self):
        super().__init__(["fake"])
        self.digest = "sha256:old"
        self.hold: threading.Event | None = None  # set: the next facts() read waits for it after it read
        self.reading = threading.Event()

    def resolve(self, name):
        spec = super().resolve(name)
        return dataclasses.replace(spec, digest=self.digest)

    def facts(self, name):
        digest, hold = self.digest, self.hold
        if hold is not None:
            self.hold = None
            self.reading.set()
            hold.wait(60)
        return CatalogFacts(task="chat", digest=digest)


class _RecordingBackend(FakeBackend):
    def __init__(self):
        super().__init__()
        self.digests: list[str | None] = []

    def load(self, spec):
        self.digests.append(spec.digest)
        return super().load(spec)


async def test_a_repull_landing_as_the_load_rereads_its_manifest_is_not_missed():
    # the narrowest window: the load re-reads the manifest (old), the pull renames the new files in and asks for
    # the unload (nothing is registered yet), then the load resumes: it must read again, not register
    catalog, backend = _Store(), _RecordingBackend()
    engine = Engine(EngineConfig(), catalog, [backend])
    await engine.start()
    released = threading.Event()
    catalog.hold = released
    try:
        load = asyncio.ensure_future(engine.load("fake"))
        await asyncio.to_thread(catalog.reading.wait, 60)  # the re-read has the old digest in hand
        catalog.digest = "sha256:new"  # the pull's rename
        assert not await engine.unload("fake")  # the pull's unload: nothing loaded yet
    finally:
        released.set()
    await load
    assert backend.digests == ["sha256:old", "sha256:new"]
    assert engine.is_loaded("fake") and backend.models["fake"].unloaded is False
    await engine.stop()


def test_xllm_rm_unloads_a_load_that_finished_between_its_unload_and_the_removal(tmp_path, tiny_llama_dir,
                                                                                 held_load, monkeypatch):
    # `xllm rm` asked the server to unload first (nothing loaded yet), the load then finished with the files
    # still there, then the files went: the removed model stayed loaded
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    with chat_held_at_load(server, read) as (info, c, asked):
        remove = ModelStore.rm

        def load_finishing_first(self, name, **how):  # the CLI's unload has been answered: the load ends now
            release.set()
            assert asked.result(300).model == "tiny"
            return remove(self, name, **how)

        monkeypatch.setattr(ModelStore, "rm", load_finishing_first)
        result = CliRunner().invoke(main, ["rm", "tiny", "-y", "--url", info.base_url, "--api-key", API_KEY],
                                    catch_exceptions=False)
        assert result.exit_code == 0 and "Removed tiny" in result.stdout, result.output
        assert result.stderr == ""
        assert not info.engine.is_loaded("tiny")  # was still loaded, from files no longer in the store
        assert "tiny" not in [m.id for m in c.models.list().data]
        assert len(digests) == 1


class _Vectors(FakeEmbeddingModel):
    """FakeEmbeddingModel that remembers the digest of the files it was loaded from."""

    def __init__(self, spec):
        self.name, self.digest = spec.name, spec.digest


class _EmbeddingStore(_Store):
    def resolve(self, name):
        return dataclasses.replace(super().resolve(name), task="embedding")

    def facts(self, name):
        return CatalogFacts(task="embedding", digest=self.digest if name in self._names else None)


@pytest.mark.parametrize("change", ["repull", "rm"])
async def test_an_embedding_model_changed_while_it_loads_does_not_serve_its_old_files(change):
    from xllm_jupyter.core.errors import ModelNotFound

    catalog = _EmbeddingStore()
    engine = Engine(EngineConfig(), catalog, [FakeBackend()])
    reading, release, digests = threading.Event(), threading.Event(), []

    def loader(spec):
        digests.append(spec.digest)
        if len(digests) == 1:
            reading.set()
            release.wait(60)
        return _Vectors(spec)

    engine._embeddings._loader = loader
    await engine.start()
    try:
        asked = asyncio.ensure_future(engine.embed("fake", ["a b"]))
        await asyncio.to_thread(reading.wait, 60)  # the old files are being read
        if change == "repull":
            catalog.digest = "sha256:new"
        else:
            catalog._names.remove("fake")
        assert not await engine.unload("fake")  # what the pull or rm asks for: nothing is loaded yet
    finally:
        release.set()
    if change == "repull":
        assert (await asked).vectors.tolist() == [[1.0, 0.0]]  # (rows of a float32 array)
        assert digests == ["sha256:old", "sha256:new"]
        assert engine._embeddings.slots["fake"].model.digest == "sha256:new"  # was the old files' model
    else:
        with pytest.raises(ModelNotFound):  # was answered by the removed model, which stayed loaded
            await asked
        assert not engine.is_loaded("fake") and digests == ["sha256:old"]
    await engine.stop()


class _HeldStore(ModelStore):
    """A ModelStore whose next manifest read of "tiny", once ``hold`` is set, waits on it after it read."""

    def __init__(self, home):
        super().__init__(home)
        self.hold: threading.Event | None = None
        self.reading = threading.Event()

    def facts(self, name):
        found, hold = super().facts(name), self.hold
        if hold is not None and name == "tiny":
            self.hold = None
            self.reading.set()
            hold.wait(300)
        return found


def test_xllm_rms_unload_after_the_removal_reaches_a_load_rereading_its_manifest(tmp_path, tiny_llama_dir,
                                                                                 held_load):
    # the load re-reads its manifest (the old digest in hand), then `xllm rm` removes the files and asks for the
    # unload: the server answered 404 (no longer stored) without telling the engine, and the load registered the
    # removed model
    read, release, digests = held_load
    home = tmp_path / "home"
    store = ModelStore(home)
    for name in ("tiny", "spare"):
        store.pull(str(tiny_llama_dir), name)
    catalog = _HeldStore(home)
    with chat_held_at_load(running_server(make_test_config(home), catalog, "spare"), read) as (info, c, asked):
        checked = threading.Event()
        catalog.hold = checked  # the next read of tiny's manifest: the load's check once its files are loaded
        release.set()
        try:
            assert catalog.reading.wait(300), "the load never read its manifest again"
            store.rm("tiny")
            r = httpx.post(info.root + "/admin/models/unload", json={"model": "tiny"}, headers=HEADERS, timeout=300)
            assert r.status_code == 200, r.text  # was a 404 that never reached the engine
            assert r.json() == {"id": "tiny", "object": "model", "unloaded": False}
        finally:
            checked.set()

        with pytest.raises(openai.NotFoundError) as caught:  # was a 200 from the removed model's weights
            asked.result(300)
        assert caught.value.response.json()["error"]["code"] == "model_not_found"
        assert not info.engine.is_loaded("tiny") and not info.engine.is_loading("tiny")
        assert len(digests) == 1
        # a name neither loaded, loading nor stored is still a 404
        r = httpx.post(info.root + "/admin/models/unload", json={"model": "tiny"}, headers=HEADERS, timeout=300)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


@pytest.fixture(params=["backend-load", "backend-choice"])
def held_before_read(request, monkeypatch):
    """Holds the first load of "tiny" on its worker thread before the backend reads a file (or before a backend is
    chosen for it, which looks at its files too); ``(holding, release)``."""
    holding, release, seen = threading.Event(), threading.Event(), []

    def hold(spec):
        if spec.name == "tiny":
            seen.append(spec.digest)
            if len(seen) == 1:
                holding.set()
                release.wait(300)

    if request.param == "backend-load":
        original = loading._load_and_prepare
        monkeypatch.setattr(loading, "_load_and_prepare", lambda backend, spec: (hold(spec), original(backend, spec))[1])
    else:
        choose = loading.LoadingMixin._choose_backend_once
        monkeypatch.setattr(loading.LoadingMixin, "_choose_backend_once", lambda self, spec: (hold(spec), choose(self, spec))[1])
    yield holding, release
    release.set()


class _SecondResolveHeld(ModelStore):
    """A ModelStore whose second resolve of "tiny" (a load trying again) waits for ``go`` once it started."""

    def __init__(self, home):
        super().__init__(home)
        self.resolves, self.resolving, self.go = 0, threading.Event(), threading.Event()

    def resolve(self, name):
        if name == "tiny":
            self.resolves += 1
            if self.resolves == 2:
                self.resolving.set()
                self.go.wait(300)
        return super().resolve(name)


@pytest.mark.parametrize("then_pull", [False, True], ids=["removed", "removed-and-pulled-again"])
def test_a_load_whose_files_are_removed_under_it_is_a_404_or_a_reload_not_a_500(tmp_path, tiny_llama_dir,
                                                                                held_before_read, then_pull):
    # found by a chaos run (DELETE and pull of a model while users chat with it): the load's backend opened a
    # directory DELETE had just taken away, and its chat got a 500 (or a 400) saying its files are damaged
    holding, release = held_before_read
    home = tmp_path / "home"
    for name in ("tiny", "spare"):
        ModelStore(home).pull(str(tiny_llama_dir), name)
    catalog = _SecondResolveHeld(home)
    with chat_held_at_load(running_server(make_test_config(home), catalog, "spare"), holding) as (info, c, asked):
        c.models.delete("tiny")  # DELETE /v1/models/tiny: the load, not registered yet, is told
        release.set()  # the backend reads a directory that is gone
        if then_pull:
            # the same files back (the same digest) before the load tries again: it must serve them
            wait_for = concurrent.futures.wait([asked, pool_of(catalog.resolving)], timeout=300,
                                               return_when=concurrent.futures.FIRST_COMPLETED)
            assert wait_for.done, "the load neither ended nor tried again"
            r = httpx.post(info.root + "/admin/models/pull", json={"model": str(tiny_llama_dir), "name": "tiny"},
                           headers=HEADERS, timeout=300)
            assert r.status_code == 200 and '"success"' in r.text, r.text
            catalog.go.set()
            reply = asked.result(300)  # was a 500 model_load_failed or a 400 "cannot load"
            assert reply.model == "tiny" and reply.usage.completion_tokens > 0
            assert info.engine.is_loaded("tiny")
        else:
            catalog.go.set()
            with pytest.raises(openai.NotFoundError) as caught:  # was a 500 model_load_failed or a 400 "cannot load"
                asked.result(300)
            assert caught.value.response.json()["error"]["code"] == "model_not_found"
            assert not info.engine.is_loaded("tiny") and not info.engine.is_loading("tiny")


def pool_of(event: threading.Event) -> concurrent.futures.Future:
    """A future done once ``event`` is set (waited for on a daemon thread)."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=lambda: (event.wait(300), done.set_result(None)), daemon=True).start()
    return done
