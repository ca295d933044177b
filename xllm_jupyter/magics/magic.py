"""``%%xllm``: ask the shared engine from a notebook cell and stream the answer as Markdown.

The magic is a thin front-end: it finds the server through ``XLLM_BASE_URL`` /
``XLLM_API_KEY`` (the Jupyter extension exports both for kernels it starts) and
streams through ``XllmClient``. It never imports the server or the engine.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping

from IPython.core.displaypub import DisplayPublisher
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..client import XllmClient
from ..core.errors import XllmError

UPDATE_INTERVAL = 0.05  # seconds between display updates: smooth, without flooding the front-end
INTERRUPTED = "\n\n*(interrupted)*"
EMPTY = "*(the model returned no text)*"


class _Missing:
    """Stands in for an unknown ``{name}`` and formats back to the original text."""

    def __init__(self, key: str):
        self.key = key

    def __format__(self, spec: str) -> str:
        return "{" + self.key + (":" + spec if spec else "") + "}"

    def __str__(self) -> str:
        return "{" + self.key + "}"

    __repr__ = __str__

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.key}.{attr}")

    def __getitem__(self, item: Any) -> "_Missing":
        return _Missing(f"{self.key}[{item}]")


class _KeepUnknown(dict):
    """A namespace view whose missing keys format back to ``{key}``."""

    def __missing__(self, key: str) -> _Missing:
        return _Missing(key)


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{var}`` from ``namespace``; unknown names and text that is not a template stay as-is."""
    if "{" not in text:
        return text
    try:
        return text.format_map(_KeepUnknown(namespace))
    except (ValueError, IndexError, KeyError, AttributeError, TypeError):
        # Unbalanced braces, "{}" or "{0}", a bad attribute: the body is not meant as a
        # template (e.g. code), so send it untouched rather than fail the cell.
        return text


class Reply:
    """The answer of one cell: Markdown in a notebook, plain text in a terminal."""

    def __init__(self, text: str = ""):
        self.text = text

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text, "text/markdown": self.text}

    def __repr__(self) -> str:
        return self.text


def _rich_frontend(shell: Any) -> bool:
    """True when displays can update in place (a kernel), False in terminal IPython."""
    pub = getattr(shell, "display_pub", None)
    return pub is not None and type(pub) is not DisplayPublisher


@magics_class
class XllmMagics(Magics):
    """``%%xllm`` (cell) and ``%xllm`` (line): chat with the shared xllm engine."""

    def __init__(self, shell: Any = None, **kw: Any):
        super().__init__(shell, **kw)
        self._client: XllmClient | None = None
        self._client_key: tuple[str | None, str | None] | None = None

    def client(self) -> XllmClient:
        """The client for the current XLLM_BASE_URL/XLLM_API_KEY (rebuilt when they change)."""
        key = (os.environ.get("XLLM_BASE_URL"), os.environ.get("XLLM_API_KEY"))
        if self._client is None or key != self._client_key:
            if self._client is not None:
                self._client.close()
            self._client = XllmClient(*key)
            self._client_key = key
        return self._client

    @magic_arguments()
    @argument("-m", "--model", help="Model name (default: XLLM_MODEL, else the server's first loaded model).")
    @argument("-s", "--system", help="System prompt.")
    @argument("-t", "--temperature", type=float, help="Sampling temperature (0 = greedy).")
    @argument("--max-tokens", type=int, help="Most tokens to generate.")
    @argument("-o", "--out", help="Also store the reply text in this variable.")
    @argument("prompt", nargs="*", help="Prompt (line magic); in %%xllm it leads the cell body.")
    @line_cell_magic
    def xllm(self, line: str, cell: str | None = None) -> None:
        """Ask the model; ``{var}`` in the prompt is filled from the notebook's variables."""
        try:
            args = parse_argstring(self.xllm, line)
        except Exception as exc:  # argparse reports usage problems by raising; keep it short
            print(f"xllm: {exc}", file=sys.stderr)
            return None
        # words after %%xllm on the first line lead the cell body rather than being dropped
        prompt = "\n".join(part for part in (" ".join(args.prompt), cell or "") if part.strip())
        prompt = interpolate(prompt.strip(), self.shell.user_ns if self.shell else {})
        if not prompt:
            print("xllm: nothing to ask — write the prompt in the cell body", file=sys.stderr)
            return None
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        params = {"temperature": args.temperature, "max_tokens": args.max_tokens}
        try:
            text = self._ask(messages, args.model, params)
        except XllmError as exc:
            print(f"xllm: {exc.message}", file=sys.stderr)
            return None
        if args.out:
            self.shell.user_ns[args.out] = text
        return None

    def _ask(self, messages: list[dict[str, str]], model: str | None, params: dict[str, Any]) -> str:
        """Stream one answer to the output area; returns its text."""
        client = self.client()
        model = model or client.default_model()
        if not model:
            raise XllmError("the server has no model loaded — pass -m MODEL (see `xllm list`)")
        stream = client.stream_chat(messages, model, **params)
        if _rich_frontend(self.shell):
            return self._stream_display(stream)
        return self._stream_print(stream)

    @staticmethod
    def _stream_display(stream: Any) -> str:
        """Markdown that grows in place, updated at most every UPDATE_INTERVAL."""
        reply = Reply()
        handle = None  # displayed with the first text, so a request that fails leaves no empty output
        pieces: list[str] = []
        last = 0.0
        try:
            for piece in stream:
                pieces.append(piece)
                now = time.monotonic()
                if handle is None:
                    reply.text = piece
                    handle = display(reply, display_id=True)
                    last = now
                elif now - last >= UPDATE_INTERVAL:
                    reply.text = "".join(pieces)
                    handle.update(reply)
                    last = now
        except KeyboardInterrupt:
            pieces.append(INTERRUPTED)
        else:
            if not pieces:
                pieces.append(EMPTY)
        finally:
            stream.close()  # closes the HTTP response, so the server cancels the job
            reply.text = "".join(pieces)
            if handle is not None:
                handle.update(reply)
            elif pieces:
                display(reply)
        return "" if reply.text == EMPTY else reply.text.removesuffix(INTERRUPTED)

    @staticmethod
    def _stream_print(stream: Any) -> str:
        """Terminal IPython: print tokens as they come."""
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(INTERRUPTED.replace("*", ""))
        finally:
            stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
        return "".join(pieces)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext xllm_jupyter``: register ``%%xllm``."""
    ipython.register_magics(XllmMagics)
