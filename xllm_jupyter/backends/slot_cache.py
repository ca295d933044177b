"""The slot cache of the compiled transformers path: a fixed row per sequence, written at its own column.

transformers 5.x models take no ``cache_position``: they derive the mask's sizes and the
query's offset from the cache (``get_mask_sizes``, ``get_query_offset``), which is where
this cache says what a step reads.

Per-row lengths. transformers' own ``StaticLayer.update`` writes every row at one shared
column (``cumulative_length``): that is how ``generate(cache_implementation="static")``
runs a left-padded batch that starts together, with per-row ``position_ids`` from the
padding and a 2D ``attention_mask`` over the static length. Continuous batching starts
rows at different times, so a shared column would force re-aligning the whole cache
whenever a longer prompt joins or the column reaches the end. Instead ``SlotLayer``
writes each row at its own position (a scatter at ``positions[row]``), column = position,
and ``SlotCache.get_query_offset`` says the query sits at the window's last column, which makes the
causal term allow every column: which columns a row really sees is carried entirely by
the 2D padding mask ``column <= positions[row]``, turned into the 4D mask of the model's
attention implementation (sdpa, eager) by transformers' own mask builders. Columns past a
row's position hold a previous occupant's keys and are masked out, so freeing a slot
costs nothing, unless a row's step went non-finite: its slot is zeroed then (``SlotCache.scrub``).
Sliding-window and non-attention (linear/recurrent) layers are not supported: such models
stay on the eager path.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, StaticLayer

from .compile_gate import COMPILE_GATE
from .kv_batch import _layers, cache_argument, new_cache

#: columns allocated past a slot's last (never read; see SlotCache)
SPARE_COLUMNS = 16


def buckets(limit: int, first: int = 1) -> tuple[int, ...]:
    """``first`` and its doublings below ``limit``, then ``limit``: the shapes decode steps take.

    Rows (slots 0..n-1) and columns (the attention window) are rounded up to these, so a few
    graphs serve every batch, and a step reads the keys of live slots and columns only.
    """
    sizes, n = [], first
    while n < limit:
        sizes.append(n)
        n *= 2
    return (*sizes, limit)


class SlotView:
    """What every layer of a slot cache shares for one step: write positions and the column window."""

    def __init__(self, positions: torch.Tensor, window: int) -> None:
        """``positions``: (slots,) column each row writes at; ``window``: columns attention reads."""
        self.positions, self.window = positions, window


class SlotLayer(StaticLayer):
    """One layer's static keys/values; a decode step writes row ``r`` at column ``positions[r]``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, view: SlotView) -> None:
        """Adopt preallocated (slots, heads, tokens, dim) buffers and the shared per-step view."""
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.view = keys, values, view
        self.dtype, self.device = keys.dtype, keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Scatter one new column per row (rows 0..n-1); return those rows' first ``window`` columns."""
        n, heads, q, dim = key_states.shape
        if q != 1:  # prefill runs on a DynamicCache and is copied in (``SlotCache.write``)
            raise ValueError("SlotLayer takes one token per row")
        at = self.view.positions[:n].view(n, 1, 1, 1)
        self.keys[:n].scatter_(2, at.expand(n, heads, 1, dim), key_states)
        self.values[:n].scatter_(2, at.expand(n, heads, 1, value_states.shape[-1]), value_states)
        w = self.view.window
        return self.keys[:n, :, :w], self.values[:n, :, :w]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask spans the window's columns from column 0."""
        return self.view.window, 0


