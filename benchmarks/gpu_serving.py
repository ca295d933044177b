#!/usr/bin/env python
"""GPU serving benchmark: the raw exllama generator in-process vs our HTTP server, in one run.

For each model and backend, at 1, 16 and 64 concurrent streams (128-token prompts, 256 new
tokens, greedy, every stream runs to its length):

(raw)    the library's own dynamic generator driven in this process (exllamav3 ``Generator``
         / exllamav2 ``ExLlamaV2DynamicGenerator``): the ceiling; for ``transformers-compiled``
         (static cache + torch.compile CUDA graphs, backends/hf_compiled.py) and ``transformers``
         (eager) it is our transformers backend's model stepped directly, no engine or HTTP;
(server) our standalone HTTP server (``start_server`` over the real Engine, in a child
         process) with the same model and settings, streamed over SSE by the lean load
         generator (``sse_load.py``: raw sockets in ``--client-procs`` processes, every
         request written at one moment, like the raw side's enqueue-all), so a busy
         client's delays are not charged to the server.

Reports aggregate tok/s, TTFT p50/p99, inter-token latency p50/p99 (per token on both sides:
the server's chunks hold every token made within ``engine.stream_interval_ms``, and the
server's running count, ``continuous_usage_stats``, says how many) and the server/raw
ratio; writes ``--out`` (JSON) and a Markdown table next to it. Needs a CUDA GPU and the
exllama libraries (see benchmarks/README.md for running it on a bare GPU machine).

    python benchmarks/gpu_serving.py --make 1b --tokenizer TOKDIR --make-out /tmp/llama1b
    python benchmarks/gpu_serving.py --model fp16-1.2b=/tmp/llama1b --backends exllamav3,exllamav2
    python benchmarks/gpu_serving.py --model fp16-1.2b=/tmp/llama1b --backends transformers-compiled,exllamav3
    python benchmarks/gpu_serving.py --serve DIR --backend exllamav3   # (child mode)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line (models, backends, stream levels, the server child's --serve mode)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="NAME=DIR (repeatable)")
    p.add_argument("--backends", default="exllamav3,exllamav2",
                   help="comma-separated: exllamav3, exllamav2, transformers-compiled, transformers")
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--v2-streams", default="1", help="exllamav2 levels (unpaged without flash-attn: batch 1)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--single-repeats", type=int, default=3,
                   help="runs of the 1-stream level, pooled (its TTFT and ratio rest on one request otherwise)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", default=None,
                   help="results JSON (default: results/gpu_serving.json, --stand-in: results/gpu_serving_stand_in.json)")
    p.add_argument("--make", choices=sorted(SHAPES), help="create a random-weight Llama of this shape")
    p.add_argument("--make-out", help="where --make writes the model")
    p.add_argument("--tokenizer", help="directory with tokenizer files copied next to a made model")
    p.add_argument("--serve", help="child mode: serve this model directory over HTTP")
    p.add_argument("--backend", default="exllamav3")
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="engine.stream_interval_ms for the server (default: the config default)")
    p.add_argument("--client-procs", type=int, default=4,
                   help="load-generator processes sharing the streams (sse_load.py)")
    p.add_argument("--cache-tokens", type=int, default=65536,
                   help="transformers backends: static KV cache tokens for all slots (exllamav3 raw uses 65536)")
    p.add_argument("--device", default="cuda", help="transformers backends: torch device (cpu for a smoke run)")
    p.add_argument("--users", type=int, default=0,
                   help="the server's streams come from this many API keys, round robin (each a user with "
                        "its own prefix-cache namespace and fair-queue turn); 0 = no authentication")
    p.add_argument("--stand-in", nargs="?", const="", default=None, metavar="PROFILE",
                   help="no GPU: the exllama libraries' own generators with the forward replaced by a GPU "
                        "engine's step costs (library_stand_in.py; PROFILE as gpu_like.GpuProfile.parse, "
                        "empty = exllamav3 EXL3 1.2B on an H100); without --model, the tests' tiny Llama")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ models
def make_model(shape: str, out: str, tokenizer_dir: str) -> None:
    """A random-weight fp16 Llama of a real shape (throughput does not depend on weight values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if Path(out, "config.json").exists():
        return
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False, **SHAPES[shape])
    t = time.time()
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).half()
        # zero logits for the tokenizer's special tokens (ids 0-16 in SmolLM2's vocabulary): random
        # weights would otherwise often pick one, which decodes to no text, and the server sends no
        # chunk for an empty delta, so streamed timings would be skewed
        model.lm_head.weight.data[:17] = 0
    model.save_pretrained(out)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), out)
    print(f"made {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params in {time.time() - t:.0f}s", flush=True)


