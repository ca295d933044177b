"""A copied or pickled xllm error says what the original said (the engine copies one error per sharing request)."""

from __future__ import annotations

import asyncio
import copy
import pickle

import pytest

from xllm_jupyter.core.errors import ModelLoadError, ModelNotFound, ModelRemoved, Overloaded, XllmError
from xllm_jupyter.engine.engine import Engine


@pytest.mark.parametrize("exc", [
    ModelNotFound("all-minilm"),
    ModelRemoved("tiny"),
    ModelLoadError.of("tiny", "transformers", OSError("x")),
    Overloaded("The engine was stopped; retry the request later"),
    XllmError("plain", param="input", code="odd"),
])
def test_copy_and_pickle_keep_message(exc: XllmError) -> None:
    for twin in (copy.copy(exc), pickle.loads(pickle.dumps(exc))):
        assert type(twin) is type(exc)
        assert str(twin) == str(exc)  # (was "The model 'The model 'all-minilm' does not exist' does not exist")
        assert twin.args == exc.args
        assert twin.to_openai() == exc.to_openai()
        assert twin.__dict__ == exc.__dict__


def test_shared_resolve_404_reads_right_for_every_caller() -> None:
    """Callers sharing one resolve of a missing model each get a 404 whose text names the model once."""
    engine = Engine.__new__(Engine)  # (only what a resolve needs: no catalog, so every name is missing)
    engine.catalog = None
    engine._resolving = {}

    async def both() -> list[BaseException]:
        return await asyncio.gather(engine._resolve_shared("nope"), engine._resolve_shared("nope"),
                                    return_exceptions=True)

    errors = asyncio.run(both())
    assert [type(e) for e in errors] == [ModelNotFound, ModelNotFound]
    assert errors[0] is not errors[1]
    assert [str(e) for e in errors] == ["The model 'nope' does not exist"] * 2
    assert engine._resolving == {}  # (a finished resolve is not kept: the next caller resolves afresh)
