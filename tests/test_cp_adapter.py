"""``xllm cp`` of a model made with a Modelfile ``ADAPTER``: a copy keeps the adapter its source was made with,
whatever the adapter's name or directory holds now; ``create`` from a Modelfile naming an adapter takes it as it is."""

from __future__ import annotations

import logging

import pytest

from tests.server_fixtures import TINY
from tests.test_cli_ux import home, invoke  # noqa: F401 - ``home`` is a fixture
from tests.test_lora import _make_adapter
from xllm_jupyter.store.create import modelfile_of
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
    assert modelfile_of(merged.show("copy")).adapters == ["ad"]  # the settings recorded as the source's


def test_cp_after_the_adapter_was_removed(merged, caplog):
    assert invoke("rm", "-y", "ad").exit_code == 0
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.store.create"):
        result = invoke("cp", "merged", "copy")
    assert result.exit_code == 0, result.output
    assert merged.show("copy").digest == merged.show("merged").digest
    # the copy serves base+adapter as its source does: no warning that the adapter is not applied
    assert "recorded but not applied" not in caplog.text
    assert merged.show("copy").parameters.get("adapter") == "adapter"


def test_create_again_with_the_same_adapter_line_takes_the_adapter_as_it_is_now(merged):
    # Ollama's way to change a model in place: `xllm create merged -f Modelfile` after retraining the adapter the
    # Modelfile names (here: "ad", replaced by the fixture) takes the new adapter, as a first create would
    before = _adapter_files(merged, "merged")
    merged.create("merged", "FROM merged\nADAPTER ad\nSYSTEM hi\n")
    assert _adapter_files(merged, "merged") != before
