"""Logging for the bridge process: readable text for people, one JSON object a line for machines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from aiohttp.http_exceptions import HttpProcessingError

from bridge.config import LoggingSettings

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One object per line with time, level, logger, message and any structured extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__.get("plugin_fields")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "plugin_fields":
                entry[key] = value
        if isinstance(fields, dict) and fields:
            entry["message"] = record.msg if isinstance(record.msg, str) else entry["message"]
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class MalformedRequestFilter(logging.Filter):
    """aiohttp's parser refusals as one warning line instead of an error with a traceback.

    A request aiohttp's HTTP parser refuses (a bad request line, an oversized header,
    conflicting ``Content-Length``/``Transfer-Encoding``) never reaches the bridge: aiohttp
    answers 400 and closes the connection, and logs it on ``aiohttp.server`` at ERROR with
    the parser's traceback. That is the client's fault, not ours, and hostile traffic would
    fill the log with tracebacks; the traceback says nothing the one-line reason does not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s"
            reason = " ".join(str(exc.message).split()) or type(exc).__name__
            record.args = (remote, reason[:300])
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.level.upper())
    # aiohttp's access log is noisy at info; the bridge counts requests in its metrics instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
