"""Where is the engine? How a kernel (or any client) finds the xllm server to talk to.

Order, first match wins:

1. an explicit ``connect(url, token)`` in this process;
2. ``XLLM_BASE_URL`` (+ ``XLLM_API_KEY``), which the Jupyter extension exports to the
   kernels it starts;
3. on JupyterHub, the ``xllm`` hub service, looked up through the hub's REST API with the
   kernel's ``JUPYTERHUB_API_TOKEN``;
4. (``locate()`` only) a private server started for this process: ``xllm serve`` as a child
   process on a free loopback port with a random key, stopped at interpreter exit.

Front-ends never import the server layer, so the private server is a subprocess, not an
engine in this interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from ..core.errors import AuthenticationError, InvalidRequest, PermissionDenied, XllmError
from ..core.hub_url import PUBLIC_KEYS, TLS_HINT, hub_ssl_context, service_root
from .aio import AsyncXllmClient
from .base import ServerUnavailable, auth_headers, env_key_for, resolve_base_url, root_url
from .client import XllmClient

log = logging.getLogger("xllm_jupyter.client")

#: the hub service name looked up when XLLM_HUB_SERVICE is not set
DEFAULT_HUB_SERVICE = "xllm"
#: how long a private server may take to answer /health/ready (it loads the default model)
LOCAL_START_TIMEOUT = 300.0
HUB_TIMEOUT = 5.0
HUB_CACHE_SECONDS = 60.0

SOURCES = ("connect", "extension", "hub", "in-process")


@dataclass(frozen=True)
class ServerLocation:
    """An xllm server to talk to: its OpenAI base URL (ending in ``/v1``), key, and how it was found."""

    base_url: str
    api_key: str | None
    source: str  # one of SOURCES

    def __repr__(self) -> str:  # never show the key in a notebook output or a log line
        key = "set" if self.api_key else None
        return f"ServerLocation(base_url={self.base_url!r}, api_key={key!r}, source={self.source!r})"

    @property
    def private(self) -> bool:
        """True for a server only this process uses (started by ``locate``)."""
        return self.source == "in-process"


_lock = threading.RLock()
_connected: ServerLocation | None = None
_hub_cache: dict[tuple, tuple[float, ServerLocation | None]] = {}


# ---------------------------------------------------------------- discovery
def find_server(env: Mapping[str, str] | None = None) -> ServerLocation | None:
    """The server this process should use, or None when nothing points at one (no network unless on a hub).

    On a hub whose API does not answer (restarting, slow), ``ServerUnavailable``: not "no server", which
    would start a private engine beside the hub's.
    """
    if _connected is not None:
        return _connected
    env = os.environ if env is None else env
    if env.get("XLLM_BASE_URL", "").strip():
        return ServerLocation(resolve_base_url(env["XLLM_BASE_URL"]), env.get("XLLM_API_KEY") or None, "extension")
    hub = _from_hub(env)
    if hub is not None:
        return hub
    with _lock:
        return _local.location if _local is not None and _local.alive() else None


def _from_hub(env: Mapping[str, str]) -> ServerLocation | None:
    """The hub service's location, cached for HUB_CACHE_SECONDS (every cell asks; the hub should not pay)."""
    api_url = env.get("JUPYTERHUB_API_URL", "").strip().rstrip("/")
    token = env.get("JUPYTERHUB_API_TOKEN", "").strip()
    if not api_url or not token:
        return None
    name = env.get("XLLM_HUB_SERVICE", "").strip() or DEFAULT_HUB_SERVICE
    public = tuple(env.get(k, "") for k in ("JUPYTERHUB_BASE_URL", *PUBLIC_KEYS))
    key = (api_url, token, name, public)
    now = time.monotonic()
    with _lock:
        hit = _hub_cache.get(key)
        if hit is not None and now - hit[0] < HUB_CACHE_SECONDS:
            return hit[1]
    found = _ask_hub(env, api_url, token, name)
    with _lock:
        _hub_cache[key] = (now, found)
    return found


