"""``xllm stop``, ``%xllm stop`` and the clients' ``unload(wait_for_load=True)`` against a server older than
``wait_for_load``: it refuses the field with a 400 ``unknown_parameter`` naming it (admin bodies refuse unknown
fields), and the unload is asked again without it, once; any other 400 stays the caller's error.

The old server is a real HTTP server on an ephemeral port answering the unload route the way ours words that 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from xllm_jupyter.cli.main import main
from xllm_jupyter.client import AsyncXllmClient, XllmClient
from xllm_jupyter.core.errors import InvalidRequest, UnknownParameter


@pytest.fixture
def old_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(base URL, bodies the unload route got) of a server whose unload route does not take ``wait_for_load``."""
    bodies: list[dict[str, Any]] = []

    class OldUnload(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            bodies.append(body)
            if self.path != "/admin/models/unload":
                status, answer = 404, {"error": {"message": "no route", "type": "invalid_request_error"}}
            elif body.get("model") == "ghost":  # another 400 (checked first: it is not about the field)
                status, answer = 400, {"error": {"message": "bad name", "type": "invalid_request_error",
                                                 "param": "model", "code": "invalid_value"}}
            elif "wait_for_load" in body:  # as our route words it, for the fields an older one took
                status, answer = 400, UnknownParameter("wait_for_load", ("model", "removed")).to_openai()
            else:
                status, answer = 200, {"id": body["model"], "unloaded": True}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldUnload)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", bodies
    finally:
        server.shutdown()
        server.server_close()


def test_xllm_stop_unloads_on_a_server_older_than_wait_for_load(old_server):
    url, bodies = old_server
    result = CliRunner().invoke(main, ["stop", "tiny", "--url", url, "--api-key", "k"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Stopped tiny" in result.output
    assert bodies == [{"model": "tiny", "wait_for_load": True}, {"model": "tiny"}]


def test_the_clients_retry_once_without_wait_for_load(old_server):
    url, bodies = old_server
    assert XllmClient(base_url=url, api_key="k").unload("tiny", wait_for_load=True) == {"id": "tiny", "unloaded": True}
    assert bodies == [{"model": "tiny", "wait_for_load": True}, {"model": "tiny"}]
    bodies.clear()
    reply = asyncio.run(AsyncXllmClient(base_url=url, api_key="k").unload("tiny", wait_for_load=True))
    assert reply == {"id": "tiny", "unloaded": True}
    assert bodies == [{"model": "tiny", "wait_for_load": True}, {"model": "tiny"}]


def test_other_400s_are_not_retried(old_server):
    url, bodies = old_server
    client = XllmClient(base_url=url, api_key="k")
    with pytest.raises(InvalidRequest, match="bad name"):
        client.unload("ghost", wait_for_load=True)
    assert bodies == [{"model": "ghost", "wait_for_load": True}]
