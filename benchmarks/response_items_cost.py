#!/usr/bin/env python
"""What turning a Responses ``input`` into stored items costs (openai/response_items.py), in process, on CPU.

Each figure is the best of ``--repeats`` timings: ``normalize_input`` of a ``--turns``-message input (every item gets
an id) in µs, and one item id made the way ``new_id`` makes it (``secrets.token_hex(16)``) next to the way it was made
before (``uuid.uuid4().hex``), in µs per id.

    .venv/bin/python benchmarks/response_items_cost.py     # writes benchmarks/results/response_items_cost.{json,md}
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
from xllm_jupyter.openai.response_items import new_id, normalize_input  # noqa: E402


def best_us(fn: Callable[[], Any], repeats: int, inner: int) -> float:
    """The best of ``repeats`` timings of ``inner`` calls of ``fn``, in µs per call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / inner * 1e6


def main() -> None:
    """Measure and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "response_items_cost"))
    args = ap.parse_args()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(args.turns)]
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "python": platform.python_version(),
        "turns": args.turns,
        "normalize_input_us": round(best_us(lambda: normalize_input(turns), args.repeats, 50), 1),
        "new_id_us": round(best_us(lambda: new_id("msg_"), args.repeats, 20000), 3),
        "uuid4_hex_id_us": round(best_us(lambda: "msg_" + uuid.uuid4().hex, args.repeats, 20000), 3),
    }
    md = (f"# Responses input items: cost\n\n{result['when']}, commit {result['commit']}, Python {result['python']}, "
          f"best of {args.repeats}.\n\n| what | µs |\n|---|---|\n"
          f"| normalize_input, {args.turns} messages | {result['normalize_input_us']} |\n"
          f"| one id, secrets.token_hex(16) (new_id) | {result['new_id_us']} |\n"
          f"| one id, uuid.uuid4().hex (before) | {result['uuid4_hex_id_us']} |\n")
    write_results(args.out, result, md)


if __name__ == "__main__":
    main()