def _ask_hub(env: Mapping[str, str], api_url: str, token: str, name: str) -> ServerLocation | None:
    """The hub service's URL, asked of the hub API; None (and a debug line) when the hub says there is none for
    this token (a 4xx) or TLS is not set up; ``ServerUnavailable`` when the hub does not answer (no answer, a
    timeout, a 5xx, not JSON: a hub restarting or slow under a burst of spawns), as the extension waits then.
    Taken for "no service", that started a private engine (the default model loaded in this kernel's server)."""
    try:
        tls = hub_ssl_context(env)  # JupyterHub's internal_ssl: the server's certificate, inherited by its kernels
    except (OSError, ssl.SSLError) as exc:  # a set-up fault, not "no service": say what fixes it
        log.warning("xllm: this kernel's TLS certificate for the hub API at %s could not be loaded (%s); %s",
                    api_url, exc, TLS_HINT)
        return None
    try:
        response = httpx.get(f"{api_url}/services/{name}", headers={"Authorization": f"token {token}"},
                             timeout=HUB_TIMEOUT, verify=tls if tls is not None else True)
        if response.status_code >= 500:
            raise _hub_silent(api_url, f"it answered {response.status_code}")
        response.raise_for_status()
        model = response.json()
    except (httpx.HTTPError, ValueError, OSError) as exc:
        if "SSL" in str(exc) or isinstance(exc, ssl.SSLError):  # a set-up fault, not "no service": say what fixes it
            log.warning("xllm: the hub API at %s refused TLS (%s); %s", api_url, exc, TLS_HINT)
        elif isinstance(exc, httpx.HTTPStatusError):  # 401, 403 (the token may not read it), 404: the hub's word
            log.debug("xllm: no hub service %r found through %s: %s", name, api_url, exc)
        elif isinstance(exc, ValueError):
            raise _hub_silent(api_url, "its answer is not JSON") from None
        else:
            raise _hub_silent(api_url, "it could not be reached" if not isinstance(exc, httpx.TimeoutException)
                              else f"no answer in {HUB_TIMEOUT:g} s") from None
        return None
    if not isinstance(model, dict):
        log.debug("xllm: the hub answered %r for service %r; ignored", type(model).__name__, name)
        return None
    root = service_root(env, name, model)
    if root is None:
        log.debug("xllm: hub service %r has no URL this kernel can use", name)
        return None
    return ServerLocation(resolve_base_url(root + "v1"), token, "hub")


def _hub_silent(api_url: str, why: str) -> ServerUnavailable:
    """The error for a hub API that does not answer the look-up of its xllm service."""
    return ServerUnavailable(f"the JupyterHub API at {api_url} did not answer the look-up of its xllm service ({why}; "
                             "is the hub restarting?): try again in a moment")


# ------------------------------------------------------------------ connect
def connect(url: str | None = None, token: str | None = None) -> ServerLocation:
    """Use the server at ``url`` (default: the one found as usual) from now on in this process.

    The server is asked for its models first, so a wrong URL or token fails here with a
    clear ``XllmError`` rather than at the first prompt.
    """
    global _connected
    if url is None:
        found = _find_without_connect()
        url = found.base_url if found else None
        if token is None and found is not None:
            token = found.api_key
    elif token is None:  # XLLM_API_KEY where XLLM_BASE_URL names this same server (the rule XllmClient(url) keeps)
        token = env_key_for(url)
    base = resolve_base_url(url)
    try:
        # the host as httpx reads it (`xn--` is no IDNA label) and as the socket's name lookup encodes it (`a..b`, a
        # label over 63 letters): their bare IDNAError/UnicodeError reached the notebook ("unexpected error")
        httpx.URL(base).host.encode("idna")
    except (httpx.InvalidURL, UnicodeError) as exc:  # `http://[::1` (its bracket never closes), a lone surrogate
        raise InvalidRequest(f"{url!r} is not a server URL ({exc})", param="url") from None
    location = ServerLocation(base, token or None, "connect")
    verify(location)
    with _lock:
        _connected = location
    log.info("xllm: connected to %s", location.base_url)
    return location


def _find_without_connect() -> ServerLocation | None:
    global _connected
    with _lock:
        saved, _connected = _connected, None
        try:
            return find_server()
        finally:
            _connected = saved


def disconnect() -> None:
    """Forget an explicit ``connect()`` (and cached hub answers): discovery goes back to the environment."""
    global _connected
    with _lock:
        _connected = None
        _hub_cache.clear()


def verify(location: ServerLocation) -> None:
    """Raise a clear XllmError unless the server answers ``/v1/models`` with this key."""
    with client_for(location) as client:
        try:
            client.models()
        except (AuthenticationError, PermissionDenied) as exc:
            if location.api_key:
                raise type(exc)(f"the xllm server at {client.root_url} refused the token: {exc.message}") from None
            # "refused the token" misled where none went: XLLM_API_KEY held back from a server XLLM_BASE_URL does not name
            held = (" (XLLM_API_KEY goes only to the server XLLM_BASE_URL names)" if os.environ.get("XLLM_API_KEY")
                    else "")
            raise type(exc)(f"the xllm server at {client.root_url} needs a token and none was sent{held}: pass one "
                            f"(`%xllm connect URL --token`, xllm_jupyter.connect(URL, token)): {exc.message}") from None


# ---------------------------------------------------------------- clients
def client_for(location: ServerLocation) -> XllmClient:
    """A sync client for ``location`` (never falls back to XLLM_API_KEY for another server)."""
    return XllmClient(location.base_url, location.api_key or "")


#: said once, before a private server starts (the wait can be a minute: the default model loads)
PRIVATE_START_NOTICE = ("no shared xllm server found; starting a private one for this kernel (process) only "
                        "(other notebooks cannot use it; this can take a minute)…")


