#!/usr/bin/env python
"""How long big request bodies stall the server's IOLoop, with and without ``engine.gc_freeze``.

One run starts the standalone server (``xllm serve`` in a child process, the tiny random Llama the
tests build, in a temporary store) once per setting of ``XLLM_ENGINE_GC_FREEZE`` (0, then 1), posts
each body below ``--repeats`` times while a thread polls ``GET /health`` every ``--poll-ms`` on its own
keep-alive connection, and reports, per body and setting, the worst and the p99 ``/health`` latency
among the polls that overlapped a post (docs/performance.md, "Big request bodies and the IOLoop").

Bodies (as the doc's table): chat with 25k assistant tool-call messages and their answers (~3.6 MB);
chat, one message with 30k tool calls and their answers; Responses with 20k ``function_call`` and 20k
``function_call_output`` items, and with 40k ``function_call_output`` items alone (~2.6 MB, refused after
its parse: no calls); completions with 600k token ids (~1.8 MB); a small chat request. The big ones are
refused (context length) after they are parsed and translated: that work, and the garbage collections
it sets off, is what stalls the loop.

    .venv/bin/python benchmarks/loop_stall.py                      # writes benchmarks/results/loop_stall.{json,md}
    .venv/bin/python benchmarks/loop_stall.py --repeats 5 --settings 1
    .venv/bin/python benchmarks/loop_stall.py --settings 1 --bodies completions,small --out /tmp/ls   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, commit, tiny_store, write_results  # noqa: E402

MODEL = TINY


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", metavar="DIR", help="a local HF model dir to serve (default: build the tests' tiny Llama)")
    p.add_argument("--repeats", type=int, default=3, help="posts of each body per setting")
    p.add_argument("--poll-ms", type=float, default=5.0, help="interval between /health polls")
    p.add_argument("--settings", default="0,1", help="XLLM_ENGINE_GC_FREEZE values to run, in order")
    p.add_argument("--bodies", default="", help="comma-separated words: only the bodies whose names contain one (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_stall"),
                   help="output path without extension")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ bodies
def bodies() -> dict[str, bytes]:
    """The request bodies, pre-encoded (the client builds nothing while it measures)."""
    call = {"name": "f", "arguments": "{}"}

    def calls(ids: range) -> list[dict]:
        return [{"id": f"c{i}", "type": "function", "function": call} for i in ids]

    def answers(ids: range) -> list[dict]:
        return [{"role": "tool", "tool_call_id": f"c{i}", "content": "ok"} for i in ids]

    user = {"role": "user", "content": "Look it up."}
    turns = [user]
    for i in range(25_000):  # each assistant tool call answered (the server refuses unanswered calls)
        turns += [{"role": "assistant", "tool_calls": calls(range(i, i + 1))}, *answers(range(i, i + 1))]
    found = {
        "chat, 25k assistant tool-call messages and their answers": {"model": MODEL, "messages": turns, "max_tokens": 1},
        "chat, 1 message with 30k tool calls and their answers": {
            "model": MODEL, "max_tokens": 1,
            "messages": [user, {"role": "assistant", "tool_calls": calls(range(30_000))}, *answers(range(30_000))]},
        "Responses, 20k function_call and 20k function_call_output items": {
            "model": MODEL, "max_output_tokens": 16, "store": False,
            "input": [item for i in range(20_000) for item in (
                {"type": "function_call", "call_id": f"c{i}", **call},
                {"type": "function_call_output", "call_id": f"c{i}", "output": "ok"})]},
        "Responses, 40k function_call_output items (refused: no calls)": {
            "model": MODEL, "max_output_tokens": 16, "store": False,
            "input": [{"type": "function_call_output", "call_id": f"c{i}", "output": "sunny"} for i in range(40_000)]},
        "completions, 600k token ids": {"model": MODEL, "prompt": [10 + i % 90 for i in range(600_000)], "max_tokens": 1},
        "a small chat request": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    }
    return {name: json.dumps(body, separators=(",", ":")).encode() for name, body in found.items()}


PATHS = {"chat": "/v1/chat/completions", "Responses": "/v1/responses", "completions": "/v1/completions",
         "a small chat request": "/v1/chat/completions"}


def path_of(name: str) -> str:
    """The endpoint a body goes to."""
    return next(path for prefix, path in PATHS.items() if name.startswith(prefix))


# ------------------------------------------------------------------------ server
def start_server(home: Path, freeze: str, log_path: Path) -> ChildServer:
    """``xllm serve`` in a child process, this checkout's code, with ``engine.gc_freeze`` set by env."""
    return ChildServer(home, log_path, env={"XLLM_ENGINE_GC_FREEZE": freeze, "XLLM_SERVER_MAX_BODY_BYTES": str(64 * 1024 * 1024)})


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length (the server's JSON answers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.strip().lower() == b"content-length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` on a fresh connection; status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        return read_response(sock)


class HealthPoller(threading.Thread):
    """Polls ``GET /health`` on one keep-alive connection; records (sent at, latency) of every poll."""

    def __init__(self, port: int, interval: float):
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self.stopping.is_set():
                sent = time.perf_counter()
                sock.sendall(request)
                status, _ = read_response(sock)
                done = time.perf_counter()
                if status == 200:
                    self.samples.append((sent, done - sent))
                time.sleep(max(0.0, self.interval - (done - sent)))

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the polls that overlapped ``[start, end]``."""
        return [lat for sent, lat in list(self.samples) if sent <= end and sent + lat >= start]


# ------------------------------------------------------------------- measuring
def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


def measure(server: ChildServer, all_bodies: dict[str, bytes], repeats: int, poll_ms: float) -> dict:
    """Per body: every post's worst /health latency, the worst and p99 over all posts, the answers' statuses."""
    poller = HealthPoller(server.port, poll_ms / 1000)
    poller.start()
    time.sleep(1.0)  # a quiet second: the idle latency
    idle = poller.between(0, time.perf_counter())
    out: dict = {"idle": {"polls": len(idle), "worst_s": round(max(idle), 4), "p99_s": round(p99(idle), 4)}}
    for name, body in all_bodies.items():
        worsts, every, statuses, seconds = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            status, _ = post(server.port, path_of(name), body)
            end = time.perf_counter()
            time.sleep(0.3)  # a collection set off right after the answer still counts
            window = poller.between(start, time.perf_counter())
            worsts.append(max(window))
            every += window
            statuses.append(status)
            seconds.append(end - start)
        out[name] = {"bytes": len(body), "status": sorted(set(statuses)), "post_s": round(statistics.median(seconds), 3),
                     "polls": len(every), "worst_per_post_s": [round(w, 4) for w in worsts],
                     "worst_s": round(max(every), 4), "p99_s": round(p99(every), 4)}
        print(f"  {name}: worst {max(every):.3f} s, p99 {p99(every):.3f} s over {len(every)} polls "
              f"({len(body) / 1e6:.1f} MB, status {sorted(set(statuses))})", flush=True)
    poller.stopping.set()
    poller.join(10)
    return out



def markdown(result: dict) -> str:
    """The results as a Markdown table: per body and setting, the worst /health latency (the range of each
    post's worst, then over all posts) and the p99."""
    settings = list(result["runs"])
    lines = [f"# loop_stall ({result['when']}, {result['commit']}, {result['cpus']} CPUs, "
             f"{result['repeats']} posts per body, /health every {result['poll_ms']} ms)", "",
             f"`{result['command']}`", "",
             "| body | size | " + " | ".join(f"gc_freeze={s}: worst per post | p99" for s in settings) + " |",
             "|---|---|" + "---|---|" * len(settings)]
    for name in result["runs"][settings[0]]:
        if name == "idle":
            cells = [f"{result['runs'][s]['idle']['worst_s']:.3f} s | {result['runs'][s]['idle']['p99_s']:.3f} s"
                     for s in settings]
            lines.append("| idle, 1 s | | " + " | ".join(cells) + " |")
            continue
        cells = []
        for s in settings:
            row = result["runs"][s][name]
            per_post = row["worst_per_post_s"]
            cells.append(f"{min(per_post):.3f}-{max(per_post):.3f} s | {row['p99_s']:.3f} s")
        size = result["runs"][settings[0]][name]["bytes"]
        lines.append(f"| {name} | {size / 1e6:.2f} MB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run every setting, write the results."""
    args = parse_args(argv)
    words = [w for w in args.bodies.split(",") if w]
    all_bodies = {name: body for name, body in bodies().items() if not words or any(w in name for w in words)}
    result: dict = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "repeats": args.repeats,
                    "poll_ms": args.poll_ms, "command": " ".join(["python benchmarks/loop_stall.py", *(sys.argv[1:] if argv is None else argv)]),
                    "runs": {}}
    with tempfile.TemporaryDirectory(prefix="xllm-loop-stall-") as tmp:
        tmp_path = Path(tmp)
        tiny_store(tmp_path / "home", args.tiny, MODEL)
        for freeze in args.settings.split(","):
            print(f"XLLM_ENGINE_GC_FREEZE={freeze}", flush=True)
            server = start_server(tmp_path / "home", freeze, tmp_path / f"server-{freeze}.log")
            try:
                result["runs"][freeze] = measure(server, all_bodies, args.repeats, args.poll_ms)
            finally:
                server.stop()
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
