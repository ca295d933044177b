"""Gradio chat playground for the shared engine: ``xllm_jupyter.playground()``."""

from __future__ import annotations

import sys
import types
from typing import Any

from .launcher import Playground, detect_root_path, launch

__all__ = ["Playground", "detect_root_path", "playground"]

#: the playgrounds ``playground()`` started in this process (kernel), closed ones pruned
_started: list[Playground] = []


def playground(
    model: str | None = None,
    *,
    client: Any | None = None,
    port: int | None = None,
    root_path: str | None = None,
    inline: bool = True,
    share: bool = False,
    replace: bool = True,
    **options: Any,
) -> Playground:
    """Start a Gradio chat app (model picker, parameters, streaming) against the shared engine.

    ``client`` is an ``XllmClient``/``AsyncXllmClient`` (default: the engine discovery
    finds, i.e. ``XLLM_BASE_URL``/``XLLM_API_KEY`` in a Jupyter kernel). ``port`` defaults
    to the first free one from 7860. ``root_path`` is the public prefix when served behind
    a proxy; by default it is detected for jupyter-server-proxy inside JupyterHub. The
    app answers only under a random secret path, which ``url``/``local_url`` carry: whoever
    has them can chat as you. The returned ``Playground`` shows itself inline (an iframe)
    as a cell's result; ``close()`` stops it and frees the port. Extra ``options``:
    ``host``, ``height``, ``allowed_hosts`` (more Host names to accept, e.g. a port
    forwarder's), ``params`` (more chat parameters every question carries, after the
    app's settings, as ChatWidget's ``params``: ``stop``, ``chat_template_kwargs``...).

    Re-running the cell replaces the app: with ``replace=True`` (the default) the playgrounds
    this kernel started before are closed (and a line says so) once the new call's
    arguments check out, and the new one reuses the freed port; ``replace=False`` keeps
    them running side by side.
    """
    _started[:] = [p for p in _started if not p.closed]
    started = launch(
        model,
        client=client,
        port=port,
        root_path=root_path,
        inline=inline,
        share=share,
        replaces=list(_started) if replace else (),
        **options,
    )
    _started.append(started)
    return started


class _CallablePackage(types.ModuleType):
    """Lets ``xllm_jupyter.playground(...)`` work even after the package itself was imported.

    Importing ``xllm_jupyter.playground`` binds the package (not the function) to that
    attribute of ``xllm_jupyter``; making the package callable keeps both spellings working.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Playground:
        return playground(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
