"""QueryData results as Grafana's /api/ds/query JSON: plugin frames in, SDK frame JSON out.

A plugin answers QueryData with one `DataResponse` per refId whose `frames` are Arrow IPC
files (`format` ARROW) or the SDK's frame JSON (`format` JSON). Grafana decodes them into
`data.Frame`s and writes `{"results":{"<refId>":{...,"frames":[...]}}}`; this module writes
the same document without Go:

- `frame_to_json` turns one encoded frame into the SDK's frame JSON (JSON frames pass
  through byte for byte after validation; Arrow frames are decoded with pyarrow);
- `iter_query_response_json` yields the whole document frame by frame, so a large response
  is never held in memory twice;
- `write_query_response` streams that document to an aiohttp client;
- `overall_status` is the HTTP status Grafana answers with.

docs/frames.md describes the format and the few places where we differ from Grafana.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol

import pyarrow as pa
import pyarrow.ipc
from aiohttp import web

from bridge.gojson import (
    GoJSONError,
    field_config_json,
    frame_meta_json,
    go_float32,
    go_float64,
    go_string,
    labels_json,
    parse_json,
)

__all__ = [
    "ARROW",
    "JSON",
    "DataResponseLike",
    "FrameError",
    "frame_to_json",
    "iter_query_response_json",
    "overall_status",
    "result_status",
    "write_query_response",
]

ARROW: Final = 0  # pluginv2.DataFrameFormat.ARROW
JSON: Final = 1  # pluginv2.DataFrameFormat.JSON

_FILE_MAGIC: Final = b"ARROW1"
_NS_PER_UNIT: Final = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_NS_PER_MS: Final = 1_000_000
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class FrameError(ValueError):
    """An encoded frame that Grafana could not decode; the message says which and why."""


class DataResponseLike(Protocol):
    """What is read from a result: the attributes of `pluginv2.DataResponse`."""

    @property
    def frames(self) -> Sequence[bytes]: ...
    @property
    def error(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def errorSource(self) -> str: ...
    @property
    def format(self) -> int: ...


# ---- one frame ----


def frame_to_json(raw: bytes, fmt: int) -> bytes:
    """One encoded frame (`fmt` is the DataResponse's DataFrameFormat) as the SDK's frame JSON.

    Raises FrameError for bytes that are not a frame of that format.
    """
    if fmt == JSON:
        _check_json_frame(raw)
        return raw
    if fmt == ARROW:
        return _utf8(_ArrowFrame(raw).to_json())
    raise FrameError(f"unknown DataFrameFormat {fmt} (0 is ARROW, 1 is JSON)")


def _check_json_frame(raw: bytes) -> None:
    """A JSON frame goes out byte for byte; check only that it is one JSON object.

    The C parser in :mod:`json` is used here because this runs for every frame of every
    answer; the Go-compatible parser is for the parts the bridge itself re-encodes.
    """
    if raw[:6] == _FILE_MAGIC:
        raise FrameError("frame is marked JSON but holds an Arrow IPC file")
    try:
        frame = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FrameError(f"JSON frame is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise FrameError(f"JSON frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError(f"JSON frame must be an object, not {type(frame).__name__}")


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape; Go writes U+FFFD
        return _LONE_SURROGATE.sub("\ufffd", text).encode()


def _read_arrow(raw: bytes) -> pa.Table:
    """The frame's record batches as one table (the SDK appends every batch of the file)."""
    try:
        if raw[:6] == _FILE_MAGIC:
            table = pyarrow.ipc.open_file(pa.py_buffer(raw)).read_all()
        else:
            # Not the documented encoding, but some hosts and tools write the IPC stream format.
            table = pyarrow.ipc.open_stream(pa.py_buffer(raw)).read_all()
        table.validate(full=True)  # offsets in bounds, strings UTF-8: garbage fails here
    except (pa.ArrowException, ValueError, OSError) as exc:
        start = bytes(raw[:8])
        raise FrameError(
            "frame is neither an Arrow IPC file (magic ARROW1) nor an Arrow IPC stream "
            f"(starts with {start!r}, {len(raw)} bytes): {exc}"
        ) from None
    return table


@dataclass(frozen=True, slots=True)
class _Column:
    values: str  # the comma-separated JSON values, without brackets
    entities: str | None = None
    nanos: str | None = None


Writer = Callable[[pa.ChunkedArray, bool], _Column]


@dataclass(frozen=True, slots=True)
class _Kind:
    """The SDK field type an Arrow column decodes to: JSON `type`, `typeInfo.frame`, writer."""

    type: str
    frame: str
    write: Writer


def _ints(column: pa.ChunkedArray, nullable: bool) -> _Column:
    null = "null" if nullable else "0"  # a non-nullable SDK vector reads the zeroed slot
    return _Column(",".join(null if value is None else str(value) for value in column.to_pylist()))


def _floats(spell: Callable[[float], str]) -> Writer:
    def write(column: pa.ChunkedArray, nullable: bool) -> _Column:
        null = "null" if nullable else "0"
        parts: list[str] = []
        special: dict[str, list[str]] = {"NaN": [], "Inf": [], "NegInf": []}
        for index, value in enumerate(column.to_pylist()):
            if value is None:
                parts.append(null)
            elif math.isfinite(value):
                parts.append(spell(value))
            else:
                key = "NaN" if math.isnan(value) else "Inf" if value > 0 else "NegInf"
                special[key].append(str(index))
                parts.append("null")
        entities = ",".join(f'"{key}":[{",".join(rows)}]' for key, rows in special.items() if rows)
        return _Column(",".join(parts), "{" + entities + "}" if entities else None)

    return write


def _bools(column: pa.ChunkedArray, nullable: bool) -> _Column:
    spelled = {True: "true", False: "false", None: "null" if nullable else "false"}
    return _Column(",".join(spelled[value] for value in column.to_pylist()))


def _strings(column: pa.ChunkedArray, nullable: bool) -> _Column:
    null = "null" if nullable else '""'
    try:
        values = column.to_pylist()
    except UnicodeDecodeError as exc:
        raise FrameError(f"string column is not valid UTF-8: {exc}") from None
    return _Column(",".join(null if value is None else go_string(value) for value in values))


def _times(column: pa.ChunkedArray, nullable: bool) -> _Column:
    unit = column.type.unit
    scale = _NS_PER_UNIT[unit]
    parts: list[str] = []
    nanos: list[int] | None = None
    for index, value in enumerate(column.cast(pa.int64()).to_pylist()):
        if value is None:
            parts.append("null" if nullable else "0")
            continue
        millis, offset = divmod(value * scale, _NS_PER_MS)
        parts.append(str(millis))
        if offset:
            if nanos is None:
                nanos = [0] * len(column)
            nanos[index] = offset
    return _Column(
        ",".join(parts), nanos=None if nanos is None else "[" + ",".join(map(str, nanos)) + "]"
    )


def _json_values(column: pa.ChunkedArray, nullable: bool) -> _Column:
    parts: list[str] = []
    for index, value in enumerate(column.to_pylist()):
        if not value or value == b"null":
            parts.append("null")
            continue
        try:
            text = value.decode("utf-8")
            parse_json(text, what="value")
        except (UnicodeDecodeError, GoJSONError) as exc:
            raise FrameError(f"row {index} of a JSON (binary) column: {exc}") from None
        parts.append(text)  # the SDK writes the raw message, whitespace and all
    return _Column(",".join(parts))


_KINDS: Final[dict[pa.DataType, _Kind]] = {
    pa.int8(): _Kind("number", "int8", _ints),
    pa.int16(): _Kind("number", "int16", _ints),
    pa.int32(): _Kind("number", "int32", _ints),
    pa.int64(): _Kind("number", "int64", _ints),
    pa.uint8(): _Kind("number", "uint8", _ints),
    pa.uint16(): _Kind("number", "uint16", _ints),
    pa.uint32(): _Kind("number", "uint32", _ints),
    pa.uint64(): _Kind("number", "uint64", _ints),
    pa.float32(): _Kind("number", "float32", _floats(go_float32)),
    pa.float64(): _Kind("number", "float64", _floats(go_float64)),
    pa.bool_(): _Kind("boolean", "bool", _bools),
    pa.string(): _Kind("string", "string", _strings),
    pa.string_view(): _Kind("string", "string", _strings),
    pa.binary(): _Kind("other", "json.RawMessage", _json_values),
}
_TIME: Final = _Kind("time", "time.Time", _times)
_ENUM: Final = _Kind("enum", "enum", _ints)


def _metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, str]:
    if not raw:
        return {}
    return {
        key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
        for key, value in raw.items()
    }


