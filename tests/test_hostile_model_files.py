"""A model whose config files (from wherever it was pulled) say odd things still loads and serves.

``generation_config.json`` with an ``eos_token_id`` list holding a string, a negative id and an id past the
vocabulary failed every load of the model: each chat request was a 500 ``server_error``. A ``config.json``
field of the wrong type (refused by transformers' strict config classes) was a ``server_error`` saying
"retry", not the ``model_load_failed`` that says the files are at fault.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Iterator

import openai
import pytest

from tests.server_fixtures import make_test_config, running_server
from xllm_jupyter.store import ModelStore

HOSTILE_EOS = {"eos_token_id": [-1, 10**20, "x", True, None, 2], "bos_token_id": "y", "pad_token_id": 10**12}


@pytest.fixture(scope="module")
def odd_server(tmp_path_factory, tiny_llama_dir) -> Iterator[Any]:
    """A server whose store holds the tiny Llama with a hostile generation_config.json, as "odd"."""
    root = tmp_path_factory.mktemp("odd-model")
    src = root / "src"
    shutil.copytree(tiny_llama_dir, src)
    (src / "generation_config.json").write_text(json.dumps(HOSTILE_EOS))
    home = root / "home"
    store = ModelStore(home)
    store.pull(str(src), "odd")
    bad = root / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "max_position_embeddings": "x"}))
    store.pull(str(bad), "bad-config")
    with running_server(make_test_config(home), store, "odd") as info:
        yield info


def test_odd_eos_ids_are_ignored_and_the_model_serves(odd_server):
    client = openai.OpenAI(base_url=odd_server.base_url, api_key=odd_server.api_key, max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model="odd", messages=msgs, max_tokens=3)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    # a constrained request masks tokens by id, EOS among them
    shaped = client.chat.completions.create(model="odd", messages=msgs, max_tokens=8, response_format={"type": "json_object"})
    assert shaped.choices[0].finish_reason in ("stop", "length")


def test_a_config_field_of_the_wrong_type_is_a_model_load_error(odd_server):
    import httpx

    r = httpx.post(odd_server.base_url + "/chat/completions", headers={"Authorization": f"Bearer {odd_server.api_key}"},
                   json={"model": "bad-config", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                   timeout=120)
    err = r.json()["error"]
    assert r.status_code == 500 and err["code"] == "model_load_failed", r.text
    assert "bad-config" in err["message"] and "max_position_embeddings" not in err["message"]  # no library text
