"""What the sync and async clients share: URLs, headers, request bodies, errors, SSE parsing."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import httpx

from ..core.errors import (
    AuthenticationError,
    ContextLengthExceeded,
    EngineError,
    InvalidModelName,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    StoreError,
    Unsupported,
    XllmError,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8900/v1"
#: a URL's scheme (``host:port`` alone has none: no ``//`` follows its colon)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: connect fast (a missing server should fail at once), but let generations take their time
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
#: /health, /v1/models and /admin/models answer from memory: a server that takes longer is stuck (its IOLoop
#: blocked, or not an HTTP server at all), and `xllm ps` or `xllm run`'s server probe should say so, not wait 300 s
PROBE_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
#: long enough for a big Hugging Face download between two pull progress events
PULL_TIMEOUT = httpx.Timeout(3600.0, connect=5.0)
#: a load reads a big model off a slow disk, or waits for room behind models in use: many minutes, and the server goes
#: on loading whether or not its caller waits (`xllm run BIG`, `%xllm load` gave up at 300 s: "did not answer in time")
LOAD_TIMEOUT = httpx.Timeout(3600.0, connect=5.0)


def probe_timeout(timeout: httpx.Timeout | float) -> httpx.Timeout | float:
    """The timeout of the quick calls (health, model lists): PROBE_TIMEOUT, unless the caller chose its own."""
    return PROBE_TIMEOUT if timeout is DEFAULT_TIMEOUT else timeout


def load_timeout(timeout: httpx.Timeout | float) -> httpx.Timeout | float:
    """The timeout of a model load: LOAD_TIMEOUT, unless the caller chose its own."""
    return LOAD_TIMEOUT if timeout is DEFAULT_TIMEOUT else timeout


class ServerUnavailable(XllmError):
    """No xllm server answers at the client's URL (connection refused, DNS, timeout)."""

    status = 503
    type = "server_error"
    code = "server_unavailable"


