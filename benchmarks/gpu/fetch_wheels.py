#!/usr/bin/env python
"""Download, into .whl/, the wheels the GPU machine lacks for our GPU tests and benchmark.

The GPU machine has no network: every Python distribution it lacks must be carried as a
wheel for Python 3.12 / manylinux x86_64 (benchmarks/gpu/prepare.sh installs them there).
This resolves what the checks import (the package's runtime dependencies minus the Jupyter
front-end, which the standalone server never imports, plus the exllama extras and the test
clients) with pip's resolver for that target, drops what the machine's image already holds
(``box_packages.txt``) and downloads the rest without dependencies, so one version of each
lands in ``.whl/`` (about 16 MiB; the device tool carries 64 MiB per call in all). Run it
here (CPU, registry access) before a device call::

    .venv/bin/python benchmarks/gpu/fetch_wheels.py            # writes .whl/, prints the total
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# what the GPU tests and gpu_serving.py import beyond the package's runtime dependencies
EXTRA_REQUIREMENTS = ("openai>=1.50", "pytest-asyncio>=0.23", "jsonschema>=4")
# the Jupyter front-end (extension, magics): the standalone server and the tests there never
# import it, and its closure (nbconvert, IPython, jedi, ...) would double the carried size
FRONT_END = {"jupyter-server", "ipython", "traitlets"}
# resolved but never imported there: exllamav2's dataset reader for its converter (fastparquet,
# cramjam), and the needs of newer huggingface_hub / pandas releases than the image's own copies
# (kernels, tomlkit, tzdata). Left out, they keep the carried tree well under its 64 MiB
NOT_IMPORTED_THERE = {"fastparquet", "cramjam", "kernels", "tomlkit", "tzdata"}
# pip matches manylinux tags exactly: offer every glibc level the machine can run
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *[arg for n in range(17, 40) for arg in ("--platform", f"manylinux_2_{n}_x86_64")],
          "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
CARRY_LIMIT_BYTES = 64 * 1024 * 1024  # the device tool's limit for everything that travels


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form (lower case, runs of -_. as one dash)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def box_packages(path: Path = HERE / "box_packages.txt") -> set[str]:
    """The normalised names listed in ``box_packages.txt`` (comments and blank lines skipped)."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        names.update(normalise(n) for n in line.split("#", 1)[0].split())
    return names


def missing_on_box(resolved: dict[str, str], present: set[str], own: str = "xllm-jupyter") -> dict[str, str]:
    """The resolved ``{name: version}`` pins the machine lacks (our own package travels as source)."""
    return {n: v for n, v in sorted(resolved.items()) if normalise(n) not in present and normalise(n) != own}


def gpu_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings the GPU checks need: runtime deps minus FRONT_END, exllama extras, clients."""
    import tomllib  # Python 3.11+, like the rest of the GPU tooling

    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = [r for r in project["dependencies"] if normalise(re.split(r"[<>=!~\[; ]", r, 1)[0]) not in FRONT_END]
    extras = project["optional-dependencies"]
    return [*runtime, *extras["exl3"], *extras["exl2"], *EXTRA_REQUIREMENTS]


def resolve(requirements: list[str]) -> dict[str, str]:
    """Resolve requirements for the GPU machine's Python and platform: ``{name: version}``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *TARGET, *requirements]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in items}


def main(argv: list[str] | None = None) -> int:
    """Resolve, subtract the machine's packages, download the rest into ``--dest``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p.add_argument("--keep", action="store_true", help="keep wheels already in --dest")
    args = p.parse_args(argv)
    pins = missing_on_box(resolve(gpu_requirements()), box_packages() | NOT_IMPORTED_THERE)
    dest = Path(args.dest)
    if dest.exists() and not args.keep:
        shutil.rmtree(dest)  # two versions of one package would stop the install there
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *TARGET,
                    *[f"{n}=={v}" for n, v in pins.items()]], check=True)
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(pins)} wheels, {total / 2**20:.1f} MiB in {dest}: {' '.join(f'{n}=={v}' for n, v in pins.items())}")
    if total > CARRY_LIMIT_BYTES // 2:
        print("warning: over half of the 64 MiB the device tool carries per call", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