def stand_in_model() -> Path:
    """The tests' tiny Llama (``--stand-in`` reads only its config and tokenizer), built once in /tmp."""
    import tempfile

    from tests.models import build_tiny_llama

    path = Path(tempfile.gettempdir()) / "xllm-tiny-llama-stand-in"
    if not (path / "config.json").exists():
        build_tiny_llama(path)
    return path


def prompts(n: int, length: int, salt: int = 0) -> list[list[int]]:
    """``n`` distinct prompts; a different ``salt`` gives prompts that differ from these in their first token.

    Every stream and every pass (warm-ups, levels, repeats: one salt each) starts with its own
    token, so no prompt is served from the prefix cache: the exllama generators also reuse a
    partly matching first page, which made every stream of a repeated prompt prefill 1 of its
    128 tokens.
    """
    import random

    if not 0 < n <= 1000:
        raise ValueError("1 to 1000 streams")
    rng = random.Random(1 + salt)
    base = [rng.randrange(100, 40000) for _ in range(length)]
    return [[100 + salt * 1000 + i] + base[1:] for i in range(n)]


def measure_levels(level: Callable[[list[list[int]], int], tuple[list[dict], float]], levels: list[int],
                   args: argparse.Namespace) -> dict[int, dict]:
    """Warm-ups, then each level through ``level(prompts, new_tokens) -> (streams, wall)``, summarized.

    The 1-stream level runs ``--single-repeats`` times, pooled (its TTFT and ratio rest on more
    than one request); every pass gets prompts no earlier pass used (``prompts``'s salt). Raw and
    server make the same passes in the same order.
    """
    salts = itertools.count()
    level(prompts(1, args.prompt_tokens, next(salts)), 8)  # warm-up (kernels, graphs)
    level(prompts(max(levels), args.prompt_tokens, next(salts)), 8)
    out = {}
    for c in levels:
        runs = [level(prompts(c, args.prompt_tokens, next(salts)), args.new_tokens)
                for _ in range(max(1, args.single_repeats) if c == 1 else 1)]
        out[c] = summarize([s for streams, _ in runs for s in streams], sum(wall for _, wall in runs),
                           expected_tokens=args.new_tokens)
        out[c]["runs"] = len(runs)
    return out


# ----------------------------------------------------------------- statistics
def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(streams: list[dict], wall: float, expected_tokens: int | None = None) -> dict:
    """Aggregate tok/s, TTFT and inter-token latency from per-stream arrival times (seconds).

    ``times`` holds ``(arrival, tokens)``: inter-token latency is per token, as the server's
    metric and vLLM's, so an arrival of n tokens after a gap g counts n times as g / n (the
    server sends every token made within ``engine.stream_interval_ms`` as one chunk; a raw
    generator's step may give a job more than one). Tokens 0 = unknown (a server that sent
    no running count): one figure per gap, a chunk gap (``itl_is_chunk_gap``); ``tpot``
    (time per output token after the first, per stream) compares both sides either way.
    """
    tokens = sum(s["tokens"] for s in streams)
    ttft = [s["first"] - s["start"] for s in streams if s["first"] is not None]
    itl: list[float] = []
    tpot: list[float] = []
    for s in streams:
        times = s["times"]
        itl += itl_figures(times)
        if s["first"] is not None and s["tokens"] > 1 and times:
            tpot.append((times[-1][0] - s["first"]) / (s["tokens"] - 1))
    ms = lambda v: round(v * 1000, 2) if v is not None else None  # noqa: E731
    chunked = any(n == 0 for s in streams for _, n in s["times"])
    short = sum(1 for s in streams if expected_tokens is not None and s["tokens"] < expected_tokens)
    if short:  # the figures then compare unlike work: say so where the run's output is read
        print(f"WARNING: {short} of {len(streams)} streams made fewer than {expected_tokens} tokens", flush=True)
    return {
        "short_streams": short, "cached_prompt_tokens": sum(s.get("cached", 0) for s in streams),
        "streams": len(streams), "tokens": tokens, "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_p50_ms": ms(pct(ttft, 0.5)), "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "itl_p50_ms": ms(pct(itl, 0.5)), "itl_p99_ms": ms(pct(itl, 0.99)), "itl_is_chunk_gap": chunked,
        "tpot_ms": ms(statistics.mean(tpot)) if tpot else None,
    }


