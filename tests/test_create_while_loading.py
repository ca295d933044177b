"""``xllm create`` over a model while a server loads it: the load must not register the old Modelfile settings.

A create that keeps FROM's weights (a new SYSTEM, PARAMETER, num_ctx) leaves the digest as it was, so the load's
check for changed files passed and the old settings served until the next unload. The load is held on its worker
thread (``held_load``) while the store changes, then let go: nothing waits on a clock.
"""

from __future__ import annotations

import httpx

from .server_fixtures import API_KEY
from .test_repull_while_loading import a_server, chat_held_at_load, held_load  # noqa: F401 - a fixture


def test_a_create_while_the_model_loads_serves_the_new_settings(tmp_path, tiny_llama_dir, held_load):  # noqa: F811
    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    with chat_held_at_load(server, read) as (info, c, asked):
        made = store.create("tiny", "FROM tiny\nSYSTEM You are terse.\nPARAMETER num_ctx 64\n")
        # what `xllm create` does next: ask the server to unload the model it replaced
        r = httpx.post(info.root + "/admin/models/unload", json={"model": "tiny"},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code in (200, 404), r.text
        release.set()
        assert asked.result(300).model == "tiny"
        assert made.digest == digests[0]  # the same weights: only the settings changed
        assert info.engine.model_defaults("tiny").system == "You are terse."
        assert info.engine.model_defaults("tiny").parameters.get("num_ctx") == 64
