"""``kv_batch.BatchKV`` on real tensors: the same views as a naive reference, and bounded peak memory."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from xllm_jupyter.backends import kv_batch  # noqa: E402
from xllm_jupyter.backends.kv_batch import BatchKV, new_cache  # noqa: E402

HEADS, DIM = 2, 4


def prefill(gen: torch.Generator, lengths: list[int], layers: int, extra: int = 0):
    """A left-padded prefill cache as ``TransformersModel._prefill`` leaves it, and each row's real keys/values.

    ``extra`` adds columns that are padding in every row (the batch must trim them).
    """
    width = max(lengths) + extra
    cache, mask = new_cache(), torch.zeros((len(lengths), width), dtype=torch.long)
    real = [[] for _ in lengths]  # real[row][layer] = (keys, values) of shape (heads, length, dim)
    for layer in range(layers):
        k = torch.zeros((len(lengths), HEADS, width, DIM))
        v = torch.zeros((len(lengths), HEADS, width, DIM))
        for row, n in enumerate(lengths):
            rk, rv = torch.randn((HEADS, n, DIM), generator=gen), torch.randn((HEADS, n, DIM), generator=gen)
            k[row, :, width - n :], v[row, :, width - n :] = rk, rv
            real[row].append((rk, rv))
        cache.update(k, v, layer)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return cache, mask, real


class Reference:
    """The batch built naively: each row's real columns, left-padded with zeros to the longest row."""

    def __init__(self) -> None:
        self.real: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    @property
    def lengths(self) -> list[int]:
        """Real tokens per row."""
        return [row[0][0].shape[1] for row in self.real]

    def padded(self, layer: int, which: int) -> torch.Tensor:
        """Keys (``which`` 0) or values (1) of ``layer``, right-aligned and zero-padded on the left."""
        width = max(self.lengths)
        return torch.stack([torch.nn.functional.pad(row[layer][which], (0, 0, width - row[layer][which].shape[1], 0))
                            for row in self.real])

    def mask(self) -> torch.Tensor:
        """1 for real tokens, 0 for left padding."""
        width = max(self.lengths)
        return torch.tensor([[0] * (width - n) + [1] * n for n in self.lengths])


def storages(batch: BatchKV) -> dict[int, int]:
    """Bytes of every distinct storage behind the batch's keys/values views, by data pointer."""
    held = {}
    for layer in batch.cache.layers:
        for t in (layer.keys, layer.values):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return held


def check(batch: BatchKV, ref: Reference, layers: int) -> None:
    """The batch shows exactly the reference's views, mask and lengths, and ``nbytes`` counts what it holds."""
    if not ref.real:
        assert batch.rows == 0 and batch.cache is None and batch.width == 0 and batch.nbytes() == 0
        return
    lengths = ref.lengths
    assert batch.lengths == lengths and batch.rows == len(lengths) and batch.width == max(lengths)
    assert batch.padded == (min(lengths) != max(lengths))
    assert torch.equal(batch.mask, ref.mask())
    assert batch.layer_shapes() == [(len(lengths), HEADS, max(lengths), DIM)] * layers
    for i, layer in enumerate(batch.cache.layers):
        assert torch.equal(layer.keys, ref.padded(i, 0)), f"keys of layer {i}"
        assert torch.equal(layer.values, ref.padded(i, 1)), f"values of layer {i}"
    assert batch.nbytes() == sum(storages(batch).values())


def step(gen: torch.Generator, batch: BatchKV, ref: Reference, layers: int) -> None:
    """One decode step as the model does it: ``step_inputs`` then ``cache.update`` for every layer."""
    padded = min(ref.lengths) != max(ref.lengths)
    attn, positions = batch.step_inputs()
    assert positions.tolist() == [[n] for n in ref.lengths]
    assert (attn is None) == (not padded)
    for i in range(layers):
        k = torch.randn((batch.rows, HEADS, 1, DIM), generator=gen)
        v = torch.randn((batch.rows, HEADS, 1, DIM), generator=gen)
        for r, row in enumerate(ref.real):
            row[i] = (torch.cat([row[i][0], k[r]], 1), torch.cat([row[i][1], v[r]], 1))
        keys, values = batch.cache.update(k, v, i)
        assert keys.shape == values.shape == (batch.rows, HEADS, max(ref.lengths), DIM)
        assert torch.equal(keys, ref.padded(i, 0)) and torch.equal(values, ref.padded(i, 1))
    if attn is not None:
        assert torch.equal(attn, ref.mask())