def itl_figures(times: list[tuple[float, int]]) -> list[float]:
    """One stream's inter-token latencies from its ``(arrival, tokens)``: n figures of g / n for an arrival of n
    tokens after a gap g (one for n = 0, unknown)."""
    out: list[float] = []
    for (a, _), (b, n) in zip(times, times[1:]):
        out += [(b - a) / (n or 1)] * (n or 1)
    return out


# ------------------------------------------------------------------- raw engines
class RawExllamaV3:
    """exllamav3's own Generator, driven directly."""

    def __init__(self, path: str, max_batch: int):
        from exllamav3 import Cache, Config, Generator, Model, Tokenizer

        cfg = Config.from_directory(path)
        self.model = Model.from_config(cfg)
        self.cache = Cache(self.model, max_num_tokens=65536)
        self.model.load(progressbar=False)
        # the same generator settings and load-time warm-up as the server's backend
        from xllm_jupyter.backends.exllama_common import ExllamaOptions
        from xllm_jupyter.backends.exllamav3 import PREFILL_SETTINGS, warm_up_kernels

        warm_up_kernels(self.model, self.cache, ExllamaOptions(max_batch_size=max_batch))

        self.gen = Generator(model=self.model, cache=self.cache, tokenizer=Tokenizer.from_config(cfg),
                             max_batch_size=max_batch, **PREFILL_SETTINGS)

    def job(self, ids: list[int], n: int, ident: int):
        """One exllamav3 Job for prompt ``ids``: ``n`` greedy tokens, no stop, tagged ``ident``."""
        import torch
        from exllamav3 import Job
        from exllamav3.generator.sampler import ArgmaxSampler

        return Job(input_ids=torch.tensor([ids]), max_new_tokens=n, sampler=ArgmaxSampler(),
                   stop_conditions=[], identifier=ident)

    def close(self) -> None:
        """Unload the model."""
        self.model.unload()


class RawExllamaV2:
    """exllamav2's own dynamic generator, driven directly (unpaged without flash-attn)."""

    def __init__(self, path: str, max_batch: int):
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        from xllm_jupyter.backends.exllamav2 import apply_rope_parameters, paged_attention_available

        cfg = ExLlamaV2Config(path)
        apply_rope_parameters(cfg, Path(path))  # as the backend: the made models are saved by transformers 5
        cfg.arch_compat_overrides()
        paged = paged_attention_available() and not cfg.no_flash_attn  # the server's backend decides the same way
        cfg.max_seq_len = 4096
        if not paged:
            cfg.no_flash_attn = True
        self.model = ExLlamaV2(cfg)
        cache = ExLlamaV2Cache(self.model, max_seq_len=65536 if paged else 4096, lazy=True)
        self.model.load_autosplit(cache)
        self.gen = ExLlamaV2DynamicGenerator(model=self.model, cache=cache, tokenizer=ExLlamaV2Tokenizer(cfg),
                                             max_batch_size=max_batch if paged else 1, max_seq_len=4096, paged=paged)

    def job(self, ids: list[int], n: int, ident: int):
        """One exllamav2 dynamic job for prompt ``ids``: ``n`` greedy tokens, no stop, tagged ``ident``."""
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        return ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=n,
                                   gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[], identifier=ident)

    def close(self) -> None:
        """Unload the model."""
        self.model.unload()


