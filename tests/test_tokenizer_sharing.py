"""One user's huge prompt does not hold up the other users of the model while it is tokenized.

A 3 MB prompt takes seconds to encode. The model's tokenizer was behind one lock, so another
user's one-token chat (its prompt, and the engine thread's decoding of every stream) waited
for it. The huge prompt is made "still tokenizing" here by holding its encode on an event.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

import pytest

from tests.models import smollm2_tokenizer
from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer, settle
from xllm_jupyter.core.types import ChatMessage

MARK = "HOLD-THIS-PROMPT"


class HeldEncode:
    """Wraps a tokenizer's ``encode``: a text holding MARK waits inside encode until released."""

    def __init__(self, encode: Any):
        self.encode = encode
        self.entered = threading.Event()  # the held text is inside encode
        self.release = threading.Event()

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        if MARK in text:
            self.entered.set()
            self.release.wait(60)  # (a bound only so a broken test cannot hang the run)
        return self.encode(text, *args, **kwargs)


@contextlib.contextmanager
def _prompt_held(tok: Any, chat: ChatTokenizer) -> Iterator[tuple[HeldEncode, threading.Thread]]:
    """A prompt's encode held inside ``tok`` (``chat``'s tokenizer) on a thread of its own, with whatever lock
    ``chat`` takes for it; yields (the hold, that thread); released and joined at exit."""
    hold = HeldEncode(tok.encode)
    tok.encode = hold
    prompt = threading.Thread(target=chat.tokenize, args=(MARK + " long",))
    prompt.start()
    try:
        assert hold.entered.wait(60)
        yield hold, prompt
    finally:
        hold.release.set()
        prompt.join(60)


@pytest.fixture
def held(xllm_server, monkeypatch) -> Any:
    """The session server's "tiny" tokenizer with its encode held for MARK texts (released at the end)."""
    tokenizer = xllm_server.engine._runners["tiny"].model.chat.tokenizer
    hold = HeldEncode(tokenizer.encode)
    monkeypatch.setattr(tokenizer, "encode", hold)
    yield hold
    hold.release.set()


def test_a_small_chat_completes_while_a_huge_prompt_is_still_tokenizing(xllm_server, held):
    import openai

    c = openai.OpenAI(base_url=xllm_server.base_url, api_key=xllm_server.api_key, max_retries=0, timeout=30)
    results: dict[str, Any] = {}

    def huge() -> None:
        try:
            results["huge"] = c.completions.create(model="tiny", prompt=MARK + " word" * 2000, max_tokens=1)
        except Exception as exc:  # reported by the assertions below
            results["huge"] = exc

    big = threading.Thread(target=huge)
    big.start()
    try:
        assert held.entered.wait(60), "the huge prompt never reached the tokenizer"
        # the small chat needs the tokenizer twice (its prompt; the engine thread decodes its tokens)
        small = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert small.choices[0].finish_reason in ("stop", "length")
        assert small.usage.completion_tokens >= 1 and small.usage.prompt_tokens > 1
        # provably while the huge prompt was still inside encode: it is released only now
        assert not held.release.is_set() and big.is_alive()
    finally:
        held.release.set()
        big.join(60)
    assert isinstance(results["huge"], openai.types.Completion), results["huge"]
    assert results["huge"].usage.prompt_tokens > 2000


def test_huge_prompts_from_many_users_do_not_take_every_worker_thread(xllm_server, held):
    """More huge prompts than asyncio's shared pool has threads: a small chat still gets tokenized."""
    import openai

    pool = getattr(xllm_server.loop, "_default_executor", None)
    threads = getattr(pool, "_max_workers", None) or min(32, (os.cpu_count() or 1) + 4)
    c = openai.OpenAI(base_url=xllm_server.base_url, api_key=xllm_server.api_key, max_retries=0, timeout=30)
    statuses: list[Any] = []

    def huge() -> None:
        try:  # over the lane's threshold; the tiny model's context then refuses it
            c.completions.create(model="tiny", prompt=MARK + " word" * 25_000, max_tokens=1)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
        except Exception as exc:  # reported by the assertions below
            statuses.append(exc)

    users = [threading.Thread(target=huge) for _ in range(threads + 1)]
    for u in users:
        u.start()
    try:
        assert held.entered.wait(60)
        small = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert small.choices[0].message.content is not None
        assert not held.release.is_set() and all(u.is_alive() for u in users)  # all still being tokenized
    finally:
        held.release.set()
        for u in users:
            u.join(60)
    assert statuses == [400] * len(users)


