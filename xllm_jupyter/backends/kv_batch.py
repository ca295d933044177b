"""A left-padded batch of sequences sharing one HF ``DynamicCache``; rows join and leave.

transformers 5.x keeps a ``DynamicCache`` as ``cache.layers[i]`` (``DynamicLayer``),
each holding ``keys``/``values`` tensors of shape (batch, kv_heads, seq, head_dim) that
``update`` grows by concatenation along ``seq``. Every row is right-aligned: its real
tokens are the last ``lengths[row]`` columns, padding sits on the left and is masked
out. Right alignment keeps relative distances exact, so causal and sliding-window masks
computed in cache coordinates stay right for every row. This module is the only place
that touches the cache's internals.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def new_cache() -> DynamicCache:
    """An empty cache whose layers are all plain (full-length) ``DynamicLayer``s."""
    # no config: a config would give sliding-window models DynamicSlidingWindowLayers,
    # which drop old columns and so cannot be padded, merged or sliced per row
    return DynamicCache()


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"unsupported cache layer {type(layer).__name__}: need plain DynamicLayer")
    return layers


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (B, H, S, D) with ``n`` zero columns prepended along S."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Zero the keys/values of masked (padding) columns after a padded prefill.

    Fully masked padding queries may come out of attention as NaN in some kernels; a
    masked NaN value still poisons the weighted sum (0 * NaN), so pad columns are reset.
    """
    keep = mask.bool()[:, None, :, None]
    for layer in _layers(cache):
        if layer.keys is not None and layer.keys.numel():
            layer.keys = torch.where(keep, layer.keys, 0)
            layer.values = torch.where(keep, layer.values, 0)


class BatchKV:
    """The running batch's KV cache, attention mask and per-row lengths."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        #: (rows, width) 1 for real tokens, 0 for left padding
        self.mask: torch.Tensor | None = None
        #: real tokens per row, which is also the next position id of the row
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Cache columns (longest row plus nothing: padding is trimmed eagerly)."""
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def padded(self) -> bool:
        """True when some row has left padding (an explicit mask is needed)."""
        return bool(self.lengths) and min(self.lengths) != self.width

    def step_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention mask (or None when unpadded) and position ids for one decode step; grows the mask."""
        padded = self.padded
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.mask.device).unsqueeze(1)
        attn = self.mask if padded else None
        self.lengths = [n + 1 for n in self.lengths]
        return attn, positions

    def join(self, cache: DynamicCache, mask: torch.Tensor, lengths: Sequence[int]) -> None:
        """Append rows from a prefill cache (same left-padded layout) to the batch."""
        if self.cache is None:
            self.cache, self.mask, self.lengths = cache, mask, list(lengths)
            self.trim()
            return
        width = max(self.width, mask.shape[1])
        pad_a, pad_b = width - self.width, width - mask.shape[1]
        for a, b in zip(_layers(self.cache), _layers(cache)):
            if a.keys is None or b.keys is None:
                continue  # layers without their own KV (shared-KV models) stay empty
            a.keys = torch.cat([_pad_left(a.keys, pad_a), _pad_left(b.keys, pad_b)], dim=0)
            a.values = torch.cat([_pad_left(a.values, pad_a), _pad_left(b.values, pad_b)], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (pad_a, 0)), F.pad(mask, (pad_b, 0))], dim=0)
        self.lengths = self.lengths + list(lengths)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); drop the rest and trim shared padding."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.clear()
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        for layer in _layers(self.cache):
            if layer.keys is not None:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.lengths = [self.lengths[i] for i in rows]
        self.trim()

    def trim(self) -> None:
        """Drop left columns that are padding in every row."""
        cut = self.width - max(self.lengths)
        if cut <= 0:
            return
        for layer in _layers(self.cache):
            if layer.keys is not None:
                layer.keys = layer.keys[:, :, cut:, :]
                layer.values = layer.values[:, :, cut:, :]
        self.mask = self.mask[:, cut:]

    def clear(self) -> None:
        """Forget every row and free the cache."""
        self.cache, self.mask, self.lengths = None, None, []

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        if self.cache is None:
            return 0
        total = 0
        for layer in _layers(self.cache):
            if layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Key tensor shape of every layer (for tests and debugging)."""
        return [tuple(layer.keys.shape) for layer in _layers(self.cache)] if self.cache is not None else []