# Most specific first: a server's `code` picks the class, else its HTTP status does.
_BY_CODE: dict[str, type[XllmError]] = {
    "model_not_found": ModelNotFound,
    "context_length_exceeded": ContextLengthExceeded,
    "unsupported_parameter": Unsupported,
    "invalid_model_name": InvalidModelName,
    "store_error": StoreError,
    "invalid_api_key": AuthenticationError,
    "rate_limit_exceeded": RateLimited,
    "overloaded": Overloaded,
}
_BY_STATUS: dict[int, type[XllmError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    500: EngineError,
    503: Overloaded,
}


def resolve_base_url(base_url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The OpenAI-style base (ending in ``/v1``): argument, else ``XLLM_BASE_URL``, else the default."""
    env = os.environ if env is None else env
    given = base_url or env.get("XLLM_BASE_URL") or DEFAULT_BASE_URL
    url = given.strip().rstrip("/")
    scheme = _SCHEME.match(url)
    if scheme is None:
        url = "http://" + url
    elif scheme.group(1).lower() not in ("http", "https"):  # else `ftp://x:1` became "no xllm server at http://ftp://x:1"
        raise InvalidRequest(f"{given!r} is not a server URL (use http:// or https://)", param="url")
    # Accept a bare server root too ("http://host:8900", "…/xllm"): people paste those.
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def env_key_for(base_url: str | None) -> str | None:
    """``XLLM_API_KEY`` for the server ``XLLM_BASE_URL`` (or the default URL) names, None for any other: the Jupyter
    extension exports its server's token there, which a client named another server sent along."""
    key = os.environ.get("XLLM_API_KEY") or None
    if key is None or base_url is None:
        return key
    try:
        ours = _server_identity(resolve_base_url(None))
        return key if ours is not None and ours == _server_identity(resolve_base_url(base_url)) else None
    except InvalidRequest:  # XLLM_BASE_URL (or base_url) is no server URL: it names no server to trust
        return None


def _server_identity(base_url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of a resolved base URL, spelled one way: ``HTTP://Host:80/x/v1`` and
    ``http://host/x/v1`` are one server; None for a URL httpx cannot read.

    Different host names stay different, loopback ones too: ``localhost`` may resolve to ``::1`` first, where
    another local user can listen on the port a server bound on 127.0.0.1 (or 0.0.0.0) only. The path counts:
    behind one JupyterHub proxy, ``/user/alice/`` and ``/user/bob/`` are two users' servers on one origin.
    """
    try:
        url = httpx.URL(base_url)
        host = url.host  # decoded here: `xn--` raises IDNAError (a UnicodeError), which connect() reports itself
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return None
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme, 0)  # httpx drops a default one
    return url.scheme, host, port, url.path.rstrip("/")


def root_url(base_url: str) -> str:
    """The server root the admin routes and /health hang off (``base_url`` minus ``/v1``)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Bearer header for an API key (Jupyter's token auth accepts ``Bearer`` too)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _instantiate(cls: type[XllmError], message: str, param: str | None, code: str | None) -> XllmError:
    # Some subclasses build their own message from a name; the server already sent the
    # final wording, so bypass their constructors and keep it verbatim.
    exc = cls.__new__(cls)
    XllmError.__init__(exc, message, param=param, code=code)
    if cls is RateLimited or issubclass(cls, RateLimited):
        exc.retry_after = 1.0
    return exc


def error_from_body(status: int, body: Any, *, reason: str = "", headers: Mapping[str, str] | None = None) -> XllmError:
    """The XllmError a server's error response stands for, carrying the server's message."""
    message = param = code = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = err.get("message")
            param = err.get("param")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
        # jupyter_server's own errors (e.g. 403 before our handlers run) use {"message", "reason"}
        message = message or body.get("message") or body.get("reason")
    elif isinstance(body, str) and body.strip() and len(body) < 300 and "<" not in body:
        message = body.strip()
    if not message:
        message = f"HTTP {status} {reason}".strip()
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else XllmError
    exc = _instantiate(cls, str(message), param, code)
    exc.status = status
    if isinstance(exc, RateLimited) and headers and headers.get("retry-after"):
        try:
            exc.retry_after = float(headers["retry-after"])
        except ValueError:
            pass
    return exc


def error_from_response(response: httpx.Response) -> XllmError:
    """Translate a non-2xx (already read) response into an XllmError."""
    try:
        body: Any = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        return error_from_body(response.status_code, body, reason=response.reason_phrase, headers=response.headers)
    # An HTML error page or plain text: probably not our API at all (wrong URL or
    # prefix), so say where we asked.
    reason = f"{response.reason_phrase} from {response.request.url} (is this the xllm API URL?)"
    return error_from_body(response.status_code, None, reason=reason, headers=response.headers)


def json_body(response: httpx.Response, root: str) -> Any:
    """The JSON of a (read) response, or the XllmError it stands for.

    Redirects and non-JSON pages mean the URL is not an xllm API (e.g. a Jupyter login
    page), which deserves a message rather than a decoding traceback.
    """
    if response.status_code >= 400:
        raise error_from_response(response)
    if 300 <= response.status_code < 400:
        where = response.headers.get("location", "elsewhere")
        raise XllmError(f"the server at {root} redirected to {where}: check the URL and the API key")
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise XllmError(f"the server at {root} did not answer like an xllm server (not JSON): check the URL") from None


def is_event_stream(response: httpx.Response) -> bool:
    """True for a successful SSE response; anything else must be read and turned into an error."""
    return response.status_code < 300 and response.headers.get("content-type", "").startswith("text/event-stream")


def not_a_stream(response: httpx.Response, root: str) -> XllmError:
    """The error for a (read) response that should have been an SSE stream."""
    try:
        json_body(response, root)
    except XllmError as exc:
        return exc
    return XllmError(f"the server at {root} did not stream its answer: check the URL")


def stream_error(response: httpx.Response, root: str, missing: XllmError | None) -> XllmError:
    """``not_a_stream``, but ``missing`` for a 404 that is not the route refusing a field of the body.

    A server without the route answers 404 with no ``param``; the pull route's own 404 (an unknown
    ``base``) names the field, and its message says more than "older than this client".
    """
    error = not_a_stream(response, root)
    if missing is not None and response.status_code == 404 and getattr(error, "param", None) is None:
        return missing
    return error


def pull_body(source: str, name: str | None, revision: str | None, force: bool, convert: bool,
              base: str | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /admin/models/pull``; options left at their defaults are left out."""
    body = {"model": source, "name": name, "revision": revision, "force": force, "convert": convert, "base": base}
    return {k: v for k, v in body.items() if v not in (None, False)}


def cannot_pull() -> NotFound:
    """The error for a server without the pull route (a 404 where its progress stream should be)."""
    return NotFound("this xllm server cannot pull models (it is older than this client)")


class WrongScheme(ServerUnavailable):
    """The server at the client's URL may speak the other scheme (TLS against plain HTTP, or back): the message says."""


def refuses_field(exc: XllmError, field: str) -> bool:
    """Whether ``exc`` is an admin route's 400 for ``field``: a server older than the field (it names it unknown)."""
    return exc.status == 400 and exc.code == "unknown_parameter" and exc.param == field


def unreachable(url: str, exc: Exception, answered: bool = False) -> ServerUnavailable:
    """The error for a server that does not answer at all (``answered``: it sent its response's head, then failed)."""
    https = url.lower().startswith("https://")
    if isinstance(exc, httpx.ConnectTimeout) and https:
        # a plain HTTP server (`xllm serve`) reads a TLS hello as the start of a request and waits for the rest
        return WrongScheme(f"the xllm server at {url} did not answer in time (if it serves plain HTTP, as `xllm serve` "
                           "does, use http://)")
    if isinstance(exc, httpx.TimeoutException):
        return ServerUnavailable(f"the xllm server at {url} did not answer in time")
    # (once its response's head came, it spoke HTTP in this scheme: a reset is a server gone mid-answer)
    if not https and not answered and (isinstance(exc, httpx.RemoteProtocolError) and "illegal" in str(exc)
                      or isinstance(exc, httpx.ReadError) and _was_reset(exc)):
        # a TLS server drops a plain request (resets the connection) or answers it with a TLS alert, not HTTP
        return WrongScheme(f"the server at {url} reset the connection or answered in something other than HTTP (if it "
                           "serves HTTPS, use https://; else did it stop or restart?)")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        # it was there, then dropped the connection (typically killed or restarted mid-answer):
        # "no server, start one" would send the user looking for a setup problem
        return ServerUnavailable(f"the xllm server at {url} closed the connection before the answer was complete (did it stop or restart?)")
    return ServerUnavailable(f"no xllm server at {url} — start one with `xllm serve` or JupyterLab")


def _was_reset(exc: BaseException | None) -> bool:
    """Whether the peer reset the connection (the async client's ReadError says so only in its causes)."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, ConnectionResetError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def cut_short(url: str) -> ServerUnavailable:
    """The error for an event stream that ended without its ``[DONE]``: what came is not the whole answer. A Tornado
    server or proxy (jupyter-server-proxy, a Jupyter server forwarding to a hub service) whose upstream fails
    mid-stream ends its own response cleanly; taken for the end, the answer so far passed for a whole one."""
    return ServerUnavailable(f"the stream from the xllm server at {url} ended before the answer was complete (did the "
                             "server, or a proxy in between, stop or restart?)")


def chat_body(messages: Iterable[Mapping[str, Any]] | str, model: str | None, stream: bool, params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of a chat completion request; a bare string becomes one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = {"messages": [dict(m) for m in messages], "stream": stream}
    if model:
        body["model"] = model
    body.update({k: v for k, v in params.items() if v is not None})
    _sendable(body, "")
    return body


def _sendable(value: Any, path: str) -> None:
    """Refuse, naming the field, what JSON cannot carry: text with a lone surrogate (what bytes decoded with
    ``errors="surrogateescape"`` leave, e.g. ``os.fsdecode``), NaN or infinity. httpx failed on them with a bare
    UnicodeEncodeError or ValueError, which the notebook API and ``%xllm`` showed as an unexpected error."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            # U+DC80-U+DCFF is what surrogateescape leaves; another surrogate is half of a UTF-16 pair (`"\\ud83d\\ude00"`
            # typed in Python, or text decoded with errors='surrogatepass'), which the hint about bytes misled on
            why = ("an undecodable byte kept by errors='surrogateescape'?): decode the bytes as UTF-8, with errors="
                   "'replace' where they may not be" if "\udc80" <= bad <= "\udcff" else
                   "half of a UTF-16 surrogate pair?): join the pair with .encode('utf-16', 'surrogatepass')"
                   ".decode('utf-16')")
            raise InvalidRequest(f"{path} is not valid Unicode text: {bad!r} at position {exc.start} ({why}",
                                 param=path) from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{path} must be a finite number, not {value!r}", param=path)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _sendable(key, f"{path or 'the body'}'s key")  # `metadata={name: ...}`: httpx's bare error too
            _sendable(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _sendable(item, f"{path}[{i}]")


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One SSE line to a chunk dict; None for comments/blank/other fields; raises on errors.

    Returns the sentinel ``DONE`` for ``data: [DONE]``.
    """
    if not line.startswith("data:"):
        return None  # blank separators, ": keepalive" comments, "event:" lines
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineError("the server sent a malformed stream event") from None
    if isinstance(chunk, dict) and "error" in chunk:
        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        status = {"invalid_request_error": 400, "rate_limit_error": 429}.get(err.get("type", ""), 500)
        raise error_from_body(status, {"error": err})
    return chunk


#: model tasks a chat request can use (an adapter is a LoRA served on its chat model)
CHAT_TASKS = frozenset({"chat", "adapter"})


def model_task(entry: Mapping[str, Any]) -> str | None:
    """The task (``chat``, ``embedding``, ``adapter``) a model entry states; None when it says none.

    Reads both shapes: ``/v1/models`` (``xllm.details.task``) and ``/admin/models`` (``details.task``).
    """
    extras = entry.get("xllm")
    extras = extras if isinstance(extras, Mapping) else {}
    for holder in (extras, extras.get("details"), entry.get("details"), entry):
        if isinstance(holder, Mapping) and isinstance(holder.get("task"), str):
            return holder["task"]
    return None


def is_default(entry: Mapping[str, Any]) -> bool:
    """True for the model the server is configured to default to (``xllm.details.default`` in ``/v1/models``)."""
    extras = entry.get("xllm")
    details = extras.get("details") if isinstance(extras, Mapping) else None
    return isinstance(details, Mapping) and details.get("default") is True


def can_chat(entry: Mapping[str, Any]) -> bool:
    """False only for a model its entry says is for something else (an embedding model)."""
    task = model_task(entry)
    return task is None or task in CHAT_TASKS


#: at most this many names in a "the server has ..." list (a big store would flood an error or status line)
LISTED = 12


def listed(names: list[str], limit: int = LISTED) -> str:
    """``names`` joined for a message line, the first ``limit`` of them and how many there are in all."""
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _first_chat(entries: Iterable[Mapping[str, Any]]) -> str | None:
    """The first entry's name that may serve a chat (embedding models left out)."""
    names = ((entry.get("id") or entry.get("name"), entry) for entry in entries)
    return next((name for name, entry in names if name and can_chat(entry)), None)


def pick_default_model(servable: list[Mapping[str, Any]]) -> str | None:
    """A loaded chat model, else the server's default, else the first servable chat model.

    ``servable`` is ``/v1/models``' data: its entries say which models are loaded, what each
    serves and which is the server's ``engine.default_model`` (``xllm.details.default``).
    (Callers check ``XLLM_MODEL`` first, which spares them the listing.)
    """
    loaded = [m for m in servable if (m.get("xllm") or {}).get("loaded")]
    return _first_chat(loaded) or _first_chat([m for m in servable if is_default(m)]) or _first_chat(servable)


def no_chat_model() -> InvalidRequest:
    """The error for a chat without a model when the server has no chat model to default to."""
    return InvalidRequest("no model given and this server has no chat model to default to: pass model=..., "
                          "or pull one (xllm pull smollm2)", param="model")


#: returned by parse_sse_line for ``data: [DONE]``
DONE: dict[str, Any] = {"__done__": True}


def delta_text(chunk: Mapping[str, Any]) -> str:
    """The content text a chat chunk adds to the first choice ("" for role/finish/usage chunks, and for another
    choice's: with ``n`` > 1 each chunk carries one choice, and taking every chunk's first mixed the choices)."""
    choices = chunk.get("choices") or ()
    if not choices or choices[0].get("index", 0) != 0:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or ""


def message_text(body: Mapping[str, Any]) -> str:
    """The assistant text of a non-streamed chat completion."""
    choices = body.get("choices") or ()
    if not choices:
        return ""
    return (choices[0].get("message") or {}).get("content") or ""
