"""The GPU session's staging tools (benchmarks/gpu/), checked on CPU without a device.

What can run here does: the wheel planner's requirement set and subtraction, the shell
scripts' syntax, and session.sh's phase scheduler (deadline, skips, unknown phases, results
collected into $OUT) with phases that need no GPU, and a dry run of the two documented session calls
whose stand-in ``python3`` checks every phase's command line with the program's own parser.
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


#: what stands in for the GPU machine's ``python3`` in the dry run: every program a phase starts gets its
#: command line checked by the program's own argument parser (or, for pytest, a real collection of what the
#: phase names); a benchmark writes its results file through gpu_serving's own ``save``
DRY_PYTHON = r'''
import json, os, re, subprocess, sys, zipfile
from pathlib import Path

ROOT = Path.cwd()
argv = sys.argv[1:]
with open(os.environ["DRY_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\n")
if argv[:2] == ["-m", "pytest"]:  # a real collection: a misspelt file, marker or import fails it
    # (not over what setup put on PYTHONPATH: the wheels installed there are the machine's Python's)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *argv[2:]], env=env).returncode)
if argv[:2] == ["-m", "exllamav3.conversion.convert_model"]:  # the staged release's converter flags
    wheels = sorted(ROOT.glob(".whl/exllamav3-*.whl"))
    flags = set()
    for wheel in wheels[-1:]:
        with zipfile.ZipFile(wheel) as z:
            flags = set(re.findall(r'add_argument\("(-[\w-]+)"', z.read("exllamav3/conversion/convert_model.py").decode()))
    given = [a for a in argv[2:] if a.startswith("-")]
    if wheels and not set(given) <= flags:
        sys.exit(f"converter flags {sorted(set(given) - flags)} unknown to {wheels[-1].name}")
    out = Path(argv[argv.index("-o") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    sys.exit(0)
if argv and argv[0] in ("-c", "-m"):  # setup's probes and pip: nothing to check without the machine
    sys.exit(0)
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
program, args = Path(argv[0]).stem, argv[1:]
if program == "compiled_step":
    import compiled_step
    compiled_step.parse_args(args)
    sys.exit(0)
assert program == "gpu_serving", argv
import gpu_serving
a = gpu_serving.parse_args(args)
if a.make:
    Path(a.make_out).mkdir(parents=True, exist_ok=True)
    (Path(a.make_out) / "config.json").write_text("{}")
    sys.exit(0)
for item in a.model:
    name, path = item.split("=", 1)
    assert Path(path, "config.json").is_file(), f"{name}: no model at {path}"
out = Path(a.out)
report = json.loads(out.read_text()) if out.exists() else {"rows": []}
side = {k: 1.0 for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}
report["rows"] += [{"model": m.split("=", 1)[0], "backend": b, "users": a.users, "streams": 1, "raw": side,
                    "server": side, "ratio": 1.0} for m in a.model for b in a.backends.split(",")]
report.update(device="dry run", date="-", params={"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens})
gpu_serving.save(report, out)
'''


def test_the_documented_session_calls_run_every_phase_with_command_lines_their_programs_accept(tmp_path):
    """Both calls of benchmarks/README.md's plan, dry: each phase's programs parse their command lines, the test
    files collect, and the results come back in $OUT. A typo there would otherwise cost a lease to find."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "dry_python.py").write_text(DRY_PYTHON)
    for name, body in (("python3", f'exec "{sys.executable}" "{stubs}/dry_python.py" "$@"'),
                       ("nvidia-smi", "echo 'NVIDIA H100 80GB HBM3, 81559 MiB, 570.00'")):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    out, work, log = tmp_path / "out", tmp_path / "work", tmp_path / "calls.jsonl"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_WORK": str(work), "DRY_LOG": str(log),
           "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    calls = [["--deadline", "560", "setup", "make1b", "convert1b&", "tests:250", "wait:100", "bench1b", "v2paged"],
             ["--deadline", "400", "setup", "make1b", "users1b", "v2", "compiled1b", "steps1b"]]
    for call in calls:
        done = subprocess.run(["bash", str(GPU_DIR / "session.sh"), *call], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    lines = [s.split("] ", 1)[-1] for s in (out / "summary.txt").read_text().splitlines()]
    ran = [s.split(":")[0] for s in lines if ": rc=" in s]
    assert ran == ["setup", "make1b", "tests", "convert1b", "bench1b", "v2paged",
                   "setup", "make1b", "users1b", "v2", "compiled1b", "steps1b"], lines
    failed = [s for s in lines if ": rc=" in s and ": rc=0 " not in s]
    assert not failed, (failed, "\n".join(p.read_text() for p in (work / "logs").glob("*.log")))
    import json

    rows = json.loads((out / "gpu_serving.json").read_text())["rows"]
    assert {(r["model"], r["backend"], r["users"]) for r in rows} == {
        ("exl3-1.2b", "exllamav3", 0), ("fp16-1.2b", "exllamav3", 0), ("fp16-1.2b-paged", "exllamav2", 0),
        ("exl3-1.2b", "exllamav3", 64), ("fp16-1.2b", "exllamav2", 0), ("fp16-1.2b", "transformers-compiled", 0)}
    assert (out / "gpu_serving.md").read_text().startswith("# GPU serving benchmark")
    programs = [json.loads(s)[0:2] for s in log.read_text().splitlines()]
    assert ["-m", "pytest"] in programs and ["-m", "exllamav3.conversion.convert_model"] in programs
