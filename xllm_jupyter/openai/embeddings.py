"""``POST /v1/embeddings``: the OpenAI embeddings wire format over ``Engine.embed``.

No HTTP here. Inputs are a string, a list of strings, a list of token ids or a list of
token-id lists, as the OpenAI API takes them; vectors come back as float lists or as
base64 of little-endian float32 bytes (what the openai SDK asks for by default).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..core.errors import InvalidRequest
from ..engine.manager import request_keep_alive
from .offload import parse_body
from .protocol import StrictModel

#: most inputs one request may carry (OpenAI's limit)
MAX_INPUTS = 2048


class EmbeddingRequest(StrictModel):
    """The ``/v1/embeddings`` request body."""

    model: str = Field(min_length=1)
    input: Any = None
    # null is float, as api.openai.com takes it: LiteLLM 1.80.11+ and clients built on it send it when none is set
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    keep_alive: float | str | None = None  # Ollama's: seconds or "5m"; 0 = unload after, negative = forever

    def check(self) -> None:
        """Shape checks the JSON types cannot express; ``inputs()`` does the rest."""
        self.inputs()

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list of strings or a list of token-id lists; 400 (param ``input``) when malformed."""
        value = self.input
        if value is None:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(_is_token(t) for t in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise InvalidRequest("'input' must be a non-empty string, array of strings, or array of token arrays", param="input")
        if len(value) > MAX_INPUTS:
            raise InvalidRequest(f"Too many inputs: {len(value)}. At most {MAX_INPUTS} inputs are allowed per request.", param="input")
        if all(isinstance(x, str) for x in value):
            for i, text in enumerate(value):
                if not text:
                    raise InvalidRequest(f"Input {i} is an empty string; every input must be non-empty.", param="input")
            return value
        if all(isinstance(x, list) and all(_is_token(t) for t in x) for x in value):
            for i, ids in enumerate(value):
                if not ids:
                    raise InvalidRequest(f"Input {i} is an empty token array; every input must be non-empty.", param="input")
            return value
        raise InvalidRequest(
            "'input' must be a string, an array of strings, an array of token ids, or an array of token-id arrays "
            "(not a mix)",
            param="input",
        )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first ``dimensions`` components and re-normalise (Matryoshka-style truncation)."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


def encode_vector(vector: np.ndarray, encoding_format: str | None) -> list[float] | str:
    """One embedding as floats (``encoding_format`` float or null), or as base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()  # one C call: 2,048 x 1,024 floats in ms, not seconds


async def create_embeddings(engine: Any, body: bytes, manages: bool = True, user: str | None = None) -> dict[str, Any]:
    """``POST /v1/embeddings``: the OpenAI response dict (``manages``: the caller may send ``keep_alive``; ``user``:
    the authenticated caller, whose turn a huge input is tokenized in)."""
    req: EmbeddingRequest = await parse_body(EmbeddingRequest, body)
    keep_alive = request_keep_alive(req.keep_alive, manages)
    _check_dimensions(req, engine.embedding_dimension(req.model))  # before the forward when loaded
    result = await engine.embed(req.model, req.inputs(), keep_alive=keep_alive, user=user)
    _check_dimensions(req, result.vectors.shape[1])
    vectors = shorten(result.vectors, req.dimensions)
    if len(vectors) <= _INLINE_VECTORS:
        data = _data(vectors, req.encoding_format)
    else:  # a big batch: off the IOLoop, which every stream shares
        data = await asyncio.to_thread(_data, vectors, req.encoding_format)
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


#: batches up to this many vectors are encoded on the IOLoop (a thread hop costs more than they do)
_INLINE_VECTORS = 64


def _data(vectors: np.ndarray, encoding_format: str | None) -> list[dict[str, Any]]:
    """The response's ``data`` items for ``vectors``."""
    return [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)]


def _check_dimensions(req: EmbeddingRequest, size: int | None) -> None:
    if size is not None and req.dimensions is not None and req.dimensions > size:
        raise InvalidRequest(f"dimensions must be at most {size} for the model '{req.model}'", param="dimensions")
