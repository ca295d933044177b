"""Failed authentications are capped per client address: standalone API keys and hub tokens."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import tornado.httputil

from tests.helpers import Clock
from tests.server_fixtures import (
    HUB_ALICE,
    TINY,
    make_test_config,
    running_hub_app,
    running_server,
)
from xllm_jupyter.core.config import AuthConfig, load_config
from xllm_jupyter.server.auth_failures import FailedAuthLimiter, client_label

KEY = "sk-right-key"
LIMIT = 3


def _http(root: str, source: str = "127.0.0.1") -> httpx.Client:
    """A client whose connections come from ``source`` (any 127.x address reaches a server on 127.0.0.1)."""
    return httpx.Client(base_url=root, timeout=60, transport=httpx.HTTPTransport(local_address=source))


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def capped_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A standalone server allowing ``LIMIT`` failed authentications per address and minute."""
    cfg = make_test_config(xllm_home, api_keys=(KEY,))
    cfg = dataclasses.replace(cfg, auth=AuthConfig(failed_auth_limit=LIMIT, failed_auth_window_seconds=30))
    with running_server(cfg, tiny_catalog, TINY) as info:
        yield info


def _waits_its_turn(client: httpx.Client, key: str) -> bool:
    """True when a request from ``client``'s address is held for its turn (a capped address: 10 s apart here)."""
    try:
        client.get("/v1/models", headers=_bearer(key), timeout=2)
    except httpx.TimeoutException:
        return True
    return False


def test_an_address_guessing_keys_is_capped_and_others_are_served(capped_server):
    """Past the cap an address's keys are checked one at a time, ``window / limit`` apart (the 429 of a full
    waiting line, and a right key served from a capped address: test_auth_failures_shared_address.py)."""
    with _http(capped_server.root, "127.0.0.3") as guesser, _http(capped_server.root, "127.0.0.4") as other:
        for _ in range(3):  # no key at all is no guess: never counted
            assert guesser.get("/v1/models").status_code == 401
        for i in range(LIMIT):
            r = guesser.get("/v1/models", headers=_bearer(f"sk-guess-{i}"))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert _waits_its_turn(guesser, "sk-guess-next")
        # another address: its right key is served, its wrong key is a plain 401
        assert other.get("/v1/models", headers=_bearer(KEY)).status_code == 200
        assert other.get("/v1/models", headers=_bearer("sk-wrong")).status_code == 401
        assert guesser.get("/health").status_code == 200  # public routes need no key, so nothing to refuse


def test_a_right_key_does_not_wipe_the_count(capped_server):
    """A caller holding a user key must not interleave it to go on guessing (an admin key, say)."""
    with _http(capped_server.root, "127.0.0.5") as c:
        for i in range(LIMIT):
            assert c.get("/v1/models", headers=_bearer(KEY)).status_code == 200
            assert c.get("/v1/models", headers=_bearer(f"sk-admin-guess-{i}")).status_code == 401
        assert _waits_its_turn(c, "sk-admin-guess-x")  # capped all the same


# ---------------------------------------------------------------- the limiter itself
def _limiter(clock: Clock, **auth: Any) -> FailedAuthLimiter:
    values = {"failed_auth_limit": 2, "failed_auth_window_seconds": 60.0, **auth}
    return FailedAuthLimiter(AuthConfig(**values), clock)


def test_the_window_ends_and_the_address_starts_afresh():
    from xllm_jupyter.core.errors import RateLimited

    clock = Clock()
    lim = _limiter(clock)
    lim.failed("10.0.0.1")
    lim.failed("10.0.0.1")
    with pytest.raises(RateLimited) as info:
        lim.check("10.0.0.1")
    assert info.value.retry_after == 60
    clock.now += 45
    with pytest.raises(RateLimited) as info:
        lim.check("10.0.0.1")
    assert info.value.retry_after == 15
    lim.check("10.0.0.2")  # someone else
    clock.now += 15
    lim.check("10.0.0.1")  # the window is over
    lim.failed("10.0.0.1")
    lim.check("10.0.0.1")  # one failure in the new window
    assert lim.refused == 2


def test_a_spray_of_addresses_cannot_grow_the_table():
    clock = Clock()
    lim = _limiter(clock, failed_auth_max_clients=50)
    for i in range(5000):
        lim.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        lim.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(lim) == 50
    from xllm_jupyter.core.errors import RateLimited

    with pytest.raises(RateLimited):  # the latest ones are still remembered
        lim.check("10.0.19.135")  # i = 4999


