"""Every error path of the API: status, OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.core.errors import BadModelOutput, EngineError, Overloaded, RateLimited
from xllm_jupyter.server.errors import GENERIC_500, error_response

MSG = [{"role": "user", "content": "Say something."}]




def error_of(r: httpx.Response) -> dict:
    """The ``error`` object of an OpenAI-shaped error response (checks the shape)."""
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"] and "/work/" not in body["error"]["message"]
    return body["error"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model:latest", messages=MSG)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model:v1.5-q4")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models/"), ("GET", "/v1/chat/completions/"), ("GET", "/v1/responses/"),
    ("GET", "/v1/chat/completions?after="), ("GET", "/v1/no-such-route/"),
])
def test_a_long_name_or_id_is_quoted_short_in_the_404(raw, method, path):
    """A 404 repeated a 60,000-character id from the URL whole (as long as the header limit allows)."""
    r = raw.request(method, path + "a" * 60_000)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert len(err["message"]) < 200 and "a" * 50 in err["message"] and "…" in err["message"], err["message"][:300]


def test_malformed_json(raw):
    r = raw.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] is None and err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    for body in (b"", b"[1, 2]", b'"text"'):
        r = raw.post("/v1/chat/completions", content=body)
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 2.1}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),  # over server.max_n (4 in the test config)
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),  # over server.max_tokens_limit
        ({"max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"stop": ["a", 7]}, "stop[1]"),  # the list branch of the union says what is wrong, not "a valid string"
        ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"seed": 1.5}, "seed"),
        ({"model": ""}, "model"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_parameter(raw, extra, param):
    body = {"model": TINY, "messages": MSG, "max_tokens": 4, **extra}
    r = raw.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("param", "value"), [("temperature", "NaN"), ("repetition_penalty", "Infinity"), ("top_p", "-Infinity")])
def test_non_finite_numbers_are_400_saying_so(raw, param, value):
    """Python's JSON reads NaN and Infinity; a number parameter must be finite, and the message says that."""
    body = f'{{"model": "{TINY}", "messages": [{{"role": "user", "content": "hi"}}], "{param}": {value}}}'
    r = raw.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and "finite" in err["message"], err


def test_bad_parameter_through_sdk(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, temperature=3)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert info.value.code == "decimal_above_max_value"  # api.openai.com's code and words
    assert info.value.body["message"] == "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),  # no reasoning model here: it would change nothing
        ({"verbosity": "low"}, "verbosity"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages[0].content[0].type"),
    ],
)
def test_unsupported_parameter_is_rejected(raw, extra, param):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, **extra})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert "not supported" in err["message"]


def test_harmless_parameters_are_accepted(raw):
    body = {"model": TINY, "messages": MSG, "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none", "store": False, "metadata": {"a": "b"}}
    assert raw.post("/v1/chat/completions", json=body).status_code == 200


def test_completion_errors(raw):
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"  # (0 only with echo: tests/test_echo.py)
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and error_of(r)["param"] == "suffix"
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", "logprobs": 6})
    assert r.status_code == 400 and error_of(r)["param"] == "logprobs"
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": [1, 2, 10**9]})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = raw.post("/v1/completions", json={"model": TINY})
    assert r.status_code == 400 and error_of(r)["code"] == "missing_required_parameter"


def test_context_length_exceeded(client, raw):
    long = "hi " * 2100
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": long}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi " * 1000}], max_tokens=1500)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt=long, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    # streaming requests fail before the stream starts, with a real status
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": long}], "stream": True})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def test_context_length_message_names_what_each_endpoint_was_sent(client, raw):
    """A prompt plus max tokens past the context: the message said "in the messages" for /v1/completions and
    /v1/responses too, which have none (nor a "completion" in Responses' terms)."""
    long = "hi " * 1000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": long}], max_tokens=1500)
    assert "1500 in the completion). Please reduce the length of the messages" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt=long, max_tokens=1500)
    message = info.value.body["message"]
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")
    assert "in the prompt, 1500 in the completion" in message and "max_tokens" in message and "messages" not in message
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=TINY, input=long, max_output_tokens=1500, stream=stream)
        message = info.value.body["message"]
        assert (info.value.code, info.value.param) == ("context_length_exceeded", "input"), stream
        assert "in the input, 1500 in the output" in message and "max_output_tokens" in message, message
        assert "messages" not in message and "completion" not in message, message


