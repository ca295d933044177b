"""Only the holder of a playground's URL can use it (audit finding M1).

A real Gradio app on an ephemeral port, driven with real httpx and gradio_client requests,
with the session's tiny server behind it: every route needs the secret path, a foreign Host
(DNS rebinding) is refused, no foreign Origin is granted CORS, and the secret stays out of
logs and command lines.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import xllm_jupyter
from tests.helpers import public_site_recorder
from xllm_jupyter.playground.app import part_text
from xllm_jupyter.playground.launcher import port_is_free

EVIL = "rebind.evil.example"


@pytest.fixture(scope="module")
def pg(tiny_client):
    """One local playground (no proxy) for the module."""
    app = xllm_jupyter.playground(client=tiny_client, inline=False)
    try:
        yield app
    finally:
        app.close()


def bare(pg) -> str:
    """The playground's address without its secret path."""
    return f"http://127.0.0.1:{pg.port}/"


def secret_of(pg) -> str:
    """The secret path segment of a playground's URLs."""
    secret = pg.local_url.rstrip("/").rsplit("/", 1)[1]
    assert re.fullmatch(r"[\w-]{43}", secret), pg.local_url  # secrets.token_urlsafe(32)
    return secret


def test_every_route_needs_the_secret_and_with_it_the_chat_works(pg):
    base = bare(pg)
    with httpx.Client(timeout=30) as c:
        assert c.get(base).status_code == 404  # (was 200: the whole app, to anyone)
        secret = secret_of(pg)
        assert pg.local_url == f"{base}{secret}/" and pg.url == pg.local_url
        # the page, its config and assets, the API, the queue and its event stream, files
        for path in ("", "config", "theme.css", "gradio_api/info", "gradio_api/heartbeat/x",
                     "gradio_api/queue/data?session_hash=x", "gradio_api/file=/etc/hostname",
                     "gradio_api/upload_progress?upload_id=x", "docs", "openapi.json",
                     f"{secret[:-1]}/config", f"{secret}x/config", f"x{secret}/config",
                     f"{secret.upper()}/config"):
            assert c.get(base + path).status_code == 404, path
        join = {"data": ["hi", [], "tiny", "", 0.0, 1.0, 4, None], "fn_index": 0,
                "session_hash": "abc", "trigger_id": None}
        assert c.post(base + "gradio_api/queue/join", json=join).status_code == 404
        assert c.post(base + "gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 404
        assert c.post(base + "gradio_api/call/chat", json={"data": []}).status_code == 404
        # the same routes under the secret path are the app
        page = c.get(pg.local_url)
        assert page.status_code == 200
        # the secret URL is not sent on as a Referer to other sites (fonts, links)
        assert page.headers["referrer-policy"] == "same-origin"
        # nor fetched by an image in a model's reply: images and media load from the app's own path only, not
        # from the whole origin (behind the proxy the user's Jupyter server); test_playground_links.py shows it
        own = f"127.0.0.1:{pg.port}/{secret}/"
        assert page.headers["content-security-policy"] == f"img-src {own} data: blob:; media-src {own} data: blob:"
        assert c.get(pg.local_url + "config").json()["root"] == pg.local_url.rstrip("/")
        assert c.get(pg.local_url + "gradio_api/info").status_code == 200
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own kinds
        gradio_client.Client(base, verbose=False)
    client = gradio_client.Client(pg.local_url, verbose=False)
    history, _ = client.predict("Say hi", [], "tiny", "", 1.0, 1.0, 8, 3, api_name=pg.api_name)
    assert part_text(history[-2]["content"]) == "Say hi"
    assert history[-1]["role"] == "assistant" and part_text(history[-1]["content"])


def test_a_foreign_host_is_refused(pg):
    port = pg.port
    with httpx.Client(timeout=30) as c:
        for path in ("", "config", "gradio_api/info"):
            r = c.get(pg.local_url + path, headers={"Host": f"{EVIL}:{port}"})
            assert r.status_code == 403, path
        r = c.post(pg.local_url + "gradio_api/queue/join", json={}, headers={"Host": EVIL})
        assert r.status_code == 403
        # the proxy's header does not open a playground that is not behind a proxy
        r = c.get(pg.local_url + "config",
                  headers={"Host": EVIL, "X-Forwarded-Context": f"/proxy/{port}"})
        assert r.status_code == 403
        # a refusal says nothing about whether the path exists
        assert c.get(bare(pg), headers={"Host": EVIL}).status_code == 403
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"app.localhost:{port}"):
            assert c.get(pg.local_url + "config", headers={"Host": host}).status_code == 200, host


