"""`xllm hub-service` is the same program as `python -m xllm_jupyter.hub`."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from tests.test_cli import XLLM
from xllm_jupyter.cli.main import main


def _help_body(text: str) -> str:
    """The help text without its usage line (the program names differ)."""
    return text.split("\n", 1)[1]


def test_hub_service_help_is_the_services_help():
    result = CliRunner().invoke(main, ["hub-service", "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: xllm hub-service")
    assert "JUPYTERHUB_SERVICE_URL" in result.output
    module = subprocess.run([sys.executable, "-m", "xllm_jupyter.hub", "--help"], capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m xllm_jupyter.hub")
    assert _help_body(module.stdout) == _help_body(result.output)


def test_hub_service_is_listed_and_rejects_unknown_arguments_through_the_entry_point():
    listed = CliRunner().invoke(main, ["--help"], catch_exceptions=False)
    assert "  hub-service " in listed.output
    out = subprocess.run([str(XLLM), "hub-service", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --port 1" in out.stderr
    assert "Traceback" not in out.stderr
    short = subprocess.run([str(XLLM), "hub-service", "-h"], capture_output=True, text=True, timeout=60)
    assert short.returncode == 0 and short.stdout.startswith("usage: xllm hub-service")
