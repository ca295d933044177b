#!/usr/bin/env python
"""Does JupyterLab stay responsive while the shared engine is busy?

One run starts JupyterLab with the xllm extension (the tests' tiny random Llama as the default
model, a temporary store) and measures what a notebook user feels, first idle and then while
``--streams`` clients stream chat completions through the extension's ``{base_url}xllm/v1`` as
kernels would (``--prompt-tokens`` prompts, 256 new tokens each, back to back):

- the Jupyter REST API (``api/contents``, ``api/kernels``, ``api/status``) polled every 20 ms;
- a kernel's round trip: ``execute_request`` of ``1+1`` over the kernel websocket until its
  ``execute_reply``, every 100 ms.

It reports p50 / p99 / max of each, idle and loaded, and the tokens per second the streams got.
Results: ``benchmarks/results/lab_responsive.{json,md}``.

    .venv/bin/python benchmarks/lab_responsive.py
    .venv/bin/python benchmarks/lab_responsive.py --streams 32 --seconds 30 --prompt-tokens 1500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from tornado.websocket import websocket_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, commit, tiny_store, write_results  # noqa: E402

from tests.browser import LabServer, jupyter_lab  # noqa: E402

API_PATHS = ("api/contents", "api/kernels", "api/status")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients in the loaded phase")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--prompt-tokens", type=int, default=128, help="about how many tokens each prompt has")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lab_responsive"), help="output path without extension")
    return p.parse_args(argv)


def summary(samples: list[float]) -> dict[str, float | int | None]:
    """p50 / p99 / max in milliseconds, and the count."""
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * p99, 1), "max_ms": round(1000 * ordered[-1], 1)}


async def poll_api(lab: LabServer, stop: asyncio.Event, out: list[float]) -> None:
    """GET the Jupyter API paths in turn every 20 ms; record each latency."""
    headers = {"Authorization": f"token {lab.token}"}
    async with httpx.AsyncClient(base_url=lab.url, headers=headers, timeout=60) as client:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            (await client.get(API_PATHS[i % len(API_PATHS)])).raise_for_status()
            out.append(time.perf_counter() - start)
            i += 1
            await asyncio.sleep(0.02)


def _execute_request(code: str, session: str) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": session, "username": "bench",
              "version": "5.3", "date": datetime.now(timezone.utc).isoformat()}
    return {"header": header, "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}


async def poll_kernel(lab: LabServer, kernel_id: str, stop: asyncio.Event, out: list[float]) -> None:
    """Run ``1+1`` on the kernel every 100 ms; record each execute round trip."""
    session = uuid.uuid4().hex
    url = lab.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels?session_id={session}"
    from tornado.httpclient import HTTPRequest

    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {lab.token}"}))
    try:
        while not stop.is_set():
            request = _execute_request("1+1", session)
            start = time.perf_counter()
            ws.write_message(json.dumps(request))
            while True:
                raw = await ws.read_message()
                if raw is None:
                    raise RuntimeError("the kernel websocket closed")
                msg = json.loads(raw)
                if msg.get("msg_type") == "execute_reply" and msg["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                    break
            out.append(time.perf_counter() - start)
            await asyncio.sleep(0.1)
    finally:
        ws.close()


async def stream_load(lab: LabServer, streams: int, prompt_tokens: int, stop: asyncio.Event) -> dict[str, Any]:
    """``streams`` clients streaming chat completions back to back until ``stop``; requests and errors."""
    headers = {"Authorization": f"token {lab.token}"}
    prompt = " ".join(["word"] * max(1, prompt_tokens - 8))
    counts = {"requests": 0, "errors": 0}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            body = {"model": TINY, "messages": [{"role": "user", "content": f"{i} {prompt}"}], "max_tokens": 256,
                    "ignore_eos": True, "stream": True}
            async with client.stream("POST", "xllm/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    counts["errors"] += 1
                    await r.aread()
                    continue
                async for _ in r.aiter_lines():
                    if stop.is_set():
                        break
            counts["requests"] += 1

    async with httpx.AsyncClient(base_url=lab.url, headers=headers, timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(streams)))
    return counts


async def generated_tokens(lab: LabServer) -> int:
    """The engine's count of generated tokens (``xllm/admin/stats``)."""
    async with httpx.AsyncClient(base_url=lab.url, headers={"Authorization": f"token {lab.token}"}, timeout=60) as client:
        return (await client.get("xllm/admin/stats")).json()["generated_tokens"]