class SlotCache(Cache):
    """A cache of fixed slots; each holds one sequence, left-aligned (column = position)."""

    def __init__(self, shapes: Sequence[tuple[tuple[int, int, int], torch.dtype]], slots: int, tokens: int,
                 device: torch.device) -> None:
        """``shapes``: per layer ((kv heads, key dim, value dim), dtype), as a prefill produced them."""
        self.slots, self.tokens = slots, tokens
        #: positions: the column each slot's next token is written at (filled before every step);
        #: window: how many leading columns this step's attention reads (set inside the step)
        self.view = SlotView(torch.zeros(slots, dtype=torch.long, device=device), tokens)
        #: column indices, for the per-row visibility mask
        self.columns = torch.arange(tokens, device=device)
        layers = []
        # SPARE_COLUMNS past the last: a window then never spans a whole row, so its slice of
        # the buffer is laid out alike at every width (on CUDA, attention's stride check would
        # otherwise make the full width a graph of its own)
        width = tokens + SPARE_COLUMNS
        for (heads, kdim, vdim), dtype in shapes:
            keys = torch.zeros((slots, heads, width, kdim), dtype=dtype, device=device)
            values = torch.zeros((slots, heads, width, vdim), dtype=dtype, device=device)
            layers.append(SlotLayer(keys, values, self.view))
        super().__init__(layers=layers)
        # fixed addresses: CUDA graphs read and write these buffers in place
        for t in (self.view.positions, *(x for layer in layers for x in (layer.keys, layer.values))):
            torch._dynamo.mark_static_address(t)

    @property
    def positions(self) -> torch.Tensor:
        """(slots,) the column each slot's next token is written at."""
        return self.view.positions

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The query sits at the window's last column, so causality allows all; the padding mask decides."""
        return self.view.window - 1

    def write(self, slot: int, layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled sequence's per-layer (heads, length, dim) keys/values into ``slot``."""
        for layer, (k, v) in zip(self.layers, layer_kv):
            layer.keys[slot, :, : k.shape[1]].copy_(k)
            layer.values[slot, :, : v.shape[1]].copy_(v)

    def scrub(self, slot: int) -> None:
        """Zero every column of ``slot``: a row whose step went non-finite left NaN/inf keys and values there.

        Masked columns are not harmless when they hold NaN: attention gives them weight 0, and
        0 * NaN is NaN, so the slot's next occupant would fail (non-finite logits) for a prompt
        that decodes alone. Finite stale columns need nothing (freeing a slot stays free).
        """
        for layer in self.layers:
            layer.keys[slot].zero_()
            layer.values[slot].zero_()

    def visible(self, n: int, window: int) -> torch.Tensor:
        """(n, window) bool: the columns rows 0..n-1 attend to in this step (their past and their new token)."""
        return self.columns[:window].unsqueeze(0) <= self.positions[:n].unsqueeze(1)

    @property
    def nbytes(self) -> int:
        """Bytes of all keys and values."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)


def probe_shapes(model, device: torch.device) -> list[tuple[tuple[int, int, int], torch.dtype]]:
    """Per-layer cache shapes and dtypes, from a one-token forward (works for any full-attention model)."""
    cache = new_cache()
    with torch.inference_mode(), COMPILE_GATE.forward():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True,
              **{cache_argument(model): cache})
    return [((layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]), layer.keys.dtype)
            for layer in _layers(cache)]


class SlotTable:
    """Which slot each running sequence holds; hands out the lowest free slot (keeps buckets small)."""

    def __init__(self, slots: int) -> None:
        """All ``slots`` free."""
        self.free = list(range(slots))
        #: slot of running row i (parallel to the model's running list)
        self.rows: list[int] = []
        #: next position (= tokens in the slot) per slot
        self.lengths = [0] * slots

    def take(self, length: int) -> int:
        """Claim the lowest free slot for a sequence of ``length`` tokens; append it as a row."""
        self.free.sort()
        slot = self.free.pop(0)
        self.rows.append(slot)
        self.lengths[slot] = length
        return slot

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending indices); their slots stay, the others are freed."""
        kept = set(rows)
        self.free.extend(s for i, s in enumerate(self.rows) if i not in kept)
        self.rows = [self.rows[i] for i in rows]

    def clear(self) -> None:
        """Free every slot."""
        self.keep([])
