"""What one compiled decode step costs with dynamo's guard checks and without them.

The transformers backend's compiled decode step (``backends/hf_compiled.py``) runs one graph
for every (rows, window) shape after its warm-up, so the guards dynamo checks before each call
(~1,000 for a Llama: every parameter, module and cache tensor the trace touched) only confirm
what cannot change, and the step skips them (``backends/compile_gate.py``). This measures, in
one process and interleaved round by round, the same decoder's step three ways:

    eager     the slot cache without torch.compile (``step(eager=True)``);
    guarded   the compiled step with its guards checked (as before);
    skipping  the compiled step as it now runs.

Default: a random-weight Llama with the 1.2B model's depth and heads (16 layers, 32 heads, 8 KV
heads) but 64 wide, on CPU with torch.compile's trace-only "eager" backend, so the step is cheap
and the per-call cost of the guards shows. With ``--device cuda`` (inductor, CUDA graphs; every
step synchronized, as serving's sampler does) it measures a GPU step. Writes
``benchmarks/results/compiled_step.{json,md}`` (``--label`` names the run; other labels are kept).

    python benchmarks/compiled_step.py
    python benchmarks/compiled_step.py --device cuda --model DIR --label h100-1b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("eager", "guarded", "skipping")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Llama checkpoint directory (default: build the narrow 16-layer one)")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "xllm-narrow-llama-16"),
                   help="where the default model is built (reused when present)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", help="torch.compile backend (default: eager on CPU, inductor on CUDA)")
    p.add_argument("--slots", type=int, default=16, help="max_batch_size: decode slots")
    p.add_argument("--slot-tokens", type=int, default=2048, help="columns per slot")
    p.add_argument("--shapes", default="2x256,4x1024,16x2048", help="rows x window, comma-separated")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    p.add_argument("--calls", type=int, default=30, help="steps per mode per round")
    p.add_argument("--label", default=platform.node() or "run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compiled_step"))
    return p.parse_args(argv)


def build_narrow_llama(out: Path) -> Path:
    """The 1.2B shape's depth and heads at width 64 (random weights, SmolLM2's tokenizer)."""
    if (out / "config.json").exists():
        return out
    from tests.models import build_tiny_llama

    return build_tiny_llama(out, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=16,
                            max_position_embeddings=8192, tie_word_embeddings=False)


def load(args: argparse.Namespace):
    """The model through the transformers backend, compiled and warmed up as the engine does."""
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.transformers import TransformersBackend

    path = Path(args.model) if args.model else build_narrow_llama(Path(args.model_dir))
    backend = args.backend or ("inductor" if args.device == "cuda" else "eager")
    options = BackendOptions(device=args.device, torch_threads=1, compile="on", compile_backend=backend,
                             max_batch_size=args.slots, cache_tokens=args.slots * args.slot_tokens)
    model = TransformersBackend().load(ModelSpec(name="bench", path=path, options=options))
    started = time.perf_counter()
    model.warm_up()
    return model, path, backend, time.perf_counter() - started


def measure(decoder, rows: int, window: int, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds per step for each mode at one shape (modes interleaved per round)."""
    import torch

    ids = torch.zeros((rows, 1), dtype=torch.long, device=decoder.cache.positions.device)
    positions = torch.full((rows,), window - 1, dtype=torch.long)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    skips = decoder.skips_guards

    def timed(mode: str) -> float:
        decoder.skips_guards = skips and mode == "skipping"
        start = time.perf_counter()
        for _ in range(args.calls):
            decoder.step(ids, positions, eager=mode == "eager")
            sync()
        return (time.perf_counter() - start) / args.calls * 1e3

    samples: dict[str, list[float]] = {m: [] for m in MODES}
    with torch.inference_mode():
        for mode in MODES:
            timed(mode)  # first use of the shape (CUDA graph recording) stays out of the figures
        for _ in range(args.rounds):
            for mode in MODES:
                samples[mode].append(timed(mode))
    decoder.skips_guards = skips
    return {m: statistics.median(v) for m, v in samples.items()}


def write(out: Path, label: str, run: dict) -> None:
    """Add this run (by label) to the JSON file and rewrite the Markdown table from all runs."""
    path = out.with_suffix(".json")
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[label] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2) + "\n")
    intro = ("One process per run; modes interleaved round by round; median ms per step. "
             "`python benchmarks/compiled_step.py` (see its docstring).")
    header = ("| run | device | backend | model | rows x window | eager ms | guarded ms | skipping ms | "
              "saved per step (ms) | skipping / guarded |")
    lines = ["# Compiled decode step: dynamo's guard checks vs skipping them", "", intro, "", header,
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        for row in r["rows"]:
            lines.append(f"| {name} | {r['device']} | {r['backend']} | {r['model']} | {row['rows']} x {row['window']} "
                         f"| {row['eager']:.3f} | {row['guarded']:.3f} | {row['skipping']:.3f} "
                         f"| {row['guarded'] - row['skipping']:.3f} | {row['skipping'] / row['guarded']:.3f} |")
    lines += ["", "Notes per run:"] + [f"- {name}: {r['note']}" for name, r in runs.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Load, warm up, measure every shape, write the results."""
    args = parse_args(argv)
    import torch

    from xllm_jupyter.backends.hf_compiled import compiled_graphs

    model, path, backend, warm_s = load(args)
    decoder = model._batch.decoder
    if not decoder.skips_guards:
        print(f"the warm-up left {compiled_graphs(decoder._fn)} graphs: steps keep their guard checks", file=sys.stderr)
        return 1
    rows = []
    for shape in args.shapes.split(","):
        n, w = (int(x) for x in shape.lower().split("x"))
        row = {"rows": n, "window": w, **measure(decoder, n, w, args)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    run = {"device": args.device, "backend": backend, "model": path.name, "rows": rows,
           "torch": torch.__version__, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "note": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.slots} slots x {args.slot_tokens} columns, warm-up {warm_s:.1f} s "
                   f"({len(decoder.widths)} row x {len(decoder.windows)} window buckets, 1 graph)"}
    write(Path(args.out), args.label, run)
    model.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
