"""The per-token event types' quick ``__init__`` (core/types.py ``_quick_init``) makes the instances a frozen
dataclass's own ``__init__`` would."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import typing

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


def test_introspection_resolves_in_the_class_module():
    # typing.get_type_hints / inspect.signature(eval_str=True) evaluate the string annotations in the
    # function's globals: the exec'd __init__ had a private dict for them (NameError: FinishReason)
    for cls in (TokenEvent, ChoiceDelta):
        assert cls.__init__.__module__ == "xllm_jupyter.core.types"
        hints = typing.get_type_hints(cls.__init__)
        assert hints == {**typing.get_type_hints(cls), "return": type(None)}
        assert str(inspect.signature(cls, eval_str=True)).startswith("(")


def test_any_field_name_keeps_its_value():
    @_quick_init
    @dataclasses.dataclass(frozen=True)
    class Named:
        d: int  # the generated code's own local was called d: the field got the instance dict
        _default_d: int = 5

    assert vars(Named(1)) == {"d": 1, "_default_d": 5}
    assert Named(1, 2) == Named(d=1, _default_d=2) != Named(1)


def test_refuses_keyword_only_fields():
    # a keyword-only field goes last in the dataclass's own __init__; quick init made it positional in place
    @dataclasses.dataclass(frozen=True)
    class KwOnly:
        a: int
        b: int = dataclasses.field(default=0, kw_only=True)
        c: int = 1

    with pytest.raises(TypeError, match="positional"):
        _quick_init(KwOnly)
