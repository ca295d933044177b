"""Admin route bodies refuse fields they do not take (400 ``unknown_parameter`` naming it), through the session server.

An admin body comes from this project's clients and scripts: an unknown field is a typo or another admin route's
field, and ignoring it did something else than was asked (``keep_alive`` on an unload unloaded all the same). The
OpenAI routes keep accepting unknown fields, as SDKs send new ones (docs/http-api.md, "Admin bodies").
"""

from __future__ import annotations

import pytest

from xllm_jupyter.core.errors import UnknownParameter

from .server_fixtures import TINY


def unknown(r, param: str) -> str:
    """The message of ``r``, a 400 ``unknown_parameter`` naming ``param``."""
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "unknown_parameter", param), err
    return err["message"]


def loaded(raw) -> bool:
    """Whether the session server's tiny model is in memory."""
    return any(m["id"] == TINY for m in raw.get("/admin/models").json()["data"])


def test_load_refuses_unloads_removed_flag(raw):
    """``removed`` (an unload's) was accepted by load and ignored."""
    message = unknown(raw.post("/admin/models/load", json={"model": TINY, "removed": True}), "removed")
    assert "/admin/models/unload" in message and "'model' and 'keep_alive'" in message, message


def test_unload_refuses_keep_alive_and_leaves_the_model_loaded(raw):
    """``{"keep_alive": -1}`` ("keep it") on an unload was ignored: the model was unloaded all the same."""
    assert loaded(raw)
    message = unknown(raw.post("/admin/models/unload", json={"model": TINY, "keep_alive": -1}), "keep_alive")
    assert "/admin/models/load" in message, message
    assert loaded(raw)


@pytest.mark.parametrize("path, body, param", [
    ("/admin/models/load", {"model": TINY, "keep_alive": "1h", "modle": "other"}, "modle"),
    ("/admin/models/load", {"name": TINY}, "name"),  # said before the missing 'model'
    ("/admin/models/unload", {"model": "no-such-model", "force": True}, "force"),  # before the 404
    ("/admin/models/pull", {"model": "/no/such/dir", "revison": "main"}, "revison"),  # before the store's 400
    ("/admin/models/pull", {"model": "/no/such/dir", "keep_alive": "1h"}, "keep_alive"),
    ("/admin/models/pull", {"model": "/no/such/dir", "stream": False}, "stream"),  # Ollama's; this route always streams
])
def test_an_unknown_field_in_an_admin_body_is_a_400_naming_it(raw, path, body, param):
    unknown(raw.post(path, json=body), param)


def test_pull_refuses_model_and_source_together_and_keeps_source_alone(raw):
    """``source`` is another name for ``model``: both given, one was silently dropped."""
    r = raw.post("/admin/models/pull", json={"model": "/no/such/dir", "source": "smollm2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "source", r.text
    alone = raw.post("/admin/models/pull", json={"source": "/no/such/dir"})  # the alias still reaches the store's check
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "model", alone.text


def test_a_duplicate_key_still_comes_first(raw):
    r = raw.post("/admin/models/load", content=b'{"model": "a", "model": "b", "typo": 1}',
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_key", r.text


def test_known_fields_are_still_served(raw):
    assert raw.post("/admin/models/load", json={"model": TINY, "keep_alive": None}).status_code == 200
    assert raw.post("/admin/models/unload", json={"model": "no-such-model", "removed": False}).status_code == 404


def test_openai_routes_still_accept_unknown_fields(client):
    """SDKs send fields before a server knows them (``extra_body``): these routes keep ignoring what they do not use."""
    r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                       extra_body={"x_unknown_field": {"a": 1}, "removed": True})
    assert r.choices[0].finish_reason in ("length", "stop")


def test_the_message_names_the_field_and_what_the_route_takes():
    exc = UnknownParameter("k" * 300, ("model", "removed"), "POST /admin/models/load")
    assert exc.status == 400 and exc.param == "k" * 99 + "…"
    assert exc.message.endswith("It is a parameter of POST /admin/models/load. This route takes 'model' and 'removed'.")
