"""core/config.py: defaults < config.yaml < XLLM_* env < overrides, frozen, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from xllm_jupyter.core.config import (
    EngineConfig,
    ServerConfig,
    StoreConfig,
    XllmConfig,
    config_path,
    default_home,
    load_config,
)
from xllm_jupyter.core.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file_or_env(tmp_path):
    cfg = load_config(path=tmp_path / "missing.yaml", env={"HOME": str(tmp_path)})
    assert cfg.server == ServerConfig()
    assert cfg.engine == EngineConfig()
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8900
    assert cfg.engine.default_model == "smollm2"
    assert isinstance(cfg.store, StoreConfig)


def test_default_home_follows_xdg_then_xllm_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_home({}) == Path.home() / ".local" / "share" / "xllm"
    assert default_home({"XDG_DATA_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "xllm"
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "XLLM_HOME": str(tmp_path / "h")}
    assert default_home(env) == tmp_path / "h"
    assert load_config(path=tmp_path / "none.yaml", env=env).store.home == tmp_path / "h"


def test_yaml_then_env_then_overrides(tmp_path):
    cfg_file = write(
        tmp_path / "config.yaml",
        "server:\n  port: 9001\n  host: 0.0.0.0\n  api_keys: [k1, k2]\n"
        "engine:\n  max_batch_size: 4\n  preload: [smollm2]\n  default_model: tiny\n",
    )
    cfg = load_config(path=cfg_file, env={})
    assert cfg.server.port == 9001 and cfg.server.host == "0.0.0.0"
    assert cfg.server.api_keys == ("k1", "k2")
    assert cfg.engine.max_batch_size == 4 and cfg.engine.preload == ("smollm2",)

    env = {"XLLM_SERVER_PORT": "9002", "XLLM_ENGINE_MAX_BATCH_SIZE": "8"}
    cfg = load_config(path=cfg_file, env=env)
    assert cfg.server.port == 9002  # env beats yaml
    assert cfg.engine.max_batch_size == 8
    assert cfg.server.host == "0.0.0.0"  # untouched keys keep the yaml value

    cfg = load_config(path=cfg_file, env=env, overrides={"server": {"port": 9003, "host": None}})
    assert cfg.server.port == 9003  # overrides beat env
    assert cfg.server.host == "0.0.0.0"  # None means "not given", not "set to None"


def test_every_key_settable_from_env(tmp_path):
    env = {
        "XLLM_SERVER_HOST": "::1",
        "XLLM_SERVER_API_KEYS": "a, b ,,c",
        "XLLM_SERVER_MAX_BODY_BYTES": "1024",
        "XLLM_SERVER_KEEPALIVE_SECONDS": "2.5",
        "XLLM_ENGINE_DEVICE": "cpu",
        "XLLM_ENGINE_PRELOAD": "smollm2,tiny",
        "XLLM_ENGINE_TORCH_THREADS": "2",
        "XLLM_STORE_HOME": str(tmp_path / "store"),
    }
    cfg = load_config(path=tmp_path / "none.yaml", env=env)
    assert cfg.server.host == "::1"
    assert cfg.server.api_keys == ("a", "b", "c")
    assert cfg.server.max_body_bytes == 1024
    assert cfg.server.keepalive_seconds == 2.5
    assert cfg.engine.device == "cpu"
    assert cfg.engine.preload == ("smollm2", "tiny")
    assert cfg.engine.torch_threads == 2
    assert cfg.store.home == tmp_path / "store"


def test_short_aliases(tmp_path):
    env = {"XLLM_HOME": str(tmp_path / "home"), "XLLM_API_KEYS": "x,y", "XLLM_MODEL": "tiny"}
    cfg = load_config(path=tmp_path / "none.yaml", env=env)
    assert cfg.store.home == tmp_path / "home"
    assert cfg.server.api_keys == ("x", "y")
    assert cfg.engine.default_model == "tiny"
    # XLLM_API_KEY is the clients' key (exported to kernels), never the server's key list
    cfg = load_config(path=tmp_path / "none.yaml", env={"XLLM_API_KEY": "solo"})
    assert cfg.server.api_keys == ()
    # the full name beats the alias
    env = {"XLLM_HOME": str(tmp_path / "a"), "XLLM_STORE_HOME": str(tmp_path / "b")}
    assert load_config(path=tmp_path / "none.yaml", env=env).store.home == tmp_path / "b"


@pytest.mark.parametrize(
    "yaml_text,key",
    [
        ("server:\n  port: 70000\n", "server.port"),
        ("server:\n  port: 8900.7\n", "server.port"),
        ("server:\n  max_n: -3\n", "server.max_n"),
        ("engine:\n  max_batch_size: 0\n", "engine.max_batch_size"),
        ("server:\n  keepalive_seconds: 0\n", "server.keepalive_seconds"),
        ("server:\n  connection_timeout_seconds: 0\n", "server.connection_timeout_seconds"),
        ("engine:\n  cache_tokens: -1\n", "engine.cache_tokens"),
        ("engine:\n  num_draft_tokens: 0\n", "engine.num_draft_tokens"),
        ("engine:\n  ngram_draft: -2\n", "engine.ngram_draft"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, yaml_text, key):
    path = write(tmp_path / "c.yaml", yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path=path, env={})


def test_config_path_from_xllm_config_and_home(tmp_path):
    custom = write(tmp_path / "custom.yaml", "server:\n  port: 7777\n")
    env = {"XLLM_CONFIG": str(custom)}
    assert config_path(env) == custom
    assert load_config(env=env).server.port == 7777
    home = tmp_path / "home"
    home.mkdir()
    write(home / "config.yaml", "engine:\n  max_queue: 3\n")
    env = {"XLLM_HOME": str(home)}
    assert config_path(env) == home / "config.yaml"
    assert load_config(env=env).engine.max_queue == 3


def test_yaml_home_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg_file = write(tmp_path / "c.yaml", "store:\n  home: ~/models\n")
    assert load_config(path=cfg_file, env={}).store.home == tmp_path / "models"


def test_config_is_frozen(tmp_path):
    cfg = load_config(path=tmp_path / "none.yaml", env={})
    assert isinstance(cfg, XllmConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "env, key",
    [
        ({"XLLM_SERVER_PORT": "eighty"}, "server.port"),
        ({"XLLM_ENGINE_MAX_BATCH_SIZE": "1.5"}, "engine.max_batch_size"),
        ({"XLLM_SERVER_KEEPALIVE_SECONDS": "soon"}, "server.keepalive_seconds"),
    ],
)
def test_bad_env_value_names_the_key(tmp_path, env, key):
    with pytest.raises(ConfigError) as info:
        load_config(path=tmp_path / "none.yaml", env=env)
    assert key in info.value.message


def test_bad_yaml_value_names_the_key(tmp_path):
    cfg_file = write(tmp_path / "c.yaml", "server:\n  port: [1, 2]\n")
    with pytest.raises(ConfigError, match="server.port"):
        load_config(path=cfg_file, env={})
    cfg_file = write(tmp_path / "c.yaml", "server:\n  port: true\n")
    with pytest.raises(ConfigError, match="server.port"):
        load_config(path=cfg_file, env={})


def test_unknown_key_and_section_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="server.prot"):
        load_config(path=write(tmp_path / "a.yaml", "server:\n  prot: 1\n"), env={})
    with pytest.raises(ConfigError, match="servre"):
        load_config(path=write(tmp_path / "b.yaml", "servre:\n  port: 1\n"), env={})
    with pytest.raises(ConfigError, match="section 'engine'"):
        load_config(path=write(tmp_path / "c.yaml", "engine: 3\n"), env={})
    with pytest.raises(ConfigError, match="web"):
        load_config(path=tmp_path / "none.yaml", env={}, overrides={"web": {"port": 1}})
    with pytest.raises(ConfigError, match="server.nope"):
        load_config(path=tmp_path / "none.yaml", env={}, overrides={"server": {"nope": 1}})


def test_malformed_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=write(tmp_path / "c.yaml", "server: [unclosed\n"), env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path=write(tmp_path / "d.yaml", "- a\n- b\n"), env={})


def test_malformed_yaml_names_the_file_and_the_place(tmp_path):
    """`XLLM_CONFIG=bad2.yaml xllm list` said "config.yaml is not valid YAML: ParserError": another file's name,
    and no line to look at."""
    path = write(tmp_path / "bad2.yaml", "server:\n  port: 8900\nengine: [smollm2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path=path, env={})
    message = str(info.value)
    assert message.startswith(f"{path} is not valid YAML at line 4, column 1: "), message
    assert "ParserError" not in message and "expected ',' or ']'" in message, message
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'd.yaml'))} must be a mapping"):
        load_config(path=write(tmp_path / "d.yaml", "- a\n- b\n"), env={})


def test_a_config_file_that_is_not_utf8_or_unreadable_is_a_config_error(tmp_path, monkeypatch):
    """A config.yaml saved in Latin-1 (or one the user may not read) raised UnicodeDecodeError: `xllm list` printed a
    traceback instead of its one-line error."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("server:\n  host: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} is not UTF-8 text \\(byte 19\\)"):
        load_config(path=path, env={})

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} cannot be read: Permission denied$"):
        load_config(path=path, env={})


