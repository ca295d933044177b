"""JupyterHub with ``internal_ssl``: the hub API is https and wants a client certificate.

A real hub on loopback (sqlite in tmp_path, DummyAuthenticator, no proxy process) makes its
internal CAs; the tests sign a user server's certificate with the hub's notebooks CA, as the
spawner does, and hand it over in the spawner's variables (``JUPYTERHUB_SSL_*``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.real_hub import HUB_CONFIG_HEAD

pytest.importorskip("jupyterhub")
certipy = pytest.importorskip("certipy")

ADMIN_TOKEN = "tls-admin-token-0123456789abcdef"
SERVICE_TOKEN = "tls-service-token-0123456789abcdef"

HUB_CONFIG = HUB_CONFIG_HEAD + '''c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = "{tmp}/internal-ssl"
c.JupyterHub.services = [
    {{"name": "xllm", "url": "http://127.0.0.1:{service_port}", "api_token": "{service_token}"}},
    {{"name": "test-admin", "api_token": "{admin_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "access:services!service=xllm", "read:services!service=xllm"]}},
    {{"name": "test-admin", "services": ["test-admin"], "scopes": ["admin:users", "tokens"]}},
]
'''


@dataclasses.dataclass
class TlsHub:
    """The running hub, bob's server token and the spawner's TLS variables for bob's server."""

    api: str  # https://127.0.0.1:PORT/hub/api
    service_url: str
    bob: str
    tls: dict[str, str]


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory) -> Iterator[TlsHub]:
    """A real JupyterHub with internal_ssl and the xllm service registered (its URL: plain http)."""
    tmp = tmp_path_factory.mktemp("tls-hub")
    hub_port, service_port = free_port(), free_port()
    (tmp / "jupyterhub_config.py").write_text(textwrap.dedent(HUB_CONFIG.format(
        tmp=tmp, hub_port=hub_port, proxy_port=free_port(), service_port=service_port,
        service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)))
    log = open(tmp / "hub.log", "w+")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    api = f"https://127.0.0.1:{hub_port}/hub/api"
    certs = tmp / "internal-ssl"
    try:
        deadline = time.monotonic() + 90
        while not (certs / "notebooks-ca_trust.crt").exists() or b"Hub API listening" not in (tmp / "hub.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail("jupyterhub (internal_ssl) did not start:\n" + log.read()[-3000:])
            time.sleep(0.2)
        # bob's server certificate, signed as the spawner signs it (Spawner.create_certs)
        pair = certipy.Certipy(store_dir=str(certs)).create_signed_pair(
            "user-bob", "notebooks-ca", alt_names=["IP:127.0.0.1", "DNS:localhost"], overwrite=True)
        tls = {"JUPYTERHUB_SSL_CERTFILE": pair["files"]["cert"], "JUPYTERHUB_SSL_KEYFILE": pair["files"]["key"],
               "JUPYTERHUB_SSL_CLIENT_CA": str(certs / "notebooks-ca_trust.crt")}
        from xllm_jupyter.core.hub_url import hub_ssl_context

        with httpx.Client(verify=hub_ssl_context(tls), timeout=30) as c:
            admin = {"Authorization": f"token {ADMIN_TOKEN}"}
            assert c.post(f"{api}/users/bob", headers=admin).status_code in (201, 409)
            # the doc's c.Spawner.server_token_scopes (read:services!service=xllm for the lookup)
            r = c.post(f"{api}/users/bob/tokens", headers=admin, json={"scopes": ["read:services!service=xllm",
                                                                                  "access:services!service=xllm"]})
            assert r.status_code == 201, r.text
        yield TlsHub(api, f"http://127.0.0.1:{service_port}", r.json()["token"], tls)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_a_user_servers_lookup_uses_the_spawners_certificate(tls_hub):
    """Before: the lookup sent no client certificate and did not trust the hub's CA, so the server never found
    the service under internal_ssl."""
    from xllm_jupyter.extension.hub_lookup import lookup_hub_service

    env = {"JUPYTERHUB_API_URL": tls_hub.api, "JUPYTERHUB_API_TOKEN": tls_hub.bob, **tls_hub.tls}
    found = asyncio.run(lookup_hub_service(env))
    assert found.service is not None and found.service.root == tls_hub.service_url + "/services/xllm/"


@pytest.mark.parametrize("setup", ["no certificate", "unreadable certificate"])
def test_a_tls_fault_is_a_final_answer_that_says_what_to_set(tls_hub, setup, tmp_path):
    """Not "the hub has not answered" (which waits, 503, forever): a set-up fault, named, and the own engine."""
    from xllm_jupyter.extension.hub_lookup import lookup_hub_service

    env = {"JUPYTERHUB_API_URL": tls_hub.api, "JUPYTERHUB_API_TOKEN": tls_hub.bob}
    if setup == "unreadable certificate":
        env.update(tls_hub.tls, JUPYTERHUB_SSL_CERTFILE=str(tmp_path / "missing.crt"))
    result = asyncio.run(lookup_hub_service(env))
    assert (result.service, result.final, result.fault) == (None, True, True)
    assert "internal_ssl" in result.reason and "JUPYTERHUB_SSL_CERTFILE" in result.reason
    assert tls_hub.bob not in result.reason


def test_kernels_find_the_service_with_the_servers_certificate(tls_hub, caplog):
    from xllm_jupyter.client import discovery

    env = {"JUPYTERHUB_API_URL": tls_hub.api, "JUPYTERHUB_API_TOKEN": tls_hub.bob}
    discovery.disconnect()  # no cached answers
    found = discovery.find_server({**env, **tls_hub.tls})
    assert found is not None and found.source == "hub"
    assert found.base_url == tls_hub.service_url + "/services/xllm/v1"
    discovery.disconnect()
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.client"):
        assert discovery.find_server(env) is None  # without it: no service, and a warning that says why
    assert any("JUPYTERHUB_SSL_CERTFILE" in r.getMessage() for r in caplog.records)
    discovery.disconnect()


def test_the_service_identifies_tokens_through_an_internal_ssl_hub(tls_hub):
    """The service's HubAuth takes the certificate from the environment it is given (a managed service's)."""
    from xllm_jupyter.hub.app import make_hub_auth

    env = {"JUPYTERHUB_API_URL": tls_hub.api, "JUPYTERHUB_API_TOKEN": SERVICE_TOKEN,
           "JUPYTERHUB_SERVICE_NAME": "xllm", **tls_hub.tls}
    model = asyncio.run(make_hub_auth(env).user_for_token(tls_hub.bob, sync=False))
    assert model["name"] == "bob" and "access:services!service=xllm" in model["scopes"]


def test_the_service_refuses_an_https_url_naming_internal_tls(monkeypatch):
    from xllm_jupyter.core.errors import ConfigError
    from xllm_jupyter.hub.service import bind_address

    with pytest.raises(ConfigError) as info:
        bind_address({"JUPYTERHUB_SERVICE_URL": "https://127.0.0.1:8910"})
    assert "internal_ssl" in info.value.message and "Internal TLS" in info.value.message


def test_the_docs_section_the_errors_name_exists():
    assert "## Internal TLS" in (Path(__file__).resolve().parents[1] / "docs" / "jupyterhub.md").read_text()