class _ArrowFrame:
    """One Arrow-encoded frame, decoded the way the SDK's UnmarshalArrowFrame decodes it."""

    def __init__(self, raw: bytes) -> None:
        self._table = _read_arrow(raw)
        self._kinds = [self._kind(index, field) for index, field in enumerate(self._table.schema)]

    @staticmethod
    def _kind(index: int, field: pa.Field) -> _Kind:
        if pa.types.is_timestamp(field.type):
            return _TIME
        tstype = _metadata(field.metadata).get("tstype")
        if field.type == pa.uint16() and tstype == "enum":
            return _ENUM
        kind = _KINDS.get(field.type)
        if kind is None:
            raise FrameError(
                f"field {index} ({field.name!r}): Arrow type {field.type} has no SDK field type "
                "(Grafana accepts int8-64, uint8-64, float32/64, bool, string, timestamp, binary)"
            )
        return kind

    def to_json(self) -> str:
        return '{"schema":' + self.schema_json() + ',"data":' + self.data_json() + "}"

    def validate(self) -> None:
        """Everything that can fail, without writing the values (JSON columns are parsed)."""
        self.schema_json()
        for column, kind in zip(self._table.columns, self._kinds, strict=True):
            if kind.write is _json_values:
                kind.write(column, True)

    def schema_json(self) -> str:
        schema = self._table.schema
        metadata = _metadata(schema.metadata)
        parts: list[str] = []
        if metadata.get("name"):
            parts.append('"name":' + go_string(metadata["name"]))
        if metadata.get("refId"):
            parts.append('"refId":' + go_string(metadata["refId"]))
        if "meta" in metadata:
            parts.append('"meta":' + self._decoded("frame meta", frame_meta_json, metadata["meta"]))
        fields = [
            self._field_json(index, field, kind)
            for index, (field, kind) in enumerate(zip(schema, self._kinds, strict=True))
        ]
        parts.append('"fields":[' + ",".join(fields) + "]")
        return "{" + ",".join(parts) + "}"

    def _field_json(self, index: int, field: pa.Field, kind: _Kind) -> str:
        metadata = _metadata(field.metadata)
        where = f"field {index} ({field.name!r})"
        parts = ['"name":' + go_string(field.name)] if field.name else []
        parts.append(f'"type":"{kind.type}"')
        nullable = ',"nullable":true' if field.nullable else ""
        parts.append(f'"typeInfo":{{"frame":"{kind.frame}"{nullable}}}')
        if "labels" in metadata:
            labels = self._decoded(f"{where} labels", labels_json, metadata["labels"])
            if labels is not None:
                parts.append('"labels":' + labels)
        if "config" in metadata:
            config = self._decoded(f"{where} config", field_config_json, metadata["config"])
            parts.append('"config":' + config)
        return "{" + ",".join(parts) + "}"

    @staticmethod
    def _decoded(what: str, decode: Callable[[str], Any], text: str) -> Any:
        try:
            return decode(text)
        except GoJSONError as exc:
            raise FrameError(f"{what}: {exc}") from None

    def data_json(self) -> str:
        values: list[str] = []
        entities: list[str] = []
        nanos: list[str] = []
        for column, kind, field in zip(
            self._table.columns, self._kinds, self._table.schema, strict=True
        ):
            written = kind.write(column, field.nullable)
            values.append("[" + written.values + "]")
            entities.append(written.entities or "null")
            nanos.append(written.nanos or "null")
        data = '{"values":[' + ",".join(values) + "]"
        if any(entity != "null" for entity in entities):
            data += ',"entities":[' + ",".join(entities) + "]"
        if any(nano != "null" for nano in nanos):
            data += ',"nanos":[' + ",".join(nanos) + "]"
        return data + "}"


