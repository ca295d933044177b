"""Constrained decoding with llguidance: JSON schema, JSON object, Lark and regex grammars.

Why llguidance: it computes each step's allowed-token mask on the CPU straight from the
model's tokenizer (``llguidance.hf.from_tokenizer`` for HF tokenizers) in well under a
millisecond, with no up-front compile step that blocks for seconds on large schemas;
one engine covers JSON schema, Lark (which can embed JSON schemas, as tool calling
does) and regex; and exllamav3 already integrates it, so the future GPU backends use
the same engine and the same grammars behave the same everywhere.

How a backend uses it: ``GrammarCompiler`` is built once per loaded model, and ``prepare`` builds
its llguidance tokenizer while the model loads (see ``GrammarCompiler``); compilers whose tokenizers
are the same share one build (``SharedTokenizers``: replicas, ``xllm cp`` copies, models with the
same tokenizer files). Grammars are
compiled (and rejected with a 400 naming ``param``) by ``compile``; compiled grammars
are cached in a bounded LRU keyed by ``(kind, spec)`` and any thinking before them (think_grammar.py),
and each job gets a cheap copy of the cached matcher (``new_matcher``). Each step ``BatchMasker`` fills one bitmask
row per constrained job and sets the disallowed logits to -inf before sampling; the
backend then feeds the sampled token back with ``LLMatcher.consume_token``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Sequence

from ..core.errors import InvalidRequest
from ..core.types import Constraint
from .think_grammar import wrapped
from .tokenizer_files import NOT_READ, files_digest, loaded_digest

#: the constraint kinds the backends understand
KINDS = ("json_schema", "json_object", "lark", "regex", "grammar")
#: compiled grammars kept per model
CACHE_SIZE = 128
#: compact JSON: with flexible whitespace a weak model can pad with spaces forever
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}
#: llguidance lexer fuel, a quarter of its defaults: masks are computed on the model's step thread,
#: so one request's pathological regex (``(a{700}){700}``) stalled every batched request for
#: ~0.5 s a step; at these limits such a grammar fails in ~0.1 s and is refused up front,
#: while real schemas (formats, enums of thousands, deep nesting) use a small fraction
LEXER_FUEL = {"initial_lexer_fuel": 250_000, "step_lexer_fuel": 50_000}
#: masks ``GrammarCompiler.compile`` computes ahead, so a grammar that fails early fails before queueing
DRY_RUN_STEPS = 24


def grammar_text(constraint: Constraint, *, param: str = "response_format") -> str:
    """The llguidance grammar for ``constraint``; raises InvalidRequest for an unknown kind or bad JSON."""
    from llguidance import LLMatcher

    kind, spec = constraint.kind, constraint.spec
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
    if kind == "json_schema":
        try:
            schema = json.loads(spec) if isinstance(spec, str) else spec
        except ValueError as exc:
            raise InvalidRequest(f"The JSON schema is not valid JSON: {exc}", param=param) from exc
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("The JSON schema must be an object", param=param)
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"Invalid JSON schema: {exc}", param=param) from exc
    if kind == "lark":
        return LLMatcher.grammar_from_lark(spec)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "grammar":  # Lark, or GBNF (vLLM's guided_grammar): llguidance's converter reads either
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return LLMatcher.grammar_from_lark(any_to_lark(spec))
        except Exception as exc:  # (its parser's own error class, or whatever malformed text makes it raise)
            raise InvalidRequest(f"The grammar is neither Lark nor GBNF this server can read: {_first_line(str(exc))}",
                                 param=param) from None
    raise InvalidRequest(f"Unknown constraint kind '{kind}' (use one of {', '.join(KINDS)})", param=param)


#: tool-call markers the tool grammar writes as literals of their own (openai/tools.py): llguidance takes an added token
#: spelling one (Qwen's ``<tool_call>``, special or not) for a special token, which no text literal matches, and
#: tokenizes the grammar's forced text into it, so the grammar failed at its first token (a 400); the token may write
#: the marker beside its text instead
MARKERS = ("<tool_call>", "</tool_call>")


def marker_alternatives(tokenizer: Any) -> tuple[tuple[str, str], ...]:
    """(marker literal, a Lark alternative that also matches its token) for each marker (``MARKERS``) that
    ``tokenizer`` has one special token for."""
    out = []
    for marker in MARKERS:
        ids = tokenizer.tokenize_str(marker)
        if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
            literal = json.dumps(marker)
            out.append((literal, f"({literal} | <[{ids[0]}]>)"))
    return tuple(out)


def with_marker_tokens(spec: str, alternatives: Iterable[tuple[str, str]]) -> str:
    """Lark ``spec`` with each marker literal also matched by its token (``marker_alternatives``)."""
    for literal, either in alternatives:
        spec = spec.replace(literal, either)
    return spec


def _first_line(message: str, limit: int = 300) -> str:
    """A short, single-paragraph error for clients (llguidance adds source excerpts)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rejection(constraint: Constraint, error: str) -> str:
    """The 400 message for a grammar past the grammar engine's limits."""
    error = error.replace("<non-verbose/>", "")  # llguidance's placeholder for the state it leaves out
    return (f"The {constraint.kind} constraint is too complex to enforce ({_first_line(error, 200)}); "
            "simplify its patterns or alternatives")


