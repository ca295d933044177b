"""xllm-jupyter: one shared local LLM engine for many notebooks, behind an OpenAI-compatible API."""

from __future__ import annotations

__version__ = "0.1.0"

# The notebook-facing API, imported on first use so `import xllm_jupyter` stays light
# (no ipywidgets, pandas, matplotlib or gradio until someone asks for them).
_LAZY_EXPORTS: dict[str, tuple[str, str]] = {
    "chat": ("xllm_jupyter.notebook.api", "chat"),
    "profile": ("xllm_jupyter.notebook.profile", "profile"),
    "compare": ("xllm_jupyter.notebook.compare", "compare"),
    "connect": ("xllm_jupyter.client.discovery", "connect"),
    "playground": ("xllm_jupyter.playground", "playground"),
    "ChatWidget": ("xllm_jupyter.widgets", "ChatWidget"),
    "ProfileWidget": ("xllm_jupyter.widgets", "ProfileWidget"),
    "CompareWidget": ("xllm_jupyter.widgets", "CompareWidget"),
}


def __getattr__(name: str):
    """Resolve the lazily exported notebook API (``xllm_jupyter.chat`` etc.) on first access."""
    target = _LAZY_EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'xllm_jupyter' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def _jupyter_server_extension_points() -> list[dict]:
    """Tell jupyter_server where the extension app lives (imported lazily)."""
    from .extension.app import XllmApp

    return [{"module": "xllm_jupyter", "app": XllmApp}]


def _jupyter_labextension_paths() -> list[dict]:
    """Where JupyterLab finds the prebuilt side panel (also installed to share/jupyter/labextensions)."""
    return [{"src": "labextension", "dest": "@xllm/jupyterlab"}]


def load_ipython_extension(ipython) -> None:
    """`%load_ext xllm_jupyter`: register the %%xllm magics."""
    from .magics import load_ipython_extension as _load

    _load(ipython)
