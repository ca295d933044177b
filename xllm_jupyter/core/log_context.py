"""The id of the request a log record belongs to, set where a request enters (server/edge.py)."""

from __future__ import annotations

import contextvars

#: the id of the request being served in this context ("-" outside any request); the engine keeps each request's
#: (RequestHandle.log_id) for the lines its thread logs about it, where this context is not the request's
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("xllm_request_id", default="-")
