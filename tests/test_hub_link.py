"""extension/hub_link.py: one lookup shared by concurrent requests, asked again while the hub has not answered,
and a "no" asked again rarely in the background.

The hub API's answers are stood in for here (the real hub runs in tests/test_hub_service.py and
tests/test_extension.py); what is checked is the bookkeeping around them.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from xllm_jupyter.extension import hub_link
from xllm_jupyter.extension.hub_link import HUB, LOCAL, WAITING, HubLink, Upstream
from xllm_jupyter.extension.hub_lookup import HubLookup, HubService


@pytest.fixture
def answers(monkeypatch):
    """The hub's answers, one per lookup, each given once ``gate`` opens; ``calls`` counts the lookups."""
    state = {"calls": 0, "answers": [], "gate": asyncio.Event()}

    async def lookup(env):
        state["calls"] += 1
        await state["gate"].wait()
        answer = state["answers"].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(hub_link, "lookup_hub_service", lookup)
    return state


async def test_concurrent_requests_share_one_lookup_and_one_that_leaves_does_not_cancel_it(answers):
    answers["answers"] = [HubLookup(None, True, "the hub has no service 'xllm' (404)")]
    settled: list[HubLink] = []
    link = HubLink({}, settled.append)
    waits = [asyncio.ensure_future(link.resolve()) for _ in range(5)]
    await asyncio.sleep(0)
    waits[0].cancel()  # a client that left
    answers["gate"].set()
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [LOCAL] * 4
    assert answers["calls"] == 1 and settled == [link]
    assert await link.resolve() == LOCAL and answers["calls"] == 1  # settled: never asked again


async def test_a_lookup_that_breaks_or_gets_no_answer_is_asked_again_after_the_retry_interval(answers, monkeypatch):
    answers["gate"].set()
    answers["answers"] = [RuntimeError("boom"), HubLookup(None, False, "the hub API answered 502 Bad Gateway"),
                          HubLookup(None, True, "this server's token may not read the hub service 'xllm' (403)")]
    settled: list[HubLink] = []
    link = HubLink({}, settled.append)
    assert await link.resolve() == WAITING and "RuntimeError" in link.reason
    assert await link.resolve() == WAITING and answers["calls"] == 1  # within RETRY_SECONDS: not asked
    monkeypatch.setattr(hub_link, "RETRY_SECONDS", 0.0)
    assert await link.resolve() == WAITING and answers["calls"] == 2 and "502" in link.reason
    assert await link.resolve() == LOCAL and answers["calls"] == 3 and settled == [link]
    assert "403" in link.reason and not link.fault


async def test_a_no_is_asked_again_in_the_background_and_a_service_that_appears_is_switched_to(answers, caplog):
    """Before: a 403/404 stood for the server's life, so a service the admin added later was never used."""
    answers["gate"].set()
    service = HubService("xllm", "http://127.0.0.1:1/services/xllm/", "server-token")
    no = HubLookup(None, True, "the hub has no service 'xllm' (404)")
    answers["answers"] = [no, no, HubLookup(None, False, "the hub API answered 502 Bad Gateway"),
                          HubLookup(None, True, "this server's token may not read the hub service 'xllm' (403)"),
                          HubLookup(service, True, "the hub service 'xllm' at http://127.0.0.1:1/services/xllm/")]
    settled: list[str] = []
    link = HubLink({}, lambda link: settled.append(link.state), recheck_seconds=0.01)
    caplog.set_level(logging.DEBUG, logger="xllm_jupyter.extension")
    try:
        assert await link.resolve() == LOCAL and settled == [LOCAL]
        with link.serving_locally():  # a request in this server's engine when the service appears
            await asyncio.wait_for(_until(lambda: link.state == HUB), 30)
            drained = asyncio.ensure_future(link.local_drained())
            await asyncio.sleep(0)
            assert not drained.done()  # the switch waits for it
        await asyncio.wait_for(drained, 5)
        assert answers["calls"] == 5 and settled == [LOCAL, HUB] and link.upstream.service is service
        assert await link.resolve() == HUB and answers["calls"] == 5  # found: not asked again
        # the log hears of the new reason only: the same 404 again and a hub down for a moment are debug lines
        rechecks = [(r.levelno, r.getMessage()) for r in caplog.records if "still not there" in r.getMessage()]
        assert [level for level, _ in rechecks] == [logging.DEBUG, logging.DEBUG, logging.INFO]
        assert "(403)" in rechecks[-1][1]
    finally:
        await link.close()


async def test_no_hub_to_ask_or_a_zero_interval_is_never_asked_again(answers):
    answers["gate"].set()
    answers["answers"] = [HubLookup(None, True, "not a JupyterHub single-user server", lasting=True),
                          HubLookup(None, True, "the hub has no service 'xllm' (404)")]
    lasting = HubLink({}, lambda link: None, recheck_seconds=0.01)
    zero = HubLink({}, lambda link: None, recheck_seconds=0.0)
    assert await lasting.resolve() == LOCAL and await zero.resolve() == LOCAL
    assert lasting._rechecking is None and zero._rechecking is None and answers["calls"] == 2
    again = HubLink({}, lambda link: None, recheck_seconds=3600.0)
    answers["answers"] = [HubLookup(None, True, "the hub has no service 'xllm' (404)")]
    assert await again.resolve() == LOCAL and not again._rechecking.done()
    task = again._rechecking
    await again.close()  # the server stops: the re-check goes with it
    assert task.cancelled()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def test_a_retired_pool_to_the_service_closes_only_once_its_last_request_has_ended():
    """The service moved (docs/jupyterhub.md): a stream still running through the old pool is not cut."""
    old = Upstream.open(HubService("xllm", "http://127.0.0.1:1/services/xllm/", "server-token"))
    with old.in_use():
        old.retire()
        await asyncio.sleep(0.01)
        assert not old.client.is_closed
    await asyncio.wait_for(_until(lambda: old.client.is_closed), 5)
