#!/usr/bin/env python
"""Per-token server overhead on CPU: a tiny random-weight Llama, raw vs engine vs HTTP server.

The tiny model (2 layers, 64 wide, SmolLM2's real tokenizer; ``tests/models.py``) with one
torch thread runs a step in well under a millisecond, so at 64 streams it makes thousands
of tokens per second, like a big model on a GPU, and what the server spends per token
decides the throughput. One run measures, at 1, 16 and 64 concurrent streams (chat,
~64-token prompt, ``--max-tokens`` new tokens, greedy, ignore_eos so every stream is the
same length):

(raw)       the backend's LoadedModel driven directly: add every job, step until done;
(engine)    ``Engine.generate`` in this process (engine thread + asyncio, no HTTP);
(server)    the standalone server in a child process, streamed over SSE by
            the lean load generator (``sse_load.py``: raw sockets, requests written at
            one moment) in another child process.

Reports aggregate tok/s, TTFT p50, the server/raw ratio and the server's overhead per
token, ``1/server_rate - 1/raw_rate`` (µs). Writes ``benchmarks/results/stream_overhead.{json,md}``;
``--label`` names the run, and earlier runs under other labels are kept in the files
(e.g. ``--label before`` on the old code, then ``--label after``).

    python benchmarks/stream_overhead.py --label after
    python benchmarks/stream_overhead.py --levels 64 --server-only   # load for a profiler (prints the pid)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

# one thread each: the model stays cheap and the server's own cost shows (set before torch loads)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_serving  # noqa: E402  (raw/in-process/client code shared with the SmolLM2 benchmark)

MODEL = "bench"
GPU_LIKE_ENV = "XLLM_BENCH_GPU_LIKE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--serve`` is the internal server-process mode)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "xllm-tiny-llama-bench"),
                   help="where the tiny model is built (reused when present)")
    p.add_argument("--levels", default="1,16,64")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="runs per level and mode; the best is reported")
    p.add_argument("--label", default="current", help="name of this run in the results (other labels are kept)")
    p.add_argument("--server-only", action="store_true", help="only the server mode, results not written (for profiling)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_overhead"))
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="engine.stream_interval_ms for the engine and server modes (default: the config default)")
    p.add_argument("--gpu-like", metavar="PROFILE", nargs="?", const="default",
                   help="replace the model's steps with a GPU engine's CPU profile (benchmarks/gpu_like.py; "
                        "'default' or overrides such as 'launches=60,per_seq_us=210')")
    p.add_argument("--server-root", default=str(ROOT), help="checkout whose code the server process runs (e.g. a copy of the old code)")
    p.add_argument("--baseline-root", help="a second server from this checkout (e.g. `git archive` of the old code), measured "
                                           "in the same rounds as the first (mode 'baseline'): before/after in one run")
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def tiny_model(directory: Path) -> Path:
    """The tests' tiny Llama, built once into ``directory``."""
    if not (directory / "config.json").is_file():
        from tests.models import build_tiny_llama

        build_tiny_llama(directory)
    return directory


def spec_of(path: Path, max_batch: int):
    """A ModelSpec for the transformers backend, one torch thread, batch up to ``max_batch``."""
    from xllm_jupyter.backends.base import ModelSpec
    from xllm_jupyter.store.manifest import detect_format

    options = {"torch_threads": 1, "max_batch_size": max_batch, "device": "cpu"}
    backend = "transformers"
    profile = os.environ.get(GPU_LIKE_ENV)  # set by --gpu-like; the server child inherits it
    if profile is not None:
        import gpu_like

        gpu_like.register("" if profile == "default" else profile)
        backend = "gpu-like"
    return ModelSpec(name=MODEL, path=path, format=detect_format(path), backend=backend, context_length=4096,
                     overrides=options)  # over the engine's settings, as a model's own would be


class OneModel:
    """A catalog holding only the benchmark model."""

    def __init__(self, spec):
        self.spec = spec

    def resolve(self, name: str):
        """The spec (any other name is unknown)."""
        from xllm_jupyter.core.errors import ModelNotFound

        if name != MODEL:
            raise ModelNotFound(name)
        return self.spec

    def names(self) -> list[str]:
        """The one name."""
        return [MODEL]


