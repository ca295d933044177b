"""Small modules with one job: no module under xllm_jupyter/ passes MAX_LINES (store/ keeps to 400, test_store.py).

A module that grows past the limit is split along a seam (as engine/loading.py and engine/swaps.py were
split out of engine.py and manager.py), not given a higher cap.
"""

from __future__ import annotations

from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "xllm_jupyter"
MAX_LINES = 450
# Modules already past the limit when it was set, each capped at its size then so it cannot grow.
# Splitting one and removing it from here is welcome.
EXCEPTIONS: dict[str, int] = {}


def line_count(path: Path) -> int:
    """Lines in ``path``, as ``wc -l`` counts them for a file ending in a newline."""
    return len(path.read_text(encoding="utf-8").splitlines())


def oversized(root: Path, limit: int = MAX_LINES, exceptions: dict[str, int] | None = None) -> list[str]:
    """Every module under ``root`` longer than ``limit`` lines, or than its cap in ``exceptions``."""
    exceptions = EXCEPTIONS if exceptions is None else exceptions
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        cap = exceptions.get(rel, limit)
        if line_count(path) > cap:
            found.append(f"{rel}: {line_count(path)} lines (limit {cap})")
    return found


def test_no_module_passes_the_line_limit():
    bad = oversized(PKG)
    assert not bad, f"modules past {MAX_LINES} lines (split them along a seam): {bad}"


def test_each_exception_is_still_needed():
    """An exception for a module that is gone or back under the limit is stale: remove it."""
    for rel, cap in EXCEPTIONS.items():
        path = PKG / rel
        assert path.is_file(), f"{rel} is listed in EXCEPTIONS but does not exist"
        assert line_count(path) > MAX_LINES, f"{rel} is {line_count(path)} lines now: remove it from EXCEPTIONS"
        assert cap > MAX_LINES, f"{rel}'s cap {cap} is not above the limit: remove it from EXCEPTIONS"


def test_the_check_finds_a_long_module_and_holds_an_exception_to_its_cap(tmp_path):
    """A checker that finds nothing passes everything: feed it modules just over and at their limits."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "long.py").write_text("x = 1\n" * 11)
    (tmp_path / "core" / "fits.py").write_text("x = 1\n" * 10)
    (tmp_path / "capped.py").write_text("x = 1\n" * 13)
    assert oversized(tmp_path, limit=10, exceptions={"capped.py": 12}) == [
        "capped.py: 13 lines (limit 12)", "core/long.py: 11 lines (limit 10)"]
    assert oversized(tmp_path, limit=10, exceptions={"capped.py": 13, "core/long.py": 11}) == []
