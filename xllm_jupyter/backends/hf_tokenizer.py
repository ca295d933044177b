"""A Hugging Face tokenizer shared by threads: tokenize, detokenize and chat templates for any backend.

The exllama backends decode text themselves but use the model directory's HF tokenizer
for prompts and chat templates, so every backend renders the same prompt for the same
messages. Calls may come from any thread (serving tokenizes while the engine steps).

A Rust ("fast") tokenizer is called without a lock: one user's 3 MB prompt (seconds of
encoding) must not hold up another user's prompt, nor the engine thread's decoding of
every stream of the model. See ``settle``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, ContextManager, Sequence

from ..core.errors import InvalidRequest
from ..core.types import ChatMessage
from .detokenize import PieceDecoder, piece_bytes, piece_scheme
from .tokenizer_files import load_tokenizer

#: end-of-turn tokens of common chat templates that must also stop a generation
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")
#: a harmony (gpt-oss) vocabulary's turn ends: ``<|end|>`` there closes one message of several (the thinking's)
HARMONY_ENDS = ("<|return|>", "<|call|>")


def settle(tokenizer: Any) -> bool:
    """Put a Rust-backed tokenizer in the state its plain encode leaves it in; True when its calls then only read it.

    The Rust tokenizer is shared by reference between threads: calls that read it (encode, decode,
    id lookups) run side by side, with the GIL released while they encode, but one that changes it
    while another runs fails with "Already borrowed". transformers' ``encode`` changes it only to
    switch off a truncation or padding the tokenizer files set (and to match ``split_special_tokens``),
    so once that is done here, under no concurrency, every later plain encode only reads it. A
    Python ("slow") tokenizer gives no such promise: False, its calls stay behind a lock.
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or backend is None:
        return False
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return True


def settled(tokenizer: Any) -> bool:
    """Whether a settled tokenizer is still as ``settle`` left it (a plain encode would change nothing)."""
    backend = tokenizer.backend_tokenizer
    return backend.truncation is None and backend.padding is None


