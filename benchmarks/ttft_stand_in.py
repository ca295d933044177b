#!/usr/bin/env python
"""Time to first token at 1 stream: the raw exllama generator vs our server(s), interleaved, on the stand-in.

``gpu_serving.py --stand-in`` runs each side once (raw, then the server after a 1.5 s client
setup), so on a shared 2-core machine one reading says little about a few milliseconds. Here
every round sends one fresh 128-token prompt to each side in turn (the raw generator in this
process, then each server child; the order rotates per round), so load changes hit all of them
alike, and reports per side the best and the median TTFT and tok/s over ``--rounds``.

Servers are ``NAME=ROOT`` checkouts (``--server``, repeatable; default ``this=`` this
checkout), each run as ``ROOT/benchmarks/gpu_serving.py --serve --stand-in`` with ROOT first
on ``sys.path``, so a ``git archive`` of an older commit gives the "before" of a change in the
same run. The client is a blocking socket per request in this process (nothing else runs
while it waits); its connection is open before the clock starts, as ``sse_load.py``'s are.
Needs the libraries' prebuilt extension modules: run it through ``benchmarks/gpu/cpu_check.sh``'s
environment (see benchmarks/README.md).

    python benchmarks/ttft_stand_in.py --backend exllamav3 --rounds 30 --server before=/tmp/old --server after=.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_serving  # noqa: E402  (after the path set-up: run from a checkout without installing)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (backend, rounds, servers to compare, tokens)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="exllamav3", choices=["exllamav3", "exllamav2"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--server", action="append", default=[], metavar="NAME=ROOT",
                   help="a checkout whose server to measure (repeatable; default: this=<this checkout>)")
    p.add_argument("--stand-in", default="", metavar="PROFILE", help="gpu_like.GpuProfile.parse overrides")
    p.add_argument("--gap", type=float, default=0.05, help="seconds of idle before each request")
    p.add_argument("--out", default=None, help="results JSON (default: results/ttft_stand_in_<backend>.json)")
    return p.parse_args(argv)


def prompt(i: int, length: int) -> list[int]:
    """A fresh prompt per request: distinct first tokens, so no prefix-cache hit on either side."""
    rng = random.Random(i)
    return [rng.randrange(100, 40000) for _ in range(length)]


def start_server(root: Path, model: str, backend: str, stand_in: str) -> tuple[subprocess.Popen, str]:
    """``root``'s benchmark server child over ``model``; returns it and its URL."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(root / "benchmarks" / "gpu_serving.py"), "--serve", model,
                             "--backend", backend, f"--stand-in={stand_in}"], cwd=root, env=env,
                            stdout=subprocess.PIPE, text=True)
    url = gpu_serving.server_url(proc.stdout)
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # never a full pipe
    return proc, url


def http_stream(url: str, ids: list[int], new_tokens: int) -> dict:
    """One streamed completion over a raw socket: start, first content, end (monotonic s) and tokens."""
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    body = json.dumps({"model": "bench", "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data, first = b"", None
    try:
        start = time.monotonic()
        sock.sendall(head + body)
        while True:
            got = sock.recv(65536)
            if not got:
                break
            if first is None and gpu_serving_content(got):
                first = time.monotonic()
            data += got
        end = time.monotonic()
    finally:
        sock.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {data[:200]!r}")
    tokens = int(data.rsplit(b'"completion_tokens":', 1)[1].split(b",", 1)[0].split(b"}", 1)[0])
    return {"start": start, "first": first, "end": end, "tokens": tokens}


def gpu_serving_content(data: bytes) -> bool:
    """True when ``data`` holds an SSE event with generated text (sse_load's pattern)."""
    import sse_load

    return sse_load.CONTENT.search(data) is not None


def raw_stream(raw: gpu_serving.RawStandIn, ids: list[int], new_tokens: int) -> dict:
    """One stream on the library's generator in this process (gpu_serving's raw level, one prompt)."""
    recs, _ = gpu_serving.raw_level(raw, [ids], new_tokens)
    rec = recs[0]
    return {"start": rec["start"], "first": rec["first"], "end": rec["times"][-1][0], "tokens": rec["tokens"]}


def summary(runs: list[dict]) -> dict:
    """Best and median TTFT (ms) and tok/s (tokens over first request byte to last token) of ``runs``."""
    ttft = [(r["first"] - r["start"]) * 1000 for r in runs]
    toks = [r["tokens"] / (r["end"] - r["start"]) for r in runs]
    return {"runs": len(runs), "ttft_best_ms": round(min(ttft), 2), "ttft_p50_ms": round(statistics.median(ttft), 2),
            "tok_s_best": round(max(toks), 1), "tok_s_p50": round(statistics.median(toks), 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the rounds; print and save the per-side summary."""
    args = parse_args(argv)
    servers = [s.split("=", 1) for s in (args.server or [f"this={ROOT}"])]
    model = str(gpu_serving.stand_in_model())
    load0 = os.getloadavg()
    procs = {}
    try:
        for name, root in servers:
            procs[name] = start_server(Path(root).resolve(), model, args.backend, args.stand_in)
        raw = gpu_serving.RawStandIn(model, args.backend, argparse.Namespace(max_batch=128, stand_in=args.stand_in))
        sides: dict[str, object] = {"raw": raw, **{name: url for name, (_, url) in procs.items()}}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        names = list(sides)
        for i in range(-2, args.rounds):  # two warm-up rounds
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                ids = prompt(i * 100 + names.index(name) + 1000, args.prompt_tokens)
                time.sleep(args.gap)
                side = sides[name]
                run = (raw_stream(side, ids, args.new_tokens) if name == "raw"
                       else http_stream(side, ids, args.new_tokens))  # type: ignore[arg-type]
                if i >= 0:
                    runs[name].append(run)
        raw.close()
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(60)
    load1 = os.getloadavg()
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": args.backend,
              "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "load_avg": [round(load0[0], 2), round(load1[0], 2)], "servers": dict(servers),
              "sides": {name: summary(r) for name, r in runs.items()}}
    raw_s = report["sides"]["raw"]
    for name, s in report["sides"].items():
        extra = "" if name == "raw" else (f"  (+{s['ttft_p50_ms'] - raw_s['ttft_p50_ms']:.2f} ms p50, "
                                          f"tok/s {s['tok_s_p50'] / raw_s['tok_s_p50']:.3f} of raw p50)")
        print(f"{args.backend} {name:>8}: TTFT best {s['ttft_best_ms']} p50 {s['ttft_p50_ms']} ms, "
              f"tok/s best {s['tok_s_best']} p50 {s['tok_s_p50']}{extra}", flush=True)
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ttft_stand_in_{args.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
