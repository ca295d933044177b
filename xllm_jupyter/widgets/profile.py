"""``ProfileWidget``: run ``profile`` from buttons, or watch the server's metrics live."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path
from typing import Any

import ipywidgets as W
import pandas as pd
from matplotlib.figure import Figure

from ..core.errors import XllmError
from ..notebook.clients import ClientLike, async_client, endpoint_of
from ..notebook.metrics import MetricsRecorder
from ..notebook.plots import figure_png, live_figure
from ..notebook.profile import MAX_CONCURRENCY, ProfileResult, profile_async
from .base import (WIDE_LABEL, Runner, error_text, forget_problem_on_change, model_choices, parse_ints, show_busy,
                   status_html, stop_button)

log = logging.getLogger(__name__)

FIGURES = ("throughput", "ttft", "tok_per_s", "itl", "memory")


class ProfileWidget(W.VBox):
    """Profile a model (concurrency × prompt length sweep) or watch the server live; export PNG/CSV.

    From Python: set the text boxes and call ``run()`` (or ``run_button.click()``),
    ``watch()``, ``stop()``, ``wait()``; the last run is ``result`` (a ``ProfileResult``),
    live samples are ``samples``; ``export_png(dir)`` / ``export_csv(dir)`` write files.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        client: ClientLike = None,
        concurrency: tuple[int, ...] = (1, 2, 4),
        prompt_tokens: tuple[int, ...] = (32, 128),
        max_tokens: int = 32,
        repeats: int = 1,
        interval: float = 1.0,
        window: float = 300.0,
        **kwargs: Any,
    ):
        from ..client import XllmClient

        base, key = endpoint_of(client)
        self._endpoint = (base, key)
        self._runner = Runner("xllm-profile-widget")
        #: the last finished profile run (None before one ends)
        self.result: ProfileResult | None = None
        #: live ``/metrics`` samples (one row per scrape, the last ``window`` seconds)
        self.samples = pd.DataFrame()
        self.interval = interval
        self.window = window
        self._live: Figure | None = None

        with XllmClient(base, key) as c:
            options, chosen, problem = model_choices(c, model)
        self.model_picker = W.Dropdown(options=options, value=chosen, description="Model")
        self.concurrency = W.Text(value=", ".join(map(str, concurrency)), description="Concurrency", style=WIDE_LABEL)
        self.prompt_tokens = W.Text(value=", ".join(map(str, prompt_tokens)), description="Prompt tokens", style=WIDE_LABEL)
        self.max_tokens = W.BoundedIntText(value=max_tokens, min=1, max=1_000_000, description="Max tokens")
        self.repeats = W.BoundedIntText(value=repeats, min=1, max=1000, description="Repeats")
        self.run_button = W.Button(description="Run profile", button_style="primary", icon="play")
        self.watch_button = W.Button(description="Watch server", icon="eye")
        self.stop_button = stop_button()
        self.progress = W.IntProgress(value=0, min=0, max=1, description="Progress", layout=W.Layout(visibility="hidden"))
        self.table = W.HTML()
        self.images = {name: W.Image(format="png", layout=W.Layout(max_width="100%")) for name in (*FIGURES, "live")}
        # hidden until a figure is drawn: an Image without a value shows the browser's broken-image icon
        self.plots = W.Tab(children=[self.images[n] for n in (*FIGURES, "live")], layout=W.Layout(display="none"))
        for i, name in enumerate((*FIGURES, "live")):
            self.plots.set_title(i, name)
        self.export_dir = W.Text(value="xllm-profile", placeholder="folder to write into", description="Export to")
        self.export_png_button = W.Button(description="PNG", icon="image")
        self.export_csv_button = W.Button(description="CSV", icon="table")
        self.status = W.HTML(status_html(problem or "Ready.", "error" if problem else "info"))
        if problem:  # e.g. no such model: picking one the server listed clears it
            forget_problem_on_change(self.model_picker, self.status, set(options) - {model})

        self.run_button.on_click(lambda _: self.run())
        self.watch_button.on_click(lambda _: self.watch())
        self.stop_button.on_click(lambda _: self.stop())
        self.export_png_button.on_click(lambda _: self._export_clicked("png"))
        self.export_csv_button.on_click(lambda _: self._export_clicked("csv"))

        row = W.Layout(flex_flow="row wrap")
        super().__init__(
            [
                self.model_picker,
                W.HBox([self.concurrency, self.prompt_tokens], layout=row),
                W.HBox([self.max_tokens, self.repeats], layout=row),
                W.HBox([self.run_button, self.watch_button, self.stop_button, self.progress], layout=row),
                self.status,
                self.table,
                self.plots,
                W.HBox([self.export_dir, self.export_png_button, self.export_csv_button], layout=row),
            ],
            **kwargs,
        )

    # --------------------------------------------------------------- actions
    @property
    def busy(self) -> bool:
        """True while a profile runs or the live view watches."""
        return self._runner.busy

    def run(self) -> bool:
        """Start a profile with the values in the boxes; False (and a status message) if it cannot."""
        if self.busy:
            self._status("Already running: stop it first.", "error")
            return False
        try:
            conc = parse_ints(self.concurrency.value, "concurrency")
            lengths = parse_ints(self.prompt_tokens.value, "prompt tokens")
        except XllmError as exc:
            self._status(exc.message, "error")
            return False
        if max(conc) > MAX_CONCURRENCY:
            self._status(f"concurrency may be at most {MAX_CONCURRENCY}", "error")
            return False
        model = self.model_picker.value
        if not model:
            self._status("No model to profile: pick one (is the server running?).", "error")
            return False
        total = len(conc) * len(lengths) * self.repeats.value
        self.progress.max, self.progress.value = total, 0
        self.progress.layout.visibility = "visible"
        self._busy(True, f"Profiling {model}…")

        def on_batch(rows: list[dict[str, Any]], done: int, total: int) -> None:
            self.progress.value = done
            last = rows[-1] if rows else {}
            self._status(f"Profiling {model}: {done}/{total} batches (last: concurrency {last.get('concurrency')}, {last.get('prompt_tokens')} prompt tokens)", "busy")

        coro = profile_async(
            self._endpoint,
            model,
            concurrency=conc,
            prompt_tokens=lengths,
            max_tokens=self.max_tokens.value,
            repeats=self.repeats.value,
            on_batch=on_batch,
        )
        return self._runner.start(coro, self._profiled)

    def watch(self) -> bool:
        """Poll the server's ``/metrics`` every ``interval`` seconds and redraw the live plots until stopped."""
        if self.busy:
            self._status("Already running: stop it first.", "error")
            return False
        self._busy(True, "Watching the server…")
        self.plots.selected_index = len(FIGURES)  # the live tab
        return self._runner.start(self._watch(), self._watched)

    def stop(self) -> None:
        """Stop the profile or the live view."""
        self._runner.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the profile (or live view) has ended; False on timeout."""
        return self._runner.wait(timeout)

    # ---------------------------------------------------------------- export
    def figures(self) -> dict[str, Figure]:
        """The figures there are now: the last profile's, plus ``live`` once samples exist."""
        figs = dict(self.result.figures) if self.result is not None else {}
        if self._live is not None:
            figs["live"] = self._live
        return figs

    def export_png(self, directory: str | Path) -> list[Path]:
        """Write every figure as ``<directory>/<name>.png``; returns the paths."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, fig in self.figures().items():
            path = directory / f"{name}.png"
            path.write_bytes(figure_png(fig))
            out.append(path)
        return out

    def export_csv(self, directory: str | Path) -> list[Path]:
        """Write the tables (requests, summary, memory, itl, live) as CSV files; returns the paths."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        if self.result is not None:
            out += [self.result.to_csv(directory / f"{t}.csv", t) for t in ("requests", "summary", "memory", "itl")]
        if not self.samples.empty:
            path = directory / "live.csv"
            self.samples.to_csv(path, index=False)
            out.append(path)
        return out

    def _export_clicked(self, kind: str) -> None:
        try:
            written = self.export_png(self.export_dir.value) if kind == "png" else self.export_csv(self.export_dir.value)
        except (OSError, XllmError) as exc:
            self._status(f"Export failed: {error_text(exc)}", "error")
            return
        if not written:
            self._status("Nothing to export yet: run a profile or watch the server first.", "error")
            return
        self._status(f"Wrote {len(written)} files to {written[0].parent}", "ok")

    # ------------------------------------------------------------ background
    def _profiled(self, task: asyncio.Task) -> None:
        status = ("Profile stopped.", "info")
        try:
            self.progress.layout.visibility = "hidden"
            if not task.cancelled():
                exc = task.exception()
                status = (f"Profile failed: {error_text(exc)}", "error") if exc is not None else self._show(task.result())
        except Exception as exc:  # the traceback goes to the log; the widget must not stay busy
            log.exception("ProfileWidget could not show the result")
            status = (f"Profile failed: {error_text(exc)}", "error")
        finally:
            self._busy(False, *status)

    def _show(self, result: ProfileResult) -> tuple[str, str]:
        """Draw a finished profile's figures and table; returns the status line."""
        self.result = result
        for name in FIGURES:
            self._draw(name, result.figures[name])
        cols = ["concurrency", "prompt_tokens", "requests", "errors", "agg_tok_per_s", "tok_per_s_mean", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"]
        self.table.value = result.summary[cols].to_html(index=False, float_format=lambda v: f"{v:.4g}")
        best = result.summary["agg_tok_per_s"].max()
        self.plots.selected_index = 0
        text = f"Done: {len(result.frame)} requests"
        failed = result.frame["error"].dropna()
        if len(failed):  # the table only counts them: say so, and why (a prompt past the context length...)
            text += f", {len(failed)} failed ({failed.iloc[0]})"
        if not math.isnan(best):
            text += f", best aggregate {best:.1f} tok/s"
        return text + ".", "error" if len(failed) else "ok"

    def _draw(self, name: str, fig: Figure) -> None:
        """Show ``fig`` in its tab (and the tabs, from the first figure on)."""
        self.images[name].value = figure_png(fig)
        self.plots.layout.display = None

    async def _watch(self) -> None:
        client = async_client(self._endpoint, max_connections=2)
        recorder = MetricsRecorder(client, self.interval)
        try:
            while True:
                started = time.monotonic()
                row = await recorder.scrape()
                if row is None:
                    raise XllmError(recorder.error or "the server's /metrics could not be read")
                frame = pd.DataFrame(recorder.rows)
                self.samples = frame[frame["t_s"] >= frame["t_s"].iloc[-1] - self.window].reset_index(drop=True)
                self._live = live_figure(self.samples)
                self._draw("live", self._live)
                rate = row["gen_tok_per_s"]
                rate_text = "–" if math.isnan(rate) else f"{rate:.1f}"
                self._status(f"Live: {rate_text} tok/s, {row['in_flight']:.0f} in flight, {row['queued']:.0f} queued, {row['memory_mib']:.0f} MiB of models", "busy")
                await asyncio.sleep(max(self.interval - (time.monotonic() - started), 0.0))
        finally:
            await asyncio.shield(client.aclose())

    def _watched(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._busy(False, f"Live view ended: {error_text(task.exception())}", "error")
        else:
            n = len(self.samples)
            self._busy(False, f"Live view stopped after {n} sample{'' if n == 1 else 's'}.", "info")

    def _busy(self, busy: bool, text: str, kind: str = "busy") -> None:
        show_busy(busy, [self.run_button, self.watch_button], self.stop_button)
        self._status(text, kind)

    def _status(self, text: str, kind: str) -> None:
        self.status.value = status_html(text, kind)

    def close(self) -> None:
        """Stop what runs, end the background thread and close the widget."""
        self._runner.close()
        super().close()
