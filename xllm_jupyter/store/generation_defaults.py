"""Sampling defaults a model's authors ship in ``generation_config.json``.

Hub models carry their recommended sampling there (Qwen2.5-Instruct: temperature 0.7,
top_p 0.8, top_k 20, repetition_penalty 1.05); transformers applies it in ``generate``
and vLLM applies it to requests that leave those fields unset, so a model served here
answers as it does elsewhere. The values become defaults under Ollama's parameter names,
below a Modelfile's PARAMETER lines and below anything a request sets.

``do_sample`` is not consulted (as vLLM does not): the OpenAI API has no such switch,
and a request's own ``temperature: 0`` is how a caller asks for greedy decoding.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

FILENAME = "generation_config.json"


def _number(low: float, high: float, *, open_low: bool = False) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if value < low or value > high or (open_low and value == low):
            return None
        return float(value)

    return check


def _top_k(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= -1 else None  # -1: off (vLLM's)


#: generation_config key -> (Ollama parameter name, check); bounds are the API's, so a default never
#: makes a request that would be refused had the caller sent it (OpenAI's temperature stops at 2)
_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "temperature": ("temperature", _number(0.0, 2.0)),
    "top_p": ("top_p", _number(0.0, 1.0, open_low=True)),
    "top_k": ("top_k", _top_k),
    "min_p": ("min_p", _number(0.0, 1.0)),
    "repetition_penalty": ("repeat_penalty", _number(0.0, 100.0, open_low=True)),
}


def sampling_defaults(model_dir: Path | None) -> dict[str, Any]:
    """The sampling defaults in ``model_dir/generation_config.json`` (Ollama names); {} when none.

    A missing or unreadable file, or a value out of the API's range, is skipped (logged):
    defaults are a convenience and never keep a model from loading.
    """
    if model_dir is None or not model_dir.is_dir():
        return {}
    path = model_dir / FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s of %s: %s", FILENAME, model_dir.name, exc.__class__.__name__)
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, (name, check) in _KEYS.items():
        if key not in data or data[key] is None:
            continue
        value = check(data[key])
        if value is None:
            log.warning("ignoring %s=%r in %s of %s: out of range", key, data[key], FILENAME, model_dir.name)
            continue
        out[name] = value
    return out


def write_sampling(model_dir: Path, sampling: Mapping[str, Any]) -> None:
    """Merge ``sampling`` (generation_config keys) into ``model_dir/generation_config.json``.

    Used for packaged models whose authors recommend sampling only in prose (a model card),
    so the converted directory carries it as a Hub model would. Call before hashing the files.
    """
    if not sampling:
        return
    path = model_dir / FILENAME
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(sampling)
    data["do_sample"] = True  # what transformers needs to honour the values (it warns otherwise)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
