"""The address the Jupyter extension exports to kernels is one the server listens on.

A Jupyter server started on one address (``--ip=$(hostname)``, as cluster guides have it) does not answer on
127.0.0.1, yet ``XLLM_BASE_URL`` named 127.0.0.1 whatever ``ServerApp.ip`` was: every ``%xllm`` in its kernels (and
its playground) failed with "cannot reach the xllm server".
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.browser import jupyter_lab
from tests.server_fixtures import TINY

pytestmark = [pytest.mark.timeout(300)]

#: a loopback address other than 127.0.0.1 (Linux routes all of 127/8 to lo): a server bound to it alone
#: stands for one bound to a host's own address, without a network
ONE_ADDRESS = "127.0.0.2"


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def _run_in_kernel(lab, code: str, timeout: float = 120) -> str:
    """Start a kernel through the server's REST API, run ``code`` in it, return what it printed (stdout, stderr,
    displayed text), and shut the kernel down."""
    from jupyter_client import BlockingKernelClient

    kernel = lab.api("api/kernels", "POST", {"name": "python3"})
    try:
        connection = lab.env["JUPYTER_RUNTIME_DIR"] + f"/kernel-{kernel['id']}.json"
        deadline = time.monotonic() + timeout
        while True:  # written by the server as it starts the kernel
            try:
                with open(connection, encoding="utf-8") as f:
                    json.load(f)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client = BlockingKernelClient(connection_file=connection)
        client.load_connection_file()
        # no heartbeat: a client without a KernelManager reads one missed beat (1 s, a starved CPU) as a dead kernel
        # ("Kernel died before replying to kernel_info" on a busy runner); the kernel_info wait has its own timeout
        client.start_channels(hb=False)
        try:
            client.wait_for_ready(timeout=timeout)
            said: list[str] = []

            def collect(msg: dict) -> None:
                content = msg["content"]
                if msg["msg_type"] == "stream":
                    said.append(content["text"])
                elif msg["msg_type"] in ("display_data", "execute_result"):
                    said.append(content["data"].get("text/plain", ""))
                elif msg["msg_type"] == "error":
                    said.append("\n".join(content["traceback"]))

            client.execute_interactive(code, output_hook=collect, timeout=timeout)
            return "".join(said)
        finally:
            client.stop_channels()
    finally:
        lab.api(f"api/kernels/{kernel['id']}", "DELETE")


def test_kernels_of_a_server_on_one_address_reach_its_engine(xllm_home, tmp_path):
    if not _can_bind(ONE_ADDRESS):
        pytest.skip(f"{ONE_ADDRESS} is not a loopback address here")
    config = {"XllmApp": {"home": str(xllm_home), "default_model": TINY, "preload": False}}
    with jupyter_lab(tmp_path / "lab", config=config, ip=ONE_ADDRESS, name="extension-one-address") as lab:
        said = _run_in_kernel(lab, "import os\nprint(os.environ['XLLM_BASE_URL'])\n"
                                   "%load_ext xllm_jupyter\n%xllm list")
    assert f"http://{ONE_ADDRESS}:" in said, said
    assert TINY in said and "xllm:" not in said, f"the kernel did not reach the engine:\n{said}"
