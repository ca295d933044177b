"""What a caller who is not an admin sees of a loaded model's activity in ``/v1/models``.

The engine is shared: its total of sequences running and queued, the requests holding a model, when
it was last used (and so when keep_alive unloads it) and its live memory (an eager KV cache grows
with the prompts in the batch) all tell one user what the others are doing. A non-admin's entries
keep what describes the model (backend, device, dtype, batching, context length, state) and count
only the caller's own sequences in ``running``/``queued``; admins keep the engine's totals (and
``/admin/models``, ``/admin/stats`` stay theirs).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..core.types import UserSequences

#: ``details`` facts that tell of other callers' activity: left out for non-admins
SHARED_ACTIVITY = ("in_use", "replicas", "last_used", "expires_at", "memory_bytes")


def caller_view(entry: Mapping[str, Any], own: UserSequences) -> dict[str, Any]:
    """A ``/v1/models`` entry as a non-admin sees it: ``running``/``queued`` are ``own``, shared activity is gone."""
    xllm = dict(entry.get("xllm") or {})
    details = {k: v for k, v in (xllm.get("details") or {}).items() if k not in SHARED_ACTIVITY}
    if "running" in details or "queued" in details:  # a loaded model (a loading one has no counts yet)
        details["running"], details["queued"] = own.running, own.queued
    return {**entry, "xllm": {**xllm, "details": details}}


__all__ = ["SHARED_ACTIVITY", "caller_view"]
