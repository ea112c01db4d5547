"""Plugin frames to Grafana's frame JSON: every field type, metadata, errors, and streaming."""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.frames import (
    ARROW,
    JSON,
    DataResponseLike,
    FrameError,
    frame_to_json,
    iter_query_response_json,
    overall_status,
    result_status,
    write_query_response,
)
from bridge.gojson import go_float32, go_float64, go_general
from protos.pluginv2 import backend_pb2 as pb
from tests.plugin_host.test_client import ctx, launch, query

Column = tuple[pa.Field, Sequence[Any]]


def arrow_frame(
    *columns: Column,
    metadata: dict[str, str] | None = None,
    batches: int = 1,
    stream: bool = False,
) -> bytes:
    """An Arrow IPC file (or stream) as a plugin sends it; rows split over `batches` batches."""
    schema = pa.schema([column for column, _ in columns], metadata=metadata)
    arrays = [pa.array(values, type=column.type) for column, values in columns]
    rows = len(arrays[0]) if arrays else 0
    sink = pa.BufferOutputStream()
    open_writer = pyarrow.ipc.new_stream if stream else pyarrow.ipc.new_file
    with open_writer(sink, schema) as writer:
        step = max(1, math.ceil(rows / batches))
        for start in range(0, rows, step):
            sliced = [array.slice(start, step) for array in arrays]
            writer.write_batch(pa.record_batch(sliced, schema=schema))
    raw: bytes = sink.getvalue().to_pybytes()
    return raw


def col(
    name: str,
    arrow_type: pa.DataType,
    values: Sequence[Any],
    *,
    nullable: bool = False,
    **metadata: str,
) -> Column:
    return pa.field(name, arrow_type, nullable=nullable, metadata=metadata or None), values


@dataclass(frozen=True)
class Case:
    id: str
    frame: bytes
    expected: str


FLOAT64S = [math.nan, math.inf, -math.inf, None, 0.5, 1e-7, 1.5e-5, 1e21, 1e20, -0.0, 2.0]
FLOAT64S += [0.1 + 0.2, math.nan]

