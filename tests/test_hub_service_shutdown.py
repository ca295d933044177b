"""The hub service's shutdown: a second Ctrl-C cuts the drain, as in `xllm serve`, and usage is still saved.

A real JupyterHub (tests/real_hub.py) vouches for bob's token; the service runs in this process on the tiny
Llama (``run_hub_service``, the body of ``python -m xllm_jupyter.hub``), with the real ``openai`` SDK as client.
A request is held in flight by a hook on the engine (it never ends by itself) and the drain is given no
deadline of its own, so the shutdown ends only if the second Ctrl-C cuts it: nothing waits on a clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import free_port
from tests.real_hub import HubProcess, user_token, xllm_services_tail
from tests.server_fixtures import TINY, make_test_config

pytest.importorskip("jupyterhub")

ADMIN_TOKEN = "shutdown-admin-token-0123456789abcdef"
SERVICE_TOKEN = "shutdown-service-token-0123456789abcdef"
HELD = "held-model"  # the model name whose load the hook holds
MSG = [{"role": "user", "content": "hi"}]


class _LogSeen(logging.Handler):
    """Sets ``event`` when a record's message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_second_ctrl_c_cuts_the_hub_services_drain_and_usage_is_still_saved(tmp_path, xllm_home, monkeypatch):
    # the service set its signal handlers once and kept them: a second Ctrl-C set the stop event again and was
    # ignored, so the drain ran its course whatever the admin did (and a third did nothing either)
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.service import run_hub_service
    from xllm_jupyter.server.handlers import XllmContext

    port = free_port()
    hub = HubProcess(tmp_path)
    hub.start(xllm_services_tail(f"http://127.0.0.1:{port}", SERVICE_TOKEN, ADMIN_TOKEN))
    try:
        with httpx.Client(base_url=hub.api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30) as admin:
            assert admin.post("/users", json={"usernames": ["bob"]}).status_code == 201
            token = user_token(admin, "bob")

        in_flight, release, saved = threading.Event(), threading.Event(), threading.Event()
        load, wait_idle, close = Engine.load, XllmContext.wait_idle, XllmContext.close

        async def held_load(self, name):
            if name != HELD:
                return await load(self, name)
            in_flight.set()
            while not release.is_set():  # (an asyncio wait on a thread's event: the hook, not a timing)
                await asyncio.sleep(0.01)
            return await load(self, TINY)

        async def no_deadline(self, timeout):
            return await wait_idle(self, 3600.0)  # the drain lasts as long as the request held in flight

        def closing(self):
            close(self)  # the last usage save
            saved.set()

        monkeypatch.setattr(Engine, "load", held_load)
        monkeypatch.setattr(XllmContext, "wait_idle", no_deadline)
        monkeypatch.setattr(XllmContext, "close", closing)
        usage = tmp_path / "usage.json"
        config = make_test_config(xllm_home)
        config = dataclasses.replace(config, quotas=dataclasses.replace(config.quotas, usage_file=str(usage)))
        env = {"JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}", "JUPYTERHUB_API_TOKEN": SERVICE_TOKEN,
               "JUPYTERHUB_API_URL": hub.api, "JUPYTERHUB_SERVICE_NAME": "xllm"}
        base = f"http://127.0.0.1:{port}/services/xllm/v1"
        shutting = _LogSeen("shutting down")
        logger = logging.getLogger("xllm_jupyter.hub")
        logger.addHandler(shutting)
        monkeypatch.setattr(logger, "level", logging.INFO)
        outcome: dict = {}

        def drive() -> None:
            """The user and the admin: a chat, a request held in flight, then Ctrl-C twice."""
            try:
                with openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120) as c:
                    _until(lambda: _answers(base), "the service serving")
                    reply = c.chat.completions.create(model=TINY, messages=MSG, max_tokens=3, seed=7)
                    outcome["tokens"] = reply.usage.completion_tokens
                    stuck = threading.Thread(target=_quietly, args=(c, HELD), daemon=True)
                    stuck.start()
                    assert in_flight.wait(120), "the held request never reached the engine"
                    os.kill(os.getpid(), signal.SIGINT)
                    assert shutting.event.wait(120), "the shutdown never started"
                    os.kill(os.getpid(), signal.SIGINT)  # impatient: Ctrl-C again
                    # (the limit only ends the old code's endless drain: the held request is let go after it)
                    outcome["cut"] = saved.wait(60)
            except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
                outcome["error"] = exc
            finally:
                release.set()

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        try:
            asyncio.run(run_hub_service(config, env))
        finally:
            release.set()
            driver.join(120)
            logger.removeHandler(shutting)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["cut"] is True  # the drain ended at the second Ctrl-C, the request still held
        assert outcome["tokens"] == 3
        users = json.loads(usage.read_text())["users"]
        assert [(u["requests"], u["completion_tokens"]) for u in users.values()] == [(2, 3)]  # (the held one, cut)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a third Ctrl-C interrupts
    finally:
        hub.stop()


def _answers(base: str) -> bool:
    try:
        return httpx.get(base.removesuffix("v1") + "health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _until(pred, what: str, limit: float = 120.0) -> None:
    """Poll ``pred`` (a state, not a duration: the limit only ends a hung test)."""
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def _quietly(client: openai.OpenAI, model: str) -> None:
    """A chat the shutdown cuts: its outcome is not what the test checks."""
    try:
        client.chat.completions.create(model=model, messages=MSG, max_tokens=3)
    except Exception:  # noqa: BLE001
        pass
