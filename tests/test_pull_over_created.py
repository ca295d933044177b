"""A pull (``--force``) over a model made by ``xllm create``, with the same weights: the server unloads it.

The replaced model's digest is the pulled one's (a created model shares FROM's files), so the check "other files:
unload" let it go on serving the created model's Modelfile settings, which the store no longer holds.
"""

from __future__ import annotations

import json

import httpx

from tests.server_fixtures import TINY
from tests.test_cli_ux import invoke
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store.store import ModelStore


def _loaded(c: XllmClient) -> list[str]:
    return [m["id"] for m in c.loaded()]


def test_a_pull_over_a_created_model_unloads_it(xllm_server, xllm_home, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    store = ModelStore(xllm_home)
    where = ["--url", xllm_server.base_url, "--api-key", xllm_server.api_key]
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        try:
            for how in ("cli", "route"):
                store.create("brief", f"FROM {TINY}\nSYSTEM You are brief.\n")
                c.load("brief")
                assert xllm_server.engine.model_defaults("brief").system == "You are brief."
                if how == "cli":
                    result = invoke("pull", str(tiny_llama_dir), "--name", "brief", "--force", *where)
                    assert result.exit_code == 0, result.output
                else:
                    r = httpx.post(xllm_server.root + "/admin/models/pull", timeout=300,
                                   json={"model": str(tiny_llama_dir), "name": "brief", "force": True},
                                   headers={"Authorization": f"Bearer {xllm_server.api_key}"})
                    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                    assert events[-1]["status"] == "success", events
                assert store.show("brief").modelfile is None  # the pulled model has no SYSTEM...
                assert "brief" not in _loaded(c), how  # ...so the created one's is not served on
        finally:
            if "brief" in _loaded(c):
                c.unload("brief")
            if store.exists("brief"):
                store.rm("brief")


def test_an_adapter_pulled_again_onto_another_base_is_unloaded(xllm_server, xllm_home, tiny_llama_dir, tmp_path,
                                                               monkeypatch):
    """``xllm pull ADAPTER --base OTHER`` over a stored adapter keeps its files (same digest) and records the new
    base: the server must detach it from the old one, or its requests go on running on the old base."""
    from tests.test_lora import _make_adapter

    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    store = ModelStore(xllm_home)
    lora = _make_adapter(tiny_llama_dir, tmp_path / "lora", seed=1)
    where = ["--url", xllm_server.base_url, "--api-key", xllm_server.api_key]
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        try:
            store.pull(str(tiny_llama_dir), "tiny2")
            for how in ("cli", "route"):
                store.pull(str(lora), "ad", base=TINY, force=True)
                c.load("ad")
                assert "ad" in _loaded(c)
                if how == "cli":
                    result = invoke("pull", str(lora), "--name", "ad", "--base", "tiny2", *where)
                    assert result.exit_code == 0, result.output
                else:
                    r = httpx.post(xllm_server.root + "/admin/models/pull", timeout=300,
                                   json={"model": str(lora), "name": "ad", "base": "tiny2"},
                                   headers={"Authorization": f"Bearer {xllm_server.api_key}"})
                    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                    assert events[-1]["status"] == "success", events
                assert store.show("ad").parameters["base_model"] == "tiny2"
                assert "ad" not in _loaded(c), how  # detached from tiny: its next request attaches it to tiny2
        finally:
            for name in ("ad", "tiny2"):
                if name in _loaded(c):
                    c.unload(name)
                if store.exists(name):
                    store.rm(name)