def test_body_too_large_from_content_length(xllm_server):
    limit = xllm_server.config.server.max_body_bytes
    with socket.create_connection(("127.0.0.1", int(xllm_server.root.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {xllm_server.api_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {limit * 100}\r\n\r\n"
            ).encode()
        )
        s.sendall(b"{" * 1000)  # far less than announced: the answer must not wait for the rest
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_body_too_large_via_httpx(raw, xllm_server):
    limit = xllm_server.config.server.max_body_bytes
    big = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "x" * (limit + 10)}]}).encode()
    try:
        r = raw.post("/v1/chat/completions", content=big)
    except httpx.TransportError:
        pytest.skip("the client saw the early close before the response")  # timing-dependent; covered above
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_chunked_body_too_large(raw, xllm_server):
    limit = xllm_server.config.server.max_body_bytes

    def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 8192 + 2):
            yield b"x" * 8192
        yield b'"}]}'

    try:
        r = raw.post("/v1/chat/completions", content=body())
    except httpx.TransportError:
        pytest.skip("the client saw the early close before the response")
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_unknown_route_and_wrong_method(raw):
    r = raw.get("/v1/embeddingz")
    assert r.status_code == 404 and error_of(r)["type"] == "invalid_request_error"
    r = raw.post("/v1/nothing/here", json={})
    assert r.status_code == 404
    r = raw.delete("/v1/chat/completions")  # (GET lists stored chat completions)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    r = raw.delete("/v1/models")
    assert r.status_code == 405


def test_a_405_names_the_methods_the_route_serves(raw):
    """RFC 9110 requires ``Allow`` on a 405; it was missing on every route."""
    assert raw.delete("/v1/chat/completions").headers.get("allow") == "GET, HEAD, POST, OPTIONS"
    assert raw.put("/v1/models").headers.get("allow") == "GET, HEAD, OPTIONS"
    assert raw.get("/v1/embeddings").headers.get("allow") == "POST, OPTIONS"
    assert raw.head("/v1/embeddings").headers.get("allow") == "POST, OPTIONS"
    assert "allow" not in raw.get("/v1/nothing").headers  # a 404 has none
    # a path no route has is a 404 for every method: it was a 405 for PUT/PATCH/DELETE, whose Allow then
    # named GET and POST, which only 404 there
    for method in ("PUT", "PATCH", "DELETE", "HEAD"):
        r = raw.request(method, "/v1/nothing")
        assert r.status_code == 404 and "allow" not in r.headers, (method, r.status_code, r.headers)
        if method != "HEAD":
            assert error_of(r)["code"] == "not_found" and method in error_of(r)["message"]


def test_a_plain_options_is_a_204_naming_the_apis_methods(raw):
    """OPTIONS with no Origin was a 403 saying the origin was not allowed (CORS): now what Jupyter answers it, a
    success, needing no key. With API keys on, its ``Allow`` is the API's methods on every path, a path no route
    has included (test_options_route_table.py); the route's own list is its 405's, after the key."""
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/models/" + TINY, "/health", "/v1/nothing"):
        r = httpx.options(raw.base_url.join(path))  # no key
        assert (r.status_code, r.headers.get("allow"), r.content) == (204, "GET, HEAD, POST, DELETE, OPTIONS", b""), \
            (path, r.status_code, r.text)
        assert len(r.headers["x-request-id"]) == 32 and "access-control-allow-origin" not in r.headers
    assert raw.put("/v1/chat/completions").headers["allow"] == "GET, HEAD, POST, OPTIONS"
    r = httpx.options(raw.base_url.join("/v1/models"), headers={"Origin": "https://elsewhere.example"})
    assert r.status_code == 403 and "CORS" in error_of(r)["message"]  # a browser's preflight: still refused


def test_head_answers_where_get_does(raw):
    """HEAD on a GET route is GET's status and headers without the body (RFC 9110); it was a 405 everywhere."""
    for path in ("/health", "/v1/models", "/v1/models/" + TINY, "/metrics"):
        got, head = raw.get(path), raw.head(path)
        assert (head.status_code, head.content) == (200, b""), (path, head.status_code, head.content[:80])
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers.get("x-request-id"), path
    assert int(raw.head("/health").headers["content-length"]) == len(raw.get("/health").content)
    r = raw.head("/v1/models/no-such-model")  # GET's errors too, bodiless
    assert (r.status_code, r.content) == (404, b"")


