"""One error hierarchy for xllm: raised anywhere, translated once at each edge.

Every error knows its HTTP status and its OpenAI error ``type``/``code``/``param`` so
the server, the CLI and the notebook front-ends render it without guessing.
Messages must never contain stack traces, file system paths or secrets.
"""

from __future__ import annotations

#: most characters of a client's own value (a name, an id, a path) an error message repeats
QUOTE_CHARS = 100


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` as text cut to ``limit`` characters, for a message (an id may be as long as a URL allows)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class XllmError(Exception):
    """Base of every error xllm raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    #: a 500 whose message is written for the client; other 500s reach it as a generic message
    client_safe: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self):
        # copy.copy and pickle rebuild an exception by calling its class with its args: a subclass taking a name
        # (ModelNotFound(name)) then took its whole message as the name, doubling it in str(); the engine copies
        # one error for each request that shares it (a shared resolve's 404, a removal's)
        return (_rebuilt, (type(self), self.args), self.__dict__)

    def to_openai(self) -> dict:
        """The OpenAI-shaped error body for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuilt(cls: type, args: tuple) -> "XllmError":
    """An instance of ``cls`` with ``args``, its ``__init__`` not called (its attributes are restored after)."""
    exc = cls.__new__(cls)
    exc.args = args
    return exc


class InvalidRequest(XllmError):
    """The request is malformed or a parameter is out of range (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class UnknownParameter(InvalidRequest):
    """A field the route does not take, where unknown fields are refused: the admin routes (400, ``param`` the field).

    The OpenAI routes accept unknown fields (SDKs send new ones before a server knows them); an admin body
    comes from this project's clients and scripts, where an unknown field is a typo or a field of another
    route, and ignoring it did something else than was asked.
    """

    code = "unknown_parameter"

    def __init__(self, key: str, takes: tuple[str, ...], elsewhere: str | None = None):
        name = quoted(key)
        where = f" It is a parameter of {elsewhere}." if elsewhere else ""
        fields = " and ".join(", ".join(f"'{field}'" for field in takes).rsplit(", ", 1))
        super().__init__(f"Unknown parameter: '{name}'.{where} This route takes {fields}.", param=name)


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus requested tokens) does not fit the model's context (400)."""

    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """A parameter this backend cannot honour; rejected rather than ignored (400)."""

    code = "unsupported_parameter"


class AuthenticationError(XllmError):
    """Missing or wrong credentials (401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(XllmError):
    """Authenticated, but not allowed to do this (403)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(XllmError):
    """A resource (route, file, job) does not exist (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """No model of that name is loaded or in the store (404)."""

    code = "model_not_found"

    def __init__(self, name: str, *, param: str | None = "model"):
        super().__init__(f"The model '{quoted(name)}' does not exist", param=param)
        self.name = name


class ModelRemoved(ModelNotFound):
    """The model was removed from the store (``DELETE /v1/models/{id}``) while this request used it
    (404, ``model_not_found`` as a retry would get: the message says a retry will not find it either)."""

    def __init__(self, name: str, *, param: str | None = "model"):
        NotFound.__init__(self, f"The model '{quoted(name)}' was removed from the server while this request used "
                                "it; it no longer exists, so retrying will not help: use another model", param=param)
        self.name = name


class PayloadTooLarge(XllmError):
    """The request body is over the configured limit (413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(XllmError):
    """The body is sent as a media type or content coding this endpoint does not read (415)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RequestHeadTooLarge(XllmError):
    """The request line and headers together are over the server's limit (431)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UriTooLong(RequestHeadTooLarge):
    """As RequestHeadTooLarge, with the URL the larger part of it (414)."""

    status = 414
    code = "uri_too_long"


class RateLimited(XllmError):
    """Too many requests or tokens for this key (429)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Overloaded(XllmError):
    """The server cannot take this request now: queue full, model loading, no room (503)."""

    status = 503
    type = "server_error"
    code = "overloaded"


class EngineError(XllmError):
    """The engine failed while generating (500); details go to the log, not the client."""

    status = 500
    type = "server_error"
    code = "engine_error"


def repair_advice(created_from: str | None = None) -> str:
    """What mends a damaged model: pulling it again, or for one made by ``xllm create`` or ``cp`` from model
    ``created_from`` (it has no source to pull) creating it again."""
    if created_from:
        return f"create it again from '{quoted(created_from)}' (it was made by xllm create and cannot be pulled)"
    return "pull it again with force"


class ModelLoadError(EngineError):
    """A model's files could not be loaded (500); the message names the model, library and error type, no path,
    so a client learns that retrying will not help."""

    code = "model_load_failed"
    client_safe = True

    @classmethod
    def of(cls, name: str, library: str, exc: BaseException, created_from: str | None = None) -> "ModelLoadError":
        """The error for ``exc``, raised while ``library`` loaded model ``name`` (made by ``xllm create`` from
        ``created_from``, if it was)."""
        return cls(f"Failed to load model '{name}' with {library} ({type(exc).__name__}): its files are damaged "
                   f"or not supported; {repair_advice(created_from)} (the server log has the details)")


class BadModelOutput(EngineError):
    """The model's output for one job could not be used (e.g. non-finite logits); the message says what to
    change (500)."""

    code = "bad_model_output"
    client_safe = True


class StoreError(XllmError):
    """A model store operation failed (pull, verify, remove)."""

    status = 400
    type = "invalid_request_error"
    code = "store_error"


class PullStopped(StoreError):
    """A pull stopped before it finished because it was cancelled (the server shutting down): nothing was added (503)."""

    status = 503
    type = "server_error"
    code = "pull_stopped"


class InvalidModelName(StoreError):
    """A model name that is not allowed (could escape the store or is malformed)."""

    code = "invalid_model_name"

    def __init__(self, name: str):
        super().__init__(f"Invalid model name {name!r}: use letters, digits, '.', '_', '-', and one optional ':tag'", param="model")


class ConfigError(XllmError):
    """config.yaml or an XLLM_* variable is invalid; the message names the key."""

    status = 500
    type = "server_error"
    code = "config_error"


class HubMisconfigured(ConfigError):
    """The JupyterHub API refuses the hub service's requests (a wrong ``JUPYTERHUB_API_URL`` or service token)."""

    code = "hub_misconfigured"
    client_safe = True  # (its message names nothing of the setup; the service's log says what the hub answered)


class ListenError(XllmError):
    """The server cannot listen on its host and port (in use, not allowed, no such address)."""

    status = 500
    type = "server_error"
    code = "listen_error"
