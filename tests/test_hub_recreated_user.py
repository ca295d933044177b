"""A hub user deleted and created again under the same name is someone else: no stored response of the old account
reaches the new one, while one account keeps its own across tokens.

A real JupyterHub (tests/real_hub.py) vouches for the tokens; the service runs in this process on the tiny Llama
(``make_hub_app`` on a loop thread of its own) with the real ``openai`` SDK as client. Tokens carry only the
access scope, as a kernel's do, so the service learns each account's creation time with its own token
(``read:users``, docs/jupyterhub.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.real_hub import XLLM_ACCESS, HubProcess, user_token, xllm_services_tail
from tests.server_fixtures import TINY, loop_thread, make_test_config

pytest.importorskip("jupyterhub")

ADMIN_TOKEN = "recreate-admin-token-0123456789abcdef"
SERVICE_TOKEN = "recreate-service-token-0123456789abcdef"


@dataclass
class _Setup:
    """A running hub and the xllm service it vouches tokens to."""

    hub: HubProcess
    tail: str  # the hub's config tail (what a restart rewrites)
    admin: httpx.Client  # the hub API as the test-admin
    base: str  # the service's /v1 base URL


def _service(home, hub: HubProcess):
    """The xllm hub service on a port of its own, asking ``hub`` about tokens; yields (loop, (engine, server, port))."""
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.app import make_hub_app, make_hub_auth
    from xllm_jupyter.store.store import ModelStore

    import tornado.httpserver
    import tornado.testing

    config = make_test_config(home)
    env = {"JUPYTERHUB_API_TOKEN": SERVICE_TOKEN, "JUPYTERHUB_API_URL": hub.api, "JUPYTERHUB_SERVICE_NAME": "xllm"}

    async def setup() -> tuple[Any, Any, int]:
        engine = Engine(config.engine, catalog=ModelStore(config.store.home), quotas=config.quotas)
        await engine.start()
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_hub_app(config, engine, make_hub_auth(env)))
        server.add_sockets([sock])
        return engine, server, port

    return loop_thread(setup, "the hub service", 60)


@contextlib.contextmanager
def _hub_and_service(tmp_path, home, service_scopes: list[str]) -> Iterator[_Setup]:
    """A real hub whose xllm service role holds ``service_scopes``, and the service; both stopped at exit."""
    import asyncio

    hub = HubProcess(tmp_path)
    tail = xllm_services_tail("http://127.0.0.1:9", SERVICE_TOKEN, ADMIN_TOKEN, service_scopes)
    hub.start(tail)
    try:
        with httpx.Client(base_url=hub.api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30) as admin, \
                _service(home, hub) as (loop, (engine, server, port)):
            try:
                yield _Setup(hub, tail, admin, f"http://127.0.0.1:{port}/services/xllm/v1")
            finally:
                asyncio.run_coroutine_threadsafe(engine.stop(), loop).result(60)
                loop.call_soon_threadsafe(server.stop)
    finally:
        hub.stop()


def test_a_recreated_user_cannot_read_the_old_accounts_stored_response(tmp_path, xllm_home):
    with _hub_and_service(tmp_path, xllm_home, ["read:users"]) as at:
        admin, base = at.admin, at.base
        assert admin.post("/users", json={"usernames": ["carol"]}).status_code == 201
        first, second = user_token(admin, "carol"), user_token(admin, "carol")
        with openai.OpenAI(base_url=base, api_key=first, max_retries=0, timeout=120) as c:
            stored = c.responses.create(model=TINY, input="hi", max_output_tokens=3, store=True)
        # the same account with another token (a refreshed one, a kernel's): still its own
        with openai.OpenAI(base_url=base, api_key=second, max_retries=0, timeout=120) as c:
            assert c.responses.retrieve(stored.id).id == stored.id
        # ... and after the hub restarts (its database keeps the account and its creation time)
        at.hub.restart(at.tail)
        with openai.OpenAI(base_url=base, api_key=user_token(admin, "carol"), max_retries=0, timeout=120) as c:
            assert c.responses.retrieve(stored.id).id == stored.id

        # the account is deleted and a new one (another person) is given the name
        assert admin.delete("/users/carol").status_code == 204
        assert admin.post("/users", json={"usernames": ["carol"]}).status_code == 201
        third = user_token(admin, "carol")
        with openai.OpenAI(base_url=base, api_key=third, max_retries=0, timeout=120) as c:
            with pytest.raises(openai.NotFoundError):
                c.responses.retrieve(stored.id)
            with pytest.raises(openai.BadRequestError):  # previous_response_not_found, as for any unknown id
                c.responses.create(model=TINY, input="and?", max_output_tokens=3,
                                   previous_response_id=stored.id)
            # the new account's own responses are its own
            mine = c.responses.create(model=TINY, input="hello", max_output_tokens=3, store=True)
            assert c.responses.retrieve(mine.id).id == mine.id


def test_a_service_that_may_not_read_users_serves_by_name_and_says_why_once(tmp_path, xllm_home, monkeypatch):
    """The hub's older setups gave the service no scopes: it keeps serving (users keyed by name, as before) and its
    log tells the admin what to grant, once."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("xllm_jupyter.hub")
    keep = Keep(logging.WARNING)
    logger.addHandler(keep)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    try:
        with _hub_and_service(tmp_path, xllm_home, []) as at:
            assert at.admin.post("/users", json={"usernames": ["dave"]}).status_code == 201
            for token in (user_token(at.admin, "dave"), user_token(at.admin, "dave")):
                with openai.OpenAI(base_url=at.base, api_key=token, max_retries=0, timeout=120) as c:
                    assert TINY in [m.id for m in c.models.list().data]
    finally:
        logger.removeHandler(keep)
    told = [r.getMessage() for r in records if "read:users" in r.getMessage()]
    assert len(told) == 1 and "by name only" in told[0]


@pytest.mark.parametrize("service_scopes", [[], ["read:users!group=staff"]], ids=["no-read-users", "staff-only"])
def test_without_read_users_on_everyone_every_token_of_a_user_is_one_name_key(tmp_path, xllm_home, service_scopes):
    """Without read:users, a token that shows its own account (``read:users!user``, a personal token's default) was
    keyed by account and erin's kernel token by name: two keys for one person (two quota buckets), her stored
    response out of reach of her other token. A role reading only some users (``read:users!group=staff``) got 404
    for anyone else's account, which read as a deleted user: erin, outside the group, was refused (401). Now the
    service asks the hub its own scopes: without read:users on everyone, every user is keyed by name."""
    with _hub_and_service(tmp_path, xllm_home, service_scopes) as at:
        assert at.admin.post("/users", json={"usernames": ["erin"]}).status_code == 201
        kernel = user_token(at.admin, "erin")
        personal = user_token(at.admin, "erin", [*XLLM_ACCESS, "read:users!user"])
        with openai.OpenAI(base_url=at.base, api_key=personal, max_retries=0, timeout=120) as c:
            stored = c.responses.create(model=TINY, input="hi", max_output_tokens=3, store=True)
        with openai.OpenAI(base_url=at.base, api_key=kernel, max_retries=0, timeout=120) as c:
            assert c.responses.retrieve(stored.id).id == stored.id
