"""What the magics put in a cell's output: answers in four formats, tables, progress, short errors."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.display import display

from ..client.thinking import no_answer_note
from ..client.units import human_size
from ..notebook.safe_markdown import neutral_markdown, safe_lang

FORMATS = ("markdown", "code", "json", "text")
INTERRUPTED = "*(interrupted)*"
EMPTY = "*(the model returned no text)*"
#: an answer of blank lines renders as nothing at all: say so, or the cell looks as if nothing happened
BLANK = "*(the model returned only whitespace)*"


def thought_only(finish_reason: str | None, usage: Any = None) -> str:
    """The note under a reasoning model's reply that thought and gave no answer: its thinking shows above it, and this
    says why (at max tokens: how many went to the thinking), in the words ChatWidget and ``xllm run`` use."""
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return f"*({no_answer_note(finish_reason, tokens, '--max-tokens')})*"


_FENCE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)


def error(message: str) -> None:
    """A one-line ``xllm: ...`` on stderr: never a traceback."""
    print(f"xllm: {message}", file=sys.stderr)


def rich_frontend(shell: Any) -> bool:
    """True when displays can update in place (a kernel, or captured output), False in terminal IPython."""
    pub = getattr(shell, "display_pub", None)
    return pub is not None and type(pub) is not DisplayPublisher


def extract_code(text: str, default_lang: str = "python") -> tuple[str, str]:
    """(language, code) of the first fenced block in ``text`` (an unclosed fence runs to the end), else all of it."""
    match = _FENCE.search(text)
    if match is None:
        return default_lang, text.strip("\n")
    fence, lang = match.group(1), match.group(2) or default_lang
    rest = text[match.end():]
    close = re.search(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", rest, re.MULTILINE)
    return lang, (rest[: close.start()] if close else rest).rstrip("\n")


def parse_json(text: str) -> Any:
    """The JSON value in ``text`` (a fenced ```json block is unwrapped); ValueError when it is not JSON."""
    body = text.strip()
    if body.startswith(("```", "~~~")):
        body = extract_code(body, "json")[1]
    return json.loads(body)


def _fenced(body: str, lang: str) -> str:
    lang = safe_lang(lang)  # e.g. mermaid would be drawn, not shown as code
    fence = "```"
    while fence in body:  # a fence longer than any run of backticks inside
        fence += "`"
    return f"{fence}{lang}\n{body}\n{fence}"


class Reply:
    """One answer in a cell: Markdown, a code block, JSON or plain text; text in a terminal."""

    def __init__(self, fmt: str = "markdown", text: str = ""):
        self.fmt = fmt
        self.text = text
        self.note = ""  # "*(interrupted)*" and the like, shown after the answer
        self.value: Any = None  # the parsed JSON once the answer is complete and valid
        self.parsed = False
        self.thinking = ""  # a reasoning model's thinking: shown above the answer, never part of it

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = self._answer_bundle()
        if self.thinking:
            # apart from the answer, as `xllm run` and `ollama run` show it; the answer's own mime types stay whole
            # (application/json, and the code alone for copying) where a front-end picks them
            for mime in ("text/plain", "text/markdown"):
                if mime in bundle and not (mime == "text/plain" and self.fmt == "code"):
                    bundle[mime] = (_thought_plain if mime == "text/plain" else _thought_markdown)(self.thinking) + bundle[mime]
        return bundle

    def _answer_bundle(self) -> dict[str, Any]:
        note = f"\n\n{self.note}" if self.note else ""
        plain_note = f"\n{self.note.strip('*')}" if self.note else ""
        if self.fmt == "text":
            return {"text/plain": self.text + plain_note}
        if self.fmt == "code":
            lang, code = extract_code(self.text)
            return {"text/plain": code + plain_note, "text/markdown": _fenced(code, lang) + note}
        if self.fmt == "json":
            if self.parsed:
                pretty = json.dumps(self.value, indent=2, ensure_ascii=False)
                return {"application/json": self.value if isinstance(self.value, (dict, list)) else {"value": self.value},
                        "text/plain": pretty, "text/markdown": _fenced(pretty, "json")}
            return {"text/plain": self.text + plain_note, "text/markdown": _fenced(self.text, "json") + note}
        # model text is untrusted: JupyterLab shows trusted Markdown unsanitized (no raw HTML, no images)
        return {"text/plain": self.text + plain_note, "text/markdown": neutral_markdown(self.text) + note}

    def __repr__(self) -> str:
        return self._repr_mimebundle_()["text/plain"]


def _thought_plain(thinking: str) -> str:
    return f"Thinking...\n{thinking.strip(chr(10))}\n...done thinking.\n\n"


def _thought_markdown(thinking: str) -> str:
    """The thinking as a quoted block under a "Thinking" heading: model text, so neutral Markdown."""
    quoted = "\n".join(f"> {line}" if line else ">" for line in neutral_markdown(thinking.strip("\n")).split("\n"))
    return f"> *Thinking*\n>\n{quoted}\n\n"


class Table:
    """A small table shown as HTML in a notebook, Markdown where HTML is not rendered, text in a terminal."""

    def __init__(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "(none)"):
        self.headers = list(headers)
        self.rows = [["" if v is None else str(v) for v in row] for row in rows]
        self.empty = empty

    def _repr_html_(self) -> str:
        from html import escape

        if not self.rows:
            return f"<p>{escape(self.empty)}</p>"
        head = "".join(f"<th style='text-align:left'>{escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        thead = f"<thead><tr>{head}</tr></thead>" if any(self.headers) else ""
        return f"<table>{thead}<tbody>{body}</tbody></table>"

    def _repr_markdown_(self) -> str:
        if not self.rows:
            return self.empty

        def cell(v: str) -> str:
            return v.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self.rows:
            return self.empty
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) for i, h in enumerate(self.headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.headers, widths)).rstrip()] if any(self.headers) else []
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in self.rows]
        return "\n".join(lines)