CASES = [
    Case(
        "every integer width, extremes",
        arrow_frame(
            col("i8", pa.int8(), [-128, 127]),
            col("i16", pa.int16(), [-32768, 32767]),
            col("i32", pa.int32(), [-(2**31), 2**31 - 1]),
            col("i64", pa.int64(), [-(2**63), 2**63 - 1]),
            col("u8", pa.uint8(), [0, 255]),
            col("u16", pa.uint16(), [0, 65535]),
            col("u32", pa.uint32(), [0, 2**32 - 1]),
            col("u64", pa.uint64(), [0, 2**64 - 1]),
            metadata={"name": "ints", "refId": "A"},
        ),
        '{"schema":{"name":"ints","refId":"A","fields":['
        '{"name":"i8","type":"number","typeInfo":{"frame":"int8"}},'
        '{"name":"i16","type":"number","typeInfo":{"frame":"int16"}},'
        '{"name":"i32","type":"number","typeInfo":{"frame":"int32"}},'
        '{"name":"i64","type":"number","typeInfo":{"frame":"int64"}},'
        '{"name":"u8","type":"number","typeInfo":{"frame":"uint8"}},'
        '{"name":"u16","type":"number","typeInfo":{"frame":"uint16"}},'
        '{"name":"u32","type":"number","typeInfo":{"frame":"uint32"}},'
        '{"name":"u64","type":"number","typeInfo":{"frame":"uint64"}}]},'
        '"data":{"values":[[-128,127],[-32768,32767],[-2147483648,2147483647],'
        "[-9223372036854775808,9223372036854775807],[0,255],[0,65535],[0,4294967295],"
        "[0,18446744073709551615]]}}",
    ),
    Case(
        "nullable integers keep their nulls",
        arrow_frame(
            col("a", pa.int32(), [1, None, -3], nullable=True),
            col("b", pa.uint64(), [None, 2**64 - 1, 0], nullable=True),
        ),
        '{"schema":{"fields":['
        '{"name":"a","type":"number","typeInfo":{"frame":"int32","nullable":true}},'
        '{"name":"b","type":"number","typeInfo":{"frame":"uint64","nullable":true}}]},'
        '"data":{"values":[[1,null,-3],[null,18446744073709551615,0]]}}',
    ),
    Case(
        "float64: NaN/Inf/-Inf as entities, null, and Go's number spelling",
        arrow_frame(
            col(
                "v",
                pa.float64(),
                FLOAT64S,
                nullable=True,
            ),
        ),
        '{"schema":{"fields":[{"name":"v","type":"number","typeInfo":{"frame":"float64",'
        '"nullable":true}}]},"data":{"values":[[null,null,null,null,0.5,1e-07,0.000015,1e+21,'
        "100000000000000000000,-0,2,0.30000000000000004,null]],"
        '"entities":[{"NaN":[0,12],"Inf":[1],"NegInf":[2]}]}}',
    ),
    Case(
        "float32: shortest float32 digits",
        arrow_frame(
            col("v", pa.float32(), [0.1, 3.4028235e38, 1e-7, math.nan, 16777216.0, 1.5]),
            col("w", pa.float32(), [None, -math.inf, 0.0, 2.5e-6, 1e21, -1.25], nullable=True),
        ),
        '{"schema":{"fields":[{"name":"v","type":"number","typeInfo":{"frame":"float32"}},'
        '{"name":"w","type":"number","typeInfo":{"frame":"float32","nullable":true}}]},'
        '"data":{"values":[[0.1,3.4028235e+38,1e-07,null,16777216,1.5],'
        "[null,null,0,0.0000025,1e+21,-1.25]],"
        '"entities":[{"NaN":[3]},{"NegInf":[1]}]}}',
    ),
    Case(
        "booleans",
        arrow_frame(
            col("b", pa.bool_(), [True, False]),
            col("nb", pa.bool_(), [None, True], nullable=True),
        ),
        '{"schema":{"fields":[{"name":"b","type":"boolean","typeInfo":{"frame":"bool"}},'
        '{"name":"nb","type":"boolean","typeInfo":{"frame":"bool","nullable":true}}]},'
        '"data":{"values":[[true,false],[null,true]]}}',
    ),
    Case(
        "strings escaped like jsoniter's WriteString (no HTML escaping), string_view too",
        arrow_frame(
            col("s", pa.string(), ["plain", 'q"b\\', "nl\nt\tcr\r", "\x01\x08\x0c\x7f", "<a&b>"]),
            col("sv", pa.string_view(), ["é\u2028", None, "", "x", "y"], nullable=True),
        ),
        '{"schema":{"fields":[{"name":"s","type":"string","typeInfo":{"frame":"string"}},'
        '{"name":"sv","type":"string","typeInfo":{"frame":"string","nullable":true}}]},'
        '"data":{"values":[["plain","q\\"b\\\\","nl\\nt\\tcr\\r","\\u0001\\u0008\\u000c\x7f",'
        '"<a&b>"],["é\u2028",null,"","x","y"]]}}',
    ),
    Case(
        "time: epoch ms plus nanos for sub-millisecond parts, before 1970 too",
        arrow_frame(
            col(
                "t",
                pa.timestamp("ns"),
                [1_700_000_000_123_456_789, None, -1, 0],
                nullable=True,
            ),
            col("ms", pa.timestamp("ms", tz="UTC"), [1_700_000_000_123, 1, 2, 3]),
        ),
        '{"schema":{"fields":['
        '{"name":"t","type":"time","typeInfo":{"frame":"time.Time","nullable":true}},'
        '{"name":"ms","type":"time","typeInfo":{"frame":"time.Time"}}]},'
        '"data":{"values":[[1700000000123,null,-1,0],[1700000000123,1,2,3]],'
        '"nanos":[[456789,0,999999,0],null]}}',
    ),
    Case(
        "JSON fields: binary written raw, empty and null as null",
        arrow_frame(
            col("j", pa.binary(), [b'{"a": [1, 2]}', None, b"null", b"", b'"s"'], nullable=True),
            col("k", pa.binary(), [b"1", b"[]", b"true", b"{}", b"2.50"]),
        ),
        '{"schema":{"fields":['
        '{"name":"j","type":"other","typeInfo":{"frame":"json.RawMessage","nullable":true}},'
        '{"name":"k","type":"other","typeInfo":{"frame":"json.RawMessage"}}]},'
        '"data":{"values":[[{"a": [1, 2]},null,null,null,"s"],[1,[],true,{},2.50]]}}',
    ),
    Case(
        "enum: uint16 with tstype enum; plain uint16 stays a number",
        arrow_frame(
            col(
                "state",
                pa.uint16(),
                [0, 2, 1],
                tstype="enum",
                config='{"type":{"enum":{"text":["ok","warn","bad"],"color":["g","y","r"]}}}',
            ),
            col("maybe", pa.uint16(), [None, 1, 0], nullable=True, tstype="enum"),
            col("count", pa.uint16(), [7, 8, 9], tstype="number"),
        ),
        '{"schema":{"fields":[{"name":"state","type":"enum","typeInfo":{"frame":"enum"},'
        '"config":{"type":{"enum":{"text":["ok","warn","bad"],"color":["g","y","r"]}}}},'
        '{"name":"maybe","type":"enum","typeInfo":{"frame":"enum","nullable":true}},'
        '{"name":"count","type":"number","typeInfo":{"frame":"uint16"}}]},'
        '"data":{"values":[[0,2,1],[null,1,0],[7,8,9]]}}',
    ),
    Case(
        "meta, labels and config re-encoded from the SDK's structs",
        arrow_frame(
            col(
                "value",
                pa.float64(),
                [1.0],
                labels='{"z":"1","a":"<x>"}',
                config=(
                    '{"unit":"short","displayNameFromDS":"A <b>","min":0,"max":1000000,'
                    '"decimals":2,"filterable":false,"custom":{"width":100,"align":"<"},'
                    '"thresholds":{"mode":"absolute","steps":[{"value":null,"color":"green"},'
                    '{"value":80,"color":"red"}]},"Interval":15,"bogus":1}'
                ),
            ),
            col("b", pa.int64(), [1], labels="{}", config="null"),
            col("c", pa.int64(), [2], labels="null", config="{}"),
            metadata={
                "name": "m",
                "refId": "",
                "meta": (
                    '{"custom":{"b":2,"a":1.0},"executedQueryString":"SELECT 1 < 2",'
                    '"notices":[{"text":"n"},{"severity":"error","text":"e","link":"/x"}],'
                    '"unknown":true,"PreferredVisualisationType":"graph",'
                    '"stats":[{"displayName":"rows","value":3}]}'
                ),
            },
        ),
        '{"schema":{"name":"m","meta":{"typeVersion":[0,0],"custom":{"a":1,"b":2},'
        '"stats":[{"displayName":"rows","value":3}],'
        '"notices":[{"severity":"info","text":"n"},{"severity":"error","text":"e","link":"/x"}],'
        '"preferredVisualisationType":"graph","executedQueryString":"SELECT 1 \\u003c 2"},'
        '"fields":[{"name":"value","type":"number","typeInfo":{"frame":"float64"},'
        '"labels":{"a":"<x>","z":"1"},'
        '"config":{"displayNameFromDS":"A <b>","filterable":false,"unit":"short","decimals":2,'
        '"min":0,"max":1e+06,"interval":15,"thresholds":{"mode":"absolute","steps":'
        '[{"color":"green"},{"value":80,"color":"red"}]},'
        '"custom":{"align":"\\u003c","width":100}}},'
        '{"name":"b","type":"number","typeInfo":{"frame":"int64"},"labels":{},"config":{}},'
        '{"name":"c","type":"number","typeInfo":{"frame":"int64"},"config":{}}]},'
        '"data":{"values":[[1],[1],[2]]}}',
    ),
    Case(
        "a frame without fields",
        arrow_frame(metadata={"name": "empty", "meta": "null"}),
        '{"schema":{"name":"empty","meta":{"typeVersion":[0,0]},"fields":[]},"data":{"values":[]}}',
    ),
    Case(
        "zero rows",
        arrow_frame(
            col("t", pa.timestamp("ns"), []),
            col("v", pa.float64(), [], nullable=True),
        ),
        '{"schema":{"fields":[{"name":"t","type":"time","typeInfo":{"frame":"time.Time"}},'
        '{"name":"v","type":"number","typeInfo":{"frame":"float64","nullable":true}}]},'
        '"data":{"values":[[],[]]}}',
    ),
    Case(
        "nulls in non-nullable fields read as zero values, as the SDK's vectors do",
        arrow_frame(
            col("i", pa.int32(), [None]),
            col("f", pa.float64(), [None]),
            col("b", pa.bool_(), [None]),
            col("s", pa.string(), [None]),
            col("t", pa.timestamp("ns"), [None]),
            col("j", pa.binary(), [None]),
        ),
        '{"schema":{"fields":[{"name":"i","type":"number","typeInfo":{"frame":"int32"}},'
        '{"name":"f","type":"number","typeInfo":{"frame":"float64"}},'
        '{"name":"b","type":"boolean","typeInfo":{"frame":"bool"}},'
        '{"name":"s","type":"string","typeInfo":{"frame":"string"}},'
        '{"name":"t","type":"time","typeInfo":{"frame":"time.Time"}},'
        '{"name":"j","type":"other","typeInfo":{"frame":"json.RawMessage"}}]},'
        '"data":{"values":[[0],[0],[false],[""],[0],[null]]}}',
    ),
    Case(
        "several record batches are appended; unnamed fields have no name",
        arrow_frame(col("", pa.int64(), [1, 2, 3, 4, 5]), batches=3),
        '{"schema":{"fields":[{"type":"number","typeInfo":{"frame":"int64"}}]},'
        '"data":{"values":[[1,2,3,4,5]]}}',
    ),
    Case(
        "the Arrow IPC stream format is accepted too",
        arrow_frame(col("x", pa.int64(), [1, 2]), stream=True, metadata={"refId": "S"}),
        '{"schema":{"refId":"S","fields":[{"name":"x","type":"number",'
        '"typeInfo":{"frame":"int64"}}]},"data":{"values":[[1,2]]}}',
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_arrow_frame_to_sdk_json(case: Case) -> None:
    converted = frame_to_json(case.frame, ARROW)
    assert converted.decode() == case.expected
    json.loads(converted)  # and it is JSON


def test_a_frame_written_without_record_batches_has_zero_rows() -> None:
    # The SDK writes schema and footer only for a frame with no rows.
    schema = pa.schema([pa.field("v", pa.float64(), nullable=False)], metadata={"refId": "A"})
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_file(sink, schema):
        pass
    assert frame_to_json(sink.getvalue().to_pybytes(), ARROW) == (
        b'{"schema":{"refId":"A","fields":[{"name":"v","type":"number",'
        b'"typeInfo":{"frame":"float64"}}]},"data":{"values":[[]]}}'
    )


def test_json_frames_pass_through_byte_for_byte() -> None:
    raw = b'{ "schema" : {"fields":[]},\n "data":{"values":[], "extra": 1.0e0}}'
    assert frame_to_json(raw, JSON) is raw


GOOD = arrow_frame(col("v", pa.int64(), [1]))

ERRORS = [
    ("empty bytes", b"", ARROW, "neither an Arrow IPC file"),
    ("garbage", b"definitely not arrow", ARROW, "neither an Arrow IPC file"),
    ("truncated file", GOOD[:-20], ARROW, "neither an Arrow IPC file"),
    ("JSON marked as Arrow", b'{"schema":{}}', ARROW, "neither an Arrow IPC file"),
    (
        "large_string has no SDK type",
        arrow_frame(col("s", pa.large_string(), ["x"])),
        ARROW,
        "field 0 ('s'): Arrow type large_string has no SDK field type",
    ),
    (
        "date32 has no SDK type",
        arrow_frame(col("d", pa.date32(), [1])),
        ARROW,
        "Arrow type date32[day] has no SDK field type",
    ),
    (
        "meta is not JSON",
        arrow_frame(col("v", pa.int64(), [1]), metadata={"meta": "{"}),
        ARROW,
        "frame meta: meta is not valid JSON",
    ),
    (
        "meta with an unknown notice severity",
        arrow_frame(metadata={"meta": '{"notices":[{"severity":"loud"}]}'}),
        ARROW,
        "meta.notices[0].severity: unrecognized notice severity 'loud'",
    ),
    (
        "labels must be strings",
        arrow_frame(col("v", pa.int64(), [1], labels='{"a":1}')),
        ARROW,
        "field 0 ('v') labels: labels.a: cannot unmarshal number into string",
    ),
    (
        "config of the wrong type",
        arrow_frame(col("v", pa.int64(), [1], config='{"unit":5}')),
        ARROW,
        "config.unit: cannot unmarshal number into string",
    ),
    (
        "decimals out of range",
        arrow_frame(col("v", pa.int64(), [1], config='{"decimals":-1}')),
        ARROW,
        "config.decimals: cannot unmarshal number into uint16",
    ),
    (
        "invalid JSON in a JSON field",
        arrow_frame(col("j", pa.binary(), [b"{nope"])),
        ARROW,
        "row 0 of a JSON (binary) column",
    ),
    (
        "NaN is not JSON",
        arrow_frame(col("j", pa.binary(), [b"[1]", b"NaN"])),
        ARROW,
        "row 1 of a JSON (binary) column: value is not valid JSON",
    ),
    ("JSON array", b"[1]", JSON, "JSON frame must be an object, not list"),
    ("broken JSON", b'{"schema":', JSON, "JSON frame is not valid JSON"),
    ("not UTF-8", b'{"a":"\xff"}', JSON, "JSON frame is not UTF-8"),
    ("Arrow marked as JSON", GOOD, JSON, "frame is marked JSON but holds an Arrow IPC file"),
    ("unknown format", GOOD, 7, "unknown DataFrameFormat 7"),
]


@pytest.mark.parametrize(
    ("raw", "fmt", "message"),
    [error[1:] for error in ERRORS],
    ids=[error[0] for error in ERRORS],
)
def test_bytes_that_are_no_frame_raise_frame_error(raw: bytes, fmt: int, message: str) -> None:
    with pytest.raises(FrameError) as raised:
        frame_to_json(raw, fmt)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


SPELLINGS = [
    (go_float64, 1.0, "1"),
    (go_float64, 0.1, "0.1"),
    (go_float64, 1e-6, "0.000001"),
    (go_float64, 9.99e-7, "9.99e-07"),
    (go_float64, -2.5e-8, "-2.5e-08"),
    (go_float64, 1e20, "100000000000000000000"),
    (go_float64, 1e21, "1e+21"),
    (go_float64, 5e-324, "5e-324"),
    (go_float64, 1.7976931348623157e308, "1.7976931348623157e+308"),
    (go_float32, 1.401298464324817e-45, "1e-45"),
    (go_float32, 0.3333333432674408, "0.33333334"),
    (go_float32, 16777217.0, "16777216"),  # not a float32: narrowed like Go's float32(x)
    (go_general, 999999.0, "999999"),
    (go_general, 1e6, "1e+06"),
    (go_general, 1234567.0, "1.234567e+06"),
    (go_general, 0.0001, "0.0001"),
    (go_general, 0.00001, "1e-05"),
    (go_general, -0.0, "-0"),
    (go_general, math.nan, "null"),
]


@pytest.mark.parametrize(("spell", "value", "expected"), SPELLINGS)
def test_numbers_are_spelled_like_go(spell: Any, value: float, expected: str) -> None:
    assert spell(value) == expected


# ---- whole responses ----


@dataclass
class Result:
    """A stand-in for pluginv2.DataResponse."""

    frames: list[bytes] = field(default_factory=list)
    error: str = ""
    status: int = 200
    errorSource: str = ""
    format: int = ARROW


def document(results: Mapping[str, DataResponseLike], *, pretty: bool = False) -> bytes:
    return b"".join(iter_query_response_json(results, pretty=pretty))


SMALL = b'{"schema":{"fields":[]},"data":{"values":[]}}'


def test_response_document_keys_order_and_statuses() -> None:
    results: dict[str, DataResponseLike] = {
        "B": Result(frames=[SMALL, SMALL], format=JSON),
        "A": Result(error="bad", status=400, errorSource="downstream"),
        "C": Result(status=0),
        "D": Result(error='boom "x"', status=0),
        "E": Result(frames=[arrow_frame(col("v", pa.int64(), [1]))], status=201),
    }
    assert document(results) == (
        b'{"results":{'
        b'"A":{"error":"bad","errorSource":"downstream","status":400,"frames":[]},'
        b'"B":{"status":200,"frames":[' + SMALL + b"," + SMALL + b"]},"
        b'"C":{"status":200,"frames":[]},'
        b'"D":{"error":"boom \\"x\\"","errorSource":"","status":500,"frames":[]},'
        b'"E":{"status":201,"frames":[{"schema":{"fields":[{"name":"v","type":"number",'
        b'"typeInfo":{"frame":"int64"}}]},"data":{"values":[[1]]}}]}}}\n'
    )


def test_empty_response() -> None:
    assert document({}) == b'{"results":{}}\n'


def test_chunks_are_one_frame_each_and_concatenate_to_json() -> None:
    frames = [arrow_frame(col("v", pa.int64(), [index])) for index in range(3)]
    chunks = list(
        iter_query_response_json(
            {"A": Result(frames=frames), "B": Result(frames=[SMALL], format=JSON)}
        )
    )
    assert len(chunks) == 5  # one per frame, then the closing brackets
    assert [chunk.count(b'"schema"') for chunk in chunks] == [1, 1, 1, 1, 0]
    parsed = json.loads(b"".join(chunks))
    assert [f["data"]["values"] for f in parsed["results"]["A"]["frames"]] == [[[0]], [[1]], [[2]]]
    assert parsed["results"]["B"] == {"status": 200, "frames": [json.loads(SMALL)]}


def test_real_protobuf_responses_are_accepted() -> None:
    answer = pb.QueryDataResponse()
    answer.responses["A"].CopyFrom(
        pb.DataResponse(frames=[arrow_frame(col("v", pa.float64(), [0.25]))], status=200)
    )
    answer.responses["Z"].CopyFrom(pb.DataResponse(error="nope", errorSource="plugin"))
    parsed = json.loads(document(answer.responses))
    assert parsed["results"]["A"]["frames"][0]["data"]["values"] == [[0.25]]
    assert parsed["results"]["Z"] == {
        "error": "nope",
        "errorSource": "plugin",
        "status": 500,
        "frames": [],
    }


def test_a_bad_frame_fails_before_the_first_chunk() -> None:
    results = {
        "A": Result(frames=[SMALL], format=JSON),
        "B": Result(frames=[SMALL, b"garbage"], format=JSON),
    }
    with pytest.raises(FrameError, match=r"result 'B' frame 1: JSON frame is not valid JSON"):
        iter_query_response_json(results)


def test_pretty_printing_indents_without_changing_values() -> None:
    results: dict[str, DataResponseLike] = {
        "A": Result(frames=[arrow_frame(col("v", pa.float64(), [1e-7, math.nan], nullable=True))]),
        "B": Result(
            frames=[b'{"schema": {"fields": []}, "data": {"values": [[], {}]}}'], format=JSON
        ),
    }
    pretty = document(results, pretty=True)
    assert json.loads(pretty) == json.loads(document(results))
    assert pretty.decode() == (
        "{\n"
        '  "results": {\n'
        '    "A": {\n'
        '      "status": 200,\n'
        '      "frames": [\n'
        "        {\n"
        '          "schema": {\n'
        '            "fields": [\n'
        "              {\n"
        '                "name": "v",\n'
        '                "type": "number",\n'
        '                "typeInfo": {\n'
        '                  "frame": "float64",\n'
        '                  "nullable": true\n'
        "                }\n"
        "              }\n"
        "            ]\n"
        "          },\n"
        '          "data": {\n'
        '            "values": [\n'
        "              [\n"
        "                1e-07,\n"
        "                null\n"
        "              ]\n"
        "            ],\n"
        '            "entities": [\n'
        "              {\n"
        '                "NaN": [\n'
        "                  1\n"
        "                ]\n"
        "              }\n"
        "            ]\n"
        "          }\n"
        "        }\n"
        "      ]\n"
        "    },\n"
        '    "B": {\n'
        '      "status": 200,\n'
        '      "frames": [\n'
        "        {\n"
        '          "schema": {\n'
        '            "fields": []\n'
        "          },\n"
        '          "data": {\n'
        '            "values": [\n'
        "              [],\n"
        "              {}\n"
        "            ]\n"
        "          }\n"
        "        }\n"
        "      ]\n"
        "    }\n"
        "  }\n"
        "}\n"
    )


def test_fifty_one_megabyte_frames_stream_one_frame_at_a_time() -> None:
    size = 1 << 20
    frames = [
        arrow_frame(col("payload", pa.string(), [chr(ord("a") + index % 26) * size]))
        for index in range(50)
    ]
    results = {"A": Result(frames=frames)}
    tracemalloc.start()
    try:
        chunks = iter_query_response_json(results)
        sizes = []
        for index, chunk in enumerate(chunks):
            sizes.append(len(chunk))
            if index < 50:
                assert chunk.endswith(chr(ord("a") + index % 26).encode() * 64 + b'"]]}}')
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sizes) == 51
    assert sum(sizes) > 50 * size
    assert max(sizes) < size + 1024  # never more than one frame per chunk
    assert peak < 8 * size, f"peak {peak / size:.1f} MiB while streaming a 50 MiB body"


STATUS_CASES = [
    ("no results", [], 200),
    ("all ok", [Result(), Result(status=204)], 200),
    ("old plugin: status 0 is 200", [Result(status=0)], 200),
    ("one 4xx", [Result(), Result(status=400, error="x")], 207),
    ("error with a 2xx status still fails", [Result(status=200, error="x")], 207),
    ("error without a status", [Result(status=0, error="x")], 207),
    ("non-2xx without error", [Result(status=302)], 207),
    ("nonsense status", [Result(status=42)], 207),
]


@pytest.mark.parametrize(
    ("results", "expected"),
    [case[1:] for case in STATUS_CASES],
    ids=[case[0] for case in STATUS_CASES],
)
def test_overall_status(results: list[Result], expected: int) -> None:
    assert overall_status({str(index): r for index, r in enumerate(results)}) == expected


def test_overall_status_can_use_grafanas_newer_400() -> None:
    assert overall_status({"A": Result(error="x", status=500)}, failed=400) == 400


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (Result(status=201), 201),
        (Result(status=0), 200),
        (Result(status=0, error="x"), 500),
        (Result(status=600), 500),
        (Result(status=503, error="x"), 503),
    ],
)
def test_result_status(result: Result, expected: int) -> None:
    assert result_status(result) == expected


