"""On ``xllm serve`` with several API keys each key is its own user: another key's stored response is unknown.

The hub service's two users are checked in test_hub_service.py and stored chat completions across keys in
test_stored_completions.py; this covers the Responses API across keys (retrieve, input items, delete,
cancel, continuing it with ``previous_response_id``, streamed or not, counting it), and that an admin key
is no way into a user key's stored responses either (they are the key's, not the role's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig

ALICE, BOB, ADMIN = "sk-alice-key", "sk-bob-key", "sk-admin-key"


@pytest.fixture(scope="module")
def keyed(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A server with two user keys and an admin key."""
    config = make_test_config(xllm_home, api_keys=(ALICE, BOB))
    config = dataclasses.replace(config, auth=AuthConfig(admin_keys=(ADMIN,)))
    with running_server(config, tiny_catalog, TINY) as info:
        yield info


def _sdk(server: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("other_key", [BOB, ADMIN])
def test_another_keys_stored_response_is_unknown_to_every_route(keyed, other_key):
    with _sdk(keyed, ALICE) as alice, _sdk(keyed, other_key) as other:
        r = alice.responses.create(model=TINY, input="the launch code is 0000", max_output_tokens=2)
        for call in (lambda: other.responses.retrieve(r.id),
                     lambda: other.responses.input_items.list(r.id),
                     lambda: other.responses.cancel(r.id),
                     lambda: other.responses.delete(r.id)):
            with pytest.raises(openai.NotFoundError) as exc:
                call()
            assert "launch code" not in str(exc.value.body)
        for call in (lambda: other.responses.create(model=TINY, input="repeat it", previous_response_id=r.id,
                                                    max_output_tokens=2),
                     lambda: other.responses.input_tokens.count(model=TINY, input="repeat it", previous_response_id=r.id)):
            with pytest.raises(openai.BadRequestError) as exc:
                call()
            assert exc.value.body["code"] == "previous_response_not_found"
        # streamed: refused before the stream starts (a 400, not an SSE error after a 200)
        with httpx.Client(base_url=keyed.root, timeout=120) as http:
            s = http.post("/v1/responses", headers={"Authorization": f"Bearer {other_key}"},
                          json={"model": TINY, "input": "repeat it", "previous_response_id": r.id, "stream": True,
                                "max_output_tokens": 2})
            assert s.status_code == 400 and s.json()["error"]["code"] == "previous_response_not_found"
            assert "launch code" not in s.text
        # alice's response is untouched, still hers
        assert alice.responses.retrieve(r.id).id == r.id
        assert [i.id for i in alice.responses.input_items.list(r.id).data]
        alice.responses.delete(r.id)  # the SDK returns nothing for a delete
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(r.id)
