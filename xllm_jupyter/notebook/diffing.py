"""Text diffs between two replies: word-level (readable for prose) or unified (by line)."""

from __future__ import annotations

import difflib
import html
import re

from ..core.errors import InvalidRequest

_TOKENS = re.compile(r"\s+|[^\s]+")
DEL_STYLE = "background:#fdd;color:#900;text-decoration:line-through"
INS_STYLE = "background:#dfd;color:#060"


def _ops(a: str, b: str) -> list[tuple[str, str, str]]:
    """(tag, text from a, text from b) runs of a word-level comparison."""
    ta, tb = _TOKENS.findall(a), _TOKENS.findall(b)
    matcher = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    return [(tag, "".join(ta[i1:i2]), "".join(tb[j1:j2])) for tag, i1, i2, j1, j2 in matcher.get_opcodes()]


def word_diff(a: str, b: str) -> str:
    """``b`` against ``a`` word by word: ``[-removed-]`` and ``{+added+}`` marks, as ``git diff --word-diff``."""
    out = []
    for tag, old, new in _ops(a, b):
        if tag == "equal":
            out.append(old)
            continue
        if old:
            out.append(f"[-{old}-]")
        if new:
            out.append(f"{{+{new}+}}")
    return "".join(out)


def unified_diff(a: str, b: str, name_a: str = "a", name_b: str = "b") -> str:
    """A unified line diff of ``a`` and ``b`` ("" when they are equal)."""
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), fromfile=name_a, tofile=name_b)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def diff_text(a: str, b: str, mode: str = "word", name_a: str = "a", name_b: str = "b") -> str:
    """The diff of ``a`` and ``b`` in ``mode`` ("word" or "unified")."""
    if mode == "word":
        return word_diff(a, b)
    if mode == "unified":
        return unified_diff(a, b, name_a, name_b)
    raise InvalidRequest("diff mode must be 'word' or 'unified'", param="mode")


def diff_html(a: str, b: str) -> str:
    """A word diff as HTML: removed words struck through in red, added ones in green."""
    out = []
    for tag, old, new in _ops(a, b):
        if tag == "equal":
            out.append(html.escape(old))
            continue
        if old:
            # a word replaced: a gap before its replacement, or "a" struck out then "terracota" read "aterracota"
            gap = ";margin-right:0.3em" if new else ""
            out.append(f'<del style="{DEL_STYLE}{gap}">{html.escape(old)}</del>')
        if new:
            out.append(f'<ins style="{INS_STYLE}">{html.escape(new)}</ins>')
    return f'<div style="white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace)">{"".join(out)}</div>'
