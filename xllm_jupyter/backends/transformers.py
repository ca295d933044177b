"""The HF transformers backend: loads safetensors or GGUF models on CPU or GPU.

Loading (weights placed on their device, a Modelfile's LoRA merged, out-of-memory
reported as such) and the pre-load memory estimate live here; the loaded model that
serves a continuous batch is ``hf_model.TransformersModel``. torch and transformers are
imported only when this module is (the registry imports it lazily), and ``available()``
still answers without them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from ..core import gc_freeze
from ..core.errors import EngineError, InvalidRequest, ModelLoadError
from .base import Backend, BackendOptions, ModelSpec
from .file_errors import file_errors
from .gguf_reader import fast_gguf_reads
from .load_lock import exclusive_load, release_during_gguf_reads
from .lora import merge_lora
from .quiet_loading import library_bars_off
from .tokenizer_files import load_tokenizer
from .memory_estimate import disk_bytes, gguf_expanded_bytes, kv_cache_bytes
from .torch_device import (
    is_out_of_memory,
    out_of_memory,
    pick_device,
    placement,
    release_memory,
)

try:  # the backend must stay importable (and say "unavailable") without torch/transformers
    import torch

    from .hf_compiled import StaticPlan, compile_wanted, static_layout_problem
    from .hf_model import EAGER_GPU_KV_TOKENS, TransformersModel
except ImportError:  # pragma: no cover - exercised only on machines without them
    torch = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _importable(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(n) is not None for n in names)
    except (ImportError, ValueError):
        return False


def gguf_location(path: Path) -> tuple[Path, str] | None:
    """(directory, file name) of the GGUF at ``path`` (a .gguf file, or a dir holding exactly one)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return path, found[0].name
    return None


