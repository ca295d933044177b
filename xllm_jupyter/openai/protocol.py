"""OpenAI wire format: pydantic request models with OpenAI-style validation, and response builders.

Requests are parsed straight from the body bytes (``model_validate_json``) in strict mode, so ``"temperature": "0.5"``
is an error as it is on api.openai.com. Every failure becomes an ``InvalidRequest`` whose ``param`` names the
offending field, which is what the SDK exposes as ``BadRequestError.param``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import InvalidRequest, UnknownParameter, Unsupported
from ..core.types import ChatMessage, SamplingParams, Usage
from .conversation import Turn, check_history, core_messages
from .finite import check_finite
from .json_body import strict_parse, without_bom
from .legacy_functions import request_tool_config
from .model_defaults import ModelDefaults
from .schema_errors import check_json_type, openai_wording, shown
from .guided import Requested, requested_constraint

#: returned as ``system_fingerprint``; clients only compare it for equality
SYSTEM_FINGERPRINT = "fp_xllm"

#: ``service_tier`` values OpenAI accepts; this server has one way of serving, which responses name "default"
ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast"]
#: ``prompt_cache_retention``'s values (the openai SDK's types, chat and responses alike)
PromptCacheRetention = Literal["in_memory", "24h"]


def served_tier(requested: str | None) -> str | None:
    """The ``service_tier`` a response reports: "default" when one was asked for (as OpenAI does), else none."""
    return None if requested is None else "default"


#: largest ``top_logprobs`` OpenAI accepts (chat) and largest legacy ``logprobs``
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5
MAX_STOP, MAX_STOP_CHARS = 4, 512  # stop strings, and a stop string's length: matching holds back up to it and builds an automaton


class StrictModel(BaseModel):
    """Base for wire models: strict types, finite numbers, unknown fields tolerated (SDKs add new ones often)."""

    # NaN passed every bound check but the upper one, whose message then misled; Infinity passed open bounds
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


#: OpenAI's bounds on ``metadata``: pairs, key length, value length
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def check_metadata(metadata: dict[str, str] | None) -> None:
    """400 unless ``metadata`` keeps OpenAI's bounds (16 pairs, keys <= 64 and values <= 512 characters): metadata is
    stored with the object, so these bounds also cap what a request can make a server keep."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"'metadata' may have at most {MAX_METADATA_PAIRS} keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"'metadata' keys may have at most {MAX_METADATA_KEY} characters and values "
                                 f"{MAX_METADATA_VALUE}", param=f"metadata.{key[:MAX_METADATA_KEY]}")


class ObfuscationOption(StrictModel):
    """``stream_options`` as the Responses API has it: ``include_obfuscation`` typed as the SDK has it (this server pads
    no deltas: the side channel it hides is api.openai.com's), so a value of another type is a 400 naming it."""

    include_obfuscation: bool | None = None


class StreamOptions(ObfuscationOption):
    """``stream_options`` of chat and completions (vLLM's ``continuous_usage_stats``: usage so far on every chunk)."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class PromptCacheOptions(StrictModel):
    """``prompt_cache_options`` (chat and Responses): a hint to api.openai.com's prompt cache, typed as the SDK has it."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class WireFunctionCall(StrictModel):
    """The function an assistant's past tool call named."""

    name: str
    arguments: Union[str, dict[str, Any]]  # a JSON string on the wire; an object (Ollama's clients send one) as it is


class WireToolCall(StrictModel):
    """One tool call of an assistant message in the history."""

    id: str
    type: Literal["function"] = "function"
    function: WireFunctionCall


class WireMessage(StrictModel):
    """One chat message as sent on the wire."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: legacy_functions.py
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[WireToolCall] | None = None
    tool_call_id: str | None = None
    function_call: WireFunctionCall | None = None  # an assistant's legacy call

    def turn(self) -> Turn:
        """What the tool-exchange check needs of this message."""
        return Turn(self.role, tuple(c.id for c in self.tool_calls or ()), self.tool_call_id)


class _SamplingFields(StrictModel):
    """Parameters shared by chat completions and legacy completions."""

    model: str = Field(min_length=1)
    keep_alive: float | str | None = None  # Ollama's: seconds or "5m"; 0 = unload after, negative = forever
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0: the most likely token only (greedy), as OpenAI takes it
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # 0, -1 (vLLM's) or at/over the vocabulary = off; int32 cap
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = None  # vLLM's; stop_reason names the one
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None

    def sampling_params(self) -> SamplingParams:
        """The core sampling parameters (OpenAI defaults for what is unset)."""
        # top_p 0 keeps only the most likely token: greedy decoding, which every backend does exactly
        greedy = self.top_p == 0
        return SamplingParams(
            temperature=0.0 if greedy else 1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None or greedy else self.top_p,
            top_k=max(self.top_k or 0, 0),  # vLLM's -1 is off, as 0 is
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=parse_logit_bias(self.logit_bias),
            seed=self.seed,
        )

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple; empty strings dropped (they would stop immediately)."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        """True when a final usage chunk was asked for."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise InvalidRequest(f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, but got an "
                                 f"array with length {len(self.stop)} instead.", param="stop", code="array_above_max_length")
        if (longest := max(map(len, self.stop_strings()), default=0)) > MAX_STOP_CHARS:  # (OpenAI's wording)
            raise InvalidRequest(f"Invalid 'stop': string too long. Expected a string with maximum length {MAX_STOP_CHARS}, but "
                                 f"got a string with length {longest} instead.", param="stop", code="string_above_max_length")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
        parse_logit_bias(self.logit_bias)


