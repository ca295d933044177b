"""Shared pieces of the slow-work tests: tiny-Llama stores, a held pull lock, counted calls, a chat that answers."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable

import openai
import pytest

from xllm_jupyter.store.atomic import FileLock
from xllm_jupyter.store.names import name_to_dirname
from xllm_jupyter.store.store import ModelStore

HI = [{"role": "user", "content": "hi"}]
#: how long a hung chat may take before the test reports it (a fail-safe, not a timing assertion)
HUNG = 60


def store_of(home, model_dir, *names: str) -> ModelStore:
    """A store at ``home`` holding a copy of ``model_dir`` under each of ``names``."""
    store = ModelStore(home)
    for name in names:
        store.pull(str(model_dir), name)
    return store


def hold_pull_lock(home, name: str) -> FileLock:
    """The store lock of ``name``, taken as a pull of it (in this or another process) holds it; release it after."""
    lock = FileLock(home / "locks" / f"{name_to_dirname(name)}.lock")
    assert lock.acquire(blocking=False)
    return lock


class CallCounter:
    """Counts the calls of the functions it wraps, so that a test can wait until enough of them have begun."""

    def __init__(self) -> None:
        self.calls = 0
        self._changed = threading.Condition()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, counting each call as it begins."""
        def counted(*args, **kwargs):
            with self._changed:
                self.calls += 1
                self._changed.notify_all()
            return function(*args, **kwargs)
        return counted

    def wait_for(self, calls: int, unless: Callable[[], bool] = lambda: False, timeout: float = 300) -> bool:
        """Whether ``calls`` calls began (or ``unless()`` came true) within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.calls >= calls or unless(), timeout)


def assert_chat_answers(base_url: str, api_key: str, model: str, hung: str) -> None:
    """A two-token chat with ``model`` answers within HUNG seconds; the test fails with ``hung`` if it does not."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=HUNG)
    try:
        reply = client.chat.completions.create(model=model, messages=HI, max_tokens=2)
    except openai.APITimeoutError:
        pytest.fail(hung)
    assert reply.model == model and reply.usage.completion_tokens >= 1


def assert_chat_answers_while_held(held: CallCounter, calls: int, sent: list[Future], base_url: str, api_key: str,
                                   model: str, hung: str) -> None:
    """Once ``calls`` of the slow requests ``sent`` are held (none finished), a chat with ``model`` still answers;
    ``hung`` (``{calls}`` there: how many were held) is the failure if it does not."""
    assert held.wait_for(calls, unless=lambda: any(f.done() for f in sent))
    assert not any(f.done() for f in sent), [f.exception() or f.result() for f in sent if f.done()]
    assert_chat_answers(base_url, api_key, model, hung.format(calls=held.calls))