def test_settle_switches_off_truncation_and_padding_the_files_set():
    """A plain encode switches them off itself: done once at load, no encode changes the shared tokenizer."""
    tok = smollm2_tokenizer()
    tok.backend_tokenizer.enable_truncation(8)
    tok.backend_tokenizer.enable_padding(length=64)
    chat = ChatTokenizer(tok, "smollm2")
    assert tok.backend_tokenizer.truncation is None and tok.backend_tokenizer.padding is None
    ids = chat.tokenize("one two three " * 50, add_special_tokens=False)
    assert len(ids) == len(tok.backend_tokenizer.encode("one two three " * 50, add_special_tokens=False).ids) > 64


def test_rust_tokenizer_calls_run_side_by_side_and_agree():
    """Prompt, chat and decode calls from other threads complete while one encode is held."""
    tok = smollm2_tokenizer()
    chat = ChatTokenizer(tok, "smollm2")
    expected = chat.tokenize("hello there", add_special_tokens=False)
    with _prompt_held(tok, chat) as (hold, prompt):
        assert chat.tokenize("hello there", add_special_tokens=False) == expected
        assert chat.detokenize(expected) == "hello there"
        assert chat.token_bytes(expected[0]) == b"hello"
        assert "hi" in chat.render_chat([ChatMessage(role="user", content="hi")])
        assert not hold.release.is_set() and prompt.is_alive()


class SlowTokenizer:
    """A Python tokenizer stand-in (not Rust-backed) that counts callers inside encode at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if MARK in text:
            self.entered.set()
            self.release.wait(60)
        self.inside -= 1
        return [len(text)]


def test_a_python_tokenizer_stays_behind_the_lock():
    """No promise that its calls only read it: one caller at a time, as before."""
    slow = SlowTokenizer()
    assert settle(slow) is False
    chat = ChatTokenizer(slow, "slow")
    first = threading.Thread(target=chat.tokenize, args=(MARK,))
    first.start()
    assert slow.entered.wait(60)
    second = threading.Thread(target=chat.tokenize, args=("x",))
    second.start()
    second.join(0.5)  # it waits for the lock: give it the chance to get in wrongly
    assert slow.most == 1 and second.is_alive()
    slow.release.set()
    first.join(60)
    second.join(60)
    assert slow.most == 1 and not second.is_alive()


def test_streamed_pieces_decode_while_a_call_holds_the_tokenizers_lock():
    """The engine thread's token decode does not wait for the lock a changed tokenizer's calls take.

    Something set truncation on the shared tokenizer after load, so its calls run behind the guard's lock
    (an encode would switch it off again). A held prompt encode has that lock; Rust's decode only reads
    the tokenizer with the GIL held throughout, so the streamed pieces still come, and right.
    """
    tok = smollm2_tokenizer()
    chat = ChatTokenizer(tok, "smollm2")
    ids = chat.tokenize(" the cat sat on the mat", add_special_tokens=False)
    want = [chat.decode_piece(ids[i:i + 2]) for i in range(len(ids) - 1)]
    tok.backend_tokenizer.enable_truncation(4)
    with _prompt_held(tok, chat) as (hold, prompt):
        got: list[str] = []
        pieces = threading.Thread(target=lambda: got.extend(chat.decode_piece(ids[i:i + 2])
                                                            for i in range(len(ids) - 1)))
        pieces.start()
        pieces.join(10)
        assert got == want and not pieces.is_alive()
        other = threading.Thread(target=chat.detokenize, args=(ids,))  # other calls still wait for the lock
        other.start()
        other.join(0.3)
        assert other.is_alive() and prompt.is_alive() and not hold.release.is_set()
    other.join(60)
    assert not other.is_alive()


def test_a_python_decoder_keeps_the_guarded_decode():
    """A decoder written in Python may let other threads run mid-decode: its pieces go through the guard."""
    from tokenizers.decoders import Decoder

    class Upper:
        def decode_chain(self, tokens: list[str]) -> list[str]:
            return [t.upper() for t in tokens]

    tok = smollm2_tokenizer()
    tok.backend_tokenizer.decoder = Decoder.custom(Upper())
    chat = ChatTokenizer(tok, "smollm2")
    assert chat.decode_piece(tok.encode("ab", add_special_tokens=False)) == "AB"
    assert chat._rust_decode is None
