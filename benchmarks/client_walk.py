"""Popular third-party OpenAI clients against a real `xllm serve`, used as their docs tell users to.

Not part of the test suite, and not a project dependency: run it with a separate venv holding the
clients (any subset; a library that does not import is reported as SKIP), for example

    python3.11 -m venv /tmp/clients && /tmp/clients/bin/pip install openai langchain-openai litellm \\
        llama-index-llms-openai-like llama-index-embeddings-openai instructor pydantic-ai openai-agents
    /tmp/clients/bin/python benchmarks/client_walk.py

It starts `xllm serve` (this checkout's ``.venv/bin/xllm``, or ``--xllm``) on an ephemeral port with
an API key and a temporary XLLM home (or ``--xllm-home``) holding ``smollm2`` (real text), ``tiny``
(the tests' random 2-layer Llama: fast, garbage text) and ``all-minilm`` (embeddings); ``--url`` and
``--api-key`` use a server that is already running instead. The checks are in client_walk_checks.py.

Verdicts: PASS; FAIL (the wire broke: an exception, a wrong shape, a lost tool call); MODEL (the wire
worked but the 135M model's free-form answer did not satisfy the library: a text answer where a
tool call was optional, JSON of the wrong shape where no schema was enforced); KNOWN (a library
behaviour docs/clients.md documents, with its setting); SKIP (not importable, or needs the network).
Results: ``benchmarks/results/client_walk.{json,md}``; exit status 1 if anything FAILed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEY = "sk-client-walk"
DISTRIBUTIONS = ("openai", "langchain-openai", "langchain-core", "litellm", "llama-index-llms-openai-like",
                 "llama-index-embeddings-openai", "llama-index-core", "instructor", "pydantic-ai-slim", "openai-agents")


class Verdict(Exception):
    """Raised by a check to give a verdict other than PASS/FAIL (MODEL, KNOWN, SKIP) with its reason."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


class Walk:
    """Runs checks and keeps their verdicts."""

    def __init__(self, base_url: str, api_key: str):
        self.base_url = base_url
        self.api_key = api_key
        self.rows: list[dict[str, Any]] = []

    def check(self, library: str, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn``; its return value is the PASS detail, an exception a FAIL unless it is a Verdict."""
        start = time.monotonic()
        try:
            detail, status = fn(), "PASS"
        except Verdict as v:
            detail, status = str(v), v.status
        except Exception as exc:  # noqa: BLE001 - every failure is a result to report
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
            detail, status = f"{type(exc).__name__}: {exc}{where}", "FAIL"
        row = {"library": library, "check": name, "status": status, "detail": str(detail)[:400],
               "seconds": round(time.monotonic() - start, 2)}
        self.rows.append(row)
        print(f"{status:5} {library:12} {name:44} {row['seconds']:6.1f}s  {row['detail'][:160]}", flush=True)

    def skip_library(self, library: str, why: str) -> None:
        """Record a library that could not run at all."""
        self.rows.append({"library": library, "check": "(all)", "status": "SKIP", "detail": why, "seconds": 0.0})
        print(f"SKIP  {library:12} {why}", flush=True)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_home(home: Path, xllm: Path, project_python: Path) -> None:
    """Put smollm2, all-minilm and the tests' tiny Llama in the store at ``home`` (once)."""
    env = {**os.environ, "XLLM_HOME": str(home)}
    listed = subprocess.run([str(xllm), "list"], env=env, capture_output=True, text=True, check=True).stdout
    if "tiny " not in listed:
        src = home.parent / (home.name + "-tiny-src")
        code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from models import build_tiny_llama; "
                f"build_tiny_llama(Path({str(src)!r}))")
        subprocess.run([str(project_python), "-c", code], cwd=ROOT, check=True)
        subprocess.run([str(xllm), "pull", str(src), "--name", "tiny"], env=env, check=True, capture_output=True)
    for name, extra in (("smollm2", ["--convert"]), ("all-minilm", [])):
        if name + " " not in listed:
            subprocess.run([str(xllm), "pull", name, *extra], env=env, check=True, capture_output=True)


def start_server(xllm: Path, home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`xllm serve` with the three models preloaded; returns the process and its /v1 URL once ready."""
    port = free_port()
    env = {**os.environ, "XLLM_HOME": str(home), "XLLM_ENGINE_KEEP_ALIVE": "-1"}
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS", "XLLM_BASE_URL"):
        env.pop(var, None)
    cmd = [str(xllm), "serve", "--port", str(port), "--api-key", KEY, "-m", "tiny", "-m", "smollm2", "-m", "all-minilm"]
    out = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"xllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            models = httpx.get(root + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            loaded = {m["id"] for m in models.json().get("data", []) if m.get("xllm", {}).get("loaded")}
            if {"tiny", "smollm2"} <= loaded:
                return proc, root + "/v1"
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("xllm serve did not load its models within 600 s")


def versions() -> dict[str, str]:
    """Installed versions of the client distributions (absent ones left out)."""
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def write_results(walk: Walk, meta: dict[str, Any]) -> None:
    """benchmarks/results/client_walk.json (everything) and .md (the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "client_walk.json").write_text(json.dumps({**meta, "checks": walk.rows}, indent=1) + "\n")
    counts = {s: sum(r["status"] == s for r in walk.rows) for s in ("PASS", "FAIL", "MODEL", "KNOWN", "SKIP")}
    lines = ["# Third-party OpenAI clients against `xllm serve`", "",
             f"`benchmarks/client_walk.py`, commit {meta['commit']}, {meta['date']}, {meta['machine']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
             "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ". MODEL: the wire worked, the 135M model's "
             "free answer did not satisfy the library; KNOWN: a library behaviour documented in docs/clients.md.", "",
             "| library | check | verdict | s | detail |", "|---|---|---|---|---|"]
    for r in walk.rows:
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")[:140]
        lines.append(f"| {r['library']} | {r['check']} | {r['status']} | {r['seconds']} | {detail} |")
    (RESULTS / "client_walk.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    """Parse arguments, start (or find) the server, run every library's checks, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running server's /v1 URL (models smollm2, tiny, all-minilm)")
    ap.add_argument("--api-key", default=KEY)
    ap.add_argument("--xllm", type=Path, default=ROOT / ".venv" / "bin" / "xllm")
    ap.add_argument("--xllm-home", type=Path, help="store to use (default: a temporary one, filled here)")
    ap.add_argument("--only", help="comma-separated libraries to run (openai,langchain,llamaindex,litellm,...)")
    ap.add_argument("--no-results", action="store_true", help="print only; do not write benchmarks/results/")
    args = ap.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of litellm's price list
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="client-walk-")
    try:
        url = args.url
        if url is None:
            home = args.xllm_home or Path(tmp.name) / "home"
            home.mkdir(parents=True, exist_ok=True)
            prepare_home(home, args.xllm, args.xllm.parent / "python")
            proc, url = start_server(args.xllm, home, Path(tmp.name) / "serve.log")
        from client_walk_checks import LIBRARIES  # beside this file

        walk = Walk(url, args.api_key)
        only = set(args.only.split(",")) if args.only else None
        for name, run in LIBRARIES.items():
            if only is None or name in only:
                run(walk)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}", "versions": versions()}
    if not args.no_results:
        write_results(walk, meta)
    failed = [r for r in walk.rows if r["status"] == "FAIL"]
    print(f"{sum(r['status'] == 'PASS' for r in walk.rows)}/{len(walk.rows)} PASS, {len(failed)} FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # run as the module ``client_walk`` so that the checks' ``from client_walk import Verdict`` is this class
    sys.exit(__import__("client_walk").main())
