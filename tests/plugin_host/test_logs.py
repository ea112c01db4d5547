"""Plugin stderr lines become log records with the plugin id attached."""

from __future__ import annotations

import asyncio
import logging

import pytest

from plugin_host.logs import TRACE, LineSplitter, PluginLogParser, TailBuffer, iter_lines


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=1)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture() -> tuple[PluginLogParser, Capture]:
    logger = logging.getLogger("plugin.test-logs")
    logger.setLevel(1)
    logger.propagate = False
    handler = Capture()
    logger.handlers = [handler]
    return PluginLogParser("acme-datasource", logger=logger), handler


CASES = [
    (
        b'{"@level":"info","@message":"Serving plugin","@timestamp":"2024-05-01T12:34:56.789012+02:00",'
        b'"plugins":["data","diagnostics"]}\n',
        logging.INFO,
        'Serving plugin plugins=["data","diagnostics"]',
        {"plugins": ["data", "diagnostics"]},
    ),
    (
        b'{"@level":"trace","@message":"t","@timestamp":"2024-05-01T12:00:00.000000Z"}',
        TRACE,
        "t",
        {},
    ),
    (
        b'{"@level":"warn","@message":"slow query","@timestamp":"2024-05-01T12:00:00.000000Z",'
        b'"timestamp":"dropped","endpoint":"queryData","n":3,"@module":"sql"}',
        logging.WARNING,
        "slow query endpoint=queryData n=3 module=sql",
        {"endpoint": "queryData", "n": 3, "module": "sql"},
    ),
    (
        b'{"@level":"error","@message":"boom","@timestamp":"2024-05-01T12:00:00.000000Z","error":"x y"}',
        logging.ERROR,
        'boom error="x y"',
        {"error": "x y"},
    ),
    # Unknown level: the whole line at debug, as go-plugin does.
    (b'{"@level":"loud","@message":"m"}', logging.DEBUG, '{"@level":"loud","@message":"m"}', {}),
    # A timestamp that does not parse sends the line to plain handling.
    (
        b'{"@level":"info","@message":"m","@timestamp":"yesterday"}',
        logging.DEBUG,
        '{"@level":"info","@message":"m","@timestamp":"yesterday"}',
        {},
    ),
    (b"[WARN] disk almost full\n", logging.WARNING, "disk almost full", {}),
    (b"[ERROR] cannot connect", logging.ERROR, "cannot connect", {}),
    (b"[TRACE] t", TRACE, "t", {}),
    (b"just some text", logging.DEBUG, "just some text", {}),
    (b"[1, 2, 3]", logging.DEBUG, "[1, 2, 3]", {}),
    (b"\xff\xfe not utf-8", logging.DEBUG, "\ufffd\ufffd not utf-8", {}),
]


@pytest.mark.parametrize(("line", "level", "message", "fields"), CASES)
def test_line_becomes_record(
    capture: tuple[PluginLogParser, Capture],
    line: bytes,
    level: int,
    message: str,
    fields: dict[str, object],
) -> None:
    parser, handler = capture
    parser.feed(line)
    [record] = handler.records
    assert record.levelno == level
    assert record.getMessage() == message
    assert record.__dict__["plugin_id"] == "acme-datasource"
    assert record.__dict__["plugin_fields"] == fields


def test_timestamp_is_taken_from_the_plugin(capture: tuple[PluginLogParser, Capture]) -> None:
    parser, handler = capture
    parser.feed(b'{"@level":"info","@message":"m","@timestamp":"2024-05-01T12:34:56.789012+02:00"}')
    assert handler.records[0].created == pytest.approx(1714559696.789012)


def test_panic_mode_makes_untagged_lines_errors(capture: tuple[PluginLogParser, Capture]) -> None:
    parser, handler = capture
    for line in (
        b"before",
        b"panic: runtime error: index out of range",
        b"goroutine 1 [running]:",
        b"main.main()",
        b"[INFO] tagged",
    ):
        parser.feed(line)
    assert [r.levelno for r in handler.records] == [
        logging.DEBUG,
        logging.ERROR,
        logging.ERROR,
        logging.ERROR,
        logging.INFO,
    ]


def test_blank_lines_are_dropped(capture: tuple[PluginLogParser, Capture]) -> None:
    parser, handler = capture
    parser.feed(b"\n")
    parser.feed(b"   \r\n")
    assert handler.records == []


def test_tail_keeps_last_lines_bounded() -> None:
    tail = TailBuffer(lines=3, line_bytes=5)
    for i in range(10):
        tail.add(f"line-{i}-long\n".encode())
    assert tail.text() == "line-\nline-\nline-"
    tail2 = TailBuffer(lines=2)
    for word in (b"a\n", b"b\n", b"c\n"):
        tail2.add(word)
    assert tail2.text() == "b\nc"


async def test_iter_lines_splits_and_caps_long_lines() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"one\ntw")
    reader.feed_data(b"o\n" + b"x" * 25 + b"\nlast")
    reader.feed_eof()
    lines = [line async for line in iter_lines(reader, max_line=10)]
    assert lines == [b"one\n", b"two\n", b"x" * 10, b"x" * 10, b"xxxxx\n", b"last"]


def test_a_line_that_breaks_the_parser_is_logged_raw_and_warned_about_once(
    capture: tuple[PluginLogParser, Capture], caplog: pytest.LogCaptureFixture
) -> None:
    parser, handler = capture
    nested = b'{"@level":"info","@message":"x","k":' + b'{"a":' * 5000 + b"1" + b"}" * 5001
    parser.feed(nested + b"\n")
    parser.feed(nested + b"\n")
    parser.feed(b"[INFO] still parsing")
    assert [(r.levelno, r.getMessage()[:20]) for r in handler.records] == [
        (logging.DEBUG, nested.decode()[:20]),
        (logging.DEBUG, nested.decode()[:20]),
        (logging.INFO, "still parsing"),
    ]
    warnings = [r for r in caplog.records if r.name == "plugin_host.logs"]
    assert len(warnings) == 1 and "RecursionError" in warnings[0].getMessage()


def test_go_stack_dump_after_sigquit_is_logged_as_errors(
    capture: tuple[PluginLogParser, Capture],
) -> None:
    parser, handler = capture
    for line in (b"SIGQUIT: quit", b"PC=0x46b0e1 m=0 sigcode=0", b"goroutine 1 [select]:"):
        parser.feed(line)
    assert [r.levelno for r in handler.records] == [logging.ERROR] * 3


SPLITS = [
    # (chunks as they arrive, max_line, lines out, left at EOF)
    ([b"a\nb", b"c\n"], 10, [b"a\n", b"bc\n"], []),
    ([b"no newline"], 64, [], [b"no newline"]),
    ([b"x" * 25 + b"\ny"], 10, [b"x" * 10, b"x" * 10, b"xxxxx\n"], [b"y"]),
    ([b"x" * 7, b"x" * 7], 10, [b"x" * 10], [b"x" * 4]),
    ([b"", b"\n\n"], 10, [b"\n", b"\n"], []),
]


@pytest.mark.parametrize(("chunks", "max_line", "lines", "rest"), SPLITS)
def test_line_splitter(
    chunks: list[bytes], max_line: int, lines: list[bytes], rest: list[bytes]
) -> None:
    splitter = LineSplitter(max_line=max_line)
    out = [line for chunk in chunks for line in splitter.feed(chunk)]
    assert out == lines
    assert splitter.flush() == rest
    assert splitter.flush() == []
