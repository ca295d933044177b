"""The per-token event types' quick ``__init__`` (core/types.py ``_quick_init``) makes the instances a frozen
dataclass's own ``__init__`` would."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle

import pytest

from xllm_jupyter.core.types import ChoiceDelta, FinishReason, TokenEvent, TokenLogprob, _quick_init


def _reference(cls: type) -> type:
    """The same fields as a plain frozen dataclass (its generated ``__init__``)."""
    specs = [(f.name, f.type, dataclasses.field(default=f.default)) if f.default is not dataclasses.MISSING
             else (f.name, f.type) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"Reference{cls.__name__}", specs, frozen=True)


@pytest.mark.parametrize("cls, args, kwargs", [
    (TokenEvent, (3, 42, " the"), {"finish": FinishReason.LENGTH, "prompt_tokens": 9, "token_bytes": b" the"}),
    (TokenEvent, (), {"job_id": 1, "token_id": None, "text": ""}),
    (ChoiceDelta, (0, "hi", (1, 2), (TokenLogprob("hi", -0.5),)), {}),
    (ChoiceDelta, (1, ""), {"finish": FinishReason.STOP}),
])
def test_same_instance_as_a_frozen_dataclass(cls, args, kwargs):
    ours, ref = cls(*args, **kwargs), _reference(cls)(*args, **kwargs)
    assert cls.__init__.__qualname__ == f"{cls.__name__}.__init__"
    assert vars(ours) == vars(ref)
    assert ours == cls(*args, **kwargs) and hash(ours) == hash(cls(*args, **kwargs))
    assert repr(ours).partition("(")[2] == repr(ref).partition("(")[2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.text = "changed"  # type: ignore[misc]
    changed = dataclasses.replace(ours, text="other")
    assert changed.text == "other" and vars(changed) == {**vars(ours), "text": "other"}
    assert pickle.loads(pickle.dumps(ours)) == ours == copy.deepcopy(ours)
    assert str(inspect.signature(cls)) == str(inspect.signature(_reference(cls)))


def test_missing_and_unknown_arguments_raise_as_before():
    with pytest.raises(TypeError, match="missing 2 required positional arguments"):
        TokenEvent(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        ChoiceDelta(0, "", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        ChoiceDelta(0, "", index=1)  # type: ignore[misc]


def test_refuses_what_it_would_skip():
    @dataclasses.dataclass(frozen=True)
    class Factory:
        items: list = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class Post:
        x: int = 0

        def __post_init__(self) -> None:
            pass

    for cls in (Factory, Post):
        with pytest.raises(TypeError):
            _quick_init(cls)
