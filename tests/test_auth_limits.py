"""Key roles, the public allowlist and per-key limits, through real standalone servers."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig, load_config
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth import ApiKeyAuth
from xllm_jupyter.server.limits import Limiter, TokenBucket
from xllm_jupyter.server.routes import PUBLIC_PATHS, ROUTES, served_methods

USER = "sk-user-one"
OTHER = "sk-user-two"
ADMIN = "sk-admin-key"
MSG = [{"role": "user", "content": "Hi"}]
RPM = 4


def _config(home: Any, auth: AuthConfig, users: tuple[str, ...], **engine: Any) -> Any:
    cfg = make_test_config(home, api_keys=users)
    return dataclasses.replace(cfg, auth=auth, engine=dataclasses.replace(cfg.engine, **engine))


@pytest.fixture(scope="module")
def roles_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """User keys, an admin key, and a small requests-per-minute budget."""
    # the wrong-key probes below are far more than auth.failed_auth_limit allows (test_auth_failures.py)
    auth = AuthConfig(admin_keys=(ADMIN,), requests_per_minute=RPM, failed_auth_limit=0)
    with running_server(_config(xllm_home, auth, (USER, OTHER, "sk-flood", "sk-sdk")), tiny_catalog, TINY) as info:
        yield info


@pytest.fixture(scope="module")
def fair_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """One request in flight per key, a queue of two, and a token budget."""
    auth = AuthConfig(max_concurrent_per_key=1, tokens_per_minute=200)
    keys = ("sk-x", "sk-y", "sk-z", "sk-tok", "sk-tok-stream", "sk-tok-left", "sk-tok-prompts", "sk-tok-read",
            "sk-tok-gone")
    with running_server(_config(xllm_home, auth, keys, max_queue=2), tiny_catalog, TINY) as info:
        yield info


def _concrete(path: str) -> str:
    """A URL matching a route pattern: every named group becomes ``x``."""
    return re.sub(r"\(\?P<\w+>[^)]*\)", "x", path)


def _calls() -> list[tuple[str, str]]:
    """(method, path) for every method of every route in the table."""
    out = []
    for path, mixin, _ in ROUTES:
        for method in mixin.SUPPORTED_METHODS:
            out.append((method, path))
    return out


def _send(root: str, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"json": {}} if method == "POST" else {}
    return httpx.request(method, root + _concrete(path), headers=headers, timeout=30, **body)


# ----------------------------------------------------------------- roles and the allowlist
def test_every_route_outside_the_allowlist_refuses_a_request_without_credentials(roles_server):
    assert {p for p, _, public in ROUTES if public} <= PUBLIC_PATHS  # the column agrees with the allowlist
    checked = 0
    for method, path in _calls() + [("GET", "/no/such/route"), ("POST", "/v1/no-such")]:
        r = _send(roles_server.root, method, path, None)
        if path in PUBLIC_PATHS:
            assert r.status_code in (200, 503), (method, path)  # answered, not refused (503: not ready)
            continue
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        checked += 1
    assert checked >= 10


def test_user_key_gets_403_on_every_admin_route_and_admin_key_is_served(roles_server):
    # /metrics too: it has every user's request and token counts
    # and the admin methods of other routes (DELETE /v1/models/{id} removes from the store)
    admin_methods = {(m, p) for p, mixin, _ in ROUTES for m in mixin.ADMIN_METHODS}
    admin_calls = [(m, p) for m, p in _calls() if p.startswith("/admin/") or p == "/metrics" or (m, p) in admin_methods]
    assert len(admin_calls) >= 4 and ("GET", "/metrics") in admin_calls
    assert ("DELETE", r"/v1/models/(?P<model_id>.+)") in admin_calls
    for method, path in admin_calls:
        r = _send(roles_server.root, method, path, OTHER)
        assert r.status_code == 403, (method, path)
        err = r.json()["error"]
        assert err["type"] == "permission_error" and "admin" in err["message"]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=roles_server.root, headers=headers, timeout=60) as c:
        assert c.get("/admin/models").status_code == 200
        assert c.post("/admin/models/unload", json={"model": "no-such-model"}).status_code == 404  # past auth
        assert c.post("/admin/models/load", json={}).status_code == 400  # past auth, to body validation
        assert c.get("/v1/models").status_code == 200  # admin keys may call user routes too


def test_a_method_a_route_does_not_serve_is_refused_only_after_authentication(roles_server, xllm_server):
    """A 405 says which routes exist and what they take: anonymous callers get the 401 instead (it was a
    405 before authentication for every verb but the route's own)."""
    checked = 0
    for path, mixin, _ in ROUTES:
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            if method in served_methods(mixin.SUPPORTED_METHODS) or path in PUBLIC_PATHS:  # HEAD where GET is
                continue
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            url = _concrete(path)
            for key in (None, "sk-not-a-key"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                r = httpx.request(method, roles_server.root + url, headers=headers, timeout=30, **body)
                assert r.status_code == 401, (method, path, key, r.status_code)
            admin_route = path.startswith("/admin/") or path == "/metrics"
            if admin_route:  # a user key is refused for the route before the method is looked at
                r = httpx.request(method, roles_server.root + url, headers={"Authorization": f"Bearer {OTHER}"},
                                  timeout=30, **body)
                assert r.status_code == 403, (method, path, r.status_code)
            r = httpx.request(method, xllm_server.root + url, headers={"Authorization": f"Bearer {xllm_server.api_key}"},
                              timeout=30, **body)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "method_not_allowed"
            checked += 1
    assert checked >= 60


def test_only_admin_keys_still_need_a_key_and_keys_live_as_digests():
    auth = ApiKeyAuth((), (ADMIN,))
    assert auth.enabled and not auth.check(None) and not auth.check("Bearer wrong")
    assert auth.identify(f"Bearer {ADMIN}").role == "admin"
    assert ADMIN not in repr(vars(auth)) and ADMIN not in auth.identify(f"Bearer {ADMIN}").key_id
    assert ApiKeyAuth((USER,)).identify(f"Bearer {USER}").role == "admin"  # no admin keys: user keys keep admin rights
    both = ApiKeyAuth((USER, ADMIN), (ADMIN,))
    assert both.identify(f"Bearer {USER}").role == "user" and both.identify(f"Bearer {ADMIN}").role == "admin"


def test_several_user_keys_without_admin_keys_warn_at_start(tmp_path, caplog):
    """Each such key is an admin (the documented default): pulls of server paths, unloads, everyone's usage."""
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.app import make_app

    shared = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "server": {"api_keys": ["k1", "k2"]}})
    owned = dataclasses.replace(shared, auth=AuthConfig(admin_keys=("a1",)))
    alone = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "server": {"api_keys": ["k1"]}})
    # empty and blank keys are no keys (``--api-key "$UNSET"``, ``--admin-key "$UNSET"``), nor is a key listed twice:
    # one key and an empty one was warned about as "2 API keys", and an empty admin key silenced the warning
    one_and_empties = load_config(env={}, overrides={"store": {"home": str(tmp_path)},
                                                     "server": {"api_keys": ["k1", "", " k1 ", "  "]}})
    empty_admin = dataclasses.replace(shared, auth=AuthConfig(admin_keys=("", " ")))
    cases = ((shared, "2 API keys"), (owned, None), (alone, None), (one_and_empties, None), (empty_admin, "2 API keys"))
    for config, warned in cases:
        caplog.clear()
        make_app(config, Engine(config.engine))
        said = [r.getMessage() for r in caplog.records if "auth.admin_keys" in r.getMessage()]
        assert len(said) == (1 if warned else 0) and all(warned in m and "k1" not in m for m in said), said


