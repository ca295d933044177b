"""LoRA adapters meeting the store's lifecycle: a base model removed while an adapter's request loads it, and an
adapter whose weights file is damaged.

Real parts: adapters built with peft for the tiny random Llama (tests/test_lora.py's), a real store, a real
standalone server and the ``openai`` SDK; the base's load is held on its worker thread by an event, no clock.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from xllm_jupyter.engine import loading
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import TINY, make_test_config, running_server
from .test_lora import lora_dirs  # noqa: F401  (a fixture, used by name)

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stage", ["base load", "attach"])
def test_an_adapter_whose_base_is_deleted_as_it_loads_gets_a_404_naming_the_base(tmp_path, tiny_llama_dir,
                                                                                 lora_dirs, monkeypatch,  # noqa: F811
                                                                                 stage):
    """The DELETE of the base lands while the adapter's request loads the base, or while it attaches the adapter
    to the loaded base: a 404 naming the base and the adapter (was a 400 "pull it first" or a 503 "retry")."""
    from xllm_jupyter.backends.hf_model import TransformersModel

    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(tiny_llama_dir), "base")
    store.pull(str(lora_dirs[0]), "ad-x", base="base")
    held, release, removing = threading.Event(), threading.Event(), threading.Event()
    original_load, original_attach, original_rm = loading._load_and_prepare, TransformersModel.load_adapter, ModelStore.rm

    def held_load(backend, spec):
        if spec.name == "base" and stage == "base load":
            held.set()
            release.wait(300)
        return original_load(backend, spec)

    def held_attach(self, name, path):
        result = original_attach(self, name, path)
        if name == "ad-x" and stage == "attach":
            held.set()
            release.wait(300)
        return result

    def marked_rm(self, name, **kwargs):  # the DELETE has unloaded the base once, and now removes its files
        removing.set()
        return original_rm(self, name, **kwargs)

    monkeypatch.setattr(loading, "_load_and_prepare", held_load)
    monkeypatch.setattr(TransformersModel, "load_adapter", held_attach)
    monkeypatch.setattr(ModelStore, "rm", marked_rm)
    with running_server(make_test_config(home), ModelStore(home), TINY) as server, ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300) as sdk:
        asked = pool.submit(sdk.chat.completions.create, model="ad-x", messages=HI, max_tokens=2)
        try:
            assert held.wait(300), f"the adapter's {stage} never started"
            deleted = pool.submit(httpx.delete, f"{server.base_url}/models/base",
                                  headers={"Authorization": f"Bearer {server.api_key}"}, timeout=300)
            assert removing.wait(300), "the DELETE never reached the store"
        finally:
            release.set()
        assert deleted.result(300).status_code == 200, deleted.result().text
        with pytest.raises(openai.APIStatusError) as failed:
            asked.result(300)
        error = failed.value.body
        assert failed.value.status_code == 404, (failed.value.status_code, error)
        assert set(error) >= {"message", "type", "param", "code"} and error["code"] == "model_not_found", error
        assert "'base'" in error["message"] and "'ad-x'" in error["message"] and "/" not in error["message"], error
        assert not server.engine.is_loaded("base") and not server.engine.is_loaded("ad-x")
        assert "ad-x" not in server.engine._adapters  # (attached to a base that is gone, it stayed routed there)
        # the server serves on: the base model's own name is gone too
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="base", messages=HI, max_tokens=2)
        assert sdk.chat.completions.create(model=TINY, messages=HI, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("damage", ["header", "json"])
def test_an_adapter_with_damaged_weights_says_so_naming_the_adapter(tmp_path, tiny_llama_dir, lora_dirs,  # noqa: F811
                                                                    damage):
    """The adapter's weights file damaged in place (its size unchanged, so the store's cheap check passes): the load
    error a damaged model gets (500 ``model_load_failed``), naming the adapter and saying its weights are damaged,
    no path (was "does not fit this base model"); the base serves on."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(lora_dirs[0]), "ad-bad", base=TINY)
    weights = store.show("ad-bad").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "header":  # the header's length field says more than the file holds
        data[:8] = (2**40).to_bytes(8, "little")
    else:  # the header's JSON cut: not JSON any more
        data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with running_server(make_test_config(home), ModelStore(home), TINY) as server, \
            openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300) as sdk:
        with pytest.raises(openai.APIStatusError) as failed:
            sdk.chat.completions.create(model="ad-bad", messages=HI, max_tokens=2)
        error = failed.value.body
        assert failed.value.status_code == 500, (failed.value.status_code, error)
        assert set(error) >= {"message", "type", "param", "code"} and error["code"] == "model_load_failed", error
        message = error["message"]
        assert "'ad-bad'" in message and "damaged" in message, message
        assert "does not fit" not in message and str(home) not in message and "/" not in message, message
        assert sdk.chat.completions.create(model=TINY, messages=HI, max_tokens=2).usage.completion_tokens >= 1
