#!/usr/bin/env python
"""How long a model load's tokenizer work holds the GIL: transformers' and llguidance's own ways against ours.

A load runs on a worker thread, but a stretch of it that holds the GIL stops the IOLoop (every stream,
``/health``) for as long. This times the tokenizer part of a transformers load two ways, alternating in
one process, while a probe thread sleeps 1 ms at a time and records how late it wakes (its gaps are the
GIL stretches another thread held):

- ``transformers``: ``AutoTokenizer.from_pretrained`` and the end-of-turn lookup through ``get_vocab()``
  (what a load did before: Python's json parses ``tokenizer.json`` a second time, a 49k-entry dict is built);
- ``xllm``: ``tokenizer_files.load_tokenizer`` and ``ChatTokenizer.eos_ids`` (what a load does now) for
  tokenizer files no loaded model holds (its own ``Tokenizer.from_file``);
- ``xllm, files in use``: the same while a tokenizer read from those files is in use (the load shares it);

and the grammar engine's tokenizer, built at load for a tokenizer not seen before, two ways:

- ``llguidance from_tokenizer``: ``llguidance.hf.from_tokenizer`` (what a load did: it copies the Rust tokenizer);
- ``xllm build_ll_tokenizer, one call``: no copy, one ``LLTokenizer`` call computing its slices too (what a load did);
- ``xllm build_ll_tokenizer``: ``constraints.build_ll_tokenizer`` (what a load does now: no copy, the build without
  slices, then ``with_slices``: two GIL stretches).

    .venv/bin/python benchmarks/tokenizer_load_gil.py --model-dir DIR      # writes benchmarks/results/tokenizer_load_gil.{json,md}

``--model-dir`` defaults to the tests' tiny Llama (SmolLM2's real 49k tokenizer), built in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, write_results  # noqa: E402


def gil_gaps(work: Callable[[], object]) -> tuple[float, float, float]:
    """(seconds ``work`` took on a thread, the probe's worst gap, the probe's gaps over 5 ms summed)."""
    gaps: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.05)
    worker = threading.Thread(target=work)
    start = time.perf_counter()
    worker.start()
    worker.join()
    took = time.perf_counter() - start
    time.sleep(0.02)
    stop.set()
    prober.join()
    return took, max(gaps), sum(g for g in gaps if g > 0.005)


def gil_record(name: str, rounds: int, runs: dict[str, list], argv: list[str] | None) -> dict:
    """What a GIL benchmark's results file keeps: when, which commit, the machine, the runs and the command."""
    return {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "rounds": rounds, "runs": runs,
            "command": " ".join([f"python benchmarks/{name}.py", *(sys.argv[1:] if argv is None else argv)])}


def gap_table(rows: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    """The Markdown table of each way's ``gil_gaps`` results: medians, and the worst gap's range."""
    lines = ["| way | time, median | worst gap, median (range) | gaps over 5 ms summed, median |", "|---|---|---|---|"]
    for name, got in rows.items():
        worst = [r[1] for r in got]
        lines.append(f"| {name} | {statistics.median(r[0] for r in got):.3f} s | "
                     f"{statistics.median(worst):.3f} s ({min(worst):.3f}-{max(worst):.3f}) | "
                     f"{statistics.median(r[2] for r in got):.3f} s |")
    return lines


def ways(directory: Path) -> dict[str, Callable[[], object]]:
    """The two ways of reading the tokenizer and its end-of-turn ids."""
    from transformers import AutoTokenizer

    import llguidance.hf
    from llguidance import LLTokenizer

    from xllm_jupyter.backends.constraints import build_ll_tokenizer
    from xllm_jupyter.backends.hf_tokenizer import END_OF_TURN_TOKENS, ChatTokenizer
    from xllm_jupyter.backends import tokenizer_files
    from xllm_jupyter.backends.tokenizer_files import load_tokenizer

    def transformers_way() -> object:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        vocab = tokenizer.get_vocab()
        return [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]

    def xllm_way() -> object:
        in_use = tokenizer_files._in_use  # (holds ``tokenizer`` below: the other way's)
        tokenizer_files._in_use = weakref.WeakValueDictionary()  # none in use: a read of its own (Tokenizer.from_file)
        try:
            return ChatTokenizer(load_tokenizer(directory), "m").eos_ids()
        finally:
            tokenizer_files._in_use = in_use

    def xllm_shared_way() -> object:  # ``tokenizer``, read from the same files, is in use: the load gets it
        return ChatTokenizer(load_tokenizer(directory), "m").eos_ids()

    tokenizer = load_tokenizer(directory)
    size, eos = len(tokenizer), [tokenizer.eos_token_id]
    return {"transformers": transformers_way, "xllm": xllm_way, "xllm, files in use": xllm_shared_way,
            "llguidance from_tokenizer": lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=size, eos_token=eos),
            "xllm build_ll_tokenizer, one call": lambda: LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=size,
                                                                     eos_token=eos),
            "xllm build_ll_tokenizer": lambda: build_ll_tokenizer(tokenizer, size, eos)}


def main(argv: list[str] | None = None) -> None:
    """Alternate the two ways ``--rounds`` times; write the medians and ranges."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", help="a model directory with a tokenizer.json (default: the tests' tiny Llama)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer_load_gil"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xllm-tok-gil-") as tmp:
        if args.model_dir:
            directory = Path(args.model_dir)
        else:
            sys.path.insert(0, str(ROOT))
            from tests.models import build_tiny_llama

            directory = build_tiny_llama(Path(tmp) / "tiny")
        runs = ways(directory)
        for work in runs.values():  # imports and file cache warm
            work()
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, work in runs.items():
                rows[name].append(gil_gaps(work))
    result = gil_record("tokenizer_load_gil", args.rounds, rows, argv)
    lines = [f"# tokenizer_load_gil ({result['when']}, {result['commit']}, {result['cpus']} CPUs, {args.rounds} rounds)", "",
             f"`{result['command']}`", "", *gap_table(rows)]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
