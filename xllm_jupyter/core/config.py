"""Frozen configuration objects, resolved once from config.yaml and ``XLLM_*`` variables.

Precedence (highest first): explicit overrides passed by an edge (CLI flags,
traitlets), environment variables, config.yaml, an edge's own defaults (the hub
service's), the defaults below. Every key of
every section can be set from the environment as ``XLLM_<SECTION>_<KEY>`` (e.g.
``XLLM_SERVER_PORT=9000``); a few common ones have short aliases (``XLLM_HOME``,
``XLLM_API_KEYS``, ``XLLM_MODEL``) that the full names override. Values are
type- and range-checked; errors name the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config_values import CHOICES, engine_value_error, in_range
from .errors import ConfigError

log = logging.getLogger(__name__)


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """The store directory: ``XLLM_HOME``, else ``$XDG_DATA_HOME/xllm``, else ``~/.local/share/xllm``."""
    env = os.environ if env is None else env
    if env.get("XLLM_HOME"):
        return Path(env["XLLM_HOME"]).expanduser()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "xllm"


@dataclass(frozen=True)
class ServerConfig:
    """HTTP edge settings shared by the Jupyter extension and `xllm serve`."""

    host: str = "127.0.0.1"
    port: int = 8900
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 8192
    max_n: int = 16
    keepalive_seconds: float = 10.0
    # a connection whose request headers or body do not arrive within this, or that idles this long
    # between requests, is closed (xllm serve and the hub service; Jupyter has its own); and everywhere
    # a client that reads none of its pending answer or stream this long (server/stalls.py)
    connection_timeout_seconds: float = 60.0
    #: connections one client address may hold open (xllm serve, hub service; auth.trusted_proxies exempt); 0 = no cap;
    #: -1 = 256, or a quarter of max_connections where that is lower (else a low descriptor limit left it unreachable)
    max_connections_per_client: int = -1
    #: connections open at once in all; 0 = three quarters of the (raised) file descriptor limit
    max_connections: int = 0
    #: token logprobs one reply may carry, n x max_tokens x (top_logprobs + 1) (~90 bytes each); 0 = no cap
    max_logprob_entries: int = 1_000_000


@dataclass(frozen=True)
class EngineConfig:
    """How models are run: batch sizes, queue bound, device and threads."""

    default_model: str = "smollm2"
    preload: tuple[str, ...] = ()
    max_batch_size: int = 16
    max_queue: int = 256
    device: str = "auto"
    dtype: str = "auto"
    torch_threads: int = 0
    default_max_tokens: int = 512
    memory_budget_bytes: int = 0  # CPU RAM for loaded models; 0 = unlimited
    gpu_memory_budget_bytes: int = 0  # CUDA memory for loaded models; 0 = what the GPUs have free at each load
    keep_alive: str = "5m"  # how long an idle model stays loaded: seconds or "5m"/"1h"; negative = forever
    replicas: tuple[str, ...] = ()  # "name=count" entries (YAML may give a mapping)
    idle_grace_seconds: float = 1.0  # a model used this recently is never evicted (covers tokenize -> submit)
    # a load with no room while other models are in use waits this long for their requests to end
    # (they free the room) before its 503; 0 = refuse at once
    load_wait_seconds: float = 60.0
    # tokens made within this many ms stream out together, one merged delta per choice; first
    # tokens and finishes are never held; past 16 running sequences the interval grows in
    # proportion, up to 250 ms (0 = one delta per step; docs/performance.md)
    stream_interval_ms: float = 16.0
    # --- KV cache and decoding: exllamav3 / exllamav2 (cache_tokens and compile apply to transformers too) ---
    cache_tokens: int = 0  # KV cache tokens shared by all sequences, per backend (0 = auto; docs/configuration.md)
    kv_cache_bits: str = "fp16"  # KV cache storage: fp16, q8, q6, q4, or "K,V" bits for exllamav3 (e.g. "4,6")
    tensor_parallel: bool = False  # exllamav3: split every layer across the visible GPUs
    gpu_split: tuple[str, ...] = ()  # GB to use per GPU when auto-splitting layers, e.g. ["20", "24"]
    draft_model: str = ""  # speculative decoding: a small model from the store that drafts tokens
    num_draft_tokens: int = 4  # tokens drafted per step (draft model or n-gram)
    ngram_draft: int = 0  # n-gram drafting from the context: minimum match length (0 = off)
    # transformers backend: static-cache decode compiled with torch.compile (CUDA graphs): auto (CUDA +
    # fp16/bf16 safetensors), on (FP16 models then also prefer transformers over exllamav3), off (docs/gpu.md)
    compile: str = "auto"
    # freeze what survives a full collection after start-up and each model load (gc.freeze), so the collections
    # a big request body sets off skip the millions of objects torch and the models make (docs/performance.md)
    gc_freeze: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """Where models live on disk."""

    home: Path = field(default_factory=default_home)


@dataclass(frozen=True)
class AuthConfig:
    """Admin keys, per-key rate limits and fairness."""

    #: keys that may also call ``/admin/*`` (user keys stay in ``server.api_keys``)
    admin_keys: tuple[str, ...] = ()
    #: per-key request budget per minute (0 = unlimited)
    requests_per_minute: int = 0
    #: per-key token budget per minute, charged with actual usage (0 = unlimited)
    tokens_per_minute: int = 0
    #: per-key cap on requests in flight, so one key cannot fill the queue (0 = unlimited)
    max_concurrent_per_key: int = 0
    #: failed authentications one client address may make per window before its requests get 429 (0 = no cap)
    failed_auth_limit: int = 20
    #: the window of ``failed_auth_limit``, in seconds
    failed_auth_window_seconds: float = 60.0
    #: client addresses remembered at most (the longest quiet ones are forgotten first)
    failed_auth_max_clients: int = 10000
    #: proxies whose ``X-Forwarded-For`` names the client (addresses or networks, e.g. JupyterHub's proxy)
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuotaConfig:
    """Per-user quotas, usage accounting and isolation (the user: hub user, Jupyter user or API key id)."""

    #: requests one user may have in flight (queued or running); 0 = unlimited
    max_concurrent: int = 0
    #: tokens (prompt + completion) one user may use per UTC day; 0 = unlimited
    tokens_per_day: int = 0
    #: per-user overrides, "name=N" entries (YAML may give a mapping); 0 = unlimited
    user_max_concurrent: tuple[str, ...] = ()
    user_tokens_per_day: tuple[str, ...] = ()
    #: per-group limits for each member, "group=N"; a user in several groups gets the largest
    group_max_concurrent: tuple[str, ...] = ()
    group_tokens_per_day: tuple[str, ...] = ()
    #: let users reuse each other's cached prompt prefixes (faster, but timing can reveal prompts)
    share_prefix_cache: bool = False
    #: distinct user label values in Prometheus metrics; later users are counted as "other"
    metrics_max_users: int = 100
    #: batch slots kept free for other users while several are active (0 = no reserve)
    reserved_slots: int = 1
    #: seconds a user counts as active after queueing work (for the reserve)
    active_window_seconds: float = 60.0
    #: keep the reserve while one user is alone too, so a user who arrives later never waits for a
    #: generation of someone else's to end (costs a lone user ``reserved_slots`` of the batch)
    reserve_when_alone: bool = False
    #: usage kept across restarts: "auto" (<store.home>/usage.json with a daily token quota
    #: or on the hub service), "off" (or ""), or a JSON file path
    usage_file: str = "auto"


@dataclass(frozen=True)
class HubConfig:
    """The JupyterHub service (``python -m xllm_jupyter.hub``)."""

    #: hub users who may call ``/admin/*`` (usage, load/unload); hub admin rights are not needed
    admin_users: tuple[str, ...] = ()
    #: hub groups whose members may call ``/admin/*``
    admin_groups: tuple[str, ...] = ()
    #: seconds to wait for the hub API's answer about a token before a 503 ``hub_unavailable`` (HubAuth alone: 5 minutes)
    api_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class CacheConfig:
    """The exact-request response cache."""

    #: off by default: a repeated deterministic request is then always generated afresh
    enabled: bool = False
    max_entries: int = 256
    ttl_seconds: float = 600.0


@dataclass(frozen=True)
class HttpConfig:
    """CORS, compression, request ids and logging at the HTTP edge."""

    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    compress: bool = True
    log_format: str = "text"
    log_level: str = "INFO"
    log_file: str = ""
    log_rotate: str = "size"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5


@dataclass(frozen=True)
class XllmConfig:
    """The whole resolved configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    hub: HubConfig = field(default_factory=HubConfig)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "store": StoreConfig,
    "auth": AuthConfig,
    "cache": CacheConfig,
    "http": HttpConfig,
    "quotas": QuotaConfig,
    "hub": HubConfig,
}
# Short aliases; the full XLLM_<SECTION>_<KEY> name wins when both are set.
# XLLM_API_KEY is deliberately not an alias: it is the key *clients* send (the Jupyter
# extension exports it to kernels), so it must never turn on auth for `xllm serve`.
_ALIASES = {
    "XLLM_HOME": ("store", "home"),
    "XLLM_API_KEYS": ("server", "api_keys"),
    "XLLM_MODEL": ("engine", "default_model"),
}

