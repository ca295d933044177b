"""Plain text skips the tool-call scanner while streaming (StreamingToolParser.passes), and streams exactly as through it.

The reference run is the same parser with the fast path turned off; the texts mix plain words
with every call syntax, their pieces, separators and blanks, cut at random places.
"""

from __future__ import annotations

import random

import pytest

from xllm_jupyter.openai import tool_stream
from xllm_jupyter.openai.tool_calling import ToolDeltas
from xllm_jupyter.openai.tool_stream import StreamingToolParser

NAMES = ["get_weather", "add"]
BITS = [
    "Sure", " the", " weather", ".", "\n", "  ", "\t", ";", ",", " a < b", "x[0]", " {", "}", "]", "[", "<", "tool",
    "<tool_call>", "</tool_call>", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}', '[TOOL_CALLS][{"name": "add", "arguments": {"a": 2}}]',
    "<|python_tag|>", '{"name": "add", "arguments": {"a": 1}}', '{"name": "nope", "arguments": {}}', "é😀", " 42",
]


def _stream(pieces: list[str], held: bool, parallel: bool) -> list:
    deltas = ToolDeltas(StreamingToolParser(NAMES, held=held), parallel)
    out = [deltas.deltas(p, None) for p in pieces] + [deltas.deltas("", "length")]
    # call ids are random: compare the rest
    return [[({**d, "tool_calls": [{**c, "id": "id" if "id" in c else None} for c in d["tool_calls"]]} if "tool_calls" in d
              else d, r) for d, r in step] for step in out]


def _pieces(rng: random.Random) -> list[str]:
    text = "".join(rng.choice(BITS) for _ in range(rng.randint(1, 14)))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    # a token held while its character is incomplete comes as a delta with no text
    return [q for p in pieces for q in (["", p] if rng.random() < 0.1 else [p])]


@pytest.mark.parametrize("held", [False, True])
def test_streams_as_through_the_scanner(monkeypatch, held):
    rng = random.Random(33 + held)
    cases = [_pieces(rng) for _ in range(1500)] + [["Hi", " there", "<", "tool_call>", '{"name": "add", "arguments": {}}',
                                                     "</tool_call>", ";", " and", " more"]]
    fast = [_stream(p, held, parallel) for p in cases for parallel in (True, False)]
    monkeypatch.setattr(StreamingToolParser, "passes", lambda self, text: False)
    assert fast == [_stream(p, held, parallel) for p in cases for parallel in (True, False)]


def test_plain_pieces_skip_the_scanner(monkeypatch):
    scanned = []
    real = tool_stream.scan
    monkeypatch.setattr(tool_stream, "scan", lambda text, *a: scanned.append(text) or real(text, *a))
    deltas = ToolDeltas(StreamingToolParser(NAMES), True)
    pieces = ["The", " capital", " of", " France", " is", " Paris", ".", "\n", "It", " has", " 2", ".", "1", "M", " people"]
    out = [d for p in pieces for d, _ in deltas.deltas(p, None)]
    assert out == [{"content": p} for p in pieces]
    assert scanned == ["The"]  # the first piece: blanks before anything else are held, so it is scanned
    parser = StreamingToolParser(NAMES)
    assert [e.content for p in pieces for e in parser.feed(p)] == pieces and parser.finish() == []
    assert scanned == ["The", "The", ""]  # (finish scans what is held: nothing)
