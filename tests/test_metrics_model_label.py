"""The ``model`` label of the token metrics is the model's one spelling, whatever the request wrote.

Model names are case-insensitive and ``NAME:latest`` is ``NAME``; the token counters were labelled with
the request's own spelling, so one model's counts split over ``TINY``, ``tiny:LATEST``... (label values
any client could multiply) and never lined up with ``xllm_model_memory_bytes{model="tiny"}``.
"""

from __future__ import annotations

from tests.server_fixtures import TINY
from tests.test_metrics_health_cache import _http, scrape, value


def test_token_metrics_name_the_model_as_the_engine_does(xllm_server):
    with _http(xllm_server) as http:
        before = scrape(http)
        prompts = 0
        for spelling in ("TINY", "Tiny:LATEST", TINY):
            body = {"model": spelling, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2,
                    "temperature": 0}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            prompts += r.json()["usage"]["prompt_tokens"]
        after = scrape(http)
    models = {dict(labels).get("model") for name, labels in after if name == "xllm_prompt_tokens_total"}
    # (the session's server may hold other models other tests made: only this model's spellings matter)
    assert TINY in models and not models & {"TINY", "Tiny:LATEST", "tiny:latest", "Tiny:latest"}, models
    grew = value(after, "xllm_prompt_tokens_total", model=TINY) - value(before, "xllm_prompt_tokens_total", model=TINY)
    assert grew == prompts
    assert value(after, "xllm_model_memory_bytes", model=TINY) > 0  # the same label value names its memory
