"""Static-cache decoding for the transformers backend, compiled with CUDA graphs on a GPU.

The eager path (``hf_model.py`` + ``kv_batch.py``) re-lays out a dynamic cache as rows
join and leave, so every decode step has new shapes and runs op by op from Python: about
4x slower per token than a compiled graph on an H100 at one stream. Here every sequence
owns a fixed *slot* (one row) of a preallocated cache of shape (slots, kv_heads, slot
tokens, head_dim): prefill runs eagerly, as before, and its keys/values are copied into
the slot. The single-token decode step runs over the first ``n`` slots and reads the first
``w`` columns (both rounded up to buckets: 2, 4 ... ``max_batch_size`` rows when compiled;
256, 512 ... slot-length columns), so it takes a handful of shapes over fixed tensor
addresses, and ``torch.compile(mode="reduce-overhead", fullgraph=True)`` traces it once, with
rows and window as sizes that vary, and replays it as CUDA graphs, one per shape, without
dynamo's per-call guard checks (``compile_gate.py``).

The slot cache itself (per-row write positions, the column window, the slot table) is in
``slot_cache.py``.
"""

from __future__ import annotations

import logging
import threading
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.errors import EngineError
from .base import BackendOptions
from .compile_gate import COMPILE_GATE
from .kv_batch import _layers, cache_argument
from .registry import compile_auto, compile_setting
from .sampling import row_index
from .slot_attention import use_slot_sdpa
from .slot_cache import SlotCache, SlotTable, buckets, probe_shapes

log = logging.getLogger(__name__)

#: tokens per slot when neither the manifest's context nor engine.cache_tokens bounds it lower
DEFAULT_SLOT_TOKENS = 4096
#: the narrowest attention window (columns) a decode step reads
WINDOW_MIN = 256
#: details()["decode"] values: compiled graph, the slot cache run eagerly, the dynamic batch (hf_model.py)
DECODE_COMPILED, DECODE_STATIC, DECODE_EAGER = "compiled-static", "static", "eager"