def rust_piece_decoder(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """The Rust call ``decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`` comes to, or None.

    For a fast tokenizer whose class keeps the fast base's ``decode`` and ``_decode``, that call only passes the
    ids on as a list to the Rust tokenizer (which skips the tokens it marks special) and would clean up spaces,
    which False switches off. Calling Rust directly saves ~1.3 us of Python, holding the GIL, per streamed token
    (SmolLM2: 2.4 -> 1.1 us a two-token window). A subclass that decodes its own way (Whisper, CodeGen, ...), a
    slow tokenizer, or one whose methods were replaced on the instance gets None: its own decode runs. The answers
    are also checked against the full call on a sample of windows (added tokens included), so a transformers
    whose ``_decode`` does more than this is noticed rather than streamed wrong. A decoder written in Python
    (``Decoder.custom``) also gets None: only an all-Rust decode is safe to call without the guard (``decode_piece``).
    """
    from tokenizers.decoders import Decoder
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    if (not isinstance(tokenizer, PreTrainedTokenizerFast) or cls.decode is not PreTrainedTokenizerFast.decode
            or cls._decode is not PreTrainedTokenizerFast._decode
            or not {"decode", "_decode"}.isdisjoint(vars(tokenizer))):
        return None
    decoder = tokenizer.backend_tokenizer.decoder
    if decoder is not None and type(decoder) is Decoder:
        return None  # a Decoder.custom (shown as the base class) runs Python, which lets other threads in mid-decode

    def decode(ids: list[int]) -> str:
        return tokenizer._tokenizer.decode(ids, skip_special_tokens=True)  # read each call: _decode does too

    try:
        size = len(tokenizer)
        added = sorted(tokenizer.added_tokens_decoder)[:64]
        sample = [*added, *range(0, size, max(1, size // 64))]
        windows = [[i] for i in sample] + [[a, b] for a, b in zip(sample, reversed(sample))]
        same = all(decode(w) == tokenizer.decode(w, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                   for w in windows)
    except Exception:  # noqa: BLE001 - anything unexpected: keep the tokenizer's own decode
        return None
    return decode if same else None


def special_token_text(tokenizer: Any) -> dict[int, str]:
    """Special token ids and their literal text (what ``skip_special_tokens`` leaves out of decoded text)."""
    try:
        decoder = tokenizer.added_tokens_decoder
    except AttributeError:
        return {}
    return {int(i): str(t.content) for i, t in decoder.items() if getattr(t, "special", False) and t.content}


class KeptSpecials:
    """Special tokens a job's decoded text keeps (``SequenceJob.keep_special``): their ids, a window decoder that
    keeps them and skips every other special token, and their own bytes for logprobs."""

    __slots__ = ("text", "decode", "_chat")

    def __init__(self, chat: "ChatTokenizer", text: dict[int, str], drop: frozenset[int]):
        self.text = text  # kept id -> its literal text
        self._chat = chat

        def decode(ids: Sequence[int]) -> str:
            if text.keys().isdisjoint(ids):
                return chat.decode_piece(ids)  # (most windows: nothing kept in them)
            return chat.decode_with_specials([i for i in ids if i not in drop])

        self.decode = PieceDecoder(decode)  # shared by the jobs keeping the same tokens

    def token_bytes(self, token_id: int) -> bytes:
        """``ChatTokenizer.token_bytes``, a kept token's being its text."""
        kept = self.text.get(token_id)
        return kept.encode("utf-8") if kept is not None else self._chat.token_bytes(token_id)


def system_into_first_user(convo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``convo`` with its leading system turns' text at the head of the first user turn.

    Gemma's templates raise "System role not supported" on a system turn (Gemma 3's puts its text there itself), and
    Mistral's first ones "Conversation roles must alternate"; clients send one with most requests (tools without a
    native template add one too): each was a 400."""
    lead = 0
    while lead < len(convo) and convo[lead]["role"] == "system":
        lead += 1
    if not lead:
        return convo
    text = "\n\n".join(t["content"] for t in convo[:lead] if t["content"])
    rest = convo[lead:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{text}\n\n{rest[0]['content']}" if rest[0]["content"] else text}, *rest[1:]]
    return [{"role": "user", "content": text}, *rest]


def arguments_as_text(convo: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``convo`` with its tool calls' object arguments as JSON text, or None when it has none."""
    def as_text(call: Any) -> Any:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or isinstance(fn.get("arguments"), str):
            return call
        return {**call, "function": {**fn, "arguments": json.dumps(fn.get("arguments"), ensure_ascii=False)}}

    out = [{**t, "tool_calls": [as_text(c) for c in t["tool_calls"]]} if t.get("tool_calls") else t for t in convo]
    return out if out != convo else None


class TokenizerGuard:
    """What a shared tokenizer's calls hold: nothing for a settled Rust one (``settle``), one lock otherwise."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.shared = settle(tokenizer)  # True: no lock needed (a Rust tokenizer whose calls only read it)
        self._lock = threading.Lock()

    def __call__(self) -> ContextManager[Any]:
        """The context one call runs in."""
        if self.shared and settled(self.tokenizer):
            return contextlib.nullcontext()
        # a slow tokenizer, or something set truncation/padding on this one since: this call may change it
        return self._lock


class ChatTokenizer:
    """Thread-safe wrapper over a ``transformers`` tokenizer with chat-template rendering."""

    def __init__(self, tokenizer: Any, model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._guard = TokenizerGuard(tokenizer)  # (a lock only where calls may change the tokenizer)
        self._token_bytes: dict[int, bytes] = {}  # token_bytes' answers: logprobs ask for ~20 tokens a step
        self._spelling: tuple[str, frozenset[int]] | None = None  # (piece scheme, added token ids), found once
        # found here, at load, not at the first streamed token on the model's step thread (~1 ms of checks)
        self._rust_decode = rust_piece_decoder(tokenizer) if self._guard.shared else None
        self._kept: dict[tuple[str, ...], KeptSpecials | None] = {}  # keeping()'s answers

    @classmethod
    def from_directory(cls, path: str, model_name: str, **kwargs: Any) -> "ChatTokenizer":
        """Load the tokenizer stored next to a model's weights."""
        return cls(load_tokenizer(path, **kwargs), model_name)

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``."""
        with self._guard():
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` with special tokens skipped."""
        with self._guard():
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_piece(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` exactly as streamed (no clean-up of spaces)."""
        rust = self._rust_decode
        # a list of ints is what decode would pass on unchanged; anything else (a tensor, a batch) goes through it
        if rust is not None and type(ids) is list and (not ids or type(ids[0]) is int):
            # No guard: Rust's decode only reads the tokenizer and holds the GIL from start to end (tokenizers
            # 0.20-0.23; no Python decoder here), so nothing changes the tokenizer during it, whether another
            # call is encoding with the GIL released or changing truncation under the guard's lock.
            return rust(ids)
        with self._guard():
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_with_specials(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` with their special tokens' text in it (no clean-up of spaces)."""
        with self._guard():
            return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def keeping(self, texts: tuple[str, ...]) -> KeptSpecials | None:
        """How to decode keeping the special tokens spelled ``texts`` (None: this vocabulary has none of them special).

        Decoding skips special tokens, so a model whose tool-call markup is special tokens (Mistral's ``[TOOL_CALLS]``,
        ``[ARGS]``) lost it from its text and the tool parser saw none; vLLM turns ``skip_special_tokens`` off for
        its Mistral parser. Only the named ones come back here: an end-of-turn token stays out of the text."""
        if texts not in self._kept:
            with self._guard():
                special = special_token_text(self.tokenizer)
                others = {int(i) for i in getattr(self.tokenizer, "all_special_ids", ()) or ()}  # a slow one's too
            kept = {i: t for i, t in special.items() if t in texts}
            self._kept[texts] = KeptSpecials(self, kept, frozenset((special.keys() | others) - kept.keys())) \
                if kept else None
        return self._kept[texts]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` stands for alone: part of a character split over tokens, b"" for a skipped special."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = self._spell(token_id)
        return raw

    def _spell(self, token_id: int) -> bytes:
        with self._guard():
            if self._spelling is None:
                self._spelling = piece_scheme(self.tokenizer), frozenset(self.tokenizer.added_tokens_decoder)
            scheme, added = self._spelling
            try:  # added tokens are stored as text, not in the vocabulary's byte spelling
                piece = None if token_id in added else self.tokenizer.convert_ids_to_tokens(token_id)
            except (IndexError, KeyError, OverflowError):
                return b""  # a padding row of the embedding past the tokenizer's vocabulary
        raw = piece_bytes(piece, scheme) if piece is not None else None
        return raw if raw is not None else self.decode_piece([token_id]).encode("utf-8")

    def chat_template(self) -> str | None:
        """The chat template source (all named templates joined when there are several)."""
        t = getattr(self.tokenizer, "chat_template", None)
        return "\n".join(t.values()) if isinstance(t, dict) else t

    def render_chat(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of ``messages`` (and ``tools``) under the model's chat template (``template_kwargs``: extra
        template variables, vLLM's ``chat_template_kwargs``)."""
        from jinja2 import TemplateError

        kw = template_kwargs or {}

        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"Model '{self.model_name}' has no chat template; send a plain prompt to the "
                                 "completions endpoint instead", param="messages")
        convo = [m.to_template_dict() for m in messages]
        if "developer" not in (self.chat_template() or ""):
            # OpenAI's "developer" role is the new name for "system". A template that does not know it
            # renders an unknown turn (or rejects it) and adds its own default system prompt.
            for turn in convo:
                if turn["role"] == "developer":
                    turn["role"] = "system"
        if "System role not supported" in (self.chat_template() or ""):
            convo = system_into_first_user(convo)
        try:
            try:
                return self._render(convo, tools, add_generation_prompt, kw)
            except TypeError:
                # a template that joins a call's arguments to text (DeepSeek's) takes them as the JSON string OpenAI
                # sends, not as the object most templates want (a 500 here); any other TypeError is raised as it was
                texts = arguments_as_text(convo)
                if texts is None:
                    raise
                try:
                    return self._render(texts, tools, add_generation_prompt, kw)
                except TypeError:
                    pass
                raise
        except TemplateError as exc:
            merged = system_into_first_user(convo)
            if merged is not convo:  # a template refusing a system turn in other words (Mistral's first ones: "roles
                try:  # must alternate"): the system text heads the first user turn, as for Gemma's, if that renders
                    return self._render(merged, tools, add_generation_prompt, kw)
                except Exception:  # noqa: BLE001 (the system turn was not the fault: the template's own error stands)
                    pass
            raise InvalidRequest(f"The chat template rejected these messages: {exc}", param="messages") from exc
        except TypeError as exc:
            if not kw or not self._renders(convo, tools, add_generation_prompt):
                raise  # the template fails these messages without the variables too: not the client's variables
            # a variable of the client's type the template cannot use (it renders without them): the client's fault
            raise InvalidRequest(f"The chat template could not use these chat_template_kwargs: {exc}",
                                 param="chat_template_kwargs") from exc

    def _renders(self, convo: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                 add_generation_prompt: bool) -> bool:
        """Whether the template renders ``convo`` without extra variables (as is, or with text arguments)."""
        for attempt in (convo, arguments_as_text(convo)):
            if attempt is None:
                continue
            try:
                self._render(attempt, tools, add_generation_prompt, {})
                return True
            except Exception:  # noqa: BLE001 (any failure: the variables are not the only fault)
                pass
        return False

    def _render(self, convo: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None, add_generation_prompt: bool,
                kw: dict[str, Any]) -> str:
        with self._guard():  # the template renders in Python: it reads the tokenizer, changes nothing
            return self.tokenizer.apply_chat_template(convo, tokenize=False, tools=list(tools) if tools else None,
                                                      add_generation_prompt=add_generation_prompt, **kw)

    def eos_ids(self, *extra: Any) -> frozenset[int]:
        """EOS ids from the tokenizer and ``extra`` sources (ints or lists), plus end-of-turn tokens.

        Only ids of tokens the tokenizer has count: a model's config files come from wherever it was
        pulled, and a string or an id out of range there failed every load of the model with a 500
        (or, past the vocabulary, every constrained request that masks EOS). A harmony (gpt-oss) vocabulary's
        turn ends are ``<|return|>`` and ``<|call|>``, never ``<|end|>`` (``HARMONY_ENDS``).
        """
        try:
            size = len(self.tokenizer)
        except TypeError:  # a tokenizer without a length: only the sign can be checked
            size = None
        ids: set[int] = set()
        for src in (*extra, self.tokenizer.eos_token_id):
            for i in src if isinstance(src, (list, tuple)) else (src,):
                if isinstance(i, int) and not isinstance(i, bool) and 0 <= i and (size is None or i < size):
                    ids.add(i)
        harmony = self._token_id("<|channel|>") is not None and self._token_id(HARMONY_ENDS[0]) is not None
        turn_ends = HARMONY_ENDS + END_OF_TURN_TOKENS if harmony else END_OF_TURN_TOKENS
        ids.update(i for i in map(self._token_id, turn_ends) if i is not None)
        if harmony:  # (a config naming <|end|> would stop every gpt-oss reply after its thinking)
            ids.discard(self._token_id("<|end|>"))
        return frozenset(ids)

    def _token_id(self, token: str) -> int | None:
        """``token``'s id, None if the vocabulary (added tokens included) has no such token."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # one lookup in Rust: get_vocab() built a dict of the whole vocabulary (49k entries: 30-60 ms
            # holding the GIL, at every load) to look up six tokens
            return backend.token_to_id(token)
        return self.tokenizer.get_vocab().get(token)


class ChatTokenizerMethods:
    """LoadedModel tokenizer methods delegated to ``self.chat`` (a ChatTokenizer); mixed into backends."""

    chat: ChatTokenizer

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (thread-safe)."""
        return self.chat.tokenize(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` with special tokens skipped (thread-safe)."""
        return self.chat.detokenize(ids)

    def chat_template(self) -> str | None:
        """The chat template source."""
        return self.chat.chat_template()

    def render_chat(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of ``messages`` (and ``tools``) under the model's chat template (thread-safe)."""
        return self.chat.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     template_kwargs=template_kwargs)
