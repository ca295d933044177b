"""``xllm serve -m``: /health/ready waits for every model named on the command line, whatever the config's default."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.helpers import free_port
from tests.server_fixtures import TINY
from tests.test_cli_ux import home, subprocess_env  # noqa: F401 - ``home`` is a fixture

# the real server with the transformers backend's load slowed by 2 s, so the start-up load can be watched
SERVE = (
    "import time\n"
    "from xllm_jupyter.backends import transformers as t\n"
    "load = t.TransformersBackend.load\n"
    "def slow(self, spec):\n"
    "    time.sleep(2)\n"
    "    return load(self, spec)\n"
    "t.TransformersBackend.load = slow\n"
    "from xllm_jupyter.cli.main import main\n"
    "main(['serve', '--port', '{port}', '-m', '{model}'], prog_name='xllm')\n"
)


def test_ready_only_once_the_models_named_with_m_are_loaded(home):  # noqa: F811 - the fixture imported above
    port = free_port()
    env = {**subprocess_env(home), "XLLM_ENGINE_DEFAULT_MODEL": "some-other-model"}
    code = SERVE.replace("{port}", str(port)).replace("{model}", TINY)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url + "/health/ready", timeout=10)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            if r.status_code == 200:
                models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
                assert [m["xllm"]["loaded"] for m in models if m["id"] == TINY] == [True], "ready before tiny loaded"
                break
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            seen.append(r.json()["error"]["message"])
            time.sleep(0.05)
        else:
            raise AssertionError("never ready")
        assert f"Still loading {TINY}." in seen  # the 2 s load was watched, and said so
    finally:
        proc.terminate()
        proc.wait(30)