def test_auth_config_from_the_environment(tmp_path):
    env = {"XLLM_HOME": str(tmp_path), "XLLM_AUTH_ADMIN_KEYS": "a1, a2", "XLLM_AUTH_REQUESTS_PER_MINUTE": "30"}
    cfg = load_config(env=env)
    assert cfg.auth.admin_keys == ("a1", "a2") and cfg.auth.requests_per_minute == 30
    assert cfg.auth.tokens_per_minute == 0 and cfg.auth.max_concurrent_per_key == 0


# ----------------------------------------------------------------------- rate limits
def test_requests_per_minute_gives_429_with_retry_after_while_another_key_is_served(roles_server):
    flood = {"Authorization": "Bearer sk-flood"}
    with httpx.Client(base_url=roles_server.base_url, timeout=30) as c:
        codes = [c.get("/models", headers=flood).status_code for _ in range(RPM)]
        assert codes == [200] * RPM
        r = c.get("/models", headers=flood)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert c.get("/models", headers={"Authorization": f"Bearer {USER}"}).status_code == 200


def test_rejections_are_counted_and_reported_to_listeners():
    seen: list[tuple[str, str]] = []
    limiter = Limiter(AuthConfig(requests_per_minute=1, max_concurrent_per_key=1))
    limiter.listeners.append(lambda key, reason: seen.append((key, reason)))
    limiter.listeners.append(lambda key, reason: 1 / 0)  # a broken hook does not break limiting
    limiter.admit("k1")
    with pytest.raises(RateLimited):
        limiter.admit("k1")  # one in flight already
    limiter.release("k1")
    with pytest.raises(RateLimited) as info:
        limiter.admit("k1")  # the minute's single request is spent
    assert info.value.retry_after >= 1
    limiter.admit("k2")
    assert limiter.rejections == {("k1", "concurrency"): 1, ("k1", "requests"): 1}
    assert seen == [("k1", "concurrency"), ("k1", "requests")]
    assert limiter.in_flight("k2") == 1 and limiter.in_flight("k1") == 0


