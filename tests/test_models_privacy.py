"""``/v1/models`` shows a non-admin their own running/queued sequences, not the shared engine's activity."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.core.types import UserSequences
from xllm_jupyter.openai.model_privacy import SHARED_ACTIVITY, caller_view

ADMIN, ALICE, BOB = "sk-priv-admin", "sk-priv-alice", "sk-priv-bob"
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def shared_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """Two user keys and an admin key."""
    cfg = make_test_config(xllm_home, api_keys=(ALICE, BOB))
    with running_server(dataclasses.replace(cfg, auth=AuthConfig(admin_keys=(ADMIN,))), tiny_catalog, TINY) as info:
        yield info


def _tiny(c: httpx.Client, key: str, one: bool = False) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    if one:
        r = c.get(f"/v1/models/{TINY}", headers=headers)
        assert r.status_code == 200
        return r.json()["xllm"]["details"]
    r = c.get("/v1/models", headers=headers)
    assert r.status_code == 200
    return next(m for m in r.json()["data"] if m["id"] == TINY)["xllm"]["details"]


def test_a_user_sees_their_own_sequences_and_admins_the_totals(shared_server):
    body = {"model": TINY, "messages": MSG, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=shared_server.root, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # alice's sequence is generating now
            for one in (False, True):
                alice, bob, admin = (_tiny(c, k, one) for k in (ALICE, BOB, ADMIN))
                assert (alice["running"], alice["queued"]) == (1, 0)
                assert (bob["running"], bob["queued"]) == (0, 0)  # bob learns nothing of alice's stream
                assert admin["running"] == 1 and admin["in_use"] >= 1 and admin["memory_bytes"] > 0
                assert admin["replicas"] and admin["last_used"]
                for seen in (alice, bob):
                    assert not set(SHARED_ACTIVITY) & set(seen), seen
                    assert seen["state"] == "loaded" and "max_batch_size" in seen  # what describes the model stays


def test_a_loading_entry_and_store_entries_pass_unchanged():
    loading = {"id": "m", "xllm": {"loaded": False, "details": {"state": "loading", "waiting_for_room": False}}}
    assert caller_view(loading, UserSequences(3, 4)) == loading
    stored = {"id": "s", "xllm": {"loaded": False, "details": {"task": "chat"}}}
    assert caller_view(stored, UserSequences()) == stored
