"""A left-padded batch of sequences sharing one HF ``DynamicCache``; rows join and leave.

transformers 5.x keeps a ``DynamicCache`` as ``cache.layers[i]`` (``DynamicLayer``),
each holding ``keys``/``values`` tensors of shape (batch, kv_heads, seq, head_dim) that
``update`` grows by concatenation along ``seq``. Every row is right-aligned: its real
tokens are the last ``lengths[row]`` columns, padding sits on the left and is masked
out. Right alignment keeps relative distances exact, so causal and sliding-window masks
computed in cache coordinates stay right for every row. A prefill runs on a plain
``DynamicCache``; the running batch's layers are ``GrowLayer``s (a ``DynamicLayer``
subclass writing into spare capacity). This module is the only place that touches the
cache's internals.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

#: spare columns a batch layer allocates beyond what it holds (at least; grows with length)
HEADROOM = 64


def cache_argument(model: Any) -> str:
    """The name ``model``'s forward takes its KV cache by: ``cache`` from transformers 5.x on, where the
    older ``past_key_values`` still works but warns on every load; ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the name every version takes
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache() -> DynamicCache:
    """An empty cache for a prefill: all layers plain (full-length) ``DynamicLayer``s."""
    # no config: a config would give sliding-window models DynamicSlidingWindowLayers,
    # which drop old columns and so cannot be padded, merged or sliced per row
    return DynamicCache()


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding or layer.keys is None:
            raise TypeError(f"unsupported cache layer {type(layer).__name__}: need full DynamicLayers")
    return layers


def zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Zero the keys/values of masked (padding) columns after a padded prefill.

    Fully masked padding queries may come out of attention as NaN in some kernels; a
    masked NaN value still poisons the weighted sum (0 * NaN), so pad columns are reset.
    """
    keep = mask.bool()[:, None, :, None]
    for layer in _layers(cache):
        layer.keys = torch.where(keep, layer.keys, 0)
        layer.values = torch.where(keep, layer.values, 0)


class GrowLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare capacity instead of reallocating each step.

    ``DynamicLayer.update`` concatenates, allocating and copying the whole cache on every
    decode step; here ``keys``/``values`` are views of larger buffers (the first ``_rows``
    rows, columns ``_start:_end``) and a step writes one column in place. Buffers are
    reallocated on growth and join; rows leaving are compacted in place (see ``keep``).
    ``limit``, when known, is the most columns any row can reach: spare capacity stops
    there, so the buffers never hold more than rows x ``limit`` columns.
    """

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int, spare: int = 0,
                 limit: int | None = None) -> None:
        """Stack ``parts`` (keys, values of some rows each) right-aligned into ``width`` columns."""
        super().__init__()
        k0, v0 = parts[0]
        self.dtype, self.device, self.is_initialized = k0.dtype, k0.device, True
        rows = sum(k.shape[0] for k, _ in parts)
        self.limit = limit
        cap = _capacity(width + spare, limit)
        # zeros, not empty: left padding columns are read (masked) and must not hold NaN
        self._k = k0.new_zeros((rows, k0.shape[1], cap, k0.shape[3]))
        self._v = v0.new_zeros((rows, v0.shape[1], cap, v0.shape[3]))
        row = 0
        for k, v in parts:
            n, w = k.shape[0], k.shape[2]
            self._k[row : row + n, :, width - w : width].copy_(k)
            self._v[row : row + n, :, width - w : width].copy_(v)
            row += n
        self._rows, self._start, self._end = rows, 0, width
        self._view()

    def _view(self) -> None:
        self.keys = self._k[: self._rows, :, self._start : self._end]
        self.values = self._v[: self._rows, :, self._start : self._end]

    def _rebuild(self, spare: int = 0) -> None:
        """Reallocate the buffers to fit the current view (plus headroom and ``spare``)."""
        width = self._end - self._start
        fresh = GrowLayer([(self.keys, self.values)], width, spare, self.limit)
        self._k, self._v, self._rows, self._start, self._end = fresh._k, fresh._v, fresh._rows, 0, width
        self._view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new columns in place (growing the buffers if full) and return the views."""
        n = key_states.shape[-2]
        if self._end + n > self._k.shape[2]:
            self._rebuild(spare=n)
        self._k[: self._rows, :, self._end : self._end + n].copy_(key_states)
        self._v[: self._rows, :, self._end : self._end + n].copy_(value_states)
        self._end += n
        self._view()
        return self.keys, self.values

    def trim_left(self, cut: int) -> None:
        """Forget the first ``cut`` columns (padding in every row); no copy."""
        self._start += cut
        self._view()

    def keep(self, rows: Sequence[int], width: int, limit: int | None = None) -> None:
        """Keep only ``rows`` (ascending) and the last ``width`` columns, compacting in place; ``limit``:
        the kept rows' column limit."""
        # Kept row j moves down to row j from rows[j] >= j, so rows with rows[j] == j form
        # a prefix that stays put. The rest go through one gather: source and destination
        # rows overlap, and the temporary is at most the kept rows of one tensor of one layer.
        moved = next((j for j, row in enumerate(rows) if row != j), len(rows))
        if moved < len(rows):
            index = torch.tensor(rows[moved:], dtype=torch.long, device=self._k.device)
            cols = slice(self._end - width, self._end)
            for buf in (self._k, self._v):
                buf[moved : len(rows), :, cols].copy_(buf[:, :, cols].index_select(0, index))
        # columns left of _start are never exposed again, so the new left edge needs no zeroing
        self._rows, self._start, self.limit = len(rows), self._end - width, limit
        self._view()
        # Shrink policy: compacting in place reuses the same blocks (no allocator churn), but
        # buffers holding more than twice the cells a fresh layer would allocate (rows left
        # below half, or a long row left) are rebuilt to give the memory back.
        fresh_cap = _capacity(width, limit)
        if self._k.shape[0] * self._k.shape[2] > 2 * len(rows) * fresh_cap:
            self._rebuild()

    @property
    def nbytes(self) -> int:
        """Bytes of both buffers, spare rows and columns included."""
        return self._k.nbytes + self._v.nbytes


