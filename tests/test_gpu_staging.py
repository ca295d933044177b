"""The GPU session's staging tools (benchmarks/gpu/), checked on CPU without a device.

What can run here does: the wheel planner's requirement set and subtraction, the shell
scripts' syntax, and session.sh's phase scheduler (deadline, skips, unknown phases, results
collected into $OUT) with phases that need no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import fetch_wheels  # noqa: E402


def test_requirements_keep_the_engines_and_clients_but_not_the_jupyter_front_end():
    pytest.importorskip("tomllib")
    reqs = fetch_wheels.gpu_requirements()
    names = {fetch_wheels.normalise(r.split(">")[0].split("=")[0].split("[")[0]) for r in reqs}
    assert {"exllamav3", "exllamav2", "tornado", "pydantic", "llguidance", "openai", "pytest-asyncio"} <= names
    assert not names & {"jupyter-server", "ipython", "traitlets"}


def test_box_list_is_normalised_and_holds_the_gpu_images_core():
    present = fetch_wheels.box_packages()
    assert {"torch", "transformers", "typing-extensions", "prometheus-client", "huggingface-hub"} <= present
    assert all(n == fetch_wheels.normalise(n) for n in present)
    assert not any(n.startswith("#") for n in present)


def test_missing_on_box_drops_present_and_own_package_across_spellings():
    resolved = {"PyYAML": "6.0", "typing_extensions": "4.1", "Tornado": "6.5", "xllm_jupyter": "0.1.0",
                "marisa-trie": "1.4", "pydantic_core": "2.5"}
    missing = fetch_wheels.missing_on_box(resolved, {"pyyaml", "typing-extensions"})
    assert missing == {"Tornado": "6.5", "marisa-trie": "1.4", "pydantic_core": "2.5"}


@pytest.mark.parametrize("script", sorted(p.name for p in GPU_DIR.glob("*.sh")))
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(GPU_DIR / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def run_session(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_WORK": str(work)}
    done = subprocess.run(["bash", str(GPU_DIR / "session.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)
    return done, (out / "summary.txt").read_text()


def test_session_skips_what_does_not_fit_and_names_unknown_phases(tmp_path):
    done, summary = run_session(tmp_path, "--deadline", "100", "no-such-phase", "tests", "bench8b")
    assert done.returncode == 0, done.stderr
    assert "no-such-phase: unknown phase" in summary
    # tests (~240 s) and bench8b (~180 s) cannot fit in a 100 s deadline: skipped, not started
    assert "tests: SKIPPED (needs ~240s" in summary and "bench8b: SKIPPED (needs ~180s" in summary
    assert "session: done" in summary
    assert not (tmp_path / "work" / "logs" / "tests.log").exists()


def test_session_caps_a_phase_at_the_deadline_and_still_collects_its_log(tmp_path):
    # make1b needs CUDA: on CPU it fails quickly; its log and the summary still come back in $OUT
    done, summary = run_session(tmp_path, "--deadline", "40", "make1b")
    assert done.returncode == 0, done.stderr
    line = next(s for s in summary.splitlines() if s.split("] ", 1)[-1].startswith("make1b: rc="))
    assert "rc=0" not in line
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert "logs/make1b.log" in tar.getnames()


def test_session_runs_a_background_phase_and_waits_for_it(tmp_path):
    done, summary = run_session(tmp_path, "--deadline", "100", "make1b&", "wait", "no-such-phase")
    assert done.returncode == 0, done.stderr
    lines = [s.split("] ", 1)[-1] for s in summary.splitlines()]
    started = lines.index("make1b: started in the background")
    finished = next(i for i, s in enumerate(lines) if s.startswith("make1b: rc="))
    # the phase after "wait" comes only once the background phase has finished
    assert started < finished < lines.index("no-such-phase: unknown phase")
