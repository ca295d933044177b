#!/usr/bin/env python
"""What the request-body rules cost (openai/json_body.py, server/request_body.py), in process, on CPU.

Three measurements, each the best of ``--repeats`` timings:

- **parse**: ``parse_request`` of chat bodies of several shapes (a typical two-message chat; about
  50 KB as one pasted file, as a 240-turn conversation and as 80 tool schemas; ``--messages`` counts
  of short messages, the largest near 256 KiB, the largest parsed on the IOLoop), in µs per request,
  with what two of its steps cost alone: the strict pass (``json_body.strict_json``: UTF-8, duplicate
  keys) and pydantic's own parse-and-validate (``model_validate_json``); the rest is the checks that
  follow (non-finite numbers, ``check()``);
- **inflate**: ``BodyReader`` taking a 4 MiB chat body as it comes off the wire in 64 KiB chunks,
  plain and gzip-compressed, in ms;
- **bomb**: ``BodyReader`` refusing a gzip body that inflates to 1 GiB (about 1 MiB on the wire) at a
  4 MiB cap, in ms and in bytes inflated before the 413.

    .venv/bin/python benchmarks/body_rules_cost.py     # writes benchmarks/results/body_rules_cost.{json,md}
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, write_results  # noqa: E402

CAP = 4 * 1024 * 1024
CHUNK = 64 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timings per measurement (the best is kept)")
    p.add_argument("--messages", type=int, nargs="+", default=[4, 5000], help="messages per parsed chat body")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "body_rules_cost"), help="output path without extension")
    return p.parse_args(argv)


def best(work: Callable[[], Any], repeats: int, loops: int = 1) -> float:
    """Best seconds per call of ``work`` over ``repeats`` timings of ``loops`` calls."""
    top = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            work()
        top = min(top, (time.perf_counter() - start) / loops)
    return top


def chat_body(messages: int) -> bytes:
    """A chat request with ``messages`` short user messages."""
    msgs = [{"role": "user", "content": f"hello world, message {i}"} for i in range(messages)]
    return json.dumps({"model": "tiny", "messages": msgs, "max_tokens": 8}).encode()


def shaped_bodies(messages: list[int]) -> dict[str, bytes]:
    """The chat bodies measured, by name: a typical small one, three of about 50 KB, and ``messages`` counts."""
    system = {"role": "system", "content": "You are a helpful assistant."}
    code = ("def double(x):\n    return x * 2  # see issue 123\n" * 1200)[:48_000]
    turns: list[dict[str, str]] = [system]
    for i in range(120):
        turns += [{"role": "user", "content": f"Question {i}: " + "lorem ipsum dolor sit amet " * 6},
                  {"role": "assistant", "content": f"Answer {i}: " + "consectetur adipiscing elit " * 5}]
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "Does one thing well. " * 8,
        "parameters": {"type": "object", "properties": {"a": {"type": "string", "description": "x" * 50},
                                                        "b": {"type": "integer"}}, "required": ["a"]}}}
        for i in range(80)]
    small = {"model": "tiny", "messages": [system, {"role": "user", "content": "Hello there, how are you?"}],
             "max_tokens": 64, "temperature": 0.7}
    bodies = {
        "chat, 2 messages": small,
        "50 KB: one pasted file": {"model": "tiny", "messages": [system, {"role": "user", "content": "Review:\n" + code}]},
        "50 KB: 240 turns": {"model": "tiny", "messages": turns, "temperature": 0.2},
        "30 KB: 80 tools": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": tools},
    }
    out = {name: json.dumps(body).encode() for name, body in bodies.items()}
    out.update({f"{m} short messages": chat_body(m) for m in messages})
    return out


def parse_cost(name: str, body: bytes, repeats: int) -> dict[str, Any]:
    """µs per ``parse_request`` of ``body``, and per strict pass and per pydantic parse of it alone."""
    from xllm_jupyter.openai import protocol
    from xllm_jupyter.openai.json_body import strict_json

    cls = protocol.ChatCompletionRequest
    loops = max(1, 200_000 // len(body))
    return {"body": name, "bytes": len(body),
            "parse_request_us": 1e6 * best(lambda: protocol.parse_request(cls, body), repeats, loops),
            "strict_pass_us": 1e6 * best(lambda: strict_json(body), repeats, loops),
            "pydantic_us": 1e6 * best(lambda: cls.model_validate_json(body), repeats, loops)}


def read(data: bytes, coding: str | None) -> Any:
    """``data`` through a BodyReader at the 4 MiB cap, 64 KiB at a time; the reader."""
    from xllm_jupyter.core.errors import PayloadTooLarge
    from xllm_jupyter.server.request_body import BodyReader

    reader = BodyReader(CAP, coding, lambda: PayloadTooLarge("too large"), "application/json")
    try:
        for i in range(0, len(data), CHUNK):
            reader.feed(data[i:i + CHUNK])
        reader.body()
    except PayloadTooLarge:
        pass
    return reader


def main(argv: list[str] | None = None) -> int:
    """Measure and write the report."""
    args = parse_args(argv)
    parses = [parse_cost(name, body, args.repeats) for name, body in shaped_bodies(args.messages).items()]
    plain = chat_body(1)[:-1] + b', "pad": "' + b"x" * (CAP - 200) + b'"}'
    packed = gzip.compress(plain)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(packer.compress(b"0" * 2**20) for _ in range(1024)) + packer.flush()
    inflated = read(bomb, "gzip").size
    result = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
        "parse": parses,
        "inflate": {"bytes": len(plain), "gzip_bytes": len(packed),
                    "plain_ms": 1e3 * best(lambda: read(plain, None), args.repeats),
                    "gzip_ms": 1e3 * best(lambda: read(packed, "gzip"), args.repeats)},
        "bomb": {"gzip_bytes": len(bomb), "inflates_to": 2**30, "inflated_before_413": inflated,
                 "ms": 1e3 * best(lambda: read(bomb, "gzip"), args.repeats)},
    }
    lines = [f"# Request-body rules: what they cost ({result['cpus']} CPUs, Python {result['python']})", "",
             f"{result['when']}, commit {result['commit']}, `{result['command']}`", "",
             "| chat body | bytes | parse_request µs | strict pass alone | pydantic parse+validate alone | rest (checks) |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in parses:
        rest = p["parse_request_us"] - p["strict_pass_us"] - p["pydantic_us"]
        lines.append(f"| {p['body']} | {p['bytes']:,} | {p['parse_request_us']:.0f} | {p['strict_pass_us']:.0f} | "
                     f"{p['pydantic_us']:.0f} | {rest:.0f} |")
    inf, bmb = result["inflate"], result["bomb"]
    lines += ["", f"A {inf['bytes']:,}-byte body read in 64 KiB chunks: {inf['plain_ms']:.1f} ms plain, "
              f"{inf['gzip_ms']:.1f} ms from {inf['gzip_bytes']:,} bytes of gzip.", "",
              f"A gzip bomb of {bmb['gzip_bytes']:,} bytes (1 GiB inflated) at the 4 MiB cap: refused after "
              f"{bmb['inflated_before_413']:,} bytes inflated, in {bmb['ms']:.1f} ms.", ""]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
