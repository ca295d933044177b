"""An XLLM_HOME that is a regular file is an error that says so, in the CLI and at a server's start.

It read as an empty store: ``xllm list`` said "No models yet", ``xllm serve`` started with no models and every
pull failed with a bare "Not a directory".
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from click.testing import CliRunner

from tests.server_fixtures import make_test_config
from xllm_jupyter.cli.main import main
from xllm_jupyter.core.errors import StoreError
from xllm_jupyter.hub.service import run_hub_service
from xllm_jupyter.server.standalone import run_server
from xllm_jupyter.store.store import ModelStore


@pytest.fixture
def home_file(tmp_path, monkeypatch):
    path = tmp_path / "xllm-home"
    path.write_text("not a store\n")
    monkeypatch.setenv("XLLM_HOME", str(path))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    return path


@pytest.mark.parametrize("command", [("list",), ("ls",), ("show", "smollm2")])
def test_the_cli_says_the_home_is_not_a_directory(home_file, command):
    result = CliRunner().invoke(main, list(command), catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "No models yet" not in result.output and "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert f"{home_file} is not a directory" in err and "XLLM_HOME" in err


def test_a_home_below_a_file_names_the_file(home_file):
    with pytest.raises(StoreError) as caught:
        ModelStore(home_file / "inner").check_home()
    assert f"({home_file} is a file)" in caught.value.message


def test_a_server_does_not_start_on_it(home_file):
    async def start(serve):
        # (the old code served with no models until stopped: the timeout only ends the test that fails)
        await asyncio.wait_for(serve, 60)

    with pytest.raises(StoreError, match="is not a directory"):
        asyncio.run(start(run_server(make_test_config(home_file))))
    with pytest.raises(StoreError, match="is not a directory"):  # nor the hub service
        asyncio.run(start(run_hub_service(make_test_config(home_file), env={})))


def test_the_in_process_engine_says_so(home_file):
    from xllm_jupyter.client.local import LocalChat

    with pytest.raises(StoreError, match="is not a directory"):
        LocalChat()


def test_a_home_not_made_yet_is_fine(tmp_path):
    assert ModelStore(tmp_path / "new" / "home").list() == []  # made on the first pull, as before


def test_the_jupyter_extension_logs_it_and_still_builds_its_engine(home_file, caplog):
    """Logged, not raised: a Jupyter server on a hub still serves its kernels through the hub's xllm service."""
    from xllm_jupyter.extension.app import XllmApp

    app = XllmApp(home=str(home_file))
    app.log.addHandler(caplog.handler)  # (an application's log does not propagate to the root logger)
    try:
        app.initialize_settings()
    finally:
        app.log.removeHandler(caplog.handler)
    assert app.engine is not None
    assert any(f"{home_file} is not a directory" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
