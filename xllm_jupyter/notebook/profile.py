"""``xllm_jupyter.profile``: sweep concurrency and prompt length against a server, measure each stream.

Every request is streamed and timed on the client (``streams.measure_stream``); N
requests of a sweep point run at once on one asyncio loop, so the server batches them
as it would for N notebooks. ``/metrics`` is sampled meanwhile for memory and load.
"""

from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..client import AsyncXllmClient
from ..core.errors import InvalidRequest
from .clients import ClientLike, async_client, pick_model, sync_client
from .loop import run_sync
from .metrics import MetricsRecorder
from .plots import figure_png, profile_figures
from .streams import StreamRecord, measure_stream

MAX_CONCURRENCY = 512
_WORDS = (
    "river", "stone", "garden", "window", "paper", "music", "light", "forest", "morning", "table",
    "story", "cloud", "bridge", "market", "winter", "candle", "letter", "mountain", "harbor",
    "field", "orange", "silver", "thunder", "meadow", "lantern", "village", "ocean", "pencil",
    "summer", "valley",
)

BatchCallback = Callable[[list[dict[str, Any]], int, int], None]


@dataclass
class ProfileResult:
    """Measurements of one profile run: tables, figures, and exports."""

    model: str
    frame: pd.DataFrame  # one row per request
    summary: pd.DataFrame  # one row per (concurrency, prompt_tokens)
    memory: pd.DataFrame  # /metrics samples over time
    itl: pd.DataFrame  # one row per inter-token gap
    figures: dict[str, Figure] = field(default_factory=dict)
    metrics_error: str | None = None  # why memory is empty, if it is

    def to_csv(self, path: str | Path, table: str = "requests") -> Path:
        """Write one table (``requests``, ``summary``, ``memory`` or ``itl``) as CSV; returns the path."""
        tables = {"requests": self.frame, "summary": self.summary, "memory": self.memory, "itl": self.itl}
        if table not in tables:
            raise InvalidRequest(f"table must be one of {sorted(tables)}", param="table")
        path = Path(path)
        tables[table].to_csv(path, index=False)
        return path

    def save_figures(self, directory: str | Path, dpi: int = 100) -> list[Path]:
        """Save every figure as ``<directory>/<name>.png``; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, fig in self.figures.items():
            path = directory / f"{name}.png"
            path.write_bytes(figure_png(fig, dpi))
            out.append(path)
        return out

    def _repr_html_(self) -> str:
        import base64

        cols = ["concurrency", "prompt_tokens", "requests", "errors", "agg_tok_per_s", "tok_per_s_mean", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"]
        table = self.summary[[c for c in cols if c in self.summary]].to_html(index=False, float_format=lambda v: f"{v:.4g}")
        images = "".join(
            f'<img alt="{html.escape(name)}" style="max-width:49%;display:inline-block" src="data:image/png;base64,{base64.b64encode(figure_png(fig, 80)).decode()}"/>'
            for name, fig in self.figures.items()
        )
        note = f"<p><em>No memory samples: {html.escape(self.metrics_error)}</em></p>" if self.metrics_error and self.memory.empty else ""
        failed = self.frame["error"].dropna() if "error" in self.frame else pd.Series(dtype=object)
        if len(failed):  # its numbers leave those requests out: say how many, and why the first failed
            note += f"<p><em>{len(failed)} of {len(self.frame)} requests failed: {html.escape(str(failed.iloc[0]))}</em></p>"
        return f"<div><h4>Profile of {html.escape(self.model)}</h4>{table}{note}<div>{images}</div></div>"


def _positive_ints(value: int | Iterable[int], name: str, limit: int | None = None) -> tuple[int, ...]:
    """``value`` (one int or several) as a tuple of positive ints, or a clear error."""
    items = (value,) if isinstance(value, int) else value
    try:
        out = tuple(items)
    except TypeError:
        raise InvalidRequest(f"{name} must be a positive integer or a sequence of them", param=name) from None
    if not out or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in out):
        raise InvalidRequest(f"{name} must be a positive integer or a non-empty sequence of them", param=name)
    if limit is not None and max(out) > limit:
        raise InvalidRequest(f"{name} may be at most {limit}", param=name)
    return tuple(int(v) for v in out)


def filler(words: int, tag: str) -> str:
    """A prompt of about ``words`` words; ``tag`` first keeps prompts apart (no shared prefix cache)."""
    body = " ".join(_WORDS[i % len(_WORDS)] for i in range(max(words, 1)))
    return f"[{tag}] Continue this list: {body}"


def _pct(values: list[float] | pd.Series, q: float) -> float:
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(np.percentile(arr, q)) if arr.size else math.nan


async def _calibrate(client: AsyncXllmClient, model: str) -> tuple[float, float]:
    """(overhead, tokens per filler word) of this model's tokenizer and chat template.

    Two one-token requests; they also load the model and warm it up, so the first
    measured request does not pay for that.
    """
    counts = []
    for words in (8, 72):
        rec = await measure_stream(client, [{"role": "user", "content": filler(words, f"warmup-{words}")}], model, {"max_tokens": 1})
        if rec.error is not None:
            raise rec.error
        counts.append(rec.prompt_tokens)
    if None in counts or counts[1] <= counts[0]:
        return 0.0, 1.0
    per_word = (counts[1] - counts[0]) / 64
    return counts[0] - 8 * per_word, per_word


def _row(rec: StreamRecord, c: int, p: int, repeat: int, index: int, t0: float) -> dict[str, Any]:
    gaps = rec.itl_s
    return {
        "model": rec.model,
        "concurrency": c,
        "prompt_tokens": p,
        "repeat": repeat,
        "request": index,
        "prompt_tokens_actual": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "ttft_s": rec.ttft_s,
        "latency_s": rec.latency_s,
        "tok_per_s": rec.tok_per_s,
        "itl_p50_s": _pct(gaps, 50),
        "itl_p99_s": _pct(gaps, 99),
        "itl_mean_s": float(np.mean(gaps)) if gaps else math.nan,
        "start_s": rec.started - t0,
        "end_s": rec.ended - t0,
        "finish_reason": rec.finish_reason,
        "error": str(rec.error) if rec.error is not None else None,
    }


def summarize(frame: pd.DataFrame, itl: pd.DataFrame) -> pd.DataFrame:
    """One row per (concurrency, prompt_tokens): aggregate throughput and latency percentiles."""
    rows = []
    for (c, p), g in frame.groupby(["concurrency", "prompt_tokens"], sort=True):
        ok = g[g["error"].isna()]
        # aggregate: all tokens of a sweep point over the wall time its batches took
        spans = ok.groupby("repeat").agg(start=("start_s", "min"), end=("end_s", "max"))
        wall = float((spans["end"] - spans["start"]).sum()) if len(spans) else math.nan
        gaps = itl[(itl["concurrency"] == c) & (itl["prompt_tokens"] == p)]["itl_s"]
        rows.append(
            {
                "concurrency": c,
                "prompt_tokens": p,
                "requests": len(g),
                "errors": int(g["error"].notna().sum()),
                "completion_tokens": int(ok["completion_tokens"].sum()),
                "wall_s": wall,
                "agg_tok_per_s": ok["completion_tokens"].sum() / wall if wall > 0 else math.nan,
                "tok_per_s_mean": float(ok["tok_per_s"].mean()) if len(ok) else math.nan,
                "ttft_p50_s": _pct(ok["ttft_s"], 50),
                "ttft_p99_s": _pct(ok["ttft_s"], 99),
                "itl_p50_s": _pct(gaps, 50),
                "itl_p99_s": _pct(gaps, 99),
                "latency_p50_s": _pct(ok["latency_s"], 50),
            }
        )
    return pd.DataFrame(rows)


async def profile_async(
    client: ClientLike,
    model: str,
    *,
    concurrency: tuple[int, ...],
    prompt_tokens: tuple[int, ...],
    max_tokens: int,
    repeats: int,
    ignore_eos: bool = True,
    sample_interval: float = 0.2,
    on_batch: BatchCallback | None = None,
) -> ProfileResult:
    """The sweep itself, on the caller's loop (``profile`` runs it on a private one)."""
    ac = async_client(client, max_connections=max(concurrency) + 4)
    recorder: MetricsRecorder | None = None
    sampler: asyncio.Task | None = None
    try:
        overhead, per_word = await _calibrate(ac, model)
        t0_wall, t0 = time.time(), time.perf_counter()
        recorder = MetricsRecorder(ac, sample_interval, t0=t0_wall)
        sampler = asyncio.create_task(recorder.run())
        rows: list[dict[str, Any]] = []
        gaps: list[dict[str, Any]] = []
        params: dict[str, Any] = {"max_tokens": max_tokens}
        if ignore_eos:
            params["ignore_eos"] = True  # every request generates max_tokens: comparable numbers
        total, done = len(concurrency) * len(prompt_tokens) * repeats, 0
        for p in prompt_tokens:
            words = max(1, round((p - overhead) / per_word))
            for c in concurrency:
                for r in range(repeats):
                    batch = [[{"role": "user", "content": filler(words, f"p{p}-c{c}-r{r}-i{i}")}] for i in range(c)]
                    recs = await asyncio.gather(*(measure_stream(ac, m, model, params, token_counts=True) for m in batch))
                    new = [_row(rec, c, p, r, i, t0) for i, rec in enumerate(recs)]
                    rows += new
                    gaps += [{"concurrency": c, "prompt_tokens": p, "request": i, "itl_s": g} for i, rec in enumerate(recs) for g in rec.itl_s]
                    done += 1
                    if on_batch is not None:
                        on_batch(new, done, total)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await recorder.scrape()  # one sample after the last request, so even short runs have two
    finally:
        if sampler is not None and not sampler.done():
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        await ac.aclose()
    frame = pd.DataFrame(rows)
    itl = pd.DataFrame(gaps, columns=["concurrency", "prompt_tokens", "request", "itl_s"])
    summary = summarize(frame, itl)
    memory = pd.DataFrame(recorder.rows)
    return ProfileResult(model, frame, summary, memory, itl, profile_figures(frame, summary, itl, memory), recorder.error)


