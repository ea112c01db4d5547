"""Plugin output (hclog JSON and plain lines) turned into records in the host's logging."""

from __future__ import annotations

import asyncio
import contextlib
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
# go-plugin's two, plus the header of the goroutine dump the Go runtime writes on SIGQUIT
# (the supervisor sends it to a hung plugin before killing it).
_PANIC_START = (b"panic: ", b"fatal error: ", b"SIGQUIT: ")
_RESERVED = ("@level", "@message", "@timestamp", "@module", "@caller")
# hclog writes keys sorted, so "@level" comes first: read it without decoding the line, to
# skip lines below the logger's level cheaply (a plugin at debug level writes a lot of them).
_LEVEL_FIELD = re.compile(rb'"@level"\s*:\s*"([A-Za-z]+)"')

log = logging.getLogger(__name__)


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
        self._warned = False

    def feed(self, line: bytes) -> None:
        """Log one line. Never raises: whatever a plugin writes, its pipes keep being read."""
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return
        try:
            if line.lstrip().startswith(b"{") and self._feed_json(line):
                return
            self._feed_plain(line)
        except Exception as exc:
            self._unparseable(line, exc)

    def _unparseable(self, line: bytes, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "plugin %s wrote a line its log parser cannot handle (%s); "
                "such lines are logged as they are, at DEBUG",
                self.plugin_id,
                type(exc).__name__,
            )
        with contextlib.suppress(Exception):
            self._emit(logging.DEBUG, line.decode("utf-8", "replace"), {})

    def _feed_json(self, line: bytes) -> bool:
        quick = _LEVEL_FIELD.search(line)
        if quick is not None:
            level = _HCLOG_LEVELS.get(quick.group(1).decode("ascii").lower())
            if level is not None and not self.logger.isEnabledFor(level):
                return True
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


class LineSplitter:
    """Cuts a byte stream into lines as it arrives; a line over ``max_line`` comes in pieces."""

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by ``data``, each with its newline."""
        pending = self._pending
        pending += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            if end + 1 - start > self._max_line:
                lines.extend(self._pieces(bytes(pending[start : end + 1])))
            else:
                lines.append(bytes(pending[start : end + 1]))
            start = end + 1
        del pending[:start]
        while len(pending) >= self._max_line:
            lines.append(bytes(pending[: self._max_line]))
            del pending[: self._max_line]
        return lines

    def flush(self) -> list[bytes]:
        """What is left at end of stream (a last line without a newline)."""
        rest, self._pending = bytes(self._pending), bytearray()
        return [rest] if rest else []

    def _pieces(self, line: bytes) -> list[bytes]:
        size = self._max_line
        return [line[i : i + size] for i in range(0, len(line), size)]


async def iter_lines(
    stream: asyncio.StreamReader, *, max_line: int = MAX_LINE
) -> AsyncIterator[bytes]:
    """Yield lines from a stream until EOF, cut as :class:`LineSplitter` does."""
    splitter = LineSplitter(max_line=max_line)
    while block := await stream.read(max_line):
        for line in splitter.feed(block):
            yield line
    for line in splitter.flush():
        yield line
