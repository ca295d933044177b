"""Small helpers several test modules share (kept here so there is one copy of each)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now (for "no server there" checks and subprocess servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dirs_in(path: Path) -> list[str]:
    """The names of the folders directly in ``path``, sorted ([] when ``path`` is no folder)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