def test_a_listener_may_use_the_limiter():
    """Listeners run after the lock is released: one that charges or releases does not deadlock the server."""
    limiter = Limiter(AuthConfig(max_concurrent_per_key=1, tokens_per_minute=1000))
    limiter.listeners.append(lambda key, reason: limiter.charge(key, 10))
    limiter.admit("k")
    result: list[BaseException] = []

    def refused() -> None:
        try:
            limiter.admit("k")
        except RateLimited as exc:
            result.append(exc)

    worker = threading.Thread(target=refused, daemon=True)  # on the old code it would block forever
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and len(result) == 1
    assert limiter.rejections == {("k", "concurrency"): 1}


def test_openai_sdk_sees_rate_limit_error(roles_server):
    with openai.OpenAI(base_url=roles_server.base_url, api_key="sk-sdk", max_retries=0, timeout=30) as c:
        for _ in range(RPM):
            c.models.list()
        with pytest.raises(openai.RateLimitError) as info:
            c.models.list()
    assert info.value.status_code == 429 and int(info.value.response.headers["Retry-After"]) >= 1


def test_token_bucket_refills_and_may_go_into_debt():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])
    bucket.take(90)
    assert bucket.wait_for(1) == pytest.approx(31.0)
    now[0] = 31.0
    assert bucket.wait_for(1) == 0.0
    now[0] = 1000.0
    assert bucket.level <= 60 and bucket.wait_for(60) == 0.0