# ---- a whole QueryData response ----


def result_status(result: DataResponseLike) -> int:
    """The `status` Grafana reports for one result.

    A valid HTTP status is kept; a result with an error and no valid status is 500; plugins
    older than SDK v0.142 send 0 on success, which is 200.
    """
    if 100 <= result.status <= 599:
        return int(result.status)
    return 500 if result.error or result.status else 200


def overall_status(
    results: Mapping[str, DataResponseLike], *, failed: int = HTTPStatus.MULTI_STATUS
) -> int:
    """200 when every result succeeded (no error, 2xx status), else `failed` (207)."""
    for result in results.values():
        if result.error or not 200 <= result_status(result) <= 299:
            return failed
    return HTTPStatus.OK


def _result_head(result: DataResponseLike) -> str:
    parts = []
    if result.error:
        # The SDK writes errorSource next to every error, even when the plugin left it empty.
        parts.append('"error":' + go_string(result.error))
        parts.append('"errorSource":' + go_string(result.errorSource))
    parts.append(f'"status":{result_status(result)}')
    parts.append('"frames":[')
    return ",".join(parts)


def _validate(ref_id: str, result: DataResponseLike) -> None:
    frames = result.frames
    for index in range(len(frames)):
        try:
            if result.format == ARROW:
                _ArrowFrame(frames[index]).validate()
            else:
                frame_to_json(frames[index], result.format)
        except FrameError as exc:
            raise FrameError(f"result {ref_id!r} frame {index}: {exc}") from None