def _dry_run(matcher: Any, steps: int = DRY_RUN_STEPS) -> str | None:
    """The error a few steps of ``matcher`` (on copies) run into, or None.

    llguidance builds its lexer lazily: a grammar past its limits compiles, then fails while
    masks are computed, which the step thread does mid-batch. Walking the first steps here (the
    caller's thread, before the job is queued) turns the usual case into a 400 up front. It is
    no proof: a grammar can fail later, which the backend reports as a 400 when it happens.
    """
    import numpy as np

    probe = matcher.deep_copy()
    for _ in range(steps):
        mask = np.frombuffer(probe.compute_bitmask(), dtype=np.uint8)
        if probe.is_error() or probe.is_stopped():
            break
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little"))
        if not len(allowed) or not probe.consume_token(int(allowed[0])):
            break
    fresh = matcher.deep_copy()  # the lexer is shared between copies: a limit hit shows on a fresh one
    fresh.compute_bitmask()
    for m in (probe, fresh):
        if m.is_error():
            return m.get_error()
    return None


def tokenizer_identity(hf_tokenizer: Any) -> str | None:
    """A digest of what ``hf_tokenizer`` was built from (None: unknown, so its llguidance tokenizer is not shared).

    With its class and length (added tokens): read from a ``tokenizer.json``, the bytes of its directory's
    tokenizer files as ``tokenizer_files.load_tokenizer`` found them before and after the read (files
    replaced meanwhile, by a re-pull, give None: which bytes were read is not known; a tokenizer read
    otherwise is digested from its files now). A re-pull that changes them gives another digest, while
    replicas, ``xllm cp``/``create`` copies and other models with the same files give the same one.
    Without a ``tokenizer.json`` (read from a GGUF, whose bytes are hundreds of MB), its Rust tokenizer's
    serialized form, what llguidance builds from: two separately pulled copies of one GGUF share a build.
    That costs 20-70 ms holding the GIL (a GGUF's tokenizer load itself takes seconds).
    """
    try:
        if not hf_tokenizer.name_or_path:  # built in memory ("" would be the current directory)
            return None
        digest = hashlib.sha256(f"{type(hf_tokenizer).__qualname__} {len(hf_tokenizer)}\n".encode())
        files = loaded_digest(hf_tokenizer)
        if files is NOT_READ:
            files = files_digest(hf_tokenizer.name_or_path)
        elif files is None:
            return None
        if files is not None:
            digest.update(f"files {files}\n".encode())
        else:
            backend = getattr(hf_tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            digest.update(b"serialized\n")
            digest.update(backend.to_str().encode())
        return digest.hexdigest()
    except Exception:  # not a transformers tokenizer (tests' stand-ins, a hub id): built privately
        return None


class BuiltTokenizer:
    """One llguidance tokenizer (or why it cannot be built), built once by whichever compiler asks first."""

    __slots__ = ("lock", "tokenizer", "unsupported", "markers", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokenizer: Any = None
        self.unsupported: str | None = None  # why llguidance refused the tokenizer (kept: no second attempt)
        #: its ``marker_alternatives``, found on the first grammar that asks (not tokenized again per compile)
        self.markers: tuple[tuple[str, str], ...] | None = None

    def build(self, hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        """Build it unless built (or refused); a second caller waits for the first's build."""
        with self.lock:
            if self.tokenizer is None and self.unsupported is None:
                try:
                    self.tokenizer = build_ll_tokenizer(hf_tokenizer, vocab_size, eos)
                except ValueError as exc:  # slow (non-Rust) tokenizers are not supported
                    self.unsupported = f"Constrained decoding is not available for this model: {exc}"


def build_ll_tokenizer(hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    """llguidance's tokenizer for ``hf_tokenizer`` (ValueError: one it cannot take), as ``llguidance.hf.from_tokenizer``
    builds it, without its copy of the Rust tokenizer where that copy changes nothing, in two GIL stretches.

    from_tokenizer serializes a copy (a pickle round trip: 0.16-0.27 s holding the GIL for SmolLM2) only to
    switch padding and truncation off on it; a tokenizer that has neither is serialized as it is. The build
    holds the GIL throughout (0.5-0.8 s for SmolLM2's on a busy 2-CPU machine), about half of it computing
    the mask slices: built without slices, then given the default ones (``with_slices``, the same tokenizer
    and masks), the IOLoop runs between the two halves.
    """
    import llguidance.hf
    from llguidance import LLTokenizer
    from transformers import PreTrainedTokenizerFast

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if (not isinstance(hf_tokenizer, PreTrainedTokenizerFast) or backend is None
            or backend.padding is not None or backend.truncation is not None):
        bare = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None, slices=[])
    else:
        bare = LLTokenizer(backend.to_str(), n_vocab=vocab_size, slices=[],
                           eos_token=eos or hf_tokenizer.eos_token_id)  # (from_tokenizer's default EOS)
    return bare.with_slices(LLTokenizer.general_slices())  # (what slices=None builds with)


class SharedTokenizers:
    """The llguidance tokenizers of the loaded models, one per (tokenizer identity, vocab size, EOS ids).

    Held weakly: an entry lives while some model's ``GrammarCompiler`` holds it, or the transformers
    tokenizer it was built for lives (``entry``): an unloaded model's build (tens of MB for a large
    vocabulary) goes with its tokenizer, which released_tokenizers.py keeps a while for a reload.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: weakref.WeakValueDictionary[tuple[str, int, tuple[int, ...]], BuiltTokenizer] = (
            weakref.WeakValueDictionary())
        # a transformers tokenizer -> the entries of its builds (kept as long as it lives)
        self._of: weakref.WeakKeyDictionary[Any, list[BuiltTokenizer]] = weakref.WeakKeyDictionary()

    def entry(self, identity: str | None, vocab_size: int, eos: Sequence[int], hf_tokenizer: Any = None) -> BuiltTokenizer:
        """The shared entry for this key (a private one when ``identity`` is None), kept while ``hf_tokenizer`` lives."""
        if identity is None:
            return BuiltTokenizer()
        key = (identity, int(vocab_size), tuple(eos))
        with self._lock:
            built = self._built.get(key)
            if built is None:
                built = self._built[key] = BuiltTokenizer()
            if hf_tokenizer is not None:
                try:  # a released tokenizer's reload finds its build with it (the build holds no reference back)
                    kept = self._of.setdefault(hf_tokenizer, [])
                    if built not in kept:
                        kept.append(built)
                except TypeError:  # not weakly referable: the build lives with its compilers only
                    pass
            return built

    def __len__(self) -> int:
        """How many tokenizers some loaded model still holds (tests and stats)."""
        with self._lock:
            return len(self._built)


#: the process's shared llguidance tokenizers (tests swap in a fresh one)
SHARED_TOKENIZERS = SharedTokenizers()


class GrammarCompiler:
    """Compiles constraints for one model's tokenizer; thread-safe, with a bounded LRU cache.

    The llguidance tokenizer takes 0.3-0.7 s to build for a 49k vocabulary, and llguidance holds
    the GIL throughout (in Rust, on whatever thread), so built on the first constrained request it
    froze the IOLoop, every user's stream and ``/health`` with it. ``prepare`` builds it as part
    of the model's load instead: a load is long and announced anyway (and at start-up serves
    nobody yet); ``tokenizer`` still builds it on first use for a compiler never prepared. Compilers
    of one tokenizer share the build (``SHARED_TOKENIZERS``), so a replica or a copy pays nothing.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 *, cache_size: int = CACHE_SIZE) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = int(vocab_size)
        self._eos = sorted(int(i) for i in eos_token_ids)
        self._cache_size = max(1, cache_size)
        #: compiled matchers, or the 400 message of a grammar refused (so a repeat costs nothing)
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        # identified now, on the loading thread right after the tokenizer was read, not at first use: the
        # files may be replaced by then (a re-pull), and this tokenizer must not stand for the new ones
        # (replaced during the read itself: load_tokenizer saw it, and the identity is None)
        self._built = SHARED_TOKENIZERS.entry(tokenizer_identity(hf_tokenizer), self._vocab_size, self._eos,
                                             hf_tokenizer)

    def prepare(self) -> None:
        """Build the llguidance tokenizer now (the model's load calls this); a tokenizer llguidance
        cannot take is not an error here: each constrained request is refused with a 400 instead."""
        try:
            self.tokenizer
        except InvalidRequest:
            pass

    @property
    def prepared(self) -> bool:
        """Whether the tokenizer was built (or found unsupported): no constrained request builds it."""
        return self._built.tokenizer is not None or self._built.unsupported is not None

    @property
    def tokenizer(self) -> Any:
        """The ``LLTokenizer`` for this model (built once per tokenizer: by ``prepare``, else on first use)."""
        built = self._built
        if built.tokenizer is None:
            built.build(self._hf, self._vocab_size, self._eos)
            if built.tokenizer is None:
                raise InvalidRequest(built.unsupported or "Constrained decoding is not available for this model",
                                     param="response_format", code="unsupported_parameter")
        return built.tokenizer

    @property
    def vocab_size(self) -> int:
        """Width of the logits rows the masks apply to."""
        return self._vocab_size

    def compile(self, constraint: Constraint, *, param: str = "response_format", probe: bool = True) -> Any:
        """The cached, never-advanced ``LLMatcher`` for ``constraint``; InvalidRequest (400) if it does not compile.

        ``probe`` re-checks a cached grammar with one mask (serving's check before a request is queued);
        the step thread's per-job copies skip it: that mask costs a full-vocabulary pass mid-batch.
        """
        from llguidance import LLMatcher

        key = (constraint.kind, constraint.spec, *constraint.think, constraint.opened)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if isinstance(hit, str):  # refused before: refused again at once, without the lexer's work
            raise InvalidRequest(hit, param=param, code="constraint_failed")
        if hit is not None and not probe:
            return hit
        if hit is not None:
            # copies share the lexer: one that hit a limit mid-generation leaves it failing at once,
            # which a job took for a finished (empty) output; refuse the grammar from now on instead
            fresh = hit.deep_copy()
            fresh.compute_bitmask()
            if not fresh.is_error():
                return hit
            self._refuse(key, _rejection(constraint, fresh.get_error()), param)
        # compiled outside the lock: a large grammar must not stall the step thread's lookups;
        # two threads racing on one new grammar just compile it twice
        from llguidance import LLParserLimits

        matcher = LLMatcher(self.tokenizer, self.text_for(constraint, param=param), log_level=0,
                            limits=LLParserLimits(**LEXER_FUEL, verbose_errors=False))
        if matcher.is_error():
            raise InvalidRequest(f"Invalid {constraint.kind} constraint: {_first_line(matcher.get_error())}",
                                 param=param)
        error = _dry_run(matcher)
        if error is not None:
            self._refuse(key, _rejection(constraint, error), param)
        self._remember(key, matcher)
        return matcher

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _refuse(self, key: tuple[Any, ...], message: str, param: str) -> None:
        """Cache ``message`` as the grammar's answer from now on, and raise it (400)."""
        self._remember(key, message)
        raise InvalidRequest(message, param=param, code="constraint_failed")

    def text_for(self, constraint: Constraint, *, param: str = "response_format") -> str:
        """``grammar_text`` for this tokenizer: its tool-call marker tokens may write the markers (``with_marker_tokens``)."""
        text = grammar_text(constraint, param=param)
        if constraint.kind == "lark":
            built = self._built
            if built.markers is None:  # (two threads may both look them up: the same answer)
                built.markers = marker_alternatives(self.tokenizer)
            text = with_marker_tokens(text, built.markers)
        return wrapped(text, self.tokenizer, *constraint.think, constraint.opened) if constraint.think else text

    def new_matcher(self, constraint: Constraint, *, param: str = "response_format") -> Any:
        """A fresh matcher for one job: a copy of the cached compiled one."""
        return self.compile(constraint, param=param, probe=False).deep_copy()

    def cached(self) -> int:
        """How many compiled grammars are cached (tests and stats)."""
        with self._lock:
            return len(self._cache)


class BatchMasker:
    """Applies the matchers' allowed-token masks to a batch of logits rows (torch)."""

    def __init__(self, vocab_size: int, threads: int | None = None) -> None:
        import numpy as np
        from llguidance import LLExecutor

        self._np = np
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._executor = LLExecutor(threads) if threads else LLExecutor()
        self._bitmask = np.empty((0, self._words), dtype=np.int32)

    def apply(self, logits: Any, rows: Sequence[int], matchers: Sequence[Any]) -> None:
        """Set logits[rows[i]] to -inf wherever ``matchers[i]`` does not allow the token."""
        import torch

        np = self._np
        n = len(rows)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.empty((max(n, 2 * self._bitmask.shape[0]), self._words), dtype=np.int32)
        mask = self._bitmask[:n]
        if n == 1:  # the executor's thread pool costs more than it saves for one row
            matchers[0].unsafe_compute_mask_ptr(mask.ctypes.data, self._words * 4)
        else:
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                                   mask.ctypes.data, self._words * 4, n)
        # bit j of little-endian int32 word w is token 32*w + j: unpackbits in little bit
        # order over the bytes gives exactly that order (numpy is ~10x faster than torch here)
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[-1]]
        banned = torch.from_numpy(bits == 0).to(logits.device, non_blocking=True)
        if n == logits.shape[0]:  # every row constrained: one fill (one kernel on a GPU)
            logits.masked_fill_(banned, float("-inf"))
            return
        for j, row in enumerate(rows):
            logits[row].masked_fill_(banned[j], float("-inf"))  # a row view: in place, no copy