def compile_wanted(options: BackendOptions, fmt: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model loaded with these settings decodes through the slot cache, compiled.

    auto: CUDA with fp16/bf16 safetensors weights and Triton (``registry.compile_auto``);
    on: everywhere (on CPU inductor emits C++); off: never.
    """
    setting = compile_setting(options)
    if setting != "auto":
        return setting == "on"
    return compile_auto(device.type, str(dtype).removeprefix("torch."), fmt)


@dataclass(frozen=True)
class StaticPlan:
    """How a TransformersModel sets up slot decoding: the cache budget and the compiler backend."""

    #: engine.cache_tokens: KV tokens for all slots together (0 = DEFAULT_SLOT_TOKENS per slot)
    cache_tokens: int = 0
    #: torch.compile backend ("inductor"; "eager" traces without code generation); None = no compile
    compile_backend: str | None = "inductor"

    @classmethod
    def from_options(cls, options: BackendOptions) -> "StaticPlan":
        """From a ModelSpec's options (``cache_tokens``, ``compile_backend``)."""
        return cls(options.cache_tokens, options.compile_backend or "inductor")

    def slot_tokens(self, context_length: int, slots: int) -> int:
        """Tokens per slot: the model's context, capped by cache_tokens / slots or DEFAULT_SLOT_TOKENS.

        The cache is allocated whole at load (slots x slot tokens), so a 128k-context model
        must not get 128k columns per slot by default.
        """
        cap = self.cache_tokens // slots if self.cache_tokens else DEFAULT_SLOT_TOKENS
        return max(16, min(context_length, cap))


def static_layout_problem(model) -> str | None:
    """Why this model cannot use slot decoding (None when it can)."""
    cfg = model.config.get_text_config()
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return f"layer types {sorted(kinds)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation '{cfg._attn_implementation}'"
    return None


def give_this_thread_cudagraph_state() -> None:
    """Set up torch's per-thread CUDA graph tree state on this thread if torch left it unset.

    Older torch (2.11, the GPU machine's) creates that state only on the thread that imports
    ``torch._inductor.cudagraph_trees``; on any other thread the first graph it records fails
    an ``assert`` inside torch (pytorch#123177). Newer torch (2.13) sets it up lazily on each
    thread (``_initialize_tls``), as this does, so there this is a no-op. The engine steps a
    model on its own thread, which is rarely the importing one.
    """
    try:
        from torch._inductor import cudagraph_trees as trees

        if hasattr(trees, "_initialize_tls") or hasattr(trees.local, "tree_manager_containers") \
                or torch._C._is_key_in_tls("tree_manager_containers"):
            return
        trees.local.tree_manager_containers = {}
        trees.local.tree_manager_locks = defaultdict(threading.Lock)
    except (ImportError, AttributeError):  # a torch laid out otherwise: leave it to torch
        log.debug("CUDA graph trees: no per-thread state to set up", exc_info=True)


def own_code(method: types.MethodType) -> types.MethodType:
    """``method`` rebuilt over a copy of its code object, bound to the same instance.

    dynamo keeps compiled graphs, and with them the CUDA graphs and their memory pools, per
    code object. Over one shared ``_forward`` a second model of the same shapes would run the
    first's graphs (re-recording them at every switch, as its buffers have other addresses)
    and an unloaded model's graphs would stay alive. A code object of its own per decoder
    keeps each model's graphs its own and frees them with it.
    """
    func = method.__func__
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    return types.MethodType(copy, method.__self__)


class SlotDecoder:
    """The decode step over slots 0..n-1: one forward, eager or compiled, returning last-token logits."""

    def __init__(self, model, cache: SlotCache, *, compile_backend: str | None, cuda: bool,
                 one_graph: bool | None = None) -> None:
        """``compile_backend`` None runs eagerly; "inductor" on CUDA captures CUDA graphs.

        ``one_graph``: trace every shape as one graph (None: where that pays, see below).
        """
        self.model, self.cache = model, cache
        self._cache_arg = cache_argument(model)
        self.compiled = compile_backend is not None
        self.cuda = cuda
        self.compile_backend = compile_backend
        #: trace rows and window once as sizes that vary, so that one graph serves every shape
        #: and steps can skip dynamo's guard checks (compile_gate.py). Not with inductor on a
        #: CPU: its C++ kernels then split every loop over those sizes across OpenMP threads,
        #: which made a tiny model's step 2.4x slower on an engine thread (2 cores); there
        #: shapes stay specialized, a few graphs with their guards checked.
        if one_graph is None:
            one_graph = cuda or compile_backend != "inductor"
        self.one_graph = self.compiled and one_graph
        # one row runs as two (a free slot rides along): dynamo specializes sizes of 1, so a
        # 1-row bucket would be a second graph; at one stream the extra row costs little on a
        # GPU, as a decode step's time goes to reading the weights
        self.widths = buckets(cache.slots, min(2, cache.slots) if self.one_graph else 1)
        self.windows = buckets(cache.tokens, min(WINDOW_MIN, cache.tokens))
        self._eager = self._forward
        #: the thread that ran the compiled step first; every later compiled step must run there
        self.thread: int | None = None
        #: set by the warm-up: one graph serves every shape, so steps skip dynamo's guard checks
        self.skips_guards = False
        #: compiled steps that ran with guard checks skipped (the others checked them)
        self.steps_without_guard_checks = 0
        if compile_backend is None:
            self._fn = self._forward
        else:
            mode = "reduce-overhead" if cuda and compile_backend == "inductor" else None
            self._fn = torch.compile(own_code(self._forward), backend=compile_backend, mode=mode, fullgraph=True)

    def _forward(self, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        # the window travels as the mask's shape (a graph input, so a new window is a new
        # shape, not a new constant) and reaches the layers through the shared view
        self.cache.view.window = visible.shape[1]
        out = self.model(input_ids=ids, position_ids=self.cache.positions[: ids.shape[0]].unsqueeze(1),
                         attention_mask=visible, use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        return out.logits[:, -1, :]

    def width(self, highest_slot: int) -> int:
        """The row bucket that covers slots 0..highest_slot."""
        return next(b for b in self.widths if b > highest_slot)

    def window(self, highest_position: int) -> int:
        """The column bucket that covers columns 0..highest_position."""
        return next(b for b in self.windows if b > highest_position)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, *, eager: bool = False) -> torch.Tensor:
        """Logits (n, vocab) for ``ids`` (n, 1) at ``positions`` (n,).

        Compiled on CUDA, the result lives in the graph's memory pool and the next replay
        overwrites it: callers copy what they keep before the next step.
        """
        n = ids.shape[0]
        # (queued behind the last step when ``positions`` is pinned; a pageable source is staged first, also safe)
        self.cache.positions[:n].copy_(positions, non_blocking=True)
        visible = self.cache.visible(n, self.window(int(positions.max())))
        if not self.compiled or eager:
            with COMPILE_GATE.forward():
                return self._eager(ids, visible)
        if self.thread is None and self.one_graph:  # the first compiled step: rows and window as sizes that vary
            if len(self.widths) > 1:
                torch._dynamo.maybe_mark_dynamic(ids, 0)
                torch._dynamo.maybe_mark_dynamic(visible, 0)
            if len(self.windows) > 1:
                torch._dynamo.maybe_mark_dynamic(visible, 1)
        self._check_thread()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the previous outputs are done with
        if self.skips_guards:  # one graph serves every shape: nothing left to compile or choose
            with COMPILE_GATE.forward(skip_guards=True):
                self.steps_without_guard_checks += 1
                return self._fn(ids, visible)
        with COMPILE_GATE.compiling():  # may trace: no other transformers forward beside it
            return self._fn(ids, visible)

    def release(self) -> None:
        """Drop dynamo's compiled graphs of this decoder's code (and with them its CUDA graphs and their pool).

        ``own_code`` gives each decoder a code object of its own, but dynamo keeps that code
        alive from its own tables (and a ``__compiled_fn`` global per graph in this module),
        so without this every unload or reload leaked the old graphs.
        """
        if not self.compiled:
            return
        try:
            from torch._dynamo.eval_frame import remove_from_cache

            code = self._fn._torchdynamo_orig_callable.__func__.__code__
        except (ImportError, AttributeError):  # a torch laid out otherwise: nothing we can drop
            log.debug("compiled decode: no dynamo cache to drop", exc_info=True)
            return
        with COMPILE_GATE.compiling():  # dynamo's tables are shared with any compile in flight
            remove_from_cache(code)

    def _check_thread(self) -> None:
        # torch's CUDA graph trees keep their graphs in thread-local state: on a second thread
        # the first new shape fails inside torch (an assert). Checked on every device, so CPU
        # runs catch a caller that breaks the rule.
        me = threading.get_ident()
        if self.thread is None:
            self.thread = me
            if self.cuda:
                give_this_thread_cudagraph_state()
        elif self.thread != me:
            raise EngineError("The compiled decode step ran on a second thread: it must run on the "
                              "thread that warmed it up (the model's engine thread)")

    def warm_up_shapes(self) -> list[tuple[int, int]]:
        """The (rows, window) pairs the warm-up steps through: every pair a step can take.

        The first compiles the graph (with ``one_graph``, rows and window as sizes that vary;
        otherwise dynamo recompiles a dimension as varying once it changes, a few graphs); the
        others check that it serves them, and on CUDA record each pair's CUDA graph.
        """
        return [(n, w) for w in self.windows for n in self.widths]

    def warm_up(self, pad_id: int) -> None:
        """Compile and record every bucket now, at load, instead of stalling the first requests.

        This runs on the engine thread (``LoadedModel.warm_up``), the only thread that may
        step the model afterwards. If it leaves exactly one graph, later steps skip the
        guard checks that only choose among graphs (``compile_gate.py``).
        """
        if not self.compiled:
            return
        # CUDA graph trees run a new shape once before they record it on its next run
        runs = 2 if self.cuda else 1
        # recording a CUDA graph per (rows, window) pair is the point here: torch's warning past
        # 8 of them (which suggests turning CUDA graphs off for such shapes) does not apply
        with _no_dynamic_shape_warning():
            for n, window in self.warm_up_shapes():
                ids = torch.full((n, 1), pad_id, dtype=torch.long, device=self.cache.positions.device)
                positions = torch.full((n,), window - 1, dtype=torch.long)  # free slots: the writes are never read
                for _ in range(runs):
                    self.step(ids, positions)
        graphs = compiled_graphs(self._fn)
        self.skips_guards = self.one_graph and graphs == 1
        log.info("compiled decode: %s graph(s) for %d row and %d window buckets; guard checks %s",
                 graphs, len(self.widths), len(self.windows), "skipped" if self.skips_guards else "kept")


def _no_dynamic_shape_warning() -> Any:
    """inductor's config patched so recording many CUDA graphs of one function does not warn (if it has that limit)."""
    import contextlib

    try:
        from torch._inductor import config

        if hasattr(config.triton, "cudagraph_dynamic_shape_warn_limit"):
            return config.patch({"triton.cudagraph_dynamic_shape_warn_limit": None})
    except ImportError:
        pass
    return contextlib.nullcontext()


def compiled_graphs(fn) -> int | None:
    """How many graphs dynamo holds for the function ``torch.compile`` wrapped as ``fn`` (None: unknown)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
    except (ImportError, AttributeError):  # a torch laid out otherwise: keep the guards
        return None


class StaticBatch:
    """The running batch in a slot cache: the static counterpart of ``kv_batch.BatchKV``.

    Row i of the batch (the model's running list) lives in slot ``table.rows[i]``.
    """

    def __init__(self, model, device: torch.device, *, slots: int, tokens: int, compile_backend: str | None) -> None:
        """Allocate the whole cache now (slots x tokens) and set up the decode step."""
        use_slot_sdpa(model)  # grouped-query decode without a copy of the keys per query head
        self.cache = SlotCache(probe_shapes(model, device), slots, tokens, device)
        self.table = SlotTable(slots)
        self.decoder = SlotDecoder(model, self.cache, compile_backend=compile_backend, cuda=device.type == "cuda")
        self.device = device

    @property
    def mode(self) -> str:
        """``compiled-static`` or ``static`` (the slot cache run eagerly)."""
        return DECODE_COMPILED if self.decoder.compiled else DECODE_STATIC

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return len(self.table.rows)

    def join(self, cache, mask: torch.Tensor, lengths: Sequence[int], claims: Sequence[int] | None = None) -> None:
        """Give each row of a right-aligned prefill cache a slot and copy its keys/values there."""
        # rows are right-aligned: the real tokens are the last ``lengths[row]`` columns; slots are
        # sized at load, so the rows' claims change nothing
        del mask, claims
        layers = _layers(cache)
        for row, n in enumerate(lengths):
            self.cache.write(self.table.take(n), [(layer.keys[row, :, -n:], layer.values[row, :, -n:])
                                                  for layer in layers])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending); the others' slots are free at once."""
        self.table.keep(rows)

    def scrub(self, rows: Sequence[int]) -> None:
        """Zero the slots of ``rows`` (row indices), whose step went non-finite, before they are freed."""
        for row in rows:
            self.cache.scrub(self.table.rows[row])

    def clear(self) -> None:
        """Free every slot (the buffers stay allocated)."""
        self.table.clear()

    def release(self) -> None:
        """Drop the compiled decode step's graphs (before the batch is dropped: unload, reload)."""
        self.decoder.release()

    def nbytes(self) -> int:
        """Bytes of the slot cache (allocated whole at load)."""
        return self.cache.nbytes

    def by_slot(self, values: Sequence[Any], fill: Any) -> list[Any]:
        """Per-row ``values`` laid out in decode order: index = slot, ``fill`` for free slots below the width."""
        out = [fill] * self.decoder.width(max(self.table.rows))
        for slot, value in zip(self.table.rows, values):
            out[slot] = value
        return out

    def forward(self, last: Sequence[int], pad_id: int, *, eager: bool = False) -> torch.Tensor:
        """Feed every row its last token in one step; logits (rows, vocab) in row order.

        The forward runs over slots 0..n-1 (``by_slot`` order; LoRA row names must use it too);
        free slots below n decode a pad at column 0, which nothing reads.
        """
        slots, lengths = self.table.rows, self.table.lengths
        ids, positions = self.by_slot(last, pad_id), self.by_slot([lengths[s] for s in slots], 0)
        for slot in slots:
            lengths[slot] += 1
        # ids and positions go to the GPU from pinned memory, queued: the CPU runs ahead to the replay
        pinned = self.device.type == "cuda"
        logits = self.decoder.step(row_index(ids, self.device).unsqueeze(1),
                                   torch.tensor(positions, dtype=torch.long, pin_memory=pinned), eager=eager)
        # a copy either way: the compiled step's output is overwritten by its next replay. Rows in slots
        # 0..k-1 (one stream runs in a 2-row bucket, say) are a slice; others an index_select, whose
        # index goes to the GPU from pinned memory, queued behind the step instead of waiting for it
        if slots == list(range(len(slots))):
            return logits[: len(slots)].clone()
        return logits.index_select(0, row_index(slots, self.device))

    def warm_up(self, pad_id: int, name: str) -> None:
        """Compile every batch bucket now; if that fails, with shapes specialized, and then decode eagerly.

        A compiler failure must cost speed, not the model.
        """
        first = self.decoder

        def specialized() -> SlotDecoder:  # several graphs, their guards checked
            return SlotDecoder(first.model, self.cache, compile_backend=first.compile_backend, cuda=first.cuda,
                               one_graph=False)

        for make in [lambda: first, *([specialized] if first.one_graph else [])]:
            self.decoder = make()
            try:
                self.decoder.warm_up(pad_id)
                return
            except Exception:
                log.warning("%s: torch.compile failed (%s)", name,
                            "one graph" if self.decoder.one_graph else "specialized shapes", exc_info=True)
                self.decoder.release()
        log.warning("%s: decoding the static cache eagerly", name)
        self.decoder = SlotDecoder(first.model, self.cache, compile_backend=None, cuda=False)
