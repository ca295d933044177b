"""A pull of a local directory says it copies, and the admin route's ``status`` stays what clients switch on.

The store reported a local copy as "download" (nothing is downloaded). Its stage is "copy" now; over HTTP the
event keeps ``"status": "download"`` (a client drawing a byte bar for downloads keeps drawing it) and names the
stage in ``"stage": "copy"``, which the notebook's progress line shows. Real store, real server, real client.
"""

from __future__ import annotations

from xllm_jupyter.client.client import XllmClient
from xllm_jupyter.magics.render import Progress
from xllm_jupyter.store.store import ModelStore

from .server_fixtures import API_KEY, make_test_config, running_server


def test_a_local_pull_reports_a_copy_in_the_store(tmp_path, tiny_llama_dir):
    events = []
    manifest = ModelStore(tmp_path / "home").pull(str(tiny_llama_dir), "copied", progress=events.append)
    files = [e for e in events if e.file is not None]
    assert files and {e.stage for e in files} == {"copy"}, [e.stage for e in events]
    assert events[-1].stage == "done" and events[-1].done == manifest.size


def test_the_pull_route_keeps_download_as_status_and_names_the_copy(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), "spare")
    with running_server(make_test_config(home), ModelStore(home), "spare") as server:
        with XllmClient(server.base_url, API_KEY) as client:
            events = list(client.pull(str(tiny_llama_dir), name="fresh"))
    progress = [e for e in events if e.get("file")]
    assert progress, events
    for event in progress:
        # the wire as before (status "download"), the stage added in a field of its own
        assert event["status"] == "download" and event["stage"] == "copy", event
        assert set(event) == {"status", "stage", "file", "completed", "total"}, event
    assert events[-1]["status"] == "success" and events[-1]["id"] == "fresh"
    # the notebook's progress line shows what happens: a copy
    line = Progress(None, "pull x").line(progress[-1])
    assert line.startswith("copy "), line
