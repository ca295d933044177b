"""What the widgets share: one background job at a time, cancellable; small rendering helpers."""

from __future__ import annotations

import asyncio
import html
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import ipywidgets as W

from ..client.base import can_chat
from ..core.errors import InvalidRequest, XllmError
from ..notebook.clients import pick_model, unknown_models
from ..notebook.loop import BackgroundLoop

#: a control's style whose label takes the width it needs (the default width cuts "Temperature")
WIDE_LABEL = {"description_width": "initial"}

#: seconds between streamed re-renders: smooth to watch, without flooding the comm channel
RENDER_INTERVAL = 0.05


def stop_button() -> Any:
    """A Stop button, disabled (and drawn plain) until something runs."""
    return W.Button(description="Stop", icon="stop", disabled=True)


def show_busy(busy: bool, start: list[Any], stop: Any) -> None:
    """Disable the ``start`` buttons while busy and enable ``stop``, coloured only when it can act."""
    for button in start:
        button.disabled = busy
    stop.disabled = not busy
    # a disabled button keeps its style colour, nearly as bright as an enabled one in dark
    # themes: only a Stop that can act is drawn in the warning colour
    stop.button_style = "warning" if busy else ""


class Runner:
    """Runs one coroutine at a time on a private loop thread; ``stop()`` cancels it."""

    def __init__(self, name: str):
        self.name = name
        self._bg: BackgroundLoop | None = None
        self._task: asyncio.Task | None = None
        self._cancel = False
        self._idle = threading.Event()
        self._idle.set()

    @property
    def busy(self) -> bool:
        """True while a job runs (or is about to)."""
        return not self._idle.is_set()

    def start(self, coro: Coroutine[Any, Any, Any], on_done: Callable[[asyncio.Task], None] | None = None) -> bool:
        """Start ``coro``; ``on_done(task)`` runs when it ends however it ends. False if busy."""
        if self.busy:
            coro.close()
            return False
        if self._bg is None or self._bg.closed:
            self._bg = BackgroundLoop(self.name)
        self._idle.clear()
        self._cancel = False
        loop = self._bg.loop

        def done(task: asyncio.Task) -> None:
            self._task = None
            if not task.cancelled():
                task.exception()  # retrieved here so asyncio never logs it as unhandled
            try:
                if on_done is not None:
                    on_done(task)
            finally:
                self._idle.set()

        def spawn() -> None:
            # A done callback runs even when the task is cancelled before its first step,
            # which a try/finally inside the coroutine would not.
            self._task = loop.create_task(coro)
            self._task.add_done_callback(done)
            if self._cancel:
                self._task.cancel()

        loop.call_soon_threadsafe(spawn)
        return True

    def stop(self) -> None:
        """Cancel the running job (its HTTP streams close, so the server stops generating)."""
        self._cancel = True
        if self._bg is None or self._bg.closed:
            return

        def cancel() -> None:
            if self._task is not None and not self._task.done():
                self._task.cancel()

        self._bg.loop.call_soon_threadsafe(cancel)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job runs; False if ``timeout`` passed first."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Cancel the job and stop the loop thread."""
        self.stop()
        self.wait(10)
        if self._bg is not None:
            self._bg.close()


def error_text(exc: BaseException) -> str:
    """A one-line message for a failure, never a traceback."""
    if isinstance(exc, XllmError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def thinking_html(thought: str, answered: bool) -> str:
    """A reasoning model's thinking, folded and dim (open while no answer has come); "" when there is none."""
    if not thought.strip():
        return ""
    # model text, escaped: a thought that writes markup must not become the widget's HTML
    return (f'<details{"" if answered else " open"}><summary style="opacity:0.7">Thinking</summary>'
            f'<div style="opacity:0.7;white-space:pre-wrap">{html.escape(thought.strip())}</div></details>')


def status_html(text: str, kind: str = "info") -> str:
    """A status line: ``info``, ``busy``, ``ok`` or ``error``."""
    # JupyterLab's theme colours (readable in dark themes too), fixed ones outside JupyterLab
    color = {
        "info": "var(--jp-ui-font-color2, #666)",
        "busy": "var(--jp-brand-color1, #1565c0)",
        "ok": "var(--jp-success-color1, #2e7d32)",
        "error": "var(--jp-error-color1, #c62828)",
    }.get(kind, "inherit")
    return f'<span style="color:{color}">{html.escape(text)}</span>'


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    """``"1, 2, 4"`` as ``(1, 2, 4)``; a clear error for anything else."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidRequest(f"{name}: write whole numbers separated by commas, e.g. 1, 2, 4", param=name) from None
    if not values or min(values) < 1:
        raise InvalidRequest(f"{name}: give at least one positive whole number", param=name)
    return values


class ListingOnce:
    """``client`` whose ``models()`` asks the server once and answers (or fails) the same after, so a widget's
    picker, default and settings read one listing (a hung server is waited for once, not per look-up)."""

    def __init__(self, client: Any):
        self._client = client
        self._listing: list[dict[str, Any]] | None = None
        self._error: XllmError | None = None

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``, asked on the first call only."""
        if self._error is not None:
            raise self._error
        if self._listing is None:
            try:
                self._listing = self._client.models()
            except XllmError as exc:
                self._error = exc
                raise
        return self._listing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def model_options(client: Any) -> tuple[list[str], str | None]:
    """(chat model ids the server offers, an error message if it could not be asked).

    Models the server marks as not for chat (embedding models) are left out.
    """
    try:
        return [m.get("id") for m in client.models() if m.get("id") and can_chat(m)], None
    except XllmError as exc:
        return [], exc.message


def model_choices(client: Any, model: str | None) -> tuple[list[str], str | None, str | None]:
    """(a model picker's options, its first value, an error message if the server could not be asked).

    The first value is ``model``, else the notebook API's default (``XLLM_MODEL``, a loaded
    chat model, the server's default...), so widgets and ``xj.chat()`` agree.
    """
    options, problem = model_options(client)
    if model is not None and problem is None:
        problem = unknown_models(client, [model], options)
    chosen = model
    if chosen is None and problem is None:
        try:
            chosen = pick_model(None, client)
        except XllmError:  # no model anywhere: the picker stays empty and Send says so
            chosen = None
    if chosen and chosen not in options:
        options = [chosen, *options]
    return options, chosen, problem


def forget_problem_on_change(picker: Any, status: Any, good: set[str]) -> None:
    """Once the user picks only models the server offers, the construction's model problem is gone: say Ready."""
    shown = status.value

    def changed(change: dict[str, Any]) -> None:
        value = change["new"]
        picked = set(value) if isinstance(value, tuple) else {value}
        if status.value == shown and picked and picked <= good:
            status.value = status_html("Ready.", "info")

    picker.observe(changed, names="value")
