"""Display helpers the front-ends share (the CLI and the magics both import client/)."""

from __future__ import annotations

from typing import Any


def human_size(n: Any) -> str:
    """Bytes as a short human string (``135.2 MB``); "-" when unknown (None, negative, not a number)."""
    if not isinstance(n, (int, float)) or n < 0:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
