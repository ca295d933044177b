"""Hub identities: a service's token and a user's token never share a user key (quotas, stored responses)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("jupyterhub")

from xllm_jupyter.core.config import XllmConfig, load_config  # noqa: E402
from xllm_jupyter.hub.app import caller_from_model  # noqa: E402


def test_no_hub_user_name_is_a_services_identity():
    config = XllmConfig()
    service = caller_from_model({"kind": "service", "name": "grader"}, config)
    # JupyterHub accepts ':' in user names (never '/'), so "service:grader" can be a real user
    impostor = caller_from_model({"kind": "user", "name": "service:grader", "groups": []}, config)
    assert service.user == "service/grader" and impostor.user == "service:grader"
    assert service.user != impostor.user and not service.admin and not impostor.admin


async def test_a_token_in_the_query_string_never_reaches_the_log(tmp_path, caplog):
    """Tornado's default access line logs the URI with its query: a client's ?token= (a hub token) went to the log."""
    import logging

    import tornado.httpclient
    import tornado.httpserver
    import tornado.testing

    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.app import make_hub_app, make_hub_auth

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"}})
    env = {"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api"}
    app = make_hub_app(config, Engine(config.engine), make_hub_auth(env))
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    caplog.set_level(logging.DEBUG)
    secret = "hub-token-in-a-url-0123456789"
    try:
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/services/xllm/v1/models?token={secret}", raise_error=False)
    finally:
        server.stop()
    assert response.code in (401, 503)  # no hub at that address: refused either way
    assert any("/services/xllm/v1/models" in r.getMessage() for r in caplog.records)  # the access line was written
    assert not [r for r in caplog.records if secret in r.getMessage()]



def test_a_token_in_the_url_is_ignored_whatever_the_request_says(tmp_path):
    """docs/jupyterhub.md: ``?token=`` is ignored (401) unless JUPYTERHUB_ALLOW_TOKEN_IN_URL=1 (read when
    jupyterhub is imported, so not set here); HubAuth took it from any request saying ``Sec-Fetch-Mode: websocket``."""
    import httpx

    from tests.server_fixtures import HUB_ALICE, running_hub_app

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"}})

    async def user_for_token(token: str):
        return HUB_ALICE if token == "alice-token" else None

    with running_hub_app(config, user_for_token) as root, httpx.Client(base_url=root, timeout=30) as http:
        assert http.get("/v1/models", headers={"Authorization": "Bearer alice-token"}).status_code == 200
        for headers in ({}, {"Sec-Fetch-Mode": "websocket"}):
            r = http.get("/v1/models?token=alice-token", headers=headers)
            assert r.status_code == 401, (headers, r.text)


def test_the_page_takes_a_token_in_the_url_only_as_the_api_does(tmp_path):
    """The page follows the API routes' rule: ``?token=`` is ignored unless JUPYTERHUB_ALLOW_TOKEN_IN_URL=1, even
    from a request saying ``Sec-Fetch-Mode: websocket`` (HubAuth's own rule, which signed that request in)."""
    import httpx

    from tests.server_fixtures import HUB_ALICE, running_hub_app

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"}})

    async def user_for_token(token: str):
        return HUB_ALICE if token == "alice-token" else None

    with running_hub_app(config, user_for_token) as root, httpx.Client(base_url=root, timeout=30) as http:
        signed_in = http.get("/", headers={"Authorization": "token alice-token"})
        assert signed_in.status_code == 200 and HUB_ALICE["name"] in signed_in.text
        for headers in ({}, {"Sec-Fetch-Mode": "websocket"}):
            r = http.get("/?token=alice-token", headers=headers)
            assert r.status_code != 200 and HUB_ALICE["name"] not in r.text, (headers, r.status_code)


def test_an_account_is_its_name_and_creation_time_and_a_service_stays_a_service():
    from xllm_jupyter.core.config import HubConfig

    config = dataclasses.replace(XllmConfig(), hub=HubConfig(admin_users=("carol",)))
    old = caller_from_model({"kind": "user", "name": "carol", "created": "2026-01-05T09:00:00.000000Z"}, config)
    new = caller_from_model({"kind": "user", "name": "carol", "created": "2026-02-01T10:00:00.000000Z"}, config)
    legacy = caller_from_model({"kind": "user", "name": "carol", "created": None}, config)  # time unknown
    assert (old.user, old.name, old.admin) == ("carol/2026-01-05T09:00:00.000000Z", "carol", True)  # admin by name
    assert new.user != old.user and legacy.user == "carol" and legacy.name is None
    assert caller_from_model({"kind": "service", "name": "carol", "created": "x"}, config).user == "service/carol"


def test_quota_overrides_name_users_and_saved_counts_go_to_the_first_account_of_their_name(tmp_path):
    """Per-user overrides name users, so they hold for every account of the name; counts saved under the bare name
    (before accounts were told apart) are taken over by the first account to call, not by a later one."""
    import json
    import time

    from xllm_jupyter.core.config import QuotaConfig
    from xllm_jupyter.server.usage import Caller, UsageTracker

    day = time.strftime("%Y-%m-%d", time.gmtime())
    path = tmp_path / "usage.json"
    path.write_text(json.dumps({"version": 1, "users": {"carol": {"requests": 7, "day": day, "tokens_today": 40}}}))
    tracker = UsageTracker(QuotaConfig(user_tokens_per_day=("carol=50",)), path=path)
    first = Caller("carol/2026-01-05T09:00:00.000000Z", name="carol")
    second = Caller("carol/2026-02-01T10:00:00.000000Z", name="carol")
    try:
        assert tracker.limits(first)[1] == tracker.limits(second)[1] == 50
        tracker.release(tracker.admit(first))
        tracker.charge(first.user, 5, 6)  # 40 + 11 > 50: the first account is over its quota
        with pytest.raises(Exception, match="Daily token quota"):
            tracker.admit(first)
        tracker.release(tracker.admit(second))  # the next account of the name starts afresh
        rows = {r["account"]: r for r in tracker.snapshot("carol")}  # ?user=NAME lists every account of the name
        assert {a: (r["user"], r["requests"]) for a, r in rows.items()} == {first.user: ("carol", 8),
                                                                            second.user: ("carol", 1)}
        assert "carol" not in tracker.records() and tracker.records()[second.user]["name"] == "carol"
    finally:
        tracker.close()


def test_one_time_in_any_of_its_renderings_is_one_account():
    from xllm_jupyter.hub.accounts import canonical_time

    config = XllmConfig()
    keys = {caller_from_model({"kind": "user", "name": "carol", "created": t}, config).user
            for t in ("2026-01-05T09:00:00Z", "2026-01-05T09:00:00.000000Z", "2026-01-05T09:00:00+00:00",
                      "2026-01-05T10:00:00+01:00")}
    assert keys == {"carol/2026-01-05T09:00:00.000000Z"}
    assert canonical_time("2026-01-05T09:00:00.000001Z") != canonical_time("2026-01-05T09:00:00Z")
    assert canonical_time("") is None and canonical_time(None) is None and canonical_time("soon") == "soon"


def test_metrics_and_admin_usage_name_the_user_not_the_account():
    """The ``user`` metrics label and ``/admin/usage``'s ``user`` stay the bare name, as before accounts were told
    apart (dashboards filter on it; one label per name, not per account); ``account`` is the key counts are kept
    under."""
    from prometheus_client import CollectorRegistry

    from xllm_jupyter.server.usage import Caller, UsageTracker

    registry = CollectorRegistry()
    tracker = UsageTracker(registry=registry)
    old, new = Caller("carol/2026-01-05T09:00:00.000000Z", name="carol"), Caller("carol/2026-02-01T10:00:00.000000Z", name="carol")
    try:
        for caller in (old, new):
            tracker.charge(tracker.admit(caller), 2, 3)
        tracker.release(old.user)
        assert registry.get_sample_value("xllm_user_requests_total", {"user": "carol"}) == 2
        assert registry.get_sample_value("xllm_user_tokens_total", {"user": "carol", "kind": "completion"}) == 6
        assert registry.get_sample_value("xllm_user_requests_in_flight", {"user": "carol"}) == 1
        assert registry.get_sample_value("xllm_user_requests_total", {"user": old.user}) is None
        rows = tracker.snapshot("carol")
        assert [(r["user"], r["account"]) for r in rows] == [("carol", old.user), ("carol", new.user)]
    finally:
        tracker.close()


def _hub_answers(answers: list, asked: list):
    """A stand-in hub API: the service holds ``read:users``; each ``GET /users/{name}`` gets the next of ``answers``
    (a model, or None for HubAuth's 403); every request is noted in ``asked``."""
    from tests.server_fixtures import hub_api_reading_users

    async def hub_api(method: str, url: str, **kwargs):
        asked.append(url.rsplit("/api", 1)[-1])
        if url.endswith("/user"):
            return await hub_api_reading_users(method, url)
        return answers.pop(0)

    return hub_api


def test_an_account_lookup_the_hub_refuses_is_a_503_never_the_name_alone(tmp_path):
    """A service that holds read:users and whose lookup fails once (a 403 while the hub's roles change, a flaky
    proxy) answered with the bare name: the same person had two keys by turns (two quota buckets, their stored
    objects gone and back). Now that request is a 503 ``hub_unavailable`` and the next gets the account again."""
    import httpx

    from tests.server_fixtures import running_hub_app

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"}})
    bob = {"kind": "user", "name": "bob", "groups": [], "scopes": ["access:services!service=xllm"]}
    created = {"kind": "user", "name": "bob", "created": "2026-03-01T08:00:00.000000Z"}
    asked: list[str] = []

    async def user_for_token(token: str):
        return bob if token.startswith("bob-") else None

    with running_hub_app(config, user_for_token, _hub_answers([created, None, created], asked)) as root, \
            httpx.Client(base_url=root, timeout=30) as http:
        assert http.get("/", headers={"Authorization": "token bob-1"}).status_code == 200
        refused = http.get("/v1/models", headers={"Authorization": "token bob-2"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "hub_unavailable"
        page = http.get("/", headers={"Authorization": "token bob-2"})  # the scopes asked again, then the account
        assert page.status_code == 200 and "bob" in page.text
    assert asked == ["/user", "/users/bob", "/users/bob", "/user", "/users/bob"]


def test_only_a_token_the_hub_vouched_for_costs_a_lookup_and_a_burst_asks_the_scopes_once(tmp_path):
    """Tokens the hub does not know never reach the account lookup (no hub requests for a guesser to multiply); a
    burst of fresh tokens asks the service's own scopes once, then one lookup per token (cached per token)."""
    import asyncio

    import httpx

    from tests.server_fixtures import running_hub_app

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"},
                                            "auth": {"failed_auth_limit": 1000}})
    created = {"kind": "user", "name": "bob", "created": "2026-03-01T08:00:00.000000Z"}
    asked: list[str] = []

    async def user_for_token(token: str):
        await asyncio.sleep(0.05)  # the burst arrives while the first answers are still on their way
        if token.startswith("bob-"):
            return {"kind": "user", "name": "bob", "groups": [], "scopes": ["access:services!service=xllm"]}
        return None

    async def burst(root: str) -> list[int]:
        async with httpx.AsyncClient(base_url=root, timeout=60) as http:
            bad = await asyncio.gather(*(http.get("/v1/models", headers={"Authorization": f"token guess-{i}"})
                                         for i in range(20)))
            assert not asked and {r.status_code for r in bad} <= {401, 429}
            good = await asyncio.gather(*(http.get("/v1/models", headers={"Authorization": f"token bob-{i % 10}"})
                                          for i in range(30)))
            return [r.status_code for r in good]

    with running_hub_app(config, user_for_token, _hub_answers([created] * 30, asked)) as root:
        assert set(asyncio.run(burst(root))) == {200}
    assert asked.count("/user") == 1
    assert 10 <= asked.count("/users/bob") <= 30  # each token once, but for concurrent first requests of one token


async def test_the_services_scopes_are_asked_once_bounded_and_again_in_the_background(caplog):
    """The scope question is shared by a burst, bounded by the hub timeout (HubAuth's client would hold it, and every
    request waiting on it, for 5 minutes), and once answered it is asked again behind the last answer: a hub down
    or hanging for a moment then costs no request a 503."""
    import asyncio
    import time

    from xllm_jupyter.hub.accounts import AccountTimes, service_reads_users

    class Hub:
        api_url = "http://hub/hub/api"
        asked = 0
        hang = False

        async def _api_request(self, method: str, url: str, **_):
            self.asked += 1
            if self.hang:
                await asyncio.sleep(3600)
            await asyncio.sleep(0.01)
            return {"kind": "service", "name": "xllm", "scopes": ["read:users"]}

    hub, times = Hub(), AccountTimes(max_age=0.05)
    assert await asyncio.gather(*(service_reads_users(hub, times, 1.0) for _ in range(50))) == [True] * 50
    assert hub.asked == 1
    await asyncio.sleep(0.1)  # stale now; the hub hangs from here on
    hub.hang = True
    began = time.monotonic()
    assert [await service_reads_users(hub, times, 0.2) for _ in range(5)] == [True] * 5  # the last answer, at once
    assert time.monotonic() - began < 0.1
    await asyncio.sleep(0.01)
    assert hub.asked == 2  # one question in the background
    fresh = AccountTimes(max_age=60)
    with pytest.raises(asyncio.TimeoutError):  # never answered: the request waits, but only so long
        await service_reads_users(hub, fresh, 0.2)
    assert fresh.asking is None and fresh.reads_users is None
    await asyncio.sleep(0.3)  # the background question gave up too (its timeout), so a later one may be asked
    assert times.asking is None
    # the background failure is in the log (the requests went on with the last answer, so nothing else says it)
    assert [r for r in caplog.records if "could not ask the hub for the service's scopes (TimeoutError)" in r.getMessage()]


def test_the_page_answers_a_failed_account_lookup_as_it_answers_a_failed_login(tmp_path):
    """The page's account lookup runs after its login check: a hub failing there was an unhandled error (500 and a
    traceback in the log); it is the login's plain-text 503 with Retry-After, and a user deleted in between a 403."""
    import httpx
    from tornado.web import HTTPError

    from tests.server_fixtures import running_hub_app

    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"}})
    answers: list = [HTTPError(502, "Failed to check authorization (upstream problem)"),
                     HTTPError(500, "Failed to check authorization: Not Found")]

    async def user_for_token(token: str):
        return {"kind": "user", "name": "bob", "groups": [], "scopes": ["access:services!service=xllm"]}

    async def hub_api(method: str, url: str, **_):
        if url.endswith("/user"):
            return {"kind": "service", "name": "xllm", "scopes": ["read:users"]}
        raise answers.pop(0)

    with running_hub_app(config, user_for_token, hub_api) as root, httpx.Client(base_url=root, timeout=30) as http:
        down = http.get("/", headers={"Authorization": "token bob-1"})
        assert down.status_code == 503 and down.headers["Retry-After"] == "1", down.text
        assert "retry later" in down.text
        assert http.get("/", headers={"Authorization": "token bob-2"}).status_code == 403
