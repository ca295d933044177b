"""``xllm ps`` says when an embedding model's keep_alive unloads it, as for a chat model.

An embedding model a request gave ``keep_alive`` (``"10m"``, Ollama clients send one) is unloaded when it
runs out, but ``/admin/models`` had no ``expires_at`` for it, so ``xllm ps`` said UNTIL ``forever``.
"""

from __future__ import annotations

import time

from tests.test_cli import invoke
from tests.test_embeddings import MODEL, pytestmark  # noqa: F401  (skipped where the encoder is not installed)


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.split() and line.split()[0] == name)


def test_ps_shows_an_embedding_models_keep_alive(xllm_server, client, raw):
    try:
        client.embeddings.create(model=MODEL, input="hello", extra_body={"keep_alive": "10m"})
        asked = time.time()
        item = next(m for m in raw.get("/admin/models").json()["data"] if m["id"] == MODEL)
        assert asked - 2 <= item["expires_at"] - 600 <= time.time() + 1
        ps = invoke("ps", "--url", xllm_server.base_url, "--api-key", xllm_server.api_key)
        assert ps.exit_code == 0, ps.output
        assert "minutes from now" in _row(ps.output, MODEL)
    finally:  # kept for the session's other tests, as it was: no expiry
        client.embeddings.create(model=MODEL, input="hello", extra_body={"keep_alive": -1})
    item = next(m for m in raw.get("/admin/models").json()["data"] if m["id"] == MODEL)
    assert item["expires_at"] is None
    assert "forever" in _row(invoke("ps", "--url", xllm_server.base_url, "--api-key", xllm_server.api_key).output,
                             MODEL)


def test_an_unloaded_embedding_models_old_keep_alive_does_not_outlive_it(xllm_server, client, raw):
    """An embedding model unloaded (``xllm stop``, a pull or rm) forgets the keep_alive it had: loaded again by a
    request without one, it stays, as a fresh load does. Its old expiry stayed, so ``xllm ps`` showed it, and the
    reaper unloaded the new load at that time."""
    try:
        client.embeddings.create(model=MODEL, input="hello", extra_body={"keep_alive": "10m"})
        assert raw.post("/admin/models/unload", json={"model": MODEL}).json()["unloaded"] is True
        client.embeddings.create(model=MODEL, input="hello")  # loaded again, no keep_alive: it stays
        item = next(m for m in raw.get("/admin/models").json()["data"] if m["id"] == MODEL)
        assert item["expires_at"] is None
    finally:  # (the session's other tests find it loaded, with no expiry)
        client.embeddings.create(model=MODEL, input="hello", extra_body={"keep_alive": -1})