#: fields that would change the output if honoured, rejected rather than silently ignored, with their JSON types in the
#: SDK (moderated completions: a "block" policy would be silently unenforced)
_CHAT_UNSUPPORTED = {"audio": ("an object",), "prediction": ("an object",), "web_search_options": ("an object",),
                     "moderation": ("an object",)}  # functions: legacy_functions.py; reasoning_effort: template_kwargs.py
#: OpenAI's default verbosity: asking for it changes nothing, so it is accepted; any other level is a 400
DEFAULT_VERBOSITY = "medium"


def check_verbosity(value: Any, param: str) -> None:
    """A 400 for a ``verbosity`` other than OpenAI's default (it would change the output; none is implemented)."""
    if value not in (None, DEFAULT_VERBOSITY):
        raise Unsupported(f"'{param}' is not supported by this server yet (only {DEFAULT_VERBOSITY!r}, the default)",
                          param=param)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[WireMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    tools: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    store: bool | None = None  # keep the completion for retrieve/list (openai/chat_store.py)
    metadata: dict[str, str] | None = None
    service_tier: ServiceTier | None = None  # a value OpenAI does not know was accepted and ignored
    # hints to api.openai.com's prompt cache and abuse checks (as on /v1/responses): typed, nothing here to change
    prompt_cache_key: str | None = None
    prompt_cache_retention: PromptCacheRetention | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = None

    def check(self) -> None:
        """Cross-field checks and explicit rejection of parameters we cannot honour yet."""
        self._check_common()
        check_metadata(self.metadata)
        extra = self.model_extra or {}
        for name, kinds in _CHAT_UNSUPPORTED.items():
            value = extra.get(name)
            check_json_type(value, kinds, name)  # an empty value of another type was taken as asking for nothing
            # an empty list or object asks for nothing, except web_search_options: {} is search with its defaults
            if value is not None and (value not in ([], {}) or name == "web_search_options"):
                raise Unsupported(f"'{name}' is not supported by this server yet", param=name)
        check_verbosity(extra.get("verbosity"), "verbosity")
        self.constraint()  # a malformed response_format (or vLLM guided field) is a 400 at parse time
        request_tool_config(self.tools, self.tool_choice, self.parallel_tool_calls, extra)  # 400 on malformed tools
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            raise Unsupported("Only the 'text' modality is supported", param="modalities")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        check_history(self.messages)

    def constraint(self) -> Requested:
        """The decoding constraint ``response_format`` or vLLM's fields ask for (guided.py), and the field it is from."""
        return requested_constraint(self.response_format, self.model_extra)

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the new name) or ``max_tokens``; None means fill the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """Which of the two names the client used, for error ``param``."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def core_messages(self) -> list[ChatMessage]:
        """Messages flattened to core ``ChatMessage`` (text parts joined; other parts rejected)."""
        return core_messages(self.messages)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body (legacy text completions)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool | None = None  # the prompt before each choice's text (and its tokens scored, with logprobs)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None  # text after the insertion point (fill-in-the-middle): not supported
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing

    def check(self) -> None:
        """Cross-field checks and rejection of parameters we cannot honour yet."""
        self._check_common()
        if self.suffix:  # "" or null asks for nothing: served
            raise Unsupported("'suffix' is not supported by this server", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("Invalid 'max_tokens': integer below minimum value. Expected a value >= 1 (0 only "
                                 "with 'echo', which returns the prompt alone), but got 0 instead.",
                                 param="max_tokens", code="integer_below_min_value")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise InvalidRequest("'best_of' must be at least 'n'", param="best_of")
        if self.stream and self.candidates > (self.n or 1):
            # OpenAI's rule too: the best are known only once every candidate is complete
            raise InvalidRequest("'best_of' greater than 'n' cannot be streamed", param="best_of")
        if not self.prompts():
            raise InvalidRequest("'prompt' must not be empty", param="prompt")

    @property
    def candidates(self) -> int:
        """Completions generated per prompt: ``best_of``, of which the ``n`` best are returned."""
        return max(self.best_of or 1, self.n or 1)

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class AdminRequest(StrictModel):
    """Base of admin route bodies: an unknown field is a 400 ``unknown_parameter`` naming it, not ignored."""

    model_config = ConfigDict(extra="forbid")
    #: fields of another admin route, and which: what the 400 for one sent here says
    elsewhere: ClassVar[dict[str, str]] = {}


class LoadRequest(AdminRequest):
    """Body of ``POST /admin/models/load``."""

    elsewhere = {"removed": "POST /admin/models/unload"}
    model: str = Field(min_length=1)
    keep_alive: float | str | None = None  # how long it stays loaded once idle


class UnloadRequest(AdminRequest):
    """Body of ``POST /admin/models/unload``."""

    # (Ollama unloads with keep_alive 0 on a generate call: an unload's "keep_alive": -1, "keep it", was ignored)
    elsewhere = {"keep_alive": "POST /admin/models/load"}
    model: str = Field(min_length=1)
    removed: bool = False  # the caller removes it from this store (xllm rm): cut requests get a 404
    wait_for_load: bool = False  # xllm stop: a load under way ends, then it unloads (else the load re-reads its files)


# --------------------------------------------------------------------------- parsing
#: OpenAI's cap on ``logit_bias`` entries (api.openai.com answers 400 past it); it also bounds the per-job bias tensors
MAX_LOGIT_BIAS = 1024
_TOKEN_KEY = re.compile(r"[0-9]+")
#: digits past which a key is no token id of any vocabulary (and int() of thousands of digits is refused or slow)
_MAX_KEY_DIGITS = 18


def parse_logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """``logit_bias`` with token-id keys as ints: at most 1024 entries, keys plain decimal ids, values in [-100, 100]."""
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"Invalid 'logit_bias': too many properties. Expected an object with at most {MAX_LOGIT_BIAS} "
                             f"properties, but got an object with {len(bias)} properties instead.",
                             param="logit_bias", code="object_above_max_properties")
    out: dict[int, float] = {}
    for key, value in bias.items():
        # only ASCII digits: int() also takes " 5", "+5", "5_0" and other scripts' digits, which are no token ids
        if not _TOKEN_KEY.fullmatch(key):
            raise InvalidRequest(f"Invalid key in 'logit_bias': {shown(key)}. You should only be submitting non-negative "
                                 "integers.", param="logit_bias")
        if len(key) > _MAX_KEY_DIGITS:
            raise InvalidRequest(f"Invalid key in 'logit_bias': {shown(key)} is larger than any token id.", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise InvalidRequest(f"logit_bias value for token {key} must be between -100 and 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


#: names pydantic puts into an error location for union members; never field names here
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic's error location as OpenAI writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def _validation_error(exc: ValidationError, cls: type[StrictModel]) -> InvalidRequest:
    """Turn pydantic's first error into an OpenAI-style InvalidRequest."""
    errors = exc.errors(include_url=False)
    unknown = next((e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1), None)
    if unknown is not None:  # only admin bodies forbid them: said before anything else about the body
        key = str(unknown["loc"][0])
        return UnknownParameter(key, tuple(cls.model_fields), getattr(cls, "elsewhere", {}).get(key))
    # of a union's failed branches, the one that got furthest into the value says what is wrong (a list whose
    # item is not an object, rather than "should be a valid string"); the first when none got further
    err = max(errors, key=lambda e: sum(isinstance(part, int) for part in e.get("loc", ())))
    if err["type"] == "json_invalid":  # what json.loads lets through: a lone surrogate escape, nesting past 200
        where = (err.get("ctx") or {}).get("error")
        return InvalidRequest("We could not parse the JSON body of your request" + (f": {where}" if where else "")
                              + ". The body must be valid JSON.", code="invalid_json")
    loc = tuple(err.get("loc", ()))
    param = _loc_to_param(loc)
    if err["type"] in ("model_type", "model_attributes_type") and not loc:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    wording = openai_wording(err, param, [e for e in errors if _loc_to_param(tuple(e.get("loc", ()))) == param])
    if wording is not None:
        return InvalidRequest(wording[0], param=param, code=wording[1])
    return InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param)


