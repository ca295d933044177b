"""A model removed (``DELETE /v1/models/{id}``, ``xllm rm``) just as its load registered it: the requests that waited
for that load hear that it is gone (404 ``ModelRemoved``, what their retry would get), as the requests the removal
cuts on the running model do; not a 503 "was unloaded as it finished loading; retry the request".

Found by benchmarks/lifecycle_races.py's "delete mid-load" probe (2 of 90 chats in 15 rounds). The window is held
open here with events: the load's collection after its registration (``gc_freeze.tidy``) waits until the removal's
unload is done.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from xllm_jupyter.core import gc_freeze
from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.core.errors import ModelRemoved, Overloaded
from xllm_jupyter.engine.engine import Engine

from .fake_backend import FakeBackend, FakeCatalog


@pytest.fixture
def held_after_registering(monkeypatch):
    """(registered, go_on): the next load's collection after it registered its model sets ``registered`` and
    waits for ``go_on``."""
    registered, go_on = threading.Event(), threading.Event()
    tidy = gc_freeze.tidy

    def held() -> None:
        registered.set()
        go_on.wait(60)
        tidy()

    monkeypatch.setattr(gc_freeze, "tidy", held)
    yield registered, go_on
    go_on.set()


async def _load_cut_by(engine: Engine, reason, held) -> BaseException:
    registered, go_on = held
    waiters = [asyncio.ensure_future(engine.load("fake")) for _ in range(2)]
    await asyncio.to_thread(registered.wait, 60)
    assert await engine.unload("fake", reason)  # registered: the unload finds it
    go_on.set()
    errors = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(e, BaseException) for e in errors), errors
    assert type(errors[0]) is type(errors[1])
    return errors[0]


async def test_waiters_of_a_load_that_a_removal_unloaded_as_it_registered_hear_it_is_gone(held_after_registering):
    engine = Engine(EngineConfig(), FakeCatalog(), [FakeBackend()])
    await engine.start()
    try:
        error = await _load_cut_by(engine, ModelRemoved("fake"), held_after_registering)
        assert isinstance(error, ModelRemoved) and error.status == 404, repr(error)
        assert not engine.is_loaded("fake")
    finally:
        await engine.stop()


async def test_a_plain_unload_as_the_load_registered_is_still_a_503_to_retry(held_after_registering):
    engine = Engine(EngineConfig(), FakeCatalog(), [FakeBackend()])
    await engine.start()
    try:
        error = await _load_cut_by(engine, None, held_after_registering)
        assert isinstance(error, Overloaded) and "was unloaded as it finished loading" in error.message
        # the removal's word does not outlive it: a later load serves, and a plain unload under the next one is a 503
        await engine.load("fake")
        assert engine.is_loaded("fake")
    finally:
        await engine.stop()


async def test_a_removal_does_not_colour_the_next_loads_plain_unload(held_after_registering, monkeypatch):
    engine = Engine(EngineConfig(), FakeCatalog(), [FakeBackend()])
    await engine.start()
    try:
        monkeypatch.setattr(gc_freeze, "tidy", lambda: None)
        await engine.load("fake")
        assert await engine.unload("fake", ModelRemoved("fake"))  # removed, then pulled again (the fake catalog keeps it)
        registered, go_on = threading.Event(), threading.Event()

        def held() -> None:
            registered.set()
            go_on.wait(60)

        monkeypatch.setattr(gc_freeze, "tidy", held)
        error = await _load_cut_by(engine, None, (registered, go_on))
        assert isinstance(error, Overloaded) and not isinstance(error, ModelRemoved), repr(error)
    finally:
        await engine.stop()
