"""Hub identities: a service's token and a user's token never share a user key (quotas, stored responses)."""

from __future__ import annotations

import pytest

pytest.importorskip("jupyterhub")

from xllm_jupyter.core.config import XllmConfig  # noqa: E402
from xllm_jupyter.hub.app import caller_from_model  # noqa: E402


def test_no_hub_user_name_is_a_services_identity():
    config = XllmConfig()
    service = caller_from_model({"kind": "service", "name": "grader"}, config)
    # JupyterHub accepts ':' in user names (never '/'), so "service:grader" can be a real user
    impostor = caller_from_model({"kind": "user", "name": "service:grader", "groups": []}, config)
    assert service.user == "service/grader" and impostor.user == "service:grader"
    assert service.user != impostor.user and not service.admin and not impostor.admin