def _capacity(width: int, limit: int | None) -> int:
    """Columns to allocate for ``width``: headroom to grow into, up to ``limit`` (never below ``width``)."""
    cap = width + max(HEADROOM, width // 2)
    return cap if limit is None else max(width, min(cap, limit))


def _last(layer: DynamicLayer, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a layer's keys and values cut to their last ``width`` columns."""
    return layer.keys[:, :, -width:], layer.values[:, :, -width:]


def _batch_cache(layers: list[GrowLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


class BatchKV:
    """The running batch's KV cache, attention mask and per-row lengths.

    Relayouts (``join``, ``keep``) work one layer at a time and drop that layer's old
    buffers before the next, so at most one layer is ever held twice: at peak the cache
    needs about one layer more than it holds, not a second copy of every layer. If one
    fails (e.g. out of memory) the batch is left half rebuilt and must be ``clear``ed.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        #: (rows, width) 1 for real tokens, 0 for left padding
        self.mask: torch.Tensor | None = None
        #: real tokens per row, which is also the next position id of the row
        self.lengths: list[int] = []
        #: the most tokens each row may reach (None: unknown), which caps the buffers' spare columns
        self.claims: list[int | None] = []

    @property
    def limit(self) -> int | None:
        """The most columns any row may reach; None when some row's claim is unknown."""
        if not self.claims or None in self.claims:
            return None
        return max(self.claims)

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Cache columns: the longest row (shared padding is trimmed eagerly)."""
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
        self.lengths = [n + 1 for n in self.lengths]
        return (self.mask if padded else None), positions

    def join(self, cache: DynamicCache, mask: torch.Tensor, lengths: Sequence[int],
             claims: Sequence[int] | None = None) -> None:
        """Append the rows of a prefill cache (same left-padded layout) to the batch; ``claims``: the most
        tokens each new row may reach (prompt + the most it may generate), which bounds the buffers."""
        new = _layers(cache)
        width = max(self.width, max(lengths))
        claims = list(claims) if claims is not None else [None] * len(lengths)
        if len(claims) != len(lengths):
            raise ValueError(f"{len(claims)} claims for {len(lengths)} rows")
        self.claims = self.claims + claims
        limit = self.limit
        # a prefill may carry columns that are padding in all of its rows: they are left out
        mask = mask[:, -width:]
        if self.cache is None:
            self.cache = _batch_cache([GrowLayer([_last(layer, width)], width, limit=limit) for layer in new])
            old_mask = mask.new_zeros((0, 0))
        else:
            _layers(self.cache)  # only checks: a list of the old layers would keep all of them alive
            layers = self.cache.layers
            if len(layers) != len(new):
                raise ValueError(f"cannot join a cache of {len(new)} layers to a batch of {len(layers)}")
            for i, layer in enumerate(new):
                # replacing layer i frees its old buffers before layer i + 1 is built
                layers[i] = GrowLayer([(layers[i].keys, layers[i].values), _last(layer, width)], width, limit=limit)
            old_mask = self.mask
        self.mask = torch.cat([F.pad(old_mask, (width - old_mask.shape[1], 0)),
                               F.pad(mask, (width - mask.shape[1], 0))], dim=0)
        self.lengths = self.lengths + list(lengths)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (an ascending subset of row indices); drop the rest, trim shared padding."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.clear()
            return
        rows = list(rows)
        lengths = [self.lengths[i] for i in rows]
        self.claims = [self.claims[i] for i in rows]
        width, limit = max(lengths), self.limit
        for layer in _layers(self.cache):
            layer.keep(rows, width, limit)
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)[:, -width:]
        self.lengths = lengths

    def trim(self) -> None:
        """Drop left columns that are padding in every row (no copy)."""
        cut = self.width - max(self.lengths)
        if cut <= 0:
            return
        for layer in _layers(self.cache):
            layer.trim_left(cut)
        self.mask = self.mask[:, cut:]

    def clear(self) -> None:
        """Forget every row and free the cache."""
        self.cache, self.mask, self.lengths, self.claims = None, None, [], []

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values, spare capacity included."""
        return sum(layer.nbytes for layer in _layers(self.cache)) if self.cache is not None else 0

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Key tensor shape of every layer (for tests and debugging)."""
        return [tuple(layer.keys.shape) for layer in _layers(self.cache)] if self.cache is not None else []
