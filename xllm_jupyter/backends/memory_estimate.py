"""Pre-load memory estimates: what a model will take before it is loaded, from its files and config.

The engine's memory budget decides what to evict (or refuses a load) from these numbers, so
each must be cheap (no weights read) and must never raise: a wrong guess costs a retry, a
crash costs the request.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


def disk_bytes(path: Path) -> int:
    """The size of a model's files: the pre-load estimate of its memory footprint."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def kv_cache_bytes(config: Mapping[str, Any], tokens: int, bits: tuple[int, int] | None) -> int:
    """Bytes of a K/V cache of ``tokens`` for a model with this ``config.json`` (0 if its shape is not there).

    Per token and layer: key and value heads x head size x (key bits + value bits) / 8.
    """
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    k, v = bits or (16, 16)
    return tokens * layers * kv_heads * head_dim * (k + v) // 8


def gguf_expanded_bytes(path: Path, element_bytes: int) -> int:
    """Bytes a GGUF's tensors take once dequantized to ``element_bytes`` per value (transformers loads them
    that way: a 4-bit file grows about 4x in float16, 8x in float32); 0 when it cannot be read."""
    try:
        from .gguf_reader import read_gguf

        reader = read_gguf(path)
        return sum(int(t.n_elements) for t in reader.tensors) * element_bytes
    except Exception:  # an estimate: the load itself reports a broken file
        log.debug("could not read the tensor table of %s", path, exc_info=True)
        return 0
