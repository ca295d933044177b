"""A model created FROM a stored LoRA adapter (``FROM my-lora`` + ``SYSTEM``/``PARAMETER``) serves its Modelfile
settings, as a model created from a full model does: they were recorded and shown by ``xllm show``, but a request
for the adapter got none of them (the engine kept defaults for base models only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import httpx
import openai

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from tests.test_lora import _make_adapter
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.store.store import ModelStore


def test_settings_of_a_model_created_from_an_adapter_apply(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(_make_adapter(tiny_llama_dir, tmp_path / "lora", seed=1)), "ad", base=TINY)
    store.create("pirate", "FROM ad\nSYSTEM You are a pirate.\nPARAMETER num_predict 2\n")
    with running_server(make_test_config(home), ModelStore(home), TINY) as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        reply = c.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "hi"}],
                                          temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 2  # num_predict: the default max_tokens
        assert info.engine.model_defaults("pirate").system == "You are a pirate."
        # the adapter it was made from keeps none of them
        plain = c.chat.completions.create(model="ad", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                          max_tokens=4, extra_body={"ignore_eos": True})
        assert plain.usage.completion_tokens == 4
        assert info.engine.model_defaults("ad").system is None
        # /v1/models lists what each one's requests get (chat UIs set their sliders from it), not the base's
        listed = {m.id: m.model_extra["xllm"].get("defaults") for m in c.models.list().data}
        assert listed["pirate"]["max_tokens"] == 2 and listed["ad"] == {}


def test_a_create_while_the_adapter_attaches_serves_the_new_settings(tmp_path, tiny_llama_dir, monkeypatch):
    """As tests/test_create_while_loading.py, for a model created FROM an adapter: its digest stays as it was."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(_make_adapter(tiny_llama_dir, tmp_path / "lora", seed=1)), "ad", base=TINY)
    store.create("pirate", "FROM ad\nSYSTEM Arr.\n")
    attached, release = threading.Event(), threading.Event()
    load_adapter = Engine.load_adapter

    async def held(self, base, name, path):
        model = await load_adapter(self, base, name, path)
        if name == "pirate" and not attached.is_set():
            attached.set()
            await asyncio.to_thread(release.wait, 300)
        return model

    monkeypatch.setattr(Engine, "load_adapter", held)
    with running_server(make_test_config(home), ModelStore(home), TINY) as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            asked = pool.submit(c.chat.completions.create, model="pirate", messages=[{"role": "user", "content": "hi"}],
                                max_tokens=1)
            assert attached.wait(300)
            store.create("pirate", "FROM ad\nSYSTEM Ahoy.\n")
            r = httpx.post(info.root + "/admin/models/unload", json={"model": "pirate"},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            assert r.status_code in (200, 404), r.text
            release.set()
            assert asked.result(300).model == "pirate"
        assert info.engine.model_defaults("pirate").system == "Ahoy."


def test_an_attached_adapter_lists_its_own_digest(tmp_path, tiny_llama_dir):
    """/v1/models gives each model its store digest (``xllm list``'s): an adapter's changed to its base's once it
    was attached, so two adapters of one base looked like the same weights."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(_make_adapter(tiny_llama_dir, tmp_path / "lora", seed=1)), "ad", base=TINY)
    with running_server(make_test_config(home), ModelStore(home), TINY) as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        def digest() -> str:
            return {m.id: m.model_extra["xllm"]["digest"] for m in c.models.list().data}["ad"]

        assert digest() == store.show("ad").digest  # not loaded yet
        c.chat.completions.create(model="ad", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert digest() == store.show("ad").digest != store.show(TINY).digest
