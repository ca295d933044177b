"""The per-token paths made cheaper give the same output as the plain algorithms they replace.

Each check runs the project's code and a plain reference (the algorithm as it was written before it
was made faster) over thousands of random streams: multi-byte characters split over tokens, stop
strings cut at every point, tool-call markup split anywhere.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.models import smollm2_tokenizer
from xllm_jupyter.backends.detokenize import IncrementalDetokenizer, PieceDecoder
from xllm_jupyter.engine.stops import StopMatcher
from xllm_jupyter.openai import tool_scan
from xllm_jupyter.openai.tool_stream import StreamingToolParser


@pytest.fixture(scope="module")
def decode():
    tok = smollm2_tokenizer()

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    decode.tokenizer = tok
    return decode


def _reference_detokenize(decode, prompt, ids):
    """Decode the emitted window with and without the new tokens, every token; hold text ending in U+FFFD."""
    window, prefix, read, out = list(prompt[-5:]), 0, len(prompt[-5:]), []
    for n, token in enumerate([*ids, None]):
        final = token is None
        if final and read == len(window):
            out.append("")
            break
        if not final:
            window.append(token)
        before, after = decode(window[prefix:read]) if read > prefix else "", decode(window[prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            out.append("")
            continue
        out.append(after[len(before):])
        prefix, read = read, len(window)
    return out


def test_detokenizer_matches_the_two_decode_reference(decode):
    tok, rng = decode.tokenizer, random.Random(7)
    texts = ["héllo wörld ", "日本語のテキスト", "emoji 😀🎉 ok", "  spaces\n\n", "Ω≈ç√∫", "a<b>{c}"]
    pieces = PieceDecoder(decode)  # shared by every stream, as a model's jobs share it
    for _ in range(300):
        if rng.random() < 0.5:
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 20))]
        else:  # real text (characters split over byte-level tokens), with stray tokens mixed in
            ids = tok.encode("".join(rng.choice(texts) for _ in range(rng.randrange(1, 4))), add_special_tokens=False)
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(len(tok)))
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 8))]
        detok = IncrementalDetokenizer(pieces, prompt)
        got = [detok.push(t) for t in ids] + [detok.flush()]
        assert got == _reference_detokenize(decode, prompt, ids), (prompt, ids)


def test_detokenizer_decodes_once_per_token(decode):
    calls = []

    def counted(ids):
        calls.append(len(ids))
        return decode(ids)

    ids = decode.tokenizer.encode(" the cat sat on the mat and the cat sat again", add_special_tokens=False)
    pieces = PieceDecoder(counted)
    for t in ids:  # warm: each token decoded alone once
        pieces([t])
    calls.clear()
    detok = IncrementalDetokenizer(pieces, ids[:3])
    detok.push(ids[3])  # the first token decodes the prompt's context too
    calls.clear()
    text = "".join(detok.push(t) for t in ids[4:])
    assert text == decode(ids[3:])[len(decode(ids[3:4])):]
    assert len(calls) == len(ids) - 4  # the window with the new token only: the one before is remembered


def _reference_stops(stops, pieces):
    """Search every stop string in held + new text, then hold the longest tail that begins one; a match reports the
    stop found earliest, the shortest of those beginning there (the one that ends first)."""
    stops, held, out = [s for s in stops if s], "", []
    for text in pieces:
        if not stops:
            out.append((text, None))
            continue
        buf = held + text
        found = sorted((i, len(s), s) for s, i in ((s, buf.find(s)) for s in stops) if i != -1)
        if found:
            out.append((buf[:found[0][0]], found[0][2]))
            return out, ""
        hold = max([k for s in stops for k in range(1, min(len(s) - 1, len(buf)) + 1) if buf.endswith(s[:k])],
                   default=0)
        held = buf[len(buf) - hold:]
        out.append((buf[:len(buf) - hold], None))
    return out, held


def _matched(stops, pieces):
    """StopMatcher's (released text, matched stop) per piece up to a match, and what it holds back at the end."""
    matcher, out = StopMatcher(stops), []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if out[-1][1]:
            break
    return out, matcher.flush()


