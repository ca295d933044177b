"""Which backends exist and how one is chosen for a model.

Backends are imported lazily so `import xllm_jupyter` works without GPU libraries.
Automatic order: exllamav3, then exllamav2, then transformers, filtered by what is
importable and what the model's format needs; with ``engine.compile: on`` FP16/BF16
safetensors models try transformers (compiled static-cache decode) first (``COMPILED_FIRST``).
"""

from __future__ import annotations

import importlib
import importlib.util

from ..core.errors import EngineError, InvalidRequest
from .base import Backend, BackendOptions, ModelSpec
from .native_libs import preload_torch

#: registry name -> "module:Class", in automatic-selection order
BACKENDS: dict[str, str] = {
    "exllamav3": "xllm_jupyter.backends.exllamav3:ExllamaV3Backend",
    "exllamav2": "xllm_jupyter.backends.exllamav2:ExllamaV2Backend",
    "transformers": "xllm_jupyter.backends.transformers:TransformersBackend",
}
AUTO_ORDER: tuple[str, ...] = ("exllamav3", "exllamav2", "transformers")
#: The order for FP16/BF16 safetensors chat models when the transformers backend would decode
#: them with its compiled static-cache path (hf_compiled.py). On an H100 with a 1.2B Llama at
#: one stream, HF's own static-cache generate with torch.compile (CUDA graphs) took ~3.2 ms/token
#: vs ~11 ms/token for exllamav3 on FP16 weights (91 tok/s; it captures CUDA graphs only for
#: EXL3-quantized weights), while exllamav3 batches FP16 better at many streams (2,826 tok/s at
#: 64). Our compiled path has not been measured on a GPU yet, so only ``engine.compile: on``
#: reorders; ``auto`` keeps the measured exllamav3 path first (docs/gpu.md). EXL3/EXL2/GPTQ
#: models never match this rule.
COMPILED_FIRST: tuple[str, ...] = ("transformers", "exllamav3", "exllamav2")
#: engine.compile values; YAML reads unquoted on/off as booleans, which arrive as "True"/"False"
COMPILE_SETTINGS = {"auto": "auto", "on": "on", "off": "off", "true": "on", "false": "off"}


def compile_setting(options: BackendOptions) -> str:
    """The ``compile`` option as auto, on or off (EngineError names a bad value)."""
    value = options.compile
    if isinstance(value, bool):
        return "on" if value else "off"
    setting = COMPILE_SETTINGS.get(str(value or "auto").strip().lower())
    if setting is None:
        raise EngineError(f"engine.compile must be auto, on or off (got '{value}')")
    return setting


def compile_auto(device_type: str, dtype: str, fmt: str) -> bool:
    """What compile ``auto`` means: CUDA, fp16/bf16 weights from safetensors, Triton installed.

    That is where the compiled path was measured to pay off; on CPU inductor's C++ code
    is not worth its compile time for the sizes served here.
    """
    return (device_type == "cuda" and dtype in ("float16", "bfloat16") and fmt == "safetensors"
            and importlib.util.find_spec("triton") is not None)


def auto_order(spec: ModelSpec) -> tuple[str, ...]:
    """Backends to try for ``spec``, best first."""
    if spec.task == "chat" and spec.format == "safetensors" and compile_setting(spec.options) == "on":
        return COMPILED_FIRST
    return AUTO_ORDER


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    target = BACKENDS.get(name)
    if target is None:
        raise InvalidRequest(f"Unknown backend '{name}' (known: {', '.join(BACKENDS)})", param="backend")
    module, cls = target.split(":")
    preload_torch()  # every backend module imports torch: its native libraries first, the GIL released
    return getattr(importlib.import_module(module), cls)()


def select_backend(spec: ModelSpec) -> Backend:
    """The backend for ``spec``: the one it names, else the first available that supports it."""
    if spec.backend:
        backend = get_backend(spec.backend)
        if not backend.available():
            raise InvalidRequest(f"Backend '{spec.backend}' is not installed on this machine", param="backend")
        if not backend.supports(spec):
            if backend.memory_device(spec) == "cuda" and spec.options.device.lower() == "cpu":
                raise InvalidRequest(f"Backend '{spec.backend}' needs a CUDA GPU, but engine.device is cpu",
                                     param="backend")
            raise InvalidRequest(f"Backend '{spec.backend}' cannot load {spec.format} models", param="backend")
        return backend
    for name in auto_order(spec):
        if name not in BACKENDS:
            continue
        backend = get_backend(name)
        if backend.available() and backend.supports(spec):
            return backend
    raise InvalidRequest(f"No installed backend can load {spec.format} models", param="model")
