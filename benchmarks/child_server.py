"""``xllm serve`` in a child process for benchmarks: this checkout's code, a temporary store, the tests' tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tests.helpers import free_port  # noqa: E402

#: the name the tiny model is stored under
TINY = "tiny"


def tiny_store(home: Path, model_dir: str | None = None, name: str = TINY) -> None:
    """Put ``model_dir`` (default: the tests' tiny random Llama, built under ``home``) into the store at ``home``."""
    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    source = Path(model_dir) if model_dir else build_tiny_llama(home.parent / f"{home.name}-model")
    ModelStore(home).pull(str(source), name)


class ChildServer:
    """The standalone server in its own process (``env`` on top of the defaults), ready once it answers a chat."""

    def __init__(self, home: Path, log_path: Path, *, model: str = TINY, env: Mapping[str, str] | None = None,
                 api_key: str | None = None, timeout: float = 180.0):
        self.home, self.port, self.model, self.api_key = home, free_port(), model, api_key
        full_env = {**os.environ, "XLLM_HOME": str(home), "XLLM_ENGINE_TORCH_THREADS": "1", "XLLM_ENGINE_KEEP_ALIVE": "-1",
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.command(), env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready(timeout)

    def command(self) -> list[str]:
        """The child's command line: ``xllm serve`` of this checkout on ``port``, preloading ``model``."""
        cmd = [sys.executable, "-c", "from xllm_jupyter.cli.main import main; main()",
               "serve", "--host", "127.0.0.1", "--port", str(self.port), "-m", self.model]
        return cmd + (["--api-key", self.api_key] if self.api_key else [])

    @property
    def url(self) -> str:
        """The server's root URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """Request headers carrying the API key, when there is one."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ready(self, timeout: float) -> None:
        """Wait until the model answers a small chat request (the preload done)."""
        deadline = time.monotonic() + timeout
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.post(self.url + "/v1/chat/completions", json=body, headers=self.headers, timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def rss_bytes(self) -> int:
        """The server process's resident memory now."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        """Stop the child process."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def commit() -> str:
    """This checkout's commit (with ``+dirty`` when tracked files have changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def report_head(title: str, result: Mapping[str, Any]) -> list[str]:
    """A report's first lines: its title, then when, on which commit and CPUs, and the command that ran it."""
    return [f"# {title}", "", f"{result['when']}, commit {result['commit']}, {result['cpus']} CPUs, `{result['command']}`", ""]


def check_table(checks: list[Mapping[str, Any]]) -> list[str]:
    """The markdown table of a run's checks (name, value, ok), a row each."""
    return ["| check | result | ok |", "|---|---|---|",
            *(f"| {c['name']} | {c['value']} | {'yes' if c['ok'] else '**NO**'} |" for c in checks)]


def write_results(out: str | Path, result: dict[str, Any], markdown: str) -> None:
    """``out``.json (the whole result) and ``out``.md (its report), and the report on stdout."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
