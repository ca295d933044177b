"""The hub service's OAuth: the callback asks the hub only about its own login cookie, never on the IOLoop's
thread; the logins that visitors begin, unauthenticated, cannot fill its memory.

A callback without its state cookie (a reload, a second tab, a forged link) took JupyterHub's "already logged
in?" branch, whose ``current_user`` asks the hub synchronously: on HubAuth's worker thread while the service's
IOLoop waited (every user's stream stalled for the hub's answer, up to 5 minutes for a silent hub), and about any
``Authorization`` token too, uncounted by the failed-auth cap, with a redirect for a right token and a 403 for a
wrong one: an unlimited token-guessing oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tornado.web import create_signed_value

from tests.helpers import json_answering_server
from tests.server_fixtures import HUB_ALICE, loop_thread

SECRET = b"c" * 32
CALLBACK = "/oauth_callback?code=some-code&state=no-such-state"


def _login_cookie(token: str) -> str:
    """The service's login cookie (signed with its secret) holding ``token``, as the callback sets it."""
    return "service-xllm=" + create_signed_value(SECRET, "service-xllm", token).decode()


@pytest.fixture
def service(tmp_path) -> Iterator[tuple[str, list[tuple[str, str]], Any]]:
    """The hub app on a real port, the hub stood in for: ``alice-token`` is alice's, the rest unknown; each
    question takes 0.3 s. Yields the service's root, the questions asked, as (token, thread name), and its HubOAuth."""
    with _service(tmp_path, "http://127.0.0.1:9/hub/api") as served:
        yield served


@contextlib.contextmanager
def _service(tmp_path: Any, api_url: str) -> Iterator[tuple[str, list[tuple[str, str]], Any]]:
    """``service`` with the hub API at ``api_url`` (token questions stood in; the code's trade goes there)."""
    pytest.importorskip("jupyterhub")
    import tornado.httpserver
    import tornado.testing

    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.app import make_hub_app, make_hub_auth
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    auth = make_hub_auth({"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": api_url})
    asked: list[tuple[str, str]] = []

    async def lookup(token: str, **_: Any) -> Any:
        asked.append((token, threading.current_thread().name))
        await asyncio.sleep(0.3)
        return HUB_ALICE if token == "alice-token" else None

    auth.user_for_token = lookup

    async def setup() -> tuple[Any, int]:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(make_hub_app(config, Engine(config.engine), auth, cookie_secret=SECRET))
        server.add_sockets([sock])
        return server, port

    with loop_thread(setup, "the hub service", 30) as (loop, (server, port)):
        try:
            yield f"http://127.0.0.1:{port}/services/xllm", asked, auth
        finally:
            loop.call_soon_threadsafe(server.stop)


def test_a_callback_never_asks_the_hub_about_a_token_in_its_headers(service):
    root, asked, _ = service
    with httpx.Client(base_url=root, timeout=30) as http:
        answers = {token: http.get(CALLBACK, headers={"Authorization": f"token {token}"}, follow_redirects=False)
                   for token in ("guess-1", "alice-token")}
    assert asked == []  # no uncapped guesses reach the hub
    assert {r.status_code for r in answers.values()} == {403}  # and a right token looks like a wrong one


def test_a_logged_in_browsers_stale_callback_still_redirects_and_the_ioloop_keeps_serving(service):
    root, asked, _ = service
    with httpx.Client(base_url=root, timeout=30) as http:
        r = http.get(CALLBACK, headers={"Cookie": _login_cookie("alice-token")}, follow_redirects=False)
        assert r.status_code == 302, r.text
        assert r.headers["Location"] == "/services/xllm/"
        r = http.get(CALLBACK, headers={"Cookie": _login_cookie("revoked-token")}, follow_redirects=False)
        assert r.status_code == 403  # not logged in after all: the state must match
    # asked on the service's own IOLoop (awaited), not on HubAuth's worker thread while the IOLoop waits
    assert [token for token, _ in asked] == ["alice-token", "revoked-token"]
    assert {thread for _, thread in asked} == {"the hub service"}


