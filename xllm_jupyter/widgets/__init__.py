"""ipywidgets front-ends on the shared engine: ``ChatWidget``, ``ProfileWidget``, ``CompareWidget``.

Each is a plain ``ipywidgets.VBox``: it renders in JupyterLab, Notebook 7 and VS Code
with no extra front-end extension. Streaming runs on a private asyncio loop on a
background thread, so the kernel stays responsive and a Stop button can cancel.
"""

from __future__ import annotations

from .chat import ChatWidget
from .compare import CompareWidget
from .profile import ProfileWidget

__all__ = ["ChatWidget", "CompareWidget", "ProfileWidget"]
