"""A GPU engine's CPU profile on a CPU box: a stand-in LoadedModel for the stream benchmarks.

A GPU engine's step thread spends its time in two ways that matter to a server sharing
its process: Python work while it builds inputs and launches kernels (the GIL held, and
dropped briefly around every torch call, as torch releases the GIL inside each op), then
a wait for the GPU with the GIL released. ``GpuLikeModel`` reproduces that profile, with
tokens and text from the wrapped real model's tokenizer:

- ``launches`` x ``launch_us`` of Python work per step, each followed by a tiny torch op
  (which releases and retakes the GIL, as a kernel launch does);
- a GIL-free wait of ``base_us + per_seq_us * batch`` for the "GPU" (plus ``prefill_us``
  per new prompt token in the step that prefills it).

The default figures follow exllamav3 on the EXL3 1.2B model on an H100 (2.1 ms per step at
1 stream, ~15 ms at 64). Raw and server then contend for the GIL as they would on the GPU
machine, which the tiny torch model (a few GIL-free kernels per step) does not show.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from xllm_jupyter.backends.base import Backend, LoadedModel, ModelSpec
from xllm_jupyter.backends.registry import BACKENDS
from xllm_jupyter.core.types import FinishReason, SequenceJob, TokenEvent


@dataclass(frozen=True)
class GpuProfile:
    """Costs of one simulated step."""

    launches: int = 60
    launch_us: float = 8.0
    base_us: float = 1500.0
    per_seq_us: float = 210.0
    prefill_us: float = 1.5

    def spend(self, rows: int, prefill_tokens: int = 0) -> None:
        """One step's cost: the launches (GIL held between tiny torch ops), then the GIL-free "GPU" wait."""
        for _ in range(self.launches):
            _busy(self.launch_us)
            _SCRATCH.add_(1)  # a real (tiny) torch op: torch drops the GIL inside each one
        time.sleep((self.base_us + self.per_seq_us * rows + self.prefill_us * prefill_tokens) / 1e6)

    @classmethod
    def parse(cls, text: str) -> "GpuProfile":
        """``"launches=60,launch_us=8"`` style overrides of the defaults ("" = defaults)."""
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            fields[key] = int(value) if key == "launches" else float(value)
        return cls(**fields)


_SCRATCH = torch.zeros(1)


def _busy(us: float) -> None:
    """Python bytecode for ``us`` microseconds (the GIL held)."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


class GpuLikeModel(LoadedModel):
    """Wraps a real LoadedModel for its tokenizer; steps cost what a GPU engine's steps cost."""

    def __init__(self, inner: LoadedModel, profile: GpuProfile):
        self.inner = inner
        self.profile = profile
        self.name = inner.name
        self.backend_name = "gpu-like"
        self.context_length = inner.context_length
        self.eos_token_ids = inner.eos_token_ids
        self.max_batch_size = inner.max_batch_size
        self.vocab_size = inner.vocab_size
        self._token = inner.tokenize(" the", add_special_tokens=False)[-1]
        self._text = inner.detokenize([self._token])
        self._jobs: dict[int, list] = {}  # job id -> [job, tokens made, cancelled]
        self._new: list[SequenceJob] = []

    def tokenize(self, text, *, add_special_tokens=True):
        """The wrapped model's tokens."""
        return self.inner.tokenize(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids):
        """The wrapped model's text."""
        return self.inner.detokenize(ids)

    def render_chat(self, messages, *, add_generation_prompt=True, tools=None):
        """The wrapped model's chat template."""
        return self.inner.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def add(self, job: SequenceJob) -> None:
        """Queue ``job``; the next step prefills it."""
        self._new.append(job)
        self._jobs[job.job_id] = [job, 0, False]

    def cancel(self, job_id: int) -> None:
        """Drop ``job_id`` at the next step."""
        if job_id in self._jobs:
            self._jobs[job_id][2] = True

    def active_jobs(self) -> int:
        """Jobs not yet finished."""
        return len(self._jobs)

    def step(self) -> list[TokenEvent]:
        """Launch, wait for the "GPU", then one token per job."""
        prefill = sum(len(j.prompt_ids) for j in self._new)
        self._new.clear()
        self.profile.spend(len(self._jobs), prefill)
        events = []
        for job_id, entry in list(self._jobs.items()):
            job, made, cancelled = entry
            if cancelled:
                del self._jobs[job_id]
                events.append(TokenEvent(job_id, None, "", finish=FinishReason.CANCELLED))
                continue
            made = entry[1] = made + 1
            finish = FinishReason.LENGTH if made >= job.max_tokens else None
            if finish is not None:
                del self._jobs[job_id]
            events.append(TokenEvent(job_id, self._token, self._text, finish=finish,
                                     prompt_tokens=len(job.prompt_ids), completion_tokens=made))
        return events

    def details(self) -> dict:
        """Marks the stand-in in `/v1/models`."""
        return {"mode": "gpu-like stand-in"}

    def unload(self) -> None:
        """Unload the wrapped model."""
        self.inner.unload()


class GpuLikeBackend(Backend):
    """Loads the model with the transformers backend and wraps it in ``GpuLikeModel``.

    Its step costs are the profile ``register`` was given (``GpuProfile.parse``).
    """

    name = "gpu-like"

    def available(self) -> bool:
        """Always: it needs only the transformers backend."""
        return True

    def supports(self, spec: ModelSpec) -> bool:
        """Only specs that name it."""
        return spec.backend == self.name

    def load(self, spec: ModelSpec) -> LoadedModel:
        """The real model (for its tokenizer), wrapped."""
        from xllm_jupyter.backends.transformers import TransformersBackend

        inner = TransformersBackend().load(dataclasses.replace(spec, backend="transformers"))
        return GpuLikeModel(inner, _profile)


#: the step costs gpu-like models spend in this process (``register`` sets them)
_profile = GpuProfile()


def register(profile: str = "") -> None:
    """Make ``backend: gpu-like`` loadable in this process, its models spending ``profile`` ("" = defaults)."""
    global _profile
    _profile = GpuProfile.parse(profile)
    BACKENDS.setdefault(GpuLikeBackend.name, f"{__name__}:GpuLikeBackend")
