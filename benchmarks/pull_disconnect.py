#!/usr/bin/env python
"""How soon a pull stops after its HTTP client disconnects mid-conversion (``POST /admin/models/pull``).

Each round starts a real standalone server in a child process (this checkout's code, or ``--before REV``'s
from ``git archive``) holding only the tests' tiny Llama, posts a pull of the packaged ``smollm2`` under
another name (its first pull converts the GGUF with transformers: tens of seconds, its weights read one
library call that reports nothing), and closes the connection once the stream says the weights read has
begun (``convert`` step 1). It reports, from that disconnect:

- ``returned``: until the store's ``pull`` call returned to the route (the request and its handler let go);
- ``tmp_empty``: until the pull's build directory and lock left ``tmp/`` (its thread unwound: the library
  call ended and the next step saw the cancel), and whether the model stayed out of the store.

    .venv/bin/python benchmarks/pull_disconnect.py                          # this checkout only
    .venv/bin/python benchmarks/pull_disconnect.py --before d65e181 --rounds 2   # d65e181: before the fix
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def child(code: Path) -> dict:
    """One round in this process, with the package and tests of ``code``: the figures as a dict."""
    sys.path.insert(0, str(code))
    import httpx

    from tests.models import build_tiny_llama
    from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
    from xllm_jupyter.store.store import ModelStore

    returned: dict[str, float] = {}

    class WatchedStore(ModelStore):
        def pull(self, *args, **kwargs):
            try:
                return super().pull(*args, **kwargs)
            finally:
                returned.setdefault("at", time.monotonic())

    with tempfile.TemporaryDirectory(prefix="pull-disconnect-") as tmp:
        home = Path(tmp) / "home"
        ModelStore(home).pull(str(build_tiny_llama(Path(tmp) / "tiny")), TINY)
        store = WatchedStore(home)
        with running_server(make_test_config(home), store, TINY) as info:
            started = time.monotonic()
            with httpx.stream("POST", info.root + "/admin/models/pull", json={"model": "smollm2", "name": "smol-x"},
                              headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"convert"' in line and json.loads(line[6:])["completed"] >= 1:
                        break
            gone = time.monotonic()  # the connection is closed here
            into_step = gone - started
            while "at" not in returned and time.monotonic() - gone < 600:
                time.sleep(0.01)
            while any(store.tmp.iterdir()) and time.monotonic() - gone < 600:
                time.sleep(0.05)
            emptied = time.monotonic()
            return {"returned_s": round(returned["at"] - gone, 3), "tmp_empty_s": round(emptied - gone, 3),
                    "pull_to_disconnect_s": round(into_step, 3),
                    "stored": sorted(m.name for m in store.list()), "tmp_left": sorted(p.name for p in store.tmp.iterdir())}


def checkout(rev: str, into: Path) -> Path:
    """``rev``'s tree (package and tests) unpacked into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "xllm_jupyter", "tests"], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    """Run the rounds (alternating variants) and write results/pull_disconnect.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="also run this revision's code, interleaved")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="pull-disconnect-code-") as tmp:
        variants = {"this checkout": ROOT}
        if args.before:
            variants[f"before ({args.before})"] = checkout(args.before, Path(tmp) / "before")
        rows = []
        for i in range(args.rounds):
            order = list(variants.items())
            for label, code in (order if i % 2 == 0 else order[::-1]):
                env = {**os.environ, "PYTHONPATH": str(code)}
                out = subprocess.run([sys.executable, __file__, "--child", str(code)], env=env, capture_output=True,
                                     text=True, timeout=1800, cwd=code)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{label} round {i} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                rows.append({"variant": label, "round": i, **json.loads(line[len("RESULT "):])})
                print(rows[-1], flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pull_disconnect.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# pull_disconnect ({report['when']}, {commit}, {report['machine']})", "",
             f"`{report['command']}`: a pull of the packaged smollm2, its client gone once the GGUF weights read began.", "",
             "| code | round | disconnect -> pull returned (s) | disconnect -> tmp/ empty (s) | stored after |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['round']} | {r['returned_s']} | {r['tmp_empty_s']} | {', '.join(r['stored'])} |" for r in rows]
    (RESULTS / "pull_disconnect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
