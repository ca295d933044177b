"""GGUF helpers: read a GGUF's metadata, and convert a GGUF model to HF safetensors once.

transformers loads a GGUF by dequantizing it (tens of seconds); the converted directory
loads in about a second. torch and transformers are imported only when converting.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..backends.gguf_reader import fast_gguf_reads, read_gguf
from ..backends.load_lock import exclusive_load, release_during_gguf_reads
from ..backends.quiet_loading import library_bars_off
from ..core.errors import StoreError
from .progress import ProgressFn, PullProgress

log = logging.getLogger(__name__)

#: a conversion reports these steps: tokenizer read, weights read, model saved
CONVERT_STEPS = 3

# general.file_type -> the dtype the dense weights are saved in (quantized types -> bfloat16)
_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


def gguf_metadata(path: Path, keys: tuple[str, ...] = ("general.architecture", "general.file_type", "tokenizer.chat_template")) -> dict[str, Any]:
    """Selected scalar/string metadata of a GGUF file (missing keys left out); StoreError if unreadable."""
    try:
        from gguf import GGUFValueType

        reader = read_gguf(path)
    except Exception as exc:  # gguf raises ValueError/struct.error/... on a damaged file
        raise StoreError(f"Not a readable GGUF file ({exc.__class__.__name__})") from None
    out: dict[str, Any] = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None or not field.data or not field.types:
            continue
        value = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            out[key] = bytes(value).decode("utf-8", errors="replace")
        elif len(field.types) == 1:
            out[key] = value.tolist()[0] if hasattr(value, "tolist") else value
    return out


def gguf_chat_template(path: Path) -> str | None:
    """The chat template stored in a GGUF (``tokenizer.chat_template``), if any."""
    return gguf_metadata(path, ("tokenizer.chat_template",)).get("tokenizer.chat_template")


def gguf_to_safetensors(gguf_path: Path, out_dir: Path, *, progress: ProgressFn | None = None) -> str | None:
    """Write an HF model directory (config, safetensors, tokenizer, chat template) from a GGUF.

    Returns the chat template. The weights are dequantized once here; quantized GGUFs are
    saved in bfloat16, float GGUFs keep their float type.
    """
    def report(done: int) -> None:
        if progress is not None:
            progress(PullProgress("convert", gguf_path.name, done, CONVERT_STEPS, unit="steps"))

    with library_bars_off():  # the caller's own progress (PullProgress) says how far it got
        return _convert(gguf_path, out_dir, report)


def _convert(gguf_path: Path, out_dir: Path, report: Callable[[int], None]) -> str | None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = gguf_metadata(gguf_path)
    dtype = getattr(torch, _FILE_TYPE_DTYPE.get(int(meta.get("general.file_type", -1)), "bfloat16"))
    src, name = str(gguf_path.parent), gguf_path.name
    report(0)
    fast_gguf_reads()  # transformers reads the file three times more: tokenizer, config, weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        report(1)
        kwargs: dict[str, Any] = {}
        try:  # transformers >= 5 can keep GGUF blocks packed; we want plain dense weights to save
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
        except ImportError:  # older transformers always dequantizes
            pass
        release_during_gguf_reads()  # (the dequantizing itself needs no lock: other models load meanwhile)
        with exclusive_load():  # a load patches transformers and torch process-wide (backends/load_lock.py)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("GGUF conversion of %s failed: %s", name, exc)
        raise StoreError(f"Could not convert the GGUF model ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    report(2)
    # save_pretrained refuses models that carry a non-serializable (GGUF) quantizer; the weights
    # are dense now, so the quantizer and its config entry are stale and can be dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    except OSError:
        raise  # the pull says what it was (a full disk: "Not enough disk space"), without paths
    except Exception as exc:
        raise _save_error(exc) from None
    template = getattr(tokenizer, "chat_template", None) or meta.get("tokenizer.chat_template")
    if template and not (out_dir / "chat_template.jinja").exists() and "chat_template" not in _tokenizer_config(out_dir):
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    del model
    report(CONVERT_STEPS)
    return template if isinstance(template, str) else None


def _save_error(exc: Exception) -> Exception:
    """What a failed save of the converted model raises: safetensors' writer reports a file system error (a full
    disk) as a SafetensorError naming the OS error ("... (os error 28)"), which is that OSError again, so the pull
    translates it as it does its own; anything else is a StoreError naming the error's type."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is not None:
        number = int(found.group(1))
        return OSError(number, os.strerror(number))
    log.warning("saving the converted GGUF model failed: %s", exc)
    return StoreError(f"Could not save the converted GGUF model ({exc.__class__.__name__})")


def _tokenizer_config(out_dir: Path) -> dict:
    import json

    path = out_dir / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
