"""The start of a real JupyterHub's config for the tests that run one: an in-memory proxy, sqlite, dummy auth."""

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