class RawStandIn:
    """The library's own generator with the forward replaced by a GPU profile's costs (``--stand-in``)."""

    def __init__(self, path: str, backend: str, args):
        import library_stand_in

        from xllm_jupyter.backends.base import BackendOptions, ModelSpec

        # the options the server's engine gives the same model (engine settings as defaults)
        spec = ModelSpec(name="bench", path=Path(path), format="safetensors", context_length=4096,
                         options=BackendOptions(max_batch_size=args.max_batch))
        self.model = library_stand_in.load(backend, spec, args.stand_in)
        self.gen = self.model.generator
        self.raw = RawExllamaV3 if backend == "exllamav3" else RawExllamaV2

    def job(self, ids: list[int], n: int, ident: int):
        """The library's own job, as the GPU run makes it."""
        return self.raw.job(self, ids, n, ident)

    def close(self) -> None:
        """Unload the stand-in model."""
        self.model.unload()


#: benchmark backend name -> (registry backend, engine.compile)
TRANSFORMERS = {"transformers-compiled": ("transformers", "on"), "transformers": ("transformers", "off")}


def transformers_options(backend: str, args) -> dict:
    """BackendOptions settings for a transformers benchmark backend (the same in raw and server mode)."""
    return {"device": args.device, "compile": TRANSFORMERS[backend][1], "max_batch_size": args.max_batch,
            "cache_tokens": args.cache_tokens}


class RawTransformers:
    """Our transformers backend's model stepped directly (add/step), shaped like the exllama generators."""

    def __init__(self, path: str, backend: str, args):
        from xllm_jupyter.backends.base import BackendOptions, ModelSpec
        from xllm_jupyter.backends.transformers import TransformersBackend

        spec = ModelSpec(name="bench", path=Path(path), format="safetensors", context_length=4096,
                         options=BackendOptions(**transformers_options(backend, args)))
        self.model = TransformersBackend().load(spec)
        self.model.warm_up()  # compiles every batch width (compile: on) on this thread, which steps it
        details = self.model.details()
        print(f"{backend}: decode {details['decode']}, attention {details.get('attention')}, "
              f"guard checks {details.get('guard_checks')}", flush=True)
        self.gen = self

    def job(self, ids: list[int], n: int, ident: int):
        """One SequenceJob for prompt ``ids``: ``n`` greedy tokens, EOS ignored, tagged ``ident``."""
        from xllm_jupyter.core.types import SamplingParams, SequenceJob

        # no stop ids: every stream runs to its length, like ignore_eos over HTTP
        return SequenceJob(ident, tuple(ids), n, SamplingParams(temperature=0.0), frozenset())

    def enqueue(self, job) -> None:
        """Queue ``job`` in the model's batch."""
        self.model.add(job)

    def num_remaining_jobs(self) -> int:
        """Jobs not yet finished (the generators' name for it)."""
        return self.model.active_jobs()

    def iterate(self) -> list[dict]:
        """One step, as the libraries' generators report it: a list of result dicts."""
        import torch

        return [{"stage": "streaming", "identifier": e.job_id, "token_ids": torch.tensor([[e.token_id]])}
                for e in self.model.step() if e.token_id is not None]

    def close(self) -> None:
        """Unload the model."""
        self.model.unload()


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for in a CPU smoke run)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def raw_level(engine, ids_list: list[list[int]], new_tokens: int) -> tuple[list[dict], float]:
    """All streams enqueued at once; iterate until every one has its tokens: (streams, wall seconds)."""
    sync()
    t0 = time.perf_counter()
    recs = {}
    for i, ids in enumerate(ids_list):
        recs[i] = {"start": t0, "first": None, "tokens": 0, "cached": 0, "times": []}
        engine.gen.enqueue(engine.job(ids, new_tokens, i))
    while engine.gen.num_remaining_jobs():
        for r in engine.gen.iterate():
            if r.get("stage") != "streaming":
                continue
            if r.get("eos"):
                recs[r["identifier"]]["cached"] = int(r.get("cached_tokens") or 0)
            toks = r.get("token_ids")
            n = int(toks.shape[-1]) if toks is not None else 0
            if not n:
                continue
            now = time.perf_counter()
            rec = recs[r["identifier"]]
            rec["tokens"] += n
            rec["times"].append((now, n))
            if rec["first"] is None:
                rec["first"] = now
    sync()
    return list(recs.values()), time.perf_counter() - t0


