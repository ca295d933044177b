"""A config file named by XLLM_CONFIG (or a path) that does not exist is said so, once; the default path is not."""

from __future__ import annotations

import logging

from xllm_jupyter.core.config import load_config


def test_a_named_config_file_that_does_not_exist_is_a_warning_once(tmp_path, caplog):
    """Before: /etc/xllm/config.yaml (docs/jupyterhub.md) never written, or misspelt, left quotas off silently."""
    caplog.set_level(logging.WARNING, logger="xllm_jupyter")
    missing = tmp_path / "etc" / "config.yml"
    env = {"XLLM_CONFIG": str(missing), "XLLM_HOME": str(tmp_path / "home")}
    config = load_config(env=env)
    assert config.quotas.tokens_per_day == 0  # the defaults, as before
    load_config(env=env)
    said = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert said == [f"config file {missing} does not exist: the defaults and XLLM_* variables apply"]
    caplog.clear()
    load_config(env={"XLLM_HOME": str(tmp_path / "home")})  # <XLLM_HOME>/config.yaml is optional: no word
    (tmp_path / "named.yaml").write_text("quotas:\n  tokens_per_day: 5\n")
    assert load_config(tmp_path / "named.yaml", env={}).quotas.tokens_per_day == 5
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]