async def test_write_query_response_streams_to_the_client() -> None:
    good = {"A": Result(frames=[SMALL], format=JSON), "B": Result(error="no", status=502)}
    bad = {"A": Result(frames=[b"nope"], format=JSON)}

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await write_query_response(
                request, bad if request.query.get("bad") else good, pretty="pretty" in request.query
            )
        except FrameError as exc:
            return web.json_response({"message": str(exc)}, status=500)

    app = web.Application()
    app.router.add_get("/query", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/query")
        assert response.status == 207
        assert response.content_type == "application/json"
        assert await response.read() == document(good)
        pretty = await client.get("/query?pretty")
        assert json.loads(await pretty.read()) == json.loads(document(good))
        failed = await client.get("/query?bad=1")
        assert failed.status == 500
        assert "result 'A' frame 0" in (await failed.json())["message"]


# ---- against the real fixture plugin ----


async def test_fixture_arrow_frame_matches_the_fixtures_own_json(short_tmp: Path) -> None:
    """Two independent encoders agree: our Arrow decoding and the fixture's JSON writer."""
    process, client = await launch(short_tmp / "p")
    try:
        answers = {}
        for fmt in (pb.ARROW, pb.JSON):
            answer = await client.query_data(
                pb.QueryDataRequest(
                    pluginContext=ctx(),
                    queries=[query("A", {"special": True, "points": 6})],
                    format=fmt,
                )
            )
            answers[fmt] = answer.responses["A"]
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()

    assert answers[pb.ARROW].format == pb.ARROW
    assert answers[pb.JSON].format == pb.JSON
    ours = json.loads(frame_to_json(answers[pb.ARROW].frames[0], pb.ARROW))
    theirs = json.loads(frame_to_json(answers[pb.JSON].frames[0], pb.JSON))
    # The fixture's JSON writer omits typeVersion, which the SDK's FrameMeta always writes.
    theirs["schema"]["meta"] = {"typeVersion": [0, 0], **theirs["schema"]["meta"]}
    assert ours == theirs
    data = ours["data"]
    assert data["entities"] == [None, {"NaN": [0], "Inf": [1], "NegInf": [2]}]
    assert data["values"][1][:4] == [None, None, None, None]
    assert data["nanos"] == [[7, 14, 21, 28, 35, 42], None]
