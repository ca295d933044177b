"""Tricks against the admin-only DELETE /v1/models/{id} and the failed-authentication cap, on a real server.

What an adversarial pass tried (none got through; these keep it so): method-override headers and
parameters that some frameworks honour, methods spelt in other cases, encoded separators, dots, NULs,
non-ASCII look-alikes and very long ids, and forwarding headers naming other addresses to escape the
per-address cap when no trusted proxy is configured.
"""

from __future__ import annotations

import dataclasses
import socket

import httpx
import pytest

from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import make_test_config, running_server

ADMIN = "sk-tricks-admin"
USER = "sk-tricks-user"
LIMIT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    """Admin and user keys, a failed-auth cap of ``LIMIT``, and a store of its own holding "kept" and "tiny"."""
    home = tmp_path_factory.mktemp("tricks-home")
    store = ModelStore(home)
    for name in ("tiny", "kept", "kept:v2"):
        store.pull(str(tiny_llama_dir), name)
    cfg = make_test_config(home, api_keys=(USER,))
    cfg = dataclasses.replace(cfg, auth=AuthConfig(admin_keys=(ADMIN,), failed_auth_limit=LIMIT,
                                                   failed_auth_window_seconds=30))
    with running_server(cfg, ModelStore(home), "tiny") as info:
        yield info, store


def _raw(info, request: bytes) -> bytes:
    """The status line a raw request gets (no client-side normalisation of its method or path)."""
    port = int(info.root.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_user_key_cannot_delete_through_method_overrides(server):
    info, store = server
    user = {"Authorization": f"Bearer {USER}"}
    with httpx.Client(base_url=info.root, timeout=60) as c:
        for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
            for method in ("POST", "PUT", "PATCH"):
                r = c.request(method, "/v1/models/kept", headers={**user, header: "DELETE"})
                assert r.status_code == 405, (header, method, r.status_code)
            assert c.get("/v1/models/kept", headers={**user, header: "DELETE"}).json()["id"] == "kept"
        assert c.post("/v1/models/kept?_method=DELETE", headers=user).status_code == 405
        assert c.delete("/v1/models/kept", headers=user).status_code == 403
    for method in ("delete", "Delete"):  # HTTP methods are case-sensitive: not DELETE, so not served
        line = _raw(info, f"{method} /v1/models/kept HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {USER}\r\n"
                          "Connection: close\r\n\r\n".encode())
        assert line.startswith(b"HTTP/1.1 405 "), (method, line)
    assert store.exists("kept")


def test_odd_ids_remove_nothing_and_echo_no_more_than_a_short_name(server):
    info, store = server
    for path in ("kept%00", "kept%20", "kept%0a", "KEPT:V2%2F..", "k%C3%A9pt", "%E2%84%AAept", "%252e%252e",
                 "kept%5C..%5Ctiny", "kept;v2", "kept:latest:latest", "x" * 60_000):
        line = _raw(info, f"DELETE /v1/models/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
                          "Connection: close\r\n\r\n".encode())
        assert line.startswith(b"HTTP/1.1 404 "), (path[:40], line)
    r = httpx.delete(info.root + "/v1/models/" + "y" * 60_000, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 404 and len(r.text) < 1000  # the id is cut short in the message, not echoed whole
    assert all(store.exists(n) for n in ("tiny", "kept", "kept:v2"))


def test_forwarding_headers_do_not_move_a_guesser_to_another_address(server):
    """No trusted proxy: X-Forwarded-For, X-Real-IP and Forwarded are the client's own words, and ignored."""
    info, _ = server
    transport = httpx.HTTPTransport(local_address="127.0.0.6")
    with httpx.Client(base_url=info.root, timeout=60, transport=transport) as c:
        statuses = []
        for i in range(LIMIT):
            spoof = {"X-Forwarded-For": f"10.9.9.{i}", "X-Real-IP": f"10.8.8.{i}", "Forwarded": f"for=10.7.7.{i}"}
            statuses.append(c.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{i}", **spoof}).status_code)
        assert statuses == [401] * LIMIT
        # the capped address, naming another one, still waits its turn (window / limit: 10 s here), its key unread
        with pytest.raises(httpx.TimeoutException):
            c.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN}", "X-Forwarded-For": "10.1.1.1",
                                         "X-Real-IP": "10.1.1.1"}, timeout=2)
