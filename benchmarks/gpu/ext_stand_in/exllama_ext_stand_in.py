"""For ``api_check.sh``: exllamav3's compiled extension module stood in, so that the library's Python code
(generator, jobs, page table, sampler steps, grammar filter) imports on a machine without CUDA. Imported at
start-up by ``sitecustomize.py`` beside it, in the test process and in every process it starts.

Every kernel raises ``NotImplementedError`` when called, and reads as false where the library tests a
capability flag (``ext.HAS_...``). The host-side helpers the generator calls are reimplemented: the page
table's ``count_match_tensor`` while it schedules prefill, and n-gram drafting's suffix automaton
``BC_SAM``. The checks ``pytest -m exllama`` runs take the forward and the CUDA sampling out already
(``tests/page_generator.py``); one that reaches a kernel fails by name.
Not for measuring anything: ``cross_build.sh`` and ``cpu_check.sh`` run the real module.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types


class _Kernel:
    """A stood-in kernel (or flag): false, and raising when called."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"exllamav3_ext.{self.name} is stood in (api_check.sh: no CUDA extension)")

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, item: str) -> "_Kernel":
        return _Kernel(f"{self.name}.{item}")


def count_match_tensor(a, b, max_a: int) -> int:
    """Leading positions where ``a`` (a page's tokens) and ``b`` (1, n) agree, at most ``max_a`` (the C++ helper)."""
    left, right = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    limit = min(int(max_a), int(b.shape[1]), len(left))
    n = 0
    while n < limit and left[n] == right[n]:
        n += 1
    return n


class BC_SAM:
    """n-gram drafting's suffix automaton (the C++ ``BC_SAM`` of ``exllamav3_ext/sam.cpp``, same steps): each
    accepted token first extends the running match over the tokens before it, then the automaton."""

    def __init__(self):
        self.reset()

    def reset(self, reserve_tokens: int = 0) -> None:
        """Empty: the root state alone (``reserve_tokens`` only sizes the C++ buffers)."""
        self.link, self.max_len, self.min_end, self.edges = [-1], [0], [0x7FFFFFFF], [{}]
        self.last = self.match_state = self.match_len = self.pos = 0

    def length(self) -> int:
        """Tokens accepted."""
        return self.pos

    def _new_state(self, max_len: int, link: int, min_end: int, edges: dict | None = None) -> int:
        self.link.append(link)
        self.max_len.append(max_len)
        self.min_end.append(min_end)
        self.edges.append(dict(edges or {}))
        return len(self.link) - 1

    def _advance_match(self, token: int) -> tuple[int, int]:
        state, length = self.match_state, self.match_len
        while state != 0 and token not in self.edges[state]:
            state = self.link[state]
            length = min(length, self.max_len[state])
        if token in self.edges[state]:
            state, length = self.edges[state][token], length + 1
        else:
            state, length = 0, 0
        self.match_state, self.match_len = state, length
        return state, length

    def _extend(self, token: int) -> None:
        cur = self._new_state(self.max_len[self.last] + 1, 0, self.pos)
        p = self.last
        while p != -1 and token not in self.edges[p]:
            self.edges[p][token] = cur
            p = self.link[p]
        if p != -1:
            q = self.edges[p][token]
            if self.max_len[p] + 1 == self.max_len[q]:
                self.link[cur] = q
            else:
                clone = self._new_state(self.max_len[p] + 1, self.link[q], self.min_end[q], self.edges[q])
                while p != -1 and self.edges[p].get(token) == q:
                    self.edges[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur
        self.pos += 1

    def _span(self, state: int, length: int) -> tuple[int, int]:
        if length <= 0:
            return -1, -1
        end = self.min_end[state] + 1  # (exclusive) of the first occurrence
        return end - length, end

    def accept(self, token: int) -> tuple[int, int]:
        """(begin, end) of the first earlier occurrence of the longest suffix ending in ``token``, then accept it."""
        state, length = self._advance_match(int(token))
        self._extend(int(token))
        return self._span(state, length)

    def accept_tensor(self, tokens) -> tuple[int, int]:
        """Accept the tokens of ``tokens`` (a whole (1, n) sequence) past those already accepted (a shorter one,
        rewound: rebuilt from it); the match of its last token as ``accept``, (-1, -1) when nothing is new."""
        ids = tokens.reshape(-1).tolist()
        if len(ids) < self.pos:
            self.reset(len(ids))
        new = ids[self.pos:]
        if not new:
            return -1, -1
        for token in new[:-1]:
            self._advance_match(int(token))
            self._extend(int(token))
        return self.accept(new[-1])


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() must find it
    module.__file__ = __file__  # inspect.getmodule() walks sys.modules and needs a file for each
    return module


ext = _module("exllamav3_ext")
ext.count_match_tensor = count_match_tensor
ext.BC_SAM = BC_SAM
ext.__getattr__ = _Kernel  # type: ignore[attr-defined]
# exllamav3.ext compiles or imports the real module at import: taken by this one instead
loader = _module("exllamav3.ext")
loader.exllamav3_ext = ext  # type: ignore[attr-defined]
sys.modules.setdefault("exllamav3_ext", ext)
sys.modules.setdefault("exllamav3.ext", loader)
