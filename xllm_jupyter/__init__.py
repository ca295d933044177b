"""xllm-jupyter: one shared local LLM engine for many notebooks, behind an OpenAI-compatible API."""

from __future__ import annotations

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    """Tell jupyter_server where the extension app lives (imported lazily)."""
    from .extension.app import XllmApp

    return [{"module": "xllm_jupyter", "app": XllmApp}]


def load_ipython_extension(ipython) -> None:
    """`%load_ext xllm_jupyter`: register the %%xllm magics."""
    from .magics import load_ipython_extension as _load

    _load(ipython)