def test_an_ipv6_host_counts_by_its_64():
    assert client_label("2001:db8:1:2::1") == client_label("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_label("2001:db8:1:3::1") != client_label("2001:db8:1:2::1")
    assert client_label("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_label("x" * 500) == "x" * 64


def _request(peer: str, forwarded: list[str] | None = None) -> Any:
    headers = tornado.httputil.HTTPHeaders()
    for value in forwarded or ():
        headers.add("X-Forwarded-For", value)
    return SimpleNamespace(remote_ip=peer, headers=headers)


def test_forwarded_for_is_read_only_from_trusted_proxies():
    lim = _limiter(Clock(), trusted_proxies=("127.0.0.1", "10.1.0.0/16"))
    # the proxy appends the address it was connected from; what the client wrote before that is not trusted
    assert lim.client(_request("127.0.0.1", ["6.6.6.6, 192.0.2.9"])) == "192.0.2.9"
    assert lim.client(_request("127.0.0.1", ["6.6.6.6", "192.0.2.9, 10.1.2.3"])) == "192.0.2.9"  # two of our proxies
    assert lim.client(_request("127.0.0.1")) is None  # a direct caller at a proxy's address: shared, never counted
    assert lim.client(_request("192.0.2.50", ["127.0.0.1"])) == "192.0.2.50"  # not a proxy of ours: its header is ignored
    assert _limiter(Clock()).client(_request("127.0.0.1", ["192.0.2.9"])) == "127.0.0.1"  # none trusted by default


def test_a_proxy_that_writes_the_clients_port_does_not_make_each_connection_a_fresh_client():
    """Some proxies write ``ip:port`` hops: each guess from a new source port was a new client with its own cap."""
    lim = _limiter(Clock(), trusted_proxies=("127.0.0.1",))
    assert lim.client(_request("127.0.0.1", ["6.6.6.6, 192.0.2.9:50123"])) == "192.0.2.9"
    assert lim.client(_request("127.0.0.1", ["[2001:db8::1]:50123"])) == "2001:db8::/64"
    assert lim.client(_request("127.0.0.1", ["192.0.2.9, 127.0.0.1:4444"])) == "192.0.2.9"  # our proxy, with a port
    assert client_label("::ffff:192.0.2.9") == client_label("192.0.2.9") == "192.0.2.9"


def test_config_keys_from_the_environment_and_the_hub_trusts_its_loopback_proxy(tmp_path):
    from xllm_jupyter.core.errors import ConfigError

    cfg = load_config(env={"XLLM_HOME": str(tmp_path), "XLLM_AUTH_FAILED_AUTH_LIMIT": "5",
                           "XLLM_AUTH_FAILED_AUTH_WINDOW_SECONDS": "30",
                           "XLLM_AUTH_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"})
    assert (cfg.auth.failed_auth_limit, cfg.auth.failed_auth_window_seconds) == (5, 30.0)
    assert cfg.auth.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    default = load_config(env={"XLLM_HOME": str(tmp_path)})
    assert default.auth.failed_auth_limit > 0 and default.auth.trusted_proxies == ()
    with pytest.raises(ConfigError, match="failed_auth_limit"):
        load_config(env={"XLLM_HOME": str(tmp_path), "XLLM_AUTH_FAILED_AUTH_LIMIT": "-1"})
    for endless in ("inf", "nan", "1e999"):  # an endless window made every capped request a 500 (Retry-After)
        with pytest.raises(ConfigError, match="failed_auth_window_seconds.*finite"):
            load_config(env={"XLLM_HOME": str(tmp_path), "XLLM_AUTH_FAILED_AUTH_WINDOW_SECONDS": endless})
    (tmp_path / "endless.yaml").write_text("auth:\n  failed_auth_window_seconds: .inf\n")
    with pytest.raises(ConfigError, match="failed_auth_window_seconds.*finite"):
        load_config(tmp_path / "endless.yaml", env={"XLLM_HOME": str(tmp_path)})
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.hub.service import load_hub_config

    assert "127.0.0.1" in load_hub_config(env={"XLLM_HOME": str(tmp_path)}).auth.trusted_proxies


# ---------------------------------------------------------------- the hub service
@pytest.fixture
def hub_service(tmp_path) -> Iterator[Any]:
    """The hub app on a real port, its hub stood in for by a counting ``user_for_token``."""
    pytest.importorskip("jupyterhub")
    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"},
                                            "auth": {"failed_auth_limit": LIMIT}})
    asked: list[str] = []

    async def user_for_token(token: str) -> Any:
        asked.append(token)
        return HUB_ALICE if token == "good-token" else None

    with running_hub_app(config, user_for_token) as root:
        yield SimpleNamespace(root=root, asked=asked)


