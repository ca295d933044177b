"""The compiled decode step meets inductor's conditions for CUDA graphs, checked without a GPU.

On a GPU, ``torch.compile(mode="reduce-overhead")`` does not fail when a graph cannot be
captured: it logs "skipping cudagraphs due to ..." and runs the step op by op, several times
slower, which only a GPU benchmark would show. Inductor skips when the graph holds a tensor that
is not on the GPU, mutates an input whose address is not fixed (our slot cache must be marked
static), or contains an op CUDA graphs cannot capture (data-dependent sizes, ``.item()``).

Here the slot decoder is traced exactly as dynamo and AOTAutograd trace it for inductor (its
decompositions, input mutations kept in the graph) over a Llama whose weights and cache are
fake CUDA tensors (devices and shapes, no memory, no GPU), and each graph gets inductor's three
checks. Fake CUDA tensors need a torch built with CUDA: benchmarks/gpu/cpu_check.sh runs this
here in the GPU machine's build (torch 2.11+cu130), and the GPU session runs it there; a
CPU-only torch (CI) skips it. ``tests/test_hf_compiled.py`` records real CUDA graphs on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from xllm_jupyter.backends.hf_compiled import SlotDecoder
from xllm_jupyter.backends.slot_attention import use_slot_sdpa
from xllm_jupyter.backends.slot_cache import SlotCache

pytestmark = [
    pytest.mark.cuda_build,
    pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a torch built with CUDA"),
]

VOCAB = 1000
#: the benchmark model's layout (Llama: grouped KV heads, tied embeddings) at a size that traces fast
LLAMA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
         "tie_word_embeddings": True}
CUDA = torch.device("cuda", 0)


class CudaGraphAudit:
    """A ``torch.compile`` backend that traces like inductor and records why inductor would skip CUDA graphs."""

    def __init__(self, mode) -> None:
        """``mode``: the FakeTensorMode the model's tensors belong to (the compiled step runs in it)."""
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        self.mode = mode
        #: why inductor would run a graph without CUDA graphs, one line per finding
        self.problems: list[str] = []
        #: graphs compiled (each a recompile dynamo asked for)
        self.graphs = 0
        #: the shape of every tensor the graphs compute (symbolic sizes as strings)
        self.shapes: set[tuple[str, ...]] = set()
        self.backend = aot_autograd(fw_compiler=self._inspect, decompositions=select_decomp_table(),
                                    keep_inference_input_mutations=True)

    def _inspect(self, gm, example_inputs) -> Callable[..., Any]:
        from torch._guards import TracingContext
        from torch._inductor.utils import get_first_incompatible_cudagraph_node

        self.graphs += 1
        # what inductor treats as fixed addresses: parameters, buffers, mark_static_address
        static = set(TracingContext.get().fw_metadata.static_input_indices)
        placeholders = gm.graph.find_nodes(op="placeholder")
        index = {node: i for i, node in enumerate(placeholders)}
        mutated: set[int] = set()
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and node.op == "call_function":
                self.shapes.add(tuple(str(size) for size in val.shape))
            if isinstance(val, torch.Tensor) and val.device.type != "cuda":
                self.problems.append(f"{node.name} ({node.target}) is on {val.device}")
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                for schema, arg in zip(node.target._schema.arguments, node.args):
                    if schema.alias_info is not None and schema.alias_info.is_write and arg in index:
                        mutated.add(index[arg])
        if (node := get_first_incompatible_cudagraph_node(gm)) is not None:
            self.problems.append(f"{node.name} ({node.target}) cannot be captured")
        if mutated - static:
            names = [placeholders[i].name for i in sorted(mutated - static)]
            self.problems.append(f"mutates inputs without a fixed address: {names}")

        def run(*args):
            with self.mode:  # the graph makes new (fake) CUDA tensors
                return gm.forward(*args)

        return run


def fake_cuda_llama(mode, **config):
    """A Llama whose parameters and buffers are fake fp16 CUDA tensors of ``mode`` (ties kept)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config)).eval().to(torch.float16)
    fakes: dict[int, Any] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in fakes:
                    fakes[id(param)] = torch.nn.Parameter(FakeTensor(mode, param.data, CUDA), requires_grad=False)
                module._parameters[name] = fakes[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = FakeTensor(mode, buf, CUDA)
    return model


@pytest.fixture()
def fake_mode():
    """A fake tensor mode that also takes real CPU tensors (the step's positions are real)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def audited_decoder(mode, *, slots: int, tokens: int) -> tuple[SlotDecoder, CudaGraphAudit]:
    """A slot decoder over the fake CUDA Llama, compiled through the audit."""
    # sdpa, as from_pretrained picks on a GPU. (Eager attention is left out: in some
    # transformers versions, 5.17 for one, its mask makes a one-element constant on the device,
    # which tracing computes for real, and that needs a driver.)
    model = fake_cuda_llama(mode, **LLAMA, attn_implementation="sdpa")
    assert use_slot_sdpa(model)  # as StaticBatch does: grouped-query decode without repeated keys
    heads, dim = LLAMA["num_key_value_heads"], LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    audit = CudaGraphAudit(mode)
    with mode:
        cache = SlotCache([((heads, dim, dim), torch.float16)] * LLAMA["num_hidden_layers"], slots, tokens, CUDA)
        return SlotDecoder(model, cache, compile_backend=audit.backend, cuda=False), audit


def test_every_decode_shape_compiles_to_a_graph_inductor_can_capture(fake_mode):
    decoder, audit = audited_decoder(fake_mode, slots=4, tokens=1024)
    with fake_mode:
        ids = {n: torch.zeros((n, 1), dtype=torch.long, device=CUDA) for n in decoder.widths}
    with torch.inference_mode():
        for n, window in decoder.warm_up_shapes():  # every (rows, window) pair a step can take
            logits = decoder.step(ids[n], torch.full((n,), window - 1, dtype=torch.long))
            assert tuple(logits.shape) == (n, VOCAB) and logits.device == CUDA
    assert decoder.widths == (2, 4) and decoder.windows == (256, 512, 1024)
    assert audit.graphs == 1  # rows and window traced as sizes that vary: one graph for all
    assert audit.problems == []
    # keys and values stay per key/value head: no (rows, query heads, window, dim) copy of them
    heads, dim = str(LLAMA["num_attention_heads"]), str(LLAMA["hidden_size"] // LLAMA["num_attention_heads"])
    four_d = [shape for shape in audit.shapes if len(shape) == 4]
    assert four_d and not [s for s in four_d if s[1] == heads and s[3] == dim and s[2] != "1"], four_d


def test_the_audit_finds_what_would_make_inductor_skip_cuda_graphs(fake_mode):
    audit = CudaGraphAudit(fake_mode)
    with fake_mode:
        buffer = torch.zeros(8, device=CUDA)  # not marked static: its address may change
        x = torch.ones(8, device=CUDA)

    def step(x):
        buffer.add_(x)
        return x * torch.arange(8).to(x.device)  # made on the CPU, then moved

    torch.compile(step, backend=audit.backend, fullgraph=True)(x)
    assert audit.graphs == 1
    assert any("mutates inputs without a fixed address" in p for p in audit.problems), audit.problems
    assert any("is on cpu" in p for p in audit.problems), audit.problems