@pytest.mark.parametrize("headroom", [1, 64])
@pytest.mark.parametrize("seed", range(6))
def test_matches_a_naive_batch_as_rows_join_step_and_leave(seed, headroom, monkeypatch):
    monkeypatch.setattr(kv_batch, "HEADROOM", headroom)  # 1: buffers also grow during the run
    rnd, gen, layers = random.Random(seed), torch.Generator().manual_seed(seed), 3
    batch, ref = BatchKV(), Reference()
    with torch.inference_mode():  # as in the backend's step
        for _ in range(80):
            op = rnd.choice(["join", "join", "step", "step", "step", "keep", "keep", "trim"])
            if op == "join" or not ref.real:
                lengths = [rnd.randint(1, 12) for _ in range(rnd.randint(1, 3))]
                cache, mask, real = prefill(gen, lengths, layers)
                if rnd.random() < 0.3:  # some rows finished at prefill: they join from a kept part
                    keep = sorted(rnd.sample(range(len(lengths)), rnd.randint(1, len(lengths))))
                    part = BatchKV()
                    part.join(cache, mask, lengths)
                    part.keep(keep)
                    cache, mask, real = part.cache, part.mask, [real[i] for i in keep]
                    lengths = [lengths[i] for i in keep]
                batch.join(cache, mask, lengths)
                ref.real += real
            elif op == "step":
                step(gen, batch, ref, layers)
            elif op == "keep":
                rows = sorted(rnd.sample(range(batch.rows), rnd.randint(0, batch.rows)))
                batch.keep(rows)
                ref.real = [ref.real[i] for i in rows]
            else:
                batch.trim()
            check(batch, ref, layers)


def test_join_leaves_out_prefill_columns_that_are_padding_in_every_row():
    gen, layers = torch.Generator().manual_seed(7), 2
    batch, ref = BatchKV(), Reference()
    for lengths in ([3, 5], [4], [9, 2]):  # the first prefill is wider than its rows, then narrower than the batch
        cache, mask, real = prefill(gen, lengths, layers, extra=3)
        batch.join(cache, mask, lengths)
        ref.real += real
        check(batch, ref, layers)
    step(gen, batch, ref, layers)
    check(batch, ref, layers)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages alive after every op (pre-existing ones given up front); keeps the peak.

    Storages are watched through weak references, so a buffer counts exactly as long as
    something still holds it; the peak is sampled after each op, i.e. at every allocation.
    """

    def __init__(self, tensors) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        for t in tensors:
            self._watch(t)
        self.peak = self.start = self.now()

    def _watch(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        known = self.live.get(storage._cdata)
        if known is None or known[0].expired():
            self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())

    def now(self) -> int:
        """Bytes of the watched storages still alive."""
        self.live = {key: (ref, n) for key, (ref, n) in self.live.items() if not ref.expired()}
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._watch(t)
        self.peak = max(self.peak, self.now())
        return out


def batch_tensors(batch: BatchKV) -> list[torch.Tensor]:
    """Every tensor the batch holds."""
    return [t for layer in batch.cache.layers for t in (layer.keys, layer.values)] + [batch.mask]


def cache_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    """Every keys/values tensor of a cache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


LAYERS = 8


def running_batch(gen: torch.Generator, lengths: list[int]) -> BatchKV:
    """A batch of ``lengths`` rows, ``LAYERS`` layers, after a few decode steps."""
    batch, ref = BatchKV(), Reference()
    cache, mask, ref.real = prefill(gen, lengths, LAYERS)
    batch.join(cache, mask, lengths)
    for _ in range(3):
        step(gen, batch, ref, LAYERS)
    return batch


def layer_bytes(batch: BatchKV) -> int:
    """Bytes of the largest layer's buffers."""
    return max(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
               for layer in batch.cache.layers)


def test_keep_compacts_rows_in_place_without_a_second_cache():
    gen = torch.Generator().manual_seed(0)
    batch = running_batch(gen, [30, 50, 40, 20, 45, 35])
    held, nbytes, one_layer = storages(batch), batch.nbytes(), layer_bytes(batch)
    with LiveBytes(batch_tensors(batch)) as live:
        batch.keep([0, 2, 4, 5])  # rows 2, 4, 5 move down over the dropped ones
    assert storages(batch) == held and batch.nbytes() == nbytes  # same buffers: no allocation, no churn
    # at most a temporary of one layer's moved rows on top of the cache (not a rebuilt copy of every layer)
    assert live.peak - live.start <= one_layer // 2, (live.peak, live.start, one_layer)
    assert batch.layer_shapes() == [(4, HEADS, 48, DIM)] * LAYERS  # row 1 (the longest) left: 45 + 3 columns


