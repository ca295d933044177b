"""Concurrent guesses are capped too: the hub service asks the hub no faster than it counts the failures.

The hub service checks an address's count, then awaits the hub's answer about the token, then counts a
failure: guesses sent at once all passed the check before the first was counted (50 at once with a limit
of 3 were all sent to the hub). Right tokens sent at once wait for the checks ahead of them, never a 429.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import HUB_ALICE, running_hub_app
from xllm_jupyter.core.config import AuthConfig, load_config
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth_failures import PAST_CAP_WAITING, FailedAuthLimiter

LIMIT = 3
BURST = 40


class SlowCheck:
    """A credential check that takes a while (the hub's API), counting how many run at once."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.now = self.most = 0

    async def __call__(self, token: str) -> bool:
        self.asked.append(token)
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.05)
        self.now -= 1
        return token.startswith("good")


async def _attempt(limiter: FailedAuthLimiter, check: SlowCheck, token: str) -> str:
    client = "192.0.2.9"
    try:
        limiter.check(client)
        async with limiter.asking(client):
            ok = await check(token)
            if not ok:
                limiter.failed(client)
    except RateLimited:
        return "429"
    return "200" if ok else "401"


def test_a_burst_of_guesses_is_checked_no_more_than_the_limit():
    limiter, check = FailedAuthLimiter(AuthConfig(failed_auth_limit=LIMIT)), SlowCheck()

    async def burst() -> list[str]:
        return await asyncio.gather(*(_attempt(limiter, check, f"guess-{i}") for i in range(BURST)))

    results = asyncio.run(burst())
    assert len(check.asked) == LIMIT and results.count("401") == LIMIT and results.count("429") == BURST - LIMIT
    assert limiter._asking == {}  # nothing left behind


def test_a_burst_of_right_tokens_waits_its_turn_and_is_never_refused():
    limiter, check = FailedAuthLimiter(AuthConfig(failed_auth_limit=LIMIT)), SlowCheck()

    async def burst() -> list[str]:
        return await asyncio.gather(*(_attempt(limiter, check, f"good-{i}") for i in range(BURST)))

    assert asyncio.run(burst()) == ["200"] * BURST
    assert len(check.asked) == BURST and check.most == LIMIT


# ---------------------------------------------------------------- the real hub service
@pytest.fixture
def slow_hub_service(tmp_path) -> Iterator[Any]:
    """The hub app on a real port, its hub stood in for by a ``user_for_token`` that takes 50 ms."""
    pytest.importorskip("jupyterhub")
    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"},
                                            "auth": {"failed_auth_limit": LIMIT}})
    check = SlowCheck()

    async def user_for_token(token: str) -> Any:
        return HUB_ALICE if await check(token) else None

    with running_hub_app(config, user_for_token) as root:
        yield SimpleNamespace(root=root, check=check)


async def _burst(root: str, source: str, tokens: list[str], timeout: float = 60) -> list[int | str]:
    """The statuses of ``tokens`` sent at once; "held" for a request still waiting its turn at ``timeout``."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=root, transport=transport, timeout=timeout) as c:
        replies = await asyncio.gather(*(c.get("/v1/models", headers={"Authorization": f"token {t}"}) for t in tokens),
                                       return_exceptions=True)
    return [r.status_code if isinstance(r, httpx.Response) else "held" for r in replies]


def test_the_hub_is_asked_about_no_more_guesses_than_the_limit_however_many_arrive_at_once(slow_hub_service):
    statuses = asyncio.run(_burst(slow_hub_service.root, "127.0.0.21", [f"guess-{i}" for i in range(BURST)], 3))
    assert len(slow_hub_service.check.asked) == LIMIT, len(slow_hub_service.check.asked)
    # past the cap: PAST_CAP_WAITING wait their turn (20 s apart), the rest get 429 at once
    assert statuses.count(401) == LIMIT and statuses.count("held") == PAST_CAP_WAITING
    assert statuses.count(429) == BURST - LIMIT - PAST_CAP_WAITING
    # another address's right tokens, all at once: served, none refused
    assert asyncio.run(_burst(slow_hub_service.root, "127.0.0.22", [f"good-{i}" for i in range(BURST)])) == [200] * BURST
