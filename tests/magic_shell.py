"""A real IPython shell with a fresh ``%xllm``, and how the magic tests run a line in it and read what it showed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from xllm_jupyter.client import discovery
from xllm_jupyter.magics import XllmMagics


@contextlib.contextmanager
def magic_shell() -> Iterator[Any]:
    """IPython with a fresh ``%xllm`` (no defaults or conversation carried over; ``ip.xllm_magics`` is it);
    afterwards ``%xllm connect`` is undone and its connections closed."""
    ip = InteractiveShell.instance()
    magics = XllmMagics(ip)
    ip.register_magics(magics)
    ip.xllm_magics = magics
    try:
        yield ip
    finally:
        discovery.disconnect()
        magics.state.close()


def run(shell: Any, line: str) -> Any:
    """``%xllm <line>`` with its output captured."""
    with capture_output() as cap:
        shell.run_line_magic("xllm", line)
    return cap


def shown(cap: Any, mime: str = "text/plain") -> str:
    """Every displayed ``mime`` of a captured run, joined."""
    return "\n".join(o.data[mime] for o in cap.outputs if mime in o.data)