def test_keep_gives_memory_back_one_layer_at_a_time():
    gen = torch.Generator().manual_seed(1)
    batch = running_batch(gen, [30, 50, 40, 20, 45, 35])
    nbytes, one_layer = batch.nbytes(), layer_bytes(batch)
    with LiveBytes(batch_tensors(batch)) as live:
        batch.keep([3, 5])  # under half the rows stay: the buffers shrink
    assert batch.nbytes() < nbytes / 2
    assert live.peak - live.start <= one_layer, (live.peak, live.start, one_layer)


def test_join_rebuilds_one_layer_at_a_time():
    gen = torch.Generator().manual_seed(2)
    batch = running_batch(gen, [30, 50, 40, 20])
    cache, mask, _ = prefill(gen, [60, 25], LAYERS)
    with LiveBytes(batch_tensors(batch) + cache_tensors(cache) + [mask]) as live:
        batch.join(cache, mask, [60, 25])
        end = live.now()
    assert batch.rows == 6 and batch.width == 60
    assert live.start < end <= live.peak  # the tracker saw the new buffers
    # the old batch and the prefill, or the new batch and the prefill, plus one layer being rebuilt
    bound = max(live.start, end) + layer_bytes(batch)
    assert live.peak <= bound, (live.peak, live.start, end, layer_bytes(batch))


def column_bytes(batch: BatchKV) -> int:
    """Bytes one row's keys and values take per column, over all layers."""
    return sum(2 * HEADS * DIM * layer.keys.element_size() for layer in batch.cache.layers)


@pytest.mark.parametrize("seed", range(4))
def test_buffers_never_hold_more_than_rows_times_the_longest_claim(seed):
    # the eager KV budget admits rows x the longest claim: the buffers (headroom included) must fit in that
    rnd, gen, layers = random.Random(seed), torch.Generator().manual_seed(seed), 3
    batch, ref, claims, admitted = BatchKV(), Reference(), [], 0
    with torch.inference_mode():
        for _ in range(60):
            op = rnd.choice(["join", "step", "step", "step", "keep"])
            if not ref.real:
                op = "join"
            if op == "join":
                lengths = [rnd.randint(1, 40) for _ in range(rnd.randint(1, 3))]
                new_claims = [n + rnd.randint(1, 30) for n in lengths]
                cache, mask, real = prefill(gen, lengths, layers)
                batch.join(cache, mask, lengths, new_claims)
                ref.real, claims = ref.real + real, claims + new_claims
            elif op == "step":
                # rows that reached their claim end first, as jobs do at max_tokens
                keep = [i for i, n in enumerate(ref.lengths) if n < claims[i]]
                batch.keep(keep)
                ref.real, claims = [ref.real[i] for i in keep], [claims[i] for i in keep]
                if ref.real:
                    step(gen, batch, ref, layers)
            else:
                rows = sorted(rnd.sample(range(batch.rows), rnd.randint(0, batch.rows)))
                batch.keep(rows)
                ref.real, claims = [ref.real[i] for i in rows], [claims[i] for i in rows]
            check(batch, ref, layers)
            if ref.real:
                assert batch.claims == claims and batch.limit == max(claims)
                if op == "join":  # exactly what the budget admitted
                    admitted = len(claims) * max(claims) * column_bytes(batch)
                    assert batch.nbytes() <= admitted
                # steps and leaving rows never allocate past it (compacted buffers stay until a join or the
                # shrink rule gives them back)
                assert batch.nbytes() <= admitted


def test_a_batch_without_claims_keeps_its_headroom():
    gen = torch.Generator().manual_seed(3)
    batch = BatchKV()
    cache, mask, _ = prefill(gen, [10, 20], 2)
    batch.join(cache, mask, [10, 20])
    assert batch.limit is None and batch.cache.layers[0]._k.shape[2] == 20 + kv_batch.HEADROOM
    capped = BatchKV()
    cache, mask, _ = prefill(gen, [10, 20], 2)
    capped.join(cache, mask, [10, 20], [15, 24])
    assert capped.limit == 24 and capped.cache.layers[0]._k.shape[2] == 24


def test_the_cache_goes_by_the_name_the_forward_takes():
    class New:
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    assert kv_batch.cache_argument(New()) == "cache" and kv_batch.cache_argument(Old()) == "past_key_values"
