"""A widget's construction-time model check (``GET /v1/models/{name}``) gives up as soon as the model
listing would (the client's probe timeout), not after the 300 s a generation may take: a server that
lists its models but hangs on the one-model look-up froze ``ChatWidget(...)`` for five minutes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from xllm_jupyter.client import AsyncXllmClient, XllmClient, base
from xllm_jupyter.client.base import ServerUnavailable
from xllm_jupyter.widgets import ChatWidget, CompareWidget, ProfileWidget

LISTED = {"object": "list", "data": [{"id": "listed-model", "object": "model"}]}


@pytest.fixture
def hung_lookup(monkeypatch):
    """A real HTTP server that lists one model at once and never answers ``GET /v1/models/{name}``
    (until the test ends): (its base URL, the paths of the look-ups it got). The client's probe timeout is cut
    to 1 s so the test need not wait 30."""
    monkeypatch.setattr(base, "PROBE_TIMEOUT", httpx.Timeout(1.0, connect=5.0))
    release = threading.Event()
    lookups: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") == "/v1/models":
                body = json.dumps(LISTED).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            lookups.append(self.path)
            release.wait(120)  # hung: the look-up of one model never answers

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", lookups
    release.set()
    server.shutdown()
    server.server_close()


def finished_within(seconds: float, job):
    """Run ``job`` on a thread; (its result, True) if it ended within ``seconds`` (a liveness bound, not a timing)."""
    results: list = []
    worker = threading.Thread(target=lambda: results.append(job()), daemon=True)
    worker.start()
    worker.join(seconds)
    return (results[0] if results else None), not worker.is_alive()


@pytest.mark.parametrize("cls", [ChatWidget, ProfileWidget])
def test_construction_does_not_wait_on_a_hung_model_lookup(make, hung_lookup, cls):
    started = time.monotonic()
    w, done = finished_within(20, lambda: make(cls, "not-listed", client=(hung_lookup[0], None)))
    assert done, f"{cls.__name__}(...) was still waiting after {time.monotonic() - started:.0f} s"
    # no answer is not "no such model": the first request will say what is wrong
    assert "has no model" not in w.status.value and w.model_picker.value == "not-listed"


def test_compare_does_not_wait_on_a_hung_model_lookup_per_name(make, hung_lookup):
    url, lookups = hung_lookup
    names = ["listed-model", "not-listed", "gone-too", "nor-this"]
    w, done = finished_within(20, lambda: make(CompareWidget, names, client=(url, None)))
    assert done and "has no model" not in w.status.value
    # one look-up without an answer is enough: the others would each have waited the timeout out too
    assert lookups == ["/v1/models/not-listed"], lookups


def test_both_clients_look_up_one_model_with_the_probe_timeout(hung_lookup):
    url = hung_lookup[0]
    def sync_lookup():
        with XllmClient(url) as c:
            try:
                c.model("not-listed")
            except ServerUnavailable as exc:
                return exc.message

    async def async_lookup():
        async with AsyncXllmClient(url) as c:
            try:
                await c.model("not-listed")
            except ServerUnavailable as exc:
                return exc.message

    for job in (sync_lookup, lambda: asyncio.run(async_lookup())):
        message, done = finished_within(20, job)
        assert done and message and "did not answer in time" in message, message
