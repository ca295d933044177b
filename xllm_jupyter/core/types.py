"""Typed values that cross layers: requests, sampling parameters and generation events."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

from .quick_init import quick_init as _quick_init


class FinishReason(str, enum.Enum):
    """Why a sequence stopped; values are the OpenAI wire strings."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"  # internal: client left or job was cancelled; never sent to clients
    ERROR = "error"  # internal: engine failure


@dataclass(frozen=True)
class ChatMessage:
    """One chat message after wire parsing (content already flattened to text)."""

    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    #: an assistant turn's thinking sent back in the history (wire ``reasoning_content`` or ``reasoning``)
    reasoning_content: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The dict form chat templates expect."""
        out: dict[str, Any] = {"role": self.role, "content": self.content if self.content is not None else ""}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:  # as vLLM passes it (Qwen3's, DeepSeek's templates); gpt-oss's: thinking
            out["reasoning_content"] = out["reasoning"] = out["thinking"] = self.reasoning_content
        return out


@dataclass(frozen=True)
class ModelfileDefaults:
    """A created model's Modelfile settings that serving applies to requests which leave them unset
    (none for a model made by ``pull``)."""

    #: PARAMETER values under Ollama's names (``temperature``, ``num_predict``, ``stop`` ...)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: SYSTEM: the system message a request without its own gets
    system: str | None = None
    #: MESSAGE: few-shot turns put before the request's own
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; defaults are greedy-free OpenAI defaults.

    ``temperature == 0`` means greedy. ``top_k <= 0`` (0, or vLLM's -1) and ``min_p == 0`` disable those
    filters. ``repetition_penalty == 1`` disables it. ``seed`` makes sampling
    reproducible: same seed and same request give the same tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Constraint:
    """A grammar the generated text must match, enforced token by token by the backend.

    ``kind`` is ``json_schema`` (``spec`` = the schema as JSON text), ``json_object``
    (any JSON object; ``spec`` unused), ``lark`` (``spec`` = an llguidance Lark grammar,
    which may embed ``%json{...}`` schemas), ``regex`` (``spec`` = the pattern) or ``grammar`` (``spec`` = Lark or
    GBNF text, vLLM's ``guided_grammar``).
    """

    kind: str
    spec: str = ""
    think: tuple[str, ...] = ()  # thinking markers (start, end): the grammar starts after them (think_grammar.py)
    opened: bool = False  # (with think) the prompt opened the thinking: the reply begins inside it


@dataclass(frozen=True)
class GenerationParams:
    """Everything about one generation besides the prompt."""

    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    #: score the prompt's own tokens at prefill (legacy completions' echo with logprobs), with
    #: ``top_logprobs`` alternatives each; ``max_tokens`` may then be 0 (score only, generate nothing)
    prompt_logprobs: bool = False
    #: special tokens (by their text) whose text the decoded output keeps, every other one still skipped: the
    #: tool-call markup a model writes as special tokens (Mistral's ``[TOOL_CALLS]``) that the tool parser reads
    keep_special: tuple[str, ...] = ()
    #: (opener, closer) pairs of kept special tokens the text between which no stop string matches (a harmony
    #: message's header: ``<|channel|>final<|message|>``); the kept tokens themselves never match (engine/stops.py)
    stop_exempt: tuple[tuple[str, str], ...] = ()


class Admission:
    """Whether a request's prompt has entered its model's batch (its prefill runs): set by the engine thread."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted = False


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt for one model; ``n`` sequences are generated from it."""

    model: str
    prompt_ids: tuple[int, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str = ""
    #: the LoRA adapter (its served name) attached to ``model`` that this request runs with; None = base
    adapter: str | None = None
    #: seconds to keep the model loaded after this request; None = the model's default, negative = forever
    keep_alive: float | None = None
    #: who asked (hub user, Jupyter user or API key id); keys per-user fair admission; None = anonymous
    user: str | None = None
    #: prefix-cache namespace: prompts are reused only within one namespace ("" = shared by everyone)
    cache_namespace: str = ""
    #: set once a job of this request is admitted to the batch, so a request cancelled before its first token can
    #: still be charged the prompt its model processed (server/metrics.py); None = nobody asks
    admission: Admission | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SequenceJob:
    """One sequence the backend decodes: what the engine hands a LoadedModel.

    ``job_id`` is unique per loaded model. Stop strings are applied by the engine, stop
    tokens (EOS and ``stop_token_ids``) by the backend.
    """

    job_id: int
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    #: the LoRA adapter this row decodes with (its served name); None = the base model
    adapter: str | None = None
    #: the requesting user (fair admission across users); None = anonymous
    user: str | None = None
    #: backends salt prefix-cache reuse with this, so cached prompts never cross namespaces
    cache_namespace: str = ""
    #: score every prompt token in the prefill (``LoadedModel.scores_prompts``); ``max_tokens`` 0: only that
    prompt_logprobs: bool = False
    #: special tokens whose text the decoded output keeps (``GenerationParams.keep_special``)
    keep_special: tuple[str, ...] = ()


@_quick_init  # made per token per stream
@dataclass(frozen=True)
class TokenEvent:
    """A backend's output for one job in one step: one new token, maybe finishing it.

    ``text`` is the incremental detokenized text (may be "" while a multi-byte
    character is incomplete). When ``finish`` is set this is the job's last event; a
    finishing event may carry no token (``token_id is None``), e.g. on cancel.
    """

    job_id: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[str, float], ...] = ()
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    #: with ``finish`` ERROR: the device ran out of memory for this job (its request gets a 503 to retry)
    out_of_memory: bool = False
    #: with ``finish`` ERROR: what the client is told went wrong (None: a generic engine error)
    error: str | None = None
    #: with ``finish`` ERROR: the job's output constraint (its grammar) could not be followed, e.g. a
    #: schema past the grammar engine's limits; the request is at fault (400), and this says why
    constraint_error: str | None = None
    #: with ``logprob``: the sampled token's own bytes, which for a character split over tokens are part
    #: of it (``text`` holds whole characters only); None: the backend has none, ``text``'s UTF-8 stands in
    token_bytes: bytes | None = None
    #: each ``top_logprobs`` alternative's own bytes, in order (empty: each one's string's UTF-8 stands in)
    top_bytes: tuple[bytes, ...] = ()
    #: on a job's first event when it asked for ``prompt_logprobs``: its prompt's tokens scored
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts for one request (all of its choices)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """prompt + completion, as OpenAI reports it."""
        return self.prompt_tokens + self.completion_tokens


class TokenLogprob(NamedTuple):
    """One generated token's logprob entry: its own string and bytes, and its top alternatives'.

    ``token`` is the token alone (bytes that are no whole character written ``\\xe3``), not the text
    it released, so entries of a character split over tokens join up byte for byte.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    raw: bytes = b""
    #: the raw bytes of each ``top`` alternative, in the same order
    top_raw: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's tokens as the model scored them in its prefill (legacy completions' ``echo`` with logprobs).

    The engine hands it to a request before its first ``ChoiceDelta``. The first prompt token has
    nothing before it to be predicted from, so it has no logprob: only its own string and bytes.
    ``scored`` holds every later prompt token, in order, with its logprob given the tokens before it
    and the most likely alternatives at its place.
    """

    first_token: str
    first_raw: bytes
    scored: tuple[TokenLogprob, ...] = ()

    def __len__(self) -> int:
        """The prompt's token count."""
        return 1 + len(self.scored)


