"""The hub service's failed-auth cap cannot be spent by one user to lock another out.

The service trusts its loopback proxy's ``X-Forwarded-For`` (its defaults), and on a one-host hub every
user's kernel reaches it from loopback too: a kernel can name any client address there. Past the cap a
token the hub confirmed before is still served at once; a token it never confirmed waits its turn (one
every window / limit, 20 s here), so a guess is not asked about sooner (a right one is served after the
guesses ahead of it: test_auth_failures_shared_address.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest

from tests.server_fixtures import HUB_ALICE, running_hub_app

LIMIT = 3
VICTIM = "198.51.100.7"  # alice's address, as the hub's proxy forwards it


def test_a_kernel_naming_alices_address_cannot_lock_her_out(tmp_path):
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, failed_auth_limit=LIMIT))
    assert "127.0.0.1" in config.auth.trusted_proxies  # the default configuration
    asked: list[str] = []

    async def user_for_token(token: str) -> Any:
        asked.append(token)
        return HUB_ALICE if token in ("alice-token", "alice-new-token") else None

    def via_proxy(token: str) -> dict[str, str]:
        return {"Authorization": f"token {token}", "X-Forwarded-For": VICTIM}

    with running_hub_app(config, user_for_token) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        assert loopback.get("/v1/models", headers=via_proxy("alice-token")).status_code == 200  # alice, earlier
        # another user's kernel (loopback, like the proxy) names alice's address with made-up tokens
        for i in range(LIMIT):
            assert loopback.get("/v1/models", headers=via_proxy(f"guess-{i}")).status_code == 401
        with pytest.raises(httpx.TimeoutException):  # the cap still holds for guesses: each waits its turn
            loopback.get("/v1/models", headers=via_proxy("guess-more"), timeout=2)
        assert "guess-more" not in asked
        # alice's token, which the hub confirmed, is still served from her address, without waiting
        r = loopback.get("/v1/models", headers=via_proxy("alice-token"))
        assert r.status_code == 200, r.text


def test_the_hub_page_of_a_capped_address_still_serves_a_login_cookie_and_known_tokens(tmp_path):
    """The page capped every request from the address, its user's OAuth cookie too; a cookie is no guess (it is
    signed with the service's secret and checked before the hub is asked), nor is a token the hub confirmed."""
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, failed_auth_limit=LIMIT))
    asked: list[str] = []

    async def user_for_token(token: str) -> Any:
        asked.append(token)
        return HUB_ALICE if token == "alice-token" else None

    forwarded = {"X-Forwarded-For": VICTIM}
    with running_hub_app(config, user_for_token) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        assert loopback.get("/v1/models", headers={**forwarded, "Authorization": "token alice-token"}).status_code == 200
        for i in range(LIMIT):  # the kernel spends alice's address on the page
            loopback.get("/", headers={**forwarded, "Authorization": f"token guess-{i}"}, follow_redirects=False)
        with pytest.raises(httpx.TimeoutException):  # past the cap: the guess waits its turn
            loopback.get("/", headers={**forwarded, "Authorization": "token guess-more"}, follow_redirects=False,
                         timeout=2)
        assert "guess-more" not in asked
        # alice's browser: her login cookie (a made-up one here: it fails its signature, off to the login)
        asked_before = len(asked)
        r = loopback.get("/", headers={**forwarded, "Cookie": "service-xllm=not-signed"}, follow_redirects=False)
        assert r.status_code == 302, r.text
        assert len(asked) == asked_before  # a cookie that fails its signature is not sent to the hub
        # her token the hub confirmed
        r = loopback.get("/", headers={**forwarded, "Authorization": "token alice-token"}, follow_redirects=False)
        assert r.status_code == 200 and "alice" in r.text


def test_a_revoked_token_stops_passing_the_cap_on_the_page_too(tmp_path):
    """A known token the hub no longer confirms is forgotten on the page as on the API routes: from a capped address
    it was asked about on every request, uncapped, for as long as it stayed in the known set; now it waits its
    turn as any token the hub does not confirm."""
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, failed_auth_limit=LIMIT))
    asked: list[str] = []
    valid = {"alice-token"}

    async def user_for_token(token: str) -> Any:
        asked.append(token)
        return HUB_ALICE if token in valid else None

    forwarded = {"X-Forwarded-For": VICTIM}
    alice = {**forwarded, "Authorization": "token alice-token"}
    with running_hub_app(config, user_for_token) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        assert loopback.get("/v1/models", headers=alice).status_code == 200
        for i in range(LIMIT):
            loopback.get("/v1/models", headers={**forwarded, "Authorization": f"token guess-{i}"})
        valid.clear()  # alice revokes her token
        r = loopback.get("/", headers=alice, follow_redirects=False)
        assert r.status_code != 200 and asked[-1] == "alice-token"
        asked_before = len(asked)
        with pytest.raises(httpx.TimeoutException):
            loopback.get("/", headers=alice, follow_redirects=False, timeout=2)
        assert len(asked) == asked_before, asked[asked_before:]
