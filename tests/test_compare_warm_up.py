"""``compare()`` on a model that is not loaded: the columns' requests reach a loaded model, so their
TTFT and latency are the model's, not its load time (a real server with its own store)."""

from __future__ import annotations

from typing import Any

import pytest

import xllm_jupyter
from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store.store import ModelStore

PROMPT = "Name a colour."


@pytest.fixture
def prompts_seen(own_tiny_server, monkeypatch) -> list[tuple[str, bool]]:
    """(last message, whether its model was loaded when the request asked the engine for it) per chat request.

    ``engine.load`` (which waits for a load) and ``engine.encode_chat`` run in the request's own task, which
    ties the model's state when the request arrived to the prompt it carries.
    """
    import asyncio

    engine = own_tiny_server.engine
    loaded_at_arrival: dict[int, bool] = {}
    seen: list[tuple[str, bool]] = []
    real_load, real_encode = engine.load, engine.encode_chat

    async def load(name: str, *args: Any, **kwargs: Any) -> Any:
        loaded_at_arrival.setdefault(id(asyncio.current_task()), engine.is_loaded(name))
        return await real_load(name, *args, **kwargs)

    async def encode_chat(name: str, messages: Any, *args: Any, **kwargs: Any) -> Any:
        task = id(asyncio.current_task())
        seen.append((str(getattr(messages[-1], "content", "")), loaded_at_arrival.pop(task, engine.is_loaded(name))))
        return await real_encode(name, messages, *args, **kwargs)

    monkeypatch.setattr(engine, "load", load)
    monkeypatch.setattr(engine, "encode_chat", encode_chat)
    return seen


@pytest.mark.parametrize("cold", [True, False])
def test_no_column_waits_for_a_model_load(own_tiny_server, prompts_seen, cold):
    endpoint = (own_tiny_server.base_url, own_tiny_server.api_key)
    with XllmClient(*endpoint) as c:
        if cold:
            c.unload(TINY)
            assert not own_tiny_server.engine.is_loaded(TINY)
        else:
            c.load(TINY)
    result = xllm_jupyter.compare(PROMPT, TINY, settings=[{"temperature": 0}, {"temperature": 1.0, "seed": 1}],
                                  max_tokens=3, client=endpoint)
    assert result.frame["error"].isna().all() and (result.frame["completion_tokens"] > 0).all()
    columns = [loaded for text, loaded in prompts_seen if text == PROMPT]
    assert columns == [True, True], prompts_seen


def test_a_model_that_fails_to_load_is_tried_once(tmp_path, tiny_llama_dir):
    """A column whose model failed its warm-up load keeps that error, and is not sent to load it again (a failed
    load can take as long as a good one: the warm-up doubled it)."""
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(tiny_llama_dir), "bad")
    with open(store.show("bad").path / "tokenizer.json", "r+b") as f:  # same size: only a load tells
        f.write(b"GARBAGE!")
    with running_server(make_test_config(store.home), store, TINY) as info:
        engine, loads = info.engine, []
        real_load = engine.load

        async def load(name: str, *args: Any, **kwargs: Any) -> Any:
            loads.append(name)
            return await real_load(name, *args, **kwargs)

        engine.load = load
        try:
            result = xllm_jupyter.compare(PROMPT, [TINY, "bad"], max_tokens=2, client=(info.base_url, info.api_key))
        finally:
            del engine.load
    errors = dict(zip(result.frame["model"], result.frame["error"]))
    assert "model_load_failed" in str(errors["bad"]) or "Failed to load model 'bad'" in str(errors["bad"]), errors
    assert errors[TINY] is None or errors[TINY] != errors[TINY], errors  # None or NaN: the good column answered
    assert loads.count("bad") == 1, loads


def test_a_compare_stopped_during_the_warm_up_marks_every_column_stopped(own_tiny_server):
    """Stopped (the widget's Stop, Ctrl-C) while a model loads for the warm-up: the columns never started, and
    their records say they were stopped rather than looking like empty answers."""
    import asyncio
    import threading

    from xllm_jupyter.notebook.compare import Column, compare_async
    from xllm_jupyter.notebook.streams import StreamRecord

    engine, entered, release = own_tiny_server.engine, threading.Event(), threading.Event()
    real_load = engine.load

    async def load(name: str, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        while not release.is_set():  # held until the test has stopped the compare
            await asyncio.sleep(0.01)
        return await real_load(name, *args, **kwargs)

    columns = [Column("a", TINY, {"max_tokens": 2}), Column("b", TINY, {"max_tokens": 3})]
    records = [StreamRecord(model=c.model, params=c.params) for c in columns]

    async def stop_when_loading() -> None:
        task = asyncio.ensure_future(compare_async((own_tiny_server.base_url, own_tiny_server.api_key),
                                                   [{"role": "user", "content": PROMPT}], columns, None, records))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    engine.load = load
    try:
        asyncio.run(stop_when_loading())
    finally:
        release.set()
        del engine.load
    assert [r.cancelled for r in records] == [True, True] and all(r.text == "" for r in records)
