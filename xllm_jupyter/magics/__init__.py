"""IPython magics: ``%%xllm`` streams an answer from the shared engine into the cell; ``%xllm`` manages models."""

from __future__ import annotations

from .interp import interpolate
from .magic import XllmMagics, load_ipython_extension
from .render import Reply

__all__ = ["Reply", "XllmMagics", "interpolate", "load_ipython_extension"]
