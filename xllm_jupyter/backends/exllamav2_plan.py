"""How exllamav2 sizes a model (context, RoPE tables, KV cache), told from config.json without importing it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .exllama_common import PAGE_SIZE, ExllamaOptions


def round_to_pages(tokens: int) -> int:
    """``tokens`` rounded up to whole pages: exllamav2's cache and prefill chunks come in pages."""
    return -(-int(tokens) // PAGE_SIZE) * PAGE_SIZE


#: exllamav2's RoPE methods whose frequencies it derives from ``max_seq_len`` itself (``rope.py``: YaRN's
#: correction range and when it starts, su/longrope's long or short factors), not only the tables' length
LENGTH_DEPENDENT_ROPE = ("su", "yarn")
#: architectures exllamav2 gives a learned position table (``architecture.py``: ``learned_pos_emb``); its load
#: refuses a ``max_seq_len`` past the table's rows (``pos_embedding.py``)
LEARNED_POSITIONS = ("GPT2LMHeadModel", "GPTBigCodeForCausalLM")


@dataclass(frozen=True)
class CachePlan:
    """How a model is sized on exllamav2: the context we serve, the model's ``max_seq_len`` (its RoPE tables,
    and the whole cache when unpaged) and the cache's tokens."""

    context: int
    seq_len: int
    cache_tokens: int


def plan_cache(opts: ExllamaOptions, model_context: int, *, paged: bool, window: int,
               length_fixed: bool = False) -> CachePlan:
    """The context, ``max_seq_len`` and cache for ``opts`` such that a job that fills the context gets every
    token it asks for, with ``window`` draft tokens per step (0 when not drafting).

    exllamav2 0.3.2 ends a drafting job once ``new_tokens >= max_new_tokens - num_draft_tokens``
    (``receive_sample``), so a job of P prompt and T answer tokens is given ``max_new_tokens`` T + window,
    and ``prepare_for_queue`` takes pages for P + T + window tokens: the cache must hold the context and the
    window (unpaged, the one page is the whole ``max_seq_len``). Its last step feeds its last token and a
    window of drafts, at positions up to P + T + window - 2 (the draft model's loop writes the same ones):
    the RoPE tables (``max_seq_len`` long) must reach the context and window - 1 more. Without a window all
    of this is one context, as before. A configured ``cache_tokens`` bounds the context and the window
    (``serving_context``). ``length_fixed``: ``max_seq_len`` may not grow for the window (YaRN and su
    scaling derive their frequencies from it; a learned position table has only the model's rows), so it
    stays what it is without drafting and the context served is shorter by the window instead.
    """
    past = window if not paged else max(window - 1, 0)  # tokens the last step reaches past the context
    context = opts.serving_context(model_context, window)
    if length_fixed:
        seq_len = round_to_pages(opts.serving_context(model_context))
        context = max(1, min(context, seq_len - past))
    else:
        seq_len = round_to_pages(context + past)
    return CachePlan(context, seq_len, opts.cache_size(context, window) if paged else seq_len)


#: where exllamav2 0.3.2 reads a model's context (``ExLlamaV2Config``: the first found, then under text_config)
_SEQ_LEN_KEYS = ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions")


def estimated_cache_tokens(opts: ExllamaOptions, config: Mapping[str, Any], window: int) -> int:
    """The cache tokens a load of the model with this ``config.json`` allocates (``plan_cache``), told without
    importing exllamav2 (that may compile its kernels; the estimate runs before any load)."""
    architecture = (config.get("architectures") or [None])[0]  # (exllamav2 reads the first, and only, one)
    fixed = rope_type(config) in ("su", "longrope", "yarn") or architecture in LEARNED_POSITIONS
    plan = plan_cache(opts, config_seq_len(config), paged=runs_paged(config), window=window, length_fixed=fixed)
    return plan.cache_tokens


def config_seq_len(config: Mapping[str, Any]) -> int:
    """The context exllamav2 reads from ``config.json`` (2,048 when it names none, as exllamav2 assumes)."""
    for scope in (config, config.get("text_config") or {}):
        for key in _SEQ_LEN_KEYS:
            if scope.get(key) is not None:
                return int(scope[key])
    return 2048


def rope_type(config: Mapping[str, Any]) -> str:
    """The RoPE scaling type of ``config.json`` as exllamav2 (and ``apply_rope_parameters``) read it."""
    for key in ("rope_scaling", "rope_parameters"):
        for scope in (config, config.get("text_config") or {}):
            params = scope.get(key)
            if isinstance(params, dict):
                if key == "rope_parameters" and isinstance(params.get("full_attention"), dict):
                    params = params["full_attention"]
                return str(params.get("type") or params.get("rope_type") or "default")
    return "default"


def runs_paged(config: Mapping[str, Any]) -> bool:
    """Whether exllamav2 would run the model with this ``config.json`` paged, told without importing it.

    Its own tests (``attn.py`` at import, ``ExLlamaV2Config.arch_compat_overrides``): flash-attn 2.5.7 or
    later with its CUDA module, not switched off by ``EXLLAMA_NO_FLASH_ATTN``, and for a model that caps its
    attention logits (Gemma 2) a flash-attn with softcapping (2.6). Once exllamav2 is imported, its flags.
    """
    softcap = bool(config.get("attn_logit_softcapping"))  # (exllamav2 reads it at the top level only)
    attn = sys.modules.get("exllamav2.attn")
    if attn is not None:
        return bool(getattr(attn, "has_flash_attn_with_paged", False)) and not (
            softcap and not getattr(attn, "has_flash_attn_with_softcap", False))
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ:
        return False
    try:
        if importlib.util.find_spec("flash_attn_2_cuda") is None:
            return False
    except (ImportError, ValueError):
        return False
    version = flash_attn_version()
    return version >= (2, 5, 7) and not (softcap and version < (2, 6, 0))


def flash_attn_version() -> tuple[int, ...]:
    """The installed flash-attn's version, as exllamav2 compares it (its numeric parts), without importing it;
    () when it is not installed."""
    text = None
    try:
        spec = importlib.util.find_spec("flash_attn")
        if spec is not None and spec.origin:
            found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""",
                              Path(spec.origin).read_text(encoding="utf-8"), re.MULTILINE)
            text = found.group(1) if found else None
        if text is None and spec is not None:
            text = importlib.metadata.version("flash_attn")
    except (ImportError, ValueError, OSError, importlib.metadata.PackageNotFoundError):
        pass
    return tuple(int(t) for t in (text or "").split(".") if t.isdigit())
