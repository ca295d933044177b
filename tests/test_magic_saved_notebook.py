"""What a saved notebook keeps of ``%xllm pull``: executed by nbclient in a real kernel, written, read back."""

from __future__ import annotations

import os

import nbformat
import pytest

from tests.server_fixtures import TINY

WIDGET = "application/vnd.jupyter.widget-view+json"


def saved_outputs(tmp_path, server, sources: list[str]) -> list[list[dict]]:
    """Each cell's outputs, as the .ipynb an nbclient run of ``sources`` wrote holds them."""
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in ["%load_ext xllm_jupyter", *sources]])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLLM_", "JUPYTERHUB_"))}
    env.update(XLLM_BASE_URL=server.base_url, XLLM_API_KEY=server.api_key, OMP_NUM_THREADS="1",
               XLLM_HOME=str(tmp_path / "kernel-home"))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    return [cell.get("outputs", []) for cell in nbformat.read(path, as_version=4).cells[1:]]


def texts(outputs: list[dict]) -> list[str]:
    """The text/plain of each display and the text of each stream, in order."""
    return [o["text"] if o["output_type"] == "stream" else o["data"].get("text/plain", "") for o in outputs]


@pytest.mark.timeout(600)
def test_a_pull_leaves_its_final_line_not_a_bar_in_the_saved_notebook(xllm_server, tiny_llama_dir, tmp_path):
    """The bar was a widget output: closed on failure, the saved notebook still held it (a stale "HBox(...
    starting…)" where the widget cannot be drawn); on success, a bar whose state lives only in the kernel."""
    failed, pulled = saved_outputs(tmp_path, xllm_server, [f"%xllm pull {tmp_path / 'nothing-here'}",
                                                          f"%xllm pull {tiny_llama_dir} --name {TINY}"])
    for outputs in (failed, pulled):
        assert not [o for o in outputs if WIDGET in o.get("data", {})], outputs
        assert not [o for o in outputs if o["output_type"] == "error"], outputs
    assert texts(failed)[0] == f"pull {tmp_path / 'nothing-here'}: failed", failed
    assert [o["name"] for o in failed[1:]] == ["stderr"] and texts(failed)[1].startswith("xllm: "), failed
    assert len(pulled) == 1 and texts(pulled)[0].startswith(f"Pulled {TINY} (safetensors"), pulled