class TransformersBackend(Backend):
    """Loads HF safetensors directories and GGUF files with transformers."""

    name = "transformers"

    def available(self) -> bool:
        """True when torch and transformers are installed."""
        return torch is not None and _importable("transformers")

    def supports(self, spec: ModelSpec) -> bool:
        """safetensors: an HF directory with config.json; gguf: a .gguf file (needs gguf + accelerate)."""
        path = Path(spec.path)
        if spec.format == "safetensors":
            return path.is_dir() and (path / "config.json").is_file()
        if spec.format == "gguf":
            return gguf_location(path) is not None and _importable("gguf", "accelerate")
        return False

    def import_libraries(self, spec: ModelSpec) -> bool:
        """Import transformers' loading, tokenizer and ``spec``'s model class (the bulk of a first load's objects:
        the engine freezes them, then loads the model unfrozen); False if something is missing or odd (the load
        itself reports it)."""
        if not self.available():
            return False
        try:
            import transformers.modeling_utils  # noqa: F401
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            if spec.format == "gguf" and _importable("gguf"):
                import gguf  # noqa: F401  (transformers imports it inside the load)
                import transformers.modeling_gguf_pytorch_utils  # noqa: F401
            if spec.format == "safetensors" and (Path(spec.path) / "config.json").is_file():
                with library_bars_off():
                    config = AutoConfig.from_pretrained(str(spec.path))
                AutoModelForCausalLM._model_mapping[type(config)]  # imports the architecture's module
        except Exception:  # (an unknown architecture, a damaged config: the load says what is wrong)
            log.debug("no imports ahead of loading %s", spec.name, exc_info=True)
        return True

    def cache_bytes_estimate(self, spec: ModelSpec) -> int:
        """What a load allocates beyond its files: a GGUF's weights dequantized (files hold 4-8 bit values),
        and the compiled path's slot cache, allocated whole at load. An eager KV cache grows with use instead
        (the budget sees it once loaded)."""
        if not self.available():
            return 0
        try:
            opts = spec.options
            device = pick_device(opts.device)
            dtype = _pick_dtype(opts.dtype, device)
            element = torch.empty((), dtype=dtype).element_size()
            extra = 0
            located = gguf_location(Path(spec.path)) if spec.format == "gguf" else None
            if located is not None:
                path = located[0] / located[1]
                extra += max(0, gguf_expanded_bytes(path, element) - disk_bytes(path))
            if spec.format == "safetensors" and compile_wanted(opts, spec.format, device, dtype):
                config = json.loads((Path(spec.path) / "config.json").read_text(encoding="utf-8"))
                text = config.get("text_config") or config
                slots = max(1, opts.max_batch_size or 16)
                context = int(spec.context_length or text.get("max_position_embeddings") or 2048)
                tokens = slots * StaticPlan.from_options(opts).slot_tokens(context, slots)
                extra += kv_cache_bytes(config, tokens, (element * 8, element * 8))
            return extra
        except Exception:  # an estimate: the load itself reports what is wrong
            log.debug("no memory estimate for %s", spec.name, exc_info=True)
            return 0

    def load(self, spec: ModelSpec) -> "TransformersModel":
        """Load weights and tokenizer; slow, so the engine calls it off the IOLoop."""
        if not self.available():
            raise EngineError("The transformers backend needs torch and transformers installed")
        if not self.supports(spec):
            raise InvalidRequest(f"The transformers backend cannot load '{spec.name}' ({spec.format})", param="model")
        from transformers import AutoModelForCausalLM

        opts = spec.options
        device = pick_device(opts.device)
        dtype = _pick_dtype(opts.dtype, device)
        threads = opts.torch_threads
        if threads > 0:
            torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {}
        directory = Path(spec.path)
        if spec.format == "gguf":
            directory, kwargs["gguf_file"] = gguf_location(directory)  # type: ignore[misc]
            release_during_gguf_reads()  # its dequantizing lets other loads run (load_lock.py)
            fast_gguf_reads()
        merge = opts.merge_adapter  # a created model's Modelfile ADAPTER: baked into its own weights
        failed = None
        try:
            with library_bars_off():
                tokenizer = load_tokenizer(directory, **kwargs)  # (not transformers' own: tokenizer_files.py says why)
                # a GGUF's tensors are read and converted in Python, objects that set off full collections
                # (23 of 0.03-0.49 s, GIL held, for SmolLM2's): held off until one at the end
                # (load_lock.py: a load patches transformers and torch process-wide; one at a time)
                with exclusive_load(), (gc_freeze.one_collection(freeze_after=False) if spec.format == "gguf"
                                        else contextlib.nullcontext()):
                    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                                 **placement(device, moved_later=bool(merge)), **kwargs)
            if merge:
                with exclusive_load():
                    model = merge_lora(model, Path(merge))
            model.to(device).eval()
        except file_errors() as exc:  # (torch's OutOfMemoryError is a RuntimeError)
            if not is_out_of_memory(exc):
                # transformers' messages name local paths; keep them in the chained cause (logs) only
                raise ModelLoadError.of(spec.name, "transformers", exc, spec.created_from) from exc
            failed = "its weights"
        if failed is None:
            try:
                return self._serving(spec, opts, model, tokenizer, device, dtype)
            except RuntimeError as exc:  # the slot cache is allocated whole, at load
                if not is_out_of_memory(exc):
                    raise
                failed = "the static KV cache"
        # here, not in the except clauses: the error's frames hold the partial model until they are gone
        model = None
        release_memory()
        raise out_of_memory(spec.name, device, failed)

    @staticmethod
    def _serving(spec: ModelSpec, opts: BackendOptions, model: Any, tokenizer: Any, device: Any,
                 dtype: Any) -> "TransformersModel":
        """The loaded weights as a servable model: compiled (static slot cache) where wanted, else eager."""
        static = None
        if compile_wanted(opts, spec.format, device, dtype):
            problem = static_layout_problem(model)
            if problem is None:
                static = StaticPlan.from_options(opts)
            else:
                log.warning("%s: compiled decoding does not support %s; decoding eagerly", spec.name, problem)
        # eager decoding grows its KV cache with the batch: engine.cache_tokens bounds what its jobs may claim
        kv_tokens = opts.cache_tokens or (EAGER_GPU_KV_TOKENS if device.type == "cuda" else 0)
        # the engine's step thread compiles it (``warm_up``) before its first request
        return TransformersModel(spec, model, tokenizer, device=device,
                                 max_batch_size=opts.max_batch_size or 16, static=static,
                                 kv_tokens=None if static is not None else kv_tokens or None)


def _pick_dtype(name: str, device: "torch.device") -> "torch.dtype":
    if name == "auto":
        if device.type == "cuda":
            # native bf16 only (compute capability 8+): torch's check counts emulation by default, which
            # would pick a slow emulated bf16 on a T4 or V100
            with torch.cuda.device(device):
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise InvalidRequest(f"Unknown dtype '{name}' (use auto, float32, float16 or bfloat16)", param="dtype")
    return getattr(torch, DTYPES[name])
