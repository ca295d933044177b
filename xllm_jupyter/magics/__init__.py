"""IPython magics: ``%%xllm`` streams an answer from the shared engine into the cell output."""

from __future__ import annotations

from .magic import XllmMagics, interpolate, load_ipython_extension

__all__ = ["XllmMagics", "interpolate", "load_ipython_extension"]
