"""The start of a real JupyterHub's config for the tests that run one: an in-memory proxy, sqlite, dummy auth."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.browser import stop_process
from tests.helpers import free_port

#: a ``str.format`` template (``tmp``, ``hub_port``, ``proxy_port``); each test module appends its services and roles
HUB_CONFIG_HEAD = '''
from jupyterhub.proxy import Proxy


class MemoryProxy(Proxy):
    """Routes kept in memory: the tests call the hub API and the services' ports directly."""

    should_start = False
    _routes = {{}}

    async def add_route(self, routespec, target, data):
        self._routes[routespec] = {{"routespec": routespec, "target": target, "data": data}}

    async def delete_route(self, routespec):
        self._routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self._routes)


c = get_config()  # noqa
c.JupyterHub.proxy_class = MemoryProxy
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.db_url = "sqlite:///{tmp}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/cookie_secret"
c.JupyterHub.pid_file = "{tmp}/hub.pid"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.bind_url = "http://127.0.0.1:{proxy_port}/"
'''


class HubProcess:
    """A real JupyterHub subprocess on loopback whose config can be rewritten and the hub restarted (same database).

    ``tail`` is what follows ``HUB_CONFIG_HEAD`` in ``jupyterhub_config.py`` (services, roles); tokens made
    through the API outlive a restart, as on a real hub whose admin edits the config and restarts it.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hub_port, self.proxy_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.hub_port}/hub/api"
        self.proc: subprocess.Popen | None = None

    def start(self, tail: str, timeout: float = 90) -> None:
        """Write the config and start the hub; return once its API answers."""
        head = HUB_CONFIG_HEAD.format(tmp=self.tmp, hub_port=self.hub_port, proxy_port=self.proxy_port)
        (self.tmp / "jupyterhub_config.py").write_text(head + tail)
        with open(self.tmp / "hub.log", "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(self.tmp / "jupyterhub_config.py")],
                                         cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("jupyterhub exited early:\n" + (self.tmp / "hub.log").read_text()[-3000:])
            try:
                if httpx.get(self.api + "/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"jupyterhub did not answer {self.api} within {timeout} s")

    def stop(self) -> None:
        """Stop the hub (SIGTERM, then SIGKILL after 20 s)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def restart(self, tail: str) -> None:
        """What an admin does after editing the config: stop the hub and start it again."""
        self.stop()
        self.start(tail)


#: what a kernel's token holds: the right to reach the xllm service
XLLM_ACCESS = ["access:services!service=xllm"]


def xllm_services_tail(url: str, service_token: str, admin_token: str, service_scopes: list[str] | None = None) -> str:
    """A ``HubProcess`` tail: the xllm service at ``url`` (with a role granting it ``service_scopes`` when given),
    users that may reach it, and a test-admin service whose token makes users and their tokens."""
    services = [{"name": "xllm", "url": url, "api_token": service_token},
                {"name": "test-admin", "api_token": admin_token}]
    roles = [{"name": "user", "scopes": ["self", *XLLM_ACCESS]},
             {"name": "test-admin", "services": ["test-admin"], "scopes": ["admin:users", "tokens"]}]
    if service_scopes is not None:
        roles.insert(1, {"name": "xllm-service", "services": ["xllm"], "scopes": service_scopes})
    return f"\nc.JupyterHub.services = {services!r}\nc.JupyterHub.load_roles = {roles!r}\n"


def user_token(admin: httpx.Client, user: str, scopes: list[str] = XLLM_ACCESS) -> str:
    """A new API token of ``user`` holding ``scopes``, made through the hub API with the test-admin's client."""
    r = admin.post(f"/users/{user}/tokens", json={"scopes": scopes})
    assert r.status_code == 201, r.text
    return r.json()["token"]