def run_raw(backend: str, path: str, levels: list[int], args) -> dict:
    """Drive the library's generator in-process at every level; the ceiling the server is measured against."""
    import torch

    if backend in TRANSFORMERS:
        engine = RawTransformers(path, backend, args)
    elif args.stand_in is not None:
        engine = RawStandIn(path, backend, args)
    else:
        engine = (RawExllamaV3 if backend == "exllamav3" else RawExllamaV2)(path, args.max_batch)
    out = measure_levels(lambda ids, n: raw_level(engine, ids, n), levels, args)
    engine.close()
    engine = None  # the last reference (the lambda's cell too), so empty_cache can give the memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------- server
def serve_main(args) -> None:
    """Child mode: our real HTTP server over one model directory; prints its URL."""
    from xllm_jupyter.backends.base import ModelSpec
    from xllm_jupyter.core.config import EngineConfig, ServerConfig, XllmConfig
    from xllm_jupyter.core.errors import ModelNotFound
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.server.standalone import start_server
    from xllm_jupyter.store.manifest import detect_format

    path = Path(args.serve)
    backend, options = args.backend, {}
    if backend in TRANSFORMERS:
        backend, options = TRANSFORMERS[backend][0], transformers_options(backend, args)
    elif args.stand_in is not None:
        import library_stand_in

        library_stand_in.register(args.stand_in)
        backend = library_stand_in.STAND_IN_OF[backend]
    spec = ModelSpec(name="bench", path=path, format=detect_format(path), backend=backend, context_length=4096,
                     overrides=options)  # over the engine's settings, as a model's own would be

    class OneModel:
        def resolve(self, name: str) -> ModelSpec:
            if name != "bench":
                raise ModelNotFound(name)
            return spec

        def names(self) -> list[str]:
            return ["bench"]

    interval = {} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}
    config = XllmConfig(server=ServerConfig(host="127.0.0.1", port=0, max_tokens_limit=8192,
                                            api_keys=user_keys(args.users)),
                        engine=EngineConfig(default_model="bench", max_batch_size=args.max_batch, max_queue=4096,
                                            keep_alive="-1", **interval))

    async def main() -> None:
        engine = Engine(config.engine, catalog=OneModel())
        await engine.start()
        await engine.load("bench")
        server = await start_server(config, engine, port=0)
        print(json.dumps({"url": server.url}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def user_keys(users: int) -> tuple[str, ...]:
    """The API keys of ``--users`` benchmark users (the server and the client make the same ones)."""
    return tuple(f"xllm-bench-user-{i:03d}" for i in range(users))


def http_level(url: str, ids_list: list[list[int]], new_tokens: int, procs: int,
               users: int = 0) -> tuple[list[dict], float]:
    """Concurrent SSE completions (prompt as token ids, greedy, ignore_eos) against the server.

    Sent by the lean load generator (``sse_load.py``: raw sockets, every request written at
    one moment, ``procs`` processes) so the client never holds the server back; stream i as
    user i mod ``users`` when there are users.
    """
    import sse_load

    # continuous_usage_stats: every chunk carries the running token count, so each arrival's tokens are known
    body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    keys = user_keys(users)
    recs, _ = sse_load.run_level(url, "/v1/completions", [{**body, "prompt": ids} for ids in ids_list], procs,
                                 api_key=[keys[i % users] for i in range(len(ids_list))] if users else None)
    for rec in recs:
        rec["times"] = arrivals(rec["times"], rec["made"])
    return recs, sse_load.span(recs)


def arrivals(reads: list[tuple[float, int]], made: list[int | None]) -> list[tuple[float, int]]:
    """``(time, new tokens)`` per socket read from the server's running counts (``summarize``'s ``times``).

    A read whose count did not grow (text held back and let out later) is no token's arrival: its
    time goes to the next read that brings tokens. Without counts every read is one arrival of
    unknown size (0: a chunk gap).
    """
    if len(made) != len(reads) or None in made:
        return [(t, 0) for t, _ in reads]
    out: list[tuple[float, int]] = []
    seen = 0
    for (t, _), count in zip(reads, made):
        if count > seen:
            out.append((t, count - seen))
            seen = count
    return out


def server_url(stdout) -> str:
    """The URL the child prints, skipping what the libraries print to stdout first (exllamav2's warnings)."""
    for line in stdout:
        if line.startswith('{"url"'):
            return json.loads(line)["url"]
        print(f"server: {line.rstrip()}", flush=True)
    raise RuntimeError("the benchmark server did not start")


def run_server(backend: str, path: str, levels: list[int], args) -> dict:
    """Start our server on the same model in a child process and load it with sse_load at every level."""
    cmd = [sys.executable, __file__, "--serve", path, "--backend", backend, "--max-batch", str(args.max_batch),
           "--cache-tokens", str(args.cache_tokens), "--device", args.device]
    if args.stream_interval_ms is not None:
        cmd += ["--stream-interval-ms", str(args.stream_interval_ms)]
    if args.stand_in is not None:
        cmd += [f"--stand-in={args.stand_in}"]
    if args.users:
        cmd += ["--users", str(args.users)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = server_url(proc.stdout)
        # what the libraries print later is passed on, so a full pipe never blocks the server
        threading.Thread(target=lambda: [print(f"server: {line.rstrip()}", flush=True) for line in proc.stdout],
                         daemon=True).start()
        return measure_levels(lambda ids, n: http_level(url, ids, n, args.client_procs if len(ids) > 1 else 1,
                                                        args.users), levels, args)
    finally:
        proc.terminate()
        proc.wait(60)


# ----------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The results table of ``report`` as Markdown."""
    p = report["params"]
    lines = [
        f"# GPU serving benchmark ({report['device']})", "",
        f"{p['prompt_tokens']}-token prompts, {p['new_tokens']} new tokens, greedy, every stream to its length; "
        f"raw = the library's generator in-process, server = our HTTP server (SSE), one run, {report['date']}.", "",
    ]
    if p.get("stand_in"):
        lines += [
            "No GPU: exllamav3's / exllamav2's own generators and our backends ran as shipped, the model's forward "
            "replaced by a GPU engine's step costs (benchmarks/library_stand_in.py): per step "
            f"{p['stand_in']['launches']} launches of {p['stand_in']['launch_us']} µs of Python (the GIL held), then a "
            f"GIL-free wait of {p['stand_in']['base_us']} µs + {p['stand_in']['per_seq_us']} µs per sequence "
            f"(+{p['stand_in']['prefill_us']} µs per prompt token).", "",
        ]
    lines += [
        f"ITL is per token on both sides: the server sends every token made within engine.stream_interval_ms = "
        f"{p.get('stream_interval_ms')} ms as one chunk, and a chunk of n tokens (the server's running count, "
        "continuous_usage_stats) after a gap g counts n times as g / n; TPOT = time per output token after the "
        "first, both sides.", "",
        "| model | backend | users | streams | raw tok/s | server tok/s | server/raw | TTFT p50 raw / server (ms) | TTFT p99 raw / server (ms) | ITL p50 raw / server (ms) | ITL p99 raw / server (ms) | TPOT raw / server (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        r, s = row["raw"], row["server"]
        gap = " (chunk gap)" if s.get("itl_is_chunk_gap") else ""  # a row measured before the server's counts were read
        lines.append(f"| {row['model']} | {row['backend']} | {row.get('users', 0) or '-'} | {row['streams']} | {r['tok_s']} | {s['tok_s']} | "
                     f"{row['ratio']} | {r['ttft_p50_ms']} / {s['ttft_p50_ms']} | {r['ttft_p99_ms']} / {s['ttft_p99_ms']} | "
                     f"{r['itl_p50_ms']} / {s['itl_p50_ms']}{gap} | {r['itl_p99_ms']} / {s['itl_p99_ms']}{gap} | "
                     f"{r.get('tpot_ms')} / {s.get('tpot_ms')} |")
    # an --out that held earlier results keeps their rows: say where they come from
    earlier = sorted({(row["model"], row["backend"], row.get("device") or "device not recorded", row.get("date") or "?")
                      for row in report["rows"] if row.get("device") != report["device"]})
    if earlier:
        lines += ["", "Rows from earlier runs elsewhere: " + "; ".join(f"{m} / {b} ({d}, {t})" for m, b, d, t in earlier)
                  + "."]
    singles = {row["raw"].get("runs") for row in report["rows"] if row["streams"] == 1} - {None}
    if singles:
        lines += ["", f"1-stream rows: {', '.join(map(str, sorted(singles)))} runs each side, pooled; every pass "
                      "with prompts no earlier pass used (no prefix-cache hits)."]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    """Write ``report`` to ``out`` (json) and its table beside it (md), each written aside and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed: a session copies these files while a benchmark may be saving
    for path, text in ((out, json.dumps(report, indent=2)), (out.with_suffix(".md"), markdown(report))):
        part = path.with_name(path.name + ".part")
        part.write_text(text)
        part.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --serve, be its server child; with --make, write a random-weight model)."""
    args = parse_args(argv)
    if args.serve:
        serve_main(args)
        return 0
    if args.make:
        make_model(args.make, args.make_out, args.tokenizer)
        return 0
    import torch

    from xllm_jupyter.core.config import EngineConfig

    out = Path(args.out or RESULTS / ("gpu_serving_stand_in.json" if args.stand_in is not None else "gpu_serving.json"))
    report = json.loads(out.read_text()) if out.exists() else {"rows": []}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke run)"
    params = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "greedy": True,
              "stream_interval_ms": args.stream_interval_ms if args.stream_interval_ms is not None
              else EngineConfig().stream_interval_ms}
    if args.stand_in is not None:
        import gpu_like

        profile = gpu_like.GpuProfile.parse(args.stand_in)
        device = f"{os.cpu_count()} CPUs, no GPU: the libraries' generators with a stand-in forward"
        params["stand_in"] = dataclasses.asdict(profile)
        if not args.model:
            args.model = [f"tiny-llama={stand_in_model()}"]
    report.update(device=device, date=datetime.now(timezone.utc).isoformat(timespec="seconds"), params=params)
    failed = []
    for item in args.model:
        name, path = item.split("=", 1)
        for backend in args.backends.split(","):
            spec = args.v2_streams if backend == "exllamav2" else args.streams
            levels = [int(x) for x in spec.split(",")]
            t = time.time()
            try:  # one model or backend failing (a lease's missing EXL3 conversion, say) must not cost the others
                raw = run_raw(backend, path, levels, args)
                for c in levels:  # in the log now: a call cut short during the server half keeps the raw figures
                    print(f"{name} {backend} x{c} raw: {raw[c]['tok_s']} tok/s, TTFT p50 {raw[c]['ttft_p50_ms']} ms", flush=True)
                server = run_server(backend, path, levels, args)
            except Exception:  # noqa: BLE001 - reported, then the next model/backend runs
                traceback.print_exc()
                print(f"{name} {backend}: FAILED after {time.time() - t:.0f}s", flush=True)
                failed.append(f"{name}/{backend}")
            if name + "/" + backend in failed:  # (outside the except: its traceback no longer holds the engine)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            report["rows"] = [r for r in report["rows"]
                              if (r["model"], r["backend"], r.get("users", 0)) != (name, backend, args.users)]
            for c in levels:
                ratio = round(server[c]["tok_s"] / raw[c]["tok_s"], 3) if raw[c]["tok_s"] else None
                report["rows"].append({"model": name, "backend": backend, "users": args.users, "streams": c, "raw": raw[c],
                                       "server": server[c], "ratio": ratio, "device": device, "date": report["date"]})
                print(f"{name} {backend} x{c}{f' ({args.users} users)' if args.users else ''}: raw {raw[c]['tok_s']} tok/s, server {server[c]['tok_s']} tok/s, "
                      f"ratio {ratio}, TTFT p50 {raw[c]['ttft_p50_ms']} / {server[c]['ttft_p50_ms']} ms", flush=True)
            print(f"{name} {backend}: {time.time() - t:.0f}s", flush=True)
            save(report, out)
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
