"""The hub service does not apply ``xllm serve``'s API-key settings: one set anyway is named in a warning at start.

configuration.md listed ``auth.requests_per_minute``, ``auth.tokens_per_minute``, ``auth.max_concurrent_per_key`` and
``auth.admin_keys`` under "(``xllm serve``, the hub service)", but the service never applied them: a hub admin who
set a per-minute limit believed users were held to it while nothing was, and nothing said so.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("jupyterhub")

from xllm_jupyter.core.config import load_config  # noqa: E402
from xllm_jupyter.engine.engine import Engine  # noqa: E402
from xllm_jupyter.hub.app import make_hub_app, make_hub_auth  # noqa: E402

ENV = {"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api"}


def _warnings(tmp_path, caplog, auth: dict) -> list[str]:
    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"},
                                            "auth": auth})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.hub"):
        make_hub_app(config, Engine(config.engine), make_hub_auth(ENV))
    return [r.getMessage() for r in caplog.records if r.name == "xllm_jupyter.hub" and r.levelno >= logging.WARNING]


def test_api_key_limits_set_on_the_hub_service_are_named_as_ignored(tmp_path, caplog):
    found = _warnings(tmp_path, caplog, {"requests_per_minute": 60, "tokens_per_minute": 1000,
                                         "max_concurrent_per_key": 2, "admin_keys": ["sk-admin"]})
    assert len(found) == 1, found
    for key in ("auth.requests_per_minute", "auth.tokens_per_minute", "auth.max_concurrent_per_key", "auth.admin_keys"):
        assert key in found[0]
    assert "quotas." in found[0] and "hub.admin_users" in found[0]  # what to use instead
    assert "sk-admin" not in found[0]  # the key itself is never logged


def test_the_settings_the_hub_service_applies_raise_no_warning(tmp_path, caplog):
    assert _warnings(tmp_path, caplog, {"failed_auth_limit": 5, "trusted_proxies": ["10.0.0.1"]}) == []
