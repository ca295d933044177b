#!/usr/bin/env python
"""How long ``import torch`` holds the GIL on a worker thread: as the import does it, and after ``native_libs.preload_torch``.

A process's first model load imports torch on a worker thread, but the import's ``dlopen`` of
``libtorch_cpu.so`` (relocations, static initializers) runs with the GIL held, so the IOLoop (every stream,
``/health``, a JupyterLab's requests) stands still meanwhile. ``backends/native_libs.py`` dlopens the library
first through ctypes, which releases the GIL. Each round starts two fresh interpreters (the import happens
once per process), alternating which goes first; in each, a probe thread sleeps 1 ms at a time and records
how late it wakes (its gaps are the stretches another thread held the GIL) while a worker thread runs:

- ``import torch``: the import alone (what a first load did);
- ``preload_torch + import torch``: the preload, then the import (what a first load does now).

Collections are left as they are (the engine holds full ones off during a first load: ``gc_freeze.first_time``;
here they add the same to both ways).

    .venv/bin/python benchmarks/import_torch_gil.py --rounds 6    # writes benchmarks/results/import_torch_gil.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, write_results  # noqa: E402
from tokenizer_load_gil import gap_table, gil_record  # noqa: E402

#: one fresh interpreter's measurement: argv[1] is "preload" or "plain"; prints one JSON line
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from tokenizer_load_gil import gil_gaps  # stdlib and httpx only: torch is not imported before the work

def work():
    if sys.argv[1] == "preload":
        from xllm_jupyter.backends.native_libs import preload_torch
        assert preload_torch()
    import torch  # noqa: F401

took, worst, over_5ms = gil_gaps(work)
print(json.dumps({"seconds": took, "worst": worst, "over_5ms": over_5ms}))
"""
WAYS = {"import torch": "plain", "preload_torch + import torch": "preload"}


def measure(way: str) -> dict:
    """One fresh interpreter's import, the ``way`` named."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", CHILD, WAYS[way], here], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Alternate the two ways ``--rounds`` times; write the medians and ranges."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "import_torch_gil"))
    args = p.parse_args(argv)
    measure("import torch")  # the files into the page cache: the first round is not the disk's
    rows: dict[str, list[dict]] = {way: [] for way in WAYS}
    for i in range(args.rounds):
        for way in list(WAYS)[:: 1 if i % 2 == 0 else -1]:
            rows[way].append(measure(way))
            print(way, rows[way][-1], flush=True)
    result = gil_record("import_torch_gil", args.rounds, rows, argv)
    table = gap_table({way: [(r["seconds"], r["worst"], r["over_5ms"]) for r in got] for way, got in rows.items()})
    lines = [f"# import_torch_gil ({result['when']}, {result['commit']}, {result['cpus']} CPUs, {args.rounds} rounds, "
             f"load average {os.getloadavg()[0]:.1f} at the end)", "", f"`{result['command']}`", "", *table]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