def locate(start_local: bool = True, announce: Callable[[str], None] | None = None) -> ServerLocation:
    """The server to use; with none found, start a private one for this process (and say so once).

    ``announce`` receives the notice instead of the log (the magics print it as their own line).
    """
    found = find_server()
    if found is not None:
        return found
    if not start_local:
        raise XllmError("no xllm server found: start JupyterLab with xllm-jupyter, run `xllm serve`, or call xllm_jupyter.connect(URL)")
    return _start_local(announce=announce).location


def get_client() -> XllmClient:
    """A sync client for the server ``locate()`` picks."""
    return client_for(locate())


def get_async_client() -> AsyncXllmClient:
    """An async client for the server ``locate()`` picks."""
    loc = locate()
    return AsyncXllmClient(loc.base_url, loc.api_key or "")


# ------------------------------------------------- the private fallback server
class LocalServer:
    """``xllm serve`` as a child process: loopback only, a random key, stopped at exit."""

    def __init__(self, process: subprocess.Popen, location: ServerLocation, log_path: str):
        self.process = process
        self.location = location
        self.log_path = log_path

    def alive(self) -> bool:
        """True while the child runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the child logged (why it failed to start)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return ""


_local: LocalServer | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the kernel dies without running atexit."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # no glibc or no prctl: atexit still stops it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _announce_in_log(message: str) -> None:
    log.warning("xllm: %s", message)


def _start_local(timeout: float = LOCAL_START_TIMEOUT, announce: Callable[[str], None] | None = None) -> LocalServer:
    """Start (once) and wait for the private server; XllmError with its last log lines if it fails."""
    global _local
    with _lock:
        if _local is not None and _local.alive():
            return _local
        (announce or _announce_in_log)(PRIVATE_START_NOTICE)
        key = "sk-xllm-private-" + secrets.token_urlsafe(24)
        port = _free_port()
        fd, log_path = tempfile.mkstemp(prefix="xllm-private-", suffix=".log")
        cmd = [sys.executable, "-m", "xllm_jupyter.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
        # the key travels in the environment, not argv: any local user can read a command line (ps)
        drop = ("XLLM_BASE_URL", "XLLM_API_KEY", "XLLM_SERVER_API_KEYS")  # the long name would win over ours
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["XLLM_API_KEYS"] = key
        with os.fdopen(fd, "wb") as out:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                # its own session: interrupting the kernel (SIGINT to its process group) must not stop it
                start_new_session=True,
                # prctl only; it runs no Python that could deadlock on a lock held by another thread
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread() else None,  # noqa: PLW1509
            )
        server = LocalServer(process, ServerLocation(f"http://127.0.0.1:{port}/v1", key, "in-process"), log_path)
        atexit.register(server.stop)
        try:
            _wait_ready(server, timeout)
        except BaseException:
            server.stop()
            raise
        _local = server
        return server


def _listeners(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6); None where /proc cannot say."""
    found: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    # local_address is ADDR:PORT in hex; state 0A is LISTEN; the inode is field 9
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        found.add(fields[9])
    except (OSError, ValueError):
        return None
    return found


def _port_owned_by(pid: int, port: int) -> bool | None:
    """Whether only process ``pid`` listens on ``port``: None while nobody does (or /proc cannot tell)."""
    inodes = _listeners(port)
    if not inodes:
        return None
    try:
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return None
    return all(f"socket:[{inode}]" in held for inode in inodes)


def _wait_ready(server: LocalServer, timeout: float) -> None:
    """Poll ``/health/ready`` until 200; fail fast when the child exits or another process holds its port.

    The port was free when picked, but another local user could take it before the child binds it
    and then receive our key and every prompt: where /proc shows who listens, nothing is sent to the
    port until the child itself does.
    """
    url = root_url(server.location.base_url) + "/health/ready"
    port = urlsplit(url).port or 0
    checked = not os.path.exists("/proc/net/tcp")  # elsewhere: no way to check, as before
    deadline = time.monotonic() + timeout
    with httpx.Client(headers=auth_headers(server.location.api_key), timeout=5.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                tail = server.log_tail()
                raise XllmError("the private xllm server did not start" + (f": {tail.splitlines()[-1]}" if tail else ""))
            if not checked:
                owned = _port_owned_by(server.process.pid, port)
                if owned is False:
                    raise XllmError(f"another process took port {port} before the private xllm server could listen "
                                    "on it; nothing was sent to it (run the cell again)")
                checked = owned is True
                if not checked:
                    time.sleep(0.2)
                    continue
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise XllmError(f"the private xllm server did not become ready within {timeout:.0f} s")


def stop_local() -> None:
    """Stop the private server, if this process started one."""
    global _local
    with _lock:
        server, _local = _local, None
    if server is not None:
        server.stop()
