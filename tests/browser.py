"""Shared helpers for browser tests: the system chromium through Playwright, and a real
JupyterLab server in a subprocess.

Playwright drives the Debian chromium at /usr/bin/chromium (``playwright install`` is
never run: no downloaded browsers). Tests call ``require_browser()`` first, so a
machine without chromium or the playwright package skips them instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

#: chromium flags for a quiet, sandbox-free headless run in containers and CI
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
#: screenshots and server logs of browser tests (gitignored)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
#: the checked-in build of the JupyterLab panel (what the tests must exercise)
LABEXTENSION_BUILD = Path(__file__).resolve().parents[1] / "xllm_jupyter" / "labextension"


def chromium_path() -> str | None:
    """The system chromium, or None."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_browser() -> str:
    """The chromium path; skips the test when chromium or playwright is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the system chromium is used)")
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@contextlib.contextmanager
def chromium(viewport: tuple[int, int] = (1400, 900)) -> Iterator[Any]:
    """A fresh browser context (Playwright) on the system chromium; closed afterwards."""
    from playwright.sync_api import sync_playwright

    path = require_browser()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            try:
                yield context
            finally:
                context.close()
        finally:
            browser.close()


def wait_for_url(url: str, timeout: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if it never does or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before {url} answered\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s ({last})\n{_tail(log)}")


def _tail(log: Path | None, chars: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-chars:]


@dataclass
class LabServer:
    """A running JupyterLab: where it is and how to get in."""

    root: str  # http://127.0.0.1:PORT
    base_url: str  # e.g. /jl/ (always with both slashes)
    token: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The server's base URL (root + base_url)."""
        return self.root + self.base_url

    def lab_url(self, path: str = "lab") -> str:
        """A URL under the server with the token, for the first page load (it sets the cookie)."""
        return f"{self.url}{path}?token={self.token}"

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 60) -> Any:
        """JSON from ``{base_url}<path>`` with the token (for checks beside the browser)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method,
                                     headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")


@contextlib.contextmanager
def jupyter_lab(
    workdir: Path,
    *,
    config: Mapping[str, Mapping[str, Any]] | None = None,
    base_url: str = "/",
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 180,
    name: str = "jupyterlab",
    ip: str = "127.0.0.1",
) -> Iterator[LabServer]:
    """JupyterLab in a subprocess on a free port, isolated config/runtime dirs, stopped afterwards.

    ``config`` is a Jupyter config dict (``{"XllmApp": {...}}``) written to the server's
    own config dir; the xllm server extension is enabled. Output goes to
    ``tests/artifacts/<name>.log``. ``ip``: the one address it listens on.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(exist_ok=True)
    config_dir = workdir / "jupyter-config"
    config_dir.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {"ServerApp": {"jpserver_extensions": {"xllm_jupyter": True}}}
    for section, values in (config or {}).items():
        cfg.setdefault(section, {}).update(values)
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(cfg))
    # no "get notified about Jupyter news?" toast over the screenshots (and no fetch for it)
    (config_dir / "labconfig").mkdir(exist_ok=True)
    (config_dir / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # JUPYTER_PATH comes first in JupyterLab's search for prebuilt extensions, so the lab
    # serves the repository's build, not an older copy an install left in the venv
    data_dir = workdir / "jupyter-data"
    (data_dir / "labextensions" / "@xllm").mkdir(parents=True, exist_ok=True)
    link = data_dir / "labextensions" / "@xllm" / "jupyterlab"
    if not link.exists():
        link.symlink_to(LABEXTENSION_BUILD, target_is_directory=True)
    port, token = free_port(), secrets.token_hex(16)
    base_url = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
    run_env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "IPYTHONDIR": str(workdir / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_PATH": os.pathsep.join(p for p in (str(data_dir), os.environ.get("JUPYTER_PATH", "")) if p),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
    }
    args = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        f"--port={port}",
        f"--ip={ip}",
        f"--ServerApp.base_url={base_url}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={workdir}",
        f"--LabApp.workspaces_dir={workdir / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    log = ARTIFACTS / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=workdir, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    server = LabServer(f"http://{ip}:{port}", base_url, token, proc, log, run_env)
    try:
        wait_for_url(f"{server.url}api/status?token={token}", startup_timeout, proc, log)
        yield server
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it lingers (only this process, started by the caller)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


__all__ = ["ARTIFACTS", "CHROMIUM_ARGS", "LabServer", "chromium", "chromium_path",
           "jupyter_lab", "require_browser", "stop_process", "wait_for_url"]


def open_xllm_panel(page: Any, lab: LabServer) -> tuple[Any, list[str]]:
    """Open JupyterLab and its xllm side panel: the panel's locator, and the page errors seen from then on."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(lab.lab_url(), wait_until="domcontentloaded", timeout=120_000)
    tab = page.locator('.lm-TabBar-tab[data-id="xllm-panel"]')  # the panel's tab in the left sidebar
    tab.wait_for(timeout=120_000)
    tab.click()
    panel = page.locator("#xllm-panel")
    panel.wait_for(state="visible", timeout=30_000)
    return panel, errors
