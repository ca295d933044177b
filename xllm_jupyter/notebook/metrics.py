"""Samples of a server's ``/metrics`` over time: memory, load, and rates between samples.

``profile`` records them while it runs (the memory-over-time plot) and the
ProfileWidget's live view polls them. Only the text exposition is needed, so this works
against any xllm server a client can reach, in Jupyter or standalone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..client import AsyncXllmClient
from ..core.errors import XllmError

#: the metrics families a sample keeps, by sample name (summed over labels unless noted)
_TOTALS = {
    "xllm_requests_in_flight": "in_flight",
    "xllm_requests_queued": "queued",
    "xllm_generation_tokens_total": "generation_tokens",
    "xllm_prompt_tokens_total": "prompt_tokens",
    "xllm_time_to_first_token_seconds_sum": "ttft_sum",
    "xllm_time_to_first_token_seconds_count": "ttft_count",
    "xllm_inter_token_latency_seconds_sum": "itl_sum",
    "xllm_inter_token_latency_seconds_count": "itl_count",
}


@dataclass
class MetricsSample:
    """One scrape: wall-clock time, model memory, load and counter totals."""

    time: float
    memory_bytes: float = 0.0
    models: dict[str, float] = field(default_factory=dict)  # memory per loaded model
    in_flight: float = 0.0
    queued: float = 0.0
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0


def parse_metrics(text: str, at: float | None = None) -> MetricsSample:
    """A ``MetricsSample`` from the Prometheus text exposition ``text``."""
    sample = MetricsSample(time=time.time() if at is None else at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "xllm_model_memory_bytes":
                model = s.labels.get("model", "?")
                sample.models[model] = sample.models.get(model, 0.0) + s.value
                sample.memory_bytes += s.value
            elif s.name in _TOTALS:
                attr = _TOTALS[s.name]
                setattr(sample, attr, getattr(sample, attr) + s.value)
    return sample


def _mean(total: float, count: float) -> float:
    return total / count if count > 0 else float("nan")


def sample_row(cur: MetricsSample, prev: MetricsSample | None, t0: float) -> dict[str, Any]:
    """One table row for ``cur``: levels, plus rates and means since ``prev``."""
    row: dict[str, Any] = {
        "t_s": cur.time - t0,
        "memory_bytes": cur.memory_bytes,
        "memory_mib": cur.memory_bytes / 2**20,
        "models": len(cur.models),
        # the gauge counts every HTTP request being handled, this scrape included
        "in_flight": max(cur.in_flight - 1, 0.0),
        "queued": cur.queued,
        "generation_tokens": cur.generation_tokens,
        "gen_tok_per_s": float("nan"),
        "ttft_mean_s": float("nan"),
        "itl_mean_s": float("nan"),
    }
    if prev is not None and cur.time > prev.time:
        dt = cur.time - prev.time
        # counters only grow; a restarted server makes them drop, so clamp at zero
        row["gen_tok_per_s"] = max(cur.generation_tokens - prev.generation_tokens, 0.0) / dt
        row["ttft_mean_s"] = _mean(cur.ttft_sum - prev.ttft_sum, cur.ttft_count - prev.ttft_count)
        row["itl_mean_s"] = _mean(cur.itl_sum - prev.itl_sum, cur.itl_count - prev.itl_count)
    return row


class MetricsRecorder:
    """Scrapes ``/metrics`` every ``interval`` seconds into rows until stopped."""

    def __init__(self, client: AsyncXllmClient, interval: float = 0.25, t0: float | None = None):
        self.client = client
        self.interval = max(float(interval), 0.05)
        self.t0 = time.time() if t0 is None else t0
        self.rows: list[dict[str, Any]] = []
        self.error: str | None = None
        self._prev: MetricsSample | None = None

    async def scrape(self) -> dict[str, Any] | None:
        """Take one sample now; None (and ``.error`` set) when the server would not give one."""
        try:
            sample = parse_metrics(await self.client.metrics_text())
        except XllmError as exc:
            self.error = str(exc)
            return None
        except ValueError:  # not a Prometheus exposition
            self.error = "the server's /metrics did not parse"
            return None
        row = sample_row(sample, self._prev, self.t0)
        self._prev = sample
        self.rows.append(row)
        return row

    async def run(self) -> None:
        """Sample until cancelled (the first failure stops it: metrics are optional)."""
        while True:
            if await self.scrape() is None:
                return
            await asyncio.sleep(self.interval)
