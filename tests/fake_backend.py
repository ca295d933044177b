"""A deterministic fake backend for engine/scheduler unit tests (allowed by DESIGN.md)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from xllm_jupyter.backends.base import Backend, LoadedModel, ModelSpec
from xllm_jupyter.core.errors import InvalidRequest, ModelNotFound
from xllm_jupyter.core.types import FinishReason, SequenceJob, TokenEvent

EOS = 0


class FakeModel(LoadedModel):
    """Emits token ``(prompt_sum + i) % 50 + 1`` as text ``"t<id> "``; EOS when the prompt asks."""

    backend_name = "fake"

    def __init__(self, name: str, *, step_delay: float = 0.0, context_length: int = 256, max_batch_size: int = 16,
                 memory_bytes: int = 0, capacity: int | None = None):
        self.name = name
        #: room for jobs in tokens (prompt + max_tokens each), like an exllama cache; None = unlimited
        self.capacity = capacity
        self.started: list[str | None] = []  # the user of every job added, in order
        self.overcommitted = False
        self._memory_bytes = memory_bytes
        self.context_length = context_length
        self.eos_token_ids = frozenset({EOS})
        self.max_batch_size = max_batch_size
        self.step_delay = step_delay
        self.jobs: dict[int, list] = {}
        self.new: list[SequenceJob] = []
        self.cancelled: set[int] = set()
        self.batch_sizes: list[int] = []
        self.vocab_size = 51
        self.explode = threading.Event()
        self.fail_next = threading.Event()
        #: a step raises while a job whose prompt starts with this id is being prefilled or in the batch
        self.poison: int | None = None
        #: whether a failed step can resume without the jobs added since the last good one (``drop_failed``)
        self.resumable = False
        self.dropped: list[frozenset[int]] = []  # what each drop_failed call dropped
        self.unloaded = False
        #: when set, every step waits until the event is set (a step held at the compile gate, say)
        self.gate: threading.Event | None = None
        self.in_step = False
        self.unloaded_mid_step = False
        self.unloaded_on: int | None = None  # the thread unload ran on
        #: set before loading to make warm_up raise it; warmed_on: the thread warm_up ran on
        self.warm_up_error: BaseException | None = None
        self.warm_up_gate: threading.Event | None = None
        self.warmed_on: int | None = None

    def tokenize(self, text, *, add_special_tokens=True):
        return [ord(c) % 50 + 1 for c in text]

    def detokenize(self, ids):
        return "".join(f"t{i} " for i in ids)

    def render_chat(self, messages, *, add_generation_prompt=True):
        return "".join(f"{m.role}:{m.content}\n" for m in messages)

    def add(self, job: SequenceJob) -> None:
        if job.max_tokens == 13:
            raise InvalidRequest("13 tokens is unlucky", param="max_tokens")
        budget = self.admission_budget()
        self.overcommitted |= budget is not None and self.admission_cost(job) > budget
        self.started.append(job.user)
        self.new.append(job)

    def admission_budget(self) -> int | None:
        """Tokens of ``capacity`` not taken by jobs added and not yet finished."""
        if self.capacity is None:
            return None
        return self.capacity - sum(self.admission_cost(j) for j in [*self.new, *(slot[0] for slot in self.jobs.values())])

    def admission_cost(self, job: SequenceJob) -> int:
        """Prompt and answer tokens."""
        return len(job.prompt_ids) + job.max_tokens

    def cancel(self, job_id: int) -> None:
        self.cancelled.add(job_id)

    def active_jobs(self) -> int:
        return len(self.jobs) + len(self.new)

    def next_token(self, job: SequenceJob, i: int) -> int:
        """The i-th token of ``job``: EOS at i == 3 when the prompt starts with 99."""
        if job.prompt_ids[0] == 99 and i == 3:
            return EOS
        seed = job.sampling.seed or 0
        return (sum(job.prompt_ids) + i + seed) % 50 + 1

    def step(self):
        self.in_step = True
        try:
            return self._step()
        finally:
            self.in_step = False

    def _step(self):
        if self.gate is not None:
            self.gate.wait()
        if self.explode.is_set():
            raise RuntimeError("boom")
        if self.fail_next.is_set() and self.jobs:
            self.fail_next.clear()
            raise RuntimeError("one bad step")
        if self.poison is not None and any(j.prompt_ids[0] == self.poison
                                           for j in [*self.new, *(slot[0] for slot in self.jobs.values())]):
            raise RuntimeError("/secret/path: a poisoned job")  # (a path: no response may show it)
        if self.step_delay:
            time.sleep(self.step_delay)
        events = []
        for job in self.new:
            if job.max_tokens == 66:  # a job the device has no memory for (exllamav3 drops it, say)
                events.append(TokenEvent(job.job_id, None, "", finish=FinishReason.ERROR, out_of_memory=True))
                continue
            if job.max_tokens == 67:  # a job whose logits overflowed (the backend says why)
                events.append(TokenEvent(job.job_id, None, "", finish=FinishReason.ERROR, error="non-finite logits"))
                continue
            self.jobs[job.job_id] = [job, 0]
        self.new = []
        self.batch_sizes.append(len(self.jobs))
        for job_id, slot in list(self.jobs.items()):
            job, i = slot
            if job_id in self.cancelled:
                del self.jobs[job_id]
                events.append(TokenEvent(job_id, None, "", finish=FinishReason.CANCELLED))
                continue
            tok = self.next_token(job, i)
            slot[1] = i + 1
            finish = None
            text = f"t{tok} "
            if tok in job.stop_token_ids:
                finish, text = FinishReason.STOP, ""
            elif slot[1] >= job.max_tokens:
                finish = FinishReason.LENGTH
            if finish:
                del self.jobs[job_id]
            events.append(
                TokenEvent(job_id, tok, text, logprob=-0.5 if job.logprobs else None, finish=finish,
                           prompt_tokens=len(job.prompt_ids), completion_tokens=slot[1])
            )
        return events

    def drop_failed(self, suspects):
        """Drop every suspect (the jobs added since the last good step: none started yet) when resumable."""
        dropped = frozenset(j.job_id for j in self.new if j.job_id in suspects)
        if not self.resumable or not dropped:
            return None
        self.new = [j for j in self.new if j.job_id not in dropped]
        self.dropped.append(dropped)
        return dropped

    def warm_up(self):
        self.warmed_on = threading.get_ident()
        if self.warm_up_gate is not None:
            self.warm_up_gate.wait()
        if self.warm_up_error is not None:
            raise self.warm_up_error

    def unload(self):
        self.unloaded = True
        self.unloaded_mid_step = self.in_step
        self.unloaded_on = threading.get_ident()

    def memory_bytes(self):
        return self._memory_bytes


class FakeEmbeddingModel:
    """A minimal embedding model for EmbeddingHost: every text becomes the unit vector [1, 0]."""

    name = "vec"
    dimension = 2

    def tokenize(self, text):
        """One id per word."""
        return [1] * len(text.split())

    def check_ids(self, index, ids):
        """Every input fits."""

    def embed_ids(self, ids):
        """[1, 0] for each input."""
        return [[1.0, 0.0] for _ in ids]

    def unload(self):
        """Nothing to free."""


class FakeBackend(Backend):
    """Loads FakeModels by name; remembers them for assertions."""

    name = "fake"

    def __init__(self, *, load_delay: float = 0.0, warm_up_errors: dict[str, BaseException] | None = None,
                 **model_kwargs):
        self.model_kwargs = model_kwargs
        self.warm_up_errors = warm_up_errors or {}  # model name -> what its warm_up raises
        self.models: dict[str, FakeModel] = {}
        self.load_delay = load_delay
        self.loads = 0  # how many times load() ran
        self.warm_up_gate: threading.Event | None = None  # models loaded now warm up once it is set
        self.in_flight = self.max_in_flight = 0  # loads running at once now / at most
        self._count = threading.Lock()

    def available(self):
        return True

    def supports(self, spec):
        return spec.format == "fake"

    def load(self, spec):
        self.loads += 1
        with self._count:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.load_delay)
        with self._count:
            self.in_flight -= 1
        model = FakeModel(spec.name, **self.model_kwargs)
        model.warm_up_error = self.warm_up_errors.get(spec.name)
        model.warm_up_gate = self.warm_up_gate
        self.models[spec.name] = model
        return model


class FakeCatalog:
    """A catalog of fake models with fixed names."""

    def __init__(self, names=("fake",), path: Path = Path("/nonexistent")):
        self._names = list(names)
        self.path = path  # its files' size is the engine's pre-load memory estimate

    def resolve(self, name):
        if name not in self._names:
            raise ModelNotFound(name)
        return ModelSpec(name=name, path=self.path, format="fake", backend="fake")

    def names(self):
        return list(self._names)