def iter_query_response_json(
    results: Mapping[str, DataResponseLike], *, pretty: bool = False
) -> Iterator[bytes]:
    """The /api/ds/query document for `results`, one chunk per frame, refIds sorted.

    Every frame is checked before this returns, so a FrameError is raised here, before the
    caller has sent anything. Each chunk holds at most one converted frame; nothing of an
    earlier frame is kept, so the caller can write each chunk and let it go.
    """
    ref_ids = sorted(results)
    for ref_id in ref_ids:
        _validate(ref_id, results[ref_id])
    chunks = _chunks(results, ref_ids)
    return _Indenter().indent(chunks) if pretty else chunks


def _chunks(results: Mapping[str, DataResponseLike], ref_ids: list[str]) -> Iterator[bytes]:
    pending = '{"results":{'
    for position, ref_id in enumerate(ref_ids):
        result = results[ref_id]
        separator = "," if position else ""
        pending += separator + go_string(ref_id) + ":{" + _result_head(result)
        frames = result.frames
        for index in range(len(frames)):
            frame = frame_to_json(frames[index], result.format)
            yield (pending + ("," if index else "")).encode() + frame
            pending = ""
        pending += "]}"
    yield (pending + "}}\n").encode()


async def write_query_response(
    request: web.BaseRequest,
    results: Mapping[str, DataResponseLike],
    *,
    pretty: bool = False,
    failed: int = HTTPStatus.MULTI_STATUS,
) -> web.StreamResponse:
    """Stream the document to the client, converting frames off the event loop.

    A FrameError is raised before the response is started, so the caller can still answer
    with an error status.
    """
    # A thread hop costs more than converting a small answer; only large ones leave the loop.
    inline = sum(len(f) for r in results.values() for f in r.frames) <= _INLINE_BYTES
    if inline:
        chunks = iter_query_response_json(results, pretty=pretty)
    else:
        chunks = await asyncio.to_thread(iter_query_response_json, results, pretty=pretty)
    response = web.StreamResponse(status=overall_status(results, failed=failed))
    response.content_type = "application/json"
    await response.prepare(request)
    if inline:
        await response.write(b"".join(chunks))
    else:
        while (chunk := await asyncio.to_thread(_next_chunk, chunks)) is not None:
            await response.write(chunk)
    await response.write_eof()
    return response


_INLINE_BYTES = 256 * 1024


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


# ---- ?pretty ----

_TOKEN: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]|[^\s{}\[\],:"]+|\s+')


class _Indenter:
    """Re-indents compact JSON chunks by two spaces per level without re-encoding any value.

    Chunks must split the document between tokens, which `_chunks` does.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._opened = False  # the last token opened a container: `{}`/`[]` stay on one line

    def indent(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            yield self._feed(chunk)

    def _feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for match in _TOKEN.finditer(chunk):
            token = match.group()
            if token.isspace():
                if token.endswith(b"\n") and self._depth == 0:
                    out.append(b"\n")
                continue
            if token in (b"}", b"]"):
                self._depth -= 1
                if not self._opened:
                    out.append(b"\n" + b"  " * self._depth)
                out.append(token)
                self._opened = False
                continue
            if self._opened:
                out.append(b"\n" + b"  " * self._depth)
                self._opened = False
            if token in (b"{", b"["):
                out.append(token)
                self._depth += 1
                self._opened = True
            elif token == b",":
                out.append(b",\n" + b"  " * self._depth)
            elif token == b":":
                out.append(b": ")
            else:
                out.append(token)
        return b"".join(out)
