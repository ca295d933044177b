"""docs/http-api.md's route table names every route the servers serve, and no route they do not."""

from __future__ import annotations

import re
from pathlib import Path

from xllm_jupyter.server.routes import ROUTES

DOC = Path(__file__).resolve().parents[1] / "docs" / "http-api.md"


def _shape(path: str) -> str:
    """A route with its parameters as ``{}``: ``/v1/models/{}`` for the doc's ``{id}`` and the table's regex."""
    return re.sub(r"\{[^}]*\}", "{}", re.sub(r"\(\?P<\w+>[^)]*\)", "{}", path))


def test_the_route_table_names_every_route():
    table = re.findall(r"^\| [A-Z /]+ \| `([^`]+)` \|", DOC.read_text(), re.M)
    documented = {_shape(path) for path in table} - {"/playground"}  # the Jupyter extension's own route
    assert documented == {_shape(path) for path, _, _ in ROUTES}
