"""``CompareWidget``: one prompt, N models or N sampler settings, streamed side by side with a diff."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import time
from typing import Any

import ipywidgets as W

from ..core.errors import InvalidRequest, XllmError
from ..notebook.clients import ClientLike, endpoint_of, pick_model
from ..notebook.compare import Column, CompareResult, compare_async, plan_columns
from ..notebook.diffing import diff_html, diff_text
from ..notebook.streams import StreamRecord, build_messages
from .base import (RENDER_INTERVAL, Runner, error_text, forget_problem_on_change, model_options, show_busy, status_html,
                   stop_button, thinking_html, unknown_models)

_CELL = "white-space:pre-wrap;font-size:0.95em;min-height:4em"

log = logging.getLogger(__name__)


def parse_settings(text: str) -> list[dict[str, Any]] | None:
    """Settings typed into the box: a JSON list of objects, or one JSON object per line; None if empty."""
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise InvalidRequest('settings: write a JSON list like [{"temperature": 0}, {"temperature": 1}] or one object per line', param="settings") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise InvalidRequest("settings: every entry must be a JSON object of chat parameters", param="settings")
    return value


class CompareWidget(W.VBox):
    """Send one prompt to several models (or one model with several settings) and watch them side by side.

    From Python: set ``prompt.value``, ``models.value`` (a tuple of names) or
    ``settings.value`` (JSON), call ``run()`` (or ``run_button.click()``), ``stop()``,
    ``wait()``; ``result`` is the last ``CompareResult``; ``diff_view`` shows the diff of
    the columns picked in ``diff_a`` / ``diff_b``.
    """

    def __init__(
        self,
        models: str | list[str] | None = None,
        *,
        settings: list[dict[str, Any]] | None = None,
        prompt: str = "",
        system: str = "",
        max_tokens: int = 128,
        client: ClientLike = None,
        **kwargs: Any,
    ):
        from ..client import XllmClient

        base, key = endpoint_of(client)
        self._endpoint = (base, key)
        self._runner = Runner("xllm-compare-widget")
        #: the last finished comparison (None before one ends)
        self.result: CompareResult | None = None
        self._columns: list[Column] = []
        self._records: list[StreamRecord] = []
        #: each column's thinking (a reasoning model's ``reasoning_content``): shown above its text, never compared
        self._thinking: list[str] = []
        self._bodies: list[W.HTML] = []
        self._footers: list[W.HTML] = []
        self._last_render: list[float] = []
        self._setting_diff = False  # True while both diff pickers change: no diff of a half-updated pair

        with XllmClient(base, key) as c:
            options, problem = model_options(c)
            chosen = [models] if isinstance(models, str) else list(models or [])
            if problem is None:
                problem = unknown_models(c, chosen, options)
        good = set(options)
        options = [m for m in chosen if m not in options] + options
        self.prompt = W.Textarea(value=prompt, placeholder="Prompt sent to every column", description="Prompt", layout=W.Layout(width="100%", height="5em"))
        self.system_prompt = W.Textarea(value=system, placeholder="System prompt (optional)", description="System", layout=W.Layout(width="100%"))
        self.models = W.SelectMultiple(options=options, value=tuple(chosen), description="Models", rows=min(max(len(options), 2), 6))
        self.settings = W.Textarea(
            value=json.dumps(settings) if settings else "",
            placeholder='Optional: one model, several settings, e.g. [{"temperature": 0}, {"temperature": 1.2}]',
            description="Settings",
            layout=W.Layout(width="100%"),
        )
        self.max_tokens = W.BoundedIntText(value=max_tokens, min=1, max=1_000_000, description="Max tokens")
        self.run_button = W.Button(description="Compare", button_style="primary", icon="columns")
        self.stop_button = stop_button()
        self.columns = W.HBox(layout=W.Layout(width="100%", align_items="stretch"))
        self.diff_a = W.Dropdown(description="Diff", layout=W.Layout(width="16em"))
        self.diff_b = W.Dropdown(description="→", layout=W.Layout(width="16em"))
        self.diff_mode = W.ToggleButtons(options=["word", "unified"], value="word")
        self.diff_view = W.HTML()
        self.status = W.HTML(status_html(problem or "Ready.", "error" if problem else "info"))
        if problem:  # e.g. no such model: picking only models the server listed clears it
            forget_problem_on_change(self.models, self.status, good)

        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        for control in (self.diff_a, self.diff_b, self.diff_mode):
            control.observe(lambda _: self._render_diff(), names="value")

        super().__init__(
            [
                self.prompt,
                self.system_prompt,
                W.HBox([self.models, self.max_tokens], layout=W.Layout(flex_flow="row wrap")),
                self.settings,
                W.HBox([self.run_button, self.stop_button]),
                self.status,
                self.columns,
                W.HBox([self.diff_a, self.diff_b, self.diff_mode], layout=W.Layout(flex_flow="row wrap")),
                self.diff_view,
            ],
            **kwargs,
        )

    @property
    def busy(self) -> bool:
        """True while the columns stream."""
        return self._runner.busy

    def run(self) -> bool:
        """Start the comparison with the values in the boxes; False (and a status message) if it cannot."""
        if self.busy:
            self._status("Already running: stop it first.", "error")
            return False
        try:
            messages = build_messages(self.prompt.value, self.system_prompt.value or None)
            settings = parse_settings(self.settings.value)
            models = list(self.models.value) or None
            if models is None and settings is None:  # plan_columns would name its Python arguments
                raise InvalidRequest('Pick models to compare (Ctrl/Shift-click for several), or type settings for one model, '
                                     'e.g. [{"temperature": 0}, {"temperature": 1.2}]', param="models")
            columns = plan_columns(models, settings, self.max_tokens.value, self._default_model)
        except XllmError as exc:
            self._status(exc.message, "error")
            return False
        self._columns = columns
        self._records = [StreamRecord(model=c.model, params=c.params) for c in columns]
        self._thinking = [""] * len(columns)
        self._build_columns(columns)
        self.result = None
        self.diff_view.value = ""
        self._busy(True, f"Streaming {len(columns)} columns…")
        coro = compare_async(self._endpoint, messages, columns, self._on_piece, self._records, self._on_thinking)
        return self._runner.start(coro, lambda task: self._finished(task, messages))

    def stop(self) -> None:
        """Stop every column (the server cancels their generations)."""
        self._runner.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every column is done; False on timeout."""
        return self._runner.wait(timeout)

    # ------------------------------------------------------------- internals
    def _default_model(self) -> str:
        from ..client import XllmClient

        with XllmClient(*self._endpoint) as c:
            return pick_model(None, c)

    def _build_columns(self, columns: list[Column]) -> None:
        self._bodies = [W.HTML(f'<div style="{_CELL}"><em>…</em></div>') for _ in columns]
        self._footers = [W.HTML() for _ in columns]
        self._last_render = [0.0] * len(columns)
        boxes = []
        for c, body, foot in zip(columns, self._bodies, self._footers):
            head = W.HTML(f"<b>{html.escape(c.label)}</b><br><small>{html.escape(c.model)}</small>")
            boxes.append(W.VBox([head, body, foot], layout=W.Layout(flex="1 1 0", min_width="14em", border="1px solid var(--jp-border-color2, #ddd)", padding="4px", margin="2px")))
        self.columns.children = boxes

    def _on_piece(self, i: int, _text: str) -> None:
        now = time.monotonic()
        if now - self._last_render[i] >= RENDER_INTERVAL:
            self._last_render[i] = now
            self._render_column(i)

    def _on_thinking(self, i: int, text: str) -> None:
        self._thinking[i] += text
        self._on_piece(i, "")

    def _render_column(self, i: int) -> None:
        rec = self._records[i]
        body = html.escape(rec.text)
        if not rec.text and self._thinking[i] and rec.finish_reason == "length":  # all thinking: not an empty reply
            body = "<em>(no answer came after the thinking: raise max tokens)</em>"
        if rec.error is not None:  # a stream cut off mid-answer keeps the text that came, the error under it
            body += f"{'<br>' if body else ''}<b>error:</b> {html.escape(error_text(rec.error))}"
        self._bodies[i].value = f'<div style="{_CELL}">{thinking_html(self._thinking[i], bool(rec.text))}{body}</div>'

    def _finished(self, task: asyncio.Task, messages: list[dict[str, Any]]) -> None:
        status = ("Stopped.", "info")
        try:
            for i, rec in enumerate(self._records):
                self._render_column(i)
                self._footers[i].value = _timings(rec)
            self.result = CompareResult(messages, self._columns, self._records)
            self._set_diff_labels(self.result.labels)
            if task.cancelled():
                pass
            elif task.exception() is not None:
                status = (f"Error: {error_text(task.exception())}", "error")
            else:
                failed = sum(r.error is not None for r in self._records)
                status = (f"Done{f' ({failed} failed)' if failed else ''}.", "error" if failed else "ok")
        except Exception as exc:  # the traceback goes to the log; the widget must not stay "Streaming…"
            log.exception("CompareWidget could not show the result")
            status = (f"Error: {error_text(exc)}", "error")
        finally:
            self._busy(False, *status)

    def _set_diff_labels(self, labels: list[str]) -> None:
        """Offer this run's column labels in both diff pickers (first two picked), then draw the diff."""
        # hold_trait_notifications() cannot do this: a Dropdown validates the held value
        # against its old options and raises, so the observer is muted with a flag instead
        self._setting_diff = True
        try:
            self.diff_a.options, self.diff_b.options = labels, labels
            if len(labels) >= 2:
                self.diff_a.value, self.diff_b.value = labels[0], labels[1]
        finally:
            self._setting_diff = False
        self._render_diff()

    def _render_diff(self) -> None:
        if self._setting_diff or self.result is None:
            return
        texts = dict(zip(self.result.labels, self.result.texts))
        if self.diff_a.value not in texts or self.diff_b.value not in texts:
            return  # a picker still holds a label of an earlier run
        a, b = texts[self.diff_a.value], texts[self.diff_b.value]
        if self.diff_mode.value == "word":
            self.diff_view.value = diff_html(a, b)
        else:
            text = diff_text(a, b, "unified", self.diff_a.value, self.diff_b.value) or "(no differences)"
            self.diff_view.value = f"<pre>{html.escape(text)}</pre>"

    def _busy(self, busy: bool, text: str, kind: str = "busy") -> None:
        show_busy(busy, [self.run_button], self.stop_button)
        self._status(text, kind)

    def _status(self, text: str, kind: str) -> None:
        self.status.value = status_html(text, kind)

    def close(self) -> None:
        """Stop streaming, end the background thread and close the widget."""
        self._runner.close()
        super().close()


def _timings(rec: StreamRecord) -> str:
    """A column's footer: latency, TTFT, tok/s and tokens."""
    def fmt(v: float, unit: str) -> str:
        return "–" if math.isnan(v) else f"{v:.2f}{unit}"

    state = " (stopped)" if rec.cancelled else ""
    return f"<small>{rec.completion_tokens} tokens · {fmt(rec.latency_s, ' s')} · TTFT {fmt(rec.ttft_s, ' s')} · {fmt(rec.tok_per_s, ' tok/s')}{state}</small>"