def test_stop_matcher_matches_the_reference():
    rng, alphabet = random.Random(3), "ab<>/#\n -]^\\é日😀"
    for _ in range(4000):
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5))) for _ in range(rng.randrange(4)))
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(4))) for _ in range(rng.randrange(1, 12))]
        assert _matched(stops, pieces) == _reference_stops(stops, pieces), (stops, pieces)


@pytest.mark.parametrize("alphabet", ["ab", "aab\n", "a日😀"])
def test_stop_matcher_matches_the_reference_on_overlapping_stops(alphabet):
    # few characters, long stops: stops that begin, end or overlap others ("aab"/"ab", "abab"/"ab"), a match
    # that begins before another ends, partial matches that fail deep into a stop
    rng = random.Random(7)
    for _ in range(1500):
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14))) for _ in range(rng.randrange(1, 5)))
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 2, 5, 20)))) for _ in range(20)]
        assert _matched(stops, pieces) == _reference_stops(stops, pieces), (stops, pieces)


def _feed_cost(stops, piece, count=1500):
    """Seconds per feed of ``piece`` (best of 5 runs)."""
    best = float("inf")
    for _ in range(5):
        matcher, start = StopMatcher(stops), time.perf_counter()
        for _ in range(count):
            matcher.feed(piece)
        best = min(best, time.perf_counter() - start)
    return best / count


def test_stop_matching_costs_a_token_the_same_whatever_the_stops_length():
    # "aaaa..." held at a stop's full length, with three stops that are never held checked first: searching the
    # held tail for each stop's prefixes cost the square of the stop's length per token (~0.15 ms at 512)
    def stops(n):
        return tuple(c * n + "z" for c in "bcda")

    short, long = _feed_cost(stops(8), "a"), _feed_cost(stops(511), "a")
    assert long < 10 * short, (long, short)


def _every_marker_at(text, i, names, final):
    """The marker check trying each marker in turn, whatever the character."""
    for marker in tool_scan._MARKERS:
        if text.startswith(marker, i):
            j = tool_scan._SPACE.match(text, i + len(marker)).end()
            if j == len(text):
                return None if final else tool_scan._HOLD
            span = tool_scan._json_at(text, j, names, final) or tool_scan._v11_at(text, j, names, final)
            return span if span is tool_scan._HOLD or (span and span[1]) else None
        if tool_scan._cut_short(text, i, marker, final):
            return tool_scan._HOLD
    return None


FRAGMENTS = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
             '<tool_call>{"name": "add"', '<|python_tag|>{"name": "add", "parameters": {"a": 2}}',
             '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3}}]', '[TOOL_CALLS]add[ARGS]{"a": 4}', '{"name": "get_weather", "parameters": {}}',
             '[1, 2]', '{"a": tru', '{bad}', 'x < 3', '<|python', '[TOOL', '<tool', '</tool_call>', ' text ', '\n',
             ';', 'é😀', '{', '[', '<', '"', '}', ']', '[TOOL_CALLS] no', '<|python_tag|> ']


def _events(names, pieces):
    parser = StreamingToolParser(names)
    out = [parser.feed(p) for p in pieces] + [parser.finish()]
    return [[(e.content, e.index, e.id is not None, e.name, e.arguments) for e in step] for step in out]


def test_tool_scanner_matches_trying_every_construct_everywhere(monkeypatch):
    rng = random.Random(5)
    cases = []
    for _ in range(600):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 5)))
        names = rng.choice([(), ("add",), ("add", "get_weather")])
        k = rng.randrange(len(text) + 1)
        cases.append((text, names, [text[:k], text[k:]], list(text)))

    def run():
        out = []
        for text, names, halves, chars in cases:
            for final in (False, True):
                pieces, end, skip = tool_scan.scan(text, frozenset(names), final)
                out.append(([p if isinstance(p, str) else (p.name, p.arguments) for p in pieces], end, skip))
            out.append((_events(names, halves), _events(names, chars)))
        return out

    fast = run()
    every = (_every_marker_at, tool_scan._block_at, tool_scan._json_at)
    monkeypatch.setattr(tool_scan, "_TRIES", dict.fromkeys("<[{", every))
    assert fast == run()