def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/env value to the field's type, naming the key on failure."""
    name = f"{section}.{key}"
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return in_range(section, key, int(value))
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return in_range(section, key, float(value))
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
        if hint is Path:
            return Path(str(value)).expanduser()
        if origin is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, dict):  # a mapping (engine.replicas) is kept as "key=value" entries
                value = [f"{k}={v}" for k, v in value.items()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid value for config key '{name}': expected {getattr(hint, '__name__', hint)}") from None
    raise ConfigError(f"Unsupported type for config key '{name}'")


def _section_values(section: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"Unknown config key '{section}.{key}' (known: {', '.join(sorted(known))})")
        out[key] = _coerce(section, key, value, hints[key])
        choices = CHOICES.get((section, key))
        if choices and out[key] not in choices:
            raise ConfigError(f"Invalid value for config key '{section}.{key}': must be one of {', '.join(choices)}")
        problem = engine_value_error(key, out[key]) if section == "engine" else None
        if problem:
            raise ConfigError(f"Invalid value {str(out[key])[:40]!r} for config key 'engine.{key}': {problem}")
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read config.yaml; a missing file is an empty config, a malformed one an error."""
    import yaml

    if not path.is_file():
        return {}
    try:
        # UTF-8 as YAML is, whatever the locale; a file that is not (or cannot be read) is a one-line error too
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): is it a config.yaml?") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # the file and the place: "config.yaml is not valid YAML: ParserError" named neither (XLLM_CONFIG may be any file)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections (server, engine, store)")
    return data


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """Where config.yaml is read from: ``XLLM_CONFIG``, else ``<XLLM_HOME>/config.yaml``."""
    env = os.environ if env is None else env
    if env.get("XLLM_CONFIG"):
        return Path(env["XLLM_CONFIG"]).expanduser()
    return default_home(env) / "config.yaml"


#: XLLM_<SECTION>_* variables that are not config keys (client-side settings)
_NOT_KEYS = {"XLLM_HUB_SERVICE"}
_warned: set[str] = set()


def _warn_unknown_env(env: Mapping[str, str]) -> None:
    """Warn once about an ``XLLM_<SECTION>_<KEY>`` variable naming no key (a misspelling is otherwise silently ignored)."""
    for var in env:
        section = next((s for s in _SECTIONS if var.startswith(f"XLLM_{s.upper()}_")), None)
        if section is None or var in _NOT_KEYS or var in _warned:
            continue
        keys = [f"XLLM_{section.upper()}_{f.name.upper()}" for f in dataclasses.fields(_SECTIONS[section])]
        if var not in keys:
            _warned.add(var)
            close = difflib.get_close_matches(var, keys, n=1)
            log.warning("ignoring %s: no config key '%s.%s'%s", var, section, var[len(section) + 6:].lower(),
                        f" (did you mean {close[0]}?)" if close else "")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> XllmConfig:
    """Resolve defaults < an edge's ``defaults`` < config.yaml < XLLM_* env < overrides into a frozen XllmConfig."""
    env = os.environ if env is None else env
    where = path or config_path(env)
    if (path is not None or env.get("XLLM_CONFIG")) and not where.is_file() and str(where) not in _warned:
        # a named file that is not there (a typo, or the docs' /etc/xllm/config.yaml never written) would
        # otherwise leave quotas, admins and limits at their defaults without a word
        _warned.add(str(where))
        log.warning("config file %s does not exist: the defaults and XLLM_* variables apply", where)
    raw = read_yaml(where)
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"Unknown config section '{sorted(unknown)[0]}' (known: {', '.join(_SECTIONS)})")
    layered: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for section, values in (defaults or {}).items():  # what suits that edge (the hub service), unless set
        if section not in _SECTIONS:
            raise ConfigError(f"Unknown config section '{section}'")
        layered[section].update(_section_values(section, values))
    for section in _SECTIONS:
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping")
        layered[section].update(_section_values(section, body))
    for var, (section, key) in _ALIASES.items():
        if env.get(var):
            layered[section].update(_section_values(section, {key: env[var]}))
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            var = f"XLLM_{section.upper()}_{f.name.upper()}"
            if var in env:
                layered[section].update(_section_values(section, {f.name: env[var]}))
    _warn_unknown_env(env)
    for section, values in (overrides or {}).items():
        if section not in _SECTIONS:
            raise ConfigError(f"Unknown config section '{section}'")
        layered[section].update(_section_values(section, {k: v for k, v in values.items() if v is not None}))
    if "home" not in layered["store"]:
        layered["store"]["home"] = default_home(env)
    return XllmConfig(**{s: _SECTIONS[s](**layered[s]) for s in _SECTIONS})