async def phase(lab: LabServer, kernel_id: str, seconds: float, streams: int, prompt_tokens: int) -> dict[str, Any]:
    """One phase: the pollers for ``seconds``, with ``streams`` streaming clients (0: idle)."""
    stop = asyncio.Event()
    api, kernel = [], []
    tasks = [asyncio.create_task(poll_api(lab, stop, api)), asyncio.create_task(poll_kernel(lab, kernel_id, stop, kernel))]
    load = asyncio.create_task(stream_load(lab, streams, prompt_tokens, stop)) if streams else None
    tokens, start = await generated_tokens(lab), time.perf_counter()
    await asyncio.sleep(seconds)
    tokens, elapsed = await generated_tokens(lab) - tokens, time.perf_counter() - start
    stop.set()
    await asyncio.gather(*tasks)
    result = {"streams": streams, "api": summary(api), "kernel": summary(kernel)}
    if load is not None:
        result["load"] = {**await load, "tok_per_s": round(tokens / elapsed, 1)}
    return result


async def measure(lab: LabServer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Idle, then loaded."""
    headers = {"Authorization": f"token {lab.token}"}
    async with httpx.AsyncClient(base_url=lab.url, headers=headers, timeout=300) as client:
        warm = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        (await client.post("xllm/v1/chat/completions", json=warm)).raise_for_status()  # the model is loaded
        kernel_id = (await client.post("api/kernels", json={"name": "python3"})).json()["id"]
    try:
        await asyncio.sleep(3)  # the kernel starts
        return [await phase(lab, kernel_id, args.seconds, 0, args.prompt_tokens),
                await phase(lab, kernel_id, args.seconds, args.streams, args.prompt_tokens)]
    finally:
        async with httpx.AsyncClient(base_url=lab.url, headers=headers, timeout=60) as client:
            await client.delete(f"api/kernels/{kernel_id}")


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = ["# JupyterLab responsiveness while the engine is busy (tiny Llama, CPU)", "",
             f"{result['when']}, commit {result['commit']}, {result['cpus']} CPUs, `{result['command']}`; "
             f"prompts of about {result['prompt_tokens']} tokens, 256 new tokens per request.", "",
             "| phase | Jupyter API p50 / p99 / max ms | kernel `1+1` round trip p50 / p99 / max ms | streams' tok/s | stream errors |",
             "|---|---|---|---:|---:|"]
    for row in result["phases"]:
        name = "idle" if not row["streams"] else f"{row['streams']} streams"
        api, kernel, load = row["api"], row["kernel"], row.get("load", {})
        lines.append(f"| {name} | {api['p50_ms']} / {api['p99_ms']} / {api['max_ms']} | {kernel['p50_ms']} / "
                     f"{kernel['p99_ms']} / {kernel['max_ms']} | {load.get('tok_per_s', '')} | {load.get('errors', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run both phases, write the results."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xllm-lab-responsive-") as tmp:
        home = Path(tmp) / "home"
        tiny_store(home)
        config = {"XllmApp": {"default_model": TINY, "home": str(home), "max_batch_size": max(8, args.streams)}}
        env = {"XLLM_ENGINE_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with jupyter_lab(Path(tmp) / "lab", config=config, env=env, name="lab-responsive") as lab:
            phases = asyncio.run(measure(lab, args))
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "prompt_tokens": args.prompt_tokens,
              "command": " ".join(["python benchmarks/lab_responsive.py", *(sys.argv[1:] if argv is None else argv)]),
              "phases": phases}
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