def test_an_evil_origin_is_not_granted_cors_even_through_the_proxy(tiny_client):
    # Behind jupyter-server-proxy the Host is the hub's public name, which made Gradio echo
    # any Origin in Access-Control-Allow-Origin.
    app = xllm_jupyter.playground(client=tiny_client, root_path="/user/alice/proxy/{port}", replace=False)
    try:
        proxied = {"Host": "hub.example.org", "X-Forwarded-Context": app.root_path}
        evil = {"Origin": f"http://{EVIL}"}
        with httpx.Client(timeout=30) as c:
            r = c.get(app.local_url + "config", headers={**proxied, **evil})
            assert r.status_code == 200
            assert r.json()["root"] == "http://hub.example.org" + app.url.rstrip("/")
            assert "access-control-allow-origin" not in r.headers
            preflight = {**proxied, **evil, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "content-type"}
            r = c.options(app.local_url + "gradio_api/queue/join", headers=preflight)
            assert "access-control-allow-origin" not in r.headers
            # The DNS-rebinding shape: Host and Origin are the attacker's name.
            r = c.get(app.local_url + "config", headers={"Host": f"{EVIL}:{app.port}", **evil})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
            # the proxy's header for another prefix (another user's port) does not count
            wrong = {"Host": "hub.example.org", "X-Forwarded-Context": "/user/bob/proxy/1"}
            assert c.get(app.local_url + "config", headers=wrong).status_code == 403
    finally:
        app.close()


def test_the_secret_stays_out_of_logs_and_command_lines(tiny_client, caplog):
    with caplog.at_level(logging.INFO):
        app = xllm_jupyter.playground(client=tiny_client, inline=False, replace=False)
        secret = secret_of(app)
        with httpx.Client(timeout=30) as c:
            assert c.get(app.local_url).status_code == 200
            assert c.get(app.local_url + "nope").status_code == 404
            assert c.get(app.local_url, headers={"Host": EVIL}).status_code == 403
        cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
        app.close()
    # (httpx logs every URL it requests at INFO: that is this test's client, not the app.)
    served = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert not [r for r in served if secret in r.getMessage()]
    assert not [line for line in cmdlines if secret.encode() in line]
    assert secret not in repr(app)
    # close() frees the port and the URL stops answering
    assert port_is_free(app.port)
    with pytest.raises(httpx.ConnectError):
        httpx.get(app.local_url, timeout=5)


def test_a_share_link_carries_the_secret_and_its_host_is_accepted(tiny_client, monkeypatch):
    # No internet here: stand in for Gradio's tunnel to its share servers.
    from gradio import networking, tunneling

    class FakeTunnel:
        killed = False

        def kill(self):
            self.killed = True

    tunnel = FakeTunnel()
    calls = []

    def setup_tunnel(local_host, local_port, *args, **kwargs):
        calls.append((local_host, local_port))
        tunneling.CURRENT_TUNNELS.append(tunnel)
        return "https://abc123.gradio.live"

    monkeypatch.setattr(networking, "setup_tunnel", setup_tunnel)
    app = xllm_jupyter.playground(client=tiny_client, share=True, replace=False)
    try:
        secret = secret_of(app)
        assert calls == [("127.0.0.1", app.port)]
        assert app.url == f"https://abc123.gradio.live/{secret}/"
        # The share server relays requests with its own Host: accepted, with the secret only.
        share_host = {"Host": "abc123.gradio.live"}
        assert httpx.get(app.local_url + "config", headers=share_host, timeout=30).status_code == 200
        assert httpx.get(bare(app), headers=share_host, timeout=30).status_code == 404
    finally:
        app.close()
        tunneling.CURRENT_TUNNELS[:] = [t for t in tunneling.CURRENT_TUNNELS if t is not tunnel]
    assert tunnel.killed and port_is_free(app.port)


