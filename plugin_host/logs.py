"""Plugin output (hclog JSON and plain lines) turned into records in the host's logging."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

# go-plugin reads stderr with a 64 KiB line buffer; longer lines are passed on in pieces.
MAX_LINE = 64 * 1024

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_HCLOG_LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_PREFIX = re.compile(rb"^\s*\[(TRACE|DEBUG|INFO|WARN|ERROR)\]\s?")
_PANIC_START = (b"panic: ", b"fatal error: ")
_RESERVED = ("@level", "@message", "@timestamp", "@module", "@caller")


def plugin_logger(plugin_id: str) -> logging.Logger:
    """The logger plugin output goes to; named as Grafana names it."""
    return logging.getLogger(f"plugin.{plugin_id}")


class PluginLogParser:
    """Turns one plugin's stderr lines into log records, like go-plugin's host side does.

    JSON lines keep their level, message and key/value pairs (as ``record.plugin_fields``);
    plain lines take their level from a ``[LEVEL]`` prefix; after a ``panic:`` line, every
    untagged line is an error, so a Go stack trace is not lost at debug level.
    """

    def __init__(self, plugin_id: str, *, logger: logging.Logger | None = None) -> None:
        self.plugin_id = plugin_id
        self.logger = logger or plugin_logger(plugin_id)
        self._panicking = False

    def feed(self, line: bytes) -> None:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return
        if line.lstrip().startswith(b"{") and self._feed_json(line):
            return
        self._feed_plain(line)

    def _feed_json(self, line: bytes) -> bool:
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        if not isinstance(entry, dict):
            return False
        raw_level = entry.get("@level")
        message = entry.get("@message")
        timestamp = entry.get("@timestamp")
        if not isinstance(raw_level, str) or raw_level.lower() not in _HCLOG_LEVELS:
            # go-plugin logs such lines whole at debug.
            self._emit(logging.DEBUG, line.decode("utf-8", "replace"), {})
            return True
        created: float | None = None
        if isinstance(timestamp, str):
            try:
                created = datetime.fromisoformat(timestamp).timestamp()
            except ValueError:
                return False
        fields: dict[str, Any] = {k: v for k, v in entry.items() if k not in _RESERVED}
        # go-plugin adds its own timestamp key; Grafana drops it.
        fields.pop("timestamp", None)
        if isinstance(entry.get("@module"), str):
            fields["module"] = entry["@module"]
        self._emit(_HCLOG_LEVELS[raw_level.lower()], str(message or ""), fields, created=created)
        return True

    def _feed_plain(self, line: bytes) -> None:
        match = _PREFIX.match(line)
        if match:
            level = _HCLOG_LEVELS[match.group(1).decode().lower()]
            text = line[match.end() :]
        elif line.startswith(_PANIC_START):
            self._panicking = True
            level, text = logging.ERROR, line
        else:
            level = logging.ERROR if self._panicking else logging.DEBUG
            text = line
        self._emit(level, text.decode("utf-8", "replace"), {})

    def _emit(
        self, level: int, message: str, fields: dict[str, Any], *, created: float | None = None
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        rendered = message
        if fields:
            rendered += " " + " ".join(f"{k}={_render(v)}" for k, v in fields.items())
        record = self.logger.makeRecord(
            self.logger.name,
            level,
            "(plugin)",
            0,
            rendered,
            (),
            None,
            extra={"plugin_id": self.plugin_id, "plugin_fields": fields},
        )
        if created is not None:
            record.created = created
            record.msecs = (created - int(created)) * 1000
        self.logger.handle(record)


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and '"' not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


class TailBuffer:
    """The last lines a plugin wrote, kept for error messages (bounded in lines and bytes)."""

    def __init__(self, *, lines: int = 20, line_bytes: int = 512) -> None:
        self._lines: deque[str] = deque(maxlen=lines)
        self._line_bytes = line_bytes

    def add(self, line: bytes) -> None:
        text = line.rstrip(b"\r\n")[: self._line_bytes].decode("utf-8", "replace")
        if text.strip():
            self._lines.append(text)

    def text(self) -> str:
        return "\n".join(self._lines)


async def iter_lines(
    stream: asyncio.StreamReader, *, max_line: int = MAX_LINE
) -> AsyncIterator[bytes]:
    """Yield lines from a pipe until EOF; a line longer than ``max_line`` comes in pieces.

    Reads in large blocks so a chatty plugin never waits on a full pipe for long.
    """
    pending = bytearray()
    while True:
        block = await stream.read(max_line)
        if not block:
            break
        pending += block
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            yield bytes(pending[start : end + 1])
            start = end + 1
        del pending[:start]
        while len(pending) >= max_line:
            yield bytes(pending[:max_line])
            del pending[:max_line]
    if pending:
        yield bytes(pending)