def parse_request(cls: type[StrictModel], body: bytes | str) -> Any:
    """Validate ``body`` as ``cls``; every failure is an InvalidRequest naming its param."""
    if not body or not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    # UTF-8, well-formed, no key twice: what pydantic lets through and other readers would see. Its tree is not
    # reused: pydantic's JSON mode reads the body again (~10-30% of model_validate_json) because its Python mode
    # words errors differently ("a valid list", "instance of WireMessage") and lets lone surrogates through
    _, non_finite = strict_parse(body)
    body = without_bom(body)
    try:
        req = cls.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc, cls) from None
    check_finite(req, non_finite)
    check = getattr(req, "check", None)
    if check is not None:
        check()
    return req


# ------------------------------------------------------------------------ responses
def usage_dict(usage: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    """OpenAI ``usage`` object (of the completion details api.openai.com always sends, only reasoning ones count)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def model_object(info: Any) -> dict[str, Any]:
    """One ``/v1/models`` entry from a core ``ModelInfo`` (plus our ``xllm`` extras)."""
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "xllm": {
            "loaded": info.loaded,
            "backend": info.backend,
            "context_length": info.context_length,
            "digest": info.digest,
            "details": info.wire_details(),
            # the sampling a request that leaves it unset gets (generation_config.json, a Modelfile's PARAMETERs),
            # under the request's names: a chat UI starts its sliders there; absent where not known
            **({"defaults": ModelDefaults(info.defaults).request_fields()} if info.defaults is not None else {}),
        },
    }
