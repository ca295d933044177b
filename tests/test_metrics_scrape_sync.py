"""/metrics counts a load or unload made outside the API in the very scrape that first sees it."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import TINY, make_test_config, running_server


def _samples(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of one ``/metrics`` scrape as ``{(name, sorted labels): value}``."""
    r = http.get("/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_first_scrape_counts_loads_and_unloads_made_outside_the_api(xllm_home, tiny_catalog):
    # running_server loads TINY on the engine before the server exists, as `xllm serve -m` preloads do
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, \
            httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as http:
        first = _samples(http)
        assert first.get(("xllm_model_memory_bytes", (("model", TINY),)), 0) > 0
        assert first.get(("xllm_model_loads_total", (("model", TINY),))) == 1.0  # old code: absent until a second scrape
        # an unload the API did not make (keep_alive expiry, eviction) shows in the next scrape too
        asyncio.run_coroutine_threadsafe(server.engine.unload(TINY), server.loop).result(120)
        after = _samples(http)
        assert ("xllm_model_memory_bytes", (("model", TINY),)) not in after
        assert after.get(("xllm_model_unloads_total", (("model", TINY),))) == 1.0
        assert after.get(("xllm_model_loads_total", (("model", TINY),))) == 1.0


def test_a_model_unloaded_and_loaded_again_between_two_scrapes_counts_both(xllm_home, tiny_catalog):
    """Loads and unloads were counted by comparing what was loaded at each scrape (or after an admin load): a model
    that a keep_alive expiry (or an eviction) unloaded and a request loaded again between two scrapes counted
    neither, so model churn on a busy hub never showed. The engine counts them as they happen now."""
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, \
            httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as http:
        before = _samples(http)
        chat = {"model": TINY, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1, "temperature": 0}
        assert http.post("/v1/chat/completions", json={**chat, "keep_alive": 0}).status_code == 200
        for _ in range(1200):  # the keep_alive timer's pass unloads it (every 0.25 s, once the idle grace is over)
            if not server.engine.is_loaded(TINY):
                break
            time.sleep(0.05)
        assert not server.engine.is_loaded(TINY)
        assert http.post("/v1/chat/completions", json=chat).status_code == 200  # loaded again on demand
        after = _samples(http)
    key = (("model", TINY),)
    assert after[("xllm_model_loads_total", key)] - before[("xllm_model_loads_total", key)] == 1
    assert after[("xllm_model_unloads_total", key)] - before.get(("xllm_model_unloads_total", key), 0) == 1