class Text:
    """Plain text output (also a Markdown-free display in notebooks)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class Progress:
    """A pull's progress: an ipywidgets bar in a kernel, else one text line updated in place (throttled).

    The bar is a live widget only: when the pull ends, its output is replaced by a text line (the summary, or
    "failed"), since a saved notebook keeps the output but not the widget, and showed a bar stuck where it was.
    """

    INTERVAL = 0.2

    def __init__(self, shell: Any, title: str):
        self.title = title
        self._last = 0.0
        self._handle: Any = None
        self._bar: Any = None
        self._label: Any = None
        self._box: Any = None
        self._rich = rich_frontend(shell)
        if self._rich and getattr(shell, "kernel", None) is not None:
            try:
                import ipywidgets as w
            except ImportError:
                w = None
            if w is not None:
                self._bar = w.IntProgress(min=0, max=100, value=0, description=title[:20])
                self._label = w.Label("starting…")
                self._box = w.HBox([self._bar, self._label])
                self._handle = display(self._box, display_id=True)

    def line(self, event: dict[str, Any]) -> str:
        """``download model.gguf  45%  12.3 MB / 27.0 MB`` for one progress event."""
        stage = str(event.get("stage") or event.get("status") or "")  # ("stage": a copy, whose status says download)
        file = str(event.get("file") or "").rsplit("/", 1)[-1]
        done, total = event.get("completed") or 0, event.get("total")
        pct = f"{100 * done // total:3d}%" if total else ""
        if event.get("unit", "bytes") != "bytes":  # e.g. a conversion's steps
            sizes = f"{done}/{total} {event['unit']}" if total else ""
        else:
            sizes = f"{human_size(done)} / {human_size(total)}" if total else (human_size(done) if done else "")
        return "  ".join(p for p in (stage, file, pct, sizes) if p)

    def update(self, event: dict[str, Any], force: bool = False) -> None:
        """Show ``event`` (at most every INTERVAL unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < self.INTERVAL:
            return
        self._last = now
        text = self.line(event)
        if self._bar is not None:
            total = event.get("total")
            self._bar.value = int(100 * (event.get("completed") or 0) / total) if total else self._bar.value
            self._label.value = text
        elif self._rich:
            out = Text(f"{self.title}: {text}")
            if self._handle is None:
                self._handle = display(out, display_id=True)
            else:
                self._handle.update(out)
        else:
            print(f"{self.title}: {text}", flush=True)

    def fail(self, why: str = "failed") -> None:
        """The pull failed or was interrupted (its error is printed apart): its line says so, the bar goes."""
        self._end(Text(f"{self.title}: {why}"))

    def finish(self, message: str) -> None:
        """The final line (the bar fills up, then gives way to the line)."""
        if self._bar is not None:
            self._bar.value = self._bar.max
            self._label.value = message
        if self._rich and self._handle is not None:
            self._end(Text(message))
        else:
            print(message, flush=True)

    def _end(self, last: Text) -> None:
        """Put ``last`` where the bar or line was (a saved notebook keeps it) and close the widgets."""
        if self._handle is not None:
            self._handle.update(last)
        if self._box is not None:
            for widget in (self._box, self._bar, self._label):
                widget.close()  # the front-end removes a closed widget's view; nothing is left in the widget state
