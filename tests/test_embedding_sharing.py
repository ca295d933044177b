"""One user's big embedding request does not hold up another user's embeddings.

An embedding model's tokenizer was behind a lock, and a request's tokenizing and its whole forward ran as
one piece of work on the model's one thread: a small request waited for all of a big one. Now texts are
tokenized off that thread (lock-free: the settled Rust tokenizer, as for chat models) and forwards take
the thread ``TURN`` inputs at a time. Encodes and forwards are held on events here, never timed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tests.test_embeddings import MODEL, pytestmark  # noqa: F401  (skipped where the encoder is not installed)
from tests.test_tokenizer_sharing import MARK, HeldEncode
from xllm_jupyter.engine.embeddings import TURN


@pytest.fixture
def encoder(xllm_server, client) -> Any:
    """The session server's all-minilm slot, loaded."""
    client.embeddings.create(model=MODEL, input="warm up")
    return xllm_server.engine._embeddings.slots[MODEL]


def test_a_small_embedding_completes_while_a_big_one_is_still_tokenizing(encoder, client, monkeypatch):
    tokenizer = encoder.model.tokenizer
    held = HeldEncode(tokenizer.encode)
    monkeypatch.setattr(tokenizer, "encode", held)
    got: dict[str, Any] = {}

    def big() -> None:
        try:
            got["big"] = client.embeddings.create(model=MODEL, input=["a guitar"] * 50 + [MARK + " and more"])
        except Exception as exc:  # reported by the assertions below
            got["big"] = exc

    first = threading.Thread(target=big)
    first.start()
    try:
        assert held.entered.wait(60), "the big request never reached the tokenizer"
        small = client.with_options(timeout=30).embeddings.create(model=MODEL, input="hello there")
        assert len(small.data) == 1 and len(small.data[0].embedding) == 384 and small.usage.prompt_tokens == 2
        assert not held.release.is_set() and first.is_alive()  # the big one was still inside encode all along
    finally:
        held.release.set()
        first.join(60)
    assert len(got["big"].data) == 51, got["big"]


class HeldForwards:
    """Wraps ``embed_ids``: records each call's size; the first call waits until released."""

    def __init__(self, embed_ids: Any):
        self.embed_ids = embed_ids
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: Any) -> Any:
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.entered.set()
            self.release.wait(60)  # (a bound only so a broken test cannot hang the run)
        return self.embed_ids(batch)


def test_a_small_embedding_runs_between_the_turns_of_a_big_one(encoder, client, monkeypatch):
    held = HeldForwards(encoder.model.embed_ids)
    monkeypatch.setattr(encoder.model, "embed_ids", held)
    got: dict[str, Any] = {}
    texts = [f"sentence number {i}" for i in range(3 * TURN)]

    def big() -> None:
        got["big"] = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")

    def small() -> None:
        got["small"] = client.embeddings.create(model=MODEL, input="hello there", encoding_format="float")

    threads = [threading.Thread(target=big), threading.Thread(target=small)]
    threads[0].start()
    try:
        assert held.entered.wait(60), "the big request's forward never started"
        threads[1].start()
        queue = encoder.executor._work_queue
        for _ in range(6000):  # until the small request's forward waits for the model's thread
            if queue.qsize():
                break
            threading.Event().wait(0.01)
        assert queue.qsize() == 1
    finally:
        held.release.set()
        for t in threads:
            t.join(60)
    assert held.sizes == [TURN, 1, TURN, TURN]  # the small one went after one turn of the big one, not after it all
    alone = client.embeddings.create(model=MODEL, input=texts[:3] + [texts[-1]], encoding_format="float")
    big_vectors = got["big"].data
    assert [d.index for d in big_vectors] == list(range(len(texts)))  # rows back in input order
    for i, j in ((0, 0), (1, 1), (2, 2), (3, len(texts) - 1)):
        assert big_vectors[j].embedding == pytest.approx(alone.data[i].embedding, abs=1e-5)
    assert len(got["small"].data) == 1


def test_another_requests_keep_alive_0_does_not_cut_a_big_request_between_its_turns(encoder, xllm_server, client,
                                                                                      monkeypatch):
    """keep_alive 0 unloads the model after the request, not under another one in flight: a big request's whole
    forward was one job on the model's thread, which the unload waited for; its turns and its tokenizing are not."""
    calls: list[int] = []
    entered = {1: threading.Event(), 3: threading.Event()}
    release = {1: threading.Event(), 3: threading.Event()}
    embed_ids = encoder.model.embed_ids

    def held(batch: Any) -> Any:
        calls.append(len(batch))
        n = len(calls)
        if n in entered:  # the big one's first and second turns wait until released
            entered[n].set()
            release[n].wait(60)  # (a bound only so a broken test cannot hang the run)
        return embed_ids(batch)

    monkeypatch.setattr(encoder.model, "embed_ids", held)
    got: dict[str, Any] = {}
    texts = [f"sentence number {i}" for i in range(3 * TURN)]

    def big() -> None:
        try:
            got["big"] = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        except Exception as exc:  # reported by the assertions below
            got["big"] = exc

    first = threading.Thread(target=big)
    first.start()
    try:
        assert entered[1].wait(60), "the big request's forward never started"
        small = threading.Thread(target=lambda: got.setdefault("small", client.embeddings.create(
            model=MODEL, input="hello there", extra_body={"keep_alive": 0})))
        small.start()
        for _ in range(6000):  # until the small request's forward waits for the model's thread
            if encoder.executor._work_queue.qsize():
                break
            threading.Event().wait(0.01)
        release[1].set()
        small.join(60)
        assert len(got["small"].data) == 1  # done, between the big one's turns: its keep_alive 0 has expired
        assert entered[3].wait(60), "the big request's second turn never started"
        # the keep_alive timer's pass (it runs every 0.25 s on its own too) while the big request is in flight
        reap = asyncio.run_coroutine_threadsafe(xllm_server.engine._reap_expired(), xllm_server.loop)
        for _ in range(6000):
            if reap.done() or encoder.closed:
                break
            threading.Event().wait(0.01)
        assert not encoder.closed, "the model was unloaded under the big request"
    finally:
        for event in release.values():
            event.set()
        first.join(60)
    assert not isinstance(got["big"], Exception), got["big"]
    assert len(got["big"].data) == len(texts)
    for _ in range(6000):  # and once nothing uses it, the keep_alive 0 unloads it
        if MODEL not in xllm_server.engine._embeddings.slots:
            break
        threading.Event().wait(0.01)
    assert MODEL not in xllm_server.engine._embeddings.slots
