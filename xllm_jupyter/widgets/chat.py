"""``ChatWidget``: streaming chat with a model on the shared engine, inside a notebook."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..client.thinking import no_answer_note
from ..core.errors import InvalidRequest, XllmError
from ..notebook.clients import ClientLike, async_client, endpoint_of, listed_defaults
from ..notebook.streams import StreamRecord, check_params, measure_stream
from .base import (RENDER_INTERVAL, WIDE_LABEL, ListingOnce, Runner, error_text, forget_problem_on_change, model_choices,
                   show_busy, status_html, stop_button, thinking_html)
from .markdown import TRANSCRIPT_CSS, markdown_html

log = logging.getLogger(__name__)

#: how many times a streamed render's own duration the next waits at least: the kernel spends at most
#: 1 / (1 + RENDER_BACKOFF) of a long reply's stream rendering it
RENDER_BACKOFF = 4

#: what the settings show until the user moves them (they are not sent before: see ``ChatWidget.chosen``),
#: where the server does not list the model's own (``xllm.defaults``: its generation_config, Modelfile)
_SHOWN: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 512}
_LABELS = {"temperature": "temperature", "top_p": "top p", "max_tokens": "max tokens"}

_ROLE_STYLE = {
    "user": ("You", "var(--jp-layout-color2, #f3f3f3)"),
    "assistant": ("Assistant", "transparent"),
    "system": ("System", "var(--jp-layout-color3, #e8e8e8)"),
}


#: under a reply cut off by an error, in the transcript and the Markdown export
_CUT_OFF_NOTE = "(cut off by an error: not sent back to the model)"


def _thought_only_note(record: StreamRecord | None) -> str:
    """Under a reasoning model's reply that thought and gave no answer (kept on screen, never sent back): why, in the
    words %%xllm and ``xllm run`` use (at max tokens: how many went to the thinking)."""
    said = no_answer_note(*((record.finish_reason, record.completion_tokens) if record is not None else (None,)),
                          limit="max tokens")
    return f"({said}; not sent back to the model)"


class ChatWidget(W.VBox):
    """Chat with a model: pick it, set a system prompt and parameters, stream, stop, clear, export.

    Everything is reachable from Python too: set ``input.value`` and call ``ask()`` (or
    ``send_button.click()``), ``stop()``, ``clear()``, ``export(path)``; ``messages``
    holds the conversation and ``wait()`` blocks until a reply is done. (``ask``, not
    ``send``: ``Widget.send`` is ipywidgets' own custom-message method.)
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        client: ClientLike = None,
        system: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        params: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        from ..client import XllmClient

        base, key = endpoint_of(client)
        self._endpoint = (base, key)
        self._runner = Runner("xllm-chat-widget")
        #: extra chat parameters sent with every request (``seed``, ``stop``, ...)
        self.params: dict[str, Any] = dict(params or {})
        #: the conversation so far (user and assistant turns; the system prompt is separate)
        self.messages: list[dict[str, str]] = []
        #: timings of the last reply (a ``StreamRecord``), None before the first
        self.last: StreamRecord | None = None
        self._next_render = 0.0  # (time.monotonic) when the streaming reply may be shown again
        self._clearing = False  # True while clear() stops a reply
        #: replies cut off by an error (``messages``' own dicts): shown, never sent back (see ``request_messages``)
        self._cut_off: list[dict[str, str]] = []
        #: a reasoning model's thinking, by the ``id`` of its reply's dict: shown folded above the reply, never sent
        self._thinking: dict[int, str] = {}
        #: the note under each reply that only thought, by the ``id`` of its dict (``_thought_only_note``)
        self._thought_only: dict[int, str] = {}

        with XllmClient(base, key) as client:
            c = ListingOnce(client)
            options, chosen, problem = model_choices(c, model)
            #: each listed model's own defaults, which the unchosen settings show (a model without: ``_SHOWN``)
            self.model_defaults: dict[str, dict[str, float]] = listed_defaults(c)
        self.model_picker = W.Dropdown(options=options, value=chosen, description="Model")
        # ipywidgets 8 links each description to its box with <label for>: that is the box's accessible name,
        # and the tooltip (the label's title) says what the short name means, without widening the label
        self.system_prompt = W.Textarea(value=system, placeholder="System prompt (optional)", description="System", layout=W.Layout(width="100%"),
                                        tooltip="System prompt: instructions the model gets before the conversation (optional)")
        self.temperature = W.FloatSlider(value=_SHOWN["temperature"], min=0.0, max=2.0, step=0.05, description="Temperature", style=WIDE_LABEL)
        self.top_p = W.FloatSlider(value=_SHOWN["top_p"], min=0.05, max=1.0, step=0.05, description="Top p")
        self.max_tokens = W.BoundedIntText(value=_SHOWN["max_tokens"], min=1, max=1_000_000, description="Max tokens")
        self.defaults_button = W.Button(description="Model defaults", icon="undo",
                                        tooltip="Send none of these settings: the model's own apply (its Modelfile, generation_config.json)")
        self.settings_note = W.HTML()
        #: the settings the user chose (the constructor's or moved since): only these are sent, so a model's
        #: own defaults (a Modelfile's num_predict, the sampling it ships with) apply to the rest
        self.chosen: set[str] = set()
        for name, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens)):
            if value is not None:
                self._control(name).value = value
                self.chosen.add(name)
            self._control(name).observe(lambda _, name=name: self._chose(name), names="value")
        self._show_model_defaults()
        self.model_picker.observe(lambda _: self._show_model_defaults(), names="value")
        self._note_settings()
        # column-reverse anchors the scroll position at the bottom: a reply longer than the box stays in
        # view as it streams (a plain box stayed at the top, hiding the newest text); scrolled up, it stays put
        self.transcript = W.HTML(layout=W.Layout(width="100%", max_height="28em", overflow="auto", border="1px solid var(--jp-border-color2, #ddd)",
                                                 padding="4px", display="flex", flex_flow="column-reverse"))
        self.transcript.add_class("xllm-chat-transcript")  # for the page (and browser tests) to find it
        self.input = W.Textarea(placeholder="Type a message and press Send", description="Message", layout=W.Layout(width="100%", height="5em"),
                                tooltip="Your message to the model: Send posts it, Enter adds a new line")
        self.send_button = W.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = stop_button()
        self.clear_button = W.Button(description="Clear", icon="trash")
        self.export_format = W.Dropdown(options=[("Markdown", "markdown"), ("JSON", "json")], value="markdown", description="Export", style=WIDE_LABEL, layout=W.Layout(width="14em"))
        self.export_path = W.Text(value="transcript.md", placeholder="file to write", description="to", style=WIDE_LABEL, layout=W.Layout(width="18em"),
                                  tooltip="The file the transcript is exported to")
        self.export_button = W.Button(description="Export", icon="download")
        self.status = W.HTML(status_html(problem or "Ready.", "error" if problem else "info"))
        if problem:  # e.g. no such model: picking one the server listed clears it
            forget_problem_on_change(self.model_picker, self.status, set(options) - {model})

        self.send_button.on_click(lambda _: self.ask())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.export_button.on_click(lambda _: self._export_clicked())
        self.export_format.observe(self._format_changed, names="value")
        self.defaults_button.on_click(lambda _: self.use_model_defaults())

        settings = W.HBox([self.temperature, self.top_p, self.max_tokens, self.defaults_button, self.settings_note],
                          layout=W.Layout(flex_flow="row wrap", align_items="center"))
        buttons = W.HBox([self.send_button, self.stop_button, self.clear_button])
        export = W.HBox([self.export_format, self.export_path, self.export_button])
        super().__init__([self.model_picker, self.system_prompt, settings, self.transcript, self.input, buttons, export, self.status], **kwargs)
        self._render()

    # ----------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """True while a reply streams."""
        return self._runner.busy

    def request_params(self) -> dict[str, Any]:
        """The chat parameters the next request carries: the settings chosen, then ``params``."""
        return {**{name: self._control(name).value for name in _SHOWN if name in self.chosen}, **self.params}

    def use_model_defaults(self) -> None:
        """Send none of temperature, top p and max tokens: the model's own defaults apply again, shown as the server
        lists them now (read again: a model re-created since, by ``xllm create`` or ``%xllm create``, has new ones)."""
        self.chosen.clear()
        self._read_model_defaults()
        self._show_model_defaults()
        self._note_settings()

    def _read_model_defaults(self) -> None:
        """``model_defaults`` from the server's listing now; the last ones kept where it cannot be asked."""
        from ..client import XllmClient

        with XllmClient(*self._endpoint) as client:
            defaults = listed_defaults(client)
        if defaults:
            self.model_defaults = defaults

    def _show_model_defaults(self) -> None:
        """The settings not chosen show what the picked model gets for them (its own defaults, else ``_SHOWN``)."""
        own = self.model_defaults.get(self.model_picker.value or "", {})
        self._resetting = True
        try:
            for name, value in _SHOWN.items():
                if name not in self.chosen:
                    self._control(name).value = own.get(name, value)
        finally:
            self._resetting = False

    def _control(self, name: str) -> Any:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}[name]

    def _chose(self, name: str) -> None:
        if not getattr(self, "_resetting", False):
            self.chosen.add(name)
            self._note_settings()

    def _note_settings(self) -> None:
        unset = [_LABELS[n] for n in _SHOWN if n not in self.chosen]
        text = "" if not unset else ("model defaults" if len(unset) == len(_SHOWN) else "model default: " + ", ".join(unset))
        self.settings_note.value = f'<span style="opacity:0.7">{html.escape(text)}</span>'

    def request_messages(self) -> list[dict[str, str]]:
        """What the next request sends: the system prompt (if any) and the conversation, less turns cut off by an error."""
        system = self.system_prompt.value.strip()
        head = [{"role": "system", "content": system}] if system else []
        # a reply cut off by an error (a server that stopped mid-answer) would pass for the model's whole answer:
        # it is left out with its question (roles keep alternating), as the JupyterLab panel and `xllm run` do.
        # A reply the user stopped is theirs to keep, and is sent
        cut = [i for i, m in enumerate(self.messages) if self._is_cut_off(m)]
        left_out = set(cut) | {i - 1 for i in cut if i > 0 and self.messages[i - 1]["role"] == "user"}
        return head + [m for i, m in enumerate(self.messages) if i not in left_out and (m["content"] or m["role"] != "assistant")]

    def _is_cut_off(self, message: dict[str, str]) -> bool:
        return any(message is m for m in self._cut_off)

    def _note(self, message: dict[str, str]) -> str:
        """The note under a reply that is not sent back: cut off by an error, or all thinking."""
        return _CUT_OFF_NOTE if message["content"] else self._thought_only.get(id(message), _thought_only_note(None))

    # --------------------------------------------------------------- actions
    def ask(self, text: str | None = None) -> bool:
        """Send ``text`` (default: the input box) and stream the reply; False if nothing was sent."""
        # Enter in the box adds a newline (ipywidgets' Textarea has no submit): trailing
        # whitespace is never part of the message
        text = (self.input.value if text is None else text).rstrip()
        if self.busy:
            self._status("Still answering: stop it first.", "error")
            return False
        if not text.strip():
            self._status("Type a message first.", "error")
            return False
        model = self.model_picker.value
        if not model:
            self._status("No model to chat with: pick one (is the server running?).", "error")
            return False
        params = self.request_params()
        try:
            check_params(params)
        except XllmError as exc:
            self._status(exc.message, "error")
            return False
        self.input.value = ""
        self.messages.append({"role": "user", "content": text})
        payload = self.request_messages()
        reply = {"role": "assistant", "content": ""}
        self.messages.append(reply)
        self.last = StreamRecord(model=model, params=params)
        self._set_busy(True)
        self._status(f"{model} is answering…", "busy")
        self._render()
        return self._runner.start(self._stream(payload, model, params, reply, self.last), lambda task: self._finished(task, reply))

    def stop(self) -> None:
        """Stop the reply being streamed (the server cancels the generation)."""
        self._runner.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current reply is done; False on timeout."""
        return self._runner.wait(timeout)

    def clear(self) -> None:
        """Stop any reply and forget the conversation."""
        if self.busy:
            self._clearing = True  # the stopped question is forgotten too, not put back in the box
            try:
                self.stop()
                self.wait(10)
            finally:
                self._clearing = False
        self.messages = []
        self._cut_off = []
        self._thinking = {}
        self._thought_only = {}
        self.last = None
        self._next_render = 0.0  # the long transcript's render backoff is gone with it: the next reply shows at once
        self._render()
        self._status("Cleared.", "info")

    # ---------------------------------------------------------------- export
    def transcript_markdown(self) -> str:
        """The conversation as Markdown."""
        lines = [f"# Chat with {self.model_picker.value or 'a model'}", ""]
        system = self.system_prompt.value.strip()
        if system:
            lines += ["**System:**", "", system, ""]
        for m in self.messages:
            lines += [f"**{_ROLE_STYLE.get(m['role'], (m['role'].title(), ''))[0]}:**", "", m["content"], ""]
            if self._is_cut_off(m):
                lines += [f"*{self._note(m)}*", ""]
        return "\n".join(lines)

    def transcript_json(self) -> str:
        """The conversation as JSON: model, parameters and OpenAI-style messages."""
        return json.dumps({"model": self.model_picker.value, "params": self.request_params(), "messages": self.request_messages()}, indent=2, ensure_ascii=False)

    def export(self, path: str | Path, format: str | None = None) -> Path:
        """Write the transcript to ``path`` as ``markdown`` or ``json`` (default: from the suffix)."""
        path = Path(path).expanduser()
        fmt = format or ("json" if path.suffix.lower() == ".json" else "markdown")
        if fmt not in ("markdown", "json"):
            raise InvalidRequest("format must be 'markdown' or 'json'", param="format")
        path.write_text(self.transcript_json() if fmt == "json" else self.transcript_markdown(), encoding="utf-8")
        return path

    def _export_clicked(self) -> None:
        try:
            written = self.export(self.export_path.value, self.export_format.value)
        except (OSError, XllmError) as exc:
            self._status(f"Export failed: {error_text(exc)}", "error")
            return
        self._status(f"Wrote {written}", "ok")

    def _format_changed(self, change: dict[str, Any]) -> None:
        stem = Path(self.export_path.value or "transcript").with_suffix("")
        self.export_path.value = str(stem.with_suffix(".json" if change["new"] == "json" else ".md"))

    # ------------------------------------------------------------- streaming
    async def _stream(self, messages: list[dict[str, str]], model: str, params: dict[str, Any], reply: dict[str, str], record: StreamRecord) -> None:
        client = async_client(self._endpoint, max_connections=2)

        def on_thinking(text: str) -> None:
            self._thinking[id(reply)] = self._thinking.get(id(reply), "") + text
            on_piece("")

        def on_piece(text: str) -> None:
            reply["content"] += text
            now = time.monotonic()
            if now >= self._next_render:
                self._render()
                done = time.monotonic()
                # a render costs more as the reply grows (its Markdown is parsed whole): one that takes longer
                # than the interval would keep the kernel rendering all the time and the notebook would freeze,
                # so the next waits RENDER_BACKOFF times as long as this one took (the end of the reply always
                # shows: _finished renders it whole)
                self._next_render = max(now + RENDER_INTERVAL, done + RENDER_BACKOFF * (done - now))

        try:
            await measure_stream(client, messages, model, params, on_piece, record, on_thinking)
        finally:
            await asyncio.shield(client.aclose())

    def _finished(self, task: asyncio.Task, reply: dict[str, str]) -> None:
        record = self.last
        error = None if task.cancelled() else task.exception() or (record.error if record is not None else None)
        try:
            if task.cancelled():
                self._status("Stopped.", "info")
            elif error is not None:
                kept = " (the reply so far is kept, but not sent back to the model)" if reply["content"] else ""
                self._status(f"Error: {error_text(error)}{kept}", "error")
            elif record is not None:
                speed = "" if math.isnan(record.tok_per_s) else f", {record.tok_per_s:.1f} tok/s"
                # (as the JupyterLab panel does: an answer cut at max tokens reads as if it ended there)
                cut = " Stopped at the max tokens limit." if record.finish_reason == "length" else ""
                self._status(f"{record.completion_tokens} tokens in {record.latency_s:.2f} s (first after {record.ttft_s:.2f} s{speed}).{cut}", "ok")
        except Exception as exc:  # the traceback goes to the log; the widget must not stay busy
            log.exception("ChatWidget could not show the reply's status")
            self._status(f"Error: {error_text(exc)}", "error")
        finally:
            # a reply cut off by an error keeps the text that came on screen, as a stopped one does (dropping it
            # would leave a question with no answer in the transcript), but it is not sent as history
            if error is not None and reply["content"]:
                self._cut_off.append(reply)
            elif error is None and not task.cancelled() and not reply["content"] and self._thinking.get(id(reply), "").strip():
                # every token went to the thinking (max tokens): what streamed stays on screen, as the JupyterLab
                # panel keeps it, with a note; like a cut-off reply it is never sent back, nor its question
                self._cut_off.append(reply)
                self._thought_only[id(reply)] = _thought_only_note(record)
            if not reply["content"] and not self._is_cut_off(reply):
                asked = self._drop_turn(reply)
                # the box was emptied on Send: a question that got no answer goes back there to be
                # fixed or sent again, unless the user has typed something new meanwhile
                if asked is not None and not self.input.value.strip() and not self._clearing:
                    self.input.value = asked
            self._set_busy(False)
            self._render()

    def _drop_turn(self, reply: dict[str, str]) -> str | None:
        """Forget an unanswered or failed turn, as the CLI does (resent, it would make two user turns in a row); its question."""
        i = next((k for k, m in enumerate(self.messages) if m is reply), None)
        if i is None:
            return None  # cleared meanwhile
        self._thinking.pop(id(reply), None)
        del self.messages[i]
        if i > 0 and self.messages[i - 1]["role"] == "user":
            return self.messages.pop(i - 1)["content"]
        return None

    # --------------------------------------------------------------- display
    def _set_busy(self, busy: bool) -> None:
        show_busy(busy, [self.send_button], self.stop_button)

    def _status(self, text: str, kind: str) -> None:
        self.status.value = status_html(text, kind)

    def _render(self) -> None:
        parts = []
        for m in list(self.messages):
            name, background = _ROLE_STYLE.get(m["role"], (m["role"].title(), "transparent"))
            thought = self._thinking.get(id(m), "") if m["role"] == "assistant" else ""
            folded = thinking_html(thought, bool(m["content"]))  # above the answer
            if not m["content"]:  # still coming, or (not sent back) all thinking
                body = folded + f"<div><em>{self._note(m) if self._is_cut_off(m) else '…'}</em></div>"
            elif m["role"] == "assistant":  # replies are Markdown (code blocks, lists, tables): shown rendered
                body = folded + markdown_html(m["content"])
                if self._is_cut_off(m):
                    body += f"<div><em>{self._note(m)}</em></div>"
            else:  # what the user typed is shown as typed
                body = f'<div style="white-space:pre-wrap">{html.escape(m["content"])}</div>'
            parts.append(f'<div style="background:{background};padding:4px 8px;margin:2px 0;border-radius:4px"><b>{name}</b>{body}</div>')
        self.transcript.value = TRANSCRIPT_CSS + "".join(parts) if parts else status_html("No messages yet.", "info")

    def close(self) -> None:
        """Stop streaming, end the background thread and close the widget."""
        self._runner.close()
        super().close()
