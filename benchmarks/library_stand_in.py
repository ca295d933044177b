"""The exllama libraries' own generators on CPU, with a GPU engine's step costs: ``gpu_serving.py --stand-in``.

``gpu_like.py``'s stand-in replaces a whole LoadedModel, so the server it measures never runs
our exllama adapter or the library's scheduler. Here both run as on the GPU machine:
``tests/page_generator.py`` keeps the library's generator, jobs and page tables and takes
out only the forward, and every forward it leaves out spends a ``GpuProfile`` (Python
launches holding the GIL, then a GIL-free wait for the "GPU"). The raw side drives that
generator directly, the server side loads it through our backend behind the real server.
Needs the libraries' prebuilt extension modules (``benchmarks/gpu/cpu_check.sh --bench``).
"""

from __future__ import annotations

from typing import Any

from gpu_like import GpuProfile

from tests.page_generator import (
    CpuPagesV2Backend,
    CpuPagesV3Backend,
    load_cpu_pages_model,
    load_cpu_pages_v2_model,
)
from xllm_jupyter.backends.base import ModelSpec
from xllm_jupyter.backends.exllamav2 import paged_attention_available
from xllm_jupyter.backends.registry import BACKENDS

#: benchmark backend name -> the stand-in backend serving it
STAND_IN_OF = {"exllamav3": "exllamav3-stand-in", "exllamav2": "exllamav2-stand-in"}


#: the step costs the stand-in backends spend in this process (``register`` sets them)
_profile = GpuProfile()


class StandInV3Backend(CpuPagesV3Backend):
    """exllamav3's generator without weights, every forward spending the registered GPU profile."""

    name = STAND_IN_OF["exllamav3"]

    def supports(self, spec: ModelSpec) -> bool:
        """Only specs that name it."""
        return spec.backend == self.name

    def load(self, spec: ModelSpec) -> Any:
        """The CPU-pages model with the profile's costs."""
        return load_cpu_pages_model(spec, _profile.spend)


class StandInV2Backend(CpuPagesV2Backend):
    """exllamav2's dynamic generator the same way: paged where flash-attn imports, else unpaged (batch 1)."""

    name = STAND_IN_OF["exllamav2"]

    def supports(self, spec: ModelSpec) -> bool:
        """Only specs that name it."""
        return spec.backend == self.name

    def load(self, spec: ModelSpec) -> Any:
        """The CPU-pages model with the profile's costs."""
        return load_cpu_pages_v2_model(spec, paged=paged_attention_available(), step_cost=_profile.spend)


def register(profile: str = "") -> None:
    """Make the stand-in backends loadable in this process, spending ``profile`` (``GpuProfile.parse``)."""
    global _profile
    _profile = GpuProfile.parse(profile)
    for backend in (StandInV3Backend, StandInV2Backend):
        BACKENDS.setdefault(backend.name, f"{__name__}:{backend.__name__}")


def load(backend: str, spec: ModelSpec, profile: str = "") -> Any:
    """Our model over the stand-in generator of benchmark backend ``backend`` (exllamav3 / exllamav2)."""
    register(profile)
    cls = StandInV3Backend if backend == "exllamav3" else StandInV2Backend
    return cls().load(spec)
