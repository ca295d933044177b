#!/usr/bin/env python
"""What a large ``logit_bias`` costs per decoding step on the transformers backend (CPU).

Two measurements:

- **sampler**: ``sample()`` on one (1, V) logits row (V = the tiny Llama's vocabulary, 49,152) with a
  ``logit_bias`` of 0 .. 1,024 entries (OpenAI's cap, enforced in ``openai/protocol.py``) and, for
  contrast, one entry per vocabulary token, which the cap now refuses; best of ``--repeats`` timings of
  ``--steps`` steps, in µs per step;
- **server**: ``xllm serve`` with the tests' tiny random Llama, one greedy chat of ``--tokens`` tokens
  (``ignore_eos``) with no bias and with 1,024 entries, alternated ``--repeats`` times; the best
  wall time of each, in µs per generated token.

    .venv/bin/python benchmarks/logit_bias_cost.py     # writes benchmarks/results/logit_bias_cost.{json,md}
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, commit, tiny_store, write_results  # noqa: E402

KEY = "bias-key"
SIZES = (0, 16, 300, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="sampler steps per timing")
    p.add_argument("--tokens", type=int, default=256, help="tokens per server request")
    p.add_argument("--repeats", type=int, default=5, help="timings per setting (the best is kept)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logit_bias_cost"), help="output path without extension")
    return p.parse_args(argv)


def sampler_cost(vocab: int, size: int, steps: int, repeats: int) -> float:
    """Best µs per ``sample()`` step of one greedy row with ``size`` bias entries."""
    import torch

    from xllm_jupyter.backends.sampling import JobSampler, sample
    from xllm_jupyter.core.types import SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(temperature=0.0, logit_bias={i * (vocab // max(size, 1)): -1.0 for i in range(size)})
    job = JobSampler(params, [], vocab, "cpu")
    logits = torch.randn(1, vocab)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            sample(logits.clone(), [job], [None])
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / steps


def server_cost(server: ChildServer, tokens: int, repeats: int, vocab: int) -> dict[str, float]:
    """Best µs per generated token of a greedy chat, without a bias and with 1,024 entries."""
    base = {"model": TINY, "messages": [{"role": "user", "content": "Count"}], "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    bodies = {"none": base, "1024": {**base, "logit_bias": {str(i * (vocab // 1024)): -1 for i in range(1024)}}}
    best = {name: float("inf") for name in bodies}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as client:
        client.post("/v1/chat/completions", json=base).raise_for_status()  # warm-up
        for i in range(repeats):
            for name in (list(bodies) if i % 2 == 0 else list(bodies)[::-1]):
                start = time.perf_counter()
                reply = client.post("/v1/chat/completions", json=bodies[name])
                reply.raise_for_status()
                assert reply.json()["usage"]["completion_tokens"] == tokens
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(1e6 * seconds / tokens, 1) for name, seconds in best.items()}


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown report."""
    lines = [f"# logit_bias cost per step (transformers backend, CPU, vocabulary {result['vocab']})", "",
             f"{result['when']}, commit {result['commit']}, {result['cpus']} CPUs, `{result['command']}`", "",
             "| entries | sampler µs/step | extra vs none |", "|---:|---:|---:|"]
    none = result["sampler_us"]["0"]
    for size, us in result["sampler_us"].items():
        lines.append(f"| {size} | {us:.1f} | {us - none:+.1f} |")
    server = result["server_us_per_token"]
    lines += ["", f"Server, greedy chat of {result['tokens']} tokens: {server['none']} µs/token without a bias, "
              f"{server['1024']} with 1,024 entries ({server['1024'] - server['none']:+.1f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure and write the results."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="xllm-bias-") as tmp:
        home = Path(tmp) / "home"
        tiny_store(home)
        vocab = len(AutoTokenizer.from_pretrained(next(home.parent.glob("home-model*"))))
        sampler = {str(size): round(sampler_cost(vocab, size, args.steps, args.repeats), 1) for size in (*SIZES, vocab)}
        server = ChildServer(home, Path(tmp) / "server.log", api_key=KEY)
        try:
            per_token = server_cost(server, args.tokens, args.repeats, vocab)
        finally:
            server.stop()
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "vocab": vocab, "tokens": args.tokens,
              "command": " ".join(["python benchmarks/logit_bias_cost.py", *(sys.argv[1:] if argv is None else argv)]),
              "sampler_us": sampler, "server_us_per_token": per_token}
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