@_quick_init  # made per token per stream
@dataclass(frozen=True)
class ChoiceDelta:
    """What the engine streams to serving: new text for one choice, maybe its finish.

    Stop strings are already removed from ``text``. ``finish`` is ``stop`` or
    ``length`` (or ``error``) on the choice's last delta.
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: FinishReason | None = None
    #: with ``finish`` STOP: the request's stop string that ended the choice (its text is cut before the match), or
    #: its ``stop_token_ids`` entry that did; None when the model ended it (EOS, a grammar's end). vLLM's field
    stop_reason: str | int | None = None

    @property
    def stop_string(self) -> bool:
        """A stop of the request's (a string or a stop token) ended the choice, not the model: a grammar-forced tool
        call it cut is incomplete."""
        return self.stop_reason is not None


@dataclass(frozen=True)
class GenerationTimings:
    """How long a request took on the engine thread, as llama.cpp's server times it (its ``timings``)."""

    #: from its admission into the batch to its first token: the prompt's prefill (and the steps of others between)
    prompt_seconds: float
    #: from its first token to its last (0 for one token)
    generation_seconds: float


@dataclass(frozen=True)
class GenerationDone:
    """The final event of a request: usage across all choices."""

    usage: Usage
    #: the engine's times for it (None where nothing was timed: an echo, a reply cut short by serving)
    timings: GenerationTimings | None = None


