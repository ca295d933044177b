"""Stop-string matching over streamed text, holding back only what could still match.

Special tokens a reply's decoded text keeps (``GenerationParams.keep_special``: a harmony reply's markers, thinking
and tool-call markup) are not its text: a stop string never matches them nor across one (without them kept, they
would not be in the text at all), and kept text between an opener and its closer (``GenerationParams.stop_exempt``:
a harmony message's header, ``<|channel|>final<|message|>``) is no stop's either.
"""

from __future__ import annotations

import functools
import re

from ..core.types import GenerationParams


class _StopAutomaton:
    """Aho–Corasick automaton of a stop set; immutable, so matchers of the same stops share one.

    A node is a prefix of some stop string. After each character the matcher sits at the longest
    suffix of the text that is such a prefix, so the text to hold back is that node's depth, and the
    node says which stop (if any) ends there. Each character costs O(1) amortised, whatever the
    stops' lengths (searching the held tail for prefixes again cost their square per token).
    """

    __slots__ = ("goto", "fail", "depth", "hit", "starts")

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]  # node -> next node per character of the trie
        self.depth = [0]  # node -> the length of its prefix
        ends = [False]  # node -> whether its prefix is a whole stop string
        for stop in stops:
            node = 0
            for c in stop:
                nxt = self.goto[node].get(c)
                if nxt is None:
                    nxt = self.goto[node][c] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    ends.append(False)
                node = nxt
            ends[node] = True
        self.fail = [0] * len(self.goto)  # node -> the node of its longest proper suffix in the trie
        self.hit = [0] * len(self.goto)  # node -> the length of the longest stop its prefix ends with (0: none)
        order = list(self.goto[0].values())  # breadth first: a node's suffix is shallower, so done before it
        for node in order:
            for c, child in self.goto[node].items():
                order.append(child)
                if node:
                    self.fail[child] = self._next(self.fail[node], c)
        for node in order:
            self.hit[node] = self.depth[node] if ends[node] else self.hit[self.fail[node]]
        # the characters a stop string begins with: from the root, text without one moves nowhere
        starts = "".join(re.escape(c) for c in sorted(self.goto[0]))
        self.starts = re.compile(f"[{starts}]") if starts else None

    def _next(self, node: int, c: str) -> int:
        """The node after ``c`` from ``node``."""
        while True:
            nxt = self.goto[node].get(c)
            if nxt is not None:
                return nxt
            if not node:
                return 0
            node = self.fail[node]


@functools.lru_cache(maxsize=16)  # (most requests repeat a few stop sets; a 4 x 512-character one is ~0.7 MB)
def _automaton(stops: tuple[str, ...]) -> _StopAutomaton:
    return _StopAutomaton(stops)


class MarkedStopMatcher:
    """A StopMatcher over the text between kept special tokens (``markers``), exempting the spans ``exempt`` opens
    and closes; the markers and exempt text pass through unmatched, and a marker releases any partial match held."""

    __slots__ = ("_inner", "_split", "_opens", "_closers")

    def __init__(self, stops: tuple[str, ...], markers: tuple[str, ...], exempt: tuple[tuple[str, str], ...] = ()):
        self._inner = StopMatcher(stops)
        every = sorted({*markers, *(m for span in exempt for m in span)}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, every)) + ")")
        self._opens: dict[str, frozenset[str]] = {}  # opener -> the markers that close its span
        for opener, closer in exempt:
            self._opens[opener] = self._opens.get(opener, frozenset()) | {closer}
        self._closers: frozenset[str] = frozenset()  # those that end the exempt span the text is in (empty: none)

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings."""
        return self._inner.stops

    def feed(self, text: str) -> tuple[str, str | None]:
        """As StopMatcher.feed, the markers and exempt spans in ``text`` passed through unmatched."""
        out: list[str] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # a marker: no partial match continues across it
                out.append(self._inner.flush())
                out.append(part)
                if not self._closers:
                    self._closers = self._opens.get(part, frozenset())
                elif part in self._closers:
                    self._closers = frozenset()
            elif self._closers:
                out.append(part)
            elif part:
                safe, stop = self._inner.feed(part)
                out.append(safe)
                if stop is not None:
                    return "".join(out), stop
        return "".join(out), None

    def flush(self) -> str:
        """Release whatever is held."""
        return self._inner.flush()


def stop_matcher(params: GenerationParams) -> StopMatcher | MarkedStopMatcher:
    """The matcher of ``params``' stop strings: around the special tokens its text keeps, where it keeps any."""
    if not any(params.stop) or not params.keep_special:
        return StopMatcher(params.stop)
    return MarkedStopMatcher(params.stop, params.keep_special, params.stop_exempt)


class StopMatcher:
    """Feeds streamed text; releases text that cannot be part of a stop string.

    Only the longest tail of the buffer that is a prefix of some stop string is held
    back, so text without stop-string beginnings streams with no delay.
    """

    __slots__ = ("stops", "_buf", "_auto", "_node")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._buf = ""  # the held text: the prefix of node _node
        self._auto = _automaton(self.stops) if self.stops else None
        self._node = 0

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add ``text``; return (text safe to emit, the stop string that matched or None).

        Of stops beginning at the earliest match, the one that ends first (the shortest) is the one reported.
        """
        auto = self._auto
        if auto is None:
            return text, None
        if not self._node and auto.starts.search(text) is None:  # most tokens: nothing held, no stop begins
            return text, None
        buf = self._buf + text
        goto, fail, depth, hit, starts = auto.goto, auto.fail, auto.depth, auto.hit, auto.starts
        node, i, end, cut, length = self._node, len(self._buf), len(buf), -1, 0
        while i < end:
            if not node:  # at the root only a stop's first character moves: find the next at C speed
                found = starts.search(buf, i)
                if found is None:
                    break
                i = found.start()
            c = buf[i]
            while True:
                nxt = goto[node].get(c)
                if nxt is not None:
                    node = nxt
                    break
                if not node:
                    break
                node = fail[node]
            i += 1
            if hit[node] and (cut == -1 or i - hit[node] < cut):
                cut, length = i - hit[node], hit[node]
            # a stop matched: go on only while a partial match begins before it (the earliest one is cut at)
            if cut != -1 and i - depth[node] >= cut:
                break
        if cut != -1:
            self._buf, self._node = "", 0
            return buf[:cut], buf[cut : cut + length]
        hold = depth[node]
        self._buf, self._node = (buf[end - hold :], node) if hold else ("", 0)
        return buf[: end - hold], None

    def flush(self) -> str:
        """Release whatever is held (the sequence ended without a match)."""
        out, self._buf, self._node = self._buf, "", 0
        return out
