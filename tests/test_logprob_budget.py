"""A reply may carry at most ``server.max_logprob_entries`` token logprobs (n x max_tokens x (top_logprobs + 1)).

Each entry is ~90 bytes of JSON (1.8 KB per token at top_logprobs=20), and a reply is held whole in server
memory until its client has read it: the defaults alone let one request ask for a 236 MB reply.
"""

from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import ServerConfig, load_config

LIMIT = 2000
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def budget_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server allowing ``LIMIT`` logprob entries per reply."""
    with running_server(make_test_config(xllm_home, max_logprob_entries=LIMIT), tiny_catalog, TINY) as info:
        yield info


@pytest.fixture
def sdk(budget_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=budget_server.base_url, api_key=budget_server.api_key, max_retries=0, timeout=120) as c:
        yield c


def test_a_reply_over_the_budget_is_refused_before_anything_runs(sdk):
    for call in (
        lambda: sdk.chat.completions.create(model=TINY, messages=MSG, n=4, max_tokens=50, logprobs=True, top_logprobs=20),
        lambda: sdk.chat.completions.create(model=TINY, messages=MSG, max_tokens=100, logprobs=True, top_logprobs=20,
                                            stream=True),
        lambda: sdk.completions.create(model=TINY, prompt="Hi", n=2, max_tokens=200, logprobs=5),
        lambda: sdk.responses.create(model=TINY, input="Hi", max_output_tokens=100, top_logprobs=20,
                                     include=["message.output_text.logprobs"]),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        err = info.value.body
        assert info.value.status_code == 400 and err["code"] == "too_many_logprobs" and err["param"] == "max_tokens"
        assert f"{LIMIT:,}" in err["message"]


def test_replies_within_the_budget_and_without_logprobs_are_served(sdk):
    ok = sdk.chat.completions.create(model=TINY, messages=MSG, n=2, max_tokens=40, logprobs=True, top_logprobs=20,
                                     temperature=1.0, extra_body={"ignore_eos": True})  # 2 x 40 x 21 = 1,680
    assert len(ok.choices) == 2 and len(ok.choices[0].logprobs.content) == 40
    assert len(ok.choices[0].logprobs.content[0].top_logprobs) == 20
    plain = sdk.chat.completions.create(model=TINY, messages=MSG, n=4, max_tokens=600, extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 2400  # no logprobs: the budget does not apply


def test_the_default_and_the_config_key(tmp_path):
    assert ServerConfig().max_logprob_entries == 1_000_000
    assert 16 * 8192 * 21 > ServerConfig().max_logprob_entries >= 4 * 8192 * 21  # n=4 at 8k tokens still fits
    cfg = load_config(env={"XLLM_HOME": str(tmp_path), "XLLM_SERVER_MAX_LOGPROB_ENTRIES": "0"})
    assert cfg.server.max_logprob_entries == 0  # no cap