def test_host_names_and_the_secret_prefix():
    from xllm_jupyter.core.hosts import host_name, is_loopback
    from xllm_jupyter.playground.guard import Guard

    assert host_name("LocalHost.:7860") == "localhost"
    assert host_name("[::1]:7860") == "::1" and host_name("::1") == "::1"
    assert host_name("Example.org") == "example.org"
    assert all(map(is_loopback, ("localhost", "a.localhost", "127.0.0.1", "127.8.9.1", "::1")))
    assert not any(map(is_loopback, ("localhost.evil.example", "10.0.0.1", "evil.example", "")))
    guard = Guard(None, secret="s3cret", host="127.0.0.1", allowed_hosts=["ide.example.dev"],
                  root_path="/user/a/proxy/7860")
    assert guard.has_secret("/s3cret") and guard.has_secret("/s3cret/config")
    assert not guard.has_secret("/s3cretx/config")
    assert not guard.has_secret("/s3cre") and not guard.has_secret("/")
    # what passes on has the prefix the proxy stripped back in front, as its root_path
    scope = guard.behind_proxy({"type": "http", "path": "/s3cret/config", "raw_path": b"/s3cret/config"})
    assert scope["root_path"] == "/user/a/proxy/7860"
    assert scope["path"] == "/user/a/proxy/7860/s3cret/config"
    assert scope["raw_path"] == b"/user/a/proxy/7860/s3cret/config"
    assert guard.host_ok({b"host": b"ide.example.dev:443"})
    assert guard.host_ok({b"host": b"hub.example.org", b"x-forwarded-context": b"/user/a/proxy/7860/"})
    assert not guard.host_ok({b"host": b"hub.example.org"}) and not guard.host_ok({})
    # bound to every interface: the machine's addresses are expected Hosts, names still are not
    for every in ("0.0.0.0", "0", "::0"):  # "0" and "::0" bind every interface too: the LAN address was refused
        wide = Guard(None, secret="s", host=every)
        assert wide.host_ok({b"host": b"192.168.1.20:7860"}) and not wide.host_ok({b"host": b"evil.example"}), every


def test_the_csp_names_the_apps_own_path_and_nothing_a_header_could_smuggle_in():
    from xllm_jupyter.playground.guard import app_source, content_security_policy

    assert app_source("hub.example", "/user/ann/proxy/7860/s3cret/") == "hub.example/user/ann/proxy/7860/s3cret/"
    assert app_source("[::1]:8888", "/s/") == "[::1]:8888/s/"
    # a Host that would end the directive or add a source: no server source at all (data: and blob: only)
    for host in ("evil.example; img-src *", "a b", "*", "", "x'self'"):
        assert app_source(host, "/s/") == "", host
    assert app_source("hub.example", "/a;b/") == app_source("hub.example", "/a b/") == ""
    assert content_security_policy("") == b"img-src data: blob:; media-src data: blob:"


def test_the_app_fetches_no_url_a_reply_names_on_its_own_path(pg, monkeypatch):
    """The CSP allows images from the app's own path only, but ``![](gradio_api/file=https://host/DATA)`` in a
    reply is a relative URL on that path, and Gradio fetched ``https://host/DATA`` itself and served it: a
    reply's image still told any site what its URL carried, on sight. Gradio allows public addresses only;
    the recorder stands in for one here."""
    with public_site_recorder(monkeypatch) as (far, hits):
        with httpx.Client(timeout=30) as c:
            for path in (f"gradio_api/file={far}/leak/the-chat", f"gradio_api/file/{far}/leak/old-route",
                         f"gradio_api/file={far.replace('http', 'HTTPS', 1)}/x", f"gradio_api/proxy={far}/x"):
                r = c.get(pg.local_url + path)
                assert r.status_code == 403, (path, r.status_code, r.text)
            # the app's own files are still served
            assert c.get(pg.local_url + "favicon.ico").status_code == 200
    assert hits == []
