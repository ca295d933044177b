"""extension/hub_link.py: one lookup shared by concurrent requests, asked again while the hub has not answered.

The hub API's answers are stood in for here (the real hub runs in tests/test_hub_service.py and
tests/test_extension.py); what is checked is the bookkeeping around them.
"""

from __future__ import annotations

import asyncio

import pytest

from xllm_jupyter.extension import hub_link
from xllm_jupyter.extension.hub_link import LOCAL, WAITING, HubLink
from xllm_jupyter.extension.hub_lookup import HubLookup


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
