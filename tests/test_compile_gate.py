"""The compile gate: forwards run together, a call that may compile runs alone, the skip stance only around skipping steps.

A torch.compile trace beside another transformers forward fails (the trace state is
process-wide), and torch's stance that skips guard checks is process-wide too: these tests
hold calls open on real threads and read torch's own stance.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo import eval_frame  # noqa: E402

from xllm_jupyter.backends.compile_gate import CompileGate  # noqa: E402

WAIT = 10.0


def stance_skips() -> bool:
    """Whether torch's process-wide stance now skips guard checks."""
    return eval_frame._stance.skip_guard_eval_unsafe


def until(predicate, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds (another thread reached its point)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class HeldCall(threading.Thread):
    """One call through ``gate`` on its own thread, held open until ``release`` is set."""

    def __init__(self, gate: CompileGate, kind: str) -> None:
        """``kind``: "forward", "skipping" (a forward that skips guard checks) or "compiling"."""
        super().__init__(daemon=True)
        self.gate, self.kind = gate, kind
        self.entered, self.release = threading.Event(), threading.Event()
        self.stance_inside: bool | None = None

    def run(self) -> None:
        """Enter the call, note the stance inside, wait for the release."""
        call = self.gate.compiling() if self.kind == "compiling" else \
            self.gate.forward(skip_guards=self.kind == "skipping")
        with call:
            self.stance_inside = stance_skips()
            self.entered.set()
            self.release.wait(WAIT)


def held(gate: CompileGate, kind: str) -> HeldCall:
    """Start a held call."""
    call = HeldCall(gate, kind)
    call.start()
    return call


def test_forwards_run_together_and_the_stance_skips_only_while_a_skipping_step_runs():
    gate = CompileGate()
    assert not stance_skips()
    calls = [held(gate, "forward"), held(gate, "skipping"), held(gate, "skipping")]
    for call in calls:
        assert call.entered.wait(WAIT)
    assert gate.in_flight == (3, 2, 0) and stance_skips()
    calls[1].release.set()
    calls[1].join(WAIT)
    assert stance_skips()  # the other skipping step is still in flight
    calls[2].release.set()
    calls[2].join(WAIT)
    assert not stance_skips() and gate.in_flight == (1, 0, 0)
    calls[0].release.set()
    calls[0].join(WAIT)
    assert gate.in_flight == (0, 0, 0)


def test_a_compiling_call_runs_alone_and_never_under_the_skip_stance():
    gate = CompileGate()
    serving = held(gate, "skipping")
    assert serving.entered.wait(WAIT) and serving.stance_inside
    compiling = held(gate, "compiling")  # another model's warm-up
    until(lambda: gate.in_flight == (1, 1, 1))
    assert not compiling.entered.is_set()  # it waits for the forward in flight
    late = held(gate, "forward")  # arrives while the compile waits: it waits too
    second = held(gate, "compiling")
    time.sleep(0.05)
    assert not late.entered.is_set() and not second.entered.is_set()
    serving.release.set()
    # one of the two compiles runs (either may go first), alone, and not under the skip stance
    until(lambda: compiling.entered.is_set() or second.entered.is_set())
    first, then = (compiling, second) if compiling.entered.is_set() else (second, compiling)
    time.sleep(0.05)
    assert not then.entered.is_set() and not late.entered.is_set() and first.stance_inside is False
    first.release.set()
    assert then.entered.wait(WAIT) and then.stance_inside is False and not late.entered.is_set()
    then.release.set()
    assert late.entered.wait(WAIT)
    late.release.set()
    for call in (serving, compiling, second, late):
        call.join(WAIT)
    assert gate.in_flight == (0, 0, 0) and not stance_skips()


def test_a_failing_call_leaves_nothing_behind():
    gate = CompileGate()
    for call in (lambda: gate.forward(skip_guards=True), gate.forward, gate.compiling):
        with pytest.raises(RuntimeError), call():
            raise RuntimeError("the step failed")
    assert gate.in_flight == (0, 0, 0) and not stance_skips()