def test_missing_or_wrong_key_is_401(xllm_server):
    with openai.OpenAI(base_url=xllm_server.base_url, api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    r = httpx.post(xllm_server.base_url + "/chat/completions", json={"model": TINY, "messages": MSG})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(xllm_server.root + "/admin/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = httpx.get(xllm_server.root + "/v1/unknown")
    assert r.status_code == 401  # no route probing without a key


def test_error_translation_hides_internals():
    status, body, _ = error_response(RuntimeError("boom in /home/user/secret.py"))
    assert status == 500 and body["error"]["message"] == GENERIC_500
    status, body, _ = error_response(EngineError("CUDA failed at /opt/lib.so"))
    assert status == 500 and "/opt" not in body["error"]["message"] and body["error"]["code"] == "engine_error"
    status, body, headers = error_response(RateLimited("slow down", retry_after=2.4))
    assert status == 429 and headers["Retry-After"] == "2" and body["error"]["code"] == "rate_limit_exceeded"
    status, body, headers = error_response(Overloaded("queue full"))
    assert status == 503 and body["error"]["message"] == "queue full" and body["error"]["code"] == "overloaded"
    assert headers["Retry-After"] == "1"  # busy now: the client's retry waits a second
    _, _, headers = error_response(Overloaded("too big for this GPU", code="model_does_not_fit"))
    assert "Retry-After" not in headers  # no retry fixes that
    # a 500 written for the client (what to change), as for a job whose logits overflowed, keeps its message
    status, body, headers = error_response(BadModelOutput("The model produced non-finite logits (try float32)"))
    assert status == 500 and "non-finite" in body["error"]["message"] and body["error"]["code"] == "bad_model_output"
    # failures a retry repeats say so in the header the openai SDKs obey (they retry every 5xx otherwise)
    assert headers["x-should-retry"] == "false"
    _, _, headers = error_response(Overloaded("never fits", code="model_does_not_fit"))
    assert headers["x-should-retry"] == "false" and "Retry-After" not in headers
    _, _, headers = error_response(Overloaded("queue full"))
    assert "x-should-retry" not in headers
    _, _, headers = error_response(EngineError("CUDA failed"))
    assert "x-should-retry" not in headers


def test_unloading_the_model_mid_stream_and_non_streaming(client, raw, xllm_server, caplog):
    """Unloading the model under running requests fails them with a 503 to retry (an error event once a stream
    has started), logged as one line each, not as a server failure with a traceback."""
    engine = xllm_server.engine
    results: dict = {}

    def long_request() -> None:
        try:
            client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1900, extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            results["error"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    stream = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    deadline = time.monotonic() + 60
    while engine.stats().running < 2:  # both generating (the thread's request may still be on its way)
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert raw.post("/admin/models/unload", json={"model": TINY}).json()["unloaded"] is True
    with pytest.raises(openai.APIError) as info:
        for _ in it:
            pass
    assert "was unloaded" in info.value.message and info.value.code == "overloaded"
    t.join(30)
    assert results["error"].status_code == 503
    assert "was unloaded" in results["error"].body["message"]
    assert not [rec for rec in caplog.records if rec.exc_info]
    # the server keeps serving (and loads the model again on demand)
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
    assert r.choices[0].message.content is not None
    assert raw.get("/health").json()["status"] == "ok"


def test_refusals_before_the_body_close_the_connection_cleanly(xllm_server):
    """A request refused before its body is read gets ``Connection: close`` (the server hangs up)."""
    with httpx.Client(base_url=xllm_server.root, timeout=30) as c:
        for _ in range(5):
            r = c.get("/v1/models")  # 401, refused in prepare
            assert r.status_code == 401 and r.headers["connection"] == "close"
            # a method the route does not serve is refused after authentication, its body read: the connection stays
            r = c.delete("/v1/chat/completions", headers={"Authorization": f"Bearer {xllm_server.api_key}"})
            assert r.status_code == 405 and r.headers.get("connection") != "close"
            r = c.get("/v1/models", headers={"Authorization": f"Bearer {xllm_server.api_key}"})
            assert r.status_code == 200 and r.headers.get("connection") != "close"


@pytest.mark.parametrize("keep_alive", ["inf", "nan", "9" * 400 + "h", "1e400"])
def test_a_non_finite_keep_alive_is_400_and_leaves_the_listings_whole(raw, keep_alive):
    """keep_alive "9…9h" (400 digits) parsed to an infinite expiry: that load was a 500 and every model listing
    (/v1/models, /admin/stats, /admin/models, /metrics) a 500 after it, until the model was unloaded."""
    for path, body in (("/admin/models/load", {"model": TINY}), ("/v1/chat/completions", {"model": TINY, "messages": MSG, "max_tokens": 1})):
        r = raw.post(path, json={**body, "keep_alive": keep_alive})
        assert r.status_code == 400, r.text[:300]
        err = error_of(r)
        assert err["param"] == "keep_alive" and "finite" in err["message"] and len(err["message"]) < 300
    for path in ("/v1/models", "/admin/stats", "/admin/models", "/metrics"):
        assert raw.get(path).status_code == 200, path


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/responses", '{"model": "tiny", "input": "hi", "max_output_tokens": 2, "text": {"format": {"type": "json_schema", '
                      '"name": "s", "schema": {"type": "object", "properties": {"a": {"enum": [1, NaN]}}}}}}', "text.format.schema.properties.a.enum[1]"),
    ("/v1/responses", '{"model": "tiny", "input": "hi", "max_output_tokens": 2, "tools": [{"type": "function", "name": "f", '
                      '"parameters": {"type": "object", "properties": {"a": {"type": "number", "maximum": 1e400}}}}]}', "tools[0].parameters.properties.a.maximum"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "x-extra": [-Infinity]}', "x-extra[0]"),
])
def test_non_finite_numbers_in_free_form_fields_are_400(raw, path, body, param):
    """Typed numbers refused NaN already; a schema or tool's parameters kept it, and the Responses object echoed it:
    a 200 body with NaN in it, which no strict JSON parser (JavaScript's, the openai Node SDK's) reads."""
    r = raw.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    err = error_of(r)
    assert err["param"] == param and "finite" in err["message"], err
    ok = raw.post(path, content=body.replace("NaN", "2").replace("1e400", "5").replace("-Infinity", "3"),
                  headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text[:300]
    json.loads(ok.text, parse_constant=lambda name: pytest.fail(f"{name} in the reply"))
