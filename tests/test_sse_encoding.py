"""The SSE writer's compact JSON (server/sse.py ``_compact_encoder``: the C encoder built once) gives the bytes
``JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode`` gives."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from xllm_jupyter.server import sse

_REFERENCE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode

VALUES = [
    {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": " héllo \u2028 \"q\" \\ \n\x00 😀"},
                                      "logprobs": None, "finish_reason": None}]},
    {"logprobs": {"content": [{"token": "\\xe3", "logprob": -9999.0, "bytes": [227],
                               "top_logprobs": [{"token": "a", "logprob": -1e-05, "bytes": [97]}]}]}},
    {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "small": 1.5e-300, "big": 10**40, "t": True},
    {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},
    ["a", ("tuple",), [], {}, 0, -0.0, None],
    "just a string",
    3,
]


@pytest.mark.parametrize("value", VALUES)
def test_same_bytes_as_the_json_encoder(value):
    assert sse.dumps(value) == _REFERENCE(value)
    assert sse.sse_event(value) == b"data: " + _REFERENCE(value).encode("utf-8") + b"\n\n"


def test_built_once_where_the_c_encoder_exists():
    if getattr(json.encoder, "c_make_encoder", None) is None:
        pytest.skip("no C encoder in this Python")
    assert getattr(sse._encode, "__self__", None) is None  # not JSONEncoder.encode, which builds it per call
    assert sse._compact_encoder() is not sse._encode  # (a fresh one each time it is asked)


def test_errors_as_the_json_encoder_raises_them():
    for bad in ({"x": object()}, {("tuple", "key"): 1}, {"x": b"bytes"}):
        with pytest.raises(TypeError) as ours:
            sse.dumps(bad)
        with pytest.raises(TypeError) as theirs:
            _REFERENCE(bad)
        assert str(ours.value) == str(theirs.value)


def test_falls_back_without_the_c_encoder(monkeypatch):
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    encode = sse._compact_encoder()
    assert encode.__self__.__class__ is json.JSONEncoder and encode(VALUES[0]) == _REFERENCE(VALUES[0])


class _Reason(str, enum.Enum):
    STOP = "stop"


class _Level(enum.IntEnum):
    TWO = 2


class _Float(float):
    pass


def test_same_bytes_for_subclasses_surrogates_and_deep_values():
    # str/int enums (FinishReason), float subclasses and lone surrogates (text decoded with surrogateescape)
    # as values and keys; the C encoder formats each the same way when built once
    odd = {_Reason.STOP: [_Reason.STOP, _Level.TWO, _Float(0.1), 2**200, -(2**64)], _Level.TWO: "\ud800 \udfff",
           _Float(1.5): {"nest": [[[[{"a": [None]}]]]]}}
    assert sse.dumps(odd) == _REFERENCE(odd)
    with pytest.raises(UnicodeEncodeError):  # same in both: the writer's UTF-8 encoding refuses it
        sse.sse_event({"x": "\ud800"})


def test_one_encoder_from_many_threads():
    # built once per process and shared by every thread that encodes (today the IOLoop's; the C encoder keeps no
    # state between calls with check_circular off)
    values = [{"i": i, "s": "é" * (i % 50), "l": list(range(i % 30)), "f": i / 7} for i in range(2000)]
    expected = [_REFERENCE(v) for v in values]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: [sse.dumps(v) for v in values] == expected, range(16)))
    assert all(results)
