"""``xllm_jupyter.compare``: one prompt to N models, or to one model with N sampler settings, at once.

The columns stream concurrently (the server batches them), each timed on the client
like ``profile`` does; the result shows them side by side with a diff.
"""

from __future__ import annotations

import asyncio
import functools
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..core.errors import InvalidRequest, XllmError
from .clients import ClientLike, async_client, pick_model, sync_client
from .diffing import diff_html, diff_text
from .loop import run_sync
from .streams import (
    Messages,
    StreamRecord,
    build_messages,
    check_params,
    measure_stream,
)

MAX_COLUMNS = 16


@dataclass(frozen=True)
class Column:
    """One side of a comparison: a label, a model and its request parameters."""

    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)


def _label(params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k != "max_tokens"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def plan_columns(
    models: str | Sequence[str] | None,
    settings: Sequence[Mapping[str, Any]] | None,
    max_tokens: int,
    default_model: Callable[[], str],
) -> list[Column]:
    """The columns for ``models`` or ``settings`` (each setting may name its own ``model``)."""
    if isinstance(models, str):
        models = [models]
    if models is not None:
        models = list(models)
        if not models or not all(isinstance(m, str) and m.strip() for m in models):
            raise InvalidRequest("models must be a model name or a non-empty list of names", param="models")
    if settings is None:
        if models is None:
            raise InvalidRequest("compare needs models=[...] or settings=[{...}, ...]", param="models")
        cols = [Column(m, m, {"max_tokens": max_tokens}) for m in models]
    else:
        if isinstance(settings, Mapping) or not isinstance(settings, Sequence) or not settings or not all(isinstance(s, Mapping) for s in settings):
            raise InvalidRequest("settings must be a non-empty list of parameter dicts", param="settings")
        if models is not None and len(models) != 1:
            raise InvalidRequest("with settings=, give one model (or put 'model' in each setting)", param="models")
        base = models[0] if models else None
        planned = []
        for s in settings:
            params = {"max_tokens": max_tokens, **s}
            planned.append((params.pop("model", None) or base or default_model(), params))
        mixed = len({m for m, _ in planned}) > 1  # name the model in labels only when it varies
        cols = [Column(f"{m}: {_label(p)}" if mixed else _label(p), m, p) for m, p in planned]
    for c in cols:
        check_params(c.params)
    if len(cols) > MAX_COLUMNS:
        raise InvalidRequest(f"compare takes at most {MAX_COLUMNS} columns", param="models")
    # the same label twice (a model listed twice) gets a number so columns stay addressable
    seen: dict[str, int] = {}
    out = []
    for c in cols:
        seen[c.label] = seen.get(c.label, 0) + 1
        out.append(c if seen[c.label] == 1 else Column(f"{c.label} #{seen[c.label]}", c.model, c.params))
    return out


@dataclass
class CompareResult:
    """Side-by-side replies with their timings; ``diff`` shows how two of them differ."""

    prompt: Messages
    columns: list[Column]
    records: list[StreamRecord]

    @property
    def texts(self) -> list[str]:
        """Every column's reply, in column order."""
        return [r.text for r in self.records]

    @property
    def labels(self) -> list[str]:
        """Every column's label."""
        return [c.label for c in self.columns]

    @property
    def frame(self) -> pd.DataFrame:
        """One row per column: label, model, params, timings, token counts, text, error."""
        return pd.DataFrame(
            [
                {
                    "label": c.label,
                    "model": c.model,
                    "params": dict(c.params),
                    "latency_s": r.latency_s,
                    "ttft_s": r.ttft_s,
                    "tok_per_s": r.tok_per_s,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "finish_reason": r.finish_reason,
                    "text": r.text,
                    "error": str(r.error) if r.error is not None else None,
                }
                for c, r in zip(self.columns, self.records)
            ]
        )

    def _index(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self.labels:
                raise InvalidRequest(f"no column labelled {key!r}; labels: {self.labels}", param="a")
            return self.labels.index(key)
        if not isinstance(key, int) or not -len(self.columns) <= key < len(self.columns):
            raise InvalidRequest(f"column index out of range (0..{len(self.columns) - 1})", param="a")
        return key % len(self.columns)

    def diff(self, a: int | str = 0, b: int | str = 1, mode: str = "word") -> str:
        """How column ``b``'s text differs from column ``a``'s (index or label); ``mode`` "word" or "unified"."""
        i, j = self._index(a), self._index(b)
        return diff_text(self.texts[i], self.texts[j], mode, self.labels[i], self.labels[j])

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(c.label)}</th>" for c in self.columns)

        def row(name: str, cells: list[str]) -> str:
            return f"<tr><th style='text-align:left'>{esc(name)}</th>{''.join(cells)}</tr>"

        def num(v: Any, unit: str = "") -> str:
            return f"<td>{v:.3g}{unit}</td>" if isinstance(v, (int, float)) and not math.isnan(v) else "<td>–</td>"

        rs = self.records
        rows = [
            row("model", [f"<td>{esc(c.model)}</td>" for c in self.columns]),
            row("latency", [num(r.latency_s, " s") for r in rs]),
            row("TTFT", [num(r.ttft_s, " s") for r in rs]),
            row("tok/s", [num(r.tok_per_s) for r in rs]),
            row("tokens", [f"<td>{r.completion_tokens}</td>" for r in rs]),
            row(
                "text",
                [
                    f"<td style='white-space:pre-wrap;vertical-align:top;text-align:left'>{esc(r.text)}{'' if r.error is None else ('<br>' if r.text else '') + '<b>error:</b> ' + esc(str(r.error))}</td>"
                    for r in rs
                ],
            ),
        ]
        out = f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if len(rs) >= 2:
            out += f"<h5>Diff: {esc(self.labels[0])} → {esc(self.labels[1])}</h5>{diff_html(self.texts[0], self.texts[1])}"
        return f"<div>{out}</div>"


async def _warm_up(client: Any, models: list[str]) -> dict[str, XllmError]:
    """One one-token request per model first, so no column's TTFT and latency include loading its model.

    (A cold model otherwise doubled the first compare's timings, and made a loaded model look faster
    than an unloaded one.) Any key may send it, unlike ``/admin/models/load``. Returns, by model, the
    errors its columns would only repeat (a failed load, no such model, not a chat model): those columns
    are not sent, as a failed load takes about as long as a good one; a busy server's errors are left
    for the column's own request.
    """
    hello = [{"role": "user", "content": "Hi"}]
    unique = list(dict.fromkeys(models))
    records = await asyncio.gather(*(measure_stream(client, hello, m, {"max_tokens": 1}) for m in unique))
    return {m: r.error for m, r in zip(unique, records) if r.error is not None and _repeats(r.error)}


#: what an error's ``code`` says about the model itself, whatever a request asks: its columns would get it too
_MODEL_FAILURES = frozenset({"model_load_failed", "model_not_found", "model_not_supported"})


def _repeats(error: XllmError) -> bool:
    """True for an error the model's columns would get again (its load failed, no such model, not a chat model, a
    key the server refuses); not one about the warm-up's own request, a rate limit or a busy server."""
    return error.code in _MODEL_FAILURES or error.status == 401


async def compare_async(
    client: ClientLike,
    messages: Messages,
    columns: list[Column],
    on_piece: Callable[[int, str], None] | None = None,
    records: list[StreamRecord] | None = None,
    on_thinking: Callable[[int, str], None] | None = None,
) -> list[StreamRecord]:
    """Stream every column at once; ``on_piece(column, text)`` sees each piece as it arrives, ``on_thinking(column,
    text)`` each piece of a reasoning model's thinking (never in the records' text).

    Pass ``records`` (one empty ``StreamRecord`` per column) to keep partial results
    when the task is cancelled.
    """
    if records is None:
        records = [StreamRecord(model=c.model, params=c.params) for c in columns]
    ac = async_client(client, max_connections=len(columns) + 2)

    def piece_handler(i: int) -> Callable[[str], None] | None:
        return None if on_piece is None else (lambda text: on_piece(i, text))

    def thinking_handler(i: int) -> Callable[[str], None] | None:
        return None if on_thinking is None else (lambda text: on_thinking(i, text))

    try:
        try:
            failed = await _warm_up(ac, [c.model for c in columns])
        except BaseException:  # stopped before any column started: say so, not an empty answer
            for record in records:
                record.cancelled = True
            raise
        for i, c in enumerate(columns):
            records[i].error = failed.get(c.model, records[i].error)
        await asyncio.gather(*(measure_stream(ac, messages, c.model, c.params, piece_handler(i), records[i],
                                              thinking_handler(i))
                               for i, c in enumerate(columns) if c.model not in failed))
    finally:
        await ac.aclose()
    return records


def compare(
    prompt: str | Sequence[Mapping[str, Any]],
    models: str | Sequence[str] | None = None,
    *,
    settings: Sequence[Mapping[str, Any]] | None = None,
    system: str | None = None,
    max_tokens: int = 128,
    client: ClientLike = None,
) -> CompareResult:
    """Send ``prompt`` to N ``models``, or to one model with N ``settings`` dicts, concurrently.

    Each setting is a dict of chat parameters (``temperature``, ``top_p``, ``seed``...;
    ``model`` picks a model per setting). A column whose request fails keeps its error
    in ``frame["error"]``; the others still complete.
    """
    messages = build_messages(prompt, system)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    c, owned = sync_client(client)
    try:
        default = functools.cache(lambda: pick_model(None, c))  # asked at most once
        columns = plan_columns(models, settings, max_tokens, default)
        endpoint = (c.base_url, c.api_key)
    finally:
        if owned:
            c.close()
    records = run_sync(compare_async(endpoint, messages, columns))
    return CompareResult(messages, columns, records)
