"""Which backends exist and how one is chosen for a model.

Backends are imported lazily so `import xllm_jupyter` works without GPU libraries.
Automatic order: exllamav3, then exllamav2, then transformers, filtered by what is
importable and what the model's format needs.
"""

from __future__ import annotations

import importlib

from ..core.errors import InvalidRequest
from .base import Backend, ModelSpec

#: registry name -> "module:Class", in automatic-selection order
BACKENDS: dict[str, str] = {
    "exllamav3": "xllm_jupyter.backends.exllamav3:ExllamaV3Backend",
    "exllamav2": "xllm_jupyter.backends.exllamav2:ExllamaV2Backend",
    "transformers": "xllm_jupyter.backends.transformers:TransformersBackend",
}
AUTO_ORDER: tuple[str, ...] = ("exllamav3", "exllamav2", "transformers")


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    target = BACKENDS.get(name)
    if target is None:
        raise InvalidRequest(f"Unknown backend '{name}' (known: {', '.join(BACKENDS)})", param="backend")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def select_backend(spec: ModelSpec) -> Backend:
    """The backend for ``spec``: the one it names, else the first available that supports it."""
    if spec.backend:
        backend = get_backend(spec.backend)
        if not backend.available():
            raise InvalidRequest(f"Backend '{spec.backend}' is not installed on this machine", param="backend")
        if not backend.supports(spec):
            raise InvalidRequest(f"Backend '{spec.backend}' cannot load {spec.format} models", param="backend")
        return backend
    for name in AUTO_ORDER:
        if name not in BACKENDS:
            continue
        backend = get_backend(name)
        if backend.available() and backend.supports(spec):
            return backend
    raise InvalidRequest(f"No installed backend can load {spec.format} models", param="model")
