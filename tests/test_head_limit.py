"""A request whose URL or headers are too long: 414/431 with an OpenAI error body on `xllm serve` (server/head_limit.py).

Before, Tornado cut the connection without a response and the openai SDK retried what could never pass.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from xllm_jupyter.server.head_limit import HARD_LIMIT, LIMIT


def _exchange(root: str, head: bytes) -> bytes:
    """Send ``head`` on a fresh connection; everything the server sends back until it closes (b"" if nothing)."""
    url = urlsplit(root)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        try:
            sock.sendall(head)
        except OSError:  # the server may close while a large head is still being sent
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def _get(path: str, api_key: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n{extra}\r\n".encode()


def _parse(response: bytes) -> tuple[int, dict[str, str], dict]:
    assert response, "the server closed the connection without a response"
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_url_too_long_is_a_414_with_an_openai_error_body(xllm_server):
    status, headers, body = _parse(_exchange(xllm_server.root, _get("/v1/models/" + "a" * 70_000, xllm_server.api_key)))
    assert status == 414 and headers["Connection"] == "close" and headers["Content-Type"] == "application/json"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "uri_too_long"
    assert set(body["error"]) == {"message", "type", "param", "code"} and "65,536" in body["error"]["message"]
    assert "aaaa" not in body["error"]["message"]  # nothing of the URL echoed


def test_headers_too_large_are_a_431_the_sdk_does_not_retry(xllm_server):
    sent: list[str] = []
    hooks = {"request": [lambda request: sent.append(request.url.path)]}
    with httpx.Client(event_hooks=hooks, timeout=60) as http, \
            openai.OpenAI(base_url=xllm_server.base_url, api_key=xllm_server.api_key, max_retries=2, http_client=http) as c:
        with pytest.raises(openai.APIStatusError) as info:
            c.models.list(extra_headers={"X-Trace": "t" * 70_000})
        assert info.value.status_code == 431 and info.value.code == "request_header_fields_too_large"
        assert sent == ["/v1/models"]  # once: a 4xx is final, where a cut connection was retried twice
        assert "t" * 100 not in info.value.message
        # just under the limit: served as before; and the server serves on after a refusal
        assert [m.id for m in c.models.list(extra_headers={"X-Trace": "t" * (LIMIT - 1_000)})]


def test_a_refused_post_is_answered_before_its_body_is_read(xllm_server):
    body = b'{"model": "tiny", "messages": []}'
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {xllm_server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nX-Trace: {'t' * 70_000}\r\n\r\n").encode()
    status, headers, answer = _parse(_exchange(xllm_server.root, head + body))
    assert status == 431 and headers["Connection"] == "close" and answer["error"]["code"] == "request_header_fields_too_large"


def test_a_head_past_the_hard_limit_is_still_cut_and_the_server_serves_on(xllm_server, raw):
    assert _exchange(xllm_server.root, _get("/v1/models", xllm_server.api_key, f"X-Trace: {'t' * HARD_LIMIT}\r\n")) == b""
    assert raw.get("/v1/models").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models/" + "a" * 60_000, "/v1/models/..%2F..%2Fconfig.yaml",
                                  "/v1/models/%2e%2e", "/v1/models/a%2F..%2F..%2F..%2Fetc%2Fpasswd"])
def test_a_long_or_climbing_model_id_within_the_limit_is_a_plain_404(raw, path):
    r = raw.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.json()["error"]["message"]) < 200  # the id is quoted short, never whole