def profile(
    model: str | None = None,
    *,
    concurrency: int | Iterable[int] = (1, 2, 4),
    prompt_tokens: int | Iterable[int] = (32, 128),
    max_tokens: int = 32,
    repeats: int = 1,
    client: ClientLike = None,
    ignore_eos: bool = True,
    sample_interval: float = 0.2,
    on_batch: BatchCallback | None = None,
) -> ProfileResult:
    """Measure ``model`` on the server at each concurrency and prompt length.

    For every (prompt length, concurrency) point, ``repeats`` batches of ``concurrency``
    simultaneous streamed requests run, each asking for ``max_tokens`` tokens (EOS is
    ignored unless ``ignore_eos=False``, so every request generates the same amount).
    Returns a ``ProfileResult`` with per-request and summary tables, ``/metrics`` samples
    and figures. ``on_batch(rows, done, total)`` is called after every batch.
    """
    conc = _positive_ints(concurrency, "concurrency", MAX_CONCURRENCY)
    lengths = _positive_ints(prompt_tokens, "prompt_tokens")
    (max_tok,) = _positive_ints(max_tokens, "max_tokens")
    (reps,) = _positive_ints(repeats, "repeats")
    c, owned = sync_client(client)
    try:
        name = pick_model(model, c)
        endpoint = (c.base_url, c.api_key)
    finally:
        if owned:
            c.close()
    return run_sync(
        profile_async(
            endpoint,
            name,
            concurrency=conc,
            prompt_tokens=lengths,
            max_tokens=max_tok,
            repeats=reps,
            ignore_eos=ignore_eos,
            sample_interval=sample_interval,
            on_batch=on_batch,
        )
    )
