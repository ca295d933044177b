"""Value checks for config keys: the words a string key accepts, engine settings' forms, numeric bounds."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

# Keys whose string value must be one of a few words.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("http", "log_format"): ("text", "json"),
    ("http", "log_level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
    ("http", "log_rotate"): ("size", "daily"),
}

# Engine settings the backends read at load time, checked here too, so a typo stops start-up with the key's
# name instead of leaving a server up without its model (the backends accept exactly these).
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
_DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
_COMPILE = ("auto", "on", "off", "true", "false")  # YAML reads unquoted on/off as booleans: "True"/"False"
_KV_BITS = ("fp16", "16", "q8", "q6", "q4")


def engine_value_error(key: str, value: str) -> str | None:
    """Why ``value`` is not a valid ``engine.<key>``, or None when it is (or the key is not checked here)."""
    word = str(value).strip().lower()
    if key == "device" and not _DEVICE.fullmatch(word):
        return "must be auto, cpu, cuda or cuda:N"
    if key == "dtype" and word not in _DTYPES:
        return "must be one of auto, float16, bfloat16, float32"
    if key == "compile" and word not in _COMPILE:
        return "must be one of auto, on, off"
    if key == "kv_cache_bits" and word not in _KV_BITS:
        bits = word.split(",")
        if len(bits) != 2 or not all(b.strip().isdigit() and 2 <= int(b) <= 8 for b in bits):
            return "must be one of fp16, q8, q6, q4, or 'K,V' bits between 2 and 8 (e.g. '4,6')"
    return None


# Inclusive (low, high) bounds; None = unbounded on that side.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("server", "port"): (0, 65535),
    ("server", "max_body_bytes"): (1, None),
    ("server", "max_tokens_limit"): (1, None),
    ("server", "max_n"): (1, 128),
    ("server", "keepalive_seconds"): (0.1, None),
    ("server", "connection_timeout_seconds"): (0.1, None),  # 0 would close every connection at once
    ("server", "max_connections_per_client"): (-1, None),  # -1: the default, scaled to the total cap
    ("server", "max_connections"): (0, None),
    ("server", "max_logprob_entries"): (0, None),
    ("engine", "max_batch_size"): (1, 1024),
    ("engine", "max_queue"): (1, None),
    ("engine", "torch_threads"): (0, 1024),
    ("engine", "default_max_tokens"): (1, None),
    ("engine", "memory_budget_bytes"): (0, None),
    ("engine", "gpu_memory_budget_bytes"): (0, None),
    ("engine", "idle_grace_seconds"): (0, None),
    ("engine", "load_wait_seconds"): (0, None),
    ("engine", "stream_interval_ms"): (0, 1000),
    ("engine", "cache_tokens"): (0, None),
    ("engine", "num_draft_tokens"): (1, 64),
    ("engine", "ngram_draft"): (0, None),
    ("http", "log_max_bytes"): (1, None),
    ("http", "log_backups"): (0, 1000),
    ("cache", "max_entries"): (1, None),
    ("cache", "ttl_seconds"): (0.001, None),
    ("auth", "requests_per_minute"): (0, None),
    ("auth", "tokens_per_minute"): (0, None),
    ("auth", "max_concurrent_per_key"): (0, None),
    ("auth", "failed_auth_limit"): (0, None),
    ("auth", "failed_auth_window_seconds"): (0.001, None),
    ("auth", "failed_auth_max_clients"): (1, None),
    ("quotas", "max_concurrent"): (0, None),
    ("quotas", "tokens_per_day"): (0, None),
    ("quotas", "metrics_max_users"): (1, 100000),
    ("quotas", "reserved_slots"): (0, 1024),
    ("quotas", "active_window_seconds"): (0.001, None),
    ("hub", "api_timeout_seconds"): (0.1, 300),  # HubAuth's own client gives up at 300 s
}


def in_range(section: str, key: str, value: float) -> float:
    """``value`` if it is inside the key's bounds, else a ConfigError naming the key."""
    low, high = _RANGES.get((section, key), (None, None))
    if not math.isfinite(value):  # YAML's .inf/.nan, "inf" from the environment: NaN passed every bound check,
        # and an infinite failed-auth window made each capped request a 500 (math.ceil of its Retry-After)
        raise ConfigError(f"Invalid value for config key '{section}.{key}': must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"Invalid value for config key '{section}.{key}': must be {bounds}")
    return value