def test_hub_tokens_the_hub_does_not_know_are_capped_and_no_longer_sent_to_it(hub_service):
    def token(t: str) -> dict[str, str]:
        return {"Authorization": f"token {t}"}

    with _http(hub_service.root, "127.0.0.6") as guesser, _http(hub_service.root, "127.0.0.7") as other:
        for i in range(LIMIT):
            assert guesser.get("/v1/models", headers=token(f"guess-{i}")).status_code == 401
        assert len(hub_service.asked) == LIMIT
        # past the cap a guess waits its turn: one every window / limit (20 s here)
        with pytest.raises(httpx.TimeoutException):
            guesser.get("/v1/models", headers=token("more-0"), timeout=2)
        assert len(hub_service.asked) == LIMIT  # the hub's API was not asked about it meanwhile
        assert other.get("/v1/models", headers=token("good-token")).status_code == 200


def test_the_hub_page_counts_and_caps_guessed_tokens_too(hub_service):
    page = hub_service.root + "/"  # the browser page: a token in the header is looked up as on the API
    with _http(hub_service.root, "127.0.0.8") as guesser:
        for i in range(LIMIT):
            r = guesser.get(page, headers={"Authorization": f"token page-guess-{i}"}, follow_redirects=False)
            assert r.status_code == 302  # not logged in: off to the hub's login
        asked = len(hub_service.asked)
        with pytest.raises(httpx.TimeoutException):  # past the cap: its turn comes window / limit later
            guesser.get(page, headers={"Authorization": "token page-guess-next"}, follow_redirects=False, timeout=2)
        assert len(hub_service.asked) == asked  # the hub was not asked meanwhile


def test_an_address_guessing_past_the_cap_gets_no_fresh_burst_when_its_window_ends():
    """Past the cap its guesses pass one every window / limit; a fresh window's ``limit`` at once on top of that
    doubled the cap's rate (counted on a real ``xllm serve``, limit 3 / 6 s, 30 s: 25 guesses against 15 when a
    capped address was refused outright). The window after one with guesses past the cap starts capped."""
    from xllm_jupyter.core.errors import RateLimited

    clock = Clock()
    lim = _limiter(clock, failed_auth_limit=3, failed_auth_window_seconds=6.0)  # one every 2 s past the cap
    for _ in range(3):
        lim.check("10.0.0.1")
        lim.failed("10.0.0.1")  # its burst: capped
    for _ in range(2):  # the line's checks, 2 s apart (``past_cap``)
        clock.now += 2
        lim.failed("10.0.0.1")
    clock.now += 2.5  # the next window: still capped, its checks still 2 s apart
    with pytest.raises(RateLimited):
        lim.check("10.0.0.1")
    assert lim._live("10.0.0.1")[2] == clock.now - 0.5  # noqa: SLF001 - the line's next turn, kept
    lim.failed("10.0.0.1")  # one guess past the cap in this window too
    clock.now += 6
    with pytest.raises(RateLimited):
        lim.check("10.0.0.1")  # so the one after is capped as well
    clock.now += 6  # a whole window with no guess past the cap: afresh
    lim.check("10.0.0.1")
    lim.failed("10.0.0.1")
    lim.check("10.0.0.1")


def test_an_address_that_only_reached_the_cap_starts_afresh_after_a_quiet_gap():
    clock = Clock()
    lim = _limiter(clock, failed_auth_limit=3, failed_auth_window_seconds=6.0)
    for _ in range(4):
        lim.failed("10.0.0.1")  # one past the cap
    clock.now += 12.5  # its window and the whole next one passed: nothing carried
    lim.check("10.0.0.1")
    lim.failed("10.0.0.1")
    lim.check("10.0.0.1")
