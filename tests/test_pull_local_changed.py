"""``xllm pull PATH`` again after the directory (or .gguf) at PATH changed — a retrain saved to the same place —
stores the new files, as a Hub pull whose commit moved does and as ``xllm create FROM PATH`` does; it said
"Pulled" and kept the old copy, so the edit never reached the store without ``--force``."""

from __future__ import annotations

import json
import shutil

from tests.test_cli_ux import invoke
from xllm_jupyter.store.store import ModelStore


def test_a_pull_of_a_changed_directory_updates_the_stored_copy(tmp_path, tiny_llama_dir, monkeypatch):
    src = tmp_path / "out"
    shutil.copytree(tiny_llama_dir, src)
    store = ModelStore(tmp_path / "home")
    first = store.pull(str(src), "mine")
    assert store.pull(str(src), "mine") == first  # unchanged: the stored copy, not pulled again
    config = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.25}))  # a retrain's save
    second = store.pull(str(src), "mine")
    assert second.digest != first.digest
    assert json.loads((second.path / "generation_config.json").read_text())["temperature"] == 0.25
    assert store.verify("mine")
    # the CLI says what it stored
    (src / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.5}))
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    result = invoke("pull", str(src), "--name", "mine")
    assert result.exit_code == 0, result.output
    assert json.loads((store.show("mine").path / "generation_config.json").read_text())["temperature"] == 0.5
