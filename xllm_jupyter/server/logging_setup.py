"""Logging for `xllm serve`: text or JSON lines, optional rotating file, request ids on every record."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from ..core.config import HttpConfig
from ..core.log_context import request_id_var  # (server/edge.py sets it: where a request enters)

#: record attributes the access log adds, copied into JSON lines when present
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
#: marks handlers this module installed, so a second setup replaces rather than duplicates them
_MARK = "_xllm_handler"


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record that lacks one (never drops records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add ``record.request_id``."""
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, and access fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for name in _ACCESS_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_formatter(http: HttpConfig) -> logging.Formatter:
    """The formatter ``http.log_format`` asks for."""
    return JsonFormatter() if http.log_format == "json" else logging.Formatter(_TEXT_FORMAT)


def make_file_handler(http: HttpConfig) -> logging.Handler:
    """A rotating file handler for ``http.log_file``: by size or daily, keeping ``log_backups``."""
    path = Path(http.log_file).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if http.log_rotate == "daily":
        return logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=http.log_backups, encoding="utf-8", utc=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=http.log_max_bytes, backupCount=http.log_backups, encoding="utf-8")


def setup_logging(http: HttpConfig, *, stream: Any = None) -> list[logging.Handler]:
    """Configure the root logger from ``http`` (stderr, plus the file when set); returns the handlers.

    Handlers from an earlier call are replaced; handlers someone else installed are kept.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if http.log_file:
        handlers.append(make_file_handler(http))
    formatter = make_formatter(http)
    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
    root.setLevel(getattr(logging, http.log_level, logging.INFO))
    return handlers


__all__ = ["JsonFormatter", "RequestIdFilter", "make_file_handler", "make_formatter", "request_id_var", "setup_logging"]
