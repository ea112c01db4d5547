"""Logging for the bridge process: readable text for people, one JSON object a line for machines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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
