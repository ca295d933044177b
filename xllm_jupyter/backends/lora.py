"""LoRA adapters on a loaded transformers model, mixed per row in one continuous batch.

peft injects every adapter's A/B matrices next to the base weights once; a forward
pass then takes ``adapter_names`` (one per batch row, ``"__base__"`` for rows without
an adapter) and each LoRA layer adds only the matching adapter's delta to each row
(peft's mixed-batch inference). So requests for several adapters and for the plain
base model share one batch and one KV cache. peft is imported only when the first
adapter is attached.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence

from ..core.errors import InvalidRequest, ModelLoadError, repair_advice
from .file_errors import file_errors

log = logging.getLogger(__name__)

#: peft's name for "no adapter on this row" in mixed-batch inference
BASE_ROW = "__base__"
#: the weights file peft saves an adapter in (the one whose damage is told from a misfit)
WEIGHTS = "adapter_model.safetensors"


def damaged_weights(label: str, exc: BaseException) -> ModelLoadError:
    """The error for adapter ``label`` (``"The adapter 'x'"``) whose weights file could not be read: it names the
    adapter and the error's type, never a path (the log has the details)."""
    log.warning("%s: its weights could not be read: %s", label, exc)
    return ModelLoadError(f"{label} could not be loaded: its weights are damaged ({type(exc).__name__}); "
                          f"{repair_advice()} (the server log has the details)")


def check_weights(label: str, path: Path) -> None:
    """Raise ``damaged_weights`` when the adapter's safetensors file at ``path`` cannot be opened (its header read
    and checked against the file's size: no tensor is read). peft's own read of such a file raised the same errors
    as a LoRA that does not fit the base, and the adapter was said not to fit."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        return  # (an older .bin adapter: peft reads it, and its errors stay as they are)
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as opened:
            opened.keys()
    except Exception as exc:  # SafetensorError (an Exception), OSError: a file cut short or with a damaged header
        raise damaged_weights(label, exc) from None


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The adapter_config.json of a peft LoRA directory; InvalidRequest when it is not one."""
    try:
        data = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InvalidRequest("The adapter is not a peft LoRA directory (no readable adapter_config.json)",
                             param="model") from None
    if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
        raise InvalidRequest("Only peft LoRA adapters are supported (peft_type LORA)", param="model")
    return data


def merge_lora(model: Any, path: Path) -> Any:
    """``model`` with the LoRA at ``path`` merged into its weights (no per-step adapter cost)."""
    read_adapter_config(path)
    check_weights("The model's ADAPTER", path)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False, torch_device=str(model.device))
        return peft_model.merge_and_unload()
    except file_errors() as exc:
        raise InvalidRequest(f"The model's ADAPTER does not fit its base model ({type(exc).__name__})",
                             param="model") from exc


class LoraAdapters:
    """The adapters attached to one model; ``lock`` keeps attach/detach out of a running step."""

    def __init__(self, model: Any, device: Any) -> None:
        self.model = model
        self.device = device
        self.lock = threading.Lock()
        self._peft: Any = None  # the PeftModel wrapping ``model`` once an adapter was attached
        self._keys: dict[str, str] = {}  # served name -> peft adapter name (module keys allow no dots)
        self._seq = itertools.count(1)
        self._rows: list[str] | None = None  # peft adapter names of the forward pass running now
        self._uniform: list[str] | None = None  # the pass's active adapters when every row shares them
        self._lora_layers: set[type] = set()  # peft LoRA layer classes hooked (they take an active adapter)
        self._hooked: set[int] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def names(self) -> list[str]:
        """Served names of the attached adapters."""
        return list(self._keys)

    def attach(self, name: str, path: Path) -> None:
        """Load the LoRA at ``path`` as adapter ``name`` (replacing one of that name); caller holds ``lock``."""
        read_adapter_config(path)
        check_weights(f"The adapter '{name}'", path)
        from peft import PeftModel

        if name in self._keys:
            self.detach(name)
        key = f"xllm_lora_{next(self._seq)}"
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=key, is_trainable=False,
                                                       torch_device=str(self.device))
            else:
                self._peft.load_adapter(str(path), adapter_name=key, is_trainable=False,
                                        torch_device=str(self.device))
        except file_errors() as exc:
            # e.g. target modules or shapes that do not match this base model
            raise InvalidRequest(f"The adapter '{name}' does not fit this base model ({type(exc).__name__})",
                                 param="model") from exc
        self.model.eval()
        self._keys[name] = key
        self._hook_layers()

    def _hook_layers(self) -> None:
        """Give every LoRA layer a persistent pre-forward hook that passes this pass's ``adapter_names``.

        peft's own ``_enable_peft_forward_hooks`` walks every module and registers and
        removes hooks on each forward; setting ``_rows`` once per pass costs nothing.
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._inject, with_kwargs=True)
                self._hooked.add(id(module))
                if isinstance(module, LoraLayer) and hasattr(module, "_active_adapter"):
                    self._lora_layers.add(module.__class__)

    def _inject(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        rows = self._rows
        if rows is None:
            return args, kwargs
        if self._uniform is not None and module.__class__ in self._lora_layers:
            # one adapter (or none) for the whole batch: the layer's own active-adapter path adds it to
            # every row at once. peft's mixed path would index rows with Python lists, two blocking
            # host-to-device copies per LoRA module per forward (~450 per step for a 7B model).
            module._active_adapter = self._uniform
        else:
            kwargs["adapter_names"] = rows
        return args, kwargs

    def detach(self, name: str) -> bool:
        """Remove adapter ``name``; False when it is not attached. Caller holds ``lock``."""
        key = self._keys.pop(name, None)
        if key is None:
            return False
        for module in self.model.modules():  # a one-adapter pass left it active there (see _inject)
            if module.__class__ in self._lora_layers and key in module.active_adapters:
                module._active_adapter = []
        self._peft.delete_adapter(key)
        if self._peft.active_adapter == key:
            # peft moves its own record only when exactly one adapter stays active on the layers, which
            # the clearing above prevents; leave it naming an adapter that exists (anything reading
            # ``active_peft_config`` would raise KeyError on the deleted one)
            remaining = list(self._keys.values())
            self._peft.active_adapter = remaining[0] if remaining else []
        return True

    def forward(self, rows: Sequence[str | None]) -> ContextManager:
        """Context for one forward pass whose batch rows use adapters ``rows`` (None = base)."""
        if not self._keys:
            return nullcontext()
        return self._pass([self._keys[r] if r is not None else BASE_ROW for r in rows])

    @contextmanager
    def _pass(self, names: list[str]) -> Iterator[None]:
        self._rows = names
        first = names[0] if names else BASE_ROW
        if all(n == first for n in names):
            self._uniform = [] if first == BASE_ROW else [first]
        try:
            yield
        finally:
            self._rows = self._uniform = None

    def nbytes(self) -> int:
        """Bytes of the attached adapters' LoRA weights."""
        if self._peft is None:
            return 0
        keys = set(self._keys.values())
        return sum(p.nbytes for n, p in self.model.named_parameters()
                   if "lora_" in n and any(f".{k}." in n or n.endswith(f".{k}") for k in keys))
