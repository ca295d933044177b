"""matplotlib figures for profiles and live server metrics (no pyplot: no global state).

Figures are plain ``matplotlib.figure.Figure`` objects, so they render inline in Jupyter,
save with ``savefig`` anywhere, and never open a window or touch the pyplot backend.
"""

from __future__ import annotations

import io
import math
import sys
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

FIGSIZE = (6.4, 3.6)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def register_inline_display() -> None:
    """Let IPython show a bare ``Figure`` as PNG even when no inline backend is active.

    Our figures never go through pyplot, and IPython's inline backend registers its PNG
    formatter only once pyplot is used; without this, ``result.figures["ttft"]`` would
    print as ``<Figure size ...>``. An existing formatter (``%matplotlib inline``) wins.
    """
    ipython_mod = sys.modules.get("IPython")  # only inside IPython: never import it ourselves
    shell = ipython_mod.get_ipython() if ipython_mod is not None else None
    if shell is None:
        return
    png = shell.display_formatter.formatters.get("image/png")
    if png is None:
        return
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, figure_png)


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def _groups(frame: pd.DataFrame, column: str) -> tuple[list[list[float]], list[str]]:
    """Values of ``column`` per (concurrency, prompt_tokens), NaNs dropped, with labels."""
    data, labels = [], []
    for (c, p), g in frame.groupby(["concurrency", "prompt_tokens"], sort=True):
        values = [v for v in g[column].tolist() if not (isinstance(v, float) and math.isnan(v))]
        if values:
            data.append(values)
            labels.append(f"c={c}\np={p}")
    return data, labels


def _boxes(frame: pd.DataFrame, column: str, title: str, ylabel: str, scale: float = 1.0) -> Figure:
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    data, labels = _groups(frame, column) if not frame.empty else ([], [])
    if data:
        ax.boxplot([[v * scale for v in d] for d in data], tick_labels=labels, showmeans=True)
        ax.set_xlabel("concurrency (c) / prompt tokens (p)")
    else:
        _empty(ax, "measurements")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return fig


def itl_figure(itl: pd.DataFrame) -> Figure:
    """Histogram of inter-token gaps, one step outline per concurrency."""
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    if itl.empty:
        _empty(ax, "inter-token gaps")
    else:
        ms = itl["itl_s"] * 1000
        bins = _bins(ms)
        for c, g in itl.groupby("concurrency", sort=True):
            ax.hist(g["itl_s"] * 1000, bins=bins, histtype="step", linewidth=1.5, label=f"concurrency {c}")
        ax.set_xlabel("inter-token latency (ms)")
        ax.set_ylabel("tokens")
        ax.legend()
    ax.set_title("Inter-token latency distribution")
    ax.grid(alpha=0.3)
    return fig


def _bins(values: pd.Series, n: int = 40) -> list[float]:
    lo, hi = float(values.min()), float(values.quantile(0.995))
    if not hi > lo:
        hi = lo + 1.0
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def throughput_figure(summary: pd.DataFrame) -> Figure:
    """Aggregate tokens per second against concurrency, one line per prompt length."""
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    if summary.empty:
        _empty(ax, "measurements")
    else:
        for p, g in summary.groupby("prompt_tokens", sort=True):
            g = g.sort_values("concurrency")
            ax.plot(g["concurrency"], g["agg_tok_per_s"], marker="o", label=f"{p} prompt tokens")
        ax.set_xticks(sorted(summary["concurrency"].unique()))
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("aggregate tokens / s")
        ax.legend()
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    return fig


def memory_figure(memory: pd.DataFrame, title: str = "Model memory and load over time") -> Figure:
    """Model memory (MiB) over time, with requests in flight on a second axis."""
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    if memory.empty:
        _empty(ax, "memory samples (is /metrics reachable?)")
    else:
        ax.plot(memory["t_s"], memory["memory_mib"], color="tab:blue", label="model memory")
        ax.set_ylabel("model memory (MiB)", color="tab:blue")
        ax.set_ylim(bottom=0, top=max(float(memory["memory_mib"].max()) * 1.15, 1.0))
        load = ax.twinx()
        load.step(memory["t_s"], memory["in_flight"], where="post", color="tab:orange", label="in flight")
        load.set_ylabel("requests in flight", color="tab:orange")
        load.set_ylim(bottom=0, top=max(float(memory["in_flight"].max()) + 1, 1.0))
        ax.set_xlabel("time (s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def profile_figures(frame: pd.DataFrame, summary: pd.DataFrame, itl: pd.DataFrame, memory: pd.DataFrame) -> dict[str, Figure]:
    """The five profile figures by name."""
    return {
        "ttft": _boxes(frame, "ttft_s", "Time to first token", "TTFT (ms)", scale=1000),
        "tok_per_s": _boxes(frame, "tok_per_s", "Decode speed per request", "tokens / s"),
        "itl": itl_figure(itl),
        "throughput": throughput_figure(summary),
        "memory": memory_figure(memory),
    }


def live_figure(samples: pd.DataFrame) -> Figure:
    """The live view: generation rate, load, mean TTFT and memory over time."""
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = (
        (axes[0][0], "gen_tok_per_s", "tokens / s generated", 1.0),
        (axes[0][1], "in_flight", "requests in flight", 1.0),
        (axes[1][0], "ttft_mean_s", "mean TTFT (ms)", 1000.0),
        (axes[1][1], "memory_mib", "model memory (MiB)", 1.0),
    )
    for ax, column, title, scale in panels:
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if samples.empty:
            _empty(ax, "samples yet")
            continue
        ax.plot(samples["t_s"], samples[column] * scale, marker=".")
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("time (s)")
    return fig


register_inline_display()