@dataclass(frozen=True)
class EngineStats:
    """Counters the engine exposes for tests, `xllm ps` and metrics."""

    running: int
    queued: int
    steps: int
    max_batch: int
    batched_steps: int
    completed: int
    cancelled: int
    #: tokens generated, every choice's, cancelled ones' included (the all-models view counts since start)
    tokens: int = 0
    #: steps the backend raised in (engine/step_failures.py)
    failed_steps: int = 0
    #: of those, the ones that failed only the requests that had just joined; the rest of the batch went on
    isolated_failures: int = 0


class UserSequences(NamedTuple):
    """One user's sequences in the engine now: ``running`` (holding a batch slot) and ``queued``."""

    running: int = 0
    queued: int = 0

    @staticmethod
    def summed(tables: Iterable[Mapping[str, UserSequences]]) -> dict[str, UserSequences]:
        """Several ``user -> UserSequences`` tables added up (replicas, models, users sharing a label)."""
        out: dict[str, UserSequences] = {}
        for table in tables:
            for user, seqs in table.items():
                had = out.get(user, UserSequences())
                out[user] = UserSequences(had.running + seqs.running, had.queued + seqs.queued)
        return out


@dataclass(frozen=True)
class ModelRuntime:
    """What the engine knows of a model in memory, or on its way there (``ModelInfo.runtime``)."""

    state: str = "loaded"  # or "loading" (then nothing else is known yet)
    memory_bytes: int = 0  # measured now: an eager KV cache grows after the load
    running: int = 0
    queued: int = 0
    max_batch_size: int | None = None
    replicas: tuple[EngineStats, ...] = ()
    last_used: int | None = None  # unix seconds
    in_use: int = 0  # requests holding the model now
    expires_at: int | None = None  # when keep_alive unloads it (None: never)
    #: loading only: the load waits for models in use to go idle and free its memory (engine.load_wait_seconds)
    waiting_for_room: bool = False

    def wire(self) -> dict[str, Any]:
        """The JSON facts (``/v1/models`` and ``/admin/models`` details)."""
        if self.state == "loading":
            return {"state": "loading", "waiting_for_room": self.waiting_for_room}
        facts = asdict(self)  # (the replicas' counters become dicts too)
        del facts["waiting_for_room"]  # a loaded model waits for nothing
        facts["replicas"] = list(facts["replicas"])  # a JSON array, as before
        return facts


@dataclass(frozen=True)
class ModelInfo:
    """A model the engine can serve: loaded or in the store.

    ``details`` are the backend's own facts (device, dtype, batching mode, ...), passed on as
    they are; ``runtime`` is the engine's, typed, for loaded and loading models.
    """

    name: str
    created: int = 0
    owned_by: str = "xllm"
    loaded: bool = False
    backend: str | None = None
    context_length: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    runtime: ModelRuntime | None = None
    task: str | None = None  # chat, embedding, adapter (None: unknown)
    default: bool = False  # the model the server is configured to default to
    digest: str | None = None  # the stored files' digest ("sha256:..."; None: not in the store)
    #: what serving applies to a request that leaves a setting unset (None: not known here)
    defaults: ModelfileDefaults | None = None

    def wire_details(self) -> dict[str, Any]:
        """``details`` with the engine's facts merged in, as clients read them."""
        out = {**self.details, **(self.runtime.wire() if self.runtime is not None else {})}
        if self.task:
            out["task"] = self.task
        if self.default:
            out["default"] = True
        return out


@dataclass(frozen=True)
class CatalogFacts:
    """What the model catalog says of a model without loading it (None: it does not say)."""

    task: str | None = None
    digest: str | None = None
    defaults: ModelfileDefaults | None = None  # what serving would apply to its requests (generation_config, Modelfile)


@dataclass(frozen=True)
class EmbeddingResult:
    """Embeddings of a batch of inputs, in input order.

    ``vectors`` is a float32 numpy array of shape (len(inputs), dimension), each row
    L2-normalised; ``token_counts`` holds the tokens of each input (specials excluded).
    """

    model: str
    vectors: Any
    token_counts: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        """Tokens over all inputs, as ``usage.prompt_tokens`` reports them."""
        return sum(self.token_counts)
