"""``xllm cp`` of a model made with a Modelfile ``ADAPTER``: a copy keeps the adapter its source was made with,
whatever the adapter's name or directory holds now (the restated ``ADAPTER`` line is the source's, not a new one)."""

from __future__ import annotations

import logging

import pytest

from tests.server_fixtures import TINY
from tests.test_cli_ux import home, invoke  # noqa: F401 - ``home`` is a fixture
from tests.test_lora import _make_adapter
from xllm_jupyter.store.store import ModelStore


@pytest.fixture
def merged(home, tiny_llama_dir, tmp_path):  # noqa: F811 - the fixture imported above
    """A store with "merged": tiny + the stored adapter "ad" (seed 1), then "ad" replaced by another LoRA (seed 2)."""
    store = ModelStore(home)
    store.pull(str(_make_adapter(tiny_llama_dir, tmp_path / "one", seed=1)), "ad", base=TINY)
    store.create("merged", f"FROM {TINY}\nADAPTER ad\n")
    store.pull(str(_make_adapter(tiny_llama_dir, tmp_path / "two", seed=2)), "ad", base=TINY, force=True)
    return store


def _adapter_files(store: ModelStore, name: str) -> dict[str, str]:
    return {f.path: f.sha256 for f in store.show(name).files if f.path.startswith("adapter/")}


def test_cp_keeps_the_adapter_the_source_was_made_with(merged):
    result = invoke("cp", "merged", "copy")
    assert result.exit_code == 0, result.output
    assert merged.show("copy").digest == merged.show("merged").digest  # the same weights, not the new "ad"'s
    assert _adapter_files(merged, "copy") == _adapter_files(merged, "merged")
    assert "recorded but not applied" not in result.output


def test_cp_after_the_adapter_was_removed(merged, caplog):
    assert invoke("rm", "-y", "ad").exit_code == 0
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.store.create"):
        result = invoke("cp", "merged", "copy")
    assert result.exit_code == 0, result.output
    assert merged.show("copy").digest == merged.show("merged").digest
    # the copy serves base+adapter as its source does: no warning that the adapter is not applied
    assert "recorded but not applied" not in caplog.text
    assert merged.show("copy").parameters.get("adapter") == "adapter"


def test_a_new_adapter_line_still_replaces_the_inherited_one(merged, tmp_path):
    # `xllm show merged --modelfile`, edited and created again (Ollama's way to change a model's settings): the
    # restated ADAPTER is the one merged was made with, not what "ad" holds now
    merged.create("other", "FROM merged\nADAPTER ad\nSYSTEM hi\n")
    assert _adapter_files(merged, "other") == _adapter_files(merged, "merged")
    # naming another adapter takes that one's files
    merged.pull(str(tmp_path / "two"), "ad2", base=TINY)
    merged.create("other2", "FROM merged\nADAPTER ad2\n")
    assert _adapter_files(merged, "other2") != _adapter_files(merged, "merged")
