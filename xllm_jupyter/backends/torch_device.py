"""Where a torch model goes: the device a setting names, how weights get there, a failed load's memory.

Shared by the chat (transformers) and embedding backends; torch is imported when called.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from ..core import gc_freeze
from ..core.errors import InvalidRequest, Overloaded
from .compile_gate import empty_cuda_cache
from .native_libs import preload_torch

log = logging.getLogger(__name__)


def import_torch() -> Any:
    """``import torch``; the process's first (an embedding load asks where "auto" puts it before its backend
    imports anything) with its native libraries loaded GIL-free first (``native_libs``) and full collections
    held off until a freeze at its end (``gc_freeze.first_time``), as a chat backend's first choice does."""
    if "torch" not in sys.modules:
        preload_torch()
        with gc_freeze.first_time("import torch") as block:
            import torch

            block.only_imported()
    import torch

    return torch


def pick_device(name: str) -> Any:
    """The ``torch.device`` an ``engine.device`` setting names (auto: CUDA when there is one).

    InvalidRequest (400) for a name torch does not know, CUDA on a machine without it, or a
    GPU index past the ones visible (``cuda:7`` on a one-GPU machine would fail deep in the load).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidRequest(f"Unknown device '{name}' (use auto, cpu, cuda or cuda:N)", param="device") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest("Device 'cuda' was requested but CUDA is not available here", param="device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidRequest(f"Device '{name}' does not exist: this machine has {count} CUDA device(s), "
                                 f"cuda:0 to cuda:{count - 1}", param="device")
    return device


def cuda_room_bytes(indices: Sequence[int] | None = None) -> int | None:
    """Bytes this process could still allocate on CUDA devices ``indices`` (None: all visible); None without
    CUDA.

    The driver's free memory plus what torch's caching allocator holds unused (ours to reuse),
    summed over the devices, less the unused blocks of CUDA-graph memory pools (reserved for their
    graphs: a new model cannot use them). Asking creates the device's CUDA context, so only the
    devices a load will use are asked.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        pooled = graph_pool_unused_bytes()
        room = 0
        for index in range(torch.cuda.device_count()) if indices is None else indices:
            free, _ = torch.cuda.mem_get_info(index)
            unused = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
            room += free + max(0, unused - pooled.get(index, 0))
        return room
    except Exception:  # a probe: no answer means no check, never a failed load
        log.debug("no CUDA memory figures", exc_info=True)
        return None


def graph_pool_unused_bytes() -> dict[int, int]:
    """Per device, bytes in CUDA-graph private memory pools that no tensor uses now ({} if unknown).

    torch counts them as reserved and not allocated, like its ordinary cache, but only their
    graphs' replays may use them. Read from the allocator's snapshot (its segments name their pool;
    (0, 0) is the ordinary one).
    """
    try:
        import torch

        unused: dict[int, int] = {}
        for segment in torch.cuda.memory_snapshot():
            if tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0):
                device = int(segment.get("device", 0))
                unused[device] = unused.get(device, 0) + int(segment["total_size"]) - int(segment["allocated_size"])
        return unused
    except Exception:  # a refinement of an estimate: without it, the graphs' spare blocks count as room
        log.debug("no CUDA allocator snapshot", exc_info=True)
        return {}


def placement(device: Any, *, moved_later: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the weights straight onto ``device``.

    On a GPU this skips a full copy in host RAM (a 16 GB model would need 16 GB of RAM first);
    on the CPU, or when the weights are changed on the CPU before moving (``moved_later``: a
    merged LoRA), nothing is asked, and the caller moves the model itself.
    """
    if device.type != "cuda" or moved_later:
        return {}
    return {"device_map": {"": device}}


def release_memory(full: bool = True) -> None:
    """Collect what is unreferenced and give torch's cached CUDA memory back to the device (after a failed
    load: only once its exception, and the frames that hold the partial model, are gone). ``full=False``: what
    was dropped is known to be unfrozen (``gc_freeze.is_frozen``), and only the unfrozen objects are walked."""
    gc_freeze.collect(full)  # full: unfreezes first, cycles among frozen objects are never collected
    empty_cuda_cache()


#: what the user can do when a load runs out of memory, by what took it
ADVICE = {
    "its weights": "unload another model, or use a smaller or more quantized one",
    "the static KV cache": "lower engine.cache_tokens or engine.max_batch_size, or set engine.compile: off",
    "its weights and KV cache": "lower engine.cache_tokens (or use engine.kv_cache_bits: q4), unload another "
                                "model, or use a smaller or more quantized one",
}


#: how the exllama loaders and CUDA say a load did not fit, besides torch's own OutOfMemoryError (both
#: libraries' auto-split raises "Insufficient VRAM ... for model and cache" once every GPU is full)
OUT_OF_MEMORY_MESSAGES = ("insufficient vram", "out of memory", "can't allocate memory")  # (the last: CPU RAM)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory error, and for a library's or CUDA's own words for it (never imports
    torch: no torch, no such error)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in OUT_OF_MEMORY_MESSAGES)


def out_of_memory(name: str, device: Any, what: str = "its weights") -> Overloaded:
    """The 503 for a load that ran out of device memory, with what the user can do about it."""
    where = "GPU memory" if getattr(device, "type", device) == "cuda" else "memory"
    log.warning("loading %s ran out of %s (%s)", name, where, what)
    return Overloaded(f"Not enough {where} to load '{name}' ({what}): {ADVICE[what]}", code="insufficient_memory")


def device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: which memory budget a model's device draws on."""
    device = device.lower()
    if device == "auto":
        try:
            torch = import_torch()  # lazily: only deciding where an auto model will live needs it

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"
