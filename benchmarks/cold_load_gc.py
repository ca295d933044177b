#!/usr/bin/env python
"""The full garbage collections of a process's first model load (its imports of torch and transformers), in process.

Each round is a fresh interpreter (imports cold): an ``Engine`` with nothing to preload starts, then
``Engine.load`` loads ``tiny``; ``gc.callbacks`` record every generation-2 collection from the start's end
to the load's (each holds the GIL: the IOLoop stands still as long). Reported per round: how many, how
long each, and their sum. No HTTP: ``first_use_stall.py --scenarios cold`` measures the server end to end.

    .venv/bin/python benchmarks/cold_load_gc.py --home DIR      # a store holding tiny (first_use_stall.py --home makes one)
    .venv/bin/python benchmarks/cold_load_gc.py                 # writes benchmarks/results/cold_load_gc.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, tiny_store, write_results  # noqa: E402

ROUND = """
import asyncio, gc, json, sys, threading, time
from pathlib import Path
from xllm_jupyter.core.config import EngineConfig
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.store.store import ModelStore

full, started, recording = [], {}, [False]

def counted(phase, info):
    now = time.perf_counter()
    if phase == "start":
        started[threading.get_ident()] = now
    elif info["generation"] == 2 and recording[0]:
        full.append(round(now - started.get(threading.get_ident(), now), 4))

async def main():
    engine = Engine(EngineConfig(torch_threads=1, keep_alive="-1"), catalog=ModelStore(Path(sys.argv[1])))
    await engine.start()
    assert "torch" not in sys.modules  # the load imports it
    gc.callbacks.append(counted)
    recording[0] = True
    begin = time.perf_counter()
    await engine.load("tiny")
    seconds = time.perf_counter() - begin
    recording[0] = False
    await engine.stop()
    print(json.dumps({"collections": full, "load_s": round(seconds, 3)}))

asyncio.run(main())
"""


def main(argv: list[str] | None = None) -> None:
    """Run ``--rounds`` cold loads, write the collections of each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="an XLLM home whose store holds tiny (default: a temporary one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cold_load_gc"))
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    with tempfile.TemporaryDirectory(prefix="xllm-cold-gc-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        if not args.home:
            tiny_store(home)
        for _ in range(args.rounds):
            out = subprocess.run([sys.executable, "-c", ROUND, str(home)], capture_output=True, text=True,
                                 env=env, cwd=ROOT, timeout=600)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "runs": runs,
              "command": " ".join(["python benchmarks/cold_load_gc.py", *(sys.argv[1:] if argv is None else argv)])}
    lines = [f"# cold_load_gc ({result['when']}, {result['commit']}, {result['cpus']} CPUs)", "",
             f"`{result['command']}`", "", "| round | load | full collections | each | sum |", "|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        each = ", ".join(f"{c:.3f}" for c in run["collections"])
        lines.append(f"| {i} | {run['load_s']:.2f} s | {len(run['collections'])} | {each} s | "
                     f"{sum(run['collections']):.3f} s |")
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