def serve_main(args: Namespace) -> None:
    """Child mode: the standalone server (real Engine, ``start_server``) over the tiny model; prints its URL."""
    from xllm_jupyter.core.config import EngineConfig, ServerConfig, XllmConfig
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.standalone import start_server

    config = XllmConfig(server=ServerConfig(host="127.0.0.1", port=0, max_tokens_limit=8192),
                        engine=EngineConfig(default_model=MODEL, max_batch_size=args.concurrency, max_queue=4096,
                                            keep_alive="-1", torch_threads=1, **interval_option(args)))

    async def main() -> None:
        engine = Engine(config.engine, catalog=OneModel(spec_of(Path(args.serve), args.concurrency)))
        await engine.start()
        await engine.load(MODEL)
        server = await start_server(config, engine, port=0)
        print(json.dumps({"url": server.url}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def interval_option(args: Namespace) -> dict:
    """``stream_interval_ms`` for EngineConfig when ``--stream-interval-ms`` was given."""
    return {} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}


class ServerProcess:
    """The server child (``--serve``), running the code of checkout ``root``."""

    def __init__(self, path: Path, max_batch: int, root: Path = ROOT, interval_ms: float | None = None):
        cmd = [sys.executable, str(root / "benchmarks" / "stream_overhead.py"), "--serve", str(path),
               "--concurrency", str(max_batch)]
        if interval_ms is not None:  # only then: an older checkout's server may not know the flag
            cmd += ["--stream-interval-ms", str(interval_ms)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # inherits OMP_NUM_THREADS=1
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark server did not start")
        self.url = json.loads(line)["url"]

    def stop(self) -> None:
        """Terminate the child."""
        self.proc.terminate()
        self.proc.wait(60)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of process ``pid`` ("main" = the IOLoop thread, "other" = the rest); {} off Linux.

    Read from ``schedstat`` (nanoseconds on a CPU), fine enough for a 1-stream run; ``main_sys`` and
    ``other_sys`` are the kernel's share of them (``stat``'s stime, in clock ticks: coarse).
    """
    out = {"main": 0.0, "other": 0.0, "main_sys": 0.0, "other_sys": 0.0}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            stime = int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[12])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        key = "main" if tid == str(pid) else "other"
        out[key] += ns / 1e9
        out[key + "_sys"] += stime / tick
    return out


async def server_level(server: ServerProcess, messages: list[dict], c: int, n: int) -> dict:
    """One HTTP level from the lean load generator (``sse_load.py``), plus the server's CPU µs per token by thread."""
    import sse_load

    body = {"model": MODEL, "messages": messages, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    before = thread_cpu(server.proc.pid)
    recs, client_cpu = await asyncio.to_thread(sse_load.run_level, server.url, "/v1/chat/completions", [body] * c)
    after = thread_cpu(server.proc.pid)
    result = cpu_serving.summarize(recs, sse_load.span(recs))
    if result["tokens"]:
        result["client_cpu_us_per_token"] = round(client_cpu / result["tokens"] * 1e6, 1)
    if before and after and result["tokens"]:
        for k in ("main", "other", "main_sys", "other_sys"):
            result[f"cpu_us_per_token_{k}"] = round((after[k] - before[k]) / result["tokens"] * 1e6, 1)
    return result


def overhead_us(rate: float, ceiling: float) -> float | None:
    """µs added per token by going from ``ceiling`` tok/s to ``rate`` tok/s."""
    return round((1 / rate - 1 / ceiling) * 1e6, 1) if rate and ceiling else None


async def measure(args: Namespace, path: Path, levels: list[int], command: str = "") -> dict:
    """Every mode at every level; the server runs in a child process throughout."""
    import torch

    from xllm_jupyter.backends.base import BackendOptions
    from xllm_jupyter.backends.registry import select_backend
    from xllm_jupyter.core.config import EngineConfig
    from xllm_jupyter.core.types import ChatMessage
    from xllm_jupyter.engine.engine import Engine

    torch.set_num_threads(1)
    top = max(levels)
    spec = spec_of(path, top)
    server = ServerProcess(path, top, Path(args.server_root), args.stream_interval_ms)
    print(f"server pid {server.proc.pid} at {server.url}", file=sys.stderr, flush=True)
    baseline = ServerProcess(path, top, Path(args.baseline_root), args.stream_interval_ms) if args.baseline_root else None
    engine = raw = None
    try:
        if not args.server_only:
            engine = Engine(EngineConfig(max_batch_size=top, torch_threads=1, max_queue=4096, **interval_option(args)),
                            catalog=OneModel(spec))
            await engine.start()
            await engine.load(MODEL)
            raw_spec = dataclasses.replace(spec, options=BackendOptions().with_overrides(spec.overrides))
            raw = await asyncio.to_thread(select_backend(raw_spec).load, raw_spec)
        else:
            engine = Engine(EngineConfig(max_batch_size=1), catalog=OneModel(spec))  # only to tokenize the prompt
            await engine.start()
        messages, prompt_tokens = await cpu_serving.build_messages(engine, MODEL, args.prompt_tokens)
        prompt_ids = await engine.encode_chat(MODEL, [ChatMessage(**m) for m in messages])
        n = args.max_tokens
        modes = {
            "server": lambda c: server_level(server, messages, c, n),
        }
        if baseline is not None:
            modes["baseline"] = lambda c: server_level(baseline, messages, c, n)
        if not args.server_only:
            modes["raw"] = lambda c: asyncio.to_thread(cpu_serving.raw_level, raw, prompt_ids, c, n)
            modes["engine"] = lambda c: cpu_serving.inprocess_level(engine, MODEL, messages, c, n)
        for run in modes.values():  # warm-up: first calls allocate and compile
            await run(2)
        rows = []
        names = list(modes)
        for c in levels:
            runs: dict[str, list[dict]] = {m: [] for m in names}
            for i in range(args.repeats):
                for m in names[i % len(names):] + names[: i % len(names)]:  # rotate which goes first
                    runs[m].append(await modes[m](c))
            row = {"streams": c, **{m: cpu_serving.best(r) for m, r in runs.items()}, "runs": runs}
            if "raw" in row:
                raw_rate = row["raw"]["aggregate_tok_s"]
                for m in ("engine", "server", "baseline")[: 3 if baseline is not None else 2]:
                    row[f"{m}_ratio"] = round(row[m]["aggregate_tok_s"] / raw_rate, 3)
                    row[f"{m}_overhead_us_per_token"] = overhead_us(row[m]["aggregate_tok_s"], raw_rate)
            print(json.dumps({**{k: v for k, v in row.items() if k != "runs"}, "all": {m: [x["aggregate_tok_s"] for x in r] for m, r in runs.items()}}), file=sys.stderr, flush=True)
            rows.append(row)
        env = cpu_serving.environment(engine, MODEL) if not args.server_only else {}
    finally:
        server.stop()
        if baseline is not None:
            baseline.stop()
        if raw is not None:
            raw.unload()
        if engine is not None:
            await engine.stop()
    return {"params": {"prompt_tokens": prompt_tokens, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                       "levels": levels, "repeats": args.repeats, "endpoint": "/v1/chat/completions",
                       "client": "sse_load (raw sockets)", "model": "gpu-like stand-in" if args.gpu_like else "tiny Llama",
                       "stream_interval_ms": args.stream_interval_ms, "command": command,
                       **({"baseline_root": args.baseline_root} if args.baseline_root else {})},
            "env": env, "levels": rows}


def markdown(results: dict) -> str:
    """Every labelled run as a Markdown table."""
    lines = ["# Per-token stream overhead on CPU (tiny random-weight Llama, or the GPU-profile stand-in)", "",
             "raw = LoadedModel add/step loop, engine = `Engine.generate` in-process, server = standalone "
             "server in a child process streamed over SSE (chat) by a client in another process, named under each run (`sse_load.py` raw sockets now; older runs used httpx). "
             "Overhead = 1/server_rate - 1/raw_rate per token. CPU µs/token: per thread of the server process "
             "and of the client process, from /proc. raw and engine always run the current code in the benchmark "
             "process; `--server-root` only changes the server process. Targets: server/raw >= 0.95 at 1 stream, "
             ">= 0.90 at 64. See docs/performance.md for what the figures mean on a 2-core machine.", ""]
    for label, report in results.items():
        p, e = report["params"], report["env"]
        lines += [f"## {label}", "",
                  f"{p.get('model', 'tiny Llama')}, client {p.get('client', 'httpx (one process)')}; "
                  f"{p['prompt_tokens']}-token prompt, {p['max_tokens']} new tokens, greedy, ignore_eos, best of {p['repeats']}; "
                  f"{e.get('cpus')} CPUs, torch {e.get('torch')} ({e.get('torch_threads')} thread); {e.get('date')}, commit {e.get('commit')}.", "",
                  *([f"`{p['command']}`", ""] if p.get("command") else []),
                  "| streams | raw tok/s | engine tok/s | server tok/s | engine/raw | server/raw | server overhead µs/token "
                  "| server CPU µs/token IOLoop / engine thread | client CPU µs/token | TTFT p50 raw / engine / server (ms) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["levels"]:
            lines.append(f"| {r['streams']} | {r['raw']['aggregate_tok_s']:.0f} | {r['engine']['aggregate_tok_s']:.0f} | "
                         f"{r['server']['aggregate_tok_s']:.0f} | {r['engine_ratio']:.3f} | {r['server_ratio']:.3f} | "
                         f"{r['server_overhead_us_per_token']} | {r['server'].get('cpu_us_per_token_main')} / {r['server'].get('cpu_us_per_token_other')} | {r['server'].get('client_cpu_us_per_token')} | {r['raw']['ttft_p50_ms']} / {r['engine']['ttft_p50_ms']} / {r['server']['ttft_p50_ms']} |")
        lines.append("")
        if any("baseline" in r for r in report["levels"]):
            lines += baseline_table(report)
    return "\n".join(lines)


def baseline_table(report: dict) -> list[str]:
    """The baseline server (``--baseline-root``) beside this run's server, measured in the same rounds."""
    lines = [f"Baseline server: `{report['params'].get('baseline_root')}`, in the same rounds (best of each). "
             "CPU µs/token: all / of it in the kernel (clock ticks, coarse).", "",
             "| streams | baseline tok/s | server tok/s | server/baseline | baseline/raw | server/raw "
             "| IOLoop CPU baseline / server | engine thread CPU baseline / server | per-round server/baseline |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu(run: dict, key: str) -> str:
        return f"{run.get(f'cpu_us_per_token_{key}')} ({run.get(f'cpu_us_per_token_{key}_sys')})"

    for r in report["levels"]:
        b, s = r["baseline"], r["server"]
        rounds = " ".join(f"{x['aggregate_tok_s'] / y['aggregate_tok_s']:.3f}" for x, y in zip(r["runs"]["server"], r["runs"]["baseline"]))
        lines.append(f"| {r['streams']} | {b['aggregate_tok_s']:.0f} | {s['aggregate_tok_s']:.0f} | "
                     f"{s['aggregate_tok_s'] / b['aggregate_tok_s']:.3f} | {r['baseline_ratio']:.3f} | {r['server_ratio']:.3f} | "
                     f"{cpu(b, 'main')} / {cpu(s, 'main')} | {cpu(b, 'other')} / {cpu(s, 'other')} | {rounds} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    if args.serve:  # child mode: the server
        serve_main(args)
        return 0
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.gpu_like:
        os.environ[GPU_LIKE_ENV] = args.gpu_like
    path = tiny_model(Path(args.model_dir))
    command = "python benchmarks/stream_overhead.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = asyncio.run(measure(args, path, levels, command))
    if args.server_only:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    results[args.label] = report
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown({args.label: report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