# ------------------------------------------------------------------ fairness and queue
def _stream_open(c: httpx.Client, root: str, key: str) -> Any:
    """Start a long streamed completion for ``key`` and return once it is generating."""
    body = {"model": TINY, "messages": MSG, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    cm = c.stream("POST", root + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    while not next(lines).startswith("data: "):
        pass
    cm.lines = lines  # dropping the line iterator would close the stream
    return cm


def _chat(root: str, key: str, max_tokens: int = 2, **extra: Any) -> httpx.Response:
    body = {"model": TINY, "messages": MSG, "max_tokens": max_tokens, **extra}
    return httpx.post(root + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _wait_idle(engine: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.queued == 0:
            return
        time.sleep(0.02)
    raise AssertionError(engine.stats())


def test_concurrency_cap_refuses_the_flooding_key_while_another_key_succeeds(fair_server):
    _wait_idle(fair_server.engine)
    with httpx.Client(timeout=60) as c:
        held = _stream_open(c, fair_server.root, "sk-x")
        try:
            r = _chat(fair_server.root, "sk-x")
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "concurrent" in r.json()["error"]["message"]
            ok = _chat(fair_server.root, "sk-y")
            assert ok.status_code == 200, ok.text
        finally:
            held.__exit__(None, None, None)
    _wait_idle(fair_server.engine)
    deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow, a slot that never returns fails anyway
    while _chat(fair_server.root, "sk-x").status_code != 200:  # the slot came back when the stream closed
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_full_queue_is_503_through_http_for_a_user_past_an_equal_share(fair_server):
    _wait_idle(fair_server.engine)
    with httpx.Client(timeout=60) as c:
        first = _stream_open(c, fair_server.root, "sk-x")
        try:
            with httpx.Client(timeout=60) as c2:
                second = _stream_open(c2, fair_server.root, "sk-y")
                try:
                    # x and y fill the queue of 2; z holds none of it and is served, not refused
                    assert _chat(fair_server.root, "sk-z").status_code == 200
                    r = _chat(fair_server.root, "sk-z", n=2)  # 2 sequences: more than a third of the queue
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"] == "1"
                    assert "queue of model" in r.json()["error"]["message"]
                    # streamed, the refusal is the same real 503 the SDK maps and may retry
                    sdk = openai.OpenAI(base_url=fair_server.root + "/v1", api_key="sk-z", max_retries=0)
                    with pytest.raises(openai.InternalServerError) as refused:
                        sdk.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, n=2, stream=True)
                    assert refused.value.status_code == 503 and refused.value.response.headers["Retry-After"] == "1"
                    with pytest.raises(openai.InternalServerError):
                        sdk.completions.create(model=TINY, prompt="hi", max_tokens=2, n=2, stream=True)
                finally:
                    second.__exit__(None, None, None)
        finally:
            first.__exit__(None, None, None)
    _wait_idle(fair_server.engine)
    assert _chat(fair_server.root, "sk-z").status_code == 200


def test_tokens_per_minute_charges_actual_usage(fair_server):
    _wait_idle(fair_server.engine)
    r = _chat(fair_server.root, "sk-tok", max_tokens=250, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] > 200
    refused = _chat(fair_server.root, "sk-tok")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "Token rate limit" in refused.json()["error"]["message"]
    assert _chat(fair_server.root, "sk-y").status_code == 200  # another key's budget is untouched


def test_a_spent_token_budget_still_lets_the_key_read(fair_server):
    """Tokens per minute gate generation only: listing models and reading stored objects spend none."""
    _wait_idle(fair_server.engine)
    key = "sk-tok-read"
    stored = httpx.post(fair_server.root + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": TINY, "messages": MSG, "max_tokens": 250, "ignore_eos": True, "store": True})
    assert stored.status_code == 200 and stored.json()["usage"]["total_tokens"] > 200
    _assert_token_limited(fair_server, key)  # generation waits for the budget
    with httpx.Client(base_url=fair_server.root, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get(f"/v1/chat/completions/{stored.json()['id']}").json()["id"] == stored.json()["id"]
        assert c.get("/v1/chat/completions").json()["data"][0]["id"] == stored.json()["id"]
        assert c.post("/v1/embeddings", json={"model": TINY, "input": "x"}).status_code == 429  # (tokens too)


def test_tokens_per_minute_charges_streams_too(fair_server):
    _wait_idle(fair_server.engine)
    body = {"model": TINY, "messages": MSG, "max_tokens": 250, "ignore_eos": True, "stream": True}
    _stream_without_usage(fair_server, "/chat/completions", body, "sk-tok-stream")
    # no usage chunk was asked for (and chunks are not tokens: the engine merges them), yet
    # the stream was charged its real usage, which empties the 200-token bucket
    _assert_token_limited(fair_server, "sk-tok-stream")


def test_tokens_per_minute_charges_a_stream_left_early(fair_server):
    """A stream the client leaves is charged its prompt and what it received, not its chunk count."""
    _wait_idle(fair_server.engine)
    long_prompt = [{"role": "user", "content": "Count the words in this. " * 40}]  # ~250 tokens: past the budget
    body = {"model": TINY, "messages": long_prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": "Bearer sk-tok-left"}
    with httpx.stream("POST", fair_server.base_url + "/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for n, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
            if n == 3:
                break
    _wait_idle(fair_server.engine)
    refused = _chat(fair_server.root, "sk-tok-left")
    assert refused.status_code == 429 and "Token rate limit" in refused.json()["error"]["message"]


def test_tokens_per_minute_charges_a_full_answer_its_client_left_before_it_came(fair_server):
    """A request that is not streamed and whose client goes while it generates (a client timeout, an interrupted
    cell; the SDK then retries it) was charged nothing: only a finished answer's usage reached the bucket."""
    import socket

    _wait_idle(fair_server.engine)
    long_prompt = [{"role": "user", "content": "Count the words in this. " * 40}]  # ~250 tokens: past the budget
    body = json.dumps({"model": TINY, "messages": long_prompt, "max_tokens": 1000, "ignore_eos": True}).encode()
    port = int(fair_server.root.rsplit(":", 1)[1])
    before = fair_server.engine.stats().tokens
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-tok-gone\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while fair_server.engine.stats().tokens < before + 3:  # it is generating (tokens reach the handler)
            assert time.monotonic() < deadline, fair_server.engine.stats()
            time.sleep(0.01)
    finally:
        s.close()  # the client leaves before its answer
    _wait_idle(fair_server.engine)
    refused = _chat(fair_server.root, "sk-tok-gone")
    assert refused.status_code == 429 and "Token rate limit" in refused.json()["error"]["message"], refused.text


def test_tokens_per_minute_charges_a_streamed_completion_of_several_prompts(fair_server):
    """Each prompt's generation runs in a task of its own: their tokens still reach the stream's tally."""
    _wait_idle(fair_server.engine)
    prompts = ["Count the words in this. " * 25] * 2  # ~150 prompt tokens each: past the budget together
    body = {"model": TINY, "prompt": prompts, "max_tokens": 2, "stream": True}
    _stream_without_usage(fair_server, "/completions", body, "sk-tok-prompts")
    # a handful of chunks, ~300 tokens: charged the tokens, which empties the 200-token bucket
    _assert_token_limited(fair_server, "sk-tok-prompts")


def _stream_without_usage(server: Any, path: str, body: dict, key: str) -> None:
    """Read a whole stream that carries no usage chunk (the server must count the tokens itself)."""
    with httpx.stream("POST", server.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"usage"' not in "".join(events)


def _assert_token_limited(server: Any, key: str) -> None:
    """The key's token budget is spent: its next request is a 429 saying so."""
    refused = _chat(server.root, key)
    assert refused.status_code == 429 and "Token rate limit" in refused.json()["error"]["message"]


def test_keep_alive_needs_an_admin_where_keys_have_roles(roles_server):
    """keep_alive decides for every user how long a model stays loaded (0 unloads it, -1 pins it): a user key
    may not send it (an admin key may: tests/test_model_manager.py)."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for value in (0, -1):  # (a small per-minute budget per key: three requests)
        r = httpx.post(roles_server.root + "/v1/chat/completions", json={**body, "keep_alive": value},
                       headers={"Authorization": f"Bearer {OTHER}"}, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["param"] == "keep_alive", r.text
    # nor written with an escape, which JSON decodes to the same key
    r = httpx.post(roles_server.root + "/v1/chat/completions", headers={"Authorization": f"Bearer {OTHER}",
                   "Content-Type": "application/json"},
                   content=json.dumps(body)[:-1].encode() + b', "keep\\u005falive": 0}', timeout=60)
    assert r.status_code == 403 and r.json()["error"]["param"] == "keep_alive", r.text
    assert roles_server.engine.is_loaded(TINY)  # the user's keep_alive 0 did not unload it
    r = httpx.post(roles_server.root + "/v1/completions", json={"model": TINY, "prompt": '"keep_alive"', "max_tokens": 1},
                   headers={"Authorization": f"Bearer {USER}"}, timeout=60)
    assert r.status_code == 200, r.text  # the words in a prompt are no setting


def test_a_stalled_request_is_dropped_after_the_connection_timeout(xllm_home, tiny_catalog):
    """Unfinished headers (or a body that stops coming) must not hold a connection for good: a client that
    opens many and sends nothing would otherwise exhaust the server, unauthenticated."""
    import socket

    config = dataclasses.replace(make_test_config(xllm_home), server=dataclasses.replace(
        make_test_config(xllm_home).server, connection_timeout_seconds=1.0))
    with running_server(config, tiny_catalog, TINY) as info:
        port = int(info.root.rsplit(":", 1)[1])
        stalled = []
        for partial in (b"GET /health HTTP/1.1\r\nHost: x\r\n",
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                        + info.api_key.encode() + b"\r\nContent-Length: 100\r\n\r\n{"):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(partial)
            stalled.append(s)
        started = time.monotonic()
        for s in stalled:
            assert s.recv(1024) == b""  # closed by the server, nothing answered
            s.close()
        assert time.monotonic() - started < 8
        assert httpx.get(info.root + "/health", timeout=10).status_code == 200  # and it goes on serving


async def test_a_stream_closed_at_a_yield_is_charged_the_tokens_its_engine_stream_counts_as_it_closes():
    """The SSE writer closes the metered stream where it waits at a yield (its client gone at a write): the engine
    stream below counts its tokens only as it closes (``ObservedEngine.generate``), which was after the charge,
    so the key was charged its chunk count (2) instead of its prompt and tokens (300)."""
    from xllm_jupyter.server.limits import _metered, note_stream_tokens, open_stream_tally

    async def engine_stream():
        try:
            for n in range(10):
                yield {"choices": [{"index": 0, "delta": {"content": str(n)}}]}
        finally:
            note_stream_tokens(300)  # what the engine wrapper reports when it is closed early

    limiter = Limiter(AuthConfig(tokens_per_minute=1000), clock=lambda: 0.0)  # no refill in between
    open_stream_tally()
    stream = _metered(engine_stream(), limiter, "sk-gone")
    assert [await stream.__anext__(), await stream.__anext__()]
    await stream.aclose()
    assert limiter._tokens["sk-gone"].level == 700