def test_empty_yaml_is_defaults(tmp_path):
    cfg = load_config(path=write(tmp_path / "c.yaml", ""), env={})
    assert cfg.server == ServerConfig()
    cfg = load_config(path=write(tmp_path / "d.yaml", "server:\n"), env={})
    assert cfg.server == ServerConfig()


def test_config_error_is_an_xllm_error_without_paths(tmp_path):
    from xllm_jupyter.core.errors import XllmError

    secret_dir = tmp_path / "very-secret-dir"
    secret_dir.mkdir()
    with pytest.raises(XllmError) as info:
        load_config(path=write(secret_dir / "c.yaml", "server: {port: [x]}\n"), env={})
    assert "very-secret-dir" not in info.value.message


def test_the_example_config_copied_verbatim_changes_nothing(tmp_path):
    """docs/config.example.yaml ("copy it and keep what you change") holds every default, the store's home
    included: it named ~/.local/share/xllm, which moved the store of a user with XDG_DATA_HOME set."""
    example = Path(__file__).resolve().parents[1] / "docs" / "config.example.yaml"
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    assert load_config(path=example, env=env) == load_config(path=tmp_path / "none.yaml", env=env)


@pytest.mark.parametrize(
    "key, bad, good",
    [
        ("device", "gpu", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0"]),
        ("dtype", "f16", ["auto", "float16", "fp16", "bfloat16", "float32"]),
        ("compile", "sometimes", ["auto", "on", "off", "True"]),
        ("kv_cache_bits", "q5", ["fp16", "q8", "q4", "4,6"]),
    ],
)
def test_engine_words_are_checked_at_start(tmp_path, key, bad, good):
    """A misspelt device/dtype/compile/kv_cache_bits stops start-up naming the key; it was accepted and the
    server came up without its default model (a warning in the log, every request then failing)."""
    with pytest.raises(ConfigError, match=rf"engine\.{key}"):
        load_config(path=tmp_path / "none.yaml", env={f"XLLM_ENGINE_{key.upper()}": bad})
    with pytest.raises(ConfigError, match=rf"engine\.{key}"):
        load_config(path=write(tmp_path / "c.yaml", f"engine:\n  {key}: {bad}\n"), env={})
    for value in good:
        assert getattr(load_config(path=tmp_path / "none.yaml", env={f"XLLM_ENGINE_{key.upper()}": value}).engine, key) == value
    assert load_config(path=write(tmp_path / "c.yaml", "engine:\n  compile: on\n"), env={}).engine.compile == "True"


def test_a_misspelt_env_variable_is_named_in_a_warning(tmp_path, caplog):
    """XLLM_ENGINE_MAX_BATCHSIZE was ignored without a word; now a warning names it and the key meant."""
    with caplog.at_level("WARNING", logger="xllm_jupyter.core.config"):
        # (a config file that is there: a missing one named by path is a warning of its own)
        cfg = load_config(path=write(tmp_path / "empty.yaml", ""),
                          env={"XLLM_ENGINE_MAX_BATCHSIZE": "4", "XLLM_HUB_SERVICE": "xllm", "XLLM_BASE_URL": "http://h/v1"})
    assert cfg.engine.max_batch_size == 16
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages  # XLLM_HUB_SERVICE and XLLM_BASE_URL are client settings, not typos
    assert "XLLM_ENGINE_MAX_BATCHSIZE" in messages[0] and "XLLM_ENGINE_MAX_BATCH_SIZE" in messages[0]
