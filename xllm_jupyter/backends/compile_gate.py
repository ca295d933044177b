"""Keeps transformers forwards away from a torch.compile trace, and decides when compiled steps skip guard checks.

Two process-wide hazards, one gate:

- **A trace beside a forward fails.** While dynamo traces a model (the first compiled call
  of a decoder), it reads module-level state that transformers' forward wrappers (and the
  ``kernels`` hub they call) switch to globals under compilation; a forward of any other
  transformers model on another thread changes that state mid-trace, and dynamo's guard
  building fails ("Expected dict, got NoneType"). With transformers 5.25 and one thread
  serving while another compiled, 4-6 of 8 compiles failed here, each leaving its model
  decoding eagerly; with the gate none did. So a call that may compile runs alone: it
  waits for the forwards in flight, and new forwards wait for it.
- **Skipping guard checks is process-wide.** Before it runs a compiled graph, dynamo checks
  the graph's guards: for a transformers model about 1,000 of them (every parameter, module,
  config attribute and cache tensor the trace touched): skipping them saved 0.2-0.6 ms per
  decode step on this project's 2-core machine (``benchmarks/compiled_step.py``), a large share
  of a CUDA-graph decode step. ``torch.compiler.set_stance(
  skip_guard_eval_unsafe=True)`` checks only the guards that tell a function's graphs apart:
  safe for a decoder whose warm-up left exactly one graph for every shape it will see, unsafe
  for a call that may still compile (it could run an existing graph where a new one is
  needed). torch reads the stance, on any thread, when a compiled function is entered, so it
  is on only while such steps are in flight, and a compiling call never overlaps them.

Forwards (eager, or compiled steps skipping their guard checks) run together; a compiling call
(a warm-up step, or any compiled step whose guards are checked) runs alone, one at a time, and
is waited for by forwards that arrive meanwhile. No call may be nested in another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CompileGate:
    """Forwards run together; a call that may compile runs alone."""

    def __init__(self) -> None:
        """Nothing in flight; the stance as torch starts it."""
        self._cond = threading.Condition()
        self._running = 0  # forwards in flight
        self._skipping = 0  # of those, compiled steps that skip their guard checks
        self._compiling = 0  # compiling calls in flight or waiting
        self._compiler_in = False  # one of them is running

    @contextmanager
    def forward(self, *, skip_guards: bool = False) -> Iterator[None]:
        """Around one eager forward, or a compiled step that cannot compile (``skip_guards``: skip its checks)."""
        with self._cond:
            self._cond.wait_for(lambda: self._compiling == 0)
            self._running += 1
            if skip_guards:
                self._skipping += 1
                if self._skipping == 1:
                    _set_skip_stance(True)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if skip_guards:
                    self._skipping -= 1
                    if self._skipping == 0:
                        _set_skip_stance(False)
                self._cond.notify_all()

    @contextmanager
    def compiling(self) -> Iterator[None]:
        """Around one compiled call that may trace and compile: it runs alone."""
        with self._cond:
            self._compiling += 1
            self._cond.wait_for(lambda: self._running == 0 and not self._compiler_in)
            self._compiler_in = True
        try:
            yield
        finally:
            with self._cond:
                self._compiler_in = False
                self._compiling -= 1
                self._cond.notify_all()

    @property
    def in_flight(self) -> tuple[int, int, int]:
        """(forwards, of which skipping guard checks, compiling calls running or waiting): for tests."""
        with self._cond:
            return self._running, self._skipping, self._compiling


def _set_skip_stance(skip: bool) -> None:
    # imported here: the embeddings and transformers modules import this one without torch
    import torch

    torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip)


#: the one gate of this process (the trace state and the stance it guards are process-wide)
COMPILE_GATE = CompileGate()


def empty_cuda_cache() -> None:
    """Return torch's cached CUDA memory to the device, not while another model records a CUDA graph (the
    graph's memory pool is the allocator's; nothing without CUDA)."""
    import torch

    if torch.cuda.is_available():
        with COMPILE_GATE.compiling():
            torch.cuda.empty_cache()
