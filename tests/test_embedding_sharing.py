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


def _turns_waiting(slot: Any) -> int:
    """Embedding turns waiting for the model's thread: in its executor's queue, or for their user's turn."""
    waiting = getattr(slot, "turns_waiting", None)
    return slot.executor._work_queue.qsize() + (waiting() if waiting is not None else 0)


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
        for _ in range(6000):  # until the small request's forward waits for the model's thread
            if _turns_waiting(encoder):
                break
            threading.Event().wait(0.01)
        assert _turns_waiting(encoder) == 1
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
            if _turns_waiting(encoder):
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


@pytest.fixture(scope="module")
def two_users(xllm_home, tiny_catalog) -> Any:
    """A server of its own with two users' keys (the session server has one)."""
    from tests.server_fixtures import TINY, make_test_config, running_server

    with running_server(make_test_config(xllm_home, api_keys=("sk-alice", "sk-bob")), tiny_catalog, TINY) as info:
        yield info


def test_one_users_many_embedding_requests_do_not_queue_another_users_behind_them_all(two_users, monkeypatch):
    import openai

    alice, bob = (openai.OpenAI(base_url=two_users.base_url, api_key=k, max_retries=0, timeout=60)
                  for k in ("sk-alice", "sk-bob"))
    alice.embeddings.create(model=MODEL, input="warm up")
    slot = two_users.engine._embeddings.slots[MODEL]
    held = HeldForwards(slot.model.embed_ids)
    monkeypatch.setattr(slot.model, "embed_ids", held)
    got: list[Any] = []

    def send(client: Any, texts: list[str]) -> threading.Thread:
        thread = threading.Thread(target=lambda: got.append(client.embeddings.create(model=MODEL, input=texts)))
        thread.start()
        return thread

    def until_waiting(n: int) -> None:
        for _ in range(6000):
            if _turns_waiting(slot) >= n:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"{n} turns never waited for the model's thread")

    threads = [send(alice, ["alice 0 a", "alice 0 b"])]
    try:
        assert held.entered.wait(60), "alice's first forward never started"
        threads += [send(alice, [f"alice {i} a", f"alice {i} b"]) for i in range(1, 4)]  # an indexing job's burst
        until_waiting(3)
        threads.append(send(bob, ["hello there"]))
        until_waiting(4)
    finally:
        held.release.set()
        for t in threads:
            t.join(60)
    assert len(got) == 5
    assert held.sizes == [2, 1, 2, 2, 2]  # bob's one text went next, not after all of alice's burst


async def test_turns_handed_over_past_requests_that_left_never_stall_the_model():
    # requests leaving the line (the client left) while a turn is handed out: the turn goes on to the next
    # request in line, never to nobody (the model's thread idle for good) and never into an error
    import dataclasses

    from tests.fake_backend import FakeCatalog, FakeEmbeddingModel
    from xllm_jupyter.engine.embeddings import EmbeddingHost

    host = EmbeddingHost(loader=lambda spec: FakeEmbeddingModel())
    slot = await host.load(dataclasses.replace(FakeCatalog(["vec"]).resolve("vec"), task="embedding"))
    await slot.turn("alice")  # alice's turn is on the thread
    left, granted_then_left, waits = (asyncio.ensure_future(slot.turn(u)) for u in ("bob", "carol", "dave"))
    await asyncio.sleep(0)  # all three in line
    assert slot.turns_waiting() == 3
    left.cancel()  # bob leaves: his place is gone before his request runs again
    slot.turn_done()  # alice's turn ends at that moment: carol's (bob's was cancelled)
    granted_then_left.cancel()  # carol leaves with the turn handed to her: it passes on to dave
    await asyncio.wait_for(waits, 5)
    assert left.cancelled() and granted_then_left.cancelled() and slot.turns_waiting() == 0
    slot.turn_done()
    assert (await asyncio.wait_for(host.embed(slot, ["a b"], user="erin"), 5)).vectors.tolist() == [[1.0, 0.0]]
    await host.stop()
