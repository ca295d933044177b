"""A Jupyter server shared with another hub user keeps each user's stored responses and completions apart.

JupyterHub's sharing lets bob into alice's single-user server; its identity provider names each real user,
and the extension's own engine serves both (the hub service's two users: test_hub_service.py). Bob must
not read, list, continue or delete what alice stored there.
"""

from __future__ import annotations

import json

from tornado.httpclient import HTTPClientError

from tests.server_fixtures import TINY
from tests.test_security_review import jp_server_config  # noqa: F401  (alice's server, shared with bob)

pytest_plugins = ("pytest_jupyter.jupyter_server",)


def test_bob_cannot_reach_alices_stored_responses_or_completions_on_her_shared_server(jp_serverapp, jp_fetch,
                                                                                      jp_asyncio_loop, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")

    async def call(token, method, *path, body=None):
        data = None if body is None else json.dumps(body).encode()
        try:
            headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
            r = await jp_fetch("xllm", *path, method=method, body=data, headers=headers)
            return r.code, json.loads(r.body or b"null")
        except HTTPClientError as exc:
            return exc.code, json.loads(exc.response.body) if exc.response is not None and exc.response.body else None

    async def scenario():
        code, resp = await call("alice-token", "POST", "v1", "responses",
                                body={"model": TINY, "input": "the safe code is 0000", "max_output_tokens": 2})
        assert code == 200, resp
        code, comp = await call("alice-token", "POST", "v1", "chat", "completions",
                                body={"model": TINY, "messages": [{"role": "user", "content": "the safe code is 0000"}],
                                      "max_tokens": 2, "store": True})
        assert code == 200, comp
        rid, cid = resp["id"], comp["id"]
        for method, path in (("GET", ("v1", "responses", rid)), ("GET", ("v1", "responses", rid, "input_items")),
                             ("DELETE", ("v1", "responses", rid)), ("GET", ("v1", "chat", "completions", cid)),
                             ("GET", ("v1", "chat", "completions", cid, "messages")),
                             ("DELETE", ("v1", "chat", "completions", cid))):
            code, body = await call("bob-token", method, *path)
            assert code == 404, (path, code, body)
            assert "0000" not in json.dumps(body)
        code, body = await call("bob-token", "POST", "v1", "responses",
                                body={"model": TINY, "input": "repeat it", "previous_response_id": rid, "max_output_tokens": 2})
        assert code == 400 and body["error"]["code"] == "previous_response_not_found"
        # nor send her items by reference (item_reference): unknown to him, as her response is; still hers
        ref = {"type": "item_reference", "id": resp["output"][0]["id"]}
        code, body = await call("bob-token", "POST", "v1", "responses", body={"model": TINY, "input": [ref], "max_output_tokens": 2})
        assert code == 404 and body["error"]["param"] == "input[0].id" and "0000" not in json.dumps(body), (code, body)
        code, body = await call("alice-token", "POST", "v1", "responses", body={"model": TINY, "input": [ref], "max_output_tokens": 2})
        assert code == 200, body
        code, listing = await call("bob-token", "GET", "v1", "chat", "completions")
        assert code == 200 and cid not in [c["id"] for c in listing["data"]]
        # alice's are still there, still hers
        assert (await call("alice-token", "GET", "v1", "responses", rid))[0] == 200
        code, listing = await call("alice-token", "GET", "v1", "chat", "completions")
        assert code == 200 and cid in [c["id"] for c in listing["data"]]

    jp_asyncio_loop.run_until_complete(scenario())
