"""Whether a grammar spells a given string at its start, read by llguidance itself over a vocabulary of bytes.

Serving asks it of a reasoning model's opening thinking marker (openai/reasoning.py): a grammar that writes the
marker itself shapes the thinking too, so it applies from the first token. Looking for the marker in the grammar's
source missed every spelling but the literal one (a regex's ``\\[THINK\\]``, ``[<]think>``, ``\\x3cthink>``); compiled
here, the grammar answers for itself, in the dialect the backend compiles it in. It must take the marker and refuse a
decoy of its shape (``[QQQQQ]`` for ``[THINK]``): a grammar that takes any text (``.*``, a free-text answer) permits the
marker without writing it, and left to apply from the first token it would keep a model whose marker is a special token
(Qwen3's, Magistral's: no text lexeme matches one) from thinking at all. The vocabulary is the 256 bytes
(and an end token), so this needs no model's tokenizer and costs little: the lexer's fuel is the backend's
(``LEXER_FUEL``), the answers are cached, and a grammar llguidance refuses here (one naming a token id, ``<[ID]>``,
past the bytes) answers False (its own check says whether it compiles at all).
"""

from __future__ import annotations

import functools
from typing import Any

from ..core.errors import InvalidRequest
from ..core.types import Constraint
from .constraints import LEXER_FUEL, grammar_text

#: the kinds whose source a client writes (JSON schemas never begin with a marker)
KINDS = ("lark", "grammar", "regex")
#: whitespace a model may write before the marker (backends/think_grammar.py allows up to two characters)
_LEADS = ("", " ", "\n")


class _Bytes:
    """A tokenizer whose tokens are the 256 bytes, for llguidance's ``TokenizerWrapper``."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"</s>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_Bytes()), slices=[])


def _decoy(text: str) -> str:
    """``text`` with each letter another one: the same shape, not the same word."""
    return "".join(("z" if c in "qQ" else "Q" if c.isupper() else "q") if c.isascii() and c.isalpha() else c for c in text)


@functools.lru_cache(maxsize=128)
def _begins(kind: str, spec: str, text: str) -> bool:
    from llguidance import LLMatcher, LLParserLimits

    try:
        grammar = grammar_text(Constraint(kind, spec))
    except InvalidRequest:
        return False
    matcher = LLMatcher(_tokenizer(), grammar, log_level=0, limits=LLParserLimits(**LEXER_FUEL, verbose_errors=False))
    if matcher.is_error():
        return False

    def takes(start: str) -> bool:
        data = list(start.encode("utf-8"))
        return matcher.deep_copy().try_consume_tokens(data) == len(data)

    return any(takes(lead + text) and not takes(lead + _decoy(text)) for lead in _LEADS)


def can_begin(constraint: Constraint, text: str) -> bool:
    """True when grammar ``constraint`` (a Lark, GBNF or regex one) spells ``text`` at the reply's start (after a space
    or a line break too): it lets a reply begin with it, and not with a decoy of its shape (any text is not ``text``);
    False for other kinds, and for a grammar llguidance cannot read over bytes."""
    if constraint.kind not in KINDS or not isinstance(constraint.spec, str) or not text:
        return False
    return _begins(constraint.kind, constraint.spec, text)
