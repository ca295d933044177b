"""`xllm hub-service` is the same program as `python -m xllm_jupyter.hub`.

One test runs the installed ``xllm`` entry point; the rest run in this process (click's
CliRunner, and ``runpy`` for ``python -m``), which checks the same output without a cold
Python start per check.
"""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.test_cli import XLLM
from xllm_jupyter.cli.main import main


def _help_body(text: str) -> str:
    """The help text without its usage line (the program names differ)."""
    return text.split("\n", 1)[1]


def _run_module(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """``python -m xllm_jupyter.hub ARGV`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["python -m xllm_jupyter.hub", *argv])
    monkeypatch.delitem(sys.modules, "xllm_jupyter.hub.__main__", raising=False)  # as in a fresh `python -m`
    with pytest.raises(SystemExit) as info:
        runpy.run_module("xllm_jupyter.hub", run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_hub_service_help_is_the_services_help(capsys, monkeypatch):
    result = CliRunner().invoke(main, ["hub-service", "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: xllm hub-service")
    assert "JUPYTERHUB_SERVICE_URL" in result.output
    status, out, _ = _run_module(capsys, monkeypatch, "--help")
    assert status == 0 and out.startswith("usage: python -m xllm_jupyter.hub")
    assert _help_body(out) == _help_body(result.output)


def test_hub_service_is_listed_and_takes_short_help():
    listed = CliRunner().invoke(main, ["--help"], catch_exceptions=False)
    assert "  hub-service " in listed.output
    short = CliRunner().invoke(main, ["hub-service", "-h"], catch_exceptions=False)
    assert short.exit_code == 0 and short.output.startswith("usage: xllm hub-service")


def test_the_entry_point_rejects_unknown_arguments_without_a_traceback():
    out = subprocess.run([str(XLLM), "hub-service", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --port 1" in out.stderr
    assert "Traceback" not in out.stderr
