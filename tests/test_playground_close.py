"""Closing a playground that a browser still has open is quiet: no traceback under the notebook cell.

An open page keeps event streams to the app (Gradio's heartbeat, the page's queued stream
keeper). ``close()`` ends them; uvicorn then cancelled their tasks after its graceful wait
and logged "Exception in ASGI application" with a CancelledError traceback, which in a
kernel lands in the cell's stderr (05-playground's ``pg.close()`` showed it in JupyterLab).
"""

from __future__ import annotations

import logging
import threading

import httpx
import pytest

pytest.importorskip("gradio")

import xllm_jupyter
from xllm_jupyter.playground.launcher import port_is_free


def test_close_with_an_open_page_logs_no_traceback(tiny_client, caplog):
    app = xllm_jupyter.playground(client=tiny_client, inline=False, replace=False)
    opened = threading.Event()
    ended: list[str] = []

    def open_page_stream() -> None:
        # what an open page holds: its heartbeat event stream, open until the page leaves
        try:
            with httpx.stream("GET", app.local_url + "gradio_api/heartbeat/walk-page", timeout=60) as r:
                assert r.status_code == 200
                opened.set()
                for _ in r.iter_bytes():
                    pass
            ended.append("closed")
        except httpx.HTTPError as exc:
            ended.append(type(exc).__name__)

    reader = threading.Thread(target=open_page_stream, daemon=True)
    reader.start()
    assert opened.wait(30), "the heartbeat stream did not open"
    with caplog.at_level(logging.DEBUG, logger="uvicorn"):
        app.close()
    reader.join(30)
    assert port_is_free(app.port)
    assert ended, "the page's stream is still open after close()"
    noisy = [r for r in caplog.records if r.name.startswith("uvicorn") and r.levelno >= logging.WARNING]
    assert not noisy, [(r.name, r.getMessage(), r.exc_info and r.exc_info[0]) for r in noisy]
