"""Embedding models: a transformers encoder + sentence-transformers pooling + L2 normalisation.

Reads the sentence-transformers layout (``1_Pooling/config.json``,
``sentence_bert_config.json``) without needing the sentence-transformers package.
torch and transformers are imported inside ``load`` so importing this module is cheap.
Its forwards run on one worker thread at a time (the engine's per-model executor); its
tokenizer is called from any thread, without a lock when it is a settled Rust one (as a chat
model's: hf_tokenizer.py), so one user's big batch does not hold up another's tokenizing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core import gc_freeze
from ..core.errors import ContextLengthExceeded, EngineError, InvalidRequest, ModelLoadError
from .base import ModelSpec
from .compile_gate import COMPILE_GATE
from .file_errors import file_errors
from .hf_tokenizer import TokenizerGuard
from .load_lock import exclusive_load
from .native_libs import preload_torch
from .quiet_loading import library_bars_off
from .tokenizer_files import load_tokenizer, release as release_tokenizer
from .torch_device import is_out_of_memory, out_of_memory, pick_device, placement, release_memory

#: inputs per forward pass: bounds activation memory for big requests
CHUNK = 64
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")


def read_pooling(directory: Path) -> str:
    """The pooling mode from ``1_Pooling/config.json`` (``mean`` when there is none)."""
    try:
        data = json.loads((directory / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"
    if isinstance(data.get("pooling_mode"), str) and data["pooling_mode"] in POOLING_MODES:
        return data["pooling_mode"]
    for mode in ("cls", "max", "mean_sqrt_len", "mean"):
        if data.get(f"pooling_mode_{mode}_token") or data.get(f"pooling_mode_{mode}_tokens"):
            return mode
    return "mean"


def read_max_length(directory: Path, fallback: int) -> int:
    """Tokens per input the model was trained for: ``sentence_bert_config.json``'s max_seq_length."""
    try:
        value = json.loads((directory / "sentence_bert_config.json").read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        value = None
    return min(value, fallback) if isinstance(value, int) and value > 0 else fallback


class EmbeddingModel:
    """A loaded encoder that turns texts or token ids into unit-length float32 vectors."""

    backend_name = "transformers"

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, device: Any, pooling: str, max_length: int):
        self.name = spec.name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pooling = pooling
        #: tokens per input, special tokens included
        self.context_length = max_length
        self.dimension = int(model.config.hidden_size)
        self.vocab_size = len(tokenizer)
        self._guard = TokenizerGuard(tokenizer)  # (settles it first: special_wrapping's encodes then only read it)
        self._prefix, self._suffix = special_wrapping(tokenizer)
        self._specials = len(self._prefix) + len(self._suffix)
        # counted once: the weights never change, and a listing may ask while unload() drops them
        self._bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @property
    def max_input_tokens(self) -> int:
        """Tokens one input may have, special tokens excluded."""
        return self.context_length - self._specials

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (thread-safe)."""
        with self._guard():
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_ids(self, index: int, ids: Sequence[int]) -> None:
        """400 when input ``index`` is empty, too long or holds ids outside the vocabulary."""
        if not ids:
            raise InvalidRequest(f"Input {index} is empty; every input must have at least one token.", param="input")
        if len(ids) > self.max_input_tokens:
            raise ContextLengthExceeded(
                f"This model's maximum input length is {self.max_input_tokens} tokens, but input {index} has "
                f"{len(ids)} tokens. Please reduce the length of the input.",
                param="input",
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            # the usual sender: a client that tokenized with OpenAI's tiktoken for an OpenAI model
            raise InvalidRequest(
                f"Input {index} holds token id {bad}, outside the vocabulary (0..{self.vocab_size - 1}). Token-id inputs "
                "must be this model's own token ids; a client that tokenizes with tiktoken (LangChain's OpenAIEmbeddings "
                "by default) must send text instead (check_embedding_ctx_length=False).", param="input")

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit-length embeddings (float32, one row per input) of already-checked token ids."""
        import torch

        out = np.empty((len(batch), self.dimension), dtype=np.float32)
        # sort by length so each chunk pads little; rows go back to input order via ``order``
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        for start in range(0, len(order), CHUNK):
            rows = order[start : start + CHUNK]
            wrapped = [self._prefix + list(batch[i]) + self._suffix for i in rows]
            width = max(len(w) for w in wrapped)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, w in enumerate(wrapped):
                ids[r, : len(w)] = torch.tensor(w, dtype=torch.long)
                mask[r, : len(w)] = 1
            with torch.inference_mode(), COMPILE_GATE.forward():  # never beside a chat model's torch.compile trace
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                vectors = pool(hidden.float(), mask.to(self.device), self.pooling)
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            out[rows] = vectors.cpu().numpy()
        return out

    def memory_bytes(self) -> int:
        """Bytes of weights (0 once unloaded)."""
        return self._bytes if self.model is not None else 0

    def details(self) -> dict[str, Any]:
        """Facts for ``/v1/models`` and ``xllm ps``."""
        return {"task": "embedding", "dimension": self.dimension, "pooling": self.pooling, "device": str(self.device)}

    def unload(self) -> None:
        """Drop the weights and give their memory back to the device."""
        full = gc_freeze.is_frozen(self.model)  # unfrozen since its load: a plain collection frees its cycles
        self.model = None
        release_tokenizer(self.tokenizer)  # kept a while: a reload (keep_alive ran out) reads nothing again
        release_memory(full)


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text's tokens ([CLS] ... [SEP] for BERT)."""
    probe = "hello world"
    raw = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    for start in range(len(full) - len(raw) + 1):
        if full[start : start + len(raw)] == raw:
            return full[:start], full[start + len(raw) :]
    return [], []  # a post-processor that rewrites tokens: feed ids as given


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """One vector per row of ``hidden`` (batch, tokens, dim), ignoring padded positions."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def import_libraries() -> None:
    """Import torch and transformers' model loading (most of a process's first load); EngineError if missing."""
    preload_torch()  # torch's native libraries with the GIL released (native_libs.py)
    try:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModel  # noqa: F401
    except ImportError:
        raise EngineError("Embedding models need torch and transformers installed") from None


def load_embedding_model(spec: ModelSpec) -> EmbeddingModel:
    """Load an HF encoder directory as an embedding model (slow: call it off the event loop)."""
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        raise EngineError("Embedding models need torch and transformers installed") from None
    directory = Path(spec.path)
    if spec.format != "safetensors" or not (directory / "config.json").is_file():
        raise InvalidRequest(f"The embedding model '{spec.name}' must be an HF safetensors directory", param="model")
    device = pick_device(spec.options.device)
    threads = spec.options.torch_threads
    if threads > 0:  # the same process-wide setting the chat backend applies
        torch.set_num_threads(threads)
    try:
        with library_bars_off():
            tokenizer = load_tokenizer(directory)
            # float32 everywhere: these encoders are small and half precision costs accuracy
            with exclusive_load():  # (load_lock.py: a load patches transformers and torch process-wide)
                model = AutoModel.from_pretrained(str(directory), dtype=torch.float32, **placement(device))
        model.to(device).eval()
    except file_errors() as exc:  # (torch's OutOfMemoryError is a RuntimeError)
        if not is_out_of_memory(exc):
            # the chat backends' load error: it names the model and says a retry will not help (a bare EngineError
            # was a generic 500 "retry the request"); the library's message names local paths, kept in the cause
            raise ModelLoadError.of(spec.name, "transformers", exc, spec.created_from) from exc
        model = None
    if model is None:  # out of memory; freed here, once the error's frames are gone
        release_memory()
        raise out_of_memory(spec.name, device)
    positions = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    return EmbeddingModel(spec, model, tokenizer, device, read_pooling(directory), read_max_length(directory, positions))
