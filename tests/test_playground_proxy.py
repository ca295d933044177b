"""The playground behind jupyter-server-proxy, as on JupyterHub or Binder.

A real Jupyter server runs under the base URL ``/user/alice/`` with jupyter-server-proxy;
the playground detects the root path from ``JUPYTERHUB_SERVICE_PREFIX``; then
gradio_client and a real browser use it only through the proxied URL, with Jupyter's token.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("jupyter_server_proxy")

import xllm_jupyter
from tests.browser import ARTIFACTS, chromium, jupyter_lab
from xllm_jupyter.playground.app import part_text
from xllm_jupyter.playground.launcher import port_is_free

pytestmark = pytest.mark.timeout(600)
PREFIX = "/user/alice/"


@pytest.fixture(scope="module")
def hub_like_server(tmp_path_factory):
    """Jupyter (no xllm extension) with jupyter-server-proxy, under a hub-style base URL."""
    config = {
        "ServerApp": {
            "jpserver_extensions": {"xllm_jupyter": False, "jupyter_server_proxy": True},
            # as on a hub: the browser's Host is the hub's public name, not a loopback one
            "allow_remote_access": True,
        }
    }
    with jupyter_lab(
        tmp_path_factory.mktemp("proxy-lab"),
        config=config,
        base_url=PREFIX,
        name="playground-proxy",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def proxied(hub_like_server, xllm_server):
    """A playground started as a hub user's kernel would: the prefix comes from the environment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    mp.delenv("XLLM_PLAYGROUND_ROOT_PATH", raising=False)
    try:
        # client= also takes a (base_url, api_key) pair, like the rest of the notebook API
        pg = xllm_jupyter.playground(client=(xllm_server.base_url, xllm_server.api_key))
    finally:
        mp.undo()
    try:
        yield pg
    finally:
        pg.close()
        assert port_is_free(pg.port)


def secret_of(pg) -> str:
    """The secret path segment of a playground's URL."""
    return pg.local_url.rstrip("/").rsplit("/", 1)[1]


def test_root_path_comes_from_the_hub_prefix(proxied):
    assert proxied.root_path == f"/user/alice/proxy/{proxied.port}"
    # the proxied path, then the playground's secret path
    assert proxied.url == f"{proxied.root_path}/{secret_of(proxied)}/"
    assert re.fullmatch(r"[\w-]{43}", secret_of(proxied))
    assert f'src="{proxied.url}"' in proxied._repr_html_()


def test_through_the_proxy_the_app_needs_its_secret_and_keeps_the_public_host(proxied, hub_like_server):
    import httpx

    headers = {"Authorization": f"token {hub_like_server.token}"}
    public = hub_like_server.root + proxied.url
    without = hub_like_server.root + proxied.root_path + "/"
    with httpx.Client(headers=headers, timeout=30) as c:
        # Jupyter's token opens the proxy, not the app: without the secret path it is not there.
        for path in ("", "config", "gradio_api/info"):
            assert c.get(without + path).status_code == 404, path
        # jupyter-server-proxy forwards the browser's Host (a hub's public name); the app
        # accepts it for requests that come through the proxy to its own prefix.
        host = f"hub.example.org:{urlsplit(hub_like_server.root).port}"
        r = c.get(public + "config", headers={"Host": host, "Origin": "https://evil.example"})
        assert r.status_code == 200, r.text
        assert r.json()["root"] == f"http://{host}{proxied.url.rstrip('/')}"
        # and does not hand an evil page's Origin the right to read it (Gradio echoed it)
        assert "access-control-allow-origin" not in r.headers
    # The same foreign Host straight at the app's port (a DNS-rebinding page) is refused.
    r = httpx.get(proxied.local_url + "config", headers={"Host": "hub.example.org"}, timeout=30)
    assert r.status_code == 403


def test_gradio_client_streams_a_chat_through_the_proxy(proxied, hub_like_server):
    public = hub_like_server.root + proxied.url
    headers = {"Authorization": f"token {hub_like_server.token}"}
    client = gradio_client.Client(public, headers=headers, verbose=False)
    job = client.submit(
        "Say hello", [], "tiny", "", 1.0, 1.0, 10, 11, api_name=proxied.api_name
    )
    history, _ = job.result(timeout=120)
    assert len(job.outputs()) >= 2
    assert part_text(history[-1]["content"]).strip()
    # Without Jupyter's token the proxy refuses: the app is as private as the notebook server.
    import httpx

    assert httpx.get(public + "config", timeout=30).status_code in (302, 403)


def test_the_app_works_in_a_browser_through_the_proxy(proxied, hub_like_server):
    with chromium(viewport=(1280, 900)) as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        # The first load carries the token; Jupyter sets its cookie for the later requests.
        page.goto(
            f"{hub_like_server.root}{proxied.url}?token={hub_like_server.token}",
            wait_until="domcontentloaded",
            timeout=120_000,
        )
        box = page.locator("#xllm-input textarea")
        box.wait_for(timeout=120_000)
        box.fill("Tell me a joke.")
        box.press("Enter")
        bot = page.locator("#xllm-chatbot [data-testid='bot']").last
        bot.wait_for(timeout=120_000)
        page.wait_for_function(
            "() => { const m = document.querySelectorAll('#xllm-chatbot [data-testid=\"bot\"]');"
            " return m.length && m[m.length - 1].innerText.trim().length > 0; }",
            timeout=120_000,
        )
        assert "Tell me a joke." in page.locator("#xllm-chatbot").inner_text()
        # Every asset and API call to this origin went through the proxy prefix: Gradio built
        # its URLs from the root path (without it they would miss the prefix and 404).
        ours = [u for u in requests if u.startswith(hub_like_server.root)]
        assert len(ours) > 5
        assert all(u.startswith(hub_like_server.root + proxied.url) for u in ours), ours
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground-proxy.png"), full_page=True)
        assert not [e for e in errors if not re.search(r"ResizeObserver", e)], errors