def test_logins_begun_by_a_flood_of_visits_are_bounded_and_keep_no_query(service):
    """Each visit not logged in begins a login whose state HubOAuth keeps for 10 minutes, with the request's URI as
    the page to return to: unbounded, a client sending visits with long queries grew the service by their size."""
    root, _, auth = service
    auth._oauth_states.max_entries = 40
    with httpx.Client(base_url=root, timeout=30) as http:
        for _ in range(100):
            http.cookies.clear()  # a new visitor each time
            r = http.get("/?" + "q" * 20000, follow_redirects=False)
            assert r.status_code == 302
    states = auth._oauth_states
    assert 0 < len(states) <= 40
    assert {state["next_url"] for state in states.values.values()} == {"/services/xllm/"}
    # the newest login is still pending: its callback can find its state
    newest = r.headers["Location"].split("state=")[1].split("&")[0]
    assert states.get(newest, {}).get("next_url") == "/services/xllm/"


def test_a_login_whose_state_was_forgotten_begins_again_instead_of_a_503(service):
    """Past the bound the oldest pending login is forgotten, PKCE verifier and all; its browser's callback then sent
    the hub its code without the verifier, the hub refused it, and the browser read "JupyterHub could not be asked
    ... retry later" (503), which no retry could mend. The page begins a new login instead."""
    root, asked, auth = service
    auth._oauth_states.max_entries = 1
    with httpx.Client(base_url=root, timeout=30) as alice, httpx.Client(base_url=root, timeout=30) as flood:
        r = alice.get("/", follow_redirects=False)
        assert r.status_code == 302
        state = r.headers["Location"].split("state=")[1].split("&")[0]
        assert flood.get("/", follow_redirects=False).status_code == 302  # alice's pending login is forgotten
        assert state not in auth._oauth_states
        r = alice.get(f"/oauth_callback?code=her-code&state={state}", follow_redirects=False)
        assert r.status_code == 302, (r.status_code, r.text)
        assert r.headers["Location"] == "/services/xllm/"  # the page, which begins a fresh login
        assert "service-xllm-oauth-state" not in alice.cookies  # the spent state cookie is cleared
        r = alice.get("/", follow_redirects=False)
        assert r.status_code == 302 and "/oauth2/authorize" in r.headers["Location"]
        # a callback naming a forgotten state without the browser's own state cookie stays a refusal
        r = flood.get(f"/oauth_callback?code=her-code&state={state}", follow_redirects=False)
        assert r.status_code == 403
    assert asked == []


@pytest.fixture
def code_refusing_hub() -> Iterator[int]:
    """An HTTP server answering every request as JupyterHub answers a code it did not issue (400 invalid_grant)."""
    with json_answering_server(400, b'{"error": "invalid_grant", "error_description": "Invalid code"}') as port:
        yield port


def test_a_made_up_code_is_the_logins_403_not_a_misconfigured_service(tmp_path, code_refusing_hub, caplog):
    """Anyone can begin a login (one visit gives a state cookie) and send the callback any code: the hub's refusal
    read as "the service is misconfigured" (500) and logged an error each time, an error-log flood on demand."""
    caplog.set_level(logging.INFO)
    with _service(tmp_path, f"http://127.0.0.1:{code_refusing_hub}/hub/api") as (root, asked, _):
        with httpx.Client(base_url=root, timeout=30) as http:
            r = http.get("/", follow_redirects=False)
            assert r.status_code == 302
            state = r.headers["Location"].split("state=")[1].split("&")[0]
            r = http.get(f"/oauth_callback?code=made-up&state={state}", follow_redirects=False)
            assert r.status_code == 403, (r.status_code, r.text)
            assert "misconfigured" not in r.text
    assert asked == []
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("xllm_jupyter") and r.levelno >= logging.ERROR]
    assert errors == []
